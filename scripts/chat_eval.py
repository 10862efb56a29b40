"""Evaluate a chat checkpoint (mid, sft or rl) on the chat tasks; writes <home>/report/chat_eval_<source>.json.

    python scripts/chat_eval.py --source sft [-a 'ARC-Easy|GSM8K'] [--max-problems 100] [--num-samples 1]

Tasks whose data cannot be loaded (offline hub) are reported as unavailable and skipped. --data-dir DIR
reads <DIR>/<task>.jsonl (hub-format rows) instead of the hub where such a file exists. Settings live in
the config's [eval] section (the short flags are aliases for them, as in nanochat); -i/--step/--depth pick
the checkpoint (without --depth: --model.depth's when the stage has it, else the newest depth); [mesh] sets the devices.
"""

from __future__ import annotations

import argparse
import time

from nanochat_jax.chat_eval import (CHAT_TASKS, KNOWN_TASKS, chatcore, load_task, make_answer_logits,
                                    most_common_answer, run_categorical_eval, run_generative_eval)
from nanochat_jax.checkpoint import load_model
from nanochat_jax.common import print0, run_script
from nanochat_jax.config import ConfigError, flag_overrides, load_config, to_dict, to_toml
from nanochat_jax.distributed import eval_mesh, init_distributed
from nanochat_jax.engine import Engine
from nanochat_jax.progress import save_summary
from nanochat_jax.sharding import batch_shards
from nanochat_jax.tasks import TaskDataError


def parse_args(argv):
    """(checkpoint args, config overrides): the short flags become --eval.* overrides."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-i", "--source", required=True, choices=["mid", "sft", "rl"])
    p.add_argument("-a", "--task-name", dest="tasks", help=f"tasks split by '|' (default: {'|'.join(CHAT_TASKS)}; "
                                                             f"also {'|'.join(KNOWN_TASKS[len(CHAT_TASKS):])})")
    p.add_argument("-t", "--temperature")
    p.add_argument("-m", "--max-new-tokens")
    p.add_argument("-n", "--num-samples")
    p.add_argument("-k", "--top-k")
    p.add_argument("-b", "--batch-size", help="problems per forward / per Engine call")
    p.add_argument("-x", "--max-problems", help="problems per task (0 = all)")
    p.add_argument("-s", "--step", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="local <task>.jsonl files to use instead of the hub")
    return flag_overrides(p, argv)


def task_names(tasks: str) -> tuple[str, ...]:
    names = tuple(tasks.split("|"))
    unknown = [n for n in names if n not in KNOWN_TASKS]
    if unknown:
        raise ConfigError(f"eval.tasks: unknown task(s) {', '.join(unknown)}; known: {', '.join(KNOWN_TASKS)}")
    return names


def main(argv: list[str] | None = None) -> dict:
    init_distributed()  # multi-host: before anything touches the devices
    args, rest = parse_args(argv)
    cfg = load_config(rest)
    print0(to_toml(cfg.eval))
    ev, names = cfg.eval, task_names(cfg.eval.tasks)
    mesh = eval_mesh(cfg.mesh)
    # without --depth: the run's --model.depth when the stage has it, else the most recently written depth
    model, tokenizer, meta = load_model(args.source, step=args.step, depth=args.depth, mesh=mesh,
                                        preferred_depth=cfg.model.depth)
    print0(f"{args.source} model: step {meta['step']} | depth {meta['model']['depth']} | mesh {dict(mesh.shape)}")
    engine = Engine(model, tokenizer, mesh=mesh)
    rows = batch_shards(mesh)
    batch_size = -(-ev.batch_size // rows) * rows
    max_problems = ev.max_problems or None
    answer_logits = None
    results, counts, unavailable, constant = {}, {}, {}, {}
    t0 = time.perf_counter()
    for name in names:
        try:
            task = load_task(name, ev.data_dir or None)
        except TaskDataError as e:
            print0(f"{name}: unavailable: {e}")
            unavailable[name] = str(e)
            continue
        if task.eval_type == "categorical":
            answer_logits = answer_logits or make_answer_logits(model, mesh)
            passed, total = run_categorical_eval(task, tokenizer, answer_logits, batch_size, max_problems)
        else:
            passed, total = run_generative_eval(task, tokenizer, engine, ev.num_samples, ev.max_new_tokens,
                                                ev.temperature, ev.top_k, max_problems, batch_size, args.seed)
        results[name] = passed / max(1, total)
        counts[name] = [passed, total]
        common = most_common_answer(task, max_problems) if task.eval_type == "generative" else None
        if common:
            constant[name] = {"answer": common[0], "accuracy": common[1]}
        print0(f"{name} accuracy: {passed}/{total} = {100 * results[name]:.2f}%"
               + (f" (answering {common[0]} every time: {100 * common[1]:.2f}%)" if common else ""))
    score = chatcore(results)
    if score is not None:
        print0(f"ChatCORE: {score:.4f}")
    out = {"source": args.source, "step": meta["step"], "eval": to_dict(ev), "results": results, "counts": counts,
           "constant_answer": constant, "unavailable": unavailable, "ChatCORE": score,
           "wall_time_s": time.perf_counter() - t0}
    return save_summary(f"chat_eval_{args.source}", out)


if __name__ == "__main__":
    run_script(main)
