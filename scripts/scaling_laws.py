"""IsoFLOP scaling sweep, as nanochat master's runs/scaling_laws.sh: pretrain each depth at each training-FLOPs
budget, record validation bits per byte, and find the compute-optimal model size of each budget.

    python scripts/scaling_laws.py --flops 1e18,2.15e18,4.64e18,1e19 --depths 10,12,14,16,18,20     # 8 GPUs
    python scripts/scaling_laws.py --flops 4e12,8e12 --depths 2,3,4,5 --config configs/cpu_tiny.toml  # CPU

Each (budget, depth) is scripts/base_train.py in a subprocess with --model.depth, --train.target_flops and
--train.num_iterations=-1, after every other argument (--config and config overrides, passed through). It runs in
its own home, <home>/scaling/<label>/d<depth>_<budget>, linked to the home's tokenizer (train it first:
tok_train.py), data shards, eval bundle and compile cache, so each downloads once; its checkpoints are deleted when
it ends (--keep-checkpoints keeps them). Its row goes to <home>/scaling/<label>/results.csv as soon as it ends, so a
rerun with the same base_train arguments (sweep.json keeps them) trains only the pairs not there yet.

Then, for each budget with three depths or more, a parabola of val bpb over log(N), N the matmul parameters (the
blocks' matrices, the gates and the lm_head: master's scaling count, near enough), gives the compute-optimal N* (its
minimum) and D* (the tokens at N*, interpolated over the budget's runs); over two budgets or more with an optimum
inside their depths, the exponents of N* ~ C^a and D* ~ C^b. Prints the table and the fit, writes fit.json and
isoflop.png beside results.csv.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from nanochat_jax.common import UserError, artifacts_dir, compilation_cache_dir, run_script  # noqa: E402

SHARED = ("tokenizer", "data", "eval_bundle", "cpu_peak_flops.json")  # what every run's home links to the home's
COLUMNS = ("flops_budget", "depth", "width", "matmul_params", "params", "flops_per_token", "steps", "tokens",
           "val_bpb", "core_metric", "wall_time_s", "tokens_per_sec", "mfu")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(the sweep's own options, the arguments passed through to base_train.py)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--flops", required=True, help="training-FLOPs budgets, comma-separated (e.g. 1e18,1e19)")
    p.add_argument("--depths", required=True, help="model depths, comma-separated (e.g. 10,12,14)")
    p.add_argument("--label", default="sweep", help="the sweep's folder under <home>/scaling")
    p.add_argument("--keep-checkpoints", action="store_true")
    args, rest = p.parse_known_args(argv)
    try:
        args.flops = sorted({float(f) for f in args.flops.split(",")})
        args.depths = sorted({int(d) for d in args.depths.split(",")})
    except ValueError:
        p.error(f"--flops {args.flops!r} and --depths {args.depths!r} must be comma-separated numbers")
    if min(args.flops) <= 0 or min(args.depths) <= 0:
        p.error("--flops and --depths must be positive")
    for flag in ("--model.depth", "--train.target_flops", "--train.num_iterations"):
        if any(a.split("=")[0] == flag for a in rest):
            p.error(f"{flag} is the sweep's to set")
    return args, rest


def read_rows(path: Path) -> list[dict]:
    """results.csv's complete rows (a line cut short by a kill is left out, and its run trained again)."""
    if not path.exists():
        return []
    with path.open() as f:
        rows = [{k: float(v) if v else None for k, v in row.items() if k} for row in csv.DictReader(f)]
    complete = [r for r in rows if all(r.get(k) is not None for k in COLUMNS if k != "core_metric")]
    if len(complete) < len(rows):
        print(f"{path}: {len(rows) - len(complete)} incomplete row(s) left out", flush=True)
    return complete


def append_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})


