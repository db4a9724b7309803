"""The repetition stop (`[repetition]`): the detector on real tokenisations of formats that repeat by
design and of real loops, each backend's mechanism (torch's decode loop, vLLM's SamplingParams, the
SGLang double's custom logit processor, the HTTP payloads), and what a stopped row becomes."""
import json
import os
import random
import subprocess
import sys
import threading
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, sample_docs, write_config, write_jsonl

from engine.backends import repetition
from engine.backends import torch_backend as tb
from engine.backends.repetition import cut_loop, loop_period, tail_loops
from engine.config.run_config import HTTPConfig, TorchConfig
from engine.types import RepetitionStop, Request, SamplingParams

RS = RepetitionStop()  # the shipped defaults: 16..128-token n-grams, 3 copies


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from engine.errors import ModelError
    from engine.model.locate import resolve_model
    try:
        return AutoTokenizer.from_pretrained(resolve_model("embedded")[0])
    except ModelError as exc:
        pytest.skip(f"the embedded model is not installed: {exc}")


def first_stop(ids, rs=RS):
    """The first prefix the stop fires on (what a backend checking every step sees), else -1."""
    return next((end for end in range(1, len(ids) + 1) if loop_period(ids[:end], rs)), -1)


TABLE = "| Planet | Moons | Rings | Gas | Day | Year | Mass | Radius |\n" \
        "|---|---|---|---|---|---|---|---|\n" + "".join(
            f"| P{i} | {i} | {'yes' if i % 2 else 'no'} | no | {i * 3} h | {i * 100} d | {i}e24 | {i * 1000} |\n"
            for i in range(12)) + "|------|------|------|------|------|------|------|------|\n"
LIST = "".join(f"{i}. Step {i}: add {i} cups of water and stir.\n" for i in range(1, 31))
QA = "".join(f"Q: What is the role of item {i}?\nA: Item {i} holds the data of part {i}.\n\n" for i in range(12))
WIDE = "| " + " | ".join(f"c{i}" for i in range(16)) + " |\n|" + "---|" * 16 + "\n" + "".join(
    "| " + " | ".join(str(i * j) for j in range(16)) + " |\n" for i in range(6))  # 16 columns
BULLETS = "".join(f"- The {w} module reads the configuration file.\n" for w in
                  ["os", "sys", "json", "re", "io", "csv", "abc", "ast", "zlib", "uuid"])  # lines alike but one word
MATH = "".join(f"Step {i}: x_{i} = x_{i - 1} + {i} = {i * (i + 1) // 2}\n" for i in range(1, 20)) + \
       "$$ 1 + 1 + 1 + 1 + 1 + 1 = 6 $$\n"


@pytest.mark.parametrize("text", [TABLE, WIDE, LIST, BULLETS, QA, MATH],
                         ids=["table", "table-16-columns", "numbered-list", "bullets-alike", "qa-pairs", "math"])
def test_formats_that_repeat_by_design_never_stop(smol_tokenizer, text):
    ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert first_stop(ids) == -1, smol_tokenizer.decode(ids[:first_stop(ids)])[-200:]
    assert not tail_loops([ids[:n] for n in range(1, len(ids) + 1)], RS).any()


