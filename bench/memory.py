"""Per-device training memory for d20 / d26: an analytic estimate, checked against XLA's own accounting.

    python bench/memory.py [--measure]            # table for d20 and d26; 32, 80 and 141 GB devices

Analytic terms per device (P parameters, V vocab, C width, N = device_batch_size x sequence_len tokens):
  params      4 P bytes (fp32), divided by the FSDP degree
  optimizer   AdamW m and v for wte and lm_head (2 x 2VC fp32) + Muon momentum for the blocks ((P - 2VC) fp32)
  grads       fp32 gradient of the micro-batch + the accumulator carried across micro-batches: 2 x 4P
  activations what the backward pass keeps, in the compute dtype, per token and layer (see `activation_bytes`),
              plus the fp32 logits of one loss chunk (or of the whole micro-batch when loss_chunk = 0)
Meshes: one device; 8-way data parallel (everything replicated, N per device); 8-way FSDP (params, optimizer
state and grads sharded 8 ways, N per device). Collective buffers, XLA scratch and fragmentation are not
modelled: a configuration "fits" when the estimate is under 90% of the card.

--measure also compiles the train step on CPU (1 device, depth 1 and 2 at the real width, 1 and 2 rows) and reads
`Compiled.memory_analysis()`: temp = fixed + L x per_layer + B x (per_row + L x per_layer_row), so what grows
with the batch (activations) is told apart from what does not (gradients, optimizer temporaries), then scaled
to the real depth and batch. CPU has no cuDNN, so that measurement uses XLA attention, which keeps (heads, T, T)
fp32 probabilities per row and layer; compare it with the analytic "xla attention" column.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from nanochat_jax.config import ModelConfig, load_config  # noqa: E402
from nanochat_jax.model import head_dim, num_params  # noqa: E402

GB = 1e9
CARDS = {"32GB": 32e9, "80GB": 80e9, "141GB": 141e9}  # TPU v6e chip, H100, H200
MESHES = {"1 device": 1, "8x data": 1, "8x fsdp": 8}  # name -> sharding factor of params/opt/grads
USABLE = 0.9


def param_bytes(cfg: ModelConfig) -> int:
    return 4 * num_params(cfg)


def optimizer_bytes(cfg: ModelConfig) -> int:
    """AdamW's two fp32 moments for the embedding and lm_head, Muon's one fp32 buffer for the rest."""
    embed = 2 * cfg.vocab_size * cfg.n_embd
    return 4 * (2 * embed + (num_params(cfg) - embed))


def activation_bytes(cfg: ModelConfig, rows: int, attention: str = "flash") -> dict:
    """Bytes the backward pass keeps for one micro-batch of `rows` sequences: {"layers", "loss", "total"}.

    Per token and layer, in the compute dtype (no remat): block input, attention norm, q/k/v, rotated q/k,
    normed q/k, attention output, residual after attention, MLP norm, c_fc output and relu^2 output.
    Attention itself adds the fp32 log-sum-exp per head (flash: cuDNN or splash) or (heads, T) fp32 probabilities
    per token (xla).
    remat='block' keeps only the block input per layer plus one layer recomputed in the backward pass;
    'dots_saveable' keeps the outputs of the six projections.
    """
    C, T, L, H, Hkv, D = cfg.n_embd, cfg.sequence_len, cfg.n_layer, cfg.n_head, cfg.n_kv_heads, head_dim(cfg)
    a = 2 if cfg.compute_dtype in ("bfloat16", "float16") else 4
    tokens = rows * T
    qkv = (H + 2 * Hkv) * D
    full_layer = a * (C + C + qkv + 2 * (H + Hkv) * D + H * D + C + C + 4 * C + 4 * C)
    attn = 4 * H if attention == "flash" else 4 * H * T
    per_layer = full_layer + attn
    if cfg.remat == "block":
        layers = tokens * (L * a * C + per_layer)
    elif cfg.remat == "dots_saveable":
        layers = tokens * L * (a * (qkv + C + 4 * C + C) + attn)
    else:
        layers = tokens * L * per_layer
    chunk = cfg.loss_chunk
    positions = T if chunk <= 0 else chunk  # a chunk longer than T is padded up to `chunk` positions
    loss = 3 * 4 * rows * positions * cfg.vocab_size + a * tokens * C  # logits, softcapped, grad; final hidden
    return {"layers": layers, "loss": loss, "total": layers + loss}


def estimate(cfg: ModelConfig, device_batch_size: int, shard: int, attention: str = "flash") -> dict:
    """Per-device bytes by term for a mesh that shards params/optimizer/grads `shard` ways."""
    act = activation_bytes(cfg, device_batch_size, attention)
    out = {"params": param_bytes(cfg) / shard, "optimizer": optimizer_bytes(cfg) / shard,
           "grads": 2 * param_bytes(cfg) / shard, "activations": act["layers"], "loss": act["loss"]}
    out["total"] = sum(out.values())
    return out


def largest_fitting(cfg: ModelConfig, shard: int, capacity: float, attention: str = "flash") -> int:
    best = 0
    for b in (1, 2, 4, 8, 16, 32, 64, 128):
        if estimate(cfg, b, shard, attention)["total"] <= USABLE * capacity:
            best = b
    return best


def measure_temp(cfg: ModelConfig) -> dict:
    """XLA's temp bytes for the train step on one CPU device at depth 1 and 2 (cfg's width) and 1 and 2 rows:
    {"fixed", "per_layer", "per_row", "per_layer_row"}, see measured_total."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nanochat_jax.config import MeshConfig, OptimConfig
    from nanochat_jax.optim import build_optimizer
    from nanochat_jax.sharding import make_mesh
    from nanochat_jax.train import TrainState, abstract_model, make_train_step, state_shardings

    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    temps = {}
    for depth in (1, 2):
        small = dataclasses.replace(cfg, depth=depth, aspect_ratio=cfg.n_embd // depth,
                                    attention_impl="xla", head_dim=head_dim(cfg))
        optimizer = build_optimizer(OptimConfig(), small.n_embd, 100)
        graphdef, shardings = state_shardings(small, optimizer, mesh)
        params = nnx.to_pure_dict(abstract_model(small)[1])
        abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                              opt_state=jax.eval_shape(optimizer.init, params))
        step = make_train_step(graphdef, optimizer, shardings, mesh, 100, OptimConfig())
        for rows in (1, 2):
            tokens = jax.ShapeDtypeStruct((1, rows, small.sequence_len), jnp.int32)
            mem = step.jitted.lower(abstract, {"inputs": tokens, "targets": tokens}).compile().memory_analysis()
            temps[depth, rows] = mem.temp_size_in_bytes
    per_layer_row = temps[2, 2] - temps[1, 2] - temps[2, 1] + temps[1, 1]
    per_layer = temps[2, 1] - temps[1, 1] - per_layer_row
    per_row = temps[1, 2] - temps[1, 1] - per_layer_row
    return {"fixed": temps[1, 1] - per_layer - per_row - per_layer_row, "per_layer": per_layer, "per_row": per_row,
            "per_layer_row": per_layer_row}


