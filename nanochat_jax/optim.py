"""The optimizer: AdamW for the embedding and lm_head, Muon for every matrix inside the blocks.

Follows nanochat's first release: global-norm gradient clipping over all parameters (torch's
`clip_grad_norm_` rule), AdamW with torch semantics (bias correction, eps added to sqrt(v_hat),
decoupled weight decay scaled by the learning rate) whose learning rates are scaled by
(width/768)^-0.5, and Muon (SGD momentum with Nesterov, then a quintic Newton-Schulz
orthogonalisation in bfloat16, or optim.ns_dtype). Every learning rate follows `lr_multiplier` (warm-up, constant,
linear warm-down) and Muon's momentum warms up following `muon_momentum`.

Parameter layout: kernels are stored (in, out), the transpose of torch's (out, in). Muon's update
here is exactly nanochat's update of the transposed matrix.

Everything is plain jnp under jit, so it works unchanged on parameters sharded over a mesh
(GSPMD inserts the collectives); optimizer state is made with zeros_like and inherits shardings.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from nanochat_jax.config import OptimConfig
from nanochat_jax.sharding import constrain, shard_count

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz coefficients (a, b, c)
LABELS = {"wte": "embedding", "lm_head": "unembedding", "blocks": "muon",  # top-level module -> group
          # nanochat master's options (model.py): value embeddings, per-layer scalars, smear and backout
          "value_embeds": "value_embedding", "resid_lambdas": "resid", "x0_lambdas": "x0",
          "smear_gate": "smear", "smear_lambda": "smear", "backout_lambda": "smear"}
# master's AdamW groups for its scalars and gates: (lr, beta1, beta2, weight decay), lr not scaled by the width
SCALAR_GROUPS = {"resid": (0.005, 0.8, 0.95, 0.05), "x0": (0.5, 0.96, 0.95, 0.0), "smear": (0.2, 0.8, 0.95, 0.0)}


def newton_schulz(G: jax.Array, steps: int = 5, dtype=jnp.bfloat16) -> jax.Array:
    """Approximately orthogonalise the last two axes of G (singular values land in about 0.65..1.15).

    Computes in `dtype` (bfloat16 like nanochat); batched over leading axes. Iterates on the wide
    orientation (rows <= cols), transposing tall inputs and back. Returns an array of `dtype`.
    """
    a, b, c = NS_COEFFS
    X = G.astype(dtype)
    tall = G.shape[-2] > G.shape[-1]
    if tall:
        X = jnp.swapaxes(X, -1, -2)
    norm = jnp.sqrt(jnp.sum(jnp.square(X.astype(jnp.float32)), axis=(-2, -1), keepdims=True))
    X = (X / (norm + 1e-7)).astype(dtype)  # Frobenius norm bounds the spectral norm: sigma_max <= 1
    for _ in range(steps):
        # matrices are stored in `dtype`; products accumulate and the coefficients apply in float32
        # (a Python float times a bf16 array would round the coefficients themselves to bf16)
        A = _matmul(X, jnp.swapaxes(X, -1, -2))
        B = (b * A + c * _matmul(A.astype(dtype), A.astype(dtype))).astype(dtype)
        X = (a * X.astype(jnp.float32) + _matmul(B, X)).astype(dtype)
    if tall:
        X = jnp.swapaxes(X, -1, -2)
    return X


def _matmul(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.matmul(x, y, preferred_element_type=jnp.float32)


class MuonState(NamedTuple):
    count: jax.Array  # number of updates done so far (the step fed to schedules)
    momentum_buffer: optax.Updates


def muon(learning_rate, momentum=0.95, nesterov: bool = True, ns_steps: int = 5,
         ns_dtype=jnp.bfloat16) -> optax.GradientTransformation:
    """Muon for 2-D kernels stored (in, out). learning_rate and momentum: floats or schedules.

    buffer <- lerp(buffer, g, 1 - momentum); g <- lerp(g, buffer, momentum) with Nesterov, else
    buffer; update = -lr * sqrt(max(1, out/in)) * NS(g). All matrices of one shape go through one
    batched Newton-Schulz call, split over the mesh's devices (see _orthogonalise).
    """

    def init_fn(params):
        for leaf in jax.tree.leaves(params):
            if leaf.ndim != 2:
                raise ValueError(f"muon: expects 2-D parameters only, got shape {leaf.shape}")
        return MuonState(count=jnp.zeros([], jnp.int32), momentum_buffer=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        mom = momentum(state.count) if callable(momentum) else momentum
        buf = jax.tree.map(lambda b, g: b + (1 - mom) * (g - b), state.momentum_buffer, updates)
        if nesterov:
            g_eff = jax.tree.map(lambda g, b: g + mom * (b - g), updates, buf)
        else:
            g_eff = buf
        paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(g_eff)
        leaves = [leaf for _, leaf in paths_leaves]
        ortho = _orthogonalise(paths_leaves, ns_steps, ns_dtype)
        # torch's (out, in) is our (in, out) transposed: nanochat's max(1, rows/cols) is out/in here
        new = [-lr * max(1.0, g.shape[-1] / g.shape[-2]) ** 0.5 * o.astype(g.dtype) for g, o in zip(leaves, ortho)]
        return jax.tree.unflatten(treedef, new), MuonState(count=optax.safe_increment(state.count), momentum_buffer=buf)

    return optax.GradientTransformation(init_fn, update_fn)


def _orthogonalise(paths_leaves: list, ns_steps: int, dtype) -> list[jax.Array]:
    """Newton-Schulz on every matrix, batched: all matrices of one shape (in the wide orientation, tall ones
    transposed) go through one call, as one stack.

    Under a mesh the stack is split over every device (logical axis 'stack', padded with zero matrices to a
    multiple of the device count; NS maps zero to zero): each device orthogonalises its share once, instead
    of every data-parallel replica repeating all of it (or FSDP gathering inside every NS matmul), and the
    results go back to the parameters' shardings in one resharding (nanochat's DistMuon splits the same work
    over ranks).
    """
    groups: dict[tuple, list[int]] = {}
    for i, (_, m) in enumerate(paths_leaves):
        groups.setdefault((min(m.shape), max(m.shape)), []).append(i)
    out: list = [None] * len(paths_leaves)
    for idx in groups.values():
        wide = [m if m.shape[0] <= m.shape[1] else m.T for m in (paths_leaves[i][1] for i in idx)]
        # every member split the same way first (rows over the stack's devices), so that going from rows to
        # whole matrices per device is one all-to-all rather than a gather of the whole stack; on the way, rows
        # over (fsdp, tensor) (one all-to-all when tensor splits the columns: XLA finds no direct path from
        # (fsdp rows, tensor columns) to rows over every device and would gather the whole matrix instead)
        stack = jnp.stack([constrain(constrain(m, ("stack_rows", None)), ("stack", None)) for m in wide])
        pad = -len(idx) % shard_count("stack")
        if pad:
            stack = jnp.concatenate([stack, jnp.zeros((pad, *stack.shape[1:]), stack.dtype)])
        ortho = newton_schulz(constrain(stack, ("stack", None, None)), ns_steps, dtype)
        for j, i in enumerate(idx):
            m = paths_leaves[i][1]
            o = constrain(ortho[j], ("stack_rows", None))  # the same way back
            out[i] = o if m.shape[0] <= m.shape[1] else o.T
    return out


def lr_multiplier(step, num_iterations: int, cfg: OptimConfig) -> jax.Array:
    """nanochat's LR multiplier: linear warm-up, 1.0, then linear warm-down to final_lr_frac."""
    warmup = round(cfg.warmup_ratio * num_iterations)
    warmdown = round(cfg.warmdown_ratio * num_iterations)
    step = jnp.asarray(step, jnp.float32)
    up = (step + 1) / max(warmup, 1)
    progress = (num_iterations - step) / max(warmdown, 1)
    down = progress + (1 - progress) * cfg.final_lr_frac
    return jnp.where(step < warmup, up, jnp.where(step <= num_iterations - warmdown, 1.0, down))


