#!/usr/bin/env bash
# Run the whole test suite; exit non-zero on any failure and also when pytest collected no test.
set -uo pipefail
cd "$(dirname "$0")/.."
# Lint first (seconds): the rules are in pyproject.toml [tool.ruff].
.venv/bin/ruff check --quiet . || { echo "run_tests: ruff check failed (see above)" >&2; exit 1; }
.venv/bin/python -m pytest -ra "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "run_tests: pytest collected no tests - treating as failure" >&2
  exit 1
fi
exit $rc