@pytest.mark.parametrize("unit", ["The water cycle is important for life. ", " A:", " cat food,", " ha"])
def test_a_real_loop_stops_and_keeps_the_text_up_to_it(smol_tokenizer, unit):
    head = smol_tokenizer("Bees pollinate flowers and make honey.", add_special_tokens=False)["input_ids"]
    one = smol_tokenizer(unit, add_special_tokens=False)["input_ids"]
    ids = head + one * 60
    at = first_stop(ids)
    # found once min_count copies of an n-gram of >= min_pattern tokens (a multiple of a shorter unit)
    assert 0 < at <= len(head) + RS.min_count * len(one) * -(-RS.min_pattern // len(one))
    kept = cut_loop(ids[:at], RS)
    assert kept == head + one  # the text before the loop and the repeated unit once
    assert smol_tokenizer.decode(kept).startswith("Bees pollinate flowers")
    assert loop_period(kept, RS) == 0  # what is kept no longer ends in a loop


PARAGRAPHS = [
    # review item 8 (newcomer trial 2): a heading and a one-line answer repeated to max_new_tokens
    "## What is the purpose of the package?\nThe package provides a simple way to read configuration files "
    "written in the INI format.\n\n",
    # two question/answer paragraphs alternating: a period of ~80 tokens, past the old 32-token bound
    "Q: What does the document describe?\nA: It describes how to install the package with pip and how to run "
    "its tests.\n\nQ: Who maintains the package?\nA: A small team of volunteers maintains it on GitHub and "
    "answers issues.\n\n",
]


@pytest.mark.parametrize("para", PARAGRAPHS, ids=["heading-and-answer", "two-qa-pairs"])
def test_a_paragraph_sized_loop_stops(smol_tokenizer, para):
    """A loop whose unit is a whole paragraph (25 to 128 tokens) stops after min_count copies; under the old
    defaults (up to 32-token units, 4 copies) the second one ran to max_new_tokens unmarked."""
    head = smol_tokenizer("Bees pollinate flowers and make honey.", add_special_tokens=False)["input_ids"]
    one = smol_tokenizer(para, add_special_tokens=False)["input_ids"]
    ids = head + one * 12  # a model repeats the tokens it emitted (no re-tokenisation across copies)
    assert 25 <= len(one) <= RS.max_pattern
    at = first_stop(ids)
    assert 0 < at <= len(head) + RS.min_count * len(one), (at, len(one))
    assert cut_loop(ids[:at], RS) == head + one
    assert bool(tail_loops([ids[:at]], RS)[0])
    if len(one) > 32:
        assert first_stop(ids, RepetitionStop(8, 32, 4)) == -1  # what the old bound missed


def test_the_vectorised_check_agrees_with_the_per_row_one():
    rng = random.Random(0)
    rows = []
    for i in range(200):
        row = [rng.randrange(50) for _ in range(rng.randrange(0, 120))]
        if i % 3 == 0:
            unit = [rng.randrange(50) for _ in range(rng.randrange(1, 40))]
            row += unit * rng.randrange(1, 8)
        rows.append(row)
    got = tail_loops(rows, RS).tolist()
    assert got == [bool(loop_period(r, RS)) for r in rows]
    assert any(got) and not all(got)


def test_torch_decode_loop_stops_a_looping_row_and_counts_every_generated_token(tiny_model, monkeypatch):
    """Sampling forced: row 0 loops on a 3-token unit after 10 tokens, row 1 counts up (never a loop)."""
    def token(key, n):
        return (20 + n if n < 10 else [7, 8, 9][(n - 10) % 3]) if key == 0 else 100 + n

    def forced(logits, s, generator, histories=None):
        if not b_rows:  # the prefill: both rows' first token
            return torch.tensor([token(0, 0), token(1, 0)][: logits.shape[0]])
        rows = b_rows[0]
        return torch.tensor([token(r.key, len(o)) for r, o in zip(rows.reqs, rows.outs)])
    b_rows = []
    real_step = tb.TorchBackend._step

    def step(self, rows):
        b_rows[:] = [rows]
        return real_step(self, rows)
    monkeypatch.setattr(tb, "sample", forced)
    monkeypatch.setattr(tb.TorchBackend, "_step", step)
    b = tb.TorchBackend(str(tiny_model), SamplingParams(0.0, 1.0, 0, repetition_stop=RS), eos_ids=set(), pad_id=0,
                        dtype="float32", settings=TorchConfig(batch_size=2))
    b.start()
    reqs = [Request(k, "p", [5, 6, 7, 8, 9, 10 + k], 0, 150) for k in range(2)]
    got = {c.key: c for done in b.generate(iter(reqs), threading.Event()) for c in done}
    assert got[0].finish_reason == "repetition"
    assert got[0].output_ids == [20 + i for i in range(10)] + [7, 8, 9]  # up to the loop, the unit once
    # stopped within REPETITION_CHECK_EVERY steps of the first moment the tail held min_count copies of >= 16 tokens
    span = RS.min_count * -(-RS.min_pattern // 3) * 3  # copies of the smallest multiple of the unit in range
    assert 10 + span <= got[0].completion_tokens < 10 + span + tb.REPETITION_CHECK_EVERY + 1
    assert got[1].finish_reason == "length" and got[1].completion_tokens == 150


def test_torch_backend_without_the_stop_runs_a_loop_to_max_new_tokens(tiny_model, monkeypatch):
    monkeypatch.setattr(tb, "sample", lambda logits, s, g, h=None: torch.full((logits.shape[0],), 7))
    b = tb.TorchBackend(str(tiny_model), SamplingParams(0.0, 1.0, 0), eos_ids=set(), pad_id=0, dtype="float32")
    b.start()
    (c,) = [c for done in b.generate(iter([Request(0, "p", [5, 6], 0, 64)]), threading.Event()) for c in done]
    assert c.finish_reason == "length" and c.completion_tokens == 64


def test_vllm_sampling_params_carry_vllms_own_repetition_detection():
    pytest.importorskip("vllm")
    from engine.backends.vllm_engine import completion_from_output, vllm_sampling

    req = Request(3, "faq", [1, 2, 3], 0, 64)
    on = vllm_sampling(req, SamplingParams(0.7, 0.95, None, repetition_stop=RepetitionStop(8, 32, 4)))
    d = on.repetition_detection
    assert (d.min_pattern_size, d.max_pattern_size, d.min_count) == (8, 32, 4)
    assert vllm_sampling(req, SamplingParams(0.7, 0.95, None)).repetition_detection is None
    # FINISHED_REPETITION comes back as finish_reason "repetition" (vllm/v1/engine/__init__.py)
    ids = [1, 2, 3] + [4, 5, 6, 7, 8, 9, 10, 11] * 8
    out = SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, finish_reason="repetition")],
                          prompt_token_ids=[1, 2, 3], num_cached_tokens=0)
    c = completion_from_output(req, out, 0.1, SamplingParams(0.7, 0.95, None, repetition_stop=RS))
    assert c.finish_reason == "repetition" and c.output_ids == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert c.completion_tokens == len(ids)


