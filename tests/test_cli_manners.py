"""CLI manners, as a user meets them (../shared/reviews/newcomer-trial.md, "Friction"): no traceback for a user
mistake, --help that shows defaults and exit statuses, every subcommand that writes a directory treating an
existing one alike, hints that name the flag the user can set, and outputs that do not pass for a model's.
The commands run in this process (`engine_main`: the command line's own parser, commands and error handler,
whose messages and statuses these tests read); the closed-pipe test starts processes, as a shell does."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from conftest import REPO, engine_main, sample_docs, write_config, write_jsonl
from test_bench import bench, write_sweep

from engine.cli.parser import build_parser
from engine.errors import ExitCode


def no_traceback(p: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr


@pytest.fixture(scope="module")
def run_out(tmp_path_factory, tiny_model):
    """A finished instant run of 12 documents whose generations end before max_new_tokens (finish_reason stop)
    and open differently (the instant backend repeats a document's first tokens: here its number)."""
    tmp = tmp_path_factory.mktemp("manners")
    src = write_jsonl(tmp / "in.jsonl", [{**d, "text": f"{i}: {d['text']}"} for i, d in enumerate(sample_docs(12))])
    out = tmp / "out"
    cfg = write_config(tmp / "r.toml", tiny_model, [src], out, instant={"completion_tokens": 8})
    p = engine_main("run", str(cfg), check=True)
    return type("Run", (), {"out": out, "cfg": cfg, "proc": p, "tmp": tmp})


def instant_out(run_out) -> list[str]:
    """The instant run's output, accepted by mix/export as test filler (they refuse it by default)."""
    return [str(run_out.out), "--allow-test-backend"]


# ---- user mistakes end with `error: ...`, a status, and no traceback ------------------------------------------------
def test_prompts_render_of_a_missing_file_or_too_small_a_context(tmp_path):
    missing = engine_main("prompts", "render", "faq", str(tmp_path / "nofile.txt"))
    assert missing.returncode == ExitCode.CONFIG and "nofile.txt" in missing.stderr and "not found" in missing.stderr
    no_traceback(missing)
    doc = tmp_path / "doc.txt"
    doc.write_text("A short document about rivers and the sea.\n")
    small = engine_main("prompts", "render", "faq", str(doc), "--context", "300")
    assert small.returncode == ExitCode.CONFIG and small.stderr.startswith("error: ") and "context 300" in small.stderr
    no_traceback(small)
    fine = engine_main("prompts", "render", "faq", str(doc))  # the same file with the default context renders
    assert fine.returncode == 0 and "rivers and the sea" in fine.stdout


def test_prompts_show_and_list_into_a_closed_pipe():
    # As a user types it: the shell's pipe into `head -1`.
    shell = subprocess.run(f"{sys.executable} -m engine.cli prompts show faq | head -1; "
                           "echo \"status ${PIPESTATUS[0]}\" >&2", shell=True, executable="/bin/bash", cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert shell.stdout == "name: faq\n" and "status 0" in shell.stderr, shell.stderr
    no_traceback(shell)
    # A reader that is gone before the first byte is written: every write meets a broken pipe.
    for args in (["prompts", "show", "faq"], ["prompts", "list"]):
        r, w = os.pipe()
        os.close(r)
        p = subprocess.run([sys.executable, "-m", "engine.cli", *args], stdout=w, stderr=subprocess.PIPE, cwd=REPO,
                           text=True, timeout=120)
        os.close(w)
        assert p.returncode == 0 and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


def test_an_unwritable_output_dir_is_named_as_such(tmp_path, tiny_model):
    # As root no permission bit stops a write: a directory under a regular file cannot exist for anyone.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(3))
    cfg = write_config(tmp_path / "r.toml", tiny_model, [src], blocker / "out")
    p = engine_main("run", str(cfg))
    assert p.returncode == ExitCode.ERROR, p.stderr
    assert f"error: output.dir {blocker / 'out'}: cannot write there" in p.stderr, p.stderr
    no_traceback(p)
    assert blocker.read_text() == "not a directory\n"


def test_a_prompt_file_missing_keys_lists_every_required_key(tmp_path):
    own = tmp_path / "mine.toml"
    own.write_text('name = "mine"\ntemplate = """Rewrite this.\n\n{document}"""\n')
    p = engine_main("prompts", "show", str(own))
    assert p.returncode == ExitCode.CONFIG, p.stderr
    assert "missing key(s) origin, intent, max_new_tokens" in p.stderr
    assert "needs name, origin, intent, template, max_new_tokens" in p.stderr
    no_traceback(p)


# ---- --help ---------------------------------------------------------------------------------------------------------
def _subcommands(parser, prefix=()):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _subcommands(sub, (*prefix, name))


def test_help_of_every_subcommand_shows_its_defaults_and_the_exit_statuses():
    statuses = [f"{int(c)} {c.name.lower().replace('_', ' ')}" for c in ExitCode]
    for args in ((), ("run",)):
        text = " ".join(engine_main(*args, "--help", check=True).stdout.split())
        assert all(s in text for s in statuses), (args, text)
    checked = 0
    for names, sub in _subcommands(build_parser()):
        text = " ".join(engine_main(*names, "--help", check=True).stdout.split())
        for action in sub._actions:
            d = action.default
            if not action.option_strings or d is None or d is False or d in ("", "==SUPPRESS=="):
                continue
            assert f"(default: {d})" in text, (names, action.option_strings, text)
            checked += 1
    assert checked >= 30  # the parser has that many options with a default: none escaped the loop


# ---- writing into an existing directory: one rule for mix, export nanotron and export lighteval ----------------------
REFUSED = re.compile(r"^error: (\S+) is not empty; choose another --out or pass --overwrite$", re.M)


def test_export_lighteval_refuses_a_non_empty_out_like_mix_and_export_nanotron(tmp_path, run_out):
    mix_in = write_jsonl(tmp_path / "orig.jsonl", sample_docs(40, start=100))
    answers = {}
    for name, cmd in (("mix", ["mix", str(run_out.out), "--mix-in", str(mix_in), "--allow-test-backend"]),
                      ("nanotron", ["export", "nanotron", str(run_out.out), "--mix-in", str(mix_in),
                                    "--allow-test-backend"]),
                      ("lighteval", ["export", "lighteval"])):
        out = tmp_path / name
        out.mkdir()
        (out / "notes.txt").write_text("mine\n")
        p = engine_main(*cmd, "--out", str(out))
        no_traceback(p)
        m = REFUSED.search(p.stderr)
        assert m and m.group(1) == str(out), (name, p.stderr)
        answers[name] = p.returncode
        assert sorted(f.name for f in out.iterdir()) == ["notes.txt"]  # nothing written
    assert set(answers.values()) == {answers["mix"]} and answers["mix"] != 0, answers
    out = tmp_path / "lighteval"
    first = engine_main("export", "lighteval", "--out", str(out), "--overwrite", check=True)
    assert "lighteval accelerate" in first.stdout
    (out / "tasks.txt").write_text("stale\n")
    engine_main("export", "lighteval", "--out", str(out), "--overwrite", "--tasks", "arc_cf_easy", check=True)
    assert (out / "tasks.txt").read_text() == "arc_cf_easy|0\n" and (out / "notes.txt").read_text() == "mine\n"
    fresh = tmp_path / "fresh"
    engine_main("export", "lighteval", "--out", str(fresh), check=True)  # a new or empty --out needs no flag
    assert (fresh / "tasks.txt").exists()


# ---- engine mix: the hint names its flag; a share far from the asked one is said ------------------------------------
def test_mix_hint_names_text_column_flag(tmp_path, run_out):
    other = write_jsonl(tmp_path / "orig.jsonl", [{"id": f"o{i}", "content": "some words"} for i in range(5)])
    p = engine_main("mix", *instant_out(run_out), "--mix-in", str(other), "--out", str(tmp_path / "mix"))
    assert p.returncode == ExitCode.ERROR and "no field 'text'" in p.stderr and "set --text-column" in p.stderr
    assert "input.text_column" not in p.stderr
    no_traceback(p)
    ok = engine_main("mix", *instant_out(run_out), "--mix-in", str(other), "--text-column", "content", "--out",
                    str(tmp_path / "mix"), "--ratio", "0.5", check=True)
    assert "mix written" in ok.stdout


def test_mix_warns_when_the_achieved_share_is_far_from_the_asked_one(tmp_path, run_out):
    # One long mix-in document: whole documents are mixed, so 60% synthetic cannot be reached.
    long = write_jsonl(tmp_path / "long.jsonl", [{"id": "big", "text": " ".join(["river sea bread"] * 3000)}])
    far = engine_main("mix", *instant_out(run_out), "--mix-in", str(long), "--out", str(tmp_path / "far"),
                      "--ratio", "0.6", check=True)
    share = float(re.search(r"synthetic share ([\d.]+)% of tokens \(asked 60%\)", far.stdout).group(1))
    assert share < 55 and f"WARNING: the synthetic share is {share:.1f}% of tokens, asked 60%" in far.stderr
    # Many short mix-in documents: the share comes within a point or two, and nothing is said.
    short = write_jsonl(tmp_path / "short.jsonl", [{"id": f"s{i}", "text": "river sea"} for i in range(400)])
    near = engine_main("mix", *instant_out(run_out), "--mix-in", str(short), "--out", str(tmp_path / "near"),
                      "--ratio", "0.5", check=True)
    warnings = [line for line in near.stderr.splitlines() if "WARNING" in line and "--allow-test-backend" not in line]
    assert not warnings, near.stdout + near.stderr


# ---- outputs that do not pass for what they are not ----------------------------------------------------------------
def test_instant_rows_say_no_model_ran_and_a_small_distinct_run_is_no_collapse(run_out):
    t = pq.read_table(run_out.out / "faq")
    model = set(t.column("model").to_pylist())
    assert len(model) == 1 and next(iter(model)).startswith("instant:"), model
    assert set(t.column("finish_reason").to_pylist()) == {"stop"}  # 8 tokens of a 16-token budget
    card = (run_out.out / "README.md").read_text()
    assert "instant backend (no model ran" in card
    # 12 outputs, every opening once: no template-collapse warning (one output is 8.3% > 5%, but no template)
    assert "template collapse" not in run_out.proc.stdout + run_out.proc.stderr


def test_bench_report_has_no_row_for_a_model_not_run(tmp_path, tiny_model):
    docs = write_jsonl(tmp_path / "docs.jsonl", sample_docs(12))
    results = tmp_path / "res"
    models = "".join(f'''
[[models]]
name = "{tiny_model}"
label = "{label}"
''' for label in ("ran", "skipped"))
    sweep = write_sweep(tmp_path / "s.toml", tiny_model, docs, results, tiers="# baseline only", models=models)
    p = bench(str(sweep), "--models", "ran")
    assert p.returncode == 0, p.stdout + p.stderr
    md = (results / "report.md").read_text()
    assert "## ran" in md and "| ran |" in md
    assert "skipped" not in md, md
