"""Causal training attention through Pallas' splash-attention kernel: flash attention on TPU.

XLA's attention keeps the (heads, T, T) probabilities of every layer for the backward pass, which is why a TPU
run without this kernel has to rematerialise whole blocks. Splash attention works block by block and keeps
only a log-sum-exp per query, like cuDNN's flash attention on NVIDIA GPUs (model.attention_impl = "splash").

The kernel is a per-example function of (heads, T, head_dim) arrays that the GSPMD partitioner cannot split,
so under a mesh it runs inside `jax.shard_map`: rows split over the batch axes and heads over the tensor
axis, exactly as the surrounding activations already are, so no data moves. Off TPU the same kernel runs in
Pallas' interpreter: slow, but it lets the CPU tests check it against XLA's attention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nanochat_jax.sharding import logical_to_spec

BLOCKS = (512, 256, 128)  # query/key tile sizes tried, largest first: 512 suits TPU v5e/v6e at T = 2048


def block_size(seq_len: int) -> int | None:
    """The tile size for a sequence length, or None when no tile divides it (then callers use XLA attention)."""
    return next((b for b in BLOCKS if seq_len % b == 0), None)


def usable(seq_len: int) -> bool:
    """Whether attention over seq_len positions can run the kernel here: a tile must divide seq_len, and the
    call must be either under `jax.set_mesh` (then it runs in shard_map) or in a one-device process. Mosaic
    kernels cannot be partitioned automatically, so a multi-device jit outside a mesh (evaluations) would fail
    to compile on TPU; there XLA's attention stands in."""
    return block_size(seq_len) is not None and (not jax.sharding.get_abstract_mesh().empty
                                                or jax.device_count() == 1)


@functools.lru_cache(maxsize=None)
def _kernel(heads: int, seq_len: int, window: int | None, interpret: bool):
    """The splash kernel for `heads` query heads attending causally over seq_len positions, or only to the
    `window` positions before each query (built once: its block-sparsity tables are computed on the host, and
    skip the blocks outside the window). Pallas is imported here, so that only splash runs need it."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    b = block_size(seq_len)
    sizes = kernel_lib.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                                  block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    if window is None:
        one = mask_lib.CausalMask((seq_len, seq_len))
    else:  # keys k with q - window <= k <= q
        one = mask_lib.LocalMask((seq_len, seq_len), (window, 0), offset=0)
    mask = mask_lib.MultiHeadMask([one] * heads)
    with jax.ensure_compile_time_eval():  # its tables are concrete arrays even when first built inside a trace
        return kernel_lib.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                                          interpret=interpret)


def prepare(cfg, mesh) -> None:
    """Build the kernel that cfg's attention will call on `mesh` now, outside any trace. Its block tables are
    computed eagerly, which cannot run on the compile-only devices of an ahead-of-time compile for a TPU target
    (plan.py); built here, on the host's default device, the traced call finds it in the cache."""
    from nanochat_jax.model import attention_windows

    if cfg.attention_impl != "splash" or block_size(cfg.sequence_len) is None:
        return
    tensor = mesh.shape["tensor"]
    heads = cfg.n_head // tensor if cfg.n_head % tensor == 0 else cfg.n_head  # as the rule table splits them
    for window in set(attention_windows(cfg)):
        _kernel(heads, cfg.sequence_len, window, mesh.devices.flat[0].platform != "tpu")


def _platform() -> str:
    """The platform of the devices this trace is for: the mesh's (a laptop may compile for a TPU mesh), else the
    default device's."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.devices()[0].platform if mesh.empty else mesh.abstract_device.platform


def _local_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int | None) -> jax.Array:
    """One device's rows and heads: q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D)."""
    B, T, H, D = q.shape
    kernel = _kernel(H, T, window, _platform() != "tpu")
    q = q * jnp.asarray(D ** -0.5, q.dtype)  # the kernel applies no scale; 1/sqrt(D) as jax.nn.dot_product_attention
    out = jax.vmap(kernel)(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2))
    return out.swapaxes(1, 2)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v over earlier positions (with a window: only the `window` positions before each
    query and itself), for q (B, T, H, D) and k, v (B, T, Hkv, D) with Hkv dividing H (grouped-query attention:
    query head h reads key/value head h // (H / Hkv)); T must be a multiple of 128 (see block_size). Same result
    as jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(window, 0))."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return _local_attention(q, k, v, window)
    q_spec = logical_to_spec(("batch", "sequence", "heads", None), q.shape, mesh)
    kv_spec = logical_to_spec(("batch", "sequence", "kv_heads", None), k.shape, mesh)
    if kv_spec[2] != q_spec[2]:  # key/value heads not split like the query heads: give every query head its own
        k, v = (jnp.repeat(a, q.shape[2] // k.shape[2], axis=2) for a in (k, v))
        kv_spec = q_spec
    return jax.shard_map(lambda q, k, v: _local_attention(q, k, v, window), in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v)