def test_every_vllm_finish_reason_is_a_row_or_a_retried_error():
    """vLLM's own FinishReason strings: `abort` and `error` (a retryable request-level failure) are
    errors our retry takes, never a row stored as if the model had finished it."""
    pytest.importorskip("vllm")
    from vllm.v1.engine import FINISH_REASON_STRINGS

    from engine.backends.vllm_engine import completion_from_output

    req = Request(3, "faq", [1, 2, 3], 0, 64)
    seen = {}
    for reason in FINISH_REASON_STRINGS:
        out = SimpleNamespace(outputs=[SimpleNamespace(token_ids=[4, 5], finish_reason=reason)],
                              prompt_token_ids=[1, 2, 3], num_cached_tokens=0)
        c = completion_from_output(req, out, 0.1, SamplingParams(0.7, 0.95, None))
        seen[reason] = c.finish_reason
        assert (c.finish_reason == "error") == (c.error is not None)
    assert seen == {"stop": "stop", "length": "length", "abort": "error", "error": "error",
                    "repetition": "repetition"}


def test_vllm_engine_stops_a_loop_with_the_real_vllm_check():
    """vLLM's own check (v1/core/sched/utils.py), run on our parameters: the engine-side test we rely on."""
    pytest.importorskip("vllm")
    from vllm.sampling_params import RepetitionDetectionParams
    from vllm.v1.core.sched.utils import check_sequence_repetition

    p = RepetitionDetectionParams(max_pattern_size=RS.max_pattern, min_pattern_size=RS.min_pattern,
                                  min_count=RS.min_count)
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.randrange(30) for _ in range(rng.randrange(1, 60))]
        if rng.random() < 0.5:
            ids += [rng.randrange(30) for _ in range(rng.randrange(1, 35))] * rng.randrange(1, 6)
        assert check_sequence_repetition(ids, p) == bool(loop_period(ids, RS)), ids


