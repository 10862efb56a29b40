# Sourced by run_gpu.sh and run_tpu.sh: `step`, `run`, `sft_source` and `speedrun_stages`, the stages after the
# tokenizer (base pretraining and its evals, mid-training unless SFT starts from the base model, SFT, optional RL,
# the report). They read PY, CONFIG and ROWS (overrides of the rows per device of base, mid and SFT training,
# may be empty); speedrun_stages' arguments are overrides for every stage.
step() { echo; echo "=== $* ==="; }
run() {  # run SCRIPT ARGS...: a pipeline step, echoed first
  echo "+ $PY $*"
  "$PY" "$@"
}

sft_source() {  # the config's sft.source with the overrides: "base" skips mid-training
  NANOCHAT_JAX_DISTRIBUTED=0 JAX_PLATFORMS=cpu "$PY" -m nanochat_jax.config sft.source -- --config "$CONFIG" "$@" |
    tail -1
}

speedrun_stages() {
  step "base model: pretrain"
  run scripts/base_train.py --config "$CONFIG" $ROWS "$@"
  step "base model: train/val bits per byte and samples"
  run scripts/base_loss.py --config "$CONFIG" "$@"
  step "base model: CORE metric"
  run scripts/base_eval.py --config "$CONFIG" "$@"

  if [ "$(sft_source "$@")" = base ]; then  # nanochat master's recipe: one post-training stage
    step "mid-training: none (sft.source = base: SFT starts from the base model)"
  else
    step "mid-training and its chat eval"
    run scripts/mid_train.py --config "$CONFIG" $ROWS "$@"
    run scripts/chat_eval.py -i mid --config "$CONFIG" "$@"
  fi
  step "supervised fine-tuning and its chat eval"
  run scripts/chat_sft.py --config "$CONFIG" $ROWS "$@"
  run scripts/chat_eval.py -i sft --config "$CONFIG" "$@"
  if [ "${RUN_RL:-0}" = 1 ]; then  # optional, as in nanochat's speedrun
    step "reinforcement learning on GSM8K and its eval"
    run scripts/chat_rl.py --config "$CONFIG" "$@"
    run scripts/chat_eval.py -i rl -a GSM8K --config "$CONFIG" "$@"
  fi

  step "report: generate"
  run scripts/report.py generate
  echo "done: report in ${NANOCHAT_JAX_HOME:-$HOME/.cache/nanochat_jax}/report/report.md"
}
