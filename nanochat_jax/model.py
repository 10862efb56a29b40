"""The GPT: nanochat's architecture as a Flax NNX module, its KV cache, parameter count and FLOPs.

Architecture (nanochat, first release): token embedding -> RMSNorm -> blocks -> RMSNorm -> untied lm_head,
with logits soft-capped by softcap * tanh(logits / softcap) in fp32. Each block is pre-norm:
x += attn(norm(x)); x += mlp(norm(x)). Attention uses rotary position embeddings, then a QK RMSNorm,
and grouped-query attention (n_kv_heads key/value heads). The MLP is c_fc (4x) -> relu(x)^2 -> c_proj.
RMSNorm has no parameters and there are no biases anywhere.

nanochat master's options (ModelConfig; all off by default, when the forward is exactly the first release's):
- window_pattern: sliding-window attention on the S layers (a query sees itself and the `short` positions
  before it), on every attention path: XLA and cuDNN (local_window_size), splash (a local mask) and the KV cache.
- value_embeds: layers i with i % 2 == (n_layer - 1) % 2 add 3 * sigmoid(x[:12] @ ve_gate) * ve[token] to the
  values, one gate per key/value head, from a per-layer embedding table ve (ResFormer).
- smear: x_t += smear_lambda * sigmoid(x_t[:24] @ smear_gate) * x_{t-1} on the normed embeddings. Under the KV
  cache the previous token is carried in KVCache.last, so decoding equals the full forward for any chunking
  (master keeps it only for one-token steps: the first position of a later multi-token chunk loses its smear).
- layer_lambdas: before block i, x = resid_lambdas[i] * x + x0_lambdas[i] * x0, x0 the (smeared) embedding.
- backout: x -= backout_lambda * (the residual after block n_layer // 2) before the final norm.
- qk_scale multiplies q and k after the QK norm; pad_vocab_to pads the tables (logits are sliced back to
  vocab_size); init = "master" is master's initialisation of the first release's parameters.

Parameters are stored in cfg.param_dtype and cast to cfg.compute_dtype inside the forward; softmax and
the loss run in fp32. Kernels are stored (in, out). Every nnx.Param carries `axes`, a tuple of logical axis
names that the sharding rules map onto the device mesh. `train_in_fp8` switches a model's large Linear layers to
fp8 products (`fp8_matmul`, master's --fp8), which the train step's copy of the model uses under train.fp8.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from nanochat_jax import splash
from nanochat_jax.config import ConfigError, ModelConfig
from nanochat_jax.sharding import constrain, shard_count, tensor_shards

VE_GATE_CHANNELS, SMEAR_GATE_CHANNELS = 12, 24  # the leading channels the value-embedding and smear gates read
ACTIVATION_AXES = ("batch", "sequence", "embed_act")  # the residual stream (B, T, C): rows over (data, fsdp)
EPS = float(jnp.finfo(jnp.float32).eps)  # torch's F.rms_norm default eps for fp32


def head_dim(cfg: ModelConfig) -> int:
    """The actual per-head width: n_embd // n_head (cfg.head_dim is only the target used to pick n_head)."""
    return cfg.n_embd // cfg.n_head


