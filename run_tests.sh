#!/usr/bin/env bash
# Run the test suite (sets up .venv first if needed): the default tests in two worker processes (pytest-xdist;
# each test file stays in one worker, so its module fixtures are built once). Extra arguments go to pytest instead,
# e.g. `bash run_tests.sh -m slow` for the long end-to-end tests, or `bash run_tests.sh tests/test_model.py`.
set -euo pipefail
cd "$(dirname "$0")"
PY=$(PLAN=1 bash scripts/ensure_env.sh)  # the plan extra: tests compile for TPUs and GPUs
if [ $# -eq 0 ]; then set -- -m "not slow" -n 2 --dist loadfile; fi
exec "$PY" -m pytest "$@"
