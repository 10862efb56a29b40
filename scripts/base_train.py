"""Base pretraining: config -> mesh, model, optimizer -> packed batches -> jit train step -> checkpoints, bpb, samples.

    python scripts/base_train.py --config configs/cpu_tiny.toml [--model.depth=6 --train.resume=true ...]

Logs loss (EMA-smoothed), lr multiplier, tokens/s, MFU, elapsed and ETA; validation bits per byte every
train.eval_every steps and, as nanochat does, a CORE estimate every train.core_every steps (on
train.core_max_per_task items per task; needs the eval bundle, downloaded at start). Writes metrics to
<home>/report/base_train.jsonl and a summary to <home>/report/base_train.json for the report.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
from flax import nnx

from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir
from nanochat_jax.common import (artifacts_dir, check_same_on_all_processes, device_info, init_distributed,
                                 is_main_process, peak_flops_per_device, print0, run_script)
from nanochat_jax.config import Config, ConfigError, TrainConfig, load_config, to_toml
from nanochat_jax.data import check_enough_chunks, make_batch_iterator, make_source
from nanochat_jax.evaluation import core_bundle, core_estimate, evaluate_bpb, make_bpb_step, sample_texts, split_batches
from nanochat_jax.finetune import stage_meta
from nanochat_jax.model import flops_per_token, num_params
from nanochat_jax.optim import depth_scaling, scaling_param_count
from nanochat_jax.progress import StepLogger, mfu
from nanochat_jax.sharding import eval_mesh, make_mesh
from nanochat_jax.tokenizer import load_tokenizer, token_bytes, tokenizer_fingerprint
from nanochat_jax.train import (StopSignal, abstract_model, global_batch, init_train_state, make_train_step,
                                resume_latest)

def training_horizon(train: TrainConfig, n_params: int, flops: float) -> int:
    """Steps from an explicit count, a FLOPs budget, or a tokens:params ratio (in that order)."""
    if train.num_iterations > 0:
        return train.num_iterations
    if train.target_flops > 0:
        return max(1, round(train.target_flops / (flops * train.total_batch_size)))
    return max(1, int(train.target_param_data_ratio * n_params) // train.total_batch_size)


def scaling_params(model_cfg) -> int:
    """nanochat master's scaling-law parameter count (blocks + lm_head) of a model config, without allocating."""
    return scaling_param_count(nnx.to_pure_dict(abstract_model(model_cfg)[1]))


def grad_accum_steps(cfg: Config, rows_per_micro: int) -> int:
    tokens_per_micro = rows_per_micro * cfg.model.sequence_len
    if cfg.train.total_batch_size % tokens_per_micro:
        raise ConfigError(
            f"train.total_batch_size={cfg.train.total_batch_size} is not a multiple of the tokens per micro-batch "
            f"{tokens_per_micro} (= device_batch_size {cfg.train.device_batch_size} x batch-sharded devices "
            f"{rows_per_micro // cfg.train.device_batch_size} x sequence_len {cfg.model.sequence_len})")
    return cfg.train.total_batch_size // tokens_per_micro


