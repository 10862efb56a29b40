"""Evaluate a chat checkpoint (mid, sft or rl) on the chat tasks; writes <home>/report/chat_eval_<source>.json.

    python scripts/chat_eval.py --source sft [-a 'ARC-Easy|GSM8K'] [--max-problems 100] [--num-samples 1]

Tasks whose data cannot be loaded (offline hub) are reported as unavailable and skipped. --data-dir DIR
reads <DIR>/<task>.jsonl (hub-format rows) instead of the hub where such a file exists. Flags other than
the ones below are config overrides (only [mesh] matters here).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from nanochat_jax.chat_eval import (CHAT_TASKS, chatcore, load_task, make_answer_logits, run_categorical_eval,
                                    run_generative_eval)
from nanochat_jax.checkpoint import CheckpointError, load_model
from nanochat_jax.common import artifacts_dir, init_distributed, is_main_process, print0
from nanochat_jax.config import load_config
from nanochat_jax.core_eval import batch_rows, eval_mesh
from nanochat_jax.engine import Engine
from nanochat_jax.tasks import TaskDataError


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-i", "--source", required=True, choices=["mid", "sft", "rl"])
    p.add_argument("-a", "--task-name", default=None, help=f"tasks split by '|' (default: {'|'.join(CHAT_TASKS)})")
    p.add_argument("-t", "--temperature", type=float, default=0.0)
    p.add_argument("-m", "--max-new-tokens", type=int, default=512)
    p.add_argument("-n", "--num-samples", type=int, default=1)
    p.add_argument("-k", "--top-k", type=int, default=50)
    p.add_argument("-b", "--batch-size", type=int, default=8, help="problems per forward / per Engine call")
    p.add_argument("-x", "--max-problems", type=int, default=None)
    p.add_argument("-s", "--step", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="local <task>.jsonl files to use instead of the hub")
    args, rest = p.parse_known_args(argv)
    names = CHAT_TASKS if args.task_name is None else tuple(args.task_name.split("|"))
    unknown = [n for n in names if n not in CHAT_TASKS]
    if unknown:
        p.error(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(CHAT_TASKS)}")
    return args, names, rest


def main(argv: list[str] | None = None) -> dict:
    init_distributed()  # multi-host: before anything touches the devices
    args, names, rest = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(rest)
    mesh = eval_mesh(cfg.mesh)
    try:
        model, tokenizer, meta = load_model(args.source, step=args.step, depth=args.depth, mesh=mesh)
    except CheckpointError as e:
        print(f"chat_eval: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print0(f"{args.source} model: step {meta['step']} | depth {meta['model']['depth']} | mesh {dict(mesh.shape)}")
    engine = Engine(model, tokenizer, mesh=mesh)
    rows = batch_rows(mesh)
    batch_size = -(-args.batch_size // rows) * rows
    answer_logits = None
    results, counts, unavailable = {}, {}, {}
    t0 = time.perf_counter()
    for name in names:
        try:
            task = load_task(name, args.data_dir)
        except TaskDataError as e:
            print0(f"{name}: unavailable: {e}")
            unavailable[name] = str(e)
            continue
        if task.eval_type == "categorical":
            answer_logits = answer_logits or make_answer_logits(model, mesh)
            passed, total = run_categorical_eval(task, tokenizer, answer_logits, batch_size, args.max_problems)
        else:
            passed, total = run_generative_eval(task, tokenizer, engine, args.num_samples, args.max_new_tokens,
                                                args.temperature, args.top_k, args.max_problems, batch_size,
                                                args.seed)
        results[name] = passed / max(1, total)
        counts[name] = [passed, total]
        print0(f"{name} accuracy: {passed}/{total} = {100 * results[name]:.2f}%")
    score = chatcore(results)
    if score is not None:
        print0(f"ChatCORE: {score:.4f}")
    out = {"source": args.source, "step": meta["step"], "args": vars(args), "results": results, "counts": counts,
           "unavailable": unavailable, "ChatCORE": score, "wall_time_s": time.perf_counter() - t0}
    if is_main_process():
        (artifacts_dir("report") / f"chat_eval_{args.source}.json").write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
