"""Plan a run before renting the hardware: compile the stages' own programs for a target's devices and read back
memory per device, FLOPs, collective traffic and a roofline estimate of the step time.

`plan_programs(cfg, target, devices)` lowers exactly what the stages run (scripts/base_train.py's train step with
its real micro-batch shape and shardings, the bits-per-byte step, and the Engine's prefill and decode chunk) on a
(data, fsdp, tensor) mesh of compile-only devices (targets.py) and compiles each with the target's real compiler.
Nothing runs on a device. From each compiled program:
- memory: `memory_analysis()` per device (arguments, outputs, temporaries; donated buffers counted once);
- FLOPs: the model's formula (flops_per_token, as MFU counts them; prefill: the lm_head at each prompt's last
  position only, decode: attention over the whole cache), and `cost_analysis()`'s where the backend gives it (TPU;
  it counts a loop body once and no Pallas kernel);
- collectives: bytes each kind moves per device per call, read from the partitioned HLO (loop bodies multiplied
  by their trip counts) and converted to ring-algorithm traffic; groups that span nodes (a ring over m GPUs per
  node runs m channels, one NIC each: 1/m of a device's traffic per NIC), and the sends a multi-slice TPU program
  makes between slices (megascale), go over the slower network;
- a roofline: max(compute at peak FLOP/s, arguments and outputs at HBM bandwidth, collectives at link bandwidth),
  i.e. perfect overlap: a lower bound on the step time.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax.config import Config, MeshConfig
from nanochat_jax.targets import Target

HEADROOM = 0.10  # a plan "fits" with at least this share of the device's memory left free
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# bytes one device sends in a group of n for a collective whose result is r bytes on that device (ring algorithms)
RING_TRAFFIC = {
    "all-gather": lambda r, n: (n - 1) / n * r,
    "reduce-scatter": lambda r, n: (n - 1) * r,
    "all-reduce": lambda r, n: 2 * (n - 1) / n * r,
    "all-to-all": lambda r, n: (n - 1) / n * r,
    "collective-permute": lambda r, n: r,
}
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}


@dataclasses.dataclass
class ProgramPlan:
    """What the compiler says about one program on one device of the target."""

    name: str
    arguments: int = 0  # bytes per device
    outputs: int = 0
    aliased: int = 0
    temporaries: int = 0
    flops: float = 0.0  # model FLOPs per device per call (flops_per_token: the MFU convention), for the roofline
    compiler_flops: float = 0.0  # what cost_analysis() counts, where the backend gives it (TPU); loop bodies once
    collectives: dict = dataclasses.field(default_factory=dict)  # kind -> bytes sent per device per call
    network_bytes: float = 0.0  # of which over the slower network (groups spanning slices / nodes)
    tokens: int = 0  # tokens per call over all devices
    passes: int = 1  # times a call reads its arguments (a decode chunk reads the weights and cache once per token)
    dots: int = 0  # matrix products in the compiled program (its loop bodies once)
    fp8_dots: int = 0  # of which with fp8 operands (train.fp8), which Hopper runs on its fp8 tensor cores
    error: str = ""  # the compiler's refusal (e.g. out of memory), when it did not compile

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries


def fits(plan: ProgramPlan, target: Target) -> bool:
    return not plan.error and plan.total <= (1 - HEADROOM) * target.chip.memory


def roofline(plan: ProgramPlan, target: Target) -> dict:
    """Seconds per call: compute, hbm (every argument read and output written once), link and network
    (collectives), and the estimate max(...) with the bound that sets it."""
    chip = target.chip
    link_bytes = sum(plan.collectives.values()) - plan.network_bytes
    times = {"compute": plan.flops / chip.peak_flops,
             "hbm": (plan.passes * plan.arguments + plan.outputs) / chip.hbm_bandwidth,
             "link": link_bytes / chip.link_bandwidth,
             "network": plan.network_bytes / chip.network_bandwidth}
    bound = max(times, key=times.get)
    return {**times, "step": times[bound], "bound": bound}


# ---------------------------------------------------------------------------------------------
# Reading the partitioned HLO


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_CALLEE = re.compile(r"(?:body|condition|to_apply|calls|branch_computations|called_computations)="
                     r"(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
# a collective between TPU slices: the compiler sends each device's part over the data-center network (megascale)
_DCN_SEND = re.compile(r'=\s*(.*?)\ssend\(.*_xla_megascale_target="?\{([^}]*)\}.*_xla_megascale_transfer_type="(\w+)"')


def _tuple_item(tuple_type: str, index: int) -> str:
    """The index-th element of an HLO tuple type "(a, (b, c), d)" (commas inside shapes and layouts skipped)."""
    depth, start, items = 0, 1, []
    for i, c in enumerate(tuple_type):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if (c == "," and depth == 1) or depth == 0:
            items.append(tuple_type[start:i])
            start = i + 1
            if depth == 0:
                break
    return items[index] if index < len(items) else ""


def _result_bytes(result_type: str, kind: str, is_start: bool) -> int:
    """Bytes of a collective's result on one device. The async -start form of every collective but all-reduce
    returns (operands, results, context...): count the results (the second element) only."""
    if is_start and kind != "all-reduce" and result_type.lstrip().startswith("("):
        result_type = _tuple_item(result_type.strip(), 1)
    shapes = _SHAPE.findall(result_type)
    return sum(DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d) for dt, dims in shapes)


def replica_groups(line: str, num_devices: int) -> list[list[int]]:
    """The device groups of a collective: explicit {{0,1},{2,3}} or the iota form [G,S]<=[dims]T(perm)."""
    explicit = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", line)
    if explicit:
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", explicit.group(1))]
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if iota:
        shape = [int(x) for x in iota.group(1).split(",")]
        ids = np.arange(math.prod(int(x) for x in iota.group(2).split(","))).reshape(
            [int(x) for x in iota.group(2).split(",")])
        if iota.group(3):
            ids = ids.transpose([int(x) for x in iota.group(3).split(",")])
        return ids.reshape(shape[0], -1).tolist()
    named = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?"
                      r"\s*\{([^}]*)\}", line)
    if named:  # mesh['axis_0'=2,'axis_1'=4] {'axis_1'}: groups along the named axes of a row-major device grid
        axes = re.findall(r"'(\w+)'=(\d+)", named.group(1))
        names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
        grouped = [names.index(a) for a in re.findall(r"'(\w+)'", named.group(4))]
        ids = np.arange(math.prod(sizes))
        if named.group(2):  # device_ids=([2,2]T(1,0)): the grid holds an iota reshaped and transposed
            ids = ids.reshape([int(x) for x in named.group(2).split(",")])
            ids = ids.transpose([int(x) for x in named.group(3).split(",")]) if named.group(3) else ids
        ids = ids.reshape(sizes)
        ids = ids.transpose([i for i in range(len(sizes)) if i not in grouped] + grouped)
        return ids.reshape(-1, math.prod(sizes[i] for i in grouped)).tolist()
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", line)
    if pairs:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)", pairs.group(1) + "}")]
    return [list(range(num_devices))]


def _members_per_node(groups: list[list[int]], slice_of: list[int]) -> float:
    """inf for groups inside one slice / node; else how many of a group's devices share a node. A ring over nodes
    runs one channel per such device, each through its own NIC, so each NIC carries 1/m of a device's traffic."""
    spans = [{slice_of[d] for d in g if d < len(slice_of)} for g in groups]
    crossing = [len(g) / len(nodes) for g, nodes in zip(groups, spans) if len(nodes) > 1]
    return min(crossing) if crossing else float("inf")