def muon_momentum(step, cfg: OptimConfig) -> jax.Array:
    """Muon momentum: linear from muon_momentum_start to muon_momentum over the warm-up steps (0: none)."""
    warmup = cfg.muon_momentum_warmup_steps
    step = jnp.asarray(step, jnp.float32)
    frac = jnp.minimum(step / warmup, 1.0) if warmup > 0 else jnp.ones_like(step)
    return (1 - frac) * cfg.muon_momentum_start + frac * cfg.muon_momentum


def param_labels(params):
    """The optimizer group of every parameter: 'embedding' (wte), 'unembedding' (lm_head), 'muon' (blocks, 2-D
    only), and for master's options 'value_embedding' and the scalar groups of SCALAR_GROUPS."""

    def label(path, leaf):
        names = [_key_name(k) for k in path]
        if names and names[-1] == "value":  # nnx.Variable leaves add a trailing .value
            names = names[:-1]
        where = "/".join(names)
        group = LABELS.get(names[0]) if names else None
        if group is None:
            raise ValueError(f"optimizer: parameter '{where}' is not under {sorted(LABELS)}; "
                             "no optimizer group for it")
        if group == "muon" and jnp.ndim(leaf) != 2:
            raise ValueError(f"optimizer: parameter '{where}' has shape {jnp.shape(leaf)}; only 2-D parameters are supported")
        return group

    return jax.tree_util.tree_map_with_path(label, params)


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: scale all grads by min(1, max_norm / (global_norm + 1e-6))."""

    def clip(updates, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates)

    return optax.stateless(clip)


def build_optimizer(cfg: OptimConfig, model_dim: int, num_iterations: int) -> optax.GradientTransformation:
    """The full nanochat optimizer for a params tree labelled by `param_labels`."""
    adam_scale = (model_dim / 768) ** -0.5

    def scheduled(base_lr):
        return lambda step: base_lr * lr_multiplier(step, num_iterations, cfg)

    def adamw(base_lr, b1=cfg.adam_beta1, b2=cfg.adam_beta2, weight_decay=cfg.weight_decay):
        return optax.inject_hyperparams(optax.adamw)(
            learning_rate=scheduled(base_lr), b1=b1, b2=b2, eps=cfg.adam_eps, weight_decay=weight_decay)

    transforms = {
        "embedding": adamw(cfg.embedding_lr * adam_scale),
        "value_embedding": adamw(cfg.embedding_lr * adam_scale * 0.5),  # master: half the embedding's rate
        **{name: adamw(*settings) for name, settings in SCALAR_GROUPS.items()},
        "unembedding": adamw(cfg.unembedding_lr * adam_scale),
        "muon": optax.inject_hyperparams(muon, static_args=("nesterov", "ns_steps", "ns_dtype"))(
            learning_rate=scheduled(cfg.matrix_lr), momentum=lambda step: muon_momentum(step, cfg),
            nesterov=cfg.muon_nesterov, ns_steps=cfg.ns_steps, ns_dtype=jnp.dtype(cfg.ns_dtype)),
    }
    parts = [clip_by_global_norm_torch(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    return optax.chain(*parts, _partition(transforms))


def _partition(transforms: dict) -> optax.GradientTransformation:
    """optax.partition over the groups the parameters use only: a model without master's options keeps exactly
    the optimizer state (and checkpoints) it always had."""

    def used(tree):
        labels = set(jax.tree.leaves(param_labels(tree)))
        return optax.partition({name: t for name, t in transforms.items() if name in labels}, param_labels)

    return optax.GradientTransformation(lambda params: used(params).init(params),
                                        lambda updates, state, params=None: used(updates).update(updates, state, params))


def current_lrs(opt_state) -> dict:
    """Learning rates (and Muon momentum) used by the latest update, from a `build_optimizer` state."""
    partition_state = next(s for s in opt_state if hasattr(s, "inner_states"))
    hp = {label: masked.inner_state.hyperparams for label, masked in partition_state.inner_states.items()}
    return {"lr_embedding": hp["embedding"]["learning_rate"], "lr_unembedding": hp["unembedding"]["learning_rate"],
            "lr_matrix": hp["muon"]["learning_rate"], "muon_momentum": hp["muon"]["momentum"]}
