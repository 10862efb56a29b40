"""CORE metric of a base checkpoint; writes <home>/report/base_eval.json.

    python scripts/base_eval.py [--max-per-task 100] [--bundle-dir DIR] [--step N] [--depth D] [--eval.batch_tokens=...]

The eval bundle is downloaded once to <home>/eval_bundle (or pass --bundle-dir to an unzipped copy).
Settings live in the config's [eval] section (the short flags are aliases for them); --step/--depth pick
the checkpoint (without --depth: --model.depth's when base has it, else the newest depth); [mesh] sets the devices.
"""

from __future__ import annotations

import argparse
import time

from nanochat_jax.checkpoint import load_model
from nanochat_jax.common import print0, run_script
from nanochat_jax.config import flag_overrides, load_config, to_toml
from nanochat_jax.core_eval import EVAL_BUNDLE_URL, ensure_bundle, evaluate_core, make_scorer
from nanochat_jax.distributed import eval_mesh, init_distributed
from nanochat_jax.progress import save_summary
from nanochat_jax.sharding import batch_shards


def parse_args(argv):
    """(checkpoint args, config overrides): the short flags become --eval.* overrides."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle-dir", help="an unzipped eval bundle (default: download to <home>/eval_bundle)")
    p.add_argument("--bundle-url", help=f"default: {EVAL_BUNDLE_URL}")
    p.add_argument("--max-per-task", help="items per task (-1 = all)")
    p.add_argument("--batch-tokens", help="tokens per forward (rows x bucket length)")
    p.add_argument("--max-seq-len", help="crop longer prompts from the left (0 = no cropping)")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    return flag_overrides(p, argv)


def main(argv: list[str] | None = None) -> dict:
    init_distributed()  # multi-host: before anything touches the devices
    args, rest = parse_args(argv)
    cfg = load_config(rest)
    print0(to_toml(cfg.eval))
    ev = cfg.eval
    bundle = ensure_bundle(ev.bundle_dir or None, ev.bundle_url or EVAL_BUNDLE_URL)
    mesh = eval_mesh(cfg.mesh)
    # without --depth: the run's --model.depth when the stage has it, else the most recently written depth
    model, tokenizer, meta = load_model("base", step=args.step, depth=args.depth, mesh=mesh,
                                        preferred_depth=cfg.model.depth)
    print0(f"base model: step {meta['step']} | depth {meta['model']['depth']} | mesh {dict(mesh.shape)} | "
           f"bundle {bundle}")
    t0 = time.perf_counter()
    out = evaluate_core(make_scorer(model, mesh), tokenizer, bundle, ev.max_per_task, ev.max_seq_len or None,
                        ev.batch_tokens, batch_shards(mesh), log=print0)
    out.update(step=meta["step"], depth=meta["model"]["depth"], max_per_task=ev.max_per_task,
               wall_time_s=time.perf_counter() - t0)
    print0(f"{'Task':<35} {'Accuracy':>10} {'Centered':>10}")
    for label, acc in out["results"].items():
        print0(f"{label:<35} {acc:>10.4f} {out['centered_results'][label]:>10.4f}")
    print0(f"{'CORE':<35} {'':>10} {out['core_metric']:>10.4f}")
    return save_summary("base_eval", out)


if __name__ == "__main__":
    run_script(main)
