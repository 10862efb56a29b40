"""Shared plumbing: user errors, the scripts' checkpoint flags, the artifacts directory, device info, logging on
process 0, timers, peak FLOP/s.

Every artifact (tokenizer, data cache, checkpoints, report) lives under one home directory:
`$NANOCHAT_JAX_HOME`, default `~/.cache/nanochat_jax`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import time
from pathlib import Path

HOME_ENV = "NANOCHAT_JAX_HOME"


class UserError(Exception):
    """Bad input from the user: a config value, data file, checkpoint, task or tokenizer. Each module's error class
    derives from it; its message names what is wrong, and the scripts print it on one line (run_script)."""


def run_script(main) -> None:
    """A script's `if __name__ == "__main__"`: compiled programs are kept on disk (enable_compilation_cache);
    main()'s integer return is the exit code; a UserError ends the process with "script: message" on stderr (named
    like the scripts' own messages, e.g. "chat_rl: ...") and exit code 1, without a traceback."""
    enable_compilation_cache()
    try:
        code = main()
    except UserError as e:
        # one line also when the message quotes a library's multi-line error (pyarrow's on a corrupt file); the
        # spaces within a line stay (a path "my  data" is named as it is)
        one_line = re.sub(r"\s*[\r\n]\s*", " ", str(e).strip())
        print(f"{Path(sys.argv[0]).stem}: {one_line}", file=sys.stderr, flush=True)
        # the line stays the last: futures of the failed work (e.g. Orbax's writes to a full disk) that nothing
        # awaited any more would log their tracebacks as they are collected at exit
        logging.getLogger("asyncio").disabled = True
        raise SystemExit(1) from None
    raise SystemExit(code if isinstance(code, int) else 0)


def add_checkpoint_flags(parser, default: str = "sft") -> None:
    """-i/--source, -s/--step, --depth: the checkpoint a chat or export script loads (by default the latest)."""
    parser.add_argument("-i", "--source", default=default, choices=["base", "mid", "sft", "rl"], help="checkpoint stage")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--depth", type=int, default=None, help="model depth (default: most recently written)")


def load_checkpoint(args):
    """(model, tokenizer, meta) of the checkpoint that add_checkpoint_flags' flags name; a UserError ("cannot load
    the sft checkpoint: why") when it is missing or unreadable."""
    from nanochat_jax.checkpoint import CheckpointError, load_model

    try:
        return load_model(args.source, step=args.step, depth=args.depth)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise UserError(f"cannot load the {args.source} checkpoint: {e}") from None


def artifacts_dir(*parts: str, create: bool = True) -> Path:
    """Path under the artifacts home, e.g. artifacts_dir("tokenizer")."""
    home = Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "nanochat_jax").expanduser()
    path = home.joinpath(*parts)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomically(path: Path, text: str) -> None:
    """Write beside path, then rename over it: a kill mid-write leaves the old file or the new one, never half."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def compilation_cache_dir() -> str:
    """Where compiled XLA programs are kept: $JAX_COMPILATION_CACHE_DIR, or else <home>/xla_cache."""
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(artifacts_dir("xla_cache"))


def enable_compilation_cache() -> None:
    """Keep compiled XLA programs on disk, in $JAX_COMPILATION_CACHE_DIR or else <home>/xla_cache: a stage reuses
    what an earlier one compiled (the chat evals of mid, SFT and RL; base_loss after base_train), SFT and RL their
    steps of each padded width, and a chat launched again does not stall mid-reply compiling its prefill and decode
    shapes. Before jax is imported this only sets the variable jax reads then (a script that never uses jax, or
    --help, does not pay for importing it)."""
    directory = compilation_cache_dir()
    if "jax" not in sys.modules:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)


def process_index() -> int:
    import jax

    return jax.process_index()


def is_main_process() -> bool:
    return process_index() == 0


def print0(*args, **kwargs) -> None:
    """print() on process 0 only (multi-host runs print once)."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def device_info() -> dict:
    import jax

    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "num_devices": len(devices),
        "num_local_devices": jax.local_device_count(),
        "num_processes": jax.process_count(),
        "jax_version": jax.__version__,
    }


# Datasheet dense bf16 peak FLOP/s per device, used for MFU when the device kind is known.
# The first name found in the device kind counts: the more specific names come first.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # (v5p's device kind)
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def peak_flops_per_device(device_kind: str | None = None, compute_dtype: str = "bfloat16") -> float | None:
    """Datasheet bf16 peak for an accelerator kind (the current device's when None); on CPU, which has no
    datasheet figure, the measured peak of one dense matmul in `compute_dtype`, shared by this host's (simulated)
    devices. None for an unknown accelerator."""
    import jax

    if device_kind is None:
        device_kind = jax.devices()[0].device_kind
    for name, flops in PEAK_BF16_FLOPS.items():
        if name.lower() in device_kind.lower():
            return flops
    if device_kind.lower() == "cpu":
        return cpu_peak_flops(compute_dtype) / jax.local_device_count()
    return None


@functools.cache
def cpu_peak_flops(compute_dtype: str) -> float:
    """FLOP/s of this host's CPU on a 512^3 matmul in compute_dtype (best of 5 rounds; well under a second, once
    per process), and the best figure this machine has given before (<home>/cpu_peak_flops.json, by processor and
    dtype): one busy moment at a stage's start would otherwise lower its peak and inflate its MFU."""
    import json
    import platform

    import jax

    measured = measured_peak_flops(jax.local_devices()[:1], compute_dtype, 512, rounds=5, calls=3)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    path = artifacts_dir() / "cpu_peak_flops.json"
    key = f"{cpu_model() or platform.machine()} {cores} cores {compute_dtype}"
    try:
        seen = json.loads(path.read_text())
        seen = seen if isinstance(seen, dict) else {}
    except (OSError, ValueError):  # none yet, or unreadable: measured afresh
        seen = {}
    best = seen.get(key)
    if not isinstance(best, (int, float)) or measured > best:
        seen[key] = best = measured
        write_atomically(path, json.dumps(seen, indent=1))
    return best


def cpu_model() -> str | None:
    """The processor's model name (Linux's /proc/cpuinfo), or None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def measured_peak_flops(devices, compute_dtype: str, size: int, rounds: int = 5, calls: int = 10) -> float:
    """FLOP/s of `devices` together, each multiplying two random size x size matrices in compute_dtype: the best
    of `rounds`, each `calls` matmuls queued back to back so the host's dispatch hides behind the devices."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    sh = NamedSharding(Mesh(np.array(devices), ("d",)), PartitionSpec("d"))
    mm = jax.jit(lambda a, b: jnp.einsum("dij,djk->dik", a, b), out_shardings=sh)
    ka, kb = jax.random.split(jax.random.key(0))  # random data: zeros or constants run faster than real values
    shape, dtype = (len(devices), size, size), jnp.dtype(compute_dtype)
    a = jax.device_put(jax.random.normal(ka, shape, dtype), sh)
    b = jax.device_put(jax.random.normal(kb, shape, dtype), sh)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready([mm(a, b) for _ in range(calls)])
        best = min(best, (time.perf_counter() - start) / calls)
    return 2 * size ** 3 * len(devices) / best


class Timer:
    """Wall-clock stopwatch: `with Timer() as t: ...; t.seconds`."""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
