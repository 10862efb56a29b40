"""First-release vs modern recipe on CPU at the same model size and the same training FLOPs: validation bpb side by side.

    python bench/recipe.py                  # --minutes 10: about 10 minutes per recipe on 2 cores
    python bench/recipe.py --flops 3e13     # an explicit training-FLOPs budget per recipe
    python bench/recipe.py --points 8 --plot recipe.png

configs/cpu_tiny.toml (nanochat's first release) and configs/cpu_modern.toml (master's recipe) share depth, width,
heads, sequence length, tokenizer and batch: the same matrices, so the same matmul parameters (the modern gates add
120 at depth 4). The modern model also has value-embedding tables: lookups, no FLOPs, counted and printed apart
(the comparison is at equal matmul parameters, which is what FLOPs per token and nanochat's scaling count).
Each recipe trains for round(budget / (FLOPs per token x tokens per step)) steps, base_train's --train.target_flops
derivation, so both spend the budget to within one step's FLOPs; the modern FLOPs per token are lower (sliding
windows), so it takes a few more steps. Validation bpb is taken every --eval-every steps (default: the shorter run
over --points), at the same token positions in both, and at each run's end. The budget is FLOPs, never wall time:
--minutes converts with CPU_TRAIN_FLOPS, cpu_tiny's training throughput on a 2-core Xeon VM.

Each recipe is scripts/base_train.py in a subprocess (JAX on CPU) in one temporary NANOCHAT_JAX_HOME with a
tokenizer trained there (scripts/tok_train.py on the embedded corpus); logs go to that home, kept with --keep.
Prints the table, the final values and their ratio, a JSON line starting with `JSON `, then the plot's path.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RECIPES = {"first_release": "configs/cpu_tiny.toml", "modern": "configs/cpu_modern.toml"}
CPU_TRAIN_FLOPS = 1.0e11  # cpu_tiny: ~4,000 tokens/s x 25.2 MFLOP per token on 2 Xeon cores (bench/RESULTS.md)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="budget per recipe, in minutes of CPU_TRAIN_FLOPS")
    p.add_argument("--flops", type=float, default=0.0, help="training FLOPs per recipe (overrides --minutes)")
    p.add_argument("--points", type=int, default=10, help="validation points along the shorter run")
    p.add_argument("--eval-every", type=int, default=0, help="steps between validation points (overrides --points)")
    p.add_argument("--plot", default="", help="PNG path (default <home>/bench/recipe_bpb.png)")
    p.add_argument("--keep", default="", help="train in this directory and keep it (default: a temporary one)")
    args = p.parse_args(argv)
    if args.flops < 0 or args.minutes <= 0 or args.points < 1 or args.eval_every < 0:
        p.error("--flops, --minutes, --points and --eval-every must be positive")
    return args


def budget(args) -> float:
    """Training FLOPs per recipe."""
    return args.flops or args.minutes * 60 * CPU_TRAIN_FLOPS


def recipe_plan(config: str, flops: float) -> dict:
    """One recipe under a FLOPs budget: its parameters (matmul, embedding tables, scalars), FLOPs per token at the
    config's tokenizer vocabulary, tokens per step, steps and the FLOPs those steps spend."""
    from nanochat_jax.config import load_config
    from nanochat_jax.model import flops_per_token, matmul_params, num_params

    cfg = load_config(["--config", str(ROOT / config)])
    cfg.model.vocab_size = cfg.tokenizer.vocab_size  # base_train takes it from the trained tokenizer
    fpt, per_step = flops_per_token(cfg.model), cfg.train.total_batch_size
    steps = max(1, round(flops / (fpt * per_step)))  # = base_train.training_horizon with train.target_flops
    warmup, warmdown = cfg.optim.warmup_steps, cfg.optim.warmdown_ratio  # TrainRun refuses fewer steps than they take
    least = next(n for n in itertools.count(1) if warmup + round(warmdown * n) <= n)
    scalars = 2 * cfg.model.n_layer * cfg.model.layer_lambdas + cfg.model.smear + cfg.model.backout
    total, matmul = num_params(cfg.model), matmul_params(cfg.model)
    return {"config": config, "params": total, "matmul_params": matmul, "table_params": total - matmul - scalars,
            "scalar_params": scalars, "flops_per_token": fpt, "tokens_per_step": per_step, "steps": steps,
            "flops": steps * fpt * per_step, "least_steps": least}