def test_http_payloads_carry_the_stop():
    from engine.backends.http import HTTPBackend

    s = SamplingParams(0.7, 0.95, None, repetition_stop=RS)
    native = HTTPBackend(HTTPConfig(["http://127.0.0.1:1"], "native"), s, 4, eos_ids=[2, 0])
    path, body = native._payload(Request(1, "faq", [5, 6], 0, 32))
    assert path == "/generate" and body["custom_logit_processor"] == repetition.repetition_processor()
    assert body["sampling_params"]["custom_params"] == {"min_pattern": RS.min_pattern, "max_pattern": RS.max_pattern,
                                                        "min_count": RS.min_count, "stop_id": 0}
    openai = HTTPBackend(HTTPConfig(["http://127.0.0.1:1"], "openai"), s, 4, eos_ids=[2])
    path, body = openai._payload(Request(1, "faq", [5, 6], 0, 32))
    assert body["repetition_detection"] == {"max_pattern_size": RS.max_pattern, "min_pattern_size": RS.min_pattern,
                                            "min_count": RS.min_count}
    assert body["return_token_ids"] is True and "custom_logit_processor" not in body
    loop = [1, 2] + list(range(10, 19)) * 8
    c = openai._parse(Request(1, "faq", [5, 6], 0, 64), {"choices": [{"text": "x", "finish_reason": "repetition",
                                                                       "token_ids": loop}],
                                                          "usage": {"prompt_tokens": 2, "completion_tokens": 74}})
    assert c.finish_reason == "repetition" and c.output_ids == [1, 2, *range(10, 19)] and c.text is None
    off = HTTPBackend(HTTPConfig(["http://127.0.0.1:1"], "openai"), SamplingParams(0.7, 0.95, None), 4)
    assert "repetition_detection" not in off._payload(Request(1, "faq", [5, 6], 0, 32))[1]
    plain = HTTPBackend(HTTPConfig(["http://127.0.0.1:1"], "native"), SamplingParams(0.7, 0.95, None), 4)
    assert "custom_logit_processor" not in plain._payload(Request(1, "faq", [5, 6], 0, 32))[1]


def test_the_processor_needs_nothing_of_ours_on_the_server(tmp_path):
    """It is loaded as SGLang loads it, in an interpreter where this package cannot be imported."""
    import subprocess
    import sys
    (tmp_path / "p.json").write_text(repetition.repetition_processor())
    code = ("import json, sys, dill, torch\n"
            "sys.modules['engine'] = None  # any import of ours fails\n"
            "cls = dill.loads(bytes.fromhex(json.load(open(sys.argv[1]))['callable']))\n"
            "req = type('R', (), {'output_ids': [1, 2] + [3, 4, 5, 6, 7, 8, 9, 10] * 4})()\n"
            "out = cls()(torch.zeros(2, 12), [dict(min_pattern=8, max_pattern=32, min_count=4, stop_id=11,"
            " __req__=req), None])\n"
            "assert int(out[0].argmax()) == 11 and out[0, 0] == float('-inf') and not out[1].any()\n")
    subprocess.run([sys.executable, "-I", "-c", code, str(tmp_path / "p.json")], check=True, timeout=120,
                   cwd=tmp_path)


def test_sglang_engine_double_stops_a_loop_through_the_processor(tmp_path, tiny_model, fake_sglang, monkeypatch):
    from engine.config.run_config import load_config
    from engine.run import Run

    monkeypatch.setenv("SGLANG_DOUBLE_LOOP_AFTER", "5")
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(6))
    cfg = load_config(write_config(tmp_path / "r.toml", tiny_model, [src], tmp_path / "out", backend="sglang",
                                   sampling={"max_new_tokens": 96, "temperature": 0.0}))
    code, summary = Run(cfg).execute()
    assert code == 0
    (eng,) = fake_sglang.instances
    assert eng.kwargs["enable_custom_logit_processor"] is True
    t = pq.read_table(tmp_path / "out" / "faq").to_pylist()
    reasons = {r["finish_reason"] for r in t}
    assert "repetition" in reasons and summary.process.repetition_stopped == sum(
        r["finish_reason"] == "repetition" for r in t)
    for r in t:
        if r["finish_reason"] == "repetition":
            assert r["completion_tokens"] < 96  # stopped early: not every token of the budget was paid for
    # off: the same loops run to max_new_tokens, and no processor is sent
    fake_sglang.instances.clear()
    cfg = load_config(write_config(tmp_path / "r2.toml", tiny_model, [src], tmp_path / "out2", backend="sglang",
                                   sampling={"max_new_tokens": 96, "temperature": 0.0}, repetition={"enabled": False}))
    assert Run(cfg).execute()[0] == 0
    assert "enable_custom_logit_processor" not in fake_sglang.instances[0].kwargs
    assert "repetition" not in set(pq.read_table(tmp_path / "out2" / "faq").column("finish_reason").to_pylist())


