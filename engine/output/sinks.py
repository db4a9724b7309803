"""The writable side of one shard's output directory: one PartSink per stream (each prompt, and the
rejected rows), recovered after a crash, with the shard's stored counts read from them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from engine.config.run_config import OutputConfig
from engine.ids import DoneSet
from engine.output.layout import REJECTED, REJECTED_SCHEMA, result_schema, source_column_names
from engine.output.parts import PartSink, PartSpec, StreamCounts
from engine.output.record import PromptFigures


@dataclass
class ShardSinks:
    streams: dict[str, PartSink]  # prompt name (and REJECTED) -> its sink
    done: dict[str, DoneSet]  # what is stored per stream (ids; doc_refs for REJECTED)
    schema: pa.Schema  # the output rows' schema (result columns + passed-through source columns)
    renames: dict[str, str]  # source column -> output column
    dropped: int  # error rows removed by --retry-errors
    prompts: list[str]

    @classmethod
    def open(cls, out: Path, tag: str, prompts: list[str], source_schema: pa.Schema | None, o: OutputConfig,
             drop_errors: bool = False) -> ShardSinks:
        """Open every stream of shard `tag` in `out`, recover it (journals replayed, --retry-errors applied)."""
        schema = result_schema(source_schema)
        size = o.file_max_mb * 1024 * 1024

        def spec(stream: str, schema: pa.Schema, key: str, count: str | None, text: str | None) -> PartSpec:
            return PartSpec(root=out, stream=stream, shard_tag=tag, schema=schema, key_column=key,
                            row_group_rows=o.row_group_rows, file_max_bytes=size,
                            compression_level=o.compression_level, count_column=count, text_column=text)
        streams = {p: PartSink(spec(p, schema, "id", "finish_reason", "generation")) for p in prompts}
        streams[REJECTED] = PartSink(spec(REJECTED, REJECTED_SCHEMA, "doc_ref", None, None))
        done: dict[str, DoneSet] = {}
        dropped = 0
        for name, sink in streams.items():
            done[name], replay = sink.recover(drop_errors=drop_errors and name != REJECTED)
            dropped += sink.dropped
            sink.replay(replay)
        return cls(streams, done, schema, source_column_names(source_schema), dropped, list(prompts))

    def snapshot(self) -> Stored:
        """What the streams hold now (take it on the thread that writes them: the writer's, once it runs)."""
        return Stored({name: sink.counts() for name, sink in self.streams.items()}, list(self.prompts))

    def already_done(self) -> int:
        """Results found stored at start (recovered), over every prompt."""
        return sum(len(self.done[p]) for p in self.prompts)


@dataclass(frozen=True)
class Stored:
    """A snapshot of a shard's stored rows: per stream, rows, their tally and duplicates (parts.StreamCounts)."""
    streams: dict[str, StreamCounts]
    prompts: list[str]

    def stored_per_prompt(self) -> dict[str, int]:
        return {p: self.streams[p].rows for p in self.prompts}

    def stored(self) -> int:
        return sum(self.stored_per_prompt().values())

    def failed(self) -> int:
        return sum(self.streams[p].tally["error"].rows for p in self.prompts if "error" in self.streams[p].tally)

    def rejected_rows(self) -> int:
        return self.streams[REJECTED].rows

    def per_prompt(self) -> dict[str, PromptFigures]:
        """The state file's per-prompt figures, counted from the stored rows (engine/output/record.py)."""
        return {p: PromptFigures.of(self.streams[p].tally, self.streams[p].duplicates) for p in self.prompts}

    def output_tokens(self) -> int:
        return sum(f.output_tokens for f in self.per_prompt().values())
