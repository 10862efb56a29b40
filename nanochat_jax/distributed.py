"""Everything multi-process: starting the distributed runtime, the evaluation mesh each process samples on,
and the small host-side collectives (gather JSON, sum or max a value, agree on facts, share an error).

With one process every helper is the identity (or a no-op), so single-host code calls them unconditionally.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax.sharding import Mesh

from nanochat_jax.common import UserError
from nanochat_jax.config import MeshConfig
from nanochat_jax.sharding import make_mesh, replicated


class SetupError(UserError, ValueError):
    """A multi-process run that cannot start or whose processes disagree."""


DISTRIBUTED_ENV = "NANOCHAT_JAX_DISTRIBUTED"


def _wants_distributed() -> bool:
    """Multi-process when asked (NANOCHAT_JAX_DISTRIBUTED=1), when a coordinator is given
    (JAX_COORDINATOR_ADDRESS), on a Cloud TPU pod slice (more than one worker host listed), or in an srun step
    or an Open MPI (4.x) mpirun of several processes (jax.distributed reads their variables)."""
    flag = os.environ.get(DISTRIBUTED_ENV, "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        return True
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
    # an srun step, or an Open MPI launch of the kind jax.distributed recognises (it reads OMPI_MCA_orte_hnp_uri)
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "")
    if not tasks and os.environ.get("OMPI_MCA_orte_hnp_uri"):
        tasks = os.environ.get("OMPI_COMM_WORLD_SIZE", "")
    return len([h for h in hosts.split(",") if h.strip()]) > 1 or (tasks.isdigit() and int(tasks) > 1)


def gather_json(obj) -> list:
    """The JSON-serialisable obj of every process, in process order (every process gets the list)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:raw.size] = raw
    everything = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(everything[i, :n])) for i, n in enumerate(lengths)]


def errors_anywhere(error: str | None) -> list[str]:
    """Every process's error (each passes its own, or None), for all of them: a failure on one process becomes
    known to all, so none is left waiting in the next collective."""
    return [e for e in gather_json(error) if e]


def check_same_on_all_processes(facts: dict) -> None:
    """SetupError on every process unless all processes report the same facts (JSON values). Each host of a
    multi-host run trains its own tokenizer and lists its own data files; hosts that differ would train
    together on mismatched token ids or documents without any error."""
    everyone = gather_json(facts)
    differing = {k: [f[k] for f in everyone] for k in facts if any(f[k] != facts[k] for f in everyone)}
    if differing:
        raise SetupError("the processes of this run disagree on "
                         + "; ".join(f"{k} (per process: {v})" for k, v in differing.items())
                         + ": every host must have the same tokenizer and data")


def init_distributed() -> bool:
    """Call jax.distributed.initialize() once when this is a multi-process run; a no-op otherwise.

    Must run before anything touches jax devices. Returns True when the distributed runtime is up.
    NANOCHAT_JAX_DISTRIBUTED=0 forces single-process even on a pod. On Cloud TPU (and SLURM / Open MPI)
    JAX finds the coordinator, process count and index itself; elsewhere (several GPU hosts) every process
    sets JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    """
    if jax.distributed.is_initialized():
        return True
    if not _wants_distributed():
        return False
    kwargs = {}
    for var, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        value = os.environ.get(var, "").strip()
        if value:
            if not value.isdigit():
                raise SetupError(f"{var}={value!r} must be a non-negative integer")
            kwargs[arg] = int(value)
    # hosts may arrive far apart (each finishes its own downloads first): wait up to 30 minutes, not 5; a process
    # that stops sending heartbeats (killed, its host gone) for 100 s ends the others ("another task died")
    for var, arg, default in (("NANOCHAT_JAX_INIT_TIMEOUT", "initialization_timeout", "1800"),
                              ("NANOCHAT_JAX_HEARTBEAT_TIMEOUT", "heartbeat_timeout_seconds", "100")):
        seconds = os.environ.get(var, default).strip()
        if not seconds.isdigit() or not int(seconds):
            raise SetupError(f"{var}={seconds!r} must be a positive number of seconds")
        kwargs[arg] = int(seconds)
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as e:  # e.g. a coordinator address without a process count outside TPU/SLURM/MPI
        raise SetupError(f"multi-process start failed ({e}); outside Cloud TPU, SLURM and Open MPI set "
                         "JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every "
                         f"process, or {DISTRIBUTED_ENV}=0 for a single process") from e
    return True


def sum_over_processes(values: np.ndarray) -> np.ndarray:
    """Element-wise sum of a small host array over all processes (the array itself with one process), in the
    array's dtype (the gather goes through 32-bit jax arrays; the sum does not)."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values), dtype=values.dtype).sum(axis=0)


def max_over_processes(value: int) -> int:
    """The largest of every process's integer (the value itself with one process)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.array([value], np.int32))))


def eval_mesh(cfg: MeshConfig) -> Mesh:
    """The mesh evaluations and sampling run on: the configured one with a single process; with several
    processes, each scores its own share of the examples, so it gets a data-parallel mesh of its local devices."""
    if jax.process_count() == 1:
        return make_mesh(cfg)
    return make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1), jax.local_devices())


def replicated_on(tree, mesh: Mesh):
    """Arrays trained on the global mesh, ready for `eval_mesh`: unchanged with one process; with several
    (arrays spanning other processes' devices), all-gathered and replicated on this process's mesh."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return jax.device_put(multihost_utils.process_allgather(tree, tiled=True), replicated(mesh))