def main(argv: list[str] | None = None) -> dict:
    init_distributed()  # multi-host: before anything touches the devices
    cfg = load_config(argv)
    tokenizer = load_tokenizer()
    cfg.model.vocab_size = tokenizer.vocab_size
    print0(to_toml(cfg))
    optim_cfg, horizon_params = cfg.optim, None
    if cfg.optim.reference_depth:  # nanochat master: batch, learning rates, weight decay and horizon from d_ref
        scaling = depth_scaling(cfg.optim, cfg.train, scaling_params(cfg.model),
                                scaling_params(dataclasses.replace(cfg.model, depth=cfg.optim.reference_depth)))
        print0(scaling.summary(cfg.model.depth, cfg.optim.reference_depth))
        cfg.train.total_batch_size = scaling.total_batch_size  # resolved (a rerun derives the same); [optim] kept
        optim_cfg, horizon_params = scaling.optim, scaling.scaling_params
    mesh = make_mesh(cfg.mesh)
    rows = cfg.train.device_batch_size * mesh.shape["data"] * mesh.shape["fsdp"]  # global rows per micro-batch
    accum = grad_accum_steps(cfg, rows)
    n_params, flops = num_params(cfg.model), flops_per_token(cfg.model)
    if jax.default_backend() == "cpu" and n_params > 100e6:
        print0(f"WARNING: a {n_params / 1e6:.0f}M-parameter model on CPU will take days; the defaults are nanochat's "
               "d20 speedrun sizes, and --config configs/cpu_tiny.toml is the CPU configuration")
    num_iterations = training_horizon(cfg.train, horizon_params or n_params, flops)
    total_tokens = num_iterations * cfg.train.total_batch_size
    info = device_info()
    print0(f"devices: {info['num_devices']} x {info['device_kind']} | mesh {dict(mesh.shape)} | "
           f"params {n_params:,} | FLOPs/token {flops:.3e}")
    print0(f"batch: {rows} rows x {cfg.model.sequence_len} tokens x {accum} micro-steps = "
           f"{cfg.train.total_batch_size:,} tokens/step | {num_iterations:,} steps | {total_tokens:,} tokens "
           f"({total_tokens / n_params:.1f} tokens/param) | {flops * total_tokens:.3e} FLOPs")

    graphdef, optimizer, state, shardings = init_train_state(cfg.model, optim_cfg, num_iterations, mesh, cfg.train.seed)
    train_step = make_train_step(graphdef, optimizer, shardings, mesh, num_iterations, optim_cfg)
    bpb_step = make_bpb_step(graphdef)
    tb = jnp.asarray(token_bytes(tokenizer))
    # everything that can refuse the run comes before the Checkpointer, which sets a previous run aside
    train_source, val_source = make_source(cfg.data, "train"), make_source(cfg.data, "val")
    check_same_on_all_processes({"tokenizer fingerprint": tokenizer_fingerprint(),  # (all processes, or none, fail)
                                 "training data chunks": len(train_source.chunks),
                                 "validation data chunks": len(val_source.chunks)})
    for split, source in (("train", train_source), ("val", val_source)):
        check_enough_chunks(source, split)  # an unusable split fails now, not after the training
    bundle = core_bundle(cfg)  # downloaded now (once), not in the middle of the run
    core_mesh = eval_mesh(cfg.mesh) if bundle else None
    out_dir = checkpoint_dir("base", cfg.model.depth)
    ckpt = Checkpointer(out_dir, keep=cfg.train.keep_checkpoints, fresh=not cfg.train.resume)
    train_iter = make_batch_iterator(train_source, tokenizer, batch_rows=rows,
                                     seq_len=cfg.model.sequence_len, seed=cfg.train.seed,
                                     num_threads=cfg.data.tokenizer_threads, prefetch=cfg.data.prefetch)
    report_dir = artifacts_dir("report")

    start = 0
    if cfg.train.resume:
        state, start = resume_latest(ckpt, state, shardings, train_iter, num_iterations, cfg.model,
                                     seed=cfg.train.seed)
    if is_main_process():  # after a resume succeeded: a refused one leaves the run's config.toml as it was
        (out_dir / "config.toml").write_text(to_toml(cfg))

    peak = peak_flops_per_device(compute_dtype=cfg.model.compute_dtype)
    val_bpb, val_batches, core = None, [], None
    data_state = train_iter.get_state()  # the iterator state from which the batch of step `start` comes
    batch = global_batch([next(train_iter) for _ in range(accum)], mesh)
    progress = StepLogger("base", num_iterations, start, flops_per_token=flops, peak_flops=peak,
                          num_devices=info["num_devices"], append=cfg.train.resume, not_redone=("core_metric",))
    tokens_since = 0
    stop = StopSignal()
    for step in range(start, num_iterations + 1):
        last = step == num_iterations
        with progress.paused():  # evals, samples and checkpoints do not count in tokens/s and MFU
            # the checkpoint first: a failure in the evaluation or sampling below cannot lose the trained model
            if (last and step > start) or (cfg.train.checkpoint_every > 0 and step % cfg.train.checkpoint_every == 0
                                           and step > start) or (stop.requested and ckpt.latest_step() != step):
                ckpt.save(step, state.params, state.opt_state, data_state, stage_meta("base", step, cfg, cfg.model, {}),
                          wait=last)
            if stop.requested:
                progress.close()
                stop.exit(ckpt, step)
            if last or (cfg.train.eval_every > 0 and step % cfg.train.eval_every == 0):
                val_batches = val_batches or split_batches(cfg, tokenizer, rows, mesh, "val")  # tokenized once
                val_bpb = evaluate_bpb(bpb_step, state.params, val_batches, tb)
                progress.eval({"step": step, "val_bpb": val_bpb}, f"step {step:5d} | val bpb {val_bpb:.4f}")
            if bundle and (last or (step > start and step % cfg.train.core_every == 0)):  # (not again on resume)
                core = core_estimate(graphdef, state.params, tokenizer, bundle, cfg, core_mesh)
                progress.eval({"step": step, "core_metric": core}, f"step {step:5d} | CORE estimate {core:.4f}")
            if last or (cfg.train.sample_every > 0 and step % cfg.train.sample_every == 0 and step > 0):
                samples = sample_texts(graphdef, state.params, tokenizer)
                for text in samples:
                    progress.write(f"  sample: {text!r}")
        if last:
            break

        state, metrics = train_step(state, batch)
        data_state = train_iter.get_state()  # before fetching: the batch of step+1 comes from here
        batch = global_batch([next(train_iter) for _ in range(accum)], mesh)  # overlaps the device's step
        tokens_since += cfg.train.total_batch_size
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == num_iterations:
            m = jax.device_get(metrics)  # the one host sync of the loop
            progress.log(step + 1, m["loss"], tokens_since, grad_norm=m["grad_norm"],
                         lr_multiplier=m["lr_multiplier"])
            tokens_since = 0
    stop.close()
    progress.close()
    ckpt.wait()
    ckpt.close()
    wall = progress.elapsed
    summary = {
        "stage": "base", "run": cfg.run, "params": n_params, "flops_per_token": flops, "steps": num_iterations,
        "tokens": total_tokens, "total_flops": flops * total_tokens, "wall_time_s": wall,
        "tokens_per_sec": (num_iterations - start) * cfg.train.total_batch_size / progress.train_seconds,
        "val_bpb": val_bpb, "core_metric_estimate": core, "samples": samples, "device": info, "mesh": dict(mesh.shape),
        "checkpoint": str(out_dir / str(num_iterations)),
    }
    summary["mfu"] = mfu(flops, summary["tokens_per_sec"], peak, info["num_devices"])
    if is_main_process():
        (report_dir / "base_train.json").write_text(json.dumps(summary, indent=2))
    print0(f"done: {num_iterations} steps in {wall / 60:.1f} min | val bpb {val_bpb:.4f} | "
           f"{summary['tokens_per_sec']:,.0f} tok/s in this session, compilation included")
    return summary


if __name__ == "__main__":
    run_script(main)
