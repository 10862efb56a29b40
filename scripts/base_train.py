"""Base pretraining: config -> mesh, model, optimizer -> packed batches -> jit train step -> checkpoints, bpb, samples.

    python scripts/base_train.py --config configs/cpu_tiny.toml [--model.depth=6 --train.resume=true ...]

Logs loss (EMA-smoothed), lr multiplier, tokens/s, MFU, elapsed and ETA; validation bits per byte every
train.eval_every steps and, as nanochat does, a CORE estimate every train.core_every steps (on
train.core_max_per_task items per task; needs the eval bundle, downloaded at start). Writes metrics to
<home>/report/base_train.jsonl and a summary to <home>/report/base_train.json for the report.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nanochat_jax.checkpoint import checkpoint_dir
from nanochat_jax.common import device_info, print0, run_script
from nanochat_jax.config import TrainConfig, load_config, to_toml
from nanochat_jax.data import check_enough_chunks, make_batch_iterator, make_source
from nanochat_jax.distributed import check_same_on_all_processes, eval_mesh, init_distributed
from nanochat_jax.evaluation import core_bundle, core_estimate, evaluate_bpb, make_bpb_step, sample_texts, split_batches
from nanochat_jax.model import flops_per_token, num_params
from nanochat_jax.progress import save_summary
from nanochat_jax.sharding import make_mesh
from nanochat_jax.tokenizer import load_tokenizer, token_bytes, tokenizer_fingerprint
from nanochat_jax.train import TrainRun, global_batch, resolve_depth_scaling, rows_and_accum, run_stage


def training_horizon(train: TrainConfig, n_params: int, flops: float) -> int:
    """Steps from an explicit count, a FLOPs budget, or a tokens:params ratio (in that order)."""
    if train.num_iterations > 0:
        return train.num_iterations
    if train.target_flops > 0:
        return max(1, round(train.target_flops / (flops * train.total_batch_size)))
    return max(1, int(train.target_param_data_ratio * n_params) // train.total_batch_size)


def base_evals(cfg, run: TrainRun, tokenizer, rows: int, bundle):
    """run_stage's hook: validation bpb, CORE estimates and samples, each at its cadence and at the end.
    Returns (hook, latest results)."""
    bpb_step, tb = make_bpb_step(run.graphdef), jnp.asarray(token_bytes(tokenizer))
    core_mesh = eval_mesh(cfg.mesh) if bundle else None
    latest, val_batches, train = {"val_bpb": None, "core_metric_estimate": None, "samples": []}, [], cfg.train

    def evaluate(step: int, last: bool, progress) -> None:
        if last or (train.eval_every > 0 and step % train.eval_every == 0):
            val_batches[:] = val_batches or split_batches(cfg, tokenizer, rows, run.mesh, "val")  # tokenized once
            latest["val_bpb"] = evaluate_bpb(bpb_step, run.params, val_batches, tb)
            progress.eval({"step": step, "val_bpb": latest["val_bpb"]}, f"step {step:5d} | val bpb {latest['val_bpb']:.4f}")
        if bundle and step > 0 and (last or step % train.core_every == 0):
            core = latest["core_metric_estimate"] = core_estimate(run.graphdef, run.params, tokenizer, bundle, cfg,
                                                                  core_mesh)
            progress.eval({"step": step, "core_metric": core}, f"step {step:5d} | CORE estimate {core:.4f}")
        if last or (train.sample_every > 0 and step % train.sample_every == 0 and step > 0):
            latest["samples"] = sample_texts(run.graphdef, run.params, tokenizer)
            for text in latest["samples"]:
                progress.write(f"  sample: {text!r}")

    return evaluate, latest


def main(argv: list[str] | None = None) -> dict:
    init_distributed()  # multi-host: before anything touches the devices
    cfg = load_config(argv)
    tokenizer = load_tokenizer()
    cfg.model.vocab_size = tokenizer.vocab_size
    print0(to_toml(cfg))
    optim_cfg, horizon_params = resolve_depth_scaling(cfg)  # nanochat master's, with optim.reference_depth
    mesh = make_mesh(cfg.mesh)
    rows, accum = rows_and_accum(cfg.train.device_batch_size, cfg.train.total_batch_size, cfg.model.sequence_len,
                                 mesh, "train.total_batch_size")
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

    run = TrainRun(cfg.model, optim_cfg, num_iterations, mesh, cfg.train.seed, fp8=cfg.train.fp8)
    # everything that can refuse the run comes before run_stage, which sets a previous run's checkpoints aside
    train_source, val_source = make_source(cfg.data, "train"), make_source(cfg.data, "val")
    check_same_on_all_processes({"tokenizer fingerprint": tokenizer_fingerprint(),  # (all processes, or none, fail)
                                 "training data chunks": len(train_source.chunks),
                                 "validation data chunks": len(val_source.chunks)})
    for split, source in (("train", train_source), ("val", val_source)):
        check_enough_chunks(source, split)  # an unusable split fails now, not after the training
    evaluate, latest = base_evals(cfg, run, tokenizer, rows, core_bundle(cfg))  # (the bundle: downloaded now, once)
    train_iter = make_batch_iterator(train_source, tokenizer, batch_rows=rows, seq_len=cfg.model.sequence_len,
                                     packing=cfg.data.packing, seed=cfg.train.seed, num_threads=cfg.data.tokenizer_threads,
                                     prefetch=cfg.data.prefetch)
    progress = run_stage(run, "base", cfg, train_iter, lambda: global_batch([next(train_iter) for _ in range(accum)], mesh),
                         evaluate, flops, seed=cfg.train.seed)

    summary = save_summary("base_train", {
        "stage": "base", "run": cfg.run, "params": n_params, "flops_per_token": flops, "tokens": total_tokens,
        "total_flops": flops * total_tokens, **progress.run_record(cfg.train.total_batch_size),
        "val_bpb": latest["val_bpb"], "core_metric_estimate": latest["core_metric_estimate"],
        "samples": latest["samples"], "device": info, "mesh": dict(mesh.shape),
        **({"fp8_layers": run.fp8_layers} if run.fp8_layers else {}),  # (train.fp8, where it applied)
        "checkpoint": str(checkpoint_dir("base", cfg.model.depth) / str(num_iterations))})
    print0(f"done: {num_iterations} steps in {progress.elapsed / 60:.1f} min | val bpb {latest['val_bpb']:.4f} | "
           f"{summary['tokens_per_sec']:,.0f} tok/s in this session, compilation included")
    return summary


if __name__ == "__main__":
    run_script(main)
