"""The GPT: nanochat's architecture as a Flax NNX module, its KV cache, parameter count and FLOPs.

Architecture (nanochat, first release): token embedding -> RMSNorm -> blocks -> RMSNorm -> untied lm_head,
with logits soft-capped by softcap * tanh(logits / softcap) in fp32. Each block is pre-norm:
x += attn(norm(x)); x += mlp(norm(x)). Attention uses rotary position embeddings, then a QK RMSNorm,
and grouped-query attention (n_kv_heads key/value heads). The MLP is c_fc (4x) -> relu(x)^2 -> c_proj.
RMSNorm has no parameters and there are no biases anywhere.

Parameters are stored in cfg.param_dtype and cast to cfg.compute_dtype inside the forward; softmax and
the loss run in fp32. Kernels are stored (in, out). Every nnx.Param carries `axes`, a tuple of logical
axis names that the sharding rules map onto the device mesh.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from nanochat_jax import splash
from nanochat_jax.config import ConfigError, ModelConfig
from nanochat_jax.sharding import constrain

ACTIVATION_AXES = ("batch", "sequence", "embed_act")  # the residual stream (B, T, C): rows over (data, fsdp)
EPS = float(jnp.finfo(jnp.float32).eps)  # torch's F.rms_norm default eps for fp32


def head_dim(cfg: ModelConfig) -> int:
    """The actual per-head width: n_embd // n_head (cfg.head_dim is only the target used to pick n_head)."""
    return cfg.n_embd // cfg.n_head