def train_one(flops: float, depth: int, passthrough: list[str], model, sweep: Path, keep_checkpoints: bool) -> dict:
    """base_train.py at this depth for this budget in its own home; returns its results.csv row. model: the
    passthrough's ModelConfig at the tokenizer's vocabulary (the row's width and matmul parameters come from it)."""
    from nanochat_jax.model import matmul_params

    model = dataclasses.replace(model, depth=depth)
    home = sweep / f"d{depth}_{flops:.6g}"
    home.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        shared, link = artifacts_dir(create=False) / name, home / name
        if shared.exists() and not (link.exists() or link.is_symlink()):
            link.symlink_to(shared.resolve())
    overrides = [*passthrough, f"--model.depth={depth}", f"--train.target_flops={flops!r}",
                 "--train.num_iterations=-1"]
    env = {**os.environ, "NANOCHAT_JAX_HOME": str(home), "PYTHONPATH": os.pathsep.join(
               filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "JAX_COMPILATION_CACHE_DIR": compilation_cache_dir()}
    log = home / "base_train.log"
    print(f"=== budget {flops:.3g} FLOPs, depth {depth} (width {model.n_embd}): log {log}", flush=True)
    with log.open("w") as f, subprocess.Popen([sys.executable, str(ROOT / "scripts" / "base_train.py"), *overrides],
                                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                              text=True) as proc:
        for line in proc.stdout:
            f.write(line)
            if "val bpb" in line or line.startswith(("done:", "batch:")):
                print(f"    {line.strip()[-160:]}", flush=True)
    if proc.returncode:
        tail = "".join(log.read_text().splitlines(True)[-15:])
        raise UserError(f"base_train.py at depth {depth} for {flops:.3g} FLOPs exited with {proc.returncode} "
                        f"(the rows before it are kept; rerun to go on): {log}\n{tail}")
    summary = json.loads((home / "report" / "base_train.json").read_text())
    if not keep_checkpoints:
        shutil.rmtree(home / "checkpoints", ignore_errors=True)
    return {"flops_budget": flops, "depth": depth, "width": model.n_embd, "matmul_params": matmul_params(model),
            "params": summary["params"], "flops_per_token": summary["flops_per_token"], "steps": summary["steps"],
            "tokens": summary["tokens"], "val_bpb": summary["val_bpb"], "core_metric": summary["core_metric_estimate"],
            "wall_time_s": summary["wall_time_s"], "tokens_per_sec": summary["tokens_per_sec"], "mfu": summary["mfu"]}


def fit(rows: list[dict]) -> dict:
    """Per budget: the parabola of val bpb over log N and its minimum (N*, D*, bpb there, whether N* lies inside
    the budget's depths); over the budgets with an inside optimum: N* ~ C^a, D* ~ C^b."""
    budgets = {}
    for flops in sorted({r["flops_budget"] for r in rows}):
        runs = sorted((r for r in rows if r["flops_budget"] == flops), key=lambda r: r["matmul_params"])
        entry = {"depths": [int(r["depth"]) for r in runs], "optimum": None}
        if len(runs) >= 3:
            x = np.log([r["matmul_params"] for r in runs])
            a, b, c = np.polyfit(x, [r["val_bpb"] for r in runs], 2)
            entry["parabola"] = [a, b, c]
            if a > 0:
                x_opt = -b / (2 * a)
                slope, intercept = np.polyfit(x, np.log([r["tokens"] for r in runs]), 1)
                entry["optimum"] = {"params": math.exp(x_opt), "tokens": math.exp(intercept + slope * x_opt),
                                    "val_bpb": a * x_opt ** 2 + b * x_opt + c,
                                    "inside": bool(x.min() <= x_opt <= x.max())}
        budgets[flops] = entry
    inside = [(c, e["optimum"]) for c, e in budgets.items() if e["optimum"] and e["optimum"]["inside"]]
    law = None
    if len(inside) >= 2:
        log_c = np.log([c for c, _ in inside])
        law = {"params_exponent": float(np.polyfit(log_c, np.log([o["params"] for _, o in inside]), 1)[0]),
               "tokens_exponent": float(np.polyfit(log_c, np.log([o["tokens"] for _, o in inside]), 1)[0])}
    return {"budgets": budgets, "law": law}


def describe(rows: list[dict], result: dict) -> list[str]:
    lines = [f"{'budget':>9s} {'depth':>5s} {'width':>6s} {'matmul params':>14s} {'steps':>7s} {'tokens':>15s} "
             f"{'tok/param':>9s} {'val bpb':>8s}"]
    for r in sorted(rows, key=lambda r: (r["flops_budget"], r["depth"])):
        lines.append(f"{r['flops_budget']:9.3g} {int(r['depth']):5d} {int(r['width']):6d} "
                     f"{int(r['matmul_params']):14,d} {int(r['steps']):7,d} {int(r['tokens']):15,d} "
                     f"{r['tokens'] / r['matmul_params']:9.1f} {r['val_bpb']:8.4f}")
    for flops, entry in result["budgets"].items():
        o = entry["optimum"]
        if o is None:
            why = "fewer than 3 depths" if len(entry["depths"]) < 3 else "val bpb has no minimum over these depths"
            lines.append(f"budget {flops:.3g}: no optimum ({why})")
        else:
            where = "" if o["inside"] else " (outside the depths tried: extend them that way)"
            lines.append(f"budget {flops:.3g}: compute-optimal N* {o['params']:,.0f} matmul params, "
                         f"D* {o['tokens']:,.0f} tokens ({o['tokens'] / o['params']:.1f} per param), "
                         f"val bpb {o['val_bpb']:.4f}{where}")
    law = result["law"]
    lines.append(f"scaling: N* ~ C^{law['params_exponent']:.3f}, D* ~ C^{law['tokens_exponent']:.3f}" if law else
                 "scaling: needs two budgets or more with an optimum inside their depths")
    return lines


def plot(rows: list[dict], result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for flops, entry in result["budgets"].items():
        runs = sorted((r for r in rows if r["flops_budget"] == flops), key=lambda r: r["matmul_params"])
        n = [r["matmul_params"] for r in runs]
        line, = ax.plot(n, [r["val_bpb"] for r in runs], "o", label=f"{flops:.3g} FLOPs")
        if "parabola" in entry:
            x = np.linspace(math.log(n[0]), math.log(n[-1]), 50)
            ax.plot(np.exp(x), np.polyval(entry["parabola"], x), "-", color=line.get_color(), alpha=0.6)
        if entry["optimum"]:
            ax.plot(entry["optimum"]["params"], entry["optimum"]["val_bpb"], "*", color=line.get_color(), markersize=12)
    ax.set_xscale("log")
    ax.set_xlabel("matmul parameters")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("isoFLOP curves (stars: compute-optimal size)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args, passthrough = parse_args(sys.argv[1:] if argv is None else argv)
    if not artifacts_dir("tokenizer", create=False).is_dir():
        raise UserError(f"no tokenizer in {artifacts_dir(create=False)}: train one first (scripts/tok_train.py with "
                        "the same --config)")
    from nanochat_jax.config import load_config
    from nanochat_jax.core_eval import EVAL_BUNDLE_URL, BundleError, ensure_bundle
    from nanochat_jax.tokenizer import load_tokenizer

    cfg = load_config(passthrough)  # (a bad override fails here, before any training)
    sweep = artifacts_dir("scaling", args.label)
    record = sweep / "sweep.json"
    if record.exists() and json.loads(record.read_text())["base_train_args"] != passthrough:
        raise UserError(f"sweep '{args.label}' was run with base_train.py "
                        f"{' '.join(json.loads(record.read_text())['base_train_args']) or '(no arguments)'}; its rows "
                        f"would not compare with {' '.join(passthrough) or '(no arguments)'}: pass those, or another "
                        "--label")
    record.write_text(json.dumps({"base_train_args": passthrough}))
    (artifacts_dir(create=False) / "data").mkdir(exist_ok=True)  # the runs' shard downloads land in the home
    if cfg.train.core_every > 0 and not cfg.eval.bundle_dir:  # (fetched here once, not by every run)
        try:
            ensure_bundle(None, cfg.eval.bundle_url or EVAL_BUNDLE_URL)
        except BundleError as e:
            print(f"no CORE estimates in the runs: {e}", flush=True)
    results = sweep / "results.csv"
    rows = read_rows(results)
    done = {(r["flops_budget"], int(r["depth"])) for r in rows}
    todo = [(f, d) for f in args.flops for d in args.depths if (f, d) not in done]
    print(f"sweep {args.label}: {len(args.flops)} budgets x {len(args.depths)} depths, {len(done)} done earlier, "
          f"{len(todo)} to train | base_train.py {' '.join(passthrough)} | {results}", flush=True)
    if todo:  # base_train takes the vocabulary from the tokenizer
        model = dataclasses.replace(cfg.model, vocab_size=load_tokenizer().vocab_size)
    for flops, depth in todo:
        row = train_one(flops, depth, passthrough, model, sweep, args.keep_checkpoints)
        append_row(results, row)
        rows.append(row)
    wanted = [r for r in rows if r["flops_budget"] in args.flops and int(r["depth"]) in args.depths]
    result = fit(wanted)
    print("\n".join(describe(wanted, result)))
    budgets = {f"{c:g}": entry for c, entry in result["budgets"].items()}  # (JSON keys are strings)
    (sweep / "fit.json").write_text(json.dumps({**result, "budgets": budgets}, indent=1))
    plot(wanted, result, sweep / "isoflop.png")
    print(f"results: {results} | fit: {sweep / 'fit.json'} | plot: {sweep / 'isoflop.png'}")
    return result


if __name__ == "__main__":
    run_script(main)
