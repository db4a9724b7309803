#!/usr/bin/env bash
# The whole test suite: unit tests (tiny random model), CLI tests, integration tests on SmolLM2-135M,
# and one untimed pass of the kernels_bench microbenchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
