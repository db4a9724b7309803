"""Output diversity report: catch template collapse (one generator opening 115 of 1,000 outputs with
the same sentence, say) in every run, per prompt and per model.

Streams the Parquet outputs in record batches: length statistics over every row, text statistics
(openings, n-grams, repeated lines) over a reservoir sample of `sample` outputs, so memory stays
bounded on runs of any size. Writes OUTPUT_DIR/report/{report.md, report.json, *.png}. A folder whose
parts lack the result columns (a dataset folder given by mistake) is a one-line error naming it.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq

from engine.output.layout import ENGINE_DIRS
from engine.output.readiness import check_result_parts

PREFIX_LENGTHS = (10, 20, 50)
CURVE_LENGTHS = (1, 2, 5, 10, 15, 20, 30, 40, 50, 75, 100, 150, 200)
_SENTENCE_END = re.compile(r"(?<=[^\d\s][.!?])\s|\n")  # "1. Step" is not a sentence end
_WORD = re.compile(r"\w+|[^\w\s]")


# A warning must mean something: the top opening's share must be above the threshold beyond chance
# (one-sided binomial test of its count against top_opening_share, p < SIGNIFICANCE: 12 outputs all
# different never warn, 3 alike of 12 do not either, 4 alike of 12 do), and the distinct-openings rule
# needs at least MIN_SAMPLE outputs.
SIGNIFICANCE = 0.01
MIN_SAMPLE = 20


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), in log space (samples of thousands overflow floats otherwise)."""
    from math import exp, lgamma, log
    if k <= 0 or p >= 1:
        return 1.0
    if p <= 0:
        return 0.0
    head = sum(exp(lgamma(n + 1) - lgamma(i + 1) - lgamma(n - i + 1) + i * log(p) + (n - i) * log(1 - p))
               for i in range(min(k, n + 1)))
    return max(0.0, 1.0 - head)


@dataclass
class Thresholds:
    top_opening_share: float = 0.05  # warn when more outputs than this share one first sentence (beyond chance)
    distinct_prefix20: float = 0.5  # warn when fewer than this share of 20-character openings are distinct


def first_sentence(text: str) -> str:
    text = " ".join(text.strip().split(" "))
    m = _SENTENCE_END.search(text)
    s = text[: m.start()] if m else text
    return " ".join(s.split())[:200]


def distinct_ngram_ratio(texts: list[str], n: int) -> float:
    total, seen = 0, set()
    for t in texts:
        words = _WORD.findall(t.lower())
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def repeated_line_rate(texts: list[str]) -> float:
    """Share of non-empty lines that repeat an earlier line of the same output."""
    lines = repeats = 0
    for t in texts:
        seen: set[str] = set()
        for line in (x.strip() for x in t.splitlines()):
            if not line:
                continue
            lines += 1
            repeats += line in seen
            seen.add(line)
    return repeats / lines if lines else 0.0


def distinct_prefix_share(texts: list[str], length: int) -> float:
    if not texts:
        return 0.0
    return len({" ".join(t.split())[:length] for t in texts}) / len(texts)


