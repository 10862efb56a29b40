"""IsoFLOP scaling sweep, as nanochat master's runs/scaling_laws.sh: pretrain each depth at each training-FLOPs
budget, record validation bits per byte, and find the compute-optimal model size of each budget. Without --flops,
a miniseries (master's runs/miniseries.sh): each depth trained to the config's own horizon.

    python scripts/scaling_laws.py --flops 1e18,2.15e18,4.64e18,1e19 --depths 10,12,14,16,18,20     # 8 GPUs
    python scripts/scaling_laws.py --flops 4e12,8e12 --depths 2,3,4,5 --config configs/cpu_tiny.toml  # CPU
    python scripts/scaling_laws.py --depths 12,14,16,18,20,22,24,26 --config configs/d20.toml         # miniseries

Each (budget, depth) is scripts/base_train.py in a subprocess with --model.depth, --train.target_flops and
--train.num_iterations=-1, after every other argument (--config and config overrides, passed through). It runs in
its own home, <home>/scaling/<label>/d<depth>_<budget>, linked to the home's tokenizer (train it first:
tok_train.py), data shards, eval bundle and compile cache, so each downloads once; its checkpoints are deleted when
it ends (--keep-checkpoints keeps them). Its row goes to <home>/scaling/<label>/results.csv as soon as it ends, so a
rerun with the same base_train arguments (sweep.json keeps them) trains only the pairs not there yet.

A miniseries runs base_train.py with --model.depth only (the horizon is the config's: train.num_iterations,
train.target_flops or train.target_param_data_ratio, as base_train.py picks), in <home>/scaling/<label>/d<depth>, and ends with the table, val bpb
and CORE over training FLOPs in miniseries.png; its rows' flops_budget is the FLOPs each run trained for.

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
    p.add_argument("--flops", default=None, help="training-FLOPs budgets, comma-separated (e.g. 1e18,1e19); none: a "
                   "miniseries")
    p.add_argument("--depths", required=True, help="model depths, comma-separated (e.g. 10,12,14)")
    p.add_argument("--label", default=None, help="the sweep's folder under <home>/scaling (default: sweep, or "
                   "miniseries)")
    p.add_argument("--keep-checkpoints", action="store_true")
    args, rest = p.parse_known_args(argv)
    try:
        args.flops = sorted({float(f) for f in args.flops.split(",")}) if args.flops is not None else []
        args.depths = sorted({int(d) for d in args.depths.split(",")})
    except ValueError:
        p.error(f"--flops {args.flops!r} and --depths {args.depths!r} must be comma-separated numbers")
    if min(args.flops + args.depths) <= 0:
        p.error("--flops and --depths must be positive")
    args.label = args.label or ("sweep" if args.flops else "miniseries")
    for flag in ("--model.depth", "--train.target_flops", "--train.num_iterations")[:3 if args.flops else 1]:
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


def train_one(flops: float | None, depth: int, passthrough: list[str], model, sweep: Path,
              keep_checkpoints: bool) -> dict:
    """base_train.py at this depth for this budget (None: the config's horizon) in its own home; returns its
    results.csv row. model: the passthrough's ModelConfig at the tokenizer's vocabulary (the row's width and matmul
    parameters come from it)."""
    from nanochat_jax.model import matmul_params

    model = dataclasses.replace(model, depth=depth)
    home = sweep / (f"d{depth}_{flops:.6g}" if flops else f"d{depth}")
    home.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        shared, link = artifacts_dir(create=False) / name, home / name
        if shared.exists() and not (link.exists() or link.is_symlink()):
            link.symlink_to(shared.resolve())
    horizon = [f"--train.target_flops={flops!r}", "--train.num_iterations=-1"] if flops else []
    overrides = [*passthrough, f"--model.depth={depth}", *horizon]
    env = {**os.environ, "NANOCHAT_JAX_HOME": str(home), "PYTHONPATH": os.pathsep.join(
               filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "JAX_COMPILATION_CACHE_DIR": compilation_cache_dir()}
    log = home / "base_train.log"
    print(f"=== {f'budget {flops:.3g} FLOPs, ' if flops else ''}depth {depth} (width {model.n_embd}): log {log}",
          flush=True)
    with log.open("w") as f, subprocess.Popen([sys.executable, str(ROOT / "scripts" / "base_train.py"), *overrides],
                                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                              text=True) as proc:
        for line in proc.stdout:
            f.write(line)
            if "val bpb" in line or line.startswith(("done:", "batch:")):
                print(f"    {line.strip()[-160:]}", flush=True)
    if proc.returncode:
        tail = "".join(log.read_text().splitlines(True)[-15:])
        raise UserError(f"base_train.py at depth {depth}{f' for {flops:.3g} FLOPs' if flops else ''} exited with "
                        f"{proc.returncode} (the rows before it are kept; rerun to go on): {log}\n{tail}")
    summary = json.loads((home / "report" / "base_train.json").read_text())
    if not keep_checkpoints:
        shutil.rmtree(home / "checkpoints", ignore_errors=True)
    return {"flops_budget": flops or summary["flops_per_token"] * summary["tokens"], "depth": depth,
            "width": model.n_embd, "matmul_params": matmul_params(model),
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


def check_record(sweep: Path, label: str, passthrough: list[str], miniseries: bool) -> None:
    """sweep.json keeps the base_train.py arguments and the kind of the rows in results.csv: a rerun with others
    would mix rows that do not compare."""
    record = sweep / "sweep.json"
    if record.exists():
        was = json.loads(record.read_text())
        if was.get("miniseries", False) != miniseries:
            raise UserError(f"sweep '{label}' is {'a miniseries' if was.get('miniseries') else 'an isoFLOP sweep'}: "
                            "pass another --label")
        if was["base_train_args"] != passthrough:
            before, now = (" ".join(a) or "(no arguments)" for a in (was["base_train_args"], passthrough))
            raise UserError(f"sweep '{label}' was run with base_train.py {before}; its rows would not compare with "
                            f"{now}: pass those, or another --label")
    record.write_text(json.dumps({"base_train_args": passthrough, "miniseries": miniseries}))


def main(argv: list[str] | None = None) -> dict:
    args, passthrough = parse_args(sys.argv[1:] if argv is None else argv)
    if not artifacts_dir("tokenizer", create=False).is_dir():
        raise UserError(f"no tokenizer in {artifacts_dir(create=False)}: train one first (scripts/tok_train.py with "
                        "the same --config)")
    from nanochat_jax.config import load_config
    from nanochat_jax.core_eval import EVAL_BUNDLE_URL, BundleError, ensure_bundle
    from nanochat_jax.tokenizer import load_tokenizer

    cfg = load_config(passthrough)  # (a bad override fails here, before any training)
    sweep, miniseries = artifacts_dir("scaling", args.label), not args.flops
    check_record(sweep, args.label, passthrough, miniseries)
    (artifacts_dir(create=False) / "data").mkdir(exist_ok=True)  # the runs' shard downloads land in the home
    if cfg.train.core_every > 0 and not cfg.eval.bundle_dir:  # (fetched here once, not by every run)
        try:
            ensure_bundle(None, cfg.eval.bundle_url or EVAL_BUNDLE_URL)
        except BundleError as e:
            print(f"no CORE estimates in the runs: {e}", flush=True)
    results = sweep / "results.csv"
    rows = read_rows(results)
    done = {int(r["depth"]) if miniseries else (r["flops_budget"], int(r["depth"])) for r in rows}
    pairs = [(None, d) for d in args.depths] if miniseries else [(f, d) for f in args.flops for d in args.depths]
    todo = [(f, d) for f, d in pairs if (d if miniseries else (f, d)) not in done]
    print(f"sweep {args.label}: {f'{len(args.flops)} budgets x ' if args.flops else 'miniseries of '}"
          f"{len(args.depths)} depths, {len(done)} done earlier, {len(todo)} to train | base_train.py "
          f"{' '.join(passthrough)} | {results}", flush=True)
    if todo:  # base_train takes the vocabulary from the tokenizer
        model = dataclasses.replace(cfg.model, vocab_size=load_tokenizer().vocab_size)
    for flops, depth in todo:
        row = train_one(flops, depth, passthrough, model, sweep, args.keep_checkpoints)
        append_row(results, row)
        rows.append(row)
    wanted = [r for r in rows if int(r["depth"]) in args.depths and (miniseries or r["flops_budget"] in args.flops)]
    return finish_miniseries(wanted, sweep) if miniseries else finish_isoflop(wanted, sweep)


def finish_isoflop(rows: list[dict], sweep: Path) -> dict:
    result = fit(rows)
    print("\n".join(describe(rows, result)))
    budgets = {f"{c:g}": entry for c, entry in result["budgets"].items()}  # (JSON keys are strings)
    (sweep / "fit.json").write_text(json.dumps({**result, "budgets": budgets}, indent=1))
    plot(rows, result, sweep / "isoflop.png")
    print(f"results: {sweep / 'results.csv'} | fit: {sweep / 'fit.json'} | plot: {sweep / 'isoflop.png'}")
    return result


def finish_miniseries(rows: list[dict], sweep: Path) -> dict:
    """The miniseries' table, and val bpb and CORE over training FLOPs in miniseries.png."""
    rows = sorted(rows, key=lambda r: r["depth"])
    print(f"{'depth':>5s} {'width':>6s} {'matmul params':>14s} {'steps':>7s} {'tokens':>15s} {'tok/param':>9s} "
          f"{'FLOPs':>9s} {'val bpb':>8s} {'CORE':>7s} {'time s':>8s}")
    for r in rows:
        core = "" if r["core_metric"] is None else f"{r['core_metric']:.4f}"
        print(f"{int(r['depth']):5d} {int(r['width']):6d} {int(r['matmul_params']):14,d} {int(r['steps']):7,d} "
              f"{int(r['tokens']):15,d} {r['tokens'] / r['matmul_params']:9.1f} {r['flops_budget']:9.3g} "
              f"{r['val_bpb']:8.4f} {core:>7s} {r['wall_time_s']:8.0f}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r["core_metric"] is not None]
    fig, axes = plt.subplots(1, 2 if scored else 1, figsize=(11 if scored else 6, 4.2), squeeze=False)
    for ax, name, runs in ((axes[0][0], "val_bpb", rows), *(((axes[0][1], "core_metric", scored),) if scored else ())):
        ax.plot([r["flops_budget"] for r in runs], [r[name] for r in runs], "o-")
        for r in runs:
            ax.annotate(f"d{int(r['depth'])}", (r["flops_budget"], r[name]), textcoords="offset points", xytext=(4, 4))
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel({"val_bpb": "validation bits per byte", "core_metric": "CORE"}[name])
        ax.grid(alpha=0.3)
    fig.suptitle("miniseries: each depth trained to the config's horizon")
    fig.tight_layout()
    fig.savefig(sweep / "miniseries.png", dpi=110)
    plt.close(fig)
    print(f"results: {sweep / 'results.csv'} | plot: {sweep / 'miniseries.png'}")
    return {"series": rows}


if __name__ == "__main__":
    run_script(main)
