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