def collective_bytes(hlo: str, slice_of: list[int]) -> tuple[dict, float]:
    """({kind: bytes one device sends per call}, bytes of those over the slower network) from partitioned HLO.

    slice_of[i]: the slice (or node) of the i-th device of the program. Loop bodies count trip-count times."""
    per_comp: dict[str, list] = {}
    calls: dict[str, list] = {}
    current = entry = None
    for line in hlo.splitlines():
        head = _COMPUTATION.match(line)
        if head and not line[:1].isspace():  # computation headers start at column 0, instructions are indented
            current = head.group(1)
            per_comp.setdefault(current, [])
            calls.setdefault(current, [])
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is None:
            continue
        trip = _TRIP.search(line)
        for names in _CALLEE.findall(line):
            for callee in re.findall(r"[\w.\-]+", names):
                calls[current].append((callee, int(trip.group(1)) if trip and " while(" in line else 1))
        dcn = _DCN_SEND.search(line)
        if dcn:  # an all-reduce over k slices sends 2(k-1)/k of the buffer; one-to-one and all-to-all at most all of it
            k = len(dcn.group(2).split(","))
            sent = _result_bytes(_tuple_item(dcn.group(1).strip(), 0), "", False)
            kind = {"ALL_REDUCE": "all-reduce", "ALL_TO_ALL": "all-to-all"}.get(dcn.group(3), "collective-permute")
            sent *= 2 * (k - 1) / k if kind == "all-reduce" else 1
            per_comp[current].append((kind, sent, sent))
        op = _OP.search(line)
        if op:
            kind = op.group(2)
            groups = replica_groups(line, len(slice_of))
            n = max(len(g) for g in groups)
            sent = RING_TRAFFIC[kind](_result_bytes(op.group(1), kind, bool(op.group(3))), n)
            per_comp[current].append((kind, sent, sent / _members_per_node(groups, slice_of)))
    totals: dict[str, float] = {}
    network = 0.0

    def visit(comp: str, times: int, depth: int = 0) -> None:
        nonlocal network
        if depth > 50:
            return
        for kind, sent, over_network in per_comp.get(comp, []):
            totals[kind] = totals.get(kind, 0.0) + times * sent
            network += times * over_network
        for callee, n in calls.get(comp, []):
            visit(callee, times * n, depth + 1)

    if entry is not None:
        visit(entry, 1)
    return totals, network


