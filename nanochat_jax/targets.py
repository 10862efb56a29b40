"""Target hardware for planning a run on a machine you do not have: devices to compile for, and datasheet figures.

A target is named like `8xh100`, `16xh200` (two 8-GPU nodes), `v6e-8`, `v5e-16`, `v5p-8` or `v6e-8x2` (two slices
joined by the data-center network). `target_devices` returns compile-only devices of that target from the real
compilers (libtpu for TPUs, jax's CUDA 12 plugin for NVIDIA GPUs, both from the `plan` extra), so `jax.jit(...)
.lower(...).compile()` on a mesh of them gives the per-device memory, FLOPs and partitioned HLO of the real thing on
a laptop CPU. Nothing runs on a device. `CHIPS` holds the figures the roofline estimates use, with their sources.

The plan extra is kept out of the project's main environment (libtpu and the CUDA plugin print start-up noise in
every JAX process): `bash scripts/ensure_env.sh` installs it into `.venv/plan-site`, and `use_plan_packages` puts
that folder on sys.path before JAX starts.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path

from nanochat_jax.common import UserError

PLAN_SITE = Path(__file__).resolve().parents[1] / ".venv" / "plan-site"


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    platform: str  # "tpu" or "cuda"
    memory: float  # bytes of device memory one program may use
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    link_bandwidth: float  # bytes/s one way per chip inside a slice / node (ICI, NVLink)
    network_bandwidth: float  # bytes/s one way per chip between slices / nodes (DCN, InfiniBand)
    source: str


GIB = 2 ** 30
GPU_MEM_FRACTION = 0.92  # run_gpu.sh's XLA_PYTHON_CLIENT_MEM_FRACTION: the share of a GPU's memory JAX may use
CHIPS = {
    # NVIDIA: dense bf16 without sparsity; NVLink 4 is 900 GB/s both ways; one 400 Gb/s NDR NIC per GPU across nodes.
    # memory: what the device reports (XLA's GPU spec files) times GPU_MEM_FRACTION.
    "h100": Chip("H100 SXM 80GB", "cuda", GPU_MEM_FRACTION * 84_942_979_072, 989e12, 3.35e12, 450e9, 50e9,
                 "NVIDIA H100 Tensor Core GPU datasheet (SXM5)"),
    "h200": Chip("H200 SXM 141GB", "cuda", GPU_MEM_FRACTION * 150_754_820_096, 989e12, 4.8e12, 450e9, 50e9,
                 "NVIDIA H200 Tensor Core GPU datasheet (SXM)"),
    # Cloud TPU system-architecture pages: peak bf16, HBM per chip, bidirectional ICI per chip (halved here), and
    # the per-host NICs divided over the host's chips for the data-center network.
    "v4": Chip("TPU v4", "tpu", 32 * GIB, 275e12, 1.2e12, 150e9, 100e9 / 8 / 4,
               "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", "tpu", 16e9, 197e12, 819e9, 200e9, 2 * 100e9 / 8 / 8,
                "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", "tpu", 95e9, 459e12, 2.765e12, 600e9, 50e9 / 8,  # the page gives DCN per chip: 50 Gbps
                "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e (Trillium)", "tpu", 32e9, 918e12, 1.638e12, 400e9, 4 * 200e9 / 8 / 8,
                "cloud.google.com/tpu/docs/v6e"),
}

# device kinds as jax names a running device -> CHIPS: the first name found counts (the other H100 and H200 parts,
# PCIe, NVL and Grace Hopper, have other bandwidths; "TPU v5" alone is a v5p)
DEVICE_KINDS = {"GH200": None, "H100 PCIe": None, "H100 NVL": None, "H100": "h100", "H200 NVL": None, "H200": "h200",
                "TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5p": "v5p", "TPU v5": "v5p",
                "TPU v6 lite": "v6e", "TPU v6e": "v6e"}


def chip_of(device_kind: str) -> Chip | None:
    """The datasheet figures of a running device's kind (jax's `device.device_kind`), None when not in CHIPS."""
    key = next((k for name, k in DEVICE_KINDS.items() if name.lower() in device_kind.lower()), None)
    return CHIPS.get(key) if key else None


# chips of a v5e / v6e slice -> its 2D topology; v4 / v5p slices are named by TensorCores (2 per chip)
TORUS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
TORUS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"}
GPUS_PER_NODE = 8
TARGET_HELP = "8xh100, 16xh100, 8xh200, v6e-8, v5e-16, v5p-8, v4-8 or a slice times slices like v6e-8x2"


class TargetError(UserError, ValueError):
    """A target name the planner does not know, or one it cannot compile for here (the plan extra missing)."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    chip: Chip
    topology: str  # the compiler's topology name
    num_slices: int  # TPU slices or GPU nodes, joined by the slower network
    num_devices: int

    @property
    def platform(self) -> str:
        return self.chip.platform