def rms_norm(x: jax.Array) -> jax.Array:
    """Parameter-free RMSNorm over the last axis, computed in fp32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + EPS)).astype(x.dtype)


def padded_vocab(cfg: ModelConfig) -> int:
    """The rows of the embedding tables and columns of lm_head: vocab_size rounded up to cfg.pad_vocab_to."""
    return -(-cfg.vocab_size // cfg.pad_vocab_to) * cfg.pad_vocab_to


def attention_windows(cfg: ModelConfig) -> tuple[int | None, ...]:
    """Per layer, the sliding window w (a query attends to itself and the w positions before it) or None (full
    context): cfg.window_pattern tiled over the layers, the last layer always full. S is master's short window,
    sequence_len / 4 rounded up to a multiple of 128 (FA3's tile); a window >= sequence_len is full context."""
    quarter = -(-cfg.sequence_len // 4)
    short = -(-quarter // 128) * 128  # 2048 -> 512
    windows = [short if cfg.window_pattern[i % len(cfg.window_pattern)] == "S" else None for i in range(cfg.n_layer)]
    windows[-1] = None
    return tuple(w if w is not None and w < cfg.sequence_len else None for w in windows)


def has_value_embed(layer: int, n_layer: int) -> bool:
    """Value embeddings on alternating layers, the last one always included (master's has_ve)."""
    return layer % 2 == (n_layer - 1) % 2


def rotary_cos_sin(positions: jax.Array, dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin of shape positions.shape + (1, dim // 2), computed in fp32 and cast to dtype."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(freqs)[..., None, :].astype(dtype), jnp.sin(freqs)[..., None, :].astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the two halves of the head dimension of x (B, T, H, D): (x1, x2) -> (x1 c + x2 s, -x1 s + x2 c)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin], axis=-1)


def initial(kind: str, std: float, shape: tuple[int, ...], rngs: nnx.Rngs) -> jax.Array:
    """fp32 initial values: 'zero', 'normal' (std), 'uniform' (in +-sqrt(3) std: the same std, no outliers) or
    'gate' (uniform in [0, 0.02], master's gates)."""
    if kind == "zero":
        return jnp.zeros(shape, jnp.float32)
    if kind == "normal":
        return std * jax.random.normal(rngs.params(), shape, jnp.float32)
    bounds = (0.0, 0.02) if kind == "gate" else (-math.sqrt(3) * std, math.sqrt(3) * std)
    return jax.random.uniform(rngs.params(), shape, jnp.float32, *bounds)


ZERO = ("zero", 0.0)  # the (kind, std) of zero-initialised matrices


def matrix_init(cfg: ModelConfig, fan_in: int, fan_out: int, scale: float = 1.0) -> tuple[str, float]:
    """(kind, std) of a block matrix: the first release's normal with std 1/sqrt(fan_in) * min(1, sqrt(fan_out /
    fan_in)), or master's uniform with std scale / sqrt(fan_in)."""
    if cfg.init == "master":
        return "uniform", scale / math.sqrt(fan_in)
    return "normal", 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))


@jax.custom_vjp
def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (..., in) @ kernel (in, out), differentiated by hand: the kernel's gradient is computed as (g^T x)^T, not
    x^T g. Both contract over the tokens, but for x^T g XLA's CPU compiler first writes the whole output gradient
    g (tokens, out) transposed (for the lm_head, the 128 MB logits gradient of a 4096 x 8192 micro-batch: a fifth
    of the step); the transpose of the small (in, out) result is what moves instead. Same numbers."""
    return x @ kernel


def _matmul_fwd(x, kernel):
    return x @ kernel, (x, kernel)


def _matmul_bwd(residuals, g):
    x, kernel = residuals
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    return g @ kernel.T, (g2.T @ x2).T


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def to_fp8(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """Tensor-wise dynamic scaling: (x * scale rounded to the fp8 `dtype`, saturating, and 1 / scale), the scale
    mapping max |x| to the format's largest value (448 for float8_e4m3fn, 57344 for float8_e5m2)."""
    largest = float(jnp.finfo(dtype).max)
    scale = largest / jnp.maximum(jnp.max(jnp.abs(x)).astype(jnp.float32), 1e-12)
    return jnp.clip(x.astype(jnp.float32) * scale, -largest, largest).astype(dtype), 1.0 / scale


def fp8_product(a, b, contract: tuple[int, int], dtype) -> jax.Array:
    """The product of two `to_fp8` results contracting dimension contract[0] of a with contract[1] of b, in `dtype`:
    the fp8 operands go into the dot as they are (on Hopper XLA's GEMM then runs on the fp8 tensor cores), its
    result comes out in `dtype` (so a sum over devices under tensor parallelism moves what the plain product's would,
    not fp32) and is unscaled in fp32: in bf16 a second rounding, which master's kernel does not make."""
    (aq, a_inv), (bq, b_inv) = a, b
    out = jax.lax.dot_general(aq, bq, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=dtype)
    return (out.astype(jnp.float32) * (a_inv * b_inv)).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def fp8_matmul(x: jax.Array, kernel: jax.Array, out_axis: str | None = None) -> jax.Array:
    """matmul's three products with fp8 operands, as nanochat master's --fp8 (its "tensorwise" recipe): x and the
    kernel in float8_e4m3fn, the output gradient in float8_e5m2, each under one scale per tensor computed from the
    tensor itself (under model.loss_chunk the lm_head's x and gradient get one per chunk). On CPUs XLA emulates the
    same rounding. Two differences from master's torch._scaled_mm: the kernel is rounded to the compute dtype before
    fp8 (as every product here casts it), and in bf16 the output and the input gradient are rounded to bf16 before
    they are unscaled (see fp8_product; the weight gradient is rounded once). The backward pass keeps the fp8 tensors
    as residuals. out_axis: the logical axis name of the kernel's output features (see fp8_input_gradient)."""
    return _fp8_matmul_fwd(x, kernel, out_axis)[0]


def _fp8_matmul_fwd(x, kernel, out_axis):
    xq, kq = to_fp8(x, jnp.float8_e4m3fn), to_fp8(kernel, jnp.float8_e4m3fn)
    return fp8_product(xq, kq, (x.ndim - 1, 0), x.dtype), (xq, kq)


def _fp8_matmul_bwd(out_axis, residuals, g):
    (xq, x_inv), kq = residuals
    gq, g_inv = to_fp8(g, jnp.float8_e5m2)
    dx = fp8_input_gradient((gq, g_inv), kq, out_axis, g.dtype)
    return dx, fp8_weight_gradient((gq, g_inv), (xq, x_inv), g.dtype)


def fp8_input_gradient(g, kernel, out_axis: str | None, dtype) -> jax.Array:
    """g @ kernel^T from fp8 g and kernel, in `dtype`. Where tensor parallelism splits the output features
    (out_axis), the product of each device's part comes out in fp32, is unscaled and rounded, and then the parts are
    summed: XLA then adds the parts of the products of one input (q, k and v) before it sums them over devices, as
    for plain products (unscaled after the sum, each was all-reduced on its own)."""
    (gq, g_inv), (kq, k_inv) = g, kernel
    n = tensor_shards(out_axis) if out_axis else 1
    if n == 1 or kq.shape[1] % n:
        return fp8_product(g, kernel, (gq.ndim - 1, 1), dtype)
    parts = gq.reshape(*gq.shape[:-1], n, -1), kq.reshape(kq.shape[0], n, -1)  # (..., n, out / n), (in, n, out / n)
    dims = (((gq.ndim,), (2,)), ((gq.ndim - 1,), (1,)))
    per_part = jax.lax.dot_general(*parts, dims, preferred_element_type=jnp.float32)  # (n, ..., in)
    return _sum_unscaled(per_part, g_inv * k_inv, dtype)


def fp8_weight_gradient(g, x, dtype) -> jax.Array:
    """The kernel's gradient (g^T x)^T (as matmul's) from fp8 g and x, in `dtype`: the product of each shard of the
    batch rows comes out in fp32, is unscaled and rounded to `dtype` once, and then the shards are summed. The sum
    over devices so carries no per-micro-step scale, and XLA moves it out of the gradient accumulation loop as it
    does for plain products (unscaling after the sum kept one all-reduce of the weight gradients in every
    micro-step: 3.2x the bytes at d24 on 8 GPUs, bench/RESULTS.md)."""
    (gq, g_inv), (xq, x_inv) = g, x
    n = shard_count("batch")
    n = n if gq.shape[0] % n == 0 else 1  # (rows the mesh does not split: one shard)
    shards = lambda q: q.reshape(n, -1, q.shape[-1])  # noqa: E731  (rows first: each shard its own rows)
    dims = (((1,), (1,)), ((0,), (0,)))
    per_shard = jax.lax.dot_general(shards(gq), shards(xq), dims, preferred_element_type=jnp.float32)
    return _sum_unscaled(per_shard, g_inv * x_inv, dtype).T


def _sum_unscaled(parts: jax.Array, inverse_scale: jax.Array, dtype) -> jax.Array:
    """The sum over the leading axis of fp32 `parts`, each unscaled and rounded to `dtype` first, summed in `dtype`
    (jnp.sum would sum bf16 in fp32): where the parts are on different devices, what crosses is `dtype`."""
    return jax.lax.reduce((parts * inverse_scale).astype(dtype), jnp.zeros((), dtype), jax.lax.add, (0,))


fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


class Linear(nnx.Module):
    """A bias-free linear layer with an (in, out) kernel, initialised by `initial(init, std, ...)`. fp8 (set by
    `train_in_fp8`, never by a config): its products are `fp8_matmul`'s."""

    def __init__(self, fan_in: int, fan_out: int, axes: tuple, cfg: ModelConfig, *, init: tuple[str, float],
                 rngs: nnx.Rngs):
        self.kernel = nnx.Param(initial(*init, (fan_in, fan_out), rngs).astype(cfg.param_dtype), axes=axes)
        self.fp8 = False

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.product(x, self.kernel[...])

    def product(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """x @ kernel (this layer's kernel, or a view of it) in x's dtype, in fp8 where this layer trains so."""
        if self.fp8:
            return fp8_matmul(x, kernel.astype(x.dtype), self.kernel.axes[1])
        return matmul(x, kernel.astype(x.dtype))


def train_in_fp8(model: nnx.Module) -> tuple[int, int]:
    """Switch the model's Linear layers to fp8 products where both sides are multiples of 16 and at least 128 wide
    (master's filter: the fp8 GEMM's alignment, and no gain on small ones): every block matrix and the lm_head of a
    real model, not the gates. Only the training step's copy of the model is switched (master evaluates in bf16).
    Returns (layers switched, Linear layers)."""
    layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, Linear)]
    for layer in layers:
        fan_in, fan_out = layer.kernel.shape
        layer.fp8 = fan_in % 16 == 0 and fan_out % 16 == 0 and min(fan_in, fan_out) >= 128
    return sum(layer.fp8 for layer in layers), len(layers)


class Embedding(nnx.Module):
    """A token embedding table (V, width), initialised by `initial(init, std, ...)`."""

    def __init__(self, vocab: int, width: int, cfg: ModelConfig, *, init: tuple[str, float], rngs: nnx.Rngs):
        self.embedding = nnx.Param(initial(*init, (vocab, width), rngs).astype(cfg.param_dtype), axes=("vocab", "embed"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.embedding[...][tokens]


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        C, D = cfg.n_embd, head_dim(cfg)
        self.layer, self.n_head, self.n_kv_heads, self.head_dim = layer, cfg.n_head, cfg.n_kv_heads, D
        self.attention_impl, self.qk_scale = cfg.attention_impl, cfg.qk_scale
        self.sliding_window = attention_windows(cfg)[layer]  # None: full context
        self.c_q = Linear(C, self.n_head * D, ("embed", "heads"), cfg, init=matrix_init(cfg, C, self.n_head * D), rngs=rngs)
        kv_init = matrix_init(cfg, C, self.n_kv_heads * D)
        self.c_k = Linear(C, self.n_kv_heads * D, ("embed", "kv_heads"), cfg, init=kv_init, rngs=rngs)
        self.c_v = Linear(C, self.n_kv_heads * D, ("embed", "kv_heads"), cfg, init=kv_init, rngs=rngs)
        self.c_proj = Linear(self.n_head * D, C, ("heads", "embed"), cfg, init=ZERO, rngs=rngs)
        self.has_ve = cfg.value_embeds and has_value_embed(layer, cfg.n_layer)
        if self.has_ve:
            self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_heads, (None, "kv_heads"), cfg, init=("gate", 0.0),
                                  rngs=rngs)

    def __call__(self, x, cos, sin, ve=None, cache=None):
        """Training: cache is None, causal attention over x. Decoding: cache = (k_all, v_all, positions, mask);
        the new keys/values are written at `positions` (B, T) of this layer and the updated (k_all, v_all) returned.
        ve (B, T, n_kv_heads * head_dim): this layer's value embeddings of the tokens, or None."""
        B, T, _ = x.shape
        q = self.c_q(x).reshape(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).reshape(B, T, self.n_kv_heads, self.head_dim)
        v = self.c_v(x).reshape(B, T, self.n_kv_heads, self.head_dim)
        if ve is not None:
            gate = 3 * jax.nn.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, n_kv_heads), in (0, 3)
            v = v + gate[..., None] * ve.reshape(v.shape)
        q, k = rms_norm(apply_rotary(q, cos, sin)), rms_norm(apply_rotary(k, cos, sin))
        if self.qk_scale != 1.0:
            q, k = q * jnp.asarray(self.qk_scale, q.dtype), k * jnp.asarray(self.qk_scale, k.dtype)
        w = self.sliding_window
        if cache is None and self.attention_impl == "splash" and splash.usable(T):
            y = splash.causal_attention(q, k, v, w)
        elif cache is None:  # XLA's attention also stands in for splash where it cannot run (see splash.usable)
            cudnn = self.attention_impl == "cudnn"
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=None if w is None else (w, 0),
                                             implementation="cudnn" if cudnn else None)
        else:
            k_all, v_all, positions, mask = cache  # per layer (B, Hkv, position, D): heads before positions
            i = self.layer
            k_l, v_l = _cache_write(k_all[i], k, positions), _cache_write(v_all[i], v, positions)
            window = mask.shape[-1]  # attend to the first `window` cache positions only (see GPT.decode)
            if w is not None:  # ... and, sliding, to the w positions before the query
                mask = mask & (positions[:, None, :, None] - jnp.arange(window)[None, None, None, :] <= w)
            y = _cached_attention(q, k_l[:, :, :window].astype(q.dtype), v_l[:, :, :window].astype(q.dtype), mask)
            cache = ((*k_all[:i], k_l, *k_all[i + 1:]), (*v_all[:i], v_l, *v_all[i + 1:]), positions, cache[3])
        return self.c_proj(y.reshape(B, T, self.n_head * self.head_dim)), cache


def _cache_write(layer, new, positions):
    """Row b of new (B, T, Hkv, D) into layer (B, Hkv, max_len, D) at positions[b] (writes past max_len dropped).
    Written per row (vmap): the scatter keeps the batch axis, so on a batch-sharded mesh each device writes its
    own rows (indexing the rows instead gathered every row's update on every device, in every step)."""
    write = lambda rows, row, at: rows.at[:, at].set(row.swapaxes(0, 1).astype(rows.dtype), mode="drop")  # noqa: E731
    return jax.vmap(write)(layer, new, positions)


def _cached_attention(q, k, v, mask):
    """Attention of q (B, T, H, D) to a cache window k, v (B, Hkv, W, D) under mask (B, 1, T, W), softmax in fp32.
    The window stays in the cache's layout (heads before positions), so on CPUs no step transposes it."""
    B, T, H, D = q.shape
    Hkv = k.shape[1]
    q = q.reshape(B, T, Hkv, H // Hkv, D)
    scores = jnp.einsum("btkgd,bkwd->bkgtw", q, k).astype(jnp.float32) / math.sqrt(D)
    scores = jnp.where(mask[:, :, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgtw,bkwd->btkgd", probs, v).reshape(B, T, H, D)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        C = cfg.n_embd
        self.c_fc = Linear(C, 4 * C, ("embed", "mlp"), cfg, init=matrix_init(cfg, C, 4 * C, scale=0.4), rngs=rngs)
        self.c_proj = Linear(4 * C, C, ("mlp", "embed"), cfg, init=ZERO, rngs=rngs)

    def __call__(self, x):
        return self.c_proj(jnp.square(jax.nn.relu(self.c_fc(x))))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.attn = Attention(cfg, layer, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, ve=None, cache=None):
        y, cache = self.attn(rms_norm(x), cos, sin, ve, cache)
        x = x + y
        return x + self.mlp(rms_norm(x)), cache


def _run_block(block, x, cos, sin, ve):
    return block(x, cos, sin, ve)[0]


class KVCache(flax.struct.PyTreeNode):
    """Keys/values of every layer for B rows of up to max_len positions; lengths[b] = valid positions of row b.
    With the smear, last[b] is row b's token at position lengths[b] - 1 (None for models without it).
    One array per layer: a decode step's attention reads its layer's keys and values in place, where slicing one
    layer out of a stacked array would copy it in every step (XLA on CPUs)."""

    k: tuple[jax.Array, ...]  # per layer (B, n_kv_heads, max_len, head_dim)
    v: tuple[jax.Array, ...]
    lengths: jax.Array  # (B,) int32
    last: jax.Array | None = None  # (B,) int32

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        return cls.zeros(cfg.n_layer, (batch, cfg.n_kv_heads, max_len, head_dim(cfg)), dtype or cfg.compute_dtype,
                         cfg.smear)

    @classmethod
    def zeros(cls, n_layer: int, shape: tuple[int, ...], dtype, smear: bool, shardings=None) -> "KVCache":
        """An empty cache of n_layer layers of `shape` (B, n_kv_heads, max_len, head_dim). shardings: None, or the
        (layers, rows) pair of shardings to make the arrays under (inside jit each device then fills its own shard)."""
        kv, rows = shardings or (None, None)
        place = lambda x, sharding: x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)  # noqa: E731
        layers = lambda: tuple(place(jnp.zeros(shape, dtype), kv) for _ in range(n_layer))  # noqa: E731
        lengths = place(jnp.zeros(shape[:1], jnp.int32), rows)
        return cls(k=layers(), v=layers(), lengths=lengths, last=lengths if smear else None)


class GPT(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        if cfg.attention_impl == "cudnn" and cfg.compute_dtype == "float32":
            raise ConfigError("model.attention_impl='cudnn' needs compute_dtype bfloat16 or float16 "
                              "(cuDNN has no fp32 flash attention)")
        # Plain hashable settings only: ModelConfig itself is unhashable and would break nnx graphdef hashing.
        self.compute_dtype, self.softcap, self.loss_chunk = cfg.compute_dtype, cfg.softcap, cfg.loss_chunk
        self.remat, self.rope_theta, self.head_dim = cfg.remat, cfg.rope_theta, head_dim(cfg)
        self.sequence_len = cfg.sequence_len  # the context it was trained on (chat front ends refuse longer prompts)
        self.vocab_size, self.smear, self.backout = cfg.vocab_size, cfg.smear, cfg.backout
        self.layer_lambdas = cfg.layer_lambdas
        C, V, L = cfg.n_embd, padded_vocab(cfg), cfg.n_layer
        master = cfg.init == "master"
        self.wte = Embedding(V, C, cfg, init=("normal", 0.8 if master else 1.0), rngs=rngs)
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(L)])
        self.lm_head = Linear(C, V, ("embed", "vocab"), cfg, init=("normal", 0.001) if master else ZERO, rngs=rngs)
        if cfg.value_embeds:  # initialised like c_v in master's init, else the first release's normal
            ve_init = matrix_init(cfg, C, C)
            self.value_embeds = nnx.Dict({str(i): Embedding(V, cfg.n_kv_heads * self.head_dim, cfg, init=ve_init,
                                                            rngs=rngs) for i in range(L) if has_value_embed(i, L)})
        if cfg.layer_lambdas:  # master's init: the residual from 1.15 down to 1.05, x0 from 0.20 down to 0.05
            depth = jnp.arange(L, dtype=jnp.float32) / max(L - 1, 1)
            self.resid_lambdas = nnx.Param((1.15 - 0.10 * depth).astype(cfg.param_dtype), axes=("layers",))
            self.x0_lambdas = nnx.Param((0.20 - 0.15 * depth).astype(cfg.param_dtype), axes=("layers",))
        if cfg.smear:
            self.smear_gate = Linear(SMEAR_GATE_CHANNELS, 1, (None, None), cfg, init=("gate", 0.0), rngs=rngs)
            self.smear_lambda = nnx.Param(jnp.zeros((), cfg.param_dtype), axes=())
        if cfg.backout:
            self.backout_lambda = nnx.Param(jnp.full((), 0.2, cfg.param_dtype), axes=())

    def _embed(self, tokens):
        """The normed token embeddings (B, T, C) in the compute dtype."""
        # the looked-up rows keep the table's FSDP-split width, split over data only; the constraint to the
        # residual layout in _trunk is then an all-to-all (without it, data x FSDP meshes gathered the whole batch)
        x = constrain(self.wte(tokens), ("batch_data", "sequence", "embed"))
        return rms_norm(x.astype(self.compute_dtype))

    def _smear(self, x, before_first):
        """x_t + smear_lambda * sigmoid(x_t[:24] @ smear_gate) * x_{t-1}, x_{-1} being before_first (B, 1, C)."""
        previous = jnp.concatenate([before_first, x[:, :-1]], axis=1)
        gate = self.smear_lambda[...].astype(x.dtype) * jax.nn.sigmoid(self.smear_gate(x[..., :SMEAR_GATE_CHANNELS]))
        return x + gate * previous

    def _trunk(self, tokens, positions, cache=None, before_first=None):
        """Embedding, blocks and final norm: hidden states (B, T, C) in the compute dtype (and the updated cache).
        before_first (B, 1, C): the smear's normed embedding of the token before tokens[:, 0] (None: zeros)."""
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta, self.compute_dtype)
        x = self._embed(tokens)
        if self.smear:
            x = self._smear(x, jnp.zeros_like(x[:, :1]) if before_first is None else before_first)
        if cache is None:
            x = constrain(x, ACTIVATION_AXES)
        run = _run_block
        if cache is None and self.remat == "block":
            run = nnx.remat(_run_block)
        elif cache is None and self.remat == "dots_saveable":
            run = nnx.remat(_run_block, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
        x0, middle = x, None
        for i, block in enumerate(self.blocks):
            if self.layer_lambdas:
                dtype = x.dtype
                x = self.resid_lambdas[i].astype(dtype) * x + self.x0_lambdas[i].astype(dtype) * x0
            ve = self.value_embeds[str(i)](tokens).astype(x.dtype) if block.attn.has_ve else None
            if cache is None:
                x = constrain(run(block, x, cos, sin, ve), ACTIVATION_AXES)
            else:
                x, cache = block(x, cos, sin, ve, cache)
            if i == len(self.blocks) // 2:
                middle = x
        if self.backout:
            x = x - self.backout_lambda[...].astype(x.dtype) * middle
        return rms_norm(x), cache

    def _head(self, x, kernel):
        """Soft-capped fp32 logits (..., vocab_size) from hidden states x (..., C) and an lm_head kernel (C, V)."""
        logits = self.lm_head.product(x, kernel)[..., :self.vocab_size].astype(jnp.float32)
        cap = self.softcap
        return cap * jnp.tanh(logits / cap) if cap > 0 else logits

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """(B, T) int32 tokens -> (B, T, V) float32 soft-capped logits, causal over each row."""
        x, _ = self._trunk(tokens, jnp.arange(tokens.shape[1])[None, :])
        return self._head(x, self.lm_head.kernel[...])

    def loss(self, tokens, targets, mask=None, reduction: str = "mean") -> jax.Array:
        """Cross-entropy in fp32. targets == -1 are ignored; mask (B, T) weights each token's loss.
        reduction: "mean" (weighted mean over non-ignored tokens; 0 if there are none), "sum", or "none" (B, T)."""
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        x, _ = self._trunk(tokens, jnp.arange(tokens.shape[1])[None, :])
        kernel = self.lm_head.kernel[...]

        def token_losses(x, targets):
            logits = self._head(x, kernel)
            # the target's logit by a one-hot select-and-sum, not take_along_axis: its gradient is then an
            # elementwise select fused with the softmax gradient instead of a scatter into a (tokens, V) zero array
            vocab = jnp.arange(logits.shape[-1], dtype=targets.dtype)
            picked = jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)
            return jnp.where(targets == -1, 0.0, jax.nn.logsumexp(logits, axis=-1) - picked)

        chunk = self.loss_chunk
        if chunk > 0:  # scan over sequence chunks; each chunk's logits are recomputed in the backward pass
            B, T, C = x.shape
            n = -(-T // chunk)
            pad = n * chunk - T
            xc = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk, C).swapaxes(0, 1)
            tc = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=-1).reshape(B, n, chunk).swapaxes(0, 1)
            body = jax.checkpoint(token_losses)
            _, losses = jax.lax.scan(lambda _, xt: (None, body(*xt)), None, (xc, tc))
            losses = losses.swapaxes(0, 1).reshape(B, n * chunk)[:, :T]
        else:
            losses = token_losses(x, targets)

        weights = (targets != -1).astype(jnp.float32)
        if mask is not None:
            weights = weights * mask.astype(jnp.float32)
            losses = losses * mask.astype(jnp.float32)
        if reduction == "none":
            return losses
        if reduction == "sum":
            return jnp.sum(losses)
        total = jnp.sum(weights)
        return jnp.sum(losses) / jnp.where(total > 0, total, 1.0)

    def decode(self, tokens: jax.Array, cache: KVCache, logits_at: jax.Array | None = None,
               window: int | None = None) -> tuple[jax.Array, KVCache]:
        """Append tokens (B, T) to the cache: row b's token t sits at position cache.lengths[b] + t and attends
        to keys 0 .. lengths[b] + t. Returns fp32 logits (B, T, V) and the cache with lengths += T.
        With logits_at (B,) (e.g. each prompt's last index), only those positions go through the head: (B, V).
        window (static, <= max_len): attention reads only the first `window` cache positions, so its cost
        follows the live length instead of the allocated one; every position written must be < window.
        Writes past max_len are dropped (the caller must size the cache)."""
        T, max_len = tokens.shape[1], cache.k[0].shape[2]
        window = max_len if window is None else min(window, max_len)
        positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        mask = (jnp.arange(window)[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, window)
        before_first = None
        if self.smear:  # the token before the chunk: the cache's last one (none at position 0)
            if cache.last is None:
                raise ValueError("this model smears: its KV cache needs `last` (make it with KVCache.init)")
            before_first = self._embed(cache.last[:, None]) * (cache.lengths > 0)[:, None, None]
        x, (k, v, _, _) = self._trunk(tokens, positions, (cache.k, cache.v, positions, mask), before_first)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]
        logits = self._head(x, self.lm_head.kernel[...])
        last = None if cache.last is None else tokens[:, -1]
        return logits, KVCache(k=k, v=v, lengths=cache.lengths + T, last=last)


