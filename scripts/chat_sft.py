"""Supervised fine-tuning: one padded conversation per row, loss only on the assistant's tokens.

    python scripts/chat_sft.py --config configs/cpu_tiny.toml [--sft.mixture=cpu --sft.num_iterations=60 ...]

Starts from the latest [sft] source checkpoint (architecture from its metadata) with a fresh optimizer at
[optim] learning rates x sft.init_lr_frac, decaying linearly to 0 over the run (no Muon momentum warm-up).
sft.target_examples_per_step conversations per step (gradient accumulation over micro-batches of
sft.device_batch_size per device). Every sft.eval_every steps: mean validation loss over sft.eval_steps
micro-batches; every sft.eval_metrics_every steps (and at the end): quick accuracies on checkable tasks.
[train] resume / checkpoint_every / keep_checkpoints / log_every / seed apply here too.
Writes <home>/checkpoints/sft/d<depth>/ and <home>/report/sft_train.{jsonl,json}.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from flax import nnx

from nanochat_jax.chat_data import SFTBatches
from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir
from nanochat_jax.common import (artifacts_dir, device_info, init_distributed, is_main_process,
                                 peak_flops_per_device, print0, run_script)
from nanochat_jax.config import ConfigError, load_config, to_toml
from nanochat_jax.finetune import chat_samples, load_source, stage_meta, stage_optim
from nanochat_jax.model import flops_per_token, num_params
from nanochat_jax.progress import StepLogger
from nanochat_jax.sharding import eval_mesh, make_mesh, replicated_on
from nanochat_jax.tasks.base import TaskDataError
from nanochat_jax.tasks.mixtures import cpu_eval_tasks, sft_mixture
from nanochat_jax.train import StopSignal, global_batch, init_train_state, make_train_step, resume_latest

CPU_METRIC_PROBLEMS = 32  # per task, cpu mixture
CPU_METRIC_TOKENS = 96


def quick_metrics(mixture: str, graphdef, params, tokenizer, mesh, batch_size: int) -> dict[str, float]:
    """Accuracies on a few checkable tasks: the cpu mixture's generated test tasks, or nanochat's choice
    (MMLU and ARC-Easy from the letter logits, GSM8K and HumanEval sampled); unreachable hub tasks are skipped.
    mesh: an eval_mesh (each process scores its own problems); params are brought onto it."""
    from nanochat_jax.chat_eval import load_task, make_answer_logits, run_categorical_eval, run_generative_eval
    from nanochat_jax.engine import Engine

    model = nnx.merge(graphdef, replicated_on(params, mesh))
    engine = Engine(model, tokenizer, mesh=mesh)
    metrics = {}
    if mixture == "cpu":
        for name, task in cpu_eval_tasks(CPU_METRIC_PROBLEMS).items():
            passed, total = run_generative_eval(task, tokenizer, engine, max_new_tokens=CPU_METRIC_TOKENS,
                                                batch_size=batch_size)
            metrics[f"{name}_acc"] = passed / total
        return metrics
    answer_logits = make_answer_logits(model, mesh)
    for key, name, kind, limit in (("mmlu_acc", "MMLU", "categorical", 1024), ("arc_easy_acc", "ARC-Easy", "categorical", 1024),
                                   ("gsm8k_acc", "GSM8K", "generative", 64), ("humaneval_acc", "HumanEval", "generative", 64)):
        try:
            task = load_task(name)
        except TaskDataError as e:
            print0(f"quick metrics: skipping {name}: {e}")
            continue
        if kind == "categorical":
            passed, total = run_categorical_eval(task, tokenizer, answer_logits, batch_size=2 * batch_size,
                                                 max_problems=limit)
        else:
            passed, total = run_generative_eval(task, tokenizer, engine, max_problems=limit, batch_size=batch_size)
        metrics[key] = passed / total
    return metrics


def main(argv: list[str] | None = None) -> dict:
    init_distributed()
    cfg = load_config(argv)
    print0(to_toml(cfg))
    mesh = make_mesh(cfg.mesh)
    metrics_mesh = eval_mesh(cfg.mesh)  # sampling: per process on its own devices when there are several
    params, tokenizer, model_cfg, source_meta = load_source(cfg.sft.source, cfg, mesh)
    seq_len = model_cfg.sequence_len
    rows = cfg.sft.device_batch_size * mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.sft.target_examples_per_step % rows:
        raise ConfigError(f"sft.target_examples_per_step={cfg.sft.target_examples_per_step} is not a multiple of the "
                          f"{rows} conversations per micro-batch (sft.device_batch_size x batch-sharded devices)")
    accum = cfg.sft.target_examples_per_step // rows
    train_task, val_task = sft_mixture(cfg.sft.mixture, "train"), sft_mixture(cfg.sft.mixture, "val")
    num_iterations = cfg.sft.num_iterations
    if num_iterations <= 0:
        num_iterations = max(1, len(train_task) // cfg.sft.target_examples_per_step * cfg.sft.num_epochs)
    optim = stage_optim(cfg.optim, cfg.sft.init_lr_frac, warmup_ratio=0.0, warmdown_ratio=1.0, final_lr_frac=0.0,
                        muon_momentum_start=cfg.optim.muon_momentum, grad_clip=cfg.sft.grad_clip)
    info = device_info()
    print0(f"sft mixture '{cfg.sft.mixture}': {len(train_task):,} train / {len(val_task):,} val conversations | "
           f"{rows} rows x {accum} micro-steps = {cfg.sft.target_examples_per_step} conversations/step (each "
           f"<= {seq_len} tokens) | {num_iterations} steps ({num_iterations * cfg.sft.target_examples_per_step / len(train_task):.2f} epochs)")

    graphdef, optimizer, state, shardings = init_train_state(model_cfg, optim, num_iterations, mesh, cfg.train.seed,
                                                             params=params)
    del params
    train_step = make_train_step(graphdef, optimizer, shardings, mesh, num_iterations, optim)
    loss_step = jax.jit(lambda p, inputs, targets: nnx.merge(graphdef, p).loss(inputs, targets))
    count_targets = jax.jit(lambda targets: jnp.sum(targets >= 0))
    val_iter = SFTBatches(val_task, tokenizer, rows, seq_len)
    val_batches = [global_batch(val_iter.next_step(1), mesh) for _ in range(cfg.sft.eval_steps)]
    train_iter = SFTBatches(train_task, tokenizer, rows, seq_len)
    out_dir = checkpoint_dir("sft", model_cfg.depth)
    ckpt = Checkpointer(out_dir, keep=cfg.train.keep_checkpoints, fresh=not cfg.train.resume)

    start = 0
    if cfg.train.resume:
        state, start = resume_latest(ckpt, state, shardings, train_iter, num_iterations, model_cfg,
                                     source_meta.get("tokenizer"))

    val_loss, metrics, train_loss = None, {}, None
    data_state = train_iter.get_state()
    batch = global_batch(train_iter.next_step(accum), mesh)
    progress = StepLogger("sft", num_iterations, start, flops_per_token=flops_per_token(model_cfg),
                          peak_flops=peak_flops_per_device(compute_dtype=model_cfg.compute_dtype), num_devices=info["num_devices"], append=cfg.train.resume)
    tokens_since = 0
    stop = StopSignal()
    for step in range(start, num_iterations + 1):
        last = step == num_iterations
        with progress.paused():  # evals, samples and checkpoints do not count in tokens/s and MFU
            if (step > start and (last or (cfg.train.checkpoint_every > 0 and step % cfg.train.checkpoint_every == 0))
                    or (stop.requested and ckpt.latest_step() != step)):
                ckpt.save(step, state.params, state.opt_state, data_state,  # before the evaluation (base_train.py)
                          stage_meta("sft", step, cfg, model_cfg, source_meta), wait=last)
            if stop.requested:
                progress.close()
                stop.exit(ckpt, step)
            if last or (cfg.sft.eval_every > 0 and step % cfg.sft.eval_every == 0):
                losses = [loss_step(state.params, b["inputs"][0], b["targets"][0]) for b in val_batches]
                val_loss = float(jnp.mean(jnp.stack(losses)))
                progress.eval({"step": step, "val_loss": val_loss}, f"step {step:5d} | val loss {val_loss:.4f}")
            if last or (cfg.sft.eval_metrics_every > 0 and step > 0 and step % cfg.sft.eval_metrics_every == 0):
                metrics = quick_metrics(cfg.sft.mixture, graphdef, state.params, tokenizer, metrics_mesh,
                                        cfg.sft.device_batch_size * 2)
                progress.eval({"step": step, **metrics},
                              f"step {step:5d} | " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if last:
            break
        supervised = count_targets(batch["targets"])
        tokens_since += batch["inputs"].size
        state, step_metrics = train_step(state, batch)
        data_state = train_iter.get_state()
        batch = global_batch(train_iter.next_step(accum), mesh)
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == num_iterations:
            m, supervised = jax.device_get((step_metrics, supervised))
            train_loss = float(m["loss"])
            progress.log(step + 1, m["loss"], tokens_since, grad_norm=m["grad_norm"],
                         lr_multiplier=m["lr_multiplier"], num_tokens=supervised)
            tokens_since = 0
    stop.close()
    progress.close()
    ckpt.close()
    wall = progress.elapsed
    samples = chat_samples(graphdef, state.params, tokenizer)
    for s in samples:
        print0(f"  sample: {s!r}")
    summary = {
        "stage": "sft", "run": cfg.run, "mixture": cfg.sft.mixture, "source": cfg.sft.source,
        "params": num_params(model_cfg), "steps": num_iterations, "train_conversations": len(train_task),
        "epochs": train_iter.epoch, "wall_time_s": wall, "train_loss": train_loss, "val_loss": val_loss, **metrics,
        "samples": samples, "device": info, "mesh": dict(mesh.shape), "checkpoint": str(out_dir / str(num_iterations)),
    }
    if is_main_process():
        (artifacts_dir("report") / "sft_train.json").write_text(json.dumps(summary, indent=2))
    print0(f"done: {num_iterations} steps in {wall / 60:.1f} min | val loss {val_loss:.4f}")
    return summary


if __name__ == "__main__":
    run_script(main)
