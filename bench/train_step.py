"""Training-step throughput: compile time, step time, tokens/s and MFU of the real jitted train step.

    python bench/train_step.py --config configs/d20.toml [--model.depth=12 ...] [--steps 10] [--warmup 3]
                               [--micro-steps 1] [--cpu-devices 8] [--xla-dump DIR]

Builds the training state and step exactly as scripts/base_train.py does (same mesh, shardings, optimizer,
donated state), but feeds synthetic random tokens, so it needs no tokenizer or data. One step = --micro-steps
micro-batches of (device_batch_size x batch-sharded devices) rows of sequence_len tokens.

MFU = flops_per_token * tokens/s / peak, against two peaks for the whole mesh:
  measured:  a large matmul in the model's compute dtype run on every device at once (8192^3 on accelerators,
             1024^3 on CPU), so it is the best this machine does on one dense matmul;
  datasheet: common.peak_flops_per_device(kind) x devices, when the device kind is known (bf16 dense).
Prints a one-line summary and a JSON line starting with `JSON `. With --xla-dump DIR, XLA's dumps go to DIR
and the optimized HLO of the step to DIR/train_step.hlo.txt, and a summary of that HLO is printed
(collectives by type, the largest buffer with the vocabulary in its shape, the batched Newton-Schulz matmuls).
An attention_impl meant for another backend (cudnn off GPUs, splash off TPUs) is replaced by xla.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

# the model fields that nanochat's first release has fixed (bench/nanochat_ref.py builds its GPT from the shapes alone)
FIRST_RELEASE_FIELDS = ("softcap", "param_dtype", "window_pattern", "value_embeds", "smear", "backout", "layer_lambdas",
                        "qk_scale", "pad_vocab_to")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    parser.add_argument("--micro-steps", type=int, default=1, help="micro-batches accumulated per step")
    parser.add_argument("--cpu-devices", type=int, default=0, help="simulate this many CPU devices (CPU only)")
    parser.add_argument("--matmul-size", type=int, default=0, help="peak matmul size (default 8192, CPU 1024)")
    parser.add_argument("--xla-dump", default="", help="directory for XLA dumps and the optimized HLO")
    parser.add_argument("--compile-only", action="store_true", help="stop after compiling (HLO and memory only)")
    parser.add_argument("--breakdown", action="store_true", help="also time the forward pass and forward+backward "
                        "alone (same batch, jitted separately); the rest of the step is the optimizer")
    parser.add_argument("--profile", default="", help="trace 3 steps with jax.profiler into this directory and "
                        "print where the device time goes (top kernels, by kind, busy fraction)")
    parser.add_argument("--nanochat-dir", default="", help="also time karpathy/nanochat's torch step from this "
                        "checkout (bench/nanochat_ref.py, same shapes and compute dtype: fp32 runs nanochat's step "
                        "without autocast; optim.ns_dtype=float32 also runs its Newton-Schulz in fp32) and print the "
                        "tokens/s ratio")
    parser.add_argument("--nanochat-python", default=sys.executable, help="the Python that runs nanochat's step (one "
                        "with torch; default this one)")
    args, overrides = parser.parse_known_args(argv)  # the rest are config overrides: --config FILE --section.key=value
    if args.steps < 1 or args.warmup < 0 or args.micro_steps < 1 or args.cpu_devices < 0 or args.matmul_size < 0:
        parser.error("--steps and --micro-steps must be at least 1; --warmup, --cpu-devices and --matmul-size >= 0")
    return args, overrides


def _set_xla_flags(args) -> None:
    """Must run before jax is imported."""
    flags = os.environ.get("XLA_FLAGS", "")
    if args.cpu_devices:
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
        flags += f" --xla_force_host_platform_device_count={args.cpu_devices}"
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.xla_dump:
        flags += f" --xla_dump_to={args.xla_dump} --xla_dump_hlo_as_text"
    os.environ["XLA_FLAGS"] = flags.strip()


def _shape_dims(shape: str) -> list[int]:
    return [int(d) for d in shape.split(",") if d.strip().isdigit()]


DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "pred": 1, "s8": 1, "u8": 1}


def hlo_summary(hlo: str, vocab_size: int) -> dict:
    """Facts from optimized HLO text: collectives by type (async start/done pairs counted once), the
    largest array whose shape contains vocab_size, and the batched Newton-Schulz matmuls (rank-3 dots whose
    leading dimension stacks layers) with their shapes."""
    counts = {}
    for op in COLLECTIVES:
        counts[op] = len(re.findall(rf"[\]}})] {op}(?:-start)?\(", hlo))  # after the result type, tuples too
    largest_v = (0, "")
    for m in re.finditer(r"\b(f32|bf16|f16|s32|pred)\[([0-9,]+)\]", hlo):
        dims = _shape_dims(m.group(2))
        if vocab_size in dims:
            n = DTYPE_BYTES[m.group(1)]
            for d in dims:
                n *= d
            if n > largest_v[0]:
                largest_v = (n, m.group(0))
    ns = sorted(set(re.findall(r"= (bf16|f32)\[(\d+),(\d+),(\d+)\]\{[^}]*\} (?:dot|custom-call|fusion)\(", hlo)))
    return {"collectives": counts, "largest_vocab_buffer": largest_v[1], "largest_vocab_buffer_bytes": largest_v[0],
            "rank3_dot_shapes": [f"{t}[{a},{b},{c}]" for t, a, b, c in ns]}


def _memory(mem) -> dict:
    """Per-device bytes from Compiled.memory_analysis() (None where the backend gives none)."""
    names = ("argument", "output", "temp", "alias")
    return {f"mem_{n}_bytes": getattr(mem, f"{n}_size_in_bytes", None) if mem else None for n in names}


def main(argv=None) -> dict:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    _set_xla_flags(args)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from nanochat_jax.common import device_info, measured_peak_flops, peak_flops_per_device
    from nanochat_jax.config import ModelConfig, load_config
    from nanochat_jax.model import flops_per_token, num_params, runnable_on
    from nanochat_jax.sharding import make_mesh
    from nanochat_jax.train import TrainRun, global_batch

    cfg = load_config(overrides)
    if args.nanochat_dir:  # nanochat's step is its first release's model: a ratio against another model is no ratio
        first = ModelConfig()
        differ = [f"model.{f}={getattr(cfg.model, f)!r}" for f in FIRST_RELEASE_FIELDS
                  if getattr(cfg.model, f) != getattr(first, f)]
        differ += [f"model.n_kv_head={cfg.model.n_kv_head}"] if cfg.model.n_kv_heads != cfg.model.n_head else []
        if differ:
            raise SystemExit(f"train_step.py: --nanochat-dir times nanochat's first-release model, which has no "
                             f"{', '.join(differ)}")
    # nanochat's torch step first, in its own process: once JAX starts it holds most of the GPU's memory
    theirs = run_nanochat(args, cfg) if args.nanochat_dir else None
    info = device_info()
    mesh = make_mesh(cfg.mesh)
    platform = mesh.devices.flat[0].platform
    if runnable_on(cfg.model, platform) != cfg.model:  # cuDNN does not exist there; splash would run interpreted
        print(f"note: {platform} devices, using model.attention_impl=xla instead of {cfg.model.attention_impl}")
        cfg.model = runnable_on(cfg.model, platform)
    n_dev = mesh.size
    rows = cfg.train.device_batch_size * mesh.shape["data"] * mesh.shape["fsdp"]
    T, V, A = cfg.model.sequence_len, cfg.model.vocab_size, args.micro_steps
    tokens_per_step = A * rows * T

    run = TrainRun(cfg.model, cfg.optim, 1000, mesh, cfg.train.seed, fp8=cfg.train.fp8)
    state = run.state
    rng = np.random.default_rng(0)
    micro = [{"inputs": rng.integers(0, V, (rows, T), dtype=np.int32),
              "targets": rng.integers(0, V, (rows, T), dtype=np.int32)} for _ in range(A)]
    batch = global_batch(micro, mesh)

    t0 = time.perf_counter()
    with jax.set_mesh(mesh):  # as the train step itself does, so the model's sharding constraints apply
        lowered = run.jitted.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    lower_s, compile_s = t1 - t0, t2 - t1
    mem = compiled.memory_analysis()
    hlo = None
    if args.xla_dump:
        hlo = compiled.as_text()
        Path(args.xla_dump).mkdir(parents=True, exist_ok=True)
        (Path(args.xla_dump) / "train_step.hlo.txt").write_text(hlo)
    if args.compile_only:
        result = {"config": cfg.run, "depth": cfg.model.depth, "width": cfg.model.n_embd, "vocab": V, "seq": T,
                  "mesh": dict(mesh.shape), "rows": rows, "compile_s": compile_s, **_memory(mem)}
        if hlo is not None:
            result["hlo"] = hlo_summary(hlo, V)
        print("JSON " + json.dumps(result))
        return result

    losses, times = [], []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        loss = metrics["loss"].block_until_ready()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            losses.append(float(loss))
    step_s = statistics.median(times)
    tok_s = tokens_per_step / step_s
    flops = flops_per_token(cfg.model)
    achieved = flops * tok_s

    # measured peak: one size x size matmul per device, all devices at once
    size = args.matmul_size or (1024 if info["backend"] == "cpu" else 8192)
    dtype = jnp.dtype(cfg.model.compute_dtype)
    peak_measured = measured_peak_flops(mesh.devices.flat, cfg.model.compute_dtype, size)
    peak_datasheet = peak_flops_per_device(info["device_kind"]) if info["backend"] != "cpu" else None  # CPU: measured
    peak_datasheet = peak_datasheet * n_dev if peak_datasheet else None

    result = {
        "config": cfg.run, "depth": cfg.model.depth, "width": cfg.model.n_embd, "vocab": V, "seq": T,
        "params": num_params(cfg.model), "compute_dtype": cfg.model.compute_dtype,
        "attention_impl": cfg.model.attention_impl, "remat": cfg.model.remat, "loss_chunk": cfg.model.loss_chunk,
        "device_kind": info["device_kind"], "backend": info["backend"], "num_devices": n_dev,
        "mesh": dict(mesh.shape), "device_batch_size": cfg.train.device_batch_size, "micro_steps": A,
        "tokens_per_step": tokens_per_step, "lower_s": lower_s, "compile_s": compile_s,
        "step_s_median": step_s, "step_s_min": min(times), "tokens_per_sec": tok_s,
        "flops_per_token": flops, "achieved_flops": achieved,
        "matmul_size": size, "matmul_dtype": str(dtype), "peak_measured_flops": peak_measured,
        "mfu_measured": achieved / peak_measured,
        "peak_datasheet_flops": peak_datasheet, "mfu_datasheet": achieved / peak_datasheet if peak_datasheet else None,
        "loss_first": losses[0], "loss_last": losses[-1],
        **_memory(mem),
    }
    if hlo is not None:
        result["hlo"] = hlo_summary(hlo, V)
    # the headline first (a run cut short by a time limit still has it); profile and breakdown follow
    ds = f"{100 * result['mfu_datasheet']:.1f}%" if peak_datasheet else "n/a"
    print(f"{cfg.run} d{cfg.model.depth} ({result['params'] / 1e6:.1f}M params) on {n_dev} x {info['device_kind']} "
          f"mesh {dict(mesh.shape)} | batch {A}x{rows}x{T} {cfg.model.compute_dtype} | compile {compile_s:.1f}s | "
          f"step {1e3 * step_s:.1f} ms | {tok_s:,.0f} tok/s | MFU {100 * result['mfu_measured']:.1f}% of measured "
          f"{peak_measured / 1e12:.2f} TFLOP/s ({size}^3 {dtype}) | {ds} of datasheet")
    if theirs is not None:
        # per device: nanochat's step runs on one; a CPU's host devices share the cores nanochat's step has to itself,
        # so there the whole CPU against nanochat's step on the whole mesh's rows (run_nanochat)
        per, what = (1, "on the whole CPU") if platform == "cpu" else (n_dev, "per device")
        ratio = tok_s / per / theirs["tokens_per_sec"]
        result["nanochat"] = {**theirs, "ratio": ratio}
        print(f"RATIO ours/nanochat tokens/s {what} = {ratio:.3f} ({tok_s / per:,.0f} vs "
              f"{theirs['tokens_per_sec']:,.0f}); flops/token ours {flops:.4e} nanochat {theirs['flops_per_token']:.4e}")
    print("JSON " + json.dumps(result))
    if args.profile or args.breakdown:
        if args.profile:
            result["profile"] = profile_steps(args.profile, compiled, state, batch)
            state = result["profile"].pop("state")
        if args.breakdown:
            result["breakdown"] = breakdown(args, run.step_graphdef, state, run.shardings, mesh, batch, step_s)
        print("JSON " + json.dumps(result))  # again, with the profile and breakdown
    return result


KERNEL_KINDS = (  # (kind, substrings of a lower-cased kernel / op name), first match wins
    ("attention", ("cudnn", "flash", "fmha", "attention")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "dot", "matmul", "ynn_fusion")),
    ("collective", ("nccl", "all-gather", "all-reduce", "reduce-scatter", "all_gather", "all_reduce")),
    ("copy", ("memcpy", "memset", "copy", "transpose")),
    ("fusion", ("fusion", "loop_", "input_", "reduce", "convert", "scatter", "gather")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def trace_summary(trace_file: str | Path, steps: int, top: int = 15) -> dict:
    """Device time by kernel from a perfetto trace (`jax.profiler.trace(..., create_perfetto_trace=True)`).

    Counts complete events ('X') on device processes ('/device:...'); with none (the CPU backend), the XLA
    compute threads of the host ('tf_XLA...' threads). busy = summed kernel time / traced wall span."""
    import gzip
    with gzip.open(trace_file, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device = [e for e in complete if "/device:" in procs.get(e["pid"], "")]
    streams = [e for e in device if threads.get((e["pid"], e["tid"]), "").startswith("Stream #")]
    device = streams or device  # GPU: kernels on the CUDA streams (other lines repeat them as XLA ops / modules)
    if not device:  # CPU backend: XLA runs its thunks on the host's tf_XLA* threads
        device = [e for e in complete if threads.get((e["pid"], e["tid"]), "").startswith("tf_XLA")
                  and not e["name"].startswith(("ThreadpoolListener", "SlinkyThreadPool", "ThunkExecutor"))]
    by_name, by_kind = {}, {}
    for e in device:
        by_name[e["name"]] = by_name.get(e["name"], 0.0) + e["dur"]
        kind = kernel_kind(e["name"])
        by_kind[kind] = by_kind.get(kind, 0.0) + e["dur"]
    total_us = sum(by_name.values())
    span_us = (max(e["ts"] + e["dur"] for e in device) - min(e["ts"] for e in device)) if device else 0.0
    ms_per_step = lambda us: us / 1e3 / steps  # noqa: E731
    return {"steps": steps, "kernel_ms_per_step": ms_per_step(total_us), "span_ms_per_step": ms_per_step(span_us),
            "busy": total_us / span_us if span_us else 0.0,
            "by_kind_ms_per_step": {k: ms_per_step(v) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels": [(name[:120], ms_per_step(us)) for name, us in
                            sorted(by_name.items(), key=lambda kv: -kv[1])[:top]]}


def profile_steps(directory: str, compiled, state, batch, steps: int = 3) -> dict:
    """Traces `steps` train steps and summarises the trace; returns the summary plus the final state."""
    import jax
    with jax.profiler.trace(directory, create_perfetto_trace=True):
        for _ in range(steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    trace_file = max(Path(directory).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    summary = trace_summary(trace_file, steps)
    print(f"profile ({trace_file}): kernels {summary['kernel_ms_per_step']:.1f} ms/step over a span of "
          f"{summary['span_ms_per_step']:.1f} ms/step (busy {100 * summary['busy']:.0f}%)")
    print("  by kind (ms/step): " + ", ".join(f"{k} {v:.1f}" for k, v in summary["by_kind_ms_per_step"].items()))
    for name, ms in summary["top_kernels"]:
        print(f"  {ms:8.2f} ms  {name}")
    return {**summary, "state": state}


def _median_seconds(fn, args, repeat: int, warmup: int) -> float:
    import jax
    times = []
    for i in range(warmup + repeat):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def breakdown(args, graphdef, state, shardings, mesh, batch, step_s: float) -> dict:
    """Median seconds of the loss forward alone and of forward+backward alone (the train step's own loss,
    shardings and micro-step scan, minus the optimizer); optimizer = step - forward+backward."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nanochat_jax.train import lm_loss, microbatch_sharding, summed_grads

    def forward(params, batch):
        return jnp.mean(jax.lax.map(lambda micro: lm_loss(nnx.merge(graphdef, params), micro), batch))

    def forward_backward(params, batch):
        return summed_grads(graphdef, params, batch)

    in_sh = (shardings.params, microbatch_sharding(mesh))
    out = {}
    with jax.set_mesh(mesh):
        for name, fn in (("forward", forward), ("forward_backward", forward_backward)):
            jitted = jax.jit(fn, in_shardings=in_sh).lower(state.params, batch).compile()
            out[f"{name}_s"] = _median_seconds(jitted, (state.params, batch), args.steps, args.warmup)
    out["optimizer_s"] = step_s - out["forward_backward_s"]
    print(f"breakdown: forward {1e3 * out['forward_s']:.1f} ms | forward+backward {1e3 * out['forward_backward_s']:.1f} ms"
          f" | optimizer (step - fwd+bwd) {1e3 * out['optimizer_s']:.1f} ms | step {1e3 * step_s:.1f} ms")
    return out


