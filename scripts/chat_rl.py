"""Chat RL: nanochat's simplified GRPO (on-policy REINFORCE with group-mean baselines) on GSM8K or, for a
CPU run (rl.task=cpu), on the corpus world's calculator word problems (tasks/corpuschat.py WordProblems, the
same format the cpu SFT mixture teaches); see nanochat_jax/rl.py for the objective.

    python scripts/chat_rl.py [--config FILE.toml] [--rl.task=cpu --rl.num_iterations=50 ...]

Each step samples rl.num_samples completions for each of rl.examples_per_step training questions (split
over processes), rewards them, and takes one optimizer step on the token-level policy-gradient loss in
micro-batches of rl.device_batch_size rows per device. The learning rates are the [optim] ones times
rl.init_lr_frac, decaying linearly to 0. Every rl.eval_every steps (and at the end) pass@k, k = 1 ..
device_batch_size, is measured on rl.eval_examples test questions with temperature 1.0. Checkpoints (with the
optimizer state) go to <home>/checkpoints/rl/d<depth> every rl.save_every steps and at the end; metrics
to <home>/report/rl_train.jsonl (MFU: the training passes' FLOPs over the whole step's time,
rollouts included) and a summary to <home>/report/rl_train.json. --train.resume=true continues
from the latest checkpoint exactly: a step's questions and sampling seeds depend only on the step number.
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np
from flax import nnx

from nanochat_jax.checkpoint import checkpoint_meta
from nanochat_jax.common import device_info, peak_flops_per_device, print0, run_script
from nanochat_jax.config import load_config, to_toml
from nanochat_jax.distributed import (eval_mesh, init_distributed, max_over_processes, replicated_on,
                                      sum_over_processes)
from nanochat_jax.engine import Engine, bucket
from nanochat_jax.finetune import load_source, stage_optim
from nanochat_jax.model import flops_per_token
from nanochat_jax.progress import StepLogger, save_summary
from nanochat_jax.rl import group_advantages, micro_batches, pass_at_k, pg_objective, rl_batch, rollout
from nanochat_jax.sharding import batch_shards, make_mesh
from nanochat_jax.tasks import TaskDataError
from nanochat_jax.train import StopSignal, TrainRun, global_batch, open_checkpoints
from nanochat_jax.tokenizer import tokenizer_fingerprint


CPU_TRAIN_SIZE, CPU_TEST_SIZE = 8000, 1000  # generated word problems for task "cpu" (GSM8K train has 7473)


def load_tasks(name: str):
    """(train, test) tasks for [rl] task: GSM8K, or "cpu": the corpus world's calculator word problems."""
    if name == "cpu":
        from nanochat_jax.tasks.corpuschat import WordProblems

        return WordProblems(CPU_TRAIN_SIZE, "train"), WordProblems(CPU_TEST_SIZE, "test")
    from nanochat_jax.tasks import GSM8K

    try:
        return GSM8K("main", "train"), GSM8K("main", "test")
    except TaskDataError as e:
        raise TaskDataError(f"{e} (--rl.task=cpu needs no download)") from None


def seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0]) & 0x3FFFFFFF


