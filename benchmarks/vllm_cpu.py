"""The engines a CPU user can pick, side by side in one run, on the same documents and settings.

    .venv/bin/python -m benchmarks.vllm_cpu --docs 16 --max-new-tokens 256 --dtype float32
    .venv/bin/python -m benchmarks.vllm_cpu --only offline,engine-vllm     # a subset

The shipped web-like documents (runs/data/demo_docs.jsonl, cycled under new ids past 20), one prompt
(`faq`), the model's chat template with its default system prompt, the same sampling, real EOS:
  offline       vLLM's own offline API: `LLM.chat` on the filled-in template (what a user writes first);
  engine-vllm   `engine run` with backend = "vllm" (AsyncLLM in-process, our token ids, writer, journal);
  datatrove     datatrove 0.10.1's InferenceRunner (the field's pipeline) sending /v1/chat/completions
                to a `vllm serve` on loopback (tools/vllm_cpu_serve.py), writing JSONL;
  engine-torch  `engine run` with backend = "torch" (our own batched loop);
  naive         `model.generate` one document at a time (benchmarks/torch_cpu.py's loop).
Each runs in a process of its own, one after the other (nothing else should run meanwhile). Reported:
load seconds, generation seconds (load excluded everywhere: the model is loaded and the server up
before the clock starts), output tokens and output tok/s, and each one's ratio to `offline`. The CPU
(model name, AVX2 / AVX512-BF16 / AMX) is printed and saved with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine.machine import cpu_label

ROOT = Path(__file__).resolve().parents[1]

KINDS = ("offline", "engine-vllm", "datatrove", "engine-torch", "naive")


def documents(n: int, dest: Path, mean_chars: int = 0) -> Path:
    if mean_chars:  # longer web-like documents (benchmarks/corpus.py: sentences of the shipped ones)
        from benchmarks.corpus import make_documents
        out = make_documents(n, seed=1, mean_chars=mean_chars, min_chars=mean_chars // 2, max_chars=2 * mean_chars)
        dest.write_text("".join(json.dumps({"id": d["id"], "text": d["text"]}) + "\n" for d in out))
        return dest
    rows = [json.loads(line) for line in (ROOT / "runs/data/demo_docs.jsonl").read_text().splitlines() if line.strip()]
    out = [{**rows[i % len(rows)], "id": f"{rows[i % len(rows)]['id']}-{i // len(rows)}"} for i in range(n)]
    dest.write_text("".join(json.dumps(r) + "\n" for r in out))
    return dest


def user_messages(src: Path, prompt: str) -> list[str]:
    from engine.render.prompts import load_prompts

    template = load_prompts([prompt])[0].template
    texts = [json.loads(line)["text"] for line in src.read_text().splitlines()]
    return [template.replace("{document}", t) for t in texts]


# ---- one measurement per process ------------------------------------------------------------------
def run_offline(a) -> dict:
    from vllm import LLM, SamplingParams

    from engine.backends.vllm_engine import cpu_bind
    bind = cpu_bind(a.cpu_bind)
    if bind:  # the same compute binding as engine-vllm gets (--cpu-bind)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind

    t = time.perf_counter()
    llm = LLM(model=str(a.model_dir), dtype=a.dtype, max_model_len=a.context, enable_prefix_caching=True,
              kv_cache_memory_bytes=2 * 1024 ** 3)
    load = time.perf_counter() - t
    chats = [[{"role": "user", "content": m}] for m in user_messages(a.src, a.prompt)]
    params = SamplingParams(max_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p)
    t = time.perf_counter()
    outs = llm.chat(chats, params, use_tqdm=False)
    gen = time.perf_counter() - t
    return {"load_s": load, "gen_s": gen, "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
            "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs)}


def _engine(a, backend: str) -> dict:
    from engine.backends import make_backend
    from engine.config.run_config import load_config
    from engine.model.setup import ModelSetup
    from engine.run import Run

    out = a.work / f"out-{backend}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(None, [f"input.paths=['{a.src}']", f"output.dir='{out}'", f"backend='{backend}'",
                             f"prompts=['{a.prompt}']", f"sampling.max_new_tokens={a.max_new_tokens}",
                             f"sampling.temperature={a.temperature}", f"sampling.top_p={a.top_p}",
                             f"model.dtype='{a.dtype}'", "report.enabled=false", f"torch.batch_size={a.docs}",
                             f"vllm.engine_args={{max_model_len = {a.context}}}",
                             f"vllm.cpu_threads_bind='{a.cpu_bind}'"])
    t = time.perf_counter()
    setup = ModelSetup.load(cfg)
    be = make_backend(cfg, setup)
    be.start()
    load = time.perf_counter() - t
    try:
        t = time.perf_counter()
        code, summary = Run(cfg, setup=setup, backend=be).execute()
        summary = summary.to_dict()  # the figures as summary.json has them
        gen = time.perf_counter() - t
    finally:
        be.close()
    assert code == 0, summary
    return {"load_s": load, "gen_s": gen, "output_tokens": summary["output_tokens"],
            "prompt_tokens": summary["input_tokens"], "prefix_cache_hit_rate": summary["prefix_cache_hit_rate"]}


def run_datatrove(a) -> dict:
    import socket

    import httpx
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.inference.run_inference import InferenceConfig, InferenceRunner
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.perf_counter()
    server = subprocess.Popen([sys.executable, str(ROOT / "tools/vllm_cpu_serve.py"), str(a.model_dir), "--host",
                               "127.0.0.1", "--port", str(port), "--served-model-name", "bench", "--dtype", a.dtype,
                               "--max-model-len", str(a.context), "--disable-uvicorn-access-log"],
                              stdout=open(a.work / "serve.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None:
                raise RuntimeError(f"vllm serve died: {(a.work / 'serve.log').read_text()[-2000:]}")
            time.sleep(1)
        load = time.perf_counter() - t
        messages = user_messages(a.src, a.prompt)
        by_text = {json.loads(line)["text"]: m for line, m in zip(a.src.read_text().splitlines(), messages)}

        async def rollout(document, generate):
            result = await generate({"messages": [{"role": "user", "content": by_text[document.text]}],
                                     "max_tokens": a.max_new_tokens})
            return {"text": result.text, "completion_tokens": result.usage["completion_tokens"]}

        out = a.work / "out-datatrove"
        cfg = InferenceConfig(server_type="endpoint", endpoint_url=f"http://127.0.0.1:{port}",
                              model_name_or_path="bench",
                              use_chat=True, max_concurrent_generations=500, metric_interval=3600,
                              default_generation_params={"temperature": a.temperature, "top_p": a.top_p})
        pipeline = [JsonlReader(str(a.src.parent), glob_pattern=a.src.name),
                    InferenceRunner(rollout, cfg, JsonlWriter(str(out), compression=None))]
        t = time.perf_counter()
        LocalPipelineExecutor(pipeline=pipeline, tasks=1, workers=1, logging_dir=str(a.work / "dt-logs")).run()
        gen = time.perf_counter() - t
        tokens = docs = 0
        for f in out.rglob("*.jsonl*"):
            for line in f.read_text().splitlines():
                docs += 1
                for r in json.loads(line)["metadata"]["rollout_results"]:
                    tokens += r["completion_tokens"]
        if not docs:
            logs = "\n".join(p.read_text()[-3000:] for p in (a.work / "dt-logs").rglob("*.log"))
            raise RuntimeError(f"datatrove wrote no documents; its logs:\n{logs}")
        return {"load_s": load, "gen_s": gen, "output_tokens": tokens, "documents": docs}
    finally:
        os.killpg(server.pid, 9)
        server.wait()


def run_naive(a) -> dict:
    import torch

    from benchmarks.torch_cpu import naive

    texts = [json.loads(line)["text"] for line in a.src.read_text().splitlines()]
    gen, tokens = naive(a.model_dir, a.prompt, texts, a.max_new_tokens, a.temperature, a.top_p, getattr(torch, a.dtype))
    return {"load_s": None, "gen_s": gen, "output_tokens": tokens}


MEASURE = {"offline": run_offline, "engine-vllm": lambda a: _engine(a, "vllm"), "datatrove": run_datatrove,
           "engine-torch": lambda a: _engine(a, "torch"), "naive": run_naive}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.vllm_cpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--prompt", default="faq")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--mean-chars", type=int, default=0,
                    help="0: the shipped documents (~370 prompt tokens); N: web-like documents of N characters on "
                         "average (benchmarks/corpus.py; 4500 gives ~1,200-token prompts)")
    ap.add_argument("--cpu-bind", default="all",
                    help="vLLM compute cores for offline and engine-vllm: all (the engine's default), auto (vLLM's: "
                         "one core kept for the scheduler) or a list; `vllm serve` (datatrove) keeps vLLM's default")
    ap.add_argument("--only", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    ap.add_argument("--out", default="runs/out/bench")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one measurement, JSON on stdout
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from engine.model.locate import resolve_model
    a.model_dir = resolve_model("embedded")[0]

    if a.one:
        a.work = Path(a.work)
        a.src = a.work / "docs.jsonl"
        result = MEASURE[a.one](a)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench-vllm-cpu-"))
    cpu = cpu_label()
    print(f"CPU: {cpu}; {a.docs} documents, {a.prompt}, {a.max_new_tokens} new tokens, {a.dtype}, "
          f"temperature {a.temperature}, top_p {a.top_p}; vLLM compute cores: {a.cpu_bind}; "
          f"documents: {'shipped' if not a.mean_chars else f'~{a.mean_chars} characters'}", file=sys.stderr)
    try:
        documents(a.docs, work / "docs.jsonl", a.mean_chars)
        results = {}
        for kind in [k.strip() for k in a.only.split(",") if k.strip()]:
            cmd = [sys.executable, "-m", "benchmarks.vllm_cpu", "--one", kind, "--work", str(work),
                   "--docs", str(a.docs),
                   "--max-new-tokens", str(a.max_new_tokens), "--prompt", a.prompt, "--dtype", a.dtype,
                   "--temperature", str(a.temperature), "--top-p", str(a.top_p), "--context", str(a.context),
                   "--cpu-bind", a.cpu_bind]
            print(f"{kind} ...", file=sys.stderr, flush=True)
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if p.returncode != 0 or line is None:
                print(f"{kind} failed ({p.returncode}):\n{p.stderr[-3000:]}", file=sys.stderr)
                results[kind] = {"error": p.stderr[-500:]}
                continue
            r = json.loads(line[len("RESULT "):])
            r["tok_per_s"] = r["output_tokens"] / r["gen_s"]
            results[kind] = r
            print(f"{kind}: {r['output_tokens']} tokens in {r['gen_s']:.1f} s = {r['tok_per_s']:.1f} tok/s",
                  file=sys.stderr, flush=True)
        base = results.get("offline", {}).get("tok_per_s")
        print(f"\nCPU: {cpu}\n{'configuration':<14}{'load s':>8}{'gen s':>8}{'out tokens':>12}{'tok/s':>8}"
              f"{'vs offline':>12}")
        for k, r in results.items():
            if "error" in r:
                print(f"{k:<14}  failed")
                continue
            ratio = f"{r['tok_per_s'] / base:.2f}x" if base else "-"
            load = f"{r['load_s']:.0f}" if r.get("load_s") is not None else "-"
            print(f"{k:<14}{load:>8}{r['gen_s']:>8.1f}{r['output_tokens']:>12,}{r['tok_per_s']:>8.1f}{ratio:>12}")
        out = ROOT / a.out
        out.mkdir(parents=True, exist_ok=True)
        (out / f"vllm_cpu_{a.dtype}_{a.cpu_bind}.json").write_text(json.dumps(
            {"cpu": cpu, "cpu_bind": a.cpu_bind, "mean_chars": a.mean_chars, "docs": a.docs, "prompt": a.prompt,
             "max_new_tokens": a.max_new_tokens, "dtype": a.dtype,
             "temperature": a.temperature, "top_p": a.top_p, "results": results}, indent=2))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