def run_nanochat(args, cfg) -> dict:
    """Times karpathy/nanochat's own step (bench/nanochat_ref.py train, one device) on our shapes per device (on a
    CPU split into host devices: on all their rows, as they share the CPU)."""
    from nanochat_ref import run

    from nanochat_jax.sharding import mesh_shape
    device = "cpu" if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") else ""  # "": a GPU if torch sees one
    m, rows = cfg.model, cfg.train.device_batch_size
    if device == "cpu":  # the rows of all host devices, which share this CPU (ours is timed on the whole CPU)
        count = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
        data, fsdp, _ = mesh_shape(cfg.mesh, int(count.group(1)) if count else 1)
        rows *= data * fsdp
    return run(args.nanochat_python, "train", [
        "--nanochat-dir", args.nanochat_dir, "--depth", str(m.depth), "--width", str(m.n_embd), "--heads", str(m.n_head),
        "--dtype", "float32" if m.compute_dtype == "float32" else "bfloat16", "--vocab", str(m.vocab_size),
        "--ns-dtype", "float32" if cfg.optim.ns_dtype == "float32" else "bfloat16",
        "--device-batch-size", str(rows), "--seq", str(m.sequence_len),
        "--micro-steps", str(args.micro_steps), "--steps", str(args.steps), "--warmup", str(args.warmup),
        *(["--device", device] if device else [])])


if __name__ == "__main__":
    main()