def rms_norm(x: jax.Array) -> jax.Array:
    """Parameter-free RMSNorm over the last axis, computed in fp32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + EPS)).astype(x.dtype)


def rotary_cos_sin(positions: jax.Array, dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin of shape positions.shape + (1, dim // 2), computed in fp32 and cast to dtype."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(freqs)[..., None, :].astype(dtype), jnp.sin(freqs)[..., None, :].astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the two halves of the head dimension of x (B, T, H, D): (x1, x2) -> (x1 c + x2 s, -x1 s + x2 c)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin], axis=-1)


class Linear(nnx.Module):
    """A bias-free linear layer with an (in, out) kernel; zero init or nanochat's scaled-normal init."""

    def __init__(self, fan_in: int, fan_out: int, axes: tuple[str, str], cfg: ModelConfig, *, zero: bool, rngs: nnx.Rngs):
        if zero:
            w = jnp.zeros((fan_in, fan_out), jnp.float32)
        else:
            std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
            w = std * jax.random.normal(rngs.params(), (fan_in, fan_out), jnp.float32)
        self.kernel = nnx.Param(w.astype(cfg.param_dtype), axes=axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel[...].astype(x.dtype)


class Embedding(nnx.Module):
    """Token embedding table (V, C), initialised normal with std 1."""

    def __init__(self, vocab: int, width: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
        emb = jax.random.normal(rngs.params(), (vocab, width), jnp.float32)
        self.embedding = nnx.Param(emb.astype(cfg.param_dtype), axes=("vocab", "embed"))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        C, D = cfg.n_embd, head_dim(cfg)
        self.layer, self.n_head, self.n_kv_heads, self.head_dim = layer, cfg.n_head, cfg.n_kv_heads, D
        self.attention_impl = cfg.attention_impl
        self.c_q = Linear(C, self.n_head * D, ("embed", "heads"), cfg, zero=False, rngs=rngs)
        self.c_k = Linear(C, self.n_kv_heads * D, ("embed", "kv_heads"), cfg, zero=False, rngs=rngs)
        self.c_v = Linear(C, self.n_kv_heads * D, ("embed", "kv_heads"), cfg, zero=False, rngs=rngs)
        self.c_proj = Linear(self.n_head * D, C, ("heads", "embed"), cfg, zero=True, rngs=rngs)

    def __call__(self, x, cos, sin, cache=None):
        """Training: cache is None, causal attention over x. Decoding: cache = (k_all, v_all, positions, mask);
        the new keys/values are written at `positions` (B, T) of this layer and the updated (k_all, v_all) returned."""
        B, T, _ = x.shape
        q = self.c_q(x).reshape(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).reshape(B, T, self.n_kv_heads, self.head_dim)
        v = self.c_v(x).reshape(B, T, self.n_kv_heads, self.head_dim)
        q, k = rms_norm(apply_rotary(q, cos, sin)), rms_norm(apply_rotary(k, cos, sin))
        if cache is None and self.attention_impl == "splash" and splash.usable(T):
            y = splash.causal_attention(q, k, v)
        elif cache is None:  # XLA's attention also stands in for splash where it cannot run (see splash.usable)
            cudnn = self.attention_impl == "cudnn"
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn" if cudnn else None)
        else:
            k_all, v_all, positions, mask = cache
            rows = jnp.arange(B)[:, None]
            k_all = k_all.at[self.layer, rows, positions].set(k.astype(k_all.dtype), mode="drop")
            v_all = v_all.at[self.layer, rows, positions].set(v.astype(v_all.dtype), mode="drop")
            window = mask.shape[-1]  # attend to the first `window` cache positions only (see GPT.decode)
            k_l, v_l = k_all[self.layer, :, :window].astype(q.dtype), v_all[self.layer, :, :window].astype(q.dtype)
            y = jax.nn.dot_product_attention(q, k_l, v_l, mask=mask)  # XLA: cuDNN takes no arbitrary masks
            cache = (k_all, v_all, positions, mask)
        return self.c_proj(y.reshape(B, T, self.n_head * self.head_dim)), cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        C = cfg.n_embd
        self.c_fc = Linear(C, 4 * C, ("embed", "mlp"), cfg, zero=False, rngs=rngs)
        self.c_proj = Linear(4 * C, C, ("mlp", "embed"), cfg, zero=True, rngs=rngs)

    def __call__(self, x):
        return self.c_proj(jnp.square(jax.nn.relu(self.c_fc(x))))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.attn = Attention(cfg, layer, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, cache=None):
        y, cache = self.attn(rms_norm(x), cos, sin, cache)
        x = x + y
        return x + self.mlp(rms_norm(x)), cache


def _run_block(block, x, cos, sin):
    return block(x, cos, sin)[0]


class KVCache(flax.struct.PyTreeNode):
    """Keys/values of every layer for B rows of up to max_len positions; lengths[b] = valid positions of row b."""

    k: jax.Array  # (n_layer, B, max_len, n_kv_heads, head_dim)
    v: jax.Array
    lengths: jax.Array  # (B,) int32

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        shape = (cfg.n_layer, batch, max_len, cfg.n_kv_heads, head_dim(cfg))
        dtype = dtype or cfg.compute_dtype
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32))


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
        C, V = cfg.n_embd, cfg.vocab_size
        self.wte = Embedding(V, C, cfg, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layer)])
        self.lm_head = Linear(C, V, ("embed", "vocab"), cfg, zero=True, rngs=rngs)

    def _trunk(self, tokens, positions, cache=None):
        """Embedding, blocks and final norm: hidden states (B, T, C) in the compute dtype (and the updated cache)."""
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta, self.compute_dtype)
        # the looked-up rows keep the table's FSDP-split width, split over data only; the constraint to the
        # residual layout below is then an all-to-all (without it, data x FSDP meshes gathered the whole batch)
        x = constrain(self.wte.embedding[...][tokens], ("batch_data", "sequence", "embed"))
        x = rms_norm(x.astype(self.compute_dtype))
        if cache is not None:
            for block in self.blocks:
                x, cache = block(x, cos, sin, cache)
            return rms_norm(x), cache
        run = _run_block
        if self.remat == "block":
            run = nnx.remat(_run_block)
        elif self.remat == "dots_saveable":
            run = nnx.remat(_run_block, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
        x = constrain(x, ACTIVATION_AXES)
        for block in self.blocks:
            x = constrain(run(block, x, cos, sin), ACTIVATION_AXES)
        return rms_norm(x), None

    def _head(self, x, kernel):
        """Soft-capped fp32 logits from hidden states x (..., C) and an lm_head kernel (C, V)."""
        logits = (x @ kernel.astype(x.dtype)).astype(jnp.float32)
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
        T, max_len = tokens.shape[1], cache.k.shape[2]
        window = max_len if window is None else min(window, max_len)
        positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        mask = (jnp.arange(window)[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, window)
        x, (k, v, _, _) = self._trunk(tokens, positions, (cache.k, cache.v, positions, mask))
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]
        logits = self._head(x, self.lm_head.kernel[...])
        return logits, KVCache(k=k, v=v, lengths=cache.lengths + T)


NATIVE_PLATFORMS = {"cudnn": ("gpu", "cuda"), "splash": ("tpu",)}  # attention that exists on one platform only


def runnable_on(cfg: ModelConfig, platform: str) -> ModelConfig:
    """cfg with an attention_impl that devices of `platform` (a device's .platform) run: cudnn off NVIDIA GPUs and
    splash off TPUs become xla (the same attention computed by XLA), e.g. for a model trained on GPUs and evaluated
    or served on a laptop. The platform is the devices', not jax.default_backend(): a laptop compiles for TPUs."""
    native = NATIVE_PLATFORMS.get(cfg.attention_impl)
    if native is None or platform in native:
        return cfg
    return dataclasses.replace(cfg, attention_impl="xla")


def init_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    return GPT(cfg, rngs=nnx.Rngs(params=seed))


def num_params(cfg: ModelConfig) -> int:
    """Parameter count in closed form: embedding + lm_head + per layer (q, k, v, proj, mlp)."""
    C, V, D = cfg.n_embd, cfg.vocab_size, head_dim(cfg)
    per_layer = C * cfg.n_head * D + 2 * C * cfg.n_kv_heads * D + cfg.n_head * D * C + 8 * C * C
    return 2 * V * C + cfg.n_layer * per_layer


def flops_per_token(cfg: ModelConfig) -> float:
    """nanochat's estimate: 6 * (params - embedding params) + 12 * layers * heads * head_dim * sequence_len."""
    n_embedding = cfg.vocab_size * cfg.n_embd
    attn = 12 * cfg.n_layer * cfg.n_head * head_dim(cfg) * cfg.sequence_len
    return float(6 * (num_params(cfg) - n_embedding) + attn)