NATIVE_PLATFORMS = {"cudnn": ("gpu", "cuda"), "splash": ("tpu",)}  # attention that exists on one platform only


def runnable_on(cfg: ModelConfig, platform: str) -> ModelConfig:
    """cfg with an attention_impl that devices of `platform` (a device's .platform) run: cudnn off NVIDIA GPUs and
    splash off TPUs become xla (the same attention computed by XLA), e.g. for a model trained on GPUs and evaluated
    or served on a laptop; float16 compute becomes float32 on CPUs (XLA:CPU has no float16 dot that accumulates in
    float32, as attention asks). The platform is the devices', not jax.default_backend(): a laptop compiles for TPUs."""
    native = NATIVE_PLATFORMS.get(cfg.attention_impl)
    if native is not None and platform not in native:
        cfg = dataclasses.replace(cfg, attention_impl="xla")
    if platform == "cpu" and cfg.compute_dtype == "float16":
        cfg = dataclasses.replace(cfg, compute_dtype="float32")
    return cfg


def init_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    return GPT(cfg, rngs=nnx.Rngs(params=seed))


def num_value_embeds(cfg: ModelConfig) -> int:
    """How many layers have value embeddings."""
    return sum(has_value_embed(i, cfg.n_layer) for i in range(cfg.n_layer)) if cfg.value_embeds else 0


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that multiply the token stream (2 FLOPs each per token forward): lm_head, the blocks' matrices
    and the gates; not the embedding tables (lookups) nor the per-layer scalars."""
    C, D, K = cfg.n_embd, head_dim(cfg), cfg.n_kv_heads
    per_layer = C * cfg.n_head * D + 2 * C * K * D + cfg.n_head * D * C + 8 * C * C
    gates = num_value_embeds(cfg) * VE_GATE_CHANNELS * K + (SMEAR_GATE_CHANNELS if cfg.smear else 0)
    return padded_vocab(cfg) * C + cfg.n_layer * per_layer + gates


def num_params(cfg: ModelConfig) -> int:
    """Parameter count in closed form: the matmul parameters + the embedding tables + the scalars."""
    tables = padded_vocab(cfg) * (cfg.n_embd + num_value_embeds(cfg) * cfg.n_kv_heads * head_dim(cfg))
    scalars = 2 * cfg.n_layer * cfg.layer_lambdas + cfg.smear + cfg.backout
    return matmul_params(cfg) + tables + scalars


def attended_positions(cfg: ModelConfig, context: int) -> list[int]:
    """Per layer, the key positions a query at `context` attends to: all of them, or its sliding window's."""
    return [context if w is None else min(w, context) for w in attention_windows(cfg)]


