"""Will it fit? Compile a config's train, eval and decode programs for hardware you do not have, on this machine.

    python scripts/plan.py --config configs/d20.toml --target 8xh100
    python scripts/plan.py --config configs/tpu_v6e_8.toml --target v6e-8 --model.remat=dots_saveable
    python scripts/plan.py --config configs/d20.toml --target 8xh100 --sweep   # every mesh, rows and remat

Prints, per device of the target: parameter + optimizer bytes, temporaries, the total against the chip's memory
(fits with 10% headroom or not), FLOPs per call, bytes each kind of collective moves, and a roofline estimate of the
step time and tokens/s (nanochat_jax/plan.py says how). Nothing runs on a device and nothing is downloaded: the
compilers come from the plan extra (`PLAN=1 bash scripts/ensure_env.sh`). Other options: --decode-rows,
--prompt-len, --cache-len, --programs train,bpb,prefill,decode, --out DIR (default <home>/plans/<run>_<target>). Any config
override (--model.depth=26, --mesh.fsdp=8, --train.device_batch_size=16) works as in the training scripts.
--sweep compiles the train step for every (data, fsdp, tensor) of the device count, halving the rows and turning
remat on only until it fits, caches each answer in the plan folder, draws sweep.png and prints the best override.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanochat_jax.targets import TARGET_HELP, parse_target, target_devices, use_plan_packages  # noqa: E402

use_plan_packages()  # before JAX starts

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

GB = 1e9
REMATS = ("none", "dots_saveable", "block")


def options(argv: list[str]):
    """(the planner's own options, the config's: --config and dotted overrides)."""
    from nanochat_jax.config import asks_for_help
    from nanochat_jax.plan import PROGRAMS

    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--target")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--decode-rows", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--cache-len", type=int)
    p.add_argument("--programs", default=",".join(PROGRAMS))
    p.add_argument("--out")
    own, rest = p.parse_known_args(argv)
    if not own.target and not asks_for_help(rest):  # (--help: load_config prints the usage)
        raise SystemExit(f"plan: --target is required ({TARGET_HELP})")
    unknown = set(own.programs.split(",")) - set(PROGRAMS)
    if unknown:
        raise SystemExit(f"plan: --programs {own.programs}: no program {', '.join(sorted(unknown))} (the programs: "
                         f"{','.join(PROGRAMS)})")
    if own.decode_rows < 1 or own.prompt_len < 1 or (own.cache_len is not None and own.cache_len < 1):
        raise SystemExit("plan: --decode-rows, --prompt-len and --cache-len must be >= 1")
    return own, rest


def describe(name: str, plan, target) -> list[str]:
    from nanochat_jax.plan import fits, roofline

    if plan.error:
        return [f"{name:8s} does not compile: {plan.error}"]
    r = roofline(plan, target)
    verdict = "fits" if fits(plan, target) else "DOES NOT FIT"
    lines = [f"{name:8s} {plan.total / GB:7.2f} GB of {target.chip.memory / GB:.1f} ({verdict}, "
             f"{1 - plan.total / target.chip.memory:.0%} free) | arguments {plan.arguments / GB:.2f} GB, "
             f"temporaries {plan.temporaries / GB:.2f} GB | {plan.flops / 1e12:.2f} TFLOP"
             + (f" (compiler counts {plan.compiler_flops / 1e12:.2f})" if plan.compiler_flops else "")
             + (f" | fp8 GEMMs: {plan.fp8_dots} of {plan.dots} products" if plan.fp8_dots else "")]
    moved = ", ".join(f"{k} {v / GB:.3f}" for k, v in sorted(plan.collectives.items()) if v) or "none"
    lines.append(f"{'':8s} collectives GB sent per device: {moved}"
                 + (f" ({plan.network_bytes / GB:.3f} over the network between slices/nodes)"
                    if plan.network_bytes else ""))
    lines.append(f"{'':8s} roofline: compute {r['compute'] * 1e3:.1f} ms, hbm {r['hbm'] * 1e3:.1f} ms, link "
                 f"{r['link'] * 1e3:.1f} ms, network {r['network'] * 1e3:.1f} ms -> {r['step'] * 1e3:.1f} ms "
                 f"({r['bound']}-bound), {plan.tokens / r['step']:,.0f} tokens/s")
    return lines


def train_plan(trial, target, devices, cache: dict, cache_file: Path):
    """The train step's ProgramPlan under a trial config: from the cache, or compiled and added to it; None when
    its rows do not divide train.total_batch_size."""
    import jax

    from nanochat_jax.config import ConfigError
    from nanochat_jax.plan import ProgramPlan, plan_programs

    key = hashlib.sha256(json.dumps([target.name, jax.__version__, dataclasses.asdict(trial.model),
                                     dataclasses.asdict(trial.mesh), trial.train.device_batch_size,
                                     trial.train.total_batch_size, trial.train.fp8, dataclasses.asdict(trial.optim)],
                                    sort_keys=True).encode()).hexdigest()
    if key in cache:
        return ProgramPlan(**cache[key])
    try:
        plan = plan_programs(trial, target, devices, programs=("train",))["train"]
    except ConfigError:
        return None
    cache[key] = dataclasses.asdict(plan)
    cache_file.write_text(json.dumps(cache))
    return plan


def sweep(cfg, target, devices, folder: Path) -> bool:
    """Every mesh of the device count; per mesh the config's rows and remat first, then fewer rows / more remat
    until the train step fits. Answers are cached in folder/sweep_cache.json. False when no mesh fits."""
    from nanochat_jax.model import flops_per_token
    from nanochat_jax.plan import fits, mesh_options, roofline

    cache_file = folder / "sweep_cache.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    meshes = mesh_options(len(devices), cfg.model.n_head, cfg.model.n_kv_heads)
    rows0 = cfg.train.device_batch_size
    remats = REMATS[REMATS.index(cfg.model.remat):]
    results = []
    for m, mesh in enumerate(meshes):
        for remat in remats:
            rows, plan = rows0, None
            while rows >= 1:
                trial = dataclasses.replace(cfg, mesh=mesh, model=dataclasses.replace(cfg.model, remat=remat),
                                            train=dataclasses.replace(cfg.train, device_batch_size=rows))
                label = f"data={mesh.data} fsdp={mesh.fsdp} tensor={mesh.tensor} rows={rows} remat={remat}"
                start = time.time()
                plan = train_plan(trial, target, devices, cache, cache_file)
                if plan is None:  # these rows do not divide train.total_batch_size on this mesh: fewer may
                    rows //= 2
                    continue
                ok = fits(plan, target)
                print(f"[{m + 1}/{len(meshes)}] {label}: " + ("does not compile" if plan.error else
                      f"{plan.total / GB:.1f} GB, {'fits' if ok else 'too big'}") + f" ({time.time() - start:.0f} s)",
                      flush=True)
                if ok:
                    r = roofline(plan, target)
                    mfu = flops_per_token(trial.model) * plan.tokens / r["step"] / (len(devices) * target.chip.peak_flops)
                    results.append((label, trial, plan, r, mfu))
                    break
                rows //= 2
            if plan is not None and fits(plan, target):
                break  # more remat only costs time once it fits
    if not results:
        print("no mesh fits: try a smaller model or sequence, or more devices")
        return False
    results.sort(key=lambda x: -x[2].tokens / x[3]["step"])
    print(f"\n{'setting':60s} {'GB/dev':>7s} {'est. ms':>8s} {'tokens/s':>12s} {'MFU':>5s}  bound")
    for label, _, plan, r, mfu in results:
        print(f"{label:60s} {plan.total / GB:7.1f} {r['step'] * 1e3:8.1f} {plan.tokens / r['step']:12,.0f} "
              f"{mfu:5.0%}  {r['bound']}")
    label, best, *_ = results[0]
    print(f"\nrecommended: --mesh.data={best.mesh.data} --mesh.fsdp={best.mesh.fsdp} --mesh.tensor={best.mesh.tensor} "
          f"--train.device_batch_size={best.train.device_batch_size} --model.remat={best.model.remat}")
    chart(results, target, folder / "sweep.png")
    return True


def chart(results, target, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r[0].replace(" remat=", "\n").replace(" rows=", " r") for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(results)), 4.5))
    a.bar(range(len(results)), [r[2].total / GB for r in results])
    a.axhline(target.chip.memory / GB, color="red", linestyle="--", label="device memory")
    a.set_title(f"memory per device on {target.name} (GB)")
    b.bar(range(len(results)), [r[3]["step"] * 1e3 for r in results], color="tab:orange")
    b.set_title("roofline step time (ms)")
    for ax in (a, b):
        ax.set_xticks(range(len(results)), labels, fontsize=6, rotation=60, ha="right")
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"chart: {path}")


def main(argv: list[str] | None = None) -> int:
    from nanochat_jax.common import artifacts_dir
    from nanochat_jax.config import load_config, to_toml
    from nanochat_jax.plan import fits, plan_programs
    from nanochat_jax.sharding import mesh_shape

    own, rest = options(list(sys.argv[1:] if argv is None else argv))
    cfg = load_config(rest)
    target = parse_target(own.target)
    print(to_toml(cfg))
    devices = target_devices(target)
    folder = Path(own.out) if own.out else artifacts_dir("plans", f"{cfg.run}_{target.name}")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"target {target.name}: {len(devices)} x {target.chip.name} ({target.topology}, {target.num_slices} "
          f"slice(s)); peak {target.chip.peak_flops / 1e12:.0f} TFLOP/s, HBM {target.chip.hbm_bandwidth / 1e12:.2f} "
          f"TB/s, memory {target.chip.memory / GB:.1f} GB per device [{target.chip.source}]")
    if own.sweep:
        return 0 if sweep(cfg, target, devices, folder) else 3
    start = time.time()
    plans = plan_programs(cfg, target, devices, decode_rows=own.decode_rows, prompt_len=own.prompt_len,
                          cache_len=own.cache_len, programs=tuple(own.programs.split(",")))
    data, fsdp, tensor = mesh_shape(cfg.mesh, len(devices))
    print(f"mesh data={data} fsdp={fsdp} tensor={tensor}, "
          f"{cfg.train.device_batch_size} rows x {cfg.model.sequence_len} per device per micro-step, "
          f"remat={cfg.model.remat}, compiled in {time.time() - start:.0f} s")
    for name, plan in plans.items():
        print("\n".join(describe(name, plan, target)))
    (folder / "plan.json").write_text(json.dumps({k: dataclasses.asdict(v) for k, v in plans.items()}, indent=1))
    print(f"plan: {folder / 'plan.json'}")
    return 0 if all(fits(p, target) for p in plans.values()) else 3


if __name__ == "__main__":
    from nanochat_jax.common import run_script

    run_script(main)
