"""Mid-training: continue the base model on conversations packed like pretraining text (loss on every token).

    python scripts/mid_train.py --config configs/cpu_tiny.toml [--mid.mixture=cpu --mid.num_iterations=100 ...]

Starts from the latest [mid] source checkpoint (architecture from its metadata) with a fresh optimizer at
[optim] learning rates x mid.init_lr_frac: constant, then linear decay to 0 over the last 20% of the steps,
Muon momentum warming up as in pretraining. Validation bits-per-byte on the mixture's val split every
mid.eval_every steps. [train] resume / checkpoint_every / keep_checkpoints / log_every / seed apply here too.
Writes <home>/checkpoints/mid/d<depth>/ and <home>/report/mid_train.{jsonl,json}.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp

from nanochat_jax.chat_data import PackedConversations, mean_tokens_per_conversation
from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir
from nanochat_jax.common import (artifacts_dir, device_info, init_distributed, is_main_process,
                                 peak_flops_per_device, print0, run_script)
from nanochat_jax.config import ConfigError, load_config, to_toml
from nanochat_jax.evaluation import evaluate_bpb, make_bpb_step
from nanochat_jax.finetune import chat_samples, load_source, stage_meta, stage_optim
from nanochat_jax.model import flops_per_token, num_params
from nanochat_jax.progress import StepLogger, mfu
from nanochat_jax.sharding import make_mesh
from nanochat_jax.tasks.mixtures import mid_mixture
from nanochat_jax.tokenizer import token_bytes
from nanochat_jax.train import StopSignal, global_batch, init_train_state, make_train_step, resume_latest

WARMDOWN_RATIO = 0.2  # nanochat since b8076dd: constant, then linear decay to 0 over the last 20% (3a5e0bc ramped up)


def main(argv: list[str] | None = None) -> dict:
    init_distributed()
    cfg = load_config(argv)
    print0(to_toml(cfg))
    mesh = make_mesh(cfg.mesh)
    params, tokenizer, model_cfg, source_meta = load_source(cfg.mid.source, cfg, mesh)
    seq_len = model_cfg.sequence_len
    rows = cfg.mid.device_batch_size * mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.mid.total_batch_size % (rows * seq_len):
        raise ConfigError(f"mid.total_batch_size={cfg.mid.total_batch_size} is not a multiple of the tokens per "
                          f"micro-batch {rows * seq_len} (= {rows} rows x sequence_len {seq_len})")
    accum = cfg.mid.total_batch_size // (rows * seq_len)
    train_task, val_task = mid_mixture(cfg.mid.mixture, "train"), mid_mixture(cfg.mid.mixture, "val")
    if cfg.mid.num_iterations > 0:
        num_iterations = cfg.mid.num_iterations
    else:  # one pass over the mixture, from the average rendered length
        mean_len = mean_tokens_per_conversation(train_task, tokenizer)
        num_iterations = max(1, math.ceil(len(train_task) * mean_len / cfg.mid.total_batch_size))
        print0(f"one pass over {len(train_task):,} conversations of ~{mean_len:.0f} tokens: {num_iterations} steps")
    optim = stage_optim(cfg.optim, cfg.mid.init_lr_frac, warmup_ratio=0.0, warmdown_ratio=WARMDOWN_RATIO,
                        final_lr_frac=0.0, grad_clip=cfg.mid.grad_clip)
    n_params, flops = num_params(model_cfg), flops_per_token(model_cfg)
    info = device_info()
    print0(f"mid mixture '{cfg.mid.mixture}': {len(train_task):,} train / {len(val_task):,} val conversations | "
           f"{rows} rows x {seq_len} tokens x {accum} micro-steps = {cfg.mid.total_batch_size:,} tokens/step | "
           f"{num_iterations} steps | params {n_params:,}")

    graphdef, optimizer, state, shardings = init_train_state(model_cfg, optim, num_iterations, mesh, cfg.train.seed,
                                                             params=params)
    del params
    train_step = make_train_step(graphdef, optimizer, shardings, mesh, num_iterations, optim)
    bpb_step = make_bpb_step(graphdef)
    tb = jnp.asarray(token_bytes(tokenizer))
    val_iter = PackedConversations(val_task, tokenizer, rows, seq_len)
    val_batches = []
    for _ in range(max(1, cfg.mid.eval_tokens // (rows * seq_len))):
        batch = global_batch([next(val_iter)], mesh)
        val_batches.append((batch["inputs"][0], batch["targets"][0]))
    train_iter = PackedConversations(train_task, tokenizer, rows, seq_len)
    out_dir = checkpoint_dir("mid", model_cfg.depth)
    ckpt = Checkpointer(out_dir, keep=cfg.train.keep_checkpoints, fresh=not cfg.train.resume)

    start = 0
    if cfg.train.resume:
        state, start = resume_latest(ckpt, state, shardings, train_iter, num_iterations, model_cfg,
                                     source_meta.get("tokenizer"))

    peak = peak_flops_per_device(compute_dtype=model_cfg.compute_dtype)
    data_state = train_iter.get_state()
    batch = global_batch([next(train_iter) for _ in range(accum)], mesh)
    progress = StepLogger("mid", num_iterations, start, flops_per_token=flops, peak_flops=peak,
                          num_devices=info["num_devices"], append=cfg.train.resume)
    val_bpb = None
    min_val_bpb = min((r["val_bpb"] for r in progress.kept if "val_bpb" in r), default=float("inf"))
    tokens_since = 0
    stop = StopSignal()
    for step in range(start, num_iterations + 1):
        last = step == num_iterations
        with progress.paused():  # evals, samples and checkpoints do not count in tokens/s and MFU
            if (step > start and (last or (cfg.train.checkpoint_every > 0 and step % cfg.train.checkpoint_every == 0))
                    or (stop.requested and ckpt.latest_step() != step)):
                ckpt.save(step, state.params, state.opt_state, data_state,  # before the evaluation (base_train.py)
                          stage_meta("mid", step, cfg, model_cfg, source_meta), wait=last)
            if stop.requested:
                progress.close()
                stop.exit(ckpt, step)
            if last or (cfg.mid.eval_every > 0 and step % cfg.mid.eval_every == 0):
                val_bpb = evaluate_bpb(bpb_step, state.params, val_batches, tb)
                min_val_bpb = min(min_val_bpb, val_bpb)  # nanochat's report line
                progress.eval({"step": step, "val_bpb": val_bpb}, f"step {step:5d} | val bpb {val_bpb:.4f}")
        if last:
            break
        state, metrics = train_step(state, batch)
        data_state = train_iter.get_state()
        batch = global_batch([next(train_iter) for _ in range(accum)], mesh)
        tokens_since += cfg.mid.total_batch_size
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == num_iterations:
            m = jax.device_get(metrics)
            progress.log(step + 1, m["loss"], tokens_since, grad_norm=m["grad_norm"],
                         lr_multiplier=m["lr_multiplier"])
            tokens_since = 0
    stop.close()
    progress.close()
    ckpt.close()
    wall, train_seconds = progress.elapsed, progress.train_seconds  # the run's; this session's without evals
    samples = chat_samples(graphdef, state.params, tokenizer)
    for s in samples:
        print0(f"  sample: {s!r}")
    tokens_per_sec = (num_iterations - start) * cfg.mid.total_batch_size / train_seconds
    summary = {
        "stage": "mid", "run": cfg.run, "mixture": cfg.mid.mixture, "source": cfg.mid.source, "params": n_params,
        "steps": num_iterations, "tokens": num_iterations * cfg.mid.total_batch_size,
        "train_conversations": len(train_task), "epochs": train_iter.progress, "wall_time_s": wall,
        "tokens_per_sec": tokens_per_sec, "mfu": mfu(flops, tokens_per_sec, peak, info["num_devices"]),
        "val_bpb": val_bpb, "min_val_bpb": min_val_bpb, "samples": samples, "device": info, "mesh": dict(mesh.shape),
        "checkpoint": str(out_dir / str(num_iterations)),
    }
    if is_main_process():
        (artifacts_dir("report") / "mid_train.json").write_text(json.dumps(summary, indent=2))
    print0(f"done: {num_iterations} steps in {wall / 60:.1f} min | val bpb {val_bpb:.4f} | {tokens_per_sec:,.0f} tok/s "
           "in this session, compilation included")
    return summary


if __name__ == "__main__":
    run_script(main)
