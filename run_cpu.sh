#!/usr/bin/env bash
# The whole pipeline on a laptop CPU, on the embedded corpus, in about eight minutes on 2 cores: sets up .venv on first
# use, then tokenizer -> base pretraining -> mid-training -> SFT -> RL -> chat answers -> report.md.
# Artifacts go to $NANOCHAT_JAX_HOME (default ~/.cache/nanochat_jax). Extra arguments are passed to every
# training script as config overrides, e.g. `bash run_cpu.sh --train.num_iterations=50`.
set -euo pipefail
cd "$(dirname "$0")"
PY=$(bash scripts/ensure_env.sh)
CONFIG=${CONFIG:-configs/cpu_tiny.toml}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
CPU_TASKS="WorldFacts|WordProblems|SpellingBee"  # chat evals that need no download (the hub ones do);
# their reference answers are at most 208 tokens (SpellingBee), so 256 new tokens instead of the default 512;
# EVAL_PROBLEMS / EVAL_TOKENS shrink them (the CI smoke test does)
EVAL_PROBLEMS=${EVAL_PROBLEMS:-64}
EVAL_TOKENS=${EVAL_TOKENS:-256}
step() { echo; echo "=== $* ==="; }

"$PY" scripts/report.py reset >/dev/null
step "1/9 tokenizer: train on the embedded corpus"
"$PY" scripts/tok_train.py --config "$CONFIG"
step "2/9 tokenizer: compression"
"$PY" scripts/tok_eval.py --config "$CONFIG"
step "3/9 base pretraining"
"$PY" scripts/base_train.py --config "$CONFIG" "$@"
step "4/9 base model: bits-per-byte and samples"
"$PY" scripts/base_loss.py --config "$CONFIG" "$@"
SFT_SOURCE=$("$PY" -m nanochat_jax.config sft.source -- --config "$CONFIG" "$@" | tail -1)
if [ "$SFT_SOURCE" = base ]; then  # nanochat master's recipe (cpu_modern.toml): one post-training stage
  step "5/9 mid-training: none (sft.source = base: SFT starts from the base model)"
else
  step "5/9 mid-training on generated conversations, and its chat eval"
  "$PY" scripts/mid_train.py --config "$CONFIG" "$@"
  "$PY" scripts/chat_eval.py --config "$CONFIG" -i mid -a "$CPU_TASKS" -x "$EVAL_PROBLEMS" -m "$EVAL_TOKENS"
fi
step "6/9 supervised fine-tuning, and its chat eval"
"$PY" scripts/chat_sft.py --config "$CONFIG" "$@"
"$PY" scripts/chat_eval.py --config "$CONFIG" -i sft -a "$CPU_TASKS" -x "$EVAL_PROBLEMS" -m "$EVAL_TOKENS"
step "7/9 reinforcement learning on word problems (calculator tool), and its chat eval"
"$PY" scripts/chat_rl.py --config "$CONFIG" "$@"
"$PY" scripts/chat_eval.py --config "$CONFIG" -i rl -a "$CPU_TASKS" -x "$EVAL_PROBLEMS" -m "$EVAL_TOKENS"
step "8/9 chat with the RL model"
"$PY" scripts/chat_cli.py --source rl -p "What is the capital of Gorsica?" -t 0
"$PY" scripts/chat_cli.py --source rl -p "Ben has 3 baskets with 7 apples in each basket. How many apples is that in total?" -t 0
step "9/9 report"
"$PY" scripts/report.py generate
echo
echo "Chat in the browser: $PY scripts/chat_web.py --source rl   (or in the terminal: $PY scripts/chat_cli.py --source rl)"
