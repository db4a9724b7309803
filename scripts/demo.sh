#!/usr/bin/env bash
# The demo: set up, then rewrite the 20 shipped documents with the embedded SmolLM2-135M on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/engine run runs/demo.toml "$@"
