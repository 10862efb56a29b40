#!/usr/bin/env bash
# Create (or refresh) the project venv in .venv: installs nanochat_jax with its dependencies and builds
# the rust_bpe extension. Re-installs only when pyproject.toml, the Rust sources or the extras changed, so
# a second run takes a second. Versions come from requirements.lock (LOCK=0: the newest, to refresh it).
# Prints the venv's python on stdout (progress goes to stderr).
#   bash scripts/ensure_env.sh                    # [dev]: CPU jax + test tools
#   EXTRAS=gpu,dev bash scripts/ensure_env.sh     # CUDA jax (run_gpu.sh); EXTRAS=tpu,dev for TPUs
#   PLAN=1 bash scripts/ensure_env.sh             # also the plan extra (TPU/GPU compilers) in .venv/plan-site
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-dev}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
if [ -x .venv/bin/python ] && ! new_enough .venv/bin/python; then
  echo "[setup] .venv has $(.venv/bin/python --version 2>&1), older than 3.11: making it again" >&2
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ] && ! new_enough "$PYTHON"; then
  echo "[setup] nanochat-jax needs Python >= 3.11 and found $PYTHON ($("$PYTHON" --version 2>/dev/null || echo "it does not run")):" \
       "install python3.11, or name one with PYTHON=/path/to/python3.x" >&2
  exit 1
fi
want=$( (echo "$EXTRAS ${LOCK:-1}"; cat pyproject.toml requirements.lock rust_bpe/Cargo.toml rust_bpe/src/*.rs) | sha256sum | cut -d' ' -f1)
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
  constraints="-c requirements.lock"  # the locked versions; LOCK=0 resolves the newest (to refresh the lock)
  [ "${LOCK:-1}" = 0 ] && constraints=""
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]" $constraints >&2
  echo "$want" > .venv/.install-stamp
fi
if [ "${PLAN:-0}" = 1 ]; then
  plan=$(.venv/bin/python -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["plan"]))')
  if [ "$(cat .venv/plan-site/.stamp 2>/dev/null)" != "$plan" ]; then
    echo "[setup] the plan extra into .venv/plan-site: $plan (first time: ~2.5 GB)" >&2
    rm -rf .venv/plan-site
    .venv/bin/python -m pip install -q --no-deps --target .venv/plan-site $plan >&2
    echo "$plan" > .venv/plan-site/.stamp
  fi
fi
echo "$PWD/.venv/bin/python"