def test_the_quality_gate_leaves_repetition_rows_out_unless_kept(tmp_path):
    from engine.gate import REPEATED
    from engine.handoff.generated import generated_rows
    from engine.handoff.rows import Skipped

    (tmp_path / "faq").mkdir()
    pq.write_table(pa.table({"id": ["a", "b", "c"], "generation": ["fine", "loop up to here", "cut"],
                             "finish_reason": ["stop", "repetition", "length"]}), tmp_path / "faq" / "part-0.parquet")
    skipped = Skipped()
    assert [r.id for r in generated_rows(tmp_path, ["faq"], skipped)] == ["a"]
    assert skipped.counts[REPEATED] == 1
    assert [r.id for r in generated_rows(tmp_path, ["faq"], Skipped(), keep_truncated=True)] == ["a", "b", "c"]


@pytest.mark.parametrize("bad", ["min_count=1", "min_pattern=0", "max_pattern=4"])
def test_bad_repetition_settings_are_named(tmp_path, bad):
    from engine.config.run_config import load_config
    from engine.errors import ConfigError

    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(1))
    with pytest.raises(ConfigError, match=f"repetition.{bad.split('=')[0]}"):
        load_config(write_config(tmp_path / "r.toml", "tiny", [src], tmp_path / "out"),
                    [f"repetition.{bad}"])


def test_template_collapse_warns_only_from_a_sample_large_enough_to_tell(tmp_path):
    from test_report import write_outputs

    from engine.output.report import build_report

    # 12 outputs, all different, of a format that opens alike (20-character openings all the same)
    write_outputs(tmp_path / "a" / "faq", [f"Q: What is the role of part {i}? A: It holds {i}." for i in range(12)])
    (g,) = build_report(tmp_path / "a")["groups"]
    assert g["opening"]["distinct_prefixes"]["20"] < 0.5 and g["warnings"] == []
    # 3 of 12 alike is within chance of the 5 % threshold; 6 of 12 alike is a collapse
    write_outputs(tmp_path / "b" / "faq", ["Here is the rewrite. Then " + str(i) for i in range(3)]
                  + [f"Output {i} differs. More." for i in range(9)])
    assert build_report(tmp_path / "b")["groups"][0]["warnings"] == []
    write_outputs(tmp_path / "c" / "faq", ["Here is the rewrite. Then " + str(i) for i in range(6)]
                  + [f"Output {i} differs. More." for i in range(6)])
    (w,) = build_report(tmp_path / "c")["groups"][0]["warnings"]
    assert "6 of 12" in w


def test_the_collapse_rule_holds_on_samples_of_thousands(tmp_path):
    from test_report import varied, write_outputs

    from engine.output.report import build_report

    # 3,000 outputs (the rule in log space: no float overflow): 180 alike, 6 %, is beyond chance of 5 %
    write_outputs(tmp_path / "faq", ["Here is the rewrite. Then " + str(i) for i in range(180)]
                  + [f"{i} " + varied(i) for i in range(2820)])
    (w,) = build_report(tmp_path)["groups"][0]["warnings"]
    assert "180 of 3000" in w


@pytest.mark.slow
def test_the_repetition_benchmark_runs_from_any_directory(tmp_path):
    """`python -m benchmarks.repetition` end to end (instant backend, 3 documents), its --out relative
    to the caller's directory: both settings run, results.json, table.md and loops.md written. benchmarks/
    is not installed: from elsewhere than the repository root it is found through PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    p = subprocess.run([sys.executable, "-m", "benchmarks.repetition", "--docs", "3", "--max-new-tokens", "16",
                        "--backends", "instant", "--prompts", "faq", "--out", "rel/out"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "rel" / "out"
    res = json.loads((out / "results.json").read_text())
    got = [(r["backend"], r["stop"], r["rows"]) for r in res["results"]]
    assert got == [("instant", True, 3), ("instant", False, 3)]
    assert {"table.md", "loops.md"} <= {f.name for f in out.iterdir()}
