#!/usr/bin/env bash
# nanochat's d20 speedrun in JAX on a Cloud TPU VM slice (v5e / v6e; one host or a multi-host pod).
# Every host runs this same script; jax.distributed joins them (NANOCHAT_JAX_DISTRIBUTED=1, coordinates
# taken from the TPU metadata) and the FSDP mesh of the config spans all chips of all hosts.
#
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="cd nanochat-jax && \
#     NANOCHAT_JAX_CHECKPOINTS=/mnt/shared/checkpoints nohup bash run_tpu.sh > run_tpu.log 2>&1 &"
#   (nohup: the run outlives the ssh session; the checkpoint folder: see below, needed on a multi-host pod)
#
# (copy or clone the repo onto every worker first, e.g. with `gcloud compute tpus tpu-vm scp --worker=all`.)
# Artifacts go to $NANOCHAT_JAX_HOME on each host's own disk (default ~/.cache/nanochat_jax): every host downloads
# its own data and trains the same tokenizer (deterministic; checkpoints check its fingerprint). On a multi-host
# pod, checkpoints must go to storage every host sees: set NANOCHAT_JAX_CHECKPOINTS=/path/on/a/shared/mount
# (a run whose hosts do not see one directory stops at its first stage with a message saying so).
# Extra arguments are config overrides for every step (e.g. --data.source=climbmix, --train.num_iterations=100).
set -euo pipefail
cd "$(dirname "$0")"
case "${RECIPE:-first_release}" in  # RECIPE=modern: nanochat master's recipe, d24_modern.toml on the TPU's settings
  first_release) CONFIG=${CONFIG:-configs/tpu_v6e_8.toml} ;;
  modern) CONFIG=${CONFIG:-configs/d24_modern.toml}  # 4 rows: 20.8 GB per v6e chip, 8 rows 32.9 (scripts/plan.py)
          set -- --model.attention_impl=splash --mesh.data=1 --mesh.fsdp=-1 --train.device_batch_size=4 \
                 --sft.device_batch_size=4 "$@" ;;  # (its SFT packs rows of 2048 tokens like pretraining)
  *) echo "RECIPE=${RECIPE} is not one of: first_release, modern" >&2; exit 1 ;;
esac

# --- environment: .venv with the TPU build of jaxlib (and rust_bpe built on first use)
PY=$(EXTRAS=tpu,dev bash scripts/ensure_env.sh)

export NANOCHAT_JAX_DISTRIBUTED=${NANOCHAT_JAX_DISTRIBUTED:-1}
export JAX_PLATFORMS=${JAX_PLATFORMS:-tpu}
SIZES=$(NANOCHAT_JAX_DISTRIBUTED=0 JAX_PLATFORMS=cpu "$PY" -m nanochat_jax.config data.source data.num_shards \
  -- --config "$CONFIG" "$@" | tail -1)
read -r SOURCE NUM_SHARDS <<< "$SIZES"  # (a bad config or override stops the script above)

ROWS=""  # the config's rows per device (run_gpu.sh halves them on GPUs under 64 GiB)
source scripts/speedrun.sh  # step, run, speedrun_stages

step "report: reset"
run scripts/report.py reset

step "data: first 8 $SOURCE shards now (~2B chars for the tokenizer), all $NUM_SHARDS in the background"
# plain downloads: single-process, so they must not join the distributed runtime
NANOCHAT_JAX_DISTRIBUTED=0 "$PY" -c "from nanochat_jax.data import download_shards; download_shards(8, 8, '$SOURCE')"
NANOCHAT_JAX_DISTRIBUTED=0 "$PY" -c "from nanochat_jax.data import download_shards; download_shards($NUM_SHARDS, 8, '$SOURCE')" &
DOWNLOAD_PID=$!

step "tokenizer: train (the config's vocabulary, on 2B characters) and evaluate (on each host, no devices needed)"
NANOCHAT_JAX_DISTRIBUTED=0 JAX_PLATFORMS=cpu run scripts/tok_train.py --config "$CONFIG" "$@" --data.num_shards=8
NANOCHAT_JAX_DISTRIBUTED=0 JAX_PLATFORMS=cpu run scripts/tok_eval.py --config "$CONFIG" "$@"

echo "waiting for the data download ($NUM_SHARDS shards, ~100 MB each) ..."
wait $DOWNLOAD_PID

"$PY" -c "from nanochat_jax.distributed import init_distributed; init_distributed(); import jax; \
print(f'process {jax.process_index()}/{jax.process_count()}: {jax.device_count()} x {jax.devices()[0].device_kind}')"

speedrun_stages "$@"