def parse_target(name: str) -> Target:
    """A Target from its name (see TARGET_HELP); TargetError names the accepted forms."""
    key = name.strip().lower()
    gpu = re.fullmatch(r"(\d+)x(h100|h200)", key)
    if gpu:
        n = int(gpu.group(1))
        nodes = max(1, n // GPUS_PER_NODE)
        if n < 1 or (n > GPUS_PER_NODE and n % GPUS_PER_NODE):
            raise TargetError(f"target {name!r}: GPUs come in nodes of {GPUS_PER_NODE}: use 1-8 or a multiple of 8")
        return Target(key, CHIPS[gpu.group(2)], f"1x{nodes}x{min(n, GPUS_PER_NODE)}", nodes, n)
    tpu = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)(?:x(\d+))?", key)
    if tpu:
        version, size, slices = tpu.group(1), int(tpu.group(2)), int(tpu.group(3) or 1)
        if slices < 1:
            raise TargetError(f"target {name!r}: a slice times slices needs at least 1 slice, e.g. {version}-{size}x2")
        table = TORUS_2D if version in ("v5e", "v6e") else TORUS_3D
        chips = size if version in ("v5e", "v6e") else size // 2
        if chips not in table:
            raise TargetError(f"target {name!r}: no {version} slice of that size; sizes: "
                              + ", ".join(f"{version}-{c if table is TORUS_2D else 2 * c}" for c in table))
        return Target(key, CHIPS[version], f"{version}:{table[chips]}", slices, 0)
    raise TargetError(f"unknown target {name!r}; targets look like {TARGET_HELP}")


def use_plan_packages() -> None:
    """Make the plan extra (libtpu, the CUDA plugin and its compiler tools) importable, before JAX starts."""
    if "jax" in sys.modules and str(PLAN_SITE) not in sys.path:
        raise RuntimeError("use_plan_packages must run before jax is imported")
    if PLAN_SITE.is_dir() and str(PLAN_SITE) not in sys.path:
        sys.path.insert(0, str(PLAN_SITE))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the targets' devices are compile-only: run on the CPU
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # libtpu: no metadata server to ask on a laptop
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: several planners may run at once


def gpu_target_config(chip: Chip, device_memory: int) -> str:
    """XLA's GpuTargetConfig text for an NVIDIA Hopper GPU: what the compiler would read from the device."""
    spec = {
        "threads_per_block_limit": 1024, "threads_per_warp": 32, "shared_memory_per_block": 49152,
        "shared_memory_per_core": 233472, "threads_per_core_limit": 2048, "core_count": 132, "fpus_per_core": 128,
        "block_dim_limit_x": 2147483647, "block_dim_limit_y": 65535, "block_dim_limit_z": 65535,
        "memory_bandwidth": int(chip.hbm_bandwidth), "l2_cache_size": 50 * 2 ** 20, "clock_rate_ghz": 1.98,
        "device_memory_size": device_memory, "shared_memory_per_block_optin": 232448,
        "registers_per_core_limit": 65536, "registers_per_block_limit": 65536,
    }
    fields = "\n".join(f"  {k}: {v}" for k, v in spec.items())
    return (f"gpu_device_info {{\n{fields}\n  cuda_compute_capability {{ major: 9 minor: 0 }}\n}}\n"
            f'platform_name: "CUDA"\ndnn_version_info {{ major: 9 minor: 8 }}\n'
            f'device_description_str: "NVIDIA {chip.name}"\n')


def target_devices(target: Target) -> list:
    """The target's compile-only devices, in the compiler's order (a mesh over them compiles for the real chips)."""
    from jax.experimental import topologies

    try:
        if target.platform == "tpu":
            topo = topologies.get_topology_desc(target.topology, "tpu", num_slices=target.num_slices)
        else:
            memory = int(target.chip.memory / GPU_MEM_FRACTION)  # the device's whole memory
            topo = topologies.get_topology_desc(target.chip.name, "cuda", topology=target.topology,
                                                target_config=gpu_target_config(target.chip, memory))
    except Exception as e:  # a missing libtpu / CUDA plugin surfaces as several kinds of errors
        extra = "libtpu" if target.platform == "tpu" else "the CUDA 12 plugin"
        raise TargetError(f"cannot compile for {target.name}: {extra} is not usable here ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); install the plan "
                          f"extra with `PLAN=1 bash scripts/ensure_env.sh`") from e
    return list(topo.devices)
