#!/usr/bin/env bash
# Create (or refresh) the project venv in .venv: installs nanochat_jax with its dependencies and builds
# the rust_bpe extension. Re-installs only when pyproject.toml, the Rust sources or the extras changed, so
# a second run takes a second. Prints the venv's python on stdout (progress goes to stderr).
#   bash scripts/ensure_env.sh                    # [dev]: CPU jax + test tools
#   EXTRAS=gpu,dev bash scripts/ensure_env.sh     # CUDA jax (run_gpu.sh); EXTRAS=tpu,dev for TPUs
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-dev}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
want=$( (echo "$EXTRAS"; cat pyproject.toml rust_bpe/Cargo.toml rust_bpe/src/*.rs) | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)" >&2
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >&2
fi
if [ "$(cat .venv/.install-stamp 2>/dev/null)" != "$want" ]; then
  if ! command -v cargo >/dev/null 2>&1; then
    [ -f "$HOME/.cargo/env" ] || { echo "[setup] installing Rust with rustup (needed to build rust_bpe)" >&2;
      curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y >&2; }
    . "$HOME/.cargo/env"
  fi
  echo "[setup] pip install -e .[$EXTRAS] and build rust_bpe (first time: a few minutes)" >&2
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]" >&2
  echo "$want" > .venv/.install-stamp
fi
echo "$PWD/.venv/bin/python"
