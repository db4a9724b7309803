"""Shared fixtures: a tiny random Llama with a tokenizer trained here, input files, and the waiting helpers.

No test waits on a sleep being long enough: `wait_for` polls a readiness signal (rows in a state
file, a port answering, a log line, a process ending) under a generous deadline, so the suite passes
on a loaded machine."""
from __future__ import annotations

import importlib.util
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

REPO = Path(__file__).resolve().parent.parent
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = ("the cat sat on a mat while water flows down rivers to the sea and bread rises slowly in warm rooms "
         "questions answers table tutorial math problem steps document read rewrite numbers 1 2 3 4 5 6 7 8 9 0")


def make_tiny_model(dest: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([WORDS] * 50, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(dest)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id,
                      tie_word_embeddings=True, initializer_range=0.3)  # varied, not one repeated token
    LlamaForCausalLM(cfg).save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def sample_docs(n: int, start: int = 0) -> list[dict]:
    base = WORDS.split()
    docs = []
    for i in range(start, start + n):
        words = [base[(i * 7 + j * 3) % len(base)] for j in range(20 + (i * 13) % 60)]
        docs.append({"id": f"doc-{i:05d}", "url": f"https://example.org/{i}", "text": " ".join(words) + "\nend."})
    return docs


def write_jsonl(path: Path, rows: list[dict], zst: bool = False) -> Path:
    data = b"".join(orjson.dumps(r) + b"\n" for r in rows)
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if zst else data)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, (Path, str)):
        return json.dumps(str(v))
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def write_config(path: Path, model: str | Path, inputs: list[Path], out: Path, backend: str = "instant",
                 prompts=("faq",), **sections: dict) -> Path:
    """A run config; keyword arguments add or override keys by section, e.g. instant={"delay_ms": 2}."""
    data = {"input": {"paths": [str(p) for p in inputs]}, "output": {"dir": str(out)}, "model": {"name": str(model)},
            "sampling": {"max_new_tokens": 16, "temperature": 0.0}}
    for name, keys in sections.items():
        data.setdefault(name, {}).update(keys)
    lines = [f"backend = {_toml_value(backend)}", f"prompts = {_toml_value(list(prompts))}"]
    for name, keys in data.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def engine_cli(*args: str, timeout: float = 600, env: dict | None = None,
               check: bool = False) -> subprocess.CompletedProcess:
    """Run the real `engine` command line in a subprocess, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"engine {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def stored_rows(out: Path) -> int:
    from engine.output.record import read_states
    return sum(st.stored for st in read_states(out))


def wait_for(cond, what: str, timeout: float, proc: subprocess.Popen | None = None, poll: float = 0.2):
    """Poll `cond` until true; fail (naming `what`) on the deadline, or if `proc` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended ({proc.returncode}) before {what}:\n{out}\n{(err or '')[-4000:]}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


from engine.signals import session_processes  # noqa: E402 - shared with tests/gpu/acceptance.py


def reap_session(sid: int, timeout: float = 60) -> list[str]:
    """Wait for every process of the session to end; kill what is left; return what had to be killed."""
    try:
        wait_for(lambda: not session_processes(sid), "the session's processes to end", timeout)
        return []
    except AssertionError:
        left = session_processes(sid)
        names = [f"{p.pid}:{p.name()}" for p in left]
        os.killpg(sid, signal.SIGKILL)
        return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Watched:
    """`engine run` in its own session, its stderr read line by line on a thread."""

    def __init__(self, cfg, *extra, merge: bool = False, env: dict | None = None):
        # merge: stdout too (vLLM logs there)
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", str(cfg), *extra], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge else subprocess.PIPE,
                                     text=True,
                                     start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.lines: queue.Queue = queue.Queue()
        self.err: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr or self.proc.stdout:
            self.err.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_line(self, marker: str, timeout: float = 600) -> bool:
        while True:
            line = self.lines.get(timeout=timeout)
            if line is None:
                return False
            if marker in line:
                return True

    def finish(self, timeout: float = 300) -> tuple[int, str, str]:
        out = self.proc.stdout.read() if self.proc.stderr else ""
        if not self.proc.stderr:
            while self.lines.get(timeout=timeout) is not None:
                pass
        self.proc.wait(timeout=timeout)
        return self.proc.returncode, out, "".join(self.err)


