"""The prompt library: every strategy is present, documented, and renders correctly through the chat
templates of the embedded model and of the production model families."""
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from engine.render.prompts import PLACEHOLDER, PROMPTS_DIR, available, load_prompt
from engine.render.renderer import Renderer

STRATEGIES = {
    "continuation", "summary",  # BeyondWeb
    "distill", "diverse_qa", "knowledge_extraction", "knowledge_list", "wikipedia_paraphrase",  # Nemotron-CC / WRAP
    "guided_rewrite",  # REWIRE
    "article", "commentary", "discussion", "explanation", "narrative",  # restyling
    "faq", "math", "table", "tutorial",  # structured
}
TEMPLATES = sorted((PROMPTS_DIR / "chat_templates").glob("*.jinja"))


def test_every_strategy_is_shipped_and_documented():
    assert STRATEGIES <= set(available())
    for name in available():
        p = load_prompt(name)
        assert p.name == name and p.origin and p.intent and p.notes and p.max_new_tokens >= 256
        assert p.template.count(PLACEHOLDER) == 1 and p.template.endswith(PLACEHOLDER)
    assert {n for n in available() if load_prompt(n).recommended} == {"faq", "math", "table", "tutorial"}
    assert "4B" in load_prompt("guided_rewrite").notes


def _with_template(tokenizer_dir: Path, template: Path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = template.read_text()
    return tok


@pytest.mark.parametrize("template", TEMPLATES, ids=[t.stem for t in TEMPLATES])
def test_prompts_render_through_production_templates(tiny_model, template):
    tok = _with_template(tiny_model, template)
    prompts = [load_prompt(n) for n in available()]
    r = Renderer(tok, prompts, context=100_000, max_new_tokens=256)
    doc = "the cat sat on a mat"
    doc_ids = r.encode_documents([doc])[0]
    for p in prompts:
        rp = r.rendered[p.name]
        ids, _ = r.request_ids(p.name, doc, doc_ids)
        assert tok.decode(rp.prefix_ids).endswith(p.instruction)
        assert doc in tok.decode(ids[len(rp.prefix_ids):])
        suffix = tok.decode(rp.suffix_ids)
        assert p.instruction.strip()[-20:] not in suffix
        if template.stem == "qwen3":
            assert suffix.endswith("<think>\n\n</think>\n\n")  # thinking switched off


@pytest.mark.slow
def test_prompts_render_through_the_embedded_model():
    from engine.model.locate import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("embedded")[0])
    prompts = [load_prompt(n) for n in available()]
    r = Renderer(tok, prompts, context=8192, max_new_tokens=None)
    docs = ["Rome is the capital of Italy.", "Line one\nline two, with more words"]
    encoded = r.encode_documents(docs)
    for p in prompts:
        rp = r.rendered[p.name]
        assert rp.max_new_tokens == p.max_new_tokens and rp.doc_budget > 4000
        assert tok.decode(rp.prefix_ids).endswith(p.instruction)
        renders = [r.request_ids(p.name, d, e)[0] for d, e in zip(docs, encoded)]
        assert all(x[: len(rp.prefix_ids)] == list(rp.prefix_ids) for x in renders)


def test_every_prompt_has_a_document_first_form():
    """render.layout = "document_first": each shipped prompt's own file, the same name, the document first and
    the instruction after it, referring to the document above."""
    from engine.config.run_config import DOCUMENT_FIRST
    from engine.render.prompts import load_prompts

    for name in available():
        p = load_prompts([name], DOCUMENT_FIRST)[0]
        assert p.layout == DOCUMENT_FIRST and p.name == name and Path(p.path).parent.name == DOCUMENT_FIRST
        assert p.template.startswith(PLACEHOLDER) and p.template.count(PLACEHOLDER) == 1
        assert "document above" in p.instruction and "below" not in p.instruction, name
        assert p.fingerprint != load_prompt(name).fingerprint  # another template: another identity
    assert sorted(x.stem for x in (PROMPTS_DIR / DOCUMENT_FIRST).glob("*.toml")) == available()


@pytest.mark.parametrize("template", [None, *TEMPLATES], ids=["embedded", *(t.stem for t in TEMPLATES)])
def test_document_first_chats_of_a_document_share_a_prefix_covering_it(template):
    """The rendered chats of every prompt of one document share a token prefix that covers the whole document
    (the real tokenizer; the production families' templates too), and prefix_len says so."""
    from engine.config.run_config import DOCUMENT_FIRST
    from engine.model.locate import resolve_model
    from engine.render.prompts import load_prompts

    model_dir = resolve_model("embedded")[0]
    tok = _with_template(model_dir, template) if template else AutoTokenizer.from_pretrained(model_dir)
    prompts = load_prompts(available(), DOCUMENT_FIRST)
    r = Renderer(tok, prompts, context=8192, max_new_tokens=512)
    assert len({rp.doc_budget for rp in r.rendered.values()}) == 1  # one cut for every prompt of a document
    docs = ["Rome is the capital of Italy.\n\nIt has 2.8 million inhabitants.", "x " * 9000]  # the second is cut
    header = r.rendered[prompts[0].name].prefix_ids
    for doc, doc_ids in zip(docs, r.encode_documents(docs)):
        renders = {p.name: r.request_ids(p.name, doc, doc_ids) for p in prompts}
        assert len({truncated for _, truncated in renders.values()}) == 1
        plens = {r.prefix_len(name, x) for name, (x, _) in renders.items()}
        assert len(plens) == 1
        plen = plens.pop()
        first = renders[prompts[0].name][0]
        assert all(x[:plen] == first[:plen] for x, _ in renders.values())  # one prefix for every prompt
        kept = first[len(header):plen]  # ... holding the document: whole, or cut at the same token for all
        cut = renders[prompts[0].name][1]
        assert kept == doc_ids[:len(kept)]
        assert len(kept) == len(doc_ids) if not cut else 0.75 * r.rendered[prompts[0].name].doc_budget < len(kept) <= \
            r.rendered[prompts[0].name].doc_budget
        assert tok.decode(first[:len(header)]) == tok.decode(list(header))
        for p in prompts:  # the instruction comes after the document
            assert p.instruction.strip()[:30] in tok.decode(renders[p.name][0][plen:])
