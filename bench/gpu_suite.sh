#!/usr/bin/env bash
# Every GPU figure issue #8 asks for, in stages that each fit one 10-minute call on a lent GPU machine
# (its python3 has jax[cuda], flax, optax, torch; nothing is installed, the repo is imported from source).
#   bash bench/gpu_suite.sh env          # GPU, versions, measured copy bandwidth and bf16 matmul peak
#   bash bench/gpu_suite.sh train DEPTH  # train step at nanochat's device batch (32 x 2048, bf16, cuDNN
#                                        #   attention): timing, forward/backward/optimizer breakdown,
#                                        #   kernel profile, and with NANOCHAT_DIR set, nanochat's torch step
#                                        #   on the same shapes and the tokens/s ratio
#   bash bench/gpu_suite.sh flags DEPTH  # the same step without and with scripts/gpu_env.sh's XLA flags
#   bash bench/gpu_suite.sh decode       # d20 batch-1 and batch-32 decode against the bandwidth bound
# NANOCHAT_DIR: a checkout of karpathy/nanochat kept outside this repository (its nanochat/ package).
# Logs and JSON go to $OUT (the device tool's folder) or bench_out/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
stage=${1:-env}
depth=${2:-20}
log() { tee -a "$OUT/$stage.log"; }

case $stage in
env)
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv | log
  $PY - <<'EOF' 2>&1 | log
import time, jax, jax.numpy as jnp, flax, optax
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())
def best(f, *a, n=10):
    f(*a).block_until_ready(); ts = []
    for _ in range(n):
        t = time.perf_counter(); f(*a).block_until_ready(); ts.append(time.perf_counter() - t)
    return min(ts)
x = jax.random.normal(jax.random.key(0), (1 << 30,), jnp.float32)  # 4 GiB
t = best(jax.jit(lambda x: x * 1.0001), x)
print(f"copy: {2 * x.nbytes / t / 1e9:.0f} GB/s (read + write of {x.nbytes / 2**30:.0f} GiB)")
for n in (4096, 8192):
    a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in jax.random.split(jax.random.key(1)))
    t = best(jax.jit(lambda a, b: a @ b), a, b)
    print(f"bf16 matmul {n}^3: {2 * n ** 3 / t / 1e12:.0f} TFLOP/s")
EOF
  ;;
train)
  extra=()
  if [ -n "${NANOCHAT_DIR:-}" ]; then extra=(--nanochat-dir "$NANOCHAT_DIR"); fi
  $PY bench/train_step.py --config configs/d20.toml --model.depth="$depth" --steps 10 --warmup 3 --breakdown \
    --profile "$OUT/trace_d$depth" "${extra[@]}" "${@:3}" 2>&1 | log
  ;;
flags)
  $PY bench/train_step.py --config configs/d20.toml --model.depth="$depth" --steps 10 --warmup 3 "${@:3}" 2>&1 \
    | sed 's/^/[no flags] /' | log
  (source scripts/gpu_env.sh && echo "XLA_FLAGS=$XLA_FLAGS" && \
   $PY bench/train_step.py --config configs/d20.toml --model.depth="$depth" --steps 10 --warmup 3 "${@:3}") 2>&1 \
    | sed 's/^/[gpu_env.sh] /' | log
  ;;
decode)
  $PY bench/decode.py --depth 20 --compute-dtype bfloat16 --prompt-len 128 --max-tokens 256 --batch-sizes 1,32 \
    --bandwidth-gbs "${BANDWIDTH_GBS:-4300}" "${@:2}" 2>&1 | log
  ;;
*)
  echo "unknown stage '$stage' (env, train, flags, decode)" >&2; exit 2
  ;;
esac
