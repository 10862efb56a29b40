#!/usr/bin/env bash
# Create (or refresh) the project venv in .venv: installs nanochat_jax with its dependencies and builds
# the rust_bpe extension. Re-installs only when pyproject.toml or the Rust sources changed, so a second
# run takes a second. Usage: source-free, just `bash scripts/ensure_env.sh`; prints the venv's python.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
stamp_of() { cat pyproject.toml rust_bpe/Cargo.toml rust_bpe/src/*.rs 2>/dev/null | sha256sum | cut -d' ' -f1; }
want=$(stamp_of)
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)" >&2
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >&2
fi
if [ "$(cat .venv/.install-stamp 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing nanochat-jax and building rust_bpe (first time: a few minutes)" >&2
  .venv/bin/python -m pip install -q -e ".[dev]" >&2
  echo "$want" > .venv/.install-stamp
fi
echo "$PWD/.venv/bin/python"
