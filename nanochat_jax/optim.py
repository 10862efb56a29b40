"""The optimizer: AdamW for the embedding and lm_head, Muon for every matrix inside the blocks.

Follows nanochat's first release: global-norm gradient clipping over all parameters (torch's
`clip_grad_norm_` rule), AdamW with torch semantics (bias correction, eps added to sqrt(v_hat),
decoupled weight decay scaled by the learning rate) whose learning rates are scaled by
(width/768)^-0.5, and Muon (SGD momentum with Nesterov, then a quintic Newton-Schulz
orthogonalisation in bfloat16, or optim.ns_dtype). Every learning rate follows `lr_multiplier` (warm-up, constant,
linear warm-down) and Muon's momentum warms up following `muon_momentum`.

nanochat master's options, all off by default (see OptimConfig): Polar Express instead of the quintic
Newton-Schulz, MuonEq before and Muon+ / NorMuon after the orthogonalisation, Muon weight decay (cautious,
constant or cosine), per-group AdamW settings with groups for value embeddings and scalars, a Muon momentum
warm-down, and `depth_scaling` (batch size, learning rates and weight decay from a reference depth).

Parameter layout: kernels are stored (in, out), the transpose of torch's (out, in). Muon's update
here is exactly nanochat's update of the transposed matrix.

Everything is plain jnp under jit, so it works unchanged on parameters sharded over a mesh
(GSPMD inserts the collectives); optimizer state is made with zeros_like and inherits shardings.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from nanochat_jax.config import OptimConfig, TrainConfig
from nanochat_jax.sharding import constrain, shard_count

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz coefficients (a, b, c)
# nanochat master's Polar Express: one (a, b, c) per step (Amsel et al. 2025; 5 steps, safety 2e-2, cushion 2)
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
LABELS = {"wte": "embedding", "lm_head": "unembedding"}  # top-level module -> group (see param_labels)
REFERENCE_WIDTH = 768  # AdamW learning rates of the embedding tables scale by (width / 768)^-0.5


def newton_schulz(G: jax.Array, steps: int = 5, dtype=jnp.bfloat16, method: str = "newton_schulz") -> jax.Array:
    """Approximately orthogonalise the last two axes of G (singular values land in about 0.65..1.15).

    Computes in `dtype` (bfloat16 like nanochat); batched over leading axes. Iterates on the wide
    orientation (rows <= cols), transposing tall inputs and back. Returns an array of `dtype`.
    method: newton_schulz (the quintic's fixed coefficients, G / (|G|_F + 1e-7) first) or polar_express
    (POLAR_EXPRESS_COEFFS[:steps], G / (1.01 |G|_F + 1e-6) first, as nanochat master).
    """
    if method == "polar_express":
        coeffs, norm_scale, eps = POLAR_EXPRESS_COEFFS[:steps], 1.01, 1e-6
    else:
        coeffs, norm_scale, eps = (NS_COEFFS,) * steps, 1.0, 1e-7
    X = G.astype(dtype)
    tall = G.shape[-2] > G.shape[-1]
    if tall:
        X = jnp.swapaxes(X, -1, -2)
    norm = jnp.sqrt(jnp.sum(jnp.square(X.astype(jnp.float32)), axis=(-2, -1), keepdims=True))
    X = (X / (norm * norm_scale + eps)).astype(dtype)  # Frobenius norm bounds the spectral norm: sigma_max <= 1
    for a, b, c in coeffs:
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


class NorMuonState(NamedTuple):
    count: jax.Array
    momentum_buffer: optax.Updates
    second_moment: tuple  # per matrix in leaf order, (1, out) or (in, 1): see _normuon (replicated, tiny)


def muon(learning_rate, momentum=0.95, nesterov: bool = True, ns_steps: int = 5, ns_dtype=jnp.bfloat16,
         weight_decay=None, method: str = "newton_schulz", muon_eq: bool = False, muon_plus: bool = False,
         normuon_beta2: float | None = None, cautious: bool = False) -> optax.GradientTransformation:
    """Muon for 2-D kernels stored (in, out). learning_rate, momentum, weight_decay: floats or schedules.

    buffer <- lerp(buffer, g, 1 - momentum); g <- lerp(g, buffer, momentum) with Nesterov, else buffer;
    O = orthogonalise(g) by `method` (MuonEq first when muon_eq; Muon+ and NorMuon after it when asked);
    update = -lr * sqrt(max(1, out/in)) * (O + weight_decay * param [* (O * param >= 0) when cautious]).
    All matrices of one shape go through one batched orthogonalisation, split over the mesh's devices
    (see _orthogonalise). normuon_beta2=None: no NorMuon (and no second-moment state).
    """

    def init_fn(params):
        for leaf in jax.tree.leaves(params):
            if leaf.ndim != 2:
                raise ValueError(f"muon: expects 2-D parameters only, got shape {leaf.shape}")
        buffers = jax.tree.map(jnp.zeros_like, params)
        if normuon_beta2 is None:
            return MuonState(count=jnp.zeros([], jnp.int32), momentum_buffer=buffers)
        second = tuple(jnp.zeros(_normuon_shape(p.shape), p.dtype) for p in jax.tree.leaves(params))
        return NorMuonState(count=jnp.zeros([], jnp.int32), momentum_buffer=buffers, second_moment=second)

    def update_fn(updates, state, params=None):
        lr, mom, wd = (h(state.count) if callable(h) else h for h in (learning_rate, momentum, weight_decay))
        if wd is not None and params is None:
            raise ValueError("muon: weight decay needs the parameters (optimizer.update(grads, state, params))")
        buf = jax.tree.map(lambda b, g: b + (1 - mom) * (g - b), state.momentum_buffer, updates)
        if nesterov:
            g_eff = jax.tree.map(lambda g, b: g + mom * (b - g), updates, buf)
        else:
            g_eff = buf
        leaves, treedef = jax.tree.flatten(g_eff)
        ortho = _orthogonalise(leaves, ns_steps, ns_dtype, method, muon_eq)
        ortho = [o.astype(g.dtype) for g, o in zip(leaves, ortho)]
        if muon_plus:
            ortho = [o * (min(o.shape) ** 0.5 / jnp.maximum(jnp.linalg.norm(o), 1e-6)) for o in ortho]
        if normuon_beta2 is not None:
            ortho, second = zip(*(_normuon(o, v, normuon_beta2) for o, v in zip(ortho, state.second_moment)))
            new_state = NorMuonState(optax.safe_increment(state.count), buf, tuple(second))
        else:
            new_state = MuonState(count=optax.safe_increment(state.count), momentum_buffer=buf)
        if wd is not None:
            p_leaves = treedef.flatten_up_to(params)
            ortho = [o + wd * p * ((o * p >= 0) if cautious else 1) for o, p in zip(ortho, p_leaves)]
        # torch's (out, in) is our (in, out) transposed: nanochat's max(1, rows/cols) is out/in here
        new = [-lr * max(1.0, g.shape[-1] / g.shape[-2]) ** 0.5 * o for g, o in zip(leaves, ortho)]
        return jax.tree.unflatten(treedef, new), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _equilibrate(X: jax.Array, transposed: list[bool]) -> jax.Array:
    """MuonEq on a stack of wide-oriented kernels: every output neuron's weights (torch's rows: X's columns, or
    X's rows for a member stored tall and transposed) rescaled to |X|_F / sqrt(neurons), the mean neuron norm.
    On the stack every matrix is whole on its device, so this is local."""
    t = jnp.asarray(transposed + [False] * (X.shape[0] - len(transposed)))[:, None, None]
    neurons = jnp.where(t, X.shape[-2], X.shape[-1])
    norms = jnp.where(t, jnp.linalg.norm(X, axis=-1, keepdims=True), jnp.linalg.norm(X, axis=-2, keepdims=True))
    target = jnp.linalg.norm(X, axis=(-2, -1), keepdims=True) / jnp.sqrt(neurons)
    return X * (target / jnp.maximum(norms, 1e-6))


def _normuon_axis(shape: tuple) -> int:
    """NorMuon keeps one second moment per neuron of the larger side: it averages over the smaller one
    (over `in` when out >= in, as nanochat master's red_dim on torch's (out, in))."""
    return -2 if shape[-1] >= shape[-2] else -1


def _normuon_shape(shape: tuple) -> tuple:
    return (1, shape[-1]) if _normuon_axis(shape) == -2 else (shape[-2], 1)


def _normuon(o: jax.Array, v: jax.Array, beta2: float) -> tuple[jax.Array, jax.Array]:
    """NorMuon: v <- lerp(v, mean(o^2 over the smaller side), 1 - beta2); o / sqrt(v) rescaled back to o's
    Frobenius norm. Returns (o', v)."""
    axis = _normuon_axis(o.shape)
    v_mean = jnp.mean(jnp.square(o), axis=axis, keepdims=True)
    v = v + (1 - beta2) * (v_mean - v)
    step = jax.lax.rsqrt(jnp.maximum(v, 1e-10))
    norm_new = jnp.sqrt(jnp.sum(v_mean * o.shape[axis] * jnp.square(step)))
    return o * step * (jnp.linalg.norm(o) / jnp.maximum(norm_new, 1e-10)), v


def _orthogonalise(leaves: list, ns_steps: int, dtype, method: str, muon_eq: bool = False) -> list[jax.Array]:
    """Newton-Schulz (or Polar Express) on every matrix, batched: all matrices of one shape (in the wide
    orientation, tall ones transposed) go through one call, as one stack (MuonEq first, when asked).

    Under a mesh the stack is split over every device (logical axis 'stack', padded with zero matrices to a
    multiple of the device count; NS maps zero to zero): each device orthogonalises its share once, instead
    of every data-parallel replica repeating all of it (or FSDP gathering inside every NS matmul), and the
    results go back to the parameters' shardings in one resharding (nanochat's DistMuon splits the same work
    over ranks).
    """
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(leaves):
        groups.setdefault((min(m.shape), max(m.shape)), []).append(i)
    out: list = [None] * len(leaves)
    for idx in groups.values():
        wide = [m if m.shape[0] <= m.shape[1] else m.T for m in (leaves[i] for i in idx)]
        # every member split the same way first (rows over the stack's devices), so that going from rows to
        # whole matrices per device is one all-to-all rather than a gather of the whole stack; on the way, rows
        # over (fsdp, tensor) (one all-to-all when tensor splits the columns: XLA finds no direct path from
        # (fsdp rows, tensor columns) to rows over every device and would gather the whole matrix instead)
        stack = jnp.stack([constrain(constrain(m, ("stack_rows", None)), ("stack", None)) for m in wide])
        pad = -len(idx) % shard_count("stack")
        if pad:
            stack = jnp.concatenate([stack, jnp.zeros((pad, *stack.shape[1:]), stack.dtype)])
        stack = constrain(stack, ("stack", None, None))
        if muon_eq:
            stack = _equilibrate(stack, [leaves[i].shape[0] > leaves[i].shape[1] for i in idx])
        ortho = newton_schulz(stack, ns_steps, dtype, method)
        for j, i in enumerate(idx):
            m = leaves[i]
            o = constrain(ortho[j], ("stack_rows", None))  # the same way back
            out[i] = o if m.shape[0] <= m.shape[1] else o.T
    return out


def lr_multiplier(step, num_iterations: int, cfg: OptimConfig) -> jax.Array:
    """nanochat's LR multiplier: linear warm-up (warmup_steps, else warmup_ratio), 1.0, then linear
    warm-down to final_lr_frac."""
    warmup = cfg.warmup_steps or round(cfg.warmup_ratio * num_iterations)
    warmdown = round(cfg.warmdown_ratio * num_iterations)
    step = jnp.asarray(step, jnp.float32)
    up = (step + 1) / max(warmup, 1)
    progress = (num_iterations - step) / max(warmdown, 1)
    down = progress + (1 - progress) * cfg.final_lr_frac
    return jnp.where(step < warmup, up, jnp.where(step <= num_iterations - warmdown, 1.0, down))


def muon_momentum(step, cfg: OptimConfig, num_iterations: int | None = None) -> jax.Array:
    """Muon momentum: linear from muon_momentum_start to muon_momentum over the warm-up steps (0: none); with
    muon_momentum_final >= 0, linear from muon_momentum to it over the LR warm-down (nanochat master)."""
    warmup = cfg.muon_momentum_warmup_steps
    step = jnp.asarray(step, jnp.float32)
    frac = jnp.minimum(step / warmup, 1.0) if warmup > 0 else jnp.ones_like(step)
    momentum = (1 - frac) * cfg.muon_momentum_start + frac * cfg.muon_momentum
    if cfg.muon_momentum_final < 0:
        return momentum
    if num_iterations is None:
        raise ValueError("muon_momentum: optim.muon_momentum_final needs num_iterations")
    warmdown = round(cfg.warmdown_ratio * num_iterations)
    progress = (step - (num_iterations - warmdown)) / max(warmdown, 1)
    down = (1 - progress) * cfg.muon_momentum + progress * cfg.muon_momentum_final
    return jnp.where((step >= warmup) & (progress >= 0), down, momentum)


def muon_weight_decay(step, num_iterations: int, cfg: OptimConfig) -> jax.Array:
    """Muon's weight decay at `step`: constant, or cosine from muon_weight_decay to 0 at num_iterations."""
    if cfg.muon_weight_decay_schedule == "constant":
        return jnp.asarray(cfg.muon_weight_decay, jnp.float32)
    step = jnp.asarray(step, jnp.float32)
    return cfg.muon_weight_decay * 0.5 * (1 + jnp.cos(jnp.pi * step / num_iterations))


def param_labels(params):
    """The optimizer group of every parameter, by name and shape, first match wins:

    1. a path component containing 'value_embed': 'value_embedding' (AdamW);
    2. top-level 'wte': 'embedding', 'lm_head': 'unembedding' (AdamW);
    3. a 2-D parameter under 'blocks': 'muon' (every matrix of the blocks, gates included, as nanochat master);
    4. a path component containing 'resid_lambda': 'resid_lambdas', 'x0_lambda': 'x0_lambdas' (AdamW);
    5. fewer than 2 dimensions, or a path component containing 'lambda' or 'gate': 'scalar' (AdamW).
    Anything else (a 3-D kernel in the blocks, an unknown top-level matrix) is an error.
    """

    def label(path, leaf):
        names = [_key_name(k) for k in path]
        if names and names[-1] == "value":  # nnx.Variable leaves add a trailing .value
            names = names[:-1]
        where = "/".join(names)
        has = lambda part: any(part in name for name in names)  # noqa: E731
        ndim = jnp.ndim(leaf)
        if has("value_embed"):
            return "value_embedding"
        if names and names[0] in LABELS:
            return LABELS[names[0]]
        if names and names[0] == "blocks" and ndim == 2:
            return "muon"
        for part in ("resid_lambda", "x0_lambda"):
            if has(part):
                return part + "s"
        if ndim < 2 or has("lambda") or has("gate"):
            return "scalar"
        if names and names[0] == "blocks":
            raise ValueError(f"optimizer: parameter '{where}' has shape {jnp.shape(leaf)}; only 2-D parameters "
                             "are supported in the blocks")
        raise ValueError(f"optimizer: parameter '{where}' (shape {jnp.shape(leaf)}) matches no optimizer group "
                         "(wte, lm_head, blocks, value_embed*, *lambda*, *gate*, or fewer than 2 dimensions)")

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
    """The full nanochat optimizer for a params tree labelled by `param_labels` (groups without parameters
    are left out of the state)."""
    adam_scale = (model_dim / REFERENCE_WIDTH) ** -0.5

    def scheduled(base_lr):
        return lambda step: base_lr * lr_multiplier(step, num_iterations, cfg)

    def adamw(group, base_lr):
        b1, b2, eps, wd = cfg.adam_group(group)
        # hyperparameters and arithmetic in float32 whatever the parameters' dtype, the moments stored in theirs (as
        # master's fused AdamW): in bfloat16 a beta2 of 0.999 is 1.0 (NaN updates), in float16 an eps of 1e-10 is 0
        return _keep_state_dtypes(optax.inject_hyperparams(optax.adamw, hyperparam_dtype=jnp.float32)(
            learning_rate=scheduled(base_lr), b1=b1, b2=b2, eps=eps, weight_decay=wd))

    muon_options = dict(nesterov=cfg.muon_nesterov, ns_steps=cfg.ns_steps, ns_dtype=jnp.dtype(cfg.ns_dtype),
                        method=cfg.orthogonalizer, muon_eq=cfg.muon_eq, muon_plus=cfg.muon_plus,
                        normuon_beta2=cfg.normuon_beta2 if cfg.normuon else None, cautious=cfg.cautious_weight_decay)
    if cfg.muon_weight_decay > 0:  # a hyperparameter in the state only when used (first-release states unchanged)
        muon_options["weight_decay"] = lambda step: muon_weight_decay(step, num_iterations, cfg)
    transforms = {
        "embedding": adamw("embedding", cfg.embedding_lr * adam_scale),
        "unembedding": adamw("unembedding", cfg.unembedding_lr * adam_scale),
        "value_embedding": adamw("value_embedding", cfg.value_embedding_lr * adam_scale),
        "resid_lambdas": adamw("resid_lambdas", cfg.resid_lambdas_lr),
        "x0_lambdas": adamw("x0_lambdas", cfg.x0_lambdas_lr),
        "scalar": adamw("scalar", cfg.scalar_lr),
        "muon": optax.inject_hyperparams(muon, static_args=("ns_steps", "ns_dtype", "method", "normuon_beta2"))(
            learning_rate=scheduled(cfg.matrix_lr), momentum=lambda step: muon_momentum(step, cfg, num_iterations),
            **muon_options),
    }
    parts = [clip_by_global_norm_torch(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    return optax.chain(*parts, _partition(transforms, param_labels))


def _keep_state_dtypes(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """inner, its updated state cast back to the dtypes of the state it was given (float32 arithmetic on
    bfloat16 moments would otherwise turn them into float32 after the first step)."""

    def update_fn(updates, state, params=None):
        updates, new_state = inner.update(updates, state, params)
        return updates, jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, state)

    return optax.GradientTransformation(inner.init, update_fn)


def _partition(transforms: dict, labels_fn) -> optax.GradientTransformation:
    """optax.partition over the groups that have parameters in the tree (labels follow the tree's structure,
    so init and update agree)."""

    def present(tree) -> optax.GradientTransformation:
        used = set(jax.tree.leaves(labels_fn(tree)))
        return optax.partition({k: t for k, t in transforms.items() if k in used}, labels_fn)

    def update_fn(updates, state, params=None):
        return present(updates).update(updates, state, params)

    return optax.GradientTransformation(lambda params: present(params).init(params), update_fn)


@dataclasses.dataclass(frozen=True)
class DepthScaling:
    """nanochat master's hyperparameters for this depth, derived from optim.reference_depth (see depth_scaling)."""

    scaling_params: int  # parameters in the blocks and lm_head (master's scaling-law count)
    reference_params: int  # the same at the reference depth
    target_tokens: int  # D = target_param_data_ratio x scaling_params
    reference_tokens: float  # D_ref = target_param_data_ratio x reference_params
    total_batch_size: int  # B: tokens per step
    lr_scale: float  # sqrt(B / B_ref), on every learning rate but scalar_lr
    optim: OptimConfig  # [optim] with the learning rates and muon_weight_decay scaled

    def summary(self, depth: int, reference_depth: int) -> str:
        return (f"depth scaling from d{reference_depth}: scaling params {self.scaling_params:,} (d{reference_depth}: "
                f"{self.reference_params:,}) | tokens D {self.target_tokens:,} (D_ref {self.reference_tokens:,.0f}) | "
                f"batch {self.total_batch_size:,} tokens | learning rates x {self.lr_scale:.4f} | Muon weight decay "
                f"{self.optim.muon_weight_decay:.6f} for d{depth}")


def scaling_param_count(params) -> int:
    """Master's scaling-law parameter count: everything under 'blocks' and 'lm_head' (abstract leaves work)."""
    return sum(math.prod(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
               if _key_name(path[0]) in ("blocks", "lm_head"))


def depth_scaling(cfg: OptimConfig, train: TrainConfig, scaling_params: int, reference_params: int) -> DepthScaling:
    """nanochat master's base_train scaling from a reference depth: D = ratio x params; B (when
    train.total_batch_size is -1) = B_ref x (D / D_ref)^exponent rounded to a power of 2; learning rates x
    sqrt(B / B_ref) (scalar_lr, master's fixed 0.2, excepted); Muon weight decay x sqrt(B / B_ref) x D_ref / D."""
    if train.target_param_data_ratio <= 0:
        raise ValueError("depth scaling: optim.reference_depth needs train.target_param_data_ratio > 0")
    target_tokens = int(train.target_param_data_ratio * scaling_params)
    reference_tokens = train.target_param_data_ratio * reference_params
    batch = train.total_batch_size
    if batch == -1:
        predicted = cfg.reference_batch_size * (target_tokens / reference_tokens) ** cfg.batch_size_exponent
        batch = 2 ** round(math.log2(predicted))
    lr_scale = (batch / cfg.reference_batch_size) ** 0.5
    optim = dataclasses.replace(cfg.scale_lrs(lr_scale), scalar_lr=cfg.scalar_lr,
                                muon_weight_decay=cfg.muon_weight_decay * lr_scale * reference_tokens / target_tokens)
    return DepthScaling(scaling_params, reference_params, target_tokens, reference_tokens, batch, lr_scale, optim)
