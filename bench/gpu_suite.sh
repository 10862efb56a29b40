#!/usr/bin/env bash
# The GPU figures of bench/RESULTS.md, in stages that each fit one 10-minute call on a lent GPU machine
# (its python3 has jax[cuda], flax, optax, torch; nothing is installed, the repo is imported from source).
#   bash bench/gpu_suite.sh env          # GPU, versions, measured copy bandwidth and bf16 matmul peak
#   bash bench/gpu_suite.sh train DEPTH  # train step at nanochat's device batch (32 x 2048, bf16, cuDNN
#                                        #   attention): timing, forward/backward/optimizer breakdown,
#                                        #   kernel profile, and with NANOCHAT_DIR set, nanochat's torch step
#                                        #   on the same shapes and the tokens/s ratio
#   bash bench/gpu_suite.sh decode       # d20 batch-1 and batch-32 decode against the bandwidth bound
#   bash bench/gpu_suite.sh fp8 DEPTH    # the train step without and with train.fp8 (master's --fp8), one
#                                        #   process each, and the tokens/s ratio (Hopper and newer)
#   bash bench/gpu_suite.sh infer DEPTH  # scripts/infer_bench.py on a freshly initialised d20-shaped model
#                                        #   (bf16) saved as a base checkpoint with a stand-in tokenizer of the
#                                        #   same vocabulary (bytes and byte pairs): TTFT, TPOT, MBU per batch size
# NANOCHAT_DIR: a checkout of karpathy/nanochat kept outside this repository (its nanochat/ package).
# Logs and JSON go to $OUT (the device tool's folder) or bench_out/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the repo is imported from source
stage=${1:-env}
depth=${2:-20}
log() { tee -a "$OUT/$stage.log"; }

case $stage in
env)
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv | log
  $PY - <<'EOF' 2>&1 | log
import time, jax, jax.numpy as jnp, flax, optax
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())
def best(f, *a, n=10):  # 10 calls queued back to back: the host's dispatch time hides behind the device's
    f(*a).block_until_ready(); ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready([f(*a) for _ in range(10)]); ts.append((time.perf_counter() - t) / 10)
    return min(ts)
x = jax.random.normal(jax.random.key(0), (1 << 30,), jnp.float32)  # 4 GiB
t = best(jax.jit(lambda x: x * 1.0001), x)
print(f"copy: {2 * x.nbytes / t / 1e9:.0f} GB/s (read + write of {x.nbytes / 2**30:.0f} GiB)")
for n in (4096, 8192):
    a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in jax.random.split(jax.random.key(1)))
    t = best(jax.jit(lambda a, b: a @ b), a, b)
    print(f"bf16 matmul {n}^3: {2 * n ** 3 / t / 1e12:.0f} TFLOP/s")
EOF
  $PY - <<'EOF' 2>&1 | log  # nanochat's side needs torch.compile (Inductor/Triton): a 5-second check
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
print("torch.compile ok:", torch.compile(lambda x: x * 2)(torch.ones(4, device="cuda")).sum().item() == 8)
EOF
  $PY bench/train_step.py --config configs/d20.toml --model.depth=1 --steps 2 --warmup 1 2>&1 | tail -2 | log
  ;;
train)
  extra=()
  if [ -n "${NANOCHAT_DIR:-}" ]; then extra=(--nanochat-dir "$NANOCHAT_DIR"); fi
  # the trace stays on the machine (/tmp): the printed summary is what comes back
  $PY bench/train_step.py --config configs/d20.toml --model.depth="$depth" --steps 10 --warmup 3 --breakdown \
    --profile "${TRACE_DIR:-/tmp}/trace_d$depth" ${extra[@]+"${extra[@]}"} "${@:3}" 2>&1 | log
  ;;
decode)
  $PY bench/decode.py --depth 20 --compute-dtype bfloat16 --prompt-len 128 --max-tokens 256 --batch-sizes 1,32 \
    --bandwidth-gbs "${BANDWIDTH_GBS:-4800}" "${@:2}" 2>&1 | log  # H200 datasheet (H100: 3350)
  ;;
fp8)
  for fp8 in false true; do
    $PY bench/train_step.py --config configs/d20.toml --model.depth="$depth" --steps 10 --warmup 3 \
      --train.fp8=$fp8 "${@:3}" > "$OUT/fp8_$fp8.txt" 2>&1
    grep -E "^fp8 training|tok/s|Error" "$OUT/fp8_$fp8.txt" | sed "s/^/fp8=$fp8: /" | log
  done
  $PY - "$OUT/fp8_false.txt" "$OUT/fp8_true.txt" <<'EOF' 2>&1 | log
import json, sys
runs = [[line for line in open(f) if line.startswith("JSON ")] for f in sys.argv[1:]]
if not all(runs):
    sys.exit(f"no figures: a run failed (its output: {' '.join(f for f, r in zip(sys.argv[1:], runs) if not r)})")
bf16, fp8 = (json.loads(r[0][5:]) for r in runs)
print(f"RATIO fp8/bf16 tokens/s = {fp8['tokens_per_sec'] / bf16['tokens_per_sec']:.3f} ({fp8['tokens_per_sec']:,.0f} "
      f"vs {bf16['tokens_per_sec']:,.0f}); loss after the steps {fp8['loss_last']:.4f} vs {bf16['loss_last']:.4f}")
EOF
  ;;
infer)
  # a scratch home (its checkpoints and tokenizer are replaced); config overrides after DEPTH shrink it for tests
  export NANOCHAT_JAX_HOME=${INFER_HOME:-/tmp/gpu_suite_infer_home}
  unset NANOCHAT_JAX_CHECKPOINTS  # (the checkpoint goes into the scratch home, not a real run's folder)
  rm -rf "$NANOCHAT_JAX_HOME/checkpoints" "$NANOCHAT_JAX_HOME/tokenizer"
  $PY - "$depth" "${@:3}" <<'EOF' 2>&1 | log || exit 1
import dataclasses, itertools, sys
import jax
from flax import nnx
from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir
from nanochat_jax.config import load_config
from nanochat_jax.model import init_model, runnable_on
from nanochat_jax.tokenizer import SPECIAL_TOKENS, Tokenizer, default_tokenizer_dir
cfg = load_config(["--config", "configs/d20.toml", "--model.compute_dtype=bfloat16", *sys.argv[2:]])
model_cfg = runnable_on(dataclasses.replace(cfg.model, depth=int(sys.argv[1])), jax.devices()[0].platform)
tokens = [bytes([i]) for i in range(256)] + [bytes(p) for p in itertools.product(range(256), repeat=2)]
tokenizer = Tokenizer({t: i for i, t in enumerate(tokens[:model_cfg.vocab_size - len(SPECIAL_TOKENS)])})
tokenizer.save(default_tokenizer_dir())
params = nnx.to_pure_dict(nnx.split(init_model(model_cfg), nnx.Param)[1])
ckpt = Checkpointer(checkpoint_dir("base", model_cfg.depth))
ckpt.save(0, params, None, {}, {"step": 0, "stage": "base", "model": dataclasses.asdict(model_cfg)})
ckpt.close()
print(f"saved a fresh depth-{model_cfg.depth} model ({model_cfg.vocab_size:,}-token vocabulary) as a base checkpoint")
EOF
  $PY scripts/infer_bench.py -i base --depth "$depth" -s 0 --batch-sizes "${BATCH_SIZES:-1,8,32,128}" 2>&1 | log
  ;;
*)
  echo "unknown stage '$stage' (env, train, decode, fp8, infer)" >&2; exit 2
  ;;
esac
