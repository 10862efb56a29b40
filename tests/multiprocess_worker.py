"""One process of tests/test_multiprocess.py: a few train steps on a fixed global batch, over every device of
every process (jax.distributed on CPU when JAX_NUM_PROCESSES is set), printing `RESULT {json}` on process 0.

    python tests/multiprocess_worker.py DATA FSDP STEPS [TENSOR]
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat_jax.distributed import init_distributed  # noqa: E402

init_distributed()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from nanochat_jax.config import MeshConfig, ModelConfig, OptimConfig  # noqa: E402
from nanochat_jax.sharding import make_mesh  # noqa: E402
from nanochat_jax.train import TrainRun, global_batch, microbatch_sharding  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def main(data: int, fsdp: int, steps: int, tensor: int = 1) -> None:
    model_cfg = ModelConfig(depth=2, aspect_ratio=32, head_dim=32, vocab_size=512, sequence_len=32,
                            compute_dtype="float32")
    optim_cfg = OptimConfig(ns_dtype="float32")  # bf16 Newton-Schulz is not bit-stable across reduction orders
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
    run = TrainRun(model_cfg, optim_cfg, 100, mesh, seed=0)

    rows, micro = 8, 2
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model_cfg.vocab_size, (micro, rows, model_cfg.sequence_len + 1), dtype=np.int32)
    # this process's rows of the global batch: the rows its devices hold under the batch sharding
    index_map = microbatch_sharding(mesh).addressable_devices_indices_map(tokens[..., 1:].shape)
    local_rows = sorted({r for idx in index_map.values() for r in range(*idx[1].indices(rows))})
    local = [{"inputs": tokens[m, local_rows, :-1], "targets": tokens[m, local_rows, 1:]} for m in range(micro)]
    batch = global_batch(local, mesh)

    losses = []
    for _ in range(steps):
        metrics = run.step(batch)
        losses.append(float(metrics["loss"]))
    params = multihost_utils.process_allgather(run.params, tiled=True)
    checksum = {"/".join(map(str, path)): float(np.sum(np.asarray(x, np.float64) ** 2))
                for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    if jax.process_index() == 0:
        print("RESULT " + json.dumps({"processes": jax.process_count(), "devices": jax.device_count(),
                                      "local_rows": local_rows, "losses": losses, "param_sq": checksum}))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:5]))
