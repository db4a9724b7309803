#!/usr/bin/env bash
# The whole test suite: unit tests (tiny random model), CLI tests, integration tests on SmolLM2-135M,
# and one untimed pass of the kernels_bench microbenchmarks; lighteval runs from .venv-eval. `ruff check .`
# runs first: a lint finding fails the script before any test runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_eval.sh   # lighteval in .venv-eval: the evaluation hand-off tests run it
.venv/bin/ruff check .          # the lint gate (rules in pyproject.toml): any finding fails the script
exec .venv/bin/python -m pytest "$@"
