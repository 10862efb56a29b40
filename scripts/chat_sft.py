"""Supervised fine-tuning, loss only on the assistant's tokens.

    python scripts/chat_sft.py --config configs/cpu_tiny.toml [--sft.mixture=cpu --sft.num_iterations=60 ...]

Starts from the latest [sft] source checkpoint (architecture from its metadata) with an optimizer at [optim]
learning rates x sft.init_lr_frac. sft.recipe "first_release" (nanochat 3a5e0bc): one padded conversation
per row, sft.target_examples_per_step conversations per step, LR decaying linearly to 0 over the run, no Muon
momentum warm-up. "master" (nanochat master's one post-training stage, from the base model): conversations packed
best fit into full rows (chat_data.BestFitConversations), sft.total_batch_size tokens per step, LR constant then
decaying to 0 over the last half, Muon momentum 0.85 -> 0.95 over 300 steps, and the optimizer's moments taken
from the source checkpoint (finetune.warm_start; not on --train.resume). Both accumulate gradients over
micro-batches of sft.device_batch_size rows per device. Every sft.eval_every steps: mean validation loss over
sft.eval_steps micro-batches; every sft.eval_metrics_every steps (and at the end): quick accuracies on checkable
tasks. [train] resume / checkpoint_every / keep_checkpoints / log_every apply here too (seed does not: the model
comes from the source checkpoint and the mixture's order is fixed).
Writes <home>/checkpoints/sft/d<depth>/ and <home>/report/sft_train.{jsonl,json}.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from nanochat_jax.chat_data import BestFitConversations, SFTBatches, bestfit_rows_per_epoch
from nanochat_jax.checkpoint import checkpoint_dir
from nanochat_jax.common import device_info, print0, run_script
from nanochat_jax.config import load_config, to_toml
from nanochat_jax.distributed import eval_mesh, init_distributed, replicated_on
from nanochat_jax.finetune import chat_samples, load_source, stage_optim, warm_start
from nanochat_jax.model import flops_per_token, num_params
from nanochat_jax.progress import save_summary
from nanochat_jax.sharding import make_mesh
from nanochat_jax.tasks.base import TaskDataError
from nanochat_jax.tasks.mixtures import cpu_eval_tasks, sft_mixture
from nanochat_jax.train import TrainRun, global_batch, rows_and_accum, run_stage

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


def sft_evals(cfg, run: TrainRun, tokenizer, val_batches: list[dict]):
    """run_stage's hook: the mean validation loss every sft.eval_every steps, quick task accuracies every
    sft.eval_metrics_every steps, both at the end. Returns (hook, latest results)."""
    loss_step = jax.jit(lambda p, inputs, targets: nnx.merge(run.graphdef, p).loss(inputs, targets))
    metrics_mesh = eval_mesh(cfg.mesh)  # sampling: per process on its own devices when there are several
    latest = {"val_loss": None, "metrics": {}}

    def evaluate(step: int, last: bool, progress) -> None:
        if last or (cfg.sft.eval_every > 0 and step % cfg.sft.eval_every == 0):
            losses = [loss_step(run.params, b["inputs"][0], b["targets"][0]) for b in val_batches]
            val_loss = latest["val_loss"] = float(jnp.mean(jnp.stack(losses)))
            progress.eval({"step": step, "val_loss": val_loss}, f"step {step:5d} | val loss {val_loss:.4f}")
        if last or (cfg.sft.eval_metrics_every > 0 and step > 0 and step % cfg.sft.eval_metrics_every == 0):
            metrics = latest["metrics"] = quick_metrics(cfg.sft.mixture, run.graphdef, run.params, tokenizer,
                                                        metrics_mesh, cfg.sft.device_batch_size * 2)
            progress.eval({"step": step, **metrics},
                          f"step {step:5d} | " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    return evaluate, latest


def sft_data(cfg, tokenizer, seq_len: int, mesh):
    """(train task, train iterator, next_step() -> the step's global batch, validation micro-batches,
    num_iterations, a line describing the batches) for sft.recipe."""
    sft = cfg.sft
    train_task, val_task = sft_mixture(sft.mixture, "train"), sft_mixture(sft.mixture, "val")
    if sft.recipe == "master":
        rows, accum = rows_and_accum(sft.device_batch_size, sft.total_batch_size, seq_len, mesh, "sft.total_batch_size")
        train_iter, val_iter = (BestFitConversations(t, tokenizer, rows, seq_len) for t in (train_task, val_task))
        next_step = lambda: global_batch([next(train_iter) for _ in range(accum)], mesh)  # noqa: E731
        val_batches = [global_batch([next(val_iter)], mesh) for _ in range(sft.eval_steps)]
        num_iterations = sft.num_iterations
        if num_iterations <= 0:  # num_epochs passes, packed as the run packs them (master: until consumed)
            rows_per_epoch = bestfit_rows_per_epoch(train_task, tokenizer, seq_len)
            num_iterations = max(1, math.ceil(rows_per_epoch * seq_len * sft.num_epochs / sft.total_batch_size))
        batches = (f"{rows} rows x {seq_len} tokens x {accum} micro-steps = {sft.total_batch_size:,} tokens/step, "
                   f"conversations packed best fit | {num_iterations} steps")
    else:
        rows, accum = rows_and_accum(sft.device_batch_size, sft.target_examples_per_step, 1, mesh,
                                     "sft.target_examples_per_step")
        train_iter, val_iter = (SFTBatches(t, tokenizer, rows, seq_len) for t in (train_task, val_task))
        next_step = lambda: global_batch(train_iter.next_step(accum), mesh)  # noqa: E731
        val_batches = [global_batch(val_iter.next_step(1), mesh) for _ in range(sft.eval_steps)]
        num_iterations = sft.num_iterations
        if num_iterations <= 0:
            num_iterations = max(1, len(train_task) // sft.target_examples_per_step * sft.num_epochs)
        epochs = num_iterations * sft.target_examples_per_step / len(train_task)
        batches = (f"{rows} rows x {accum} micro-steps = {sft.target_examples_per_step} conversations/step (each "
                   f"<= {seq_len} tokens) | {num_iterations} steps ({epochs:.2f} epochs)")
    print0(f"sft mixture '{sft.mixture}': {len(train_task):,} train / {len(val_task):,} val conversations | {batches}")
    return train_task, train_iter, next_step, val_batches, num_iterations


def main(argv: list[str] | None = None) -> dict:
    init_distributed()
    cfg = load_config(argv)
    print0(to_toml(cfg))
    mesh = make_mesh(cfg.mesh)
    params, tokenizer, model_cfg, source_meta = load_source(cfg.sft.source, cfg, mesh)
    train_task, train_iter, next_step, val_batches, num_iterations = sft_data(cfg, tokenizer,
                                                                              model_cfg.sequence_len, mesh)
    if cfg.sft.recipe == "master":
        schedule = dict(warmdown_ratio=0.5, muon_momentum_start=0.85, muon_momentum=0.95,
                        muon_momentum_warmup_steps=300)
    else:
        schedule = dict(warmdown_ratio=1.0, muon_momentum_start=cfg.optim.muon_momentum)
    optim = stage_optim(cfg.optim, cfg.sft.init_lr_frac, final_lr_frac=0.0, grad_clip=cfg.sft.grad_clip, **schedule)

    run = TrainRun(model_cfg, optim, num_iterations, mesh, cfg.train.seed, params=params)
    del params
    if cfg.sft.recipe == "master" and not cfg.train.resume:
        warm_start(run, cfg.sft.source, source_meta)  # (a resume restores this run's own optimizer state)
    evaluate, latest = sft_evals(cfg, run, tokenizer, val_batches)
    progress = run_stage(run, "sft", cfg, train_iter, next_step, evaluate, flops_per_token(model_cfg), source_meta)

    samples = chat_samples(run.graphdef, run.params, tokenizer)
    summary = save_summary("sft_train", {
        "stage": "sft", "run": cfg.run, "recipe": cfg.sft.recipe, "mixture": cfg.sft.mixture,
        "source": cfg.sft.source, "params": num_params(model_cfg), **progress.run_record(),
        "train_conversations": len(train_task), "epochs": train_iter.epoch, "train_loss": progress.last.get("loss"),
        "val_loss": latest["val_loss"], **latest["metrics"], "samples": samples, "device": device_info(),
        "mesh": dict(mesh.shape), "checkpoint": str(checkpoint_dir("sft", model_cfg.depth) / str(num_iterations))})
    print0(f"done: {num_iterations} steps in {progress.elapsed / 60:.1f} min | val loss {latest['val_loss']:.4f}")
    return summary


if __name__ == "__main__":
    run_script(main)