def step_shape(rl, mesh, num_questions: int) -> tuple[int, int]:
    """(rows per micro-batch on this process, steps): rl.examples_per_step questions split over the processes."""
    nproc = jax.process_count()
    if rl.examples_per_step % nproc:
        raise SystemExit(f"chat_rl: rl.examples_per_step={rl.examples_per_step} must be a multiple of the "
                         f"{nproc} processes")
    rows_local = rl.device_batch_size * batch_shards(mesh) // nproc
    num_iterations = rl.num_iterations if rl.num_iterations > 0 else \
        max(1, num_questions // rl.examples_per_step * rl.num_epochs)
    print0(f"{rl.examples_per_step} questions x {rl.num_samples} samples per step | "
           f"{-(-rl.examples_per_step // nproc * rl.num_samples // rows_local)} micro-batches of "
           f"{rows_local * nproc} rows | {num_iterations} steps")
    return rows_local, num_iterations


def policy(run: TrainRun, tokenizer, gen_mesh) -> Engine:
    """The current parameters as an Engine on this process's sampling mesh."""
    return Engine(nnx.merge(run.graphdef, replicated_on(run.params, gen_mesh)), tokenizer, mesh=gen_mesh)


def evaluate(rl, seed: int, engine: Engine, tokenizer, test_task, step: int, rows_local: int, logger) -> dict:
    """pass@k, k = 1 .. device_batch_size, on rl.eval_examples test questions (split over processes), and the
    first two completions as "question -> completion"."""
    nproc, pid = jax.process_count(), jax.process_index()
    indices = range(pid, min(rl.eval_examples, len(test_task)), nproc)
    sequences, _, rewards = rollout(engine, tokenizer, test_task, indices, rl.device_batch_size, rl.max_new_tokens,
                                    1.0, rl.top_k, seed_for(seed, step, pid, 1), max_rows=rows_local)
    counts = sum_over_processes(np.concatenate([pass_at_k(rewards), [len(rewards)]]).astype(np.int64))
    passk = {f"pass@{k + 1}": float(c) / max(1, counts[-1]) for k, c in enumerate(counts[:-1])}
    logger.eval({"step": step, **passk}, f"step {step:5d} | " + ", ".join(f"{k} {v:.4f}" for k, v in passk.items()))
    samples = []
    for j, sequence in enumerate(sequences[:2]):
        conversation = test_task[indices[j // rl.device_batch_size]]
        prompt_len = len(tokenizer.render_for_completion(conversation))
        samples.append(f"{conversation['messages'][0]['content']} -> {tokenizer.decode(sequence[prompt_len:])}")
    return {"passk": passk, "samples": samples}


def train_step(rl, seed: int, run: TrainRun, engine: Engine, tokenizer, train_task, step: int, rows_local: int) -> dict:
    """One step: sample num_samples completions of this process's examples_per_step / processes questions,
    reward them, one optimizer step on the policy-gradient loss. Returns what the log records."""
    nproc, pid = jax.process_count(), jax.process_index()
    t0 = time.perf_counter()
    first = step * rl.examples_per_step + pid
    indices = [(first + j * nproc) % len(train_task) for j in range(rl.examples_per_step // nproc)]
    sequences, masks, rewards = rollout(engine, tokenizer, train_task, indices, rl.num_samples, rl.max_new_tokens,
                                        rl.temperature, rl.top_k, seed_for(seed, step, pid), max_rows=rows_local)
    pad_id = tokenizer.encode_special("<|assistant_end|>")  # never a target: only fills rows
    seq_len = bucket(max_over_processes(max(len(s) for s in sequences)) - 1)
    batch = rl_batch(sequences, masks, group_advantages(rewards), pad_id, seq_len)
    t1 = time.perf_counter()
    m = jax.device_get(run.step(global_batch(micro_batches(batch, rows_local, pad_id), run.mesh)))
    t2 = time.perf_counter()
    reward, length, tokens = sum_over_processes(
        np.array([rewards.sum(), sum(map(len, sequences)), (batch["targets"] >= 0).sum()], np.float64))
    rows = rl.examples_per_step * rl.num_samples
    return {"loss": m["loss"], "tokens": int(length), "reward": reward / rows, "seq_len": length / rows,
            "sampled_tokens": tokens, "lr_multiplier": m["lr_multiplier"], "grad_norm": m["grad_norm"],
            "rollout_s": t1 - t0, "train_s": t2 - t1}


def main(argv: list[str] | None = None) -> dict:
    init_distributed()  # multi-host: before anything touches the devices
    cfg = load_config(argv)
    rl, seed = cfg.rl, cfg.train.seed
    print0(to_toml(cfg))
    mesh = make_mesh(cfg.mesh)
    params, tokenizer, model_cfg, meta = load_source(rl.source, cfg, mesh)
    fingerprint = tokenizer_fingerprint(meta.get("tokenizer"))  # the run's, also if tok_train replaces it meanwhile
    train_task, test_task = load_tasks(rl.task)
    print0(f"{rl.source} model: step {meta['step']} | depth {model_cfg.depth} | mesh {dict(mesh.shape)} | task "
           f"{rl.task}: {len(train_task)} train / {len(test_task)} test questions")
    rows_local, num_iterations = step_shape(rl, mesh, len(train_task))
    # nanochat's RL: [optim] learning rates x init_lr_frac, linear decay to 0, no Muon momentum warm-up
    optim_cfg = stage_optim(cfg.optim, rl.init_lr_frac, warmdown_ratio=1.0, final_lr_frac=0.0,
                            muon_momentum_start=cfg.optim.muon_momentum, grad_clip=rl.grad_clip)
    run = TrainRun(model_cfg, optim_cfg, num_iterations, mesh, seed, params=params, objective=pg_objective)
    del params
    gen_mesh = eval_mesh(cfg.mesh)  # each process samples its own questions, on a mesh of its local devices
    ckpt = open_checkpoints("rl", model_cfg.depth, cfg.train)
    start = run.resume(ckpt, None, meta.get("tokenizer"), seed=seed) if cfg.train.resume else 0  # (seeds the rollouts)

    logger = StepLogger("rl", num_iterations, start, flops_per_token=flops_per_token(model_cfg),
                        peak_flops=peak_flops_per_device(compute_dtype=model_cfg.compute_dtype),
                        num_devices=device_info()["num_devices"], append=cfg.train.resume)
    rewards_per_step = [r["reward"] for r in logger.kept if "reward" in r]  # (process 0's log: for the summary)
    stop = StopSignal()
    try:
        for step in range(start, num_iterations):
            if rl.eval_every > 0 and step % rl.eval_every == 0:
                with logger.paused():  # not counted in tokens/s
                    evaluate(rl, seed, policy(run, tokenizer, gen_mesh), tokenizer, test_task, step, rows_local, logger)
            record = train_step(rl, seed, run, policy(run, tokenizer, gen_mesh), tokenizer, train_task, step,
                                rows_local)
            rewards_per_step.append(record["reward"])
            logger.log(step + 1, record.pop("loss"), record.pop("tokens"), **record)
            stopping = stop.requested  # (read once: a signal arriving later is acted on after the next step)
            if step + 1 == num_iterations or (rl.save_every > 0 and (step + 1) % rl.save_every == 0) or stopping:
                with logger.paused():  # the last one is on disk before the final evaluation starts
                    step_meta = checkpoint_meta("rl", step + 1, cfg, model_cfg, meta.get("tokenizer"), fingerprint,
                                                source=rl.source)
                    run.save(ckpt, step + 1, None, step_meta, wait=step + 1 == num_iterations)
            if stopping:
                logger.close()
                stop.exit(ckpt, step + 1)
    finally:
        stop.close()
        ckpt.close(quiet=sys.exc_info()[1] is not None)  # a save still being written completes, also after an error
    evals = evaluate(rl, seed, policy(run, tokenizer, gen_mesh), tokenizer, test_task, num_iterations, rows_local, logger)
    logger.close()
    return save_rl_summary(cfg, meta, logger, rewards_per_step, evals, mesh, ckpt.directory / str(num_iterations))


def save_rl_summary(cfg, meta: dict, logger, rewards_per_step: list[float], evals: dict, mesh, checkpoint) -> dict:
    """rl_train.json (written by process 0): the run's record, the mean reward of its first step and of its last
    10 % of steps, pass@k of the final evaluation; and the closing line."""
    rl = cfg.rl
    rewards_per_step = rewards_per_step or [float("nan")]  # (a process other than 0 has no earlier sessions' rewards)
    summary = save_summary("rl_train", {
        "stage": "rl", "run": cfg.run, "source": rl.source, "source_step": meta["step"], "task": rl.task,
        **logger.run_record(), "examples_per_step": rl.examples_per_step, "num_samples": rl.num_samples,
        "reward_first_step": rewards_per_step[0],
        "reward_last_10pct": float(np.mean(rewards_per_step[-max(1, len(rewards_per_step) // 10):])),
        **evals["passk"], "device": device_info(), "mesh": dict(mesh.shape), "samples": evals["samples"],
        "checkpoint": str(checkpoint)})
    print0(f"done: {logger.total} steps in {logger.elapsed / 60:.1f} min | reward {rewards_per_step[0]:.3f} -> "
           f"{summary['reward_last_10pct']:.3f} | pass@1 {summary['pass@1']:.4f} | "
           f"pass@{rl.device_batch_size} {summary[f'pass@{rl.device_batch_size}']:.4f}")
    return summary


if __name__ == "__main__":
    run_script(main)
