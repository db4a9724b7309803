#!/usr/bin/env bash
# Create .venv-eval: lighteval 0.13 in an environment of its own (as on a training cluster: lighteval
# pins numpy >= 2, nanotron numpy < 2, and lighteval imports an installed sglang). Safe to repeat.
# Pins: lighteval 0.13.0 predates huggingface_hub 1.x (it calls list_models(model_name=...)) and
# xxhash 4 (it hashes str), so those, transformers and datasets are held at compatible releases.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PINS=(lighteval==0.13.0 transformers==4.57.6 huggingface_hub==0.36.2 datasets==4.8.5 "xxhash<4")
stamp=.venv-eval/.eval-installed
want=$(cat scripts/setup_eval.sh | sha256sum | cut -c1-16)-$TORCH_SPEC
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv-eval/bin/python ] || "$PY" -m venv .venv-eval
echo "setting up .venv-eval (lighteval; first time: a few minutes) ..." >&2
.venv-eval/bin/python -m pip install -q --upgrade pip
.venv-eval/bin/python -m pip install -q "$TORCH_SPEC"
.venv-eval/bin/python -m pip install -q "${PINS[@]}"
# lighteval 0.13 downloads tinyBenchmarks.pkl from GitHub whenever its task registry loads; without
# network that download fails and no task can run. An empty placeholder skips it (the tiny_benchmarks
# tasks then cannot run; the early-signal suite does not use them). Only written when offline.
if ! .venv-eval/bin/python -c 'import socket; socket.create_connection(("raw.githubusercontent.com", 443), 3)' 2>/dev/null; then
  pkl=$(.venv-eval/bin/python -c 'import lighteval, pathlib; print(pathlib.Path(lighteval.__file__).parent / "tasks/tasks/tinyBenchmarks.pkl")')
  [ -s "$pkl" ] || : > "$pkl"
fi
echo "$want" > "$stamp"