# ---------------------------------------------------------------------------------------------
# The programs


def _abstract(tree, shardings, dtype=None):
    """ShapeDtypeStructs carrying shardings (and, for floating leaves, an optional dtype)."""
    def one(x, s):
        dt = dtype if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
        return jax.ShapeDtypeStruct(x.shape, dt, sharding=s)

    return jax.tree.map(one, tree, shardings)


def _read(name: str, compiled, tokens: int, formula_flops: float, slice_of: list[int]) -> ProgramPlan:
    memory = compiled.memory_analysis()
    plan = ProgramPlan(name, arguments=memory.argument_size_in_bytes, outputs=memory.output_size_in_bytes,
                       aliased=memory.alias_size_in_bytes, temporaries=memory.temp_size_in_bytes, tokens=tokens)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    plan.flops = formula_flops
    plan.compiler_flops = float(cost.get("flops", 0.0)) if cost else 0.0
    hlo = compiled.as_text()
    plan.collectives, plan.network_bytes = collective_bytes(hlo, slice_of)
    plan.dots, plan.fp8_dots = dot_operand_types(hlo)
    return plan


def dot_operand_types(hlo: str) -> tuple[int, int]:
    """(dots, dots whose two operands are fp8) in an HLO module's text."""
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    operands = re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)
    return len(operands), sum(types.get(a, "").startswith("f8") and types.get(b, "").startswith("f8")
                              for a, b in operands)


def _compile(name: str, lower, tokens: int, formula_flops: float, slice_of: list[int]) -> ProgramPlan:
    try:
        return _read(name, lower().compile(), tokens, formula_flops, slice_of)
    except (jax.errors.JaxRuntimeError, ValueError, RuntimeError) as e:  # the compiler's verdict, e.g. out of memory
        message = next((l for l in str(e).splitlines() if l.strip()), type(e).__name__)
        return ProgramPlan(name, tokens=tokens, error=message[:400])


def slices_of(devices) -> list[int]:
    """Each device's slice (TPU) or node (GPU: its process), in the order given."""
    return [getattr(d, "slice_index", 0) if d.platform == "tpu" else d.process_index for d in devices]


PROGRAMS = ("train", "bpb", "prefill", "decode")


