"""Bits-per-byte of a base checkpoint on the train and val splits, plus greedy samples.

    python scripts/base_loss.py --config configs/cpu_tiny.toml [--train.eval_tokens=65536]

Loads the latest base checkpoint (of --model.depth if it exists, else the latest depth) through
`load_model`, so the model config comes from the checkpoint. Writes <home>/report/base_loss.json.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from nanochat_jax.checkpoint import load_model
from nanochat_jax.common import print0, run_script
from nanochat_jax.config import load_config, to_toml
from nanochat_jax.distributed import init_distributed
from nanochat_jax.evaluation import make_bpb_step, sample_texts, split_bpb
from nanochat_jax.progress import save_summary
from nanochat_jax.sharding import batch_shards, check_rows_per_process, make_mesh
from nanochat_jax.tokenizer import token_bytes


def main(argv: list[str] | None = None) -> dict:
    init_distributed()  # multi-host: before anything touches the devices
    cfg = load_config(argv)
    print0(to_toml(cfg))
    mesh = make_mesh(cfg.mesh)
    check_rows_per_process(mesh)  # each process feeds its own rows of the evaluation batches
    model, tokenizer, meta = load_model("base", preferred_depth=cfg.model.depth, mesh=mesh)
    cfg.model = type(cfg.model)(**meta["model"])
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    rows = cfg.train.device_batch_size * batch_shards(mesh)
    bpb_step, tb = make_bpb_step(graphdef), jnp.asarray(token_bytes(tokenizer))
    results = {"step": meta["step"]}
    for split in ("train", "val"):
        results[f"{split}_bpb"] = split_bpb(cfg, tokenizer, bpb_step, params, tb, rows, mesh, split)
        print0(f"{split} bpb: {results[f'{split}_bpb']:.4f}")
    results["samples"] = sample_texts(graphdef, params, tokenizer)
    for text in results["samples"]:
        print0(f"  sample: {text!r}")
    return save_summary("base_loss", results)


if __name__ == "__main__":
    run_script(main)
