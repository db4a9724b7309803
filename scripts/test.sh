#!/usr/bin/env bash
# The whole test suite: unit tests (tiny random model), CLI tests, integration tests on SmolLM2-135M,
# and one untimed pass of the kernels_bench microbenchmarks; lighteval runs from .venv-eval. `ruff check .`
# runs first: a lint finding fails the script before any test runs.
#
# pytest runs on several workers (pytest-xdist): -n is the core count + 1 (most tests wait on a process
# they started), or PYTEST_WORKERS; `--dist loadfile` keeps a file's tests on one worker, so that a module
# fixture's process (the Slurm cluster, `vllm serve`) starts once (tests/conftest.py: why not loadgroup).
# Coverage of engine/ is measured (--cov=engine: the test processes; COVERAGE_SUBPROCESS=1: also every
# Python process they start) and written to .coverage-report/ (coverage.xml, html/); its total is the line after the test results.
# Arguments pass through to pytest and win: `-n 0` runs serially, `-p no:xdist` without xdist, `--no-cov`
# without coverage, e.g. `bash scripts/test.sh tests/test_recovery.py -n 0 --no-cov -k kill`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_eval.sh   # lighteval in .venv-eval: the evaluation hand-off tests run it
.venv/bin/ruff check .          # the lint gate (rules in pyproject.toml): any finding fails the script

workers=yes dist=yes cov=yes prev=
for arg in "$@"; do  # what the caller chose themselves
  case "$arg" in
    -n|-n?*|--numprocesses|--numprocesses=*) workers=no ;;
    --dist|--dist=*) dist=no ;;
    -pno:xdist) workers=no dist=no ;;
    no:xdist) [[ $prev == -p ]] && workers=no dist=no ;;
    --no-cov|--cov|--cov=*|-pno:pytest_cov) cov=no ;;
    no:pytest_cov) [[ $prev == -p ]] && cov=no ;;
  esac
  prev=$arg
done
opts=()
[[ $workers == yes ]] && opts+=(-n "${PYTEST_WORKERS:-$(( $(nproc) + 1 ))}")
[[ $dist == yes ]] && opts+=(--dist loadfile)
if [[ $cov == yes ]]; then
  opts+=(--cov=engine --cov-report=xml --cov-report=html)
  # [tool.coverage.run] patch in pyproject.toml reads COVERAGE_PATCH: "subprocess" measures the processes too
  [[ "${COVERAGE_SUBPROCESS:-0}" == 1 ]] && export COVERAGE_PATCH=subprocess
fi
exec .venv/bin/python -m pytest "${opts[@]}" "$@"
