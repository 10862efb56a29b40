"""CORE metric of a base checkpoint; writes <home>/report/base_eval.json.

    python scripts/base_eval.py [--max-per-task 100] [--bundle-dir DIR] [--step N] [--depth D] [--mesh.data=...]

The eval bundle is downloaded once to <home>/eval_bundle (or pass --bundle-dir to an unzipped copy).
Flags other than the ones below are config overrides (only [mesh] matters here).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from nanochat_jax.checkpoint import CheckpointError, load_model
from nanochat_jax.common import artifacts_dir, init_distributed, is_main_process, print0
from nanochat_jax.config import load_config
from nanochat_jax.core_eval import (EVAL_BUNDLE_URL, BundleError, batch_rows, ensure_bundle, eval_mesh, evaluate_core,
                                    make_scorer)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle-dir", default=None, help="an unzipped eval bundle (default: <home>/eval_bundle)")
    p.add_argument("--bundle-url", default=EVAL_BUNDLE_URL)
    p.add_argument("--max-per-task", type=int, default=-1, help="items per task (-1 = all)")
    p.add_argument("--batch-tokens", type=int, default=16384, help="tokens per forward (rows x bucket length)")
    p.add_argument("--max-seq-len", type=int, default=None, help="crop longer prompts from the left")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> dict:
    init_distributed()  # multi-host: before anything touches the devices
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(rest)
    try:
        bundle = ensure_bundle(args.bundle_dir, args.bundle_url)
    except BundleError as e:
        print(f"base_eval: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    mesh = eval_mesh(cfg.mesh)
    try:
        model, tokenizer, meta = load_model("base", step=args.step, depth=args.depth, mesh=mesh)
    except CheckpointError as e:
        print(f"base_eval: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print0(f"base model: step {meta['step']} | depth {meta['model']['depth']} | mesh {dict(mesh.shape)} | "
           f"bundle {bundle}")
    t0 = time.perf_counter()
    out = evaluate_core(make_scorer(model, mesh), tokenizer, bundle, args.max_per_task, args.max_seq_len,
                        args.batch_tokens, batch_rows(mesh), log=print0)
    out.update(step=meta["step"], depth=meta["model"]["depth"], max_per_task=args.max_per_task,
               wall_time_s=time.perf_counter() - t0)
    print0(f"{'Task':<35} {'Accuracy':>10} {'Centered':>10}")
    for label, acc in out["results"].items():
        print0(f"{label:<35} {acc:>10.4f} {out['centered_results'][label]:>10.4f}")
    print0(f"{'CORE':<35} {'':>10} {out['core_metric']:>10.4f}")
    if is_main_process():
        (artifacts_dir("report") / "base_eval.json").write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