def decode_flops_per_token(cfg: ModelConfig, context: int) -> float:
    """Forward FLOPs of one new token after `context` positions: 2 per matmul parameter, and the scores and the
    weighted values over the attended positions (4 * heads * head_dim each)."""
    return float(2 * matmul_params(cfg) + 4 * cfg.n_head * head_dim(cfg) * sum(attended_positions(cfg, context)))


def prefill_flops(cfg: ModelConfig, prompt_len: int) -> float:
    """Forward FLOPs of a causal prompt of prompt_len tokens (position t attends to min(t + 1, window) positions),
    the lm_head at its last position only, as the Engine's prefill runs it."""
    head = 2 * padded_vocab(cfg) * cfg.n_embd
    attended = sum(sum(min(t + 1, a) for t in range(prompt_len)) for a in attended_positions(cfg, prompt_len))
    return float((2 * matmul_params(cfg) - head) * prompt_len + head + 4 * cfg.n_head * head_dim(cfg) * attended)


def decode_weight_bytes(cfg: ModelConfig) -> int:
    """Bytes of the matrices one decode step reads, each once, in the smaller of the parameter and compute dtypes
    (the Engine casts wider parameters once); the embedding tables give only the rows looked up, left out."""
    return matmul_params(cfg) * min(jnp.dtype(cfg.param_dtype).itemsize, jnp.dtype(cfg.compute_dtype).itemsize)


def kv_bytes(cfg: ModelConfig, positions: list[int] | int) -> int:
    """Bytes of keys and values (in the compute dtype, as the KV cache holds them) of one row: `positions` per layer
    (a list, e.g. attended_positions), or the same number in every layer."""
    per_layer = [positions] * cfg.n_layer if isinstance(positions, int) else positions
    return 2 * cfg.n_kv_heads * head_dim(cfg) * jnp.dtype(cfg.compute_dtype).itemsize * sum(per_layer)


def flops_per_token(cfg: ModelConfig) -> float:
    """nanochat's estimate (master's, window-aware): 6 * matmul params + 12 * heads * head_dim * (the positions a
    query attends to at most: sequence_len, or the layer's sliding window) summed over layers."""
    attended = sum(cfg.sequence_len if w is None else min(w, cfg.sequence_len) for w in attention_windows(cfg))
    return float(6 * matmul_params(cfg) + 12 * cfg.n_head * head_dim(cfg) * attended)