def plans(flops: float, points: int, eval_every: int = 0) -> tuple[dict, int]:
    """({recipe: recipe_plan}, the common eval cadence in steps); the recipes must step the same tokens."""
    out = {name: recipe_plan(config, flops) for name, config in RECIPES.items()}
    per_step = {p["tokens_per_step"] for p in out.values()}
    if len(per_step) != 1:
        raise SystemExit(f"the recipes' train.total_batch_size differ ({sorted(per_step)}): no common token positions")
    return out, eval_every or max(1, min(p["steps"] for p in out.values()) // points)


def run_recipe(name: str, plan: dict, flops: float, eval_every: int, home: Path) -> dict:
    """Train one recipe for `flops` with base_train.py in `home` (it derives the steps, which must be the plan's);
    returns {"curve": [(step, val_bpb)], "summary": base_train's summary}."""
    env = {**os.environ, "NANOCHAT_JAX_HOME": str(home), "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # one CPU device
    cmd = [sys.executable, str(ROOT / "scripts" / "base_train.py"), "--config", str(ROOT / plan["config"]),
           "--train.num_iterations=-1", f"--train.target_flops={flops}", f"--train.eval_every={eval_every}",
           "--train.checkpoint_every=0", "--train.sample_every=0", f"--train.log_every={max(1, eval_every)}"]
    log = home / f"{name}.log"
    print(f"{name}: {plan['steps']} steps ({plan['config']}), log {log}", flush=True)
    with log.open("w") as f, subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                              text=True) as proc:
        for line in proc.stdout:
            f.write(line)
            if "val bpb" in line or line.startswith("done:"):
                print(f"  {name}: {line.strip()}", flush=True)
    if proc.returncode:
        raise SystemExit(f"{name}: base_train.py exited with {proc.returncode}; see {log}:\n"
                         + "".join(log.read_text().splitlines(True)[-20:]))
    report = home / "report"
    summary = json.loads((report / "base_train.json").read_text())
    if summary["steps"] != plan["steps"] or summary["flops_per_token"] != plan["flops_per_token"]:
        raise SystemExit(f"{name}: base_train ran {summary['steps']} steps at {summary['flops_per_token']:.4e} "
                         f"FLOPs/token, the plan said {plan['steps']} at {plan['flops_per_token']:.4e}")
    records = [json.loads(line) for line in (report / "base_train.jsonl").read_text().splitlines()]
    curve = sorted({r["step"]: r["val_bpb"] for r in records if "val_bpb" in r}.items())
    return {"curve": curve, "summary": summary}


def side_by_side(results: dict) -> list[str]:
    """The table: one row per evaluated step of either run (the same tokens in both), each recipe's training FLOPs
    and validation bpb there, and modern / first_release where both have a value."""
    names = list(results)
    curves = [dict(results[n]["curve"]) for n in names]
    per_step = results[names[0]]["plan"]["tokens_per_step"]
    lines = [f"{'step':>6s} {'tokens':>10s} | " + " | ".join(f"{n + ' FLOPs':>20s} {'bpb':>7s}" for n in names)
             + " | ratio"]
    for step in sorted(set(curves[0]) | set(curves[1])):
        cells = [f"{results[n]['plan']['flops_per_token'] * step * per_step:20.3e} {c[step]:7.4f}" if step in c
                 else f"{'':20s} {'-':>7s}" for n, c in zip(names, curves)]
        ratio = f"{curves[1][step] / curves[0][step]:.4f}" if step in curves[0] and step in curves[1] else ""
        lines.append(f"{step:6d} {step * per_step:10,d} | " + " | ".join(cells) + f" | {ratio}")
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        per_flop = r["plan"]["flops_per_token"] * r["plan"]["tokens_per_step"]
        steps, bpb = zip(*r["curve"])
        ax.plot([s * per_flop for s in steps], bpb, marker="o", label=f"{name} ({r['plan']['config']})")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("first-release vs modern recipe, equal matmul parameters and FLOPs (CPU)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from nanochat_jax.common import artifacts_dir, cpu_model

    flops, processor = budget(args), cpu_model() or "?"
    recipes, eval_every = plans(flops, args.points, args.eval_every)
    for p in recipes.values():  # refused here, not by base_train after the first recipe has trained
        if p["steps"] < p["least_steps"]:
            raise SystemExit(f"recipe.py: {p['config']} would train {p['steps']} steps, fewer than its LR warm-up and "
                             f"warm-down take ({p['least_steps']}): use --flops "
                             f"{p['least_steps'] * p['flops_per_token'] * p['tokens_per_step']:.2e} or more")
    print(f"processor: {processor} ({os.cpu_count()} CPUs) | budget {flops:.3e} training FLOPs per recipe"
          + ("" if args.flops else f" ({args.minutes:g} min at {CPU_TRAIN_FLOPS:.1e} FLOP/s)"))
    for name, p in recipes.items():
        print(f"{name:14s} {p['config']}: params {p['params']:,} = matmul {p['matmul_params']:,} + embedding tables "
              f"{p['table_params']:,} + scalars {p['scalar_params']} | FLOPs/token {p['flops_per_token']:.4e} | "
              f"{p['steps']} steps x {p['tokens_per_step']:,} tokens = {p['flops']:.4e} FLOPs")
    print(f"validation every {eval_every} steps ({eval_every * recipes['modern']['tokens_per_step']:,} tokens) and at "
          "the end", flush=True)

    with tempfile.TemporaryDirectory(prefix="recipe_") as tmp:
        home = Path(args.keep or tmp)
        home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "NANOCHAT_JAX_HOME": str(home), "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, str(ROOT / "scripts" / "tok_train.py"), "--config",
                        str(ROOT / RECIPES["first_release"])], env=env, cwd=ROOT, check=True, capture_output=True)
        results = {}
        for name, p in recipes.items():
            start = time.time()
            results[name] = {"plan": p, **run_recipe(name, p, flops, eval_every, home), "wall_s": time.time() - start}

    print()
    print("\n".join(side_by_side(results)))
    first, modern = (r["curve"][-1][1] for r in results.values())
    print(f"\nfinal val bpb: first_release {first:.4f} ({recipes['first_release']['steps']} steps, "
          f"{recipes['first_release']['flops']:.3e} FLOPs) | modern {modern:.4f} ({recipes['modern']['steps']} steps, "
          f"{recipes['modern']['flops']:.3e} FLOPs) | modern/first_release {modern / first:.4f}")
    print("wall time (noisy, shared machine): " + ", ".join(
        f"{n} {r['wall_s'] / 60:.1f} min ({r['summary']['tokens_per_sec']:,.0f} tok/s)" for n, r in results.items()))
    out = {"processor": processor, "budget_flops": flops, "eval_every": eval_every, "ratio_final": modern / first,
           **{name: {**r["plan"], "curve": r["curve"], "wall_s": r["wall_s"],
                     "tokens_per_sec": r["summary"]["tokens_per_sec"]} for name, r in results.items()}}
    print("JSON " + json.dumps(out))
    path = Path(args.plot) if args.plot else artifacts_dir("bench") / "recipe_bpb.png"
    plot(results, path)
    print(f"plot: {path}")
    return out


if __name__ == "__main__":
    main()
