"""Device meshes and the one table that maps logical axis names to mesh axes.

Every parameter carries logical axis names in its `axes` metadata (see model.py), e.g. ('embed', 'heads').
`LOGICAL_RULES` maps each name to a mesh axis: FSDP shards parameters (and so optimizer state) over
`fsdp`; tensor parallelism shards heads and the MLP hidden dimension over `tensor`; the batch is sharded
over (data, fsdp). A dimension that the mesh axis does not divide is replicated instead, so tiny models
run on any mesh. No other module writes PartitionSpecs by hand.
"""

from __future__ import annotations

import math
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nanochat_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "batch_data": "data",  # the embedding lookup's rows, before they are spread over fsdp too (model.py)
    "sequence": None,
    "embed": "fsdp",
    "embed_act": None,  # the width of activations stays whole (fsdp already shards their rows)
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "cache_len": None,
    "stack": ("data", "fsdp", "tensor"),  # Muon's stacks of same-shaped matrices: each device orthogonalises its share
    "stack_rows": ("fsdp", "tensor"),  # a matrix's rows on its way into (and out of) a Muon stack (optim.py)
}


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolve the -1 entry and check that the axis sizes multiply to the device count."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"mesh: {num_devices} devices are not divisible by the fixed axis sizes {sizes}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {num_devices} devices")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices of all processes (or the given ones)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(cfg, len(devices))
    try:
        from jax.experimental import mesh_utils

        slices = len({getattr(d, "slice_index", 0) for d in devices})
        outer = next((i for i in (0, 1) if slices > 1 and shape[i] % slices == 0), None)
        if outer is None:
            grid = mesh_utils.create_device_mesh(shape, devices=devices)
        else:  # several TPU slices: the data (else fsdp) axis spans them, the rest stays on each slice's ICI
            dcn = tuple(slices if i == outer else 1 for i in range(3))
            grid = mesh_utils.create_hybrid_device_mesh(tuple(s // d for s, d in zip(shape, dcn)), dcn,
                                                        devices=devices)
    except Exception as e:  # unusual device sets: plain row-major order, said out loud
        print(f"make_mesh: no topology-aware layout for {shape} ({type(e).__name__}: {e}); using device order",
              file=sys.stderr)
        grid = np.array(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def _axis_size(mesh: Mesh, mesh_axes) -> int:
    if mesh_axes is None:
        return 1
    names = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
    return math.prod(mesh.shape[n] for n in names)


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...] | None = None,
                    mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec for logical axis names; with shape+mesh, undivisible dimensions are replicated."""
    spec, used = [], set()
    for i, name in enumerate(axes):
        if name is not None and name not in LOGICAL_RULES:
            raise ValueError(f"unknown logical axis name {name!r}; known: {', '.join(LOGICAL_RULES)}")
        mesh_axes = LOGICAL_RULES.get(name) if name else None
        names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        if any(n in used for n in names):  # a mesh axis may shard only one dimension
            mesh_axes = None
        if mesh_axes is not None and shape is not None and mesh is not None:
            if shape[i] % _axis_size(mesh, mesh_axes):
                mesh_axes = None
        if mesh_axes is not None:
            used.update(names)
        spec.append(mesh_axes)
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, axes: tuple[str | None, ...], shape: tuple[int, ...] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def param_shardings(state, mesh: Mesh) -> dict:
    """NamedShardings, as a pure nested dict, for the variables of an nnx State (from their `axes` metadata).

    Works on abstract states too (nnx.eval_shape); a variable without `axes` is replicated.
    """
    from flax import nnx

    def one(variable):
        shape = tuple(variable.get_value().shape)
        axes = getattr(variable, "axes", None) or (None,) * len(shape)
        return variable.replace(named_sharding(mesh, tuple(axes), shape))

    return nnx.to_pure_dict(jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def like_params(tree, params_shardings, mesh: Mesh):
    """Shardings for a pytree of arrays derived from parameters (e.g. optimizer moments).

    A leaf whose key path ends with a parameter's path gets the parameter's sharding (the optimizers here keep
    such leaves in the parameter's shape: momentum buffers, Adam moments); every other leaf (step counters,
    scalars) is replicated.
    """
    by_path = {tuple(path): s for path, s in jax.tree_util.tree_leaves_with_path(params_shardings)}

    def one(path, leaf):
        for start in range(len(path)):
            sharding = by_path.get(tuple(path[start:]))
            if sharding is not None:
                return sharding
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, tree)


def shard_count(name: str) -> int:
    """How many ways the logical axis `name` is split under the current `jax.set_mesh` (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else _axis_size(mesh, LOGICAL_RULES[name])


def tensor_shards(name: str) -> int:
    """How many ways tensor parallelism splits the logical axis `name` under the current `jax.set_mesh`: a product
    over it is summed across devices (FSDP's splits of a weight are gathered before use, not summed); 1 otherwise."""
    return shard_count(name) if LOGICAL_RULES.get(name) == "tensor" else 1


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Pin an activation's sharding by logical names while tracing under `jax.set_mesh(mesh)`; else (and inside
    a shard_map, whose code sees one device's part) a no-op.

    Without it, FSDP lets the compiler gather activations (every device computing the whole batch)
    instead of gathering the weights.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or jax.sharding.AxisType.Manual in mesh.axis_types:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch arrays (B, T, ...): rows over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_shards(mesh: Mesh) -> int:
    """How many ways batch rows are split (data x fsdp): rows per batch must be a multiple of it."""
    return _axis_size(mesh, LOGICAL_RULES["batch"])


def check_rows_per_process(mesh: Mesh) -> None:
    """ConfigError unless the devices of each process hold their own 1 / process_count of the batch rows: every
    process reads its own documents and feeds them as its share of the batch (train.global_batch). On a mesh whose
    batch axes do not split the rows over the processes (tensor across hosts, say), each process's rows would
    stand for the same rows: the batch shrank by the process count and its copies disagreed, without an error."""
    processes, shards = jax.process_count(), batch_shards(mesh)
    if processes == 1:
        return
    held: dict[int, set] = {}
    for device, index in batch_sharding(mesh, 1).devices_indices_map((shards,)).items():
        held.setdefault(device.process_index, set()).add(index[0].start or 0)
    if any(len(rows) * processes != shards for rows in held.values()):
        raise ConfigError(f"mesh {dict(mesh.shape)}: each of the {processes} processes feeds its own rows of the batch, "
                          f"so the batch axes (data x fsdp = {shards}) must split the rows over the processes; make "
                          f"data x fsdp a multiple of {processes} and keep tensor within a host")