@dataclass
class _Group:
    """Running statistics of one (prompt, model) group."""
    sample_size: int
    seed: int
    rows: int = 0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))  # rows per output length
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stopped_by_length: int = 0
    empty: int = 0
    errors: int = 0
    sample: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.seen_texts = 0

    def add(self, gens: list, completion: list, prompt: list, reasons: list) -> None:
        self.rows += len(gens)
        counts = np.bincount(np.asarray([c or 0 for c in completion], dtype=np.int64))
        if len(counts) > len(self.hist):
            self.hist = np.concatenate([self.hist, np.zeros(len(counts) - len(self.hist), dtype=np.int64)])
        self.hist[: len(counts)] += counts
        self.prompt_tokens += sum(p or 0 for p in prompt)
        self.completion_tokens += sum(c or 0 for c in completion)
        self.stopped_by_length += sum(r == "length" for r in reasons)
        self.errors += sum(r == "error" for r in reasons)
        for g, r in zip(gens, reasons):
            if r == "error":
                continue
            if g is None or not g.strip():
                self.empty += 1
                continue
            self.seen_texts += 1  # reservoir sampling keeps a uniform sample of every text seen
            if len(self.sample) < self.sample_size:
                self.sample.append(g)
            else:
                j = self.rng.randrange(self.seen_texts)
                if j < self.sample_size:
                    self.sample[j] = g

    def percentile(self, q: float) -> int:
        """The smallest length with at least q% of rows at or below it (numpy's 'inverted_cdf')."""
        cum = np.cumsum(self.hist)
        return int(np.searchsorted(cum, q / 100 * cum[-1]))

    def result(self, thresholds: Thresholds) -> dict:
        texts = self.sample
        openings = Counter(first_sentence(t) for t in texts)
        top = openings.most_common(10)
        top_share = top[0][1] / len(texts) if texts else 0.0
        res = {
            "rows": self.rows,
            "sampled_outputs": len(texts),
            "opening": {
                "top_first_sentence_share": round(top_share, 4),
                "distinct_prefixes": {str(n): round(distinct_prefix_share(texts, n), 4) for n in PREFIX_LENGTHS},
                "distinct_prefix_counts": {str(n): len({" ".join(t.split())[:n] for t in texts})
                                           for n in PREFIX_LENGTHS},
                "most_common_first_sentences": [{"text": s, "count": c} for s, c in top],
            },
            "distinct_ngrams": {str(n): round(distinct_ngram_ratio(texts, n), 4) for n in (1, 2, 3, 4)},
            "repeated_line_rate": round(repeated_line_rate(texts), 4),
            "length_tokens": {
                **({f"p{q}": self.percentile(q) for q in (5, 25, 50, 75, 95)} if self.rows else {}),
                "mean": round(self.completion_tokens / self.rows, 1) if self.rows else 0.0,
                "max": int(np.flatnonzero(self.hist).max()) if self.rows else 0,
            },
            "length_histogram": self.hist.tolist(),
            "share_stopped_by_length": round(self.stopped_by_length / self.rows, 4) if self.rows else 0.0,
            "share_empty": round(self.empty / self.rows, 4) if self.rows else 0.0,
            "share_failed": round(self.errors / self.rows, 4) if self.rows else 0.0,
            "output_input_token_ratio": (round(self.completion_tokens / self.prompt_tokens, 4)
                                         if self.prompt_tokens else 0.0),
            "prefix_curve": {str(n): round(distinct_prefix_share(texts, n), 4) for n in CURVE_LENGTHS},
        }
        warnings = []
        if texts and top_share > thresholds.top_opening_share and top[0][1] > 1 and \
                binomial_tail(top[0][1], len(texts), thresholds.top_opening_share) < SIGNIFICANCE:
            warnings.append(f"template collapse: {top_share:.1%} of outputs open with the same sentence "
                            f"({top[0][1]} of {len(texts)}; threshold {thresholds.top_opening_share:.0%}, beyond "
                            f"chance): {top[0][0][:80]!r}")
        d20 = res["opening"]["distinct_prefixes"]["20"]
        if len(texts) >= MIN_SAMPLE and d20 < thresholds.distinct_prefix20:
            warnings.append(f"template collapse: only {d20:.1%} of 20-character openings are distinct "
                            f"(threshold {thresholds.distinct_prefix20:.0%})")
        res["warnings"] = warnings
        return res


def _prompt_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir() and p.name not in ENGINE_DIRS and any(p.glob("*.parquet")))


