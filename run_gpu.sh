#!/usr/bin/env bash
# nanochat's d20 speedrun in JAX on one host with 8 NVIDIA GPUs (8 x H100/H200 80-141 GB): one Python
# process drives all 8 GPUs (no torchrun; the mesh in the config spreads the batch over them).
#   bash run_gpu.sh                    # the whole pipeline; extra args are config overrides for every step
#   RECIPE=modern bash run_gpu.sh      # nanochat master's recipe: configs/d24_modern.toml (CONFIG=... for another)
#   screen -L -Logfile run_gpu.log -S speedrun bash run_gpu.sh   # it takes hours
# Artifacts go to $NANOCHAT_JAX_HOME (default ~/.cache/nanochat_jax). RUN_RL=1 adds the optional RL stage.
set -euo pipefail
cd "$(dirname "$0")"
case "${RECIPE:-first_release}" in
  first_release) CONFIG=${CONFIG:-configs/d20.toml} ;;
  modern) CONFIG=${CONFIG:-configs/d24_modern.toml} ;;
  *) echo "RECIPE=${RECIPE} is not one of: first_release, modern" >&2; exit 1 ;;
esac

# --- environment: .venv with the GPU build of jaxlib (and rust_bpe built on first use)
PY=$(EXTRAS=gpu,dev bash scripts/ensure_env.sh)

# --- XLA / CUDA settings (latency-hiding scheduler, collective combining, compilation cache)
source scripts/gpu_env.sh

# --- the config's data size and batch rows (with any overrides), and the GPUs' memory
SIZES=$("$PY" -m nanochat_jax.config data.source data.num_shards train.device_batch_size mid.device_batch_size \
  sft.device_batch_size -- --config "$CONFIG" "$@" | tail -1)  # (a bad config or override stops the script here)
read -r SOURCE NUM_SHARDS TRAIN_ROWS MID_ROWS SFT_ROWS <<< "$SIZES"
GPU_GIB=$("$PY" -c "import jax; d = jax.devices(); gib = (d[0].memory_stats() or {}).get('bytes_limit', -2**30) // 2**30
print(f'{len(d)} x {d[0].device_kind}, {gib} GiB usable each (-1: not reported)', file=__import__('sys').stderr); print(gib)")
# scripts/plan.py (H100 compiler, 2026-12-05): d20 at 32 rows and d26 at 16 need 65 GB per GPU, which fits an
# H100's ~73 GiB with 17% to spare; smaller cards (A100 40 GB, L40S 48 GB) get half the rows
ROWS=""
if [ "$GPU_GIB" -ge 0 ] && [ "$GPU_GIB" -lt 64 ] && [ "${FULL_ROWS:-0}" != 1 ]; then
  ROWS="--train.device_batch_size=$(( (TRAIN_ROWS + 1) / 2 )) --mid.device_batch_size=$(( (MID_ROWS + 1) / 2 ))"
  ROWS="$ROWS --sft.device_batch_size=$(( (SFT_ROWS + 1) / 2 ))"
  echo "GPUs under 64 GiB: $ROWS (gradient accumulation keeps the batch size; FULL_ROWS=1 keeps the config's)"
fi

source scripts/speedrun.sh  # step, run, speedrun_stages

step "report: reset"
run scripts/report.py reset

step "data: first 8 $SOURCE shards now (~2B chars for the tokenizer), all $NUM_SHARDS in the background"
"$PY" -c "from nanochat_jax.data import download_shards; download_shards(8, 8, '$SOURCE')"
"$PY" -c "from nanochat_jax.data import download_shards; download_shards($NUM_SHARDS, 8, '$SOURCE')" &
DOWNLOAD_PID=$!

step "tokenizer: train (the config's vocabulary, on 2B characters) and evaluate"
run scripts/tok_train.py --config "$CONFIG" "$@" --data.num_shards=8
run scripts/tok_eval.py --config "$CONFIG" "$@"

echo "waiting for the data download ($NUM_SHARDS shards, ~100 MB each) ..."
wait $DOWNLOAD_PID

speedrun_stages "$@"