def plan_programs(cfg: Config, target: Target, devices, decode_rows: int = 32, prompt_len: int = 512,
                  cache_len: int | None = None, programs=PROGRAMS) -> dict:
    """{program name: ProgramPlan} for the stages' programs under cfg (its mesh, rows and model) on `devices`."""
    from flax import nnx

    from nanochat_jax import splash
    from nanochat_jax.engine import _decode_chunk, _prefill, bucket, cache_shardings, per_device_mesh, prompt_bucket
    from nanochat_jax.evaluation import make_bpb_step
    from nanochat_jax.model import (KVCache, flops_per_token, head_dim, init_model, matmul_params, padded_vocab,
                                     runnable_on)
    from nanochat_jax.sharding import batch_sharding, make_mesh, named_sharding, param_shardings
    from nanochat_jax.train import TrainRun, microbatch_sharding, resolve_depth_scaling, rows_and_accum

    mesh = make_mesh(cfg.mesh, devices)
    model_cfg = runnable_on(cfg.model, devices[0].platform)
    splash.prepare(model_cfg, mesh)
    mesh_devices = list(mesh.devices.flat)
    slice_of = slices_of(mesh_devices)
    n = len(mesh_devices)
    T = model_cfg.sequence_len
    optim_cfg, _ = resolve_depth_scaling(cfg)
    rows, accum = rows_and_accum(cfg.train.device_batch_size, cfg.train.total_batch_size, T, mesh,
                                 "train.total_batch_size")
    per_token = flops_per_token(model_cfg)
    plans = {}

    run = TrainRun(model_cfg, optim_cfg, 1000, mesh, abstract=True, fp8=cfg.train.fp8)
    if "train" in programs:
        tokens = jax.ShapeDtypeStruct((accum, rows, T), jnp.int32, sharding=microbatch_sharding(mesh))

        def lower_train():
            with jax.set_mesh(mesh):
                return run.jitted.lower(run.state, {"inputs": tokens, "targets": tokens})

        plans["train"] = _compile("train", lower_train, accum * rows * T, per_token * accum * rows * T / n, slice_of)
    if "bpb" in programs:
        batch = jax.ShapeDtypeStruct((rows, T), jnp.int32, sharding=batch_sharding(mesh))
        table = jax.ShapeDtypeStruct((model_cfg.vocab_size,), jnp.int32, sharding=named_sharding(mesh, (None,)))
        bpb = make_bpb_step(run.graphdef)
        plans["bpb"] = _compile("bpb", lambda: bpb.lower(run.state.params, batch, batch, table),
                                rows * T, per_token / 3 * rows * T / n, slice_of)
    if "prefill" in programs or "decode" in programs:
        engine_graphdef, engine_state = nnx.split(nnx.eval_shape(lambda: init_model(model_cfg)))
        state_sh = param_shardings(engine_state, mesh)
        state = nnx.to_pure_dict(engine_state)
        state = _abstract(state, state_sh, jnp.dtype(model_cfg.compute_dtype))
        nnx.replace_by_pure_dict(engine_state, state)
        L = prompt_bucket(prompt_len)
        max_len = cache_len or bucket(L + T)

        def cache(batch):
            kv, rows = cache_shardings(mesh, (batch, model_cfg.n_kv_heads, max_len, head_dim(model_cfg)))
            empty = jax.eval_shape(lambda: KVCache.init(model_cfg, batch, max_len))
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=kv if x.ndim == 4 else rows),
                                empty)

        matmul_flops, head_flops = 2 * matmul_params(model_cfg), 2 * padded_vocab(model_cfg) * model_cfg.n_embd
        # a prompt's tokens through the blocks and its attention, computed whole (the causal half masked, as XLA
        # does); the lm_head only at its last position
        prefill_flops = (matmul_flops - head_flops + 4 * model_cfg.n_layer * model_cfg.n_embd * L) * L + head_flops
        if "prefill" in programs:
            row = named_sharding(mesh, ("batch",), (decode_rows,))
            prompts = jax.ShapeDtypeStruct((decode_rows, L), jnp.int32,
                                           sharding=named_sharding(mesh, ("batch", None), (decode_rows, L)))
            lengths = jax.ShapeDtypeStruct((decode_rows,), jnp.int32, sharding=row)
            plans["prefill"] = _compile("prefill", lambda: _prefill.lower(
                engine_graphdef, engine_state, cache(decode_rows), prompts, lengths),
                decode_rows * L, prefill_flops * decode_rows / n, slice_of)
        if "decode" in programs:
            chunk = 16
            B = decode_rows
            rowwise = lambda shape, dtype: jax.ShapeDtypeStruct(  # noqa: E731
                shape, dtype, sharding=named_sharding(mesh, ("batch",) + (None,) * (len(shape) - 1), shape))
            keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), B))
            keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=named_sharding(mesh, ("batch",), (B,)))
            scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=named_sharding(mesh, ()))  # noqa: E731
            decode_mesh = per_device_mesh(mesh, engine_state, B)  # the program the Engine runs
            args = (engine_graphdef, chunk, (0, 1, 2, 3), max_len, decode_mesh, engine_state, cache(B),
                    rowwise((B, model_cfg.vocab_size), jnp.float32), keys, rowwise((B,), jnp.bool_),
                    rowwise((B,), jnp.bool_), rowwise((B,), jnp.int32), rowwise((B, chunk), jnp.int32),
                    rowwise((B,), jnp.int32), scalar(jnp.float32), scalar(jnp.int32), scalar(jnp.float32))
            plans["decode"] = _compile("decode", lambda: _decode_chunk.lower(*args), B * chunk,
                                       (matmul_flops + 4 * model_cfg.n_layer * model_cfg.n_embd * max_len)
                                       * B * chunk / n, slice_of)
            plans["decode"].passes = chunk
    return plans


def mesh_options(num_devices: int, n_head: int, n_kv_heads: int) -> list[MeshConfig]:
    """Every (data, fsdp, tensor) with data * fsdp * tensor = num_devices whose tensor axis divides the heads."""
    out = []
    for tensor in range(1, num_devices + 1):
        if num_devices % tensor or n_head % tensor or n_kv_heads % tensor:
            continue
        rest = num_devices // tensor
        for fsdp in range(1, rest + 1):
            if rest % fsdp == 0:
                out.append(MeshConfig(data=rest // fsdp, fsdp=fsdp, tensor=tensor))
    return out
