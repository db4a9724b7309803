"""The training tokenizer: loaded by name (`embedded`, a local directory or a hub id), set up with the
pretraining end-of-text token as the document separator, and saved into an export when it is not the
hub tokenizer as is (a base tokenizer: that separator as EOS and BOS, no chat template, loadable by
transformers 4 and 5)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ModelError, SourceError
from engine.model.locate import resolve_model


def load_tokenizer(name: str):
    """A transformers tokenizer and the name to record for it: `embedded`, a local directory or a hub id."""
    from transformers import AutoTokenizer

    try:
        where, _ = resolve_model(name, allow_hub=True)
    except ModelError as exc:
        raise SourceError(str(exc)) from None
    try:
        tok = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as exc:
        raise SourceError(f"tokenizer {name!r}: cannot load it ({exc})") from None
    recorded = str(where) if isinstance(where, Path) else name
    return tok, recorded


END_OF_TEXT = "<|endoftext|>"  # the pretraining document separator of SmolLM2, GPT-2, Qwen and datatrove's default


@dataclass
class TrainingTokenizer:
    tokenizer: object
    recorded: str  # the name written in the token files' metadata and nanotron.yaml
    eos_id: int  # the document separator
    copy: bool  # recorded is "tokenizer": a copy saved in the export directory (relative to it)
    note: str


def training_tokenizer(name: str, eos_token: str | None = None) -> TrainingTokenizer:
    """The tokenizer training uses, with the pretraining end-of-text token as the document separator.

    `eos_token` None: `<|endoftext|>` when the vocabulary has it, else the tokenizer's EOS. A hub id
    whose own EOS is that separator is recorded as is (a cluster loads it by name). Anything else (the
    embedded model, a local directory, or a chat tokenizer whose EOS is its turn end, e.g.
    `<|im_end|>`) is saved into the export as `tokenizer/`, EOS set to the separator, chat template
    dropped, loadable by transformers 4 and 5, and recorded as the relative path `tokenizer`."""
    tok, recorded = load_tokenizer(name)
    local = recorded != name or Path(name).exists() or name == "embedded"
    vocab = tok.get_vocab()
    wanted = eos_token or (END_OF_TEXT if END_OF_TEXT in vocab else tok.eos_token)
    if wanted is None or wanted not in vocab:
        raise SourceError(f"tokenizer {name!r}: no end-of-text token {wanted!r} in its vocabulary "
                          f"(give one with --eos-token)")
    changed = tok.eos_token != wanted
    note = (f"documents end with {wanted!r} (id {vocab[wanted]})"
            + (f", not the tokenizer's own EOS {tok.eos_token!r} (a chat turn end)" if changed else ""))
    if changed:  # a base tokenizer's convention (SmolLM2's): the separator is its BOS and EOS
        tok.eos_token = wanted
        tok.bos_token = wanted
    if getattr(tok, "chat_template", None) and not changed and wanted != END_OF_TEXT:
        note += f"; WARNING: a chat tokenizer whose EOS {wanted!r} is not {END_OF_TEXT!r}: is it the base model's?"
    copy = local or changed
    return TrainingTokenizer(tok, "tokenizer" if copy else name, vocab[wanted], copy, note)


def save_training_tokenizer(tt: TrainingTokenizer, folder: Path) -> None:
    """Save the tokenizer so that transformers 4.x (nanotron's, lighteval's) and 5.x both load it, with
    the separator as EOS and no chat template (a base tokenizer)."""
    tok = tt.tokenizer
    tok.chat_template = None
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 5 writes TokenizersBackend, unknown to 4.x
    cfg["eos_token"], cfg["bos_token"] = tok.eos_token, tok.bos_token
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))