def measured_total(meas: dict, depth: int, rows: int) -> float:
    """measure_temp's terms at `depth` layers and `rows` rows per device."""
    return meas["fixed"] + depth * meas["per_layer"] + rows * (meas["per_row"] + depth * meas["per_layer_row"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="configs/d20.toml,configs/d26.toml")
    parser.add_argument("--measure", action="store_true", help="also compile on CPU and read memory_analysis()")
    args, overrides = parser.parse_known_args(argv)
    for path in args.configs.split(","):
        cfg = load_config(["--config", path, *overrides])
        m, B = cfg.model, cfg.train.device_batch_size
        print(f"\n{cfg.run}: depth {m.depth}, width {m.n_embd}, {num_params(m) / 1e6:.0f}M params, "
              f"{m.compute_dtype}, seq {m.sequence_len}, loss_chunk {m.loss_chunk}; device_batch_size {B}")
        print(f"{'mesh':9} {'remat':13} {'params':>7} {'optim':>7} {'grads':>7} {'acts':>7} {'loss':>7} "
              f"{'total':>7} {'xla-attn':>8} | largest device batch that fits "
              f"{' / '.join(CARDS)} (flash attention)")
        for mesh_name, shard in MESHES.items():
            for remat in ("none", "dots_saveable", "block"):
                c = dataclasses.replace(m, remat=remat)
                e = estimate(c, B, shard)
                x = estimate(c, B, shard, "xla")["total"]
                fits = " / ".join(str(largest_fitting(c, shard, cap)) for cap in CARDS.values())
                print(f"{mesh_name:9} {remat:13} " + " ".join(f"{e[k] / GB:7.1f}" for k in
                      ("params", "optimizer", "grads", "activations", "loss", "total")) + f" {x / GB:8.1f} | {fits}")
        if args.measure:
            meas = measure_temp(m)
            analytic = activation_bytes(dataclasses.replace(m, remat="none"), B, "xla")["total"]
            print(f"measured on CPU (xla attention, remat none, from depth 1-2 x rows 1-2): temp "
                  f"{meas['per_layer_row'] / 1e6:.0f} MB/layer/row + {meas['per_row'] / 1e6:.0f} MB/row + "
                  f"{meas['per_layer'] / 1e6:.0f} MB/layer + {meas['fixed'] / 1e6:.0f} MB -> "
                  f"{measured_total(meas, m.n_layer, B) / GB:.1f} GB at depth {m.n_layer} x batch {B}; analytic "
                  f"activations+loss (xla attention) {analytic / GB:.1f} GB")


if __name__ == "__main__":
    main()