DOUBLES = REPO / "tests" / "doubles"


def load_double():
    """tests/doubles/sglang: what sglang.Engine 0.5.23 does to its caller (see its docstring; its HTTP
    server, `python -m sglang.launch_server` with tests/doubles on PYTHONPATH, is launch_server.py there).

    A fresh module each call, and `sys.modules["sglang"]` left as it was: a test that wants the double
    installed uses the `fake_sglang` fixture, and later tests in the same process still find the real
    (installed) sglang source."""
    spec = importlib.util.spec_from_file_location("sglang", DOUBLES / "sglang" / "__init__.py")
    before = sys.modules.get("sglang")
    double = importlib.util.module_from_spec(spec)
    sys.modules["sglang"] = double  # the double's own `import sglang`-style lookups (pickle) see itself
    try:
        spec.loader.exec_module(double)
    finally:
        if before is None:
            sys.modules.pop("sglang", None)
        else:
            sys.modules["sglang"] = before
    return double


@pytest.fixture
def fake_sglang(monkeypatch):
    quit_handler = signal.getsignal(signal.SIGQUIT)
    double = load_double()
    double.instances.clear()
    monkeypatch.setitem(sys.modules, "sglang", double)
    yield double
    for eng in double.instances:
        if not eng.shut:
            eng.shutdown()
    signal.signal(signal.SIGQUIT, quit_handler)


# ---- the command line in this process (tests that read a command's output, not its process's end) ---------------
def engine_main(*args: str, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """`engine ARGS` run by engine.cli's own parse-and-dispatch (`_main`: the same subcommands, the same
    one error handler and exit statuses) in this process: stdout, stderr (the log lines included, in the
    command line's format) and the status come back as `engine_cli` returns them, without an interpreter
    start-up and the heavy imports per call, and coverage counts the code that ran. For tests that read what
    a command prints and writes; a test about the process itself (a signal, kill -9, two processes holding
    one lease, a status set by the interpreter) uses `engine_cli`. `env` is set for the call only."""
    import contextlib
    import io
    import logging
    from unittest import mock

    from engine import cli

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    level = root.level
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    root.addHandler(handler)  # before _main: its logging.basicConfig then adds no handler of its own
    root.setLevel(logging.INFO)
    try:
        with mock.patch.dict(os.environ, env or {}), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = int(cli._main(list(args)))
            except SystemExit as exc:  # argparse: a usage error (2) or --help (0)
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        for s, h in handlers.items():
            signal.signal(s, h)
    proc = subprocess.CompletedProcess(["engine", *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"engine {' '.join(args)} failed ({code}):\n{proc.stdout}\n{proc.stderr}")
    return proc


# ---- how the suite spreads over pytest-xdist workers (scripts/test.sh: -n N --dist loadfile) ---------------------
# A file's tests stay on one worker (its module fixtures start once: the Slurm cluster, the `vllm serve` server,
# the moto S3 server). xdist 3.8's `--dist loadgroup` would spread single tests, but under pytest 9 it groups
# nothing (it renames item._nodeid; pytest 9 keeps the id in item._id), so a file is the unit.
# The longest files are handed out first, so that none of them is what the other workers wait for at the end.
LONGEST_FIRST = ("test_slurm.py", "test_vllm_serve.py", "test_vllm.py", "test_lease.py", "test_bench.py",
                 "test_handoff.py", "test_sglang_backends.py", "test_storage.py", "test_integration_smollm2.py",
                 "test_signals.py", "test_launch.py", "test_units.py", "test_recovery.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file is kept


@pytest.hookimpl(trylast=True)  # after pytest-cov's own lines
def pytest_terminal_summary(terminalreporter, config):
    """One line with the coverage of engine/ (pytest-cov's total; the reports are in .coverage-report/)."""
    cov = config.pluginmanager.getplugin("_cov")
    total = getattr(cov, "cov_total", None)
    if total is not None and getattr(cov, "cov_controller", None) is not None:
        terminalreporter.write_line(f"coverage of engine/: {total:.1f}% of statements (html: .coverage-report/html/"
                                    f"index.html, xml: .coverage-report/coverage.xml)")