def build_report(out: Path, sample: int = 5000, seed: int = 0, thresholds: Thresholds | None = None) -> dict:
    thresholds = thresholds or Thresholds()
    groups: dict[tuple[str, str], _Group] = {}
    cols = ["model", "generation", "completion_tokens", "prompt_tokens", "finish_reason"]
    dirs = _prompt_dirs(out)
    check_result_parts(out, dirs, cols)  # not an engine output: a SourceError naming it, not a KeyError
    for d in dirs:
        for f in sorted(d.glob("*.parquet")):
            for rb in pq.ParquetFile(f).iter_batches(batch_size=4096, columns=cols):
                data = rb.to_pydict()
                by_model: dict[str, list[int]] = {}
                for i, m in enumerate(data["model"]):
                    by_model.setdefault(m, []).append(i)
                for model, idx in by_model.items():
                    g = groups.setdefault((d.name, model), _Group(sample, seed))
                    g.add(*([data[c][i] for i in idx] for c in cols[1:]))
    return {"output_dir": str(out), "sample_size": sample,
            "thresholds": {"top_opening_share": thresholds.top_opening_share,
                           "distinct_prefix20": thresholds.distinct_prefix20},
            "groups": [{"prompt": p, "model": m, **g.result(thresholds)} for (p, m), g in sorted(groups.items())]}


def to_markdown(report: dict) -> str:
    lines = [f"# Diversity report: {report['output_dir']}", "",
             f"Text statistics over a sample of up to {report['sample_size']:,} outputs per prompt and model; "
             "length statistics over every row.", ""]
    header = ("| prompt | model | rows | top opening | distinct 10/20/50 | distinct 1-4-grams | repeated lines "
              "| tokens p50 (p5-p95) | by length | empty | out/in |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for g in report["groups"]:
        o, L = g["opening"], g["length_tokens"]
        dp = "/".join(f"{o['distinct_prefixes'][k]:.0%}" for k in ("10", "20", "50"))
        ng = " ".join(f"{g['distinct_ngrams'][k]:.2f}" for k in ("1", "2", "3", "4"))
        lines.append(f"| {g['prompt']} | {g['model']} | {g['rows']:,} | {o['top_first_sentence_share']:.1%} | {dp} "
                     f"| {ng} "
                     f"| {g['repeated_line_rate']:.1%} | {L.get('p50', 0)} ({L.get('p5', 0)}-{L.get('p95', 0)}) "
                     f"| {g['share_stopped_by_length']:.1%} | {g['share_empty']:.1%} "
                     f"| {g['output_input_token_ratio']:.2f} |")
    for g in report["groups"]:
        lines += ["", f"## {g['prompt']} / {g['model']}", ""]
        lines += [f"**WARNING** {w}" for w in g["warnings"]] or ["No template-collapse warning."]
        lines += ["", "Most common first sentences:", ""]
        lines += [f"- {c['count']}× {c['text'][:120]!r}" for c in g["opening"]["most_common_first_sentences"][:5]]
        lines += ["", f"![lengths](lengths-{_slug(g)}.png) ![prefixes](prefixes-{_slug(g)}.png)"]
    return "\n".join(lines) + "\n"


def _slug(g: dict) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{g['prompt']}-{g['model']}")


def _plots(report: dict, folder: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for g in report["groups"]:
        slug = _slug(g)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        hist = np.asarray(g["length_histogram"])
        ax.hist(np.arange(len(hist)), bins=min(40, max(len(hist), 1)), weights=hist, color="#4c72b0")
        ax.set_xlabel("output length (tokens)")
        ax.set_ylabel("outputs")
        ax.set_title(f"{g['prompt']} / {g['model']}: output lengths")
        fig.tight_layout()
        fig.savefig(folder / f"lengths-{slug}.png", dpi=110)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs = [int(k) for k in g["prefix_curve"]]
        ax.plot(xs, [v * 100 for v in g["prefix_curve"].values()], marker="o", color="#dd8452")
        ax.set_xlabel("opening prefix length (characters)")
        ax.set_ylabel("distinct openings (% of outputs)")
        ax.set_ylim(0, 105)
        ax.set_title(f"{g['prompt']} / {g['model']}: distinct openings")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / f"prefixes-{slug}.png", dpi=110)
        plt.close(fig)


def write_report(out: Path, sample: int = 5000, seed: int = 0, thresholds: Thresholds | None = None) -> dict:
    out = Path(out)
    report = build_report(out, sample, seed, thresholds)
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    (folder / "report.md").write_text(to_markdown(report), encoding="utf-8")
    _plots(report, folder)
    return report
