"""Mid-training: continue the base model on conversations packed like pretraining text (loss on every token).

    python scripts/mid_train.py --config configs/cpu_tiny.toml [--mid.mixture=cpu --mid.num_iterations=100 ...]

Starts from the latest [mid] source checkpoint (architecture from its metadata) with a fresh optimizer at
[optim] learning rates x mid.init_lr_frac: constant, then linear decay to 0 over the last 20% of the steps,
Muon momentum warming up as in pretraining. Validation bits-per-byte on the mixture's val split every
mid.eval_every steps. [train] resume / checkpoint_every / keep_checkpoints / log_every apply here too (seed does
not: the model comes from the source checkpoint and the mixture's order is fixed).
Writes <home>/checkpoints/mid/d<depth>/ and <home>/report/mid_train.{jsonl,json}.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from nanochat_jax.chat_data import PackedConversations, mean_tokens_per_conversation
from nanochat_jax.checkpoint import checkpoint_dir
from nanochat_jax.common import device_info, print0, run_script
from nanochat_jax.config import load_config, to_toml
from nanochat_jax.distributed import init_distributed
from nanochat_jax.evaluation import evaluate_bpb, make_bpb_step
from nanochat_jax.finetune import chat_samples, load_source, stage_optim
from nanochat_jax.model import flops_per_token, num_params
from nanochat_jax.progress import save_summary
from nanochat_jax.sharding import make_mesh
from nanochat_jax.tasks.mixtures import mid_mixture
from nanochat_jax.tokenizer import token_bytes
from nanochat_jax.train import TrainRun, global_batch, rows_and_accum, run_stage

WARMDOWN_RATIO = 0.2  # nanochat's mid-training: constant, then linear decay to 0 over the last 20% of the steps


def main(argv: list[str] | None = None) -> dict:
    init_distributed()
    cfg = load_config(argv)
    print0(to_toml(cfg))
    mesh = make_mesh(cfg.mesh)
    params, tokenizer, model_cfg, source_meta = load_source(cfg.mid.source, cfg, mesh)
    seq_len = model_cfg.sequence_len
    rows, accum = rows_and_accum(cfg.mid.device_batch_size, cfg.mid.total_batch_size, seq_len, mesh,
                                 "mid.total_batch_size")
    train_task, val_task = mid_mixture(cfg.mid.mixture, "train"), mid_mixture(cfg.mid.mixture, "val")
    if cfg.mid.num_iterations > 0:
        num_iterations = cfg.mid.num_iterations
    else:  # one pass over the mixture, from the average rendered length
        mean_len = mean_tokens_per_conversation(train_task, tokenizer)
        num_iterations = max(1, math.ceil(len(train_task) * mean_len / cfg.mid.total_batch_size))
        print0(f"one pass over {len(train_task):,} conversations of ~{mean_len:.0f} tokens: {num_iterations} steps")
    optim = stage_optim(cfg.optim, cfg.mid.init_lr_frac, warmdown_ratio=WARMDOWN_RATIO,
                        final_lr_frac=0.0, grad_clip=cfg.mid.grad_clip)
    n_params, flops = num_params(model_cfg), flops_per_token(model_cfg)
    print0(f"mid mixture '{cfg.mid.mixture}': {len(train_task):,} train / {len(val_task):,} val conversations | "
           f"{rows} rows x {seq_len} tokens x {accum} micro-steps = {cfg.mid.total_batch_size:,} tokens/step | "
           f"{num_iterations} steps | params {n_params:,}")

    run = TrainRun(model_cfg, optim, num_iterations, mesh, cfg.train.seed, params=params)
    del params
    bpb_step, tb = make_bpb_step(run.graphdef), jnp.asarray(token_bytes(tokenizer))
    val_iter = PackedConversations(val_task, tokenizer, rows, seq_len)
    val_batches = [global_batch([next(val_iter)], mesh) for _ in range(max(1, cfg.mid.eval_tokens // (rows * seq_len)))]
    val_batches = [(b["inputs"][0], b["targets"][0]) for b in val_batches]
    latest = {"val_bpb": None, "min_val_bpb": float("inf")}

    def evaluate(step: int, last: bool, progress) -> None:
        if step == progress.start:  # nanochat's report line: the best over the whole run
            latest["min_val_bpb"] = min((r["val_bpb"] for r in progress.kept if "val_bpb" in r), default=float("inf"))
        if last or (cfg.mid.eval_every > 0 and step % cfg.mid.eval_every == 0):
            val_bpb = latest["val_bpb"] = evaluate_bpb(bpb_step, run.params, val_batches, tb)
            latest["min_val_bpb"] = min(latest["min_val_bpb"], val_bpb)
            progress.eval({"step": step, "val_bpb": val_bpb}, f"step {step:5d} | val bpb {val_bpb:.4f}")

    train_iter = PackedConversations(train_task, tokenizer, rows, seq_len)
    progress = run_stage(run, "mid", cfg, train_iter, lambda: global_batch([next(train_iter) for _ in range(accum)], mesh),
                         evaluate, flops, source_meta)

    samples = chat_samples(run.graphdef, run.params, tokenizer)
    summary = save_summary("mid_train", {
        "stage": "mid", "run": cfg.run, "mixture": cfg.mid.mixture, "source": cfg.mid.source, "params": n_params,
        "tokens": num_iterations * cfg.mid.total_batch_size, "train_conversations": len(train_task),
        "epochs": train_iter.progress, **progress.run_record(cfg.mid.total_batch_size), **latest, "samples": samples,
        "device": device_info(), "mesh": dict(mesh.shape),
        "checkpoint": str(checkpoint_dir("mid", model_cfg.depth) / str(num_iterations))})
    print0(f"done: {num_iterations} steps in {progress.elapsed / 60:.1f} min | val bpb {latest['val_bpb']:.4f} | "
           f"{summary['tokens_per_sec']:,.0f} tok/s in this session, compilation included")
    return summary


if __name__ == "__main__":
    run_script(main)
