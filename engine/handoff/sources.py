"""The two sources of a training mix: the rows a run generated, and an original ("mix-in") dataset.

Generated rows come from OUTPUT_DIR/<prompt>/*.parquet (the `generation` column). The quality gate
before training leaves out, and counts by reason, rows that failed (finish_reason "error"), came
back empty, were cut at max_new_tokens (finish_reason "length": a student trained on them learns
to end documents mid-sentence) or were stopped in a repetition loop (finish_reason "repetition": the
text before the loop, cut off just the same); `keep_truncated` keeps both kinds of cut-off row
(`--keep-truncated`). The mix-in set is read with
the engine's own reader (Parquet, JSONL, JSONL.zst; bad rows are skipped and counted).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from engine.errors import SourceError
from engine.ids import id_hash
from engine.input.reader import Reader
from engine.output import layout as output

log = logging.getLogger(__name__)

GENERATED, MIX_IN = "generated", "mix-in"


@dataclass
class Row:
    id: str
    text: str
    prompt: str | None


@dataclass
class Skipped:
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str, n: int = 1) -> None:
        if n:
            self.counts[reason] = self.counts.get(reason, 0) + n


def generated_prompts(output_dir: Path, prompts: list[str] | None = None) -> list[str]:
    if not output_dir.is_dir():
        raise SourceError(f"{output_dir}: not a directory (give the output.dir of an `engine run`)")
    found = sorted(p.name for p in output_dir.iterdir()
                   if p.is_dir() and p.name != output.REJECTED and not p.name.startswith(("_", "."))
                   and any(p.glob("*.parquet")))
    if not found:
        raise SourceError(f"{output_dir}: no result parts (<prompt>/*.parquet); is it the output.dir of a run?")
    if prompts:
        missing = sorted(set(prompts) - set(found))
        if missing:
            raise SourceError(f"{output_dir}: no results for prompt(s) {', '.join(missing)} "
                              f"(it has {', '.join(found)})")
        return list(prompts)
    return found


DUPLICATE = "DUPLICATE id (a second copy of a stored row; the first is used)"
TRUNCATED = "truncated generation (finish_reason=length; --keep-truncated keeps them)"
REPEATED = "stopped in a repetition loop (finish_reason=repetition; --keep-truncated keeps them)"


def generated_rows(output_dir: Path, prompts: list[str], skipped: Skipped,
                   keep_truncated: bool = False) -> Iterator[Row]:
    """Every usable generated row, prompt by prompt, part by part, in stored order. An id stored twice in a
    prompt (two runs wrote one shard at once, before leases) is counted in `skipped`, said loudly, and only
    its first copy used."""
    for prompt in prompts:
        seen: set[int] = set()
        dupes = 0
        for part in sorted((output_dir / prompt).glob("*.parquet")):
            f = pq.ParquetFile(part)
            for batch in f.iter_batches(columns=["id", "generation", "finish_reason"], batch_size=4096):
                d = batch.to_pydict()
                for i, text, reason in zip(d["id"], d["generation"], d["finish_reason"]):
                    h = id_hash(i)
                    if h in seen:
                        dupes += 1
                        skipped.add(DUPLICATE)
                        continue
                    seen.add(h)
                    if reason == "error":
                        skipped.add("generation failed (finish_reason=error)")
                    elif not text or not text.strip():
                        skipped.add("empty generation")
                    elif reason == "length" and not keep_truncated:
                        skipped.add(TRUNCATED)
                    elif reason == "repetition" and not keep_truncated:
                        skipped.add(REPEATED)
                    else:
                        yield Row(i, text, prompt)
        if dupes:
            log.warning("DUPLICATES: %s/%s stores %d id(s) more than once (two runs wrote one shard at once); "
                        "only the first copy of each is used", output_dir, prompt, dupes)


def mix_in_rows(paths: list[str], text_column: str, skipped: Skipped) -> Iterator[Row]:
    reader = Reader(paths, text_column, "id", 1024, 50_000_000)
    reader.text_option = "--text-column"
    reader.preflight()
    for batch in reader.batches():
        for rej in batch.rejected:
            skipped.add(f"mix-in row skipped: {rej.reason}")
        for doc in batch.docs:
            yield Row(doc.id, doc.text, None)


def load_tokenizer(name: str):
    """A transformers tokenizer and the name to record for it: `embedded`, a local directory or a hub id."""
    from transformers import AutoTokenizer

    from engine.errors import ModelError
    from engine.model.store import resolve_model
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


def training_tokenizer(name: str, eos_token: str | None = None):
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
    import json

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
