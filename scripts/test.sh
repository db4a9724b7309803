#!/usr/bin/env bash
# The whole test suite: unit tests (tiny random model), CLI tests, integration tests on SmolLM2-135M.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest tests "$@"
