#!/usr/bin/env bash
# The whole pipeline on a laptop CPU, on the embedded corpus, in minutes: sets up .venv on first use,
# then tokenizer -> base pretraining -> evaluation -> a chat sample. Artifacts go to $NANOCHAT_JAX_HOME
# (default ~/.cache/nanochat_jax). Extra arguments are passed to every training script as overrides,
# e.g. `bash run_cpu.sh --train.num_iterations=50`.
set -euo pipefail
cd "$(dirname "$0")"
PY=$(bash scripts/ensure_env.sh)
CONFIG=${CONFIG:-configs/cpu_tiny.toml}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
step() { echo; echo "=== $* ==="; }

"$PY" scripts/report.py reset >/dev/null
step "1/6 tokenizer: train on the embedded corpus"
"$PY" scripts/tok_train.py --config "$CONFIG"
step "2/6 tokenizer: compression"
"$PY" scripts/tok_eval.py --config "$CONFIG"
step "3/6 base pretraining"
"$PY" scripts/base_train.py --config "$CONFIG" "$@"
step "4/6 base model: bits-per-byte and samples"
"$PY" scripts/base_loss.py --config "$CONFIG" "$@"
step "5/6 a completion from the base model through the engine"
"$PY" scripts/chat_cli.py --source base -p "Once upon a time" -t 0
step "6/6 report"
"$PY" scripts/report.py generate
