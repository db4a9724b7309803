import pytest
from transformers import AutoTokenizer

from engine.errors import PromptError
from engine.render.prompts import PLACEHOLDER, available, load_prompt, load_prompt_file, load_prompts
from engine.render.renderer import Renderer

STRUCTURED = ["faq", "math", "table", "tutorial"]


def test_structured_prompts_ship_and_are_recommended():
    assert set(STRUCTURED) <= set(available())
    for name in STRUCTURED:
        p = load_prompt(name)
        assert p.recommended and p.template.rstrip().endswith(PLACEHOLDER) and p.template.count(PLACEHOLDER) == 1


@pytest.mark.parametrize("name", available())
def test_every_prompt_shares_a_prefix_covering_its_instruction(tiny_model, name):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompt = load_prompt(name)
    r = Renderer(tok, [prompt], context=1024, max_new_tokens=64)
    docs = ["first document about cats", "a second, quite different text\nwith two lines", "3"]
    renders = [r.request_ids(name, d, ids)[0] for d, ids in zip(docs, r.encode_documents(docs))]
    prefix = list(r.rendered[name].prefix_ids)
    assert all(ids[: len(prefix)] == prefix for ids in renders)
    # The shared prefix decodes to the chat header followed by the whole instruction.
    assert tok.decode(prefix).endswith(prompt.instruction)
    # Rendering token ids piecewise equals tokenising the full chat text.
    full = tok.apply_chat_template([{"role": "user", "content": prompt.template.replace(PLACEHOLDER, docs[0])}],
                                   tokenize=False, add_generation_prompt=True)
    assert renders[0] == tok(full, add_special_tokens=False).input_ids


def test_user_prompt_files_are_validated(tmp_path):
    good = tmp_path / "mine.toml"
    good.write_text('name = "mine"\norigin = "me"\nintent = "test"\nmax_new_tokens = 50\n'
                    'template = """Summarise:\n{document}"""\n')
    assert load_prompt(str(good)).name == "mine"
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\norigin = "me"\nintent = "t"\nmax_new_tokens = 5\ntemplate = "{document} then text"\n')
    with pytest.raises(PromptError, match="must come last"):
        load_prompt_file(bad)
    twice = tmp_path / "twice.toml"
    twice.write_text('name = "t"\norigin = "m"\nintent = "t"\nmax_new_tokens = 5\n'
                     'template = "a {document} {document}"\n')
    with pytest.raises(PromptError, match="exactly once"):
        load_prompt_file(twice)
    with pytest.raises(PromptError, match="unknown prompt"):
        load_prompt("no-such-prompt")
    with pytest.raises(PromptError, match="used twice"):
        load_prompts(["faq", "faq"])


def test_document_first_forms_are_validated(tmp_path):
    """render.layout = "document_first" reads <folder>/document_first/<stem>.toml: missing, misnamed or with the
    document anywhere but first, it is an error naming the prompt and the file."""
    own = tmp_path / "mine.toml"
    own.write_text('name = "mine"\norigin = "me"\nintent = "test"\nmax_new_tokens = 50\n'
                   'template = """Summarise:\n{document}"""\n')
    with pytest.raises(PromptError, match=r"prompt 'mine' has no document-first form .*document_first/mine.toml"):
        load_prompts([str(own)], "document_first")
    (tmp_path / "document_first").mkdir()
    form = tmp_path / "document_first" / "mine.toml"
    for text, needle in [('name = "other"\ntemplate = "{document} x"\n', "name"),
                         ('name = "mine"\ntemplate = "Read: {document} x"\n', "starts with {document}"),
                         ('name = "mine"\ntemplate = "{document}   "\n', "no instruction after"),
                         ('name = "mine"\nintent = "x"\ntemplate = "{document} x"\n', "unknown key")]:
        form.write_text(text)
        with pytest.raises(PromptError, match=needle):
            load_prompts([str(own)], "document_first")
    form.write_text('name = "mine"\ntemplate = """{document}\n\nSummarise the document above."""\n')
    p = load_prompts([str(own)], "document_first")[0]
    assert p.instruction.strip() == "Summarise the document above." and p.max_new_tokens == 50
    assert load_prompts([str(own)])[0].template.startswith("Summarise")  # document_last: the file's own


def test_truncation_is_token_exact_at_a_line_or_word_boundary(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    r = Renderer(tok, [load_prompt("faq")], context=1000, max_new_tokens=100)
    budget = r.rendered["faq"].doc_budget
    text = "\n".join(f"line {i} the cat sat on a mat while water flows" for i in range(200))
    ids, truncated = r.request_ids("faq", text, r.encode_documents([text])[0])
    rp = r.rendered["faq"]
    doc = ids[len(rp.prefix_ids): len(ids) - len(rp.suffix_ids)]
    assert truncated and 0.75 * budget <= len(doc) <= budget
    assert len(ids) + 100 <= 1000
    kept = tok.decode(doc)
    assert text.startswith(kept) and text[len(kept)] == "\n"
    short, trunc2 = r.request_ids("faq", "short doc", r.encode_documents(["short doc"])[0])
    assert not trunc2
