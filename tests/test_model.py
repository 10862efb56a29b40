"""GPT model tests: equality with an independent float64 NumPy version of nanochat's forward, init, KV-cache
decoding against the full forward, the loss (ignore index, mask, reductions, chunking), parameter/FLOP counts."""

import re

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from nanochat_jax.config import ConfigError, ModelConfig
from nanochat_jax.model import (GPT, KVCache, apply_rotary, flops_per_token, fp8_matmul, init_model, num_params,
                                rotary_cos_sin, train_in_fp8)

V = 97
EPS32 = float(np.finfo(np.float32).eps)


def tiny(**kw) -> ModelConfig:
    base = dict(depth=2, aspect_ratio=32, head_dim=16, vocab_size=V, sequence_len=32, compute_dtype="float32")
    return ModelConfig(**{**base, **kw})


def randomize(model: GPT, seed: int = 0) -> None:
    """Give every parameter (including the zero-initialised ones) random values of a sensible scale."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [jax.random.normal(k, x.shape, x.dtype) / np.sqrt(x.shape[0]) for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, new))


def weights(model: GPT) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(map(str, path)): np.asarray(var[...], np.float64) for path, var in flat}


def random_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    model = init_model(cfg, seed)
    randomize(model, seed)
    return model


decode_jit = nnx.jit(lambda model, tokens, cache: model.decode(tokens, cache))
forward_jit = nnx.jit(lambda model, tokens: model(tokens))


def tokens_for(shape, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, V, dtype=jnp.int32)


# ----------------------------------------------------------------------------------------------------------------------
# Independent float64 NumPy reference of nanochat's GPT.forward (torch (out, in) weights are our kernels transposed,
# so x @ kernel here is torch's x @ weight.T).


def ref_norm(x):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS32)


def ref_rotary(x, cos, sin):
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return np.concatenate([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], axis=-1)


def ref_forward(w, tokens, cfg: ModelConfig):
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    C, H, K = cfg.n_embd, cfg.n_head, cfg.n_kv_heads
    D = C // H
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, D, 2, dtype=np.float64) / D)
    freqs = np.outer(np.arange(T), inv_freq)
    cos, sin = np.cos(freqs)[None, :, None, :], np.sin(freqs)[None, :, None, :]
    causal = np.tril(np.ones((T, T), bool))
    x = ref_norm(w["wte/embedding"][tokens])
    for i in range(cfg.n_layer):
        p = f"blocks/{i}/"
        h = ref_norm(x)
        q = (h @ w[p + "attn/c_q/kernel"]).reshape(B, T, H, D)
        k = (h @ w[p + "attn/c_k/kernel"]).reshape(B, T, K, D)
        v = (h @ w[p + "attn/c_v/kernel"]).reshape(B, T, K, D)
        q, k = ref_norm(ref_rotary(q, cos, sin)), ref_norm(ref_rotary(k, cos, sin))
        q, k, v = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)  # torch repeat_interleave on heads
        att = np.where(causal, q @ k.transpose(0, 1, 3, 2) / np.sqrt(D), -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        y = (att / att.sum(-1, keepdims=True)) @ v
        x = x + y.transpose(0, 2, 1, 3).reshape(B, T, C) @ w[p + "attn/c_proj/kernel"]
        h = np.maximum(ref_norm(x) @ w[p + "mlp/c_fc/kernel"], 0.0) ** 2
        x = x + h @ w[p + "mlp/c_proj/kernel"]
    logits = ref_norm(x) @ w["lm_head/kernel"]
    return cfg.softcap * np.tanh(logits / cfg.softcap)


def ref_token_losses(logits, targets):
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, np.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return np.where(targets == -1, 0.0, -picked)


def assert_close(actual, expected, rel=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * np.abs(expected).max())


# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_head", [0, 1, 2])  # MHA, MQA, GQA (4 query heads)
def test_forward_matches_numpy_reference(n_kv_head):
    cfg = tiny(n_kv_head=n_kv_head)
    assert cfg.n_head == 4
    model = random_model(cfg)
    tokens = tokens_for((2, 16))
    logits = forward_jit(model, tokens)
    chex.assert_shape(logits, (2, 16, V))
    chex.assert_type(logits, jnp.float32)
    expected = ref_forward(weights(model), tokens, cfg)
    assert np.abs(expected).max() > 1.0  # the comparison is not between near-zero numbers
    assert_close(logits, expected)


def test_rotary_sign_convention():
    dim, theta = 4, 10000.0
    positions = jnp.array([0, 1, 2, 5])
    cos, sin = rotary_cos_sin(positions, dim, theta, jnp.float32)
    chex.assert_shape([cos, sin], (4, 1, 2))
    angles = np.outer([0, 1, 2, 5], 1.0 / theta ** (np.array([0.0, 2.0]) / dim))
    np.testing.assert_allclose(cos[:, 0], np.cos(angles), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sin[:, 0], np.sin(angles), rtol=1e-6, atol=1e-7)
    # first-half unit vector (x1=1, x2=0) rotates to (cos, -sin); second-half (x1=0, x2=1) to (sin, cos)
    e1 = jnp.tile(jnp.array([1.0, 0.0, 0.0, 0.0]), (4, 1, 1))
    e3 = jnp.tile(jnp.array([0.0, 0.0, 1.0, 0.0]), (4, 1, 1))
    a = angles[:, 0]
    np.testing.assert_allclose(apply_rotary(e1, cos, sin)[:, 0, [0, 2]], np.stack([np.cos(a), -np.sin(a)], -1), atol=1e-6)
    np.testing.assert_allclose(apply_rotary(e3, cos, sin)[:, 0, [0, 2]], np.stack([np.sin(a), np.cos(a)], -1), atol=1e-6)


def test_init_zero_heads_and_stds():
    cfg = tiny(aspect_ratio=64, head_dim=32, n_kv_head=2)  # C=128, 4 heads of 32, 2 kv heads
    model = init_model(cfg, seed=3)
    w = weights(model)
    assert np.all(w["lm_head/kernel"] == 0)
    for i in range(cfg.n_layer):
        assert np.all(w[f"blocks/{i}/attn/c_proj/kernel"] == 0) and np.all(w[f"blocks/{i}/mlp/c_proj/kernel"] == 0)
    assert np.all(np.asarray(model(tokens_for((2, 8)))) == 0.0)
    C = 128
    expected_std = {
        "wte/embedding": 1.0,
        "blocks/0/attn/c_q/kernel": 1 / np.sqrt(C),
        "blocks/0/attn/c_k/kernel": 1 / np.sqrt(C) * np.sqrt(64 / C),
        "blocks/1/attn/c_v/kernel": 1 / np.sqrt(C) * np.sqrt(64 / C),
        "blocks/1/mlp/c_fc/kernel": 1 / np.sqrt(C),
    }
    for name, std in expected_std.items():
        x = w[name]
        assert abs(x.std() / std - 1) < 0.05, (name, x.std(), std)
        assert abs(x.mean()) < 4 * std / np.sqrt(x.size), name
    assert w["blocks/0/attn/c_k/kernel"].shape == (C, 64) and w["wte/embedding"].shape == (V, C)
    # parameters are fp32 and carry logical axis names
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        assert var[...].dtype == jnp.float32 and len(var.get_metadata()["axes"]) == 2, path


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="cudnn"):
        init_model(tiny(attention_impl="cudnn"))
    with pytest.raises(ConfigError, match="n_kv_head"):
        init_model(tiny(n_kv_head=3))


def test_param_axes_metadata():
    model = init_model(tiny())
    axes = {"/".join(map(str, p)): v.get_metadata()["axes"] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert axes["wte/embedding"] == ("vocab", "embed") and axes["lm_head/kernel"] == ("embed", "vocab")
    assert axes["blocks/1/attn/c_q/kernel"] == ("embed", "heads")
    assert axes["blocks/1/attn/c_k/kernel"] == axes["blocks/1/attn/c_v/kernel"] == ("embed", "kv_heads")
    assert axes["blocks/1/attn/c_proj/kernel"] == ("heads", "embed")
    assert axes["blocks/1/mlp/c_fc/kernel"] == ("embed", "mlp") and axes["blocks/1/mlp/c_proj/kernel"] == ("mlp", "embed")


# ----------------------------------------------------------------------------------------------------------------------
# KV-cache decoding


def test_kvcache_init_shapes():
    cfg = tiny(n_kv_head=2)
    cache = KVCache.init(cfg, batch=3, max_len=20)
    assert len(cache.k) == len(cache.v) == 2  # one array per layer
    chex.assert_shape([*cache.k, *cache.v], (3, 2, 20, 16))
    chex.assert_type([*cache.k, *cache.v, cache.lengths], [jnp.float32] * 4 + [jnp.int32])
    assert len(jax.tree.leaves(cache)) == 2 * 2 + 1 and np.all(np.asarray(cache.lengths) == 0)
    assert KVCache.init(cfg, 1, 4, dtype=jnp.bfloat16).k[0].dtype == jnp.bfloat16
    assert KVCache.init(tiny(compute_dtype="bfloat16"), 1, 4).k[1].dtype == jnp.bfloat16


def test_prefill_then_decode_matches_forward():
    cfg = tiny(n_kv_head=2)
    model = random_model(cfg, seed=1)
    tokens = tokens_for((2, 12), seed=1)
    full = forward_jit(model, tokens)
    cache = KVCache.init(cfg, batch=2, max_len=16)
    logits, cache = decode_jit(model, tokens[:, :5], cache)
    assert_close(logits, full[:, :5])
    np.testing.assert_array_equal(cache.lengths, [5, 5])
    for t in range(5, 12):
        logits, cache = decode_jit(model, tokens[:, t : t + 1], cache)
        chex.assert_shape(logits, (2, 1, V))
        assert_close(logits[:, 0], full[:, t])
    np.testing.assert_array_equal(cache.lengths, [12, 12])


def test_ragged_rows_right_padded_prefill_and_decode():
    cfg = tiny(n_kv_head=1)
    model = random_model(cfg, seed=2)
    true_lengths = [3, 6, 4]
    rows = np.asarray(tokens_for((3, 10), seed=2))  # each row's own sequence: prompt then continuation
    bucket = np.zeros((3, 6), np.int32)
    for b, n in enumerate(true_lengths):
        bucket[b, :n] = rows[b, :n]  # right padding with token 0
    cache = KVCache.init(cfg, batch=3, max_len=16)
    logits, cache = decode_jit(model, jnp.asarray(bucket), cache)
    per_row = [np.asarray(forward_jit(model, jnp.asarray(rows[b : b + 1]))[0]) for b in range(3)]
    for b, n in enumerate(true_lengths):
        assert_close(logits[b, :n], per_row[b][:n])
    last, _ = nnx.jit(lambda m, t, c, i: m.decode(t, c, logits_at=i))(
        model, jnp.asarray(bucket), KVCache.init(cfg, batch=3, max_len=16), jnp.asarray(true_lengths) - 1)
    chex.assert_shape(last, (3, V))
    for b, n in enumerate(true_lengths):  # only each prompt's last position goes through the head
        assert_close(last[b], per_row[b][n - 1])
    cache = cache.replace(lengths=jnp.asarray(true_lengths, jnp.int32))  # what the engine does after prefill
    # a 2-token chunk per row (different positions per row), then single tokens
    chunk = np.stack([rows[b, n : n + 2] for b, n in enumerate(true_lengths)])
    logits, cache = decode_jit(model, jnp.asarray(chunk), cache)
    for b, n in enumerate(true_lengths):
        assert_close(logits[b], per_row[b][n : n + 2])
    for step in range(2, 4):
        nxt = np.stack([rows[b, n + step : n + step + 1] for b, n in enumerate(true_lengths)])
        logits, cache = decode_jit(model, jnp.asarray(nxt), cache)
        for b, n in enumerate(true_lengths):
            assert_close(logits[b, 0], per_row[b][n + step])
    np.testing.assert_array_equal(cache.lengths, np.asarray(true_lengths) + 4)


# ----------------------------------------------------------------------------------------------------------------------
# Loss


def test_loss_matches_reference_cross_entropy():
    cfg = tiny()
    model = random_model(cfg, seed=4)
    tokens, targets = tokens_for((3, 16), seed=4), np.array(tokens_for((3, 16), seed=5))
    targets[0, :4] = -1
    targets[2, 10:] = -1
    mask = np.asarray(jax.random.bernoulli(jax.random.key(6), 0.7, (3, 16)), np.float32)
    per_token = ref_token_losses(ref_forward(weights(model), tokens, cfg), targets)
    valid = targets != -1

    @nnx.jit  # one compilation for every variant
    def losses(model, targets, mask):
        return dict(none=model.loss(tokens, targets, reduction="none"), mean=model.loss(tokens, targets),
                    sum=model.loss(tokens, targets, reduction="sum"), none_masked=model.loss(tokens, targets, mask, "none"),
                    mean_masked=model.loss(tokens, targets, mask), all_ignored=model.loss(tokens, jnp.full_like(targets, -1)))

    out = losses(model, jnp.asarray(targets), jnp.asarray(mask))
    chex.assert_shape(out["none"], (3, 16))
    chex.assert_type(out["none"], jnp.float32)
    assert_close(out["none"], per_token)
    assert np.all(np.asarray(out["none"])[~valid] == 0.0)
    assert_close(out["mean"], per_token.sum() / valid.sum())
    assert_close(out["sum"], per_token.sum())
    # a mask multiplies each token's loss; the mean is over the remaining (weighted) tokens
    assert_close(out["none_masked"], per_token * mask)
    assert_close(out["mean_masked"], (per_token * mask).sum() / (valid * mask).sum())
    assert float(out["all_ignored"]) == 0.0
    with pytest.raises(ValueError, match="reduction"):
        model.loss(tokens, jnp.asarray(targets), reduction="avg")


def test_chunked_loss_and_remat_equal_plain():
    """loss_chunk (5 does not divide T=16: padded last chunk) and both remat modes change no number."""
    model = random_model(tiny(depth=1), seed=7)
    graphdef, params = nnx.split(model)
    tokens, targets = tokens_for((2, 16), seed=8), np.array(tokens_for((2, 16), seed=9))
    targets[1, 3:7] = -1
    mask = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 16)), jnp.float32)

    def loss_fn(params, graphdef, reduction):
        return nnx.merge(graphdef, params).loss(tokens, jnp.asarray(targets), mask, reduction=reduction)

    grad_fn = jax.jit(jax.value_and_grad(loss_fn), static_argnums=(1, 2))
    loss_a, grads_a = grad_fn(params, graphdef, "mean")
    for variant in [dict(loss_chunk=5, remat="dots_saveable"), dict(loss_chunk=8, remat="block")]:
        other, _ = nnx.split(init_model(tiny(depth=1, **variant)))
        loss_b, grads_b = grad_fn(params, other, "mean")
        np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6, err_msg=str(variant))
        for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
            np.testing.assert_allclose(gb, ga, rtol=1e-5, atol=1e-7, err_msg=str(variant))


# ----------------------------------------------------------------------------------------------------------------------
# Counts, dtypes


@pytest.mark.parametrize("depth,n_kv_head", [(1, 0), (2, 2), (3, 1)])
def test_num_params_closed_form_and_arrays(depth, n_kv_head):
    cfg = tiny(depth=depth, aspect_ratio=64, head_dim=32, n_kv_head=n_kv_head)
    C, H, D = 64 * depth, cfg.n_head, 32
    K = n_kv_head or H
    by_hand = 2 * V * C + depth * (C * H * D + 2 * C * K * D + H * D * C + 8 * C * C)
    model = init_model(cfg)
    counted = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert num_params(cfg) == by_hand == counted


def test_flops_per_token_d20():
    cfg = ModelConfig(depth=20, vocab_size=65536, sequence_len=2048)  # width 1280, 10 heads of 128
    n = 2 * 65536 * 1280 + 20 * 12 * 1280 * 1280
    assert num_params(cfg) == n == 560_988_160
    assert flops_per_token(cfg) == 6 * (n - 65536 * 1280) + 12 * 20 * 10 * 128 * 2048 == 3_491_758_080


def test_bf16_compute_close_to_fp32():
    model32 = random_model(tiny(), seed=12)
    model16 = init_model(tiny(compute_dtype="bfloat16"))
    nnx.update(model16, nnx.state(model32, nnx.Param))
    tokens = tokens_for((2, 16), seed=12)
    l32, l16 = forward_jit(model32, tokens), forward_jit(model16, tokens)
    chex.assert_type(l16, jnp.float32)
    chex.assert_equal_shape([l16, l32])
    err = float(jnp.max(jnp.abs(l16 - l32)) / jnp.max(jnp.abs(l32)))
    assert 0 < err < 0.05, err
    # params stay fp32 in the bf16 model
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model16, nnx.Param)))
    # decoding with a bf16 cache also runs and agrees roughly with the bf16 forward
    logits, _ = decode_jit(model16, tokens, KVCache.init(tiny(compute_dtype="bfloat16"), 2, 16))
    chex.assert_type(logits, jnp.float32)
    assert float(jnp.max(jnp.abs(logits - l32))) / float(jnp.max(jnp.abs(l32))) < 0.05


def test_loss_gradient_scatters_only_into_the_embedding():
    """The target logit is picked by a one-hot select, so the backward pass has no (tokens, vocab) scatter:
    the only scatter in the gradient program is the embedding table's."""
    cfg = tiny(depth=1)
    graphdef, params = nnx.split(random_model(cfg, seed=1))
    tokens, targets = tokens_for((2, 16), seed=2), tokens_for((2, 16), seed=3)
    grad = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p).loss(tokens, targets)))
    program = grad.lower(params).as_text()  # StableHLO, before a backend rewrites scatters (XLA:CPU into loops)
    scatters = re.findall(r'"stablehlo.scatter".*?-> (tensor<[^>]*>)', program, flags=re.DOTALL)
    assert scatters == [f"tensor<{cfg.vocab_size}x{cfg.n_embd}xf32>"], scatters


def _fp8_reference(a: np.ndarray, dtype, largest: float) -> tuple[np.ndarray, np.float32]:
    """ml_dtypes' rounding of a under one tensor-wide scale (max |a| -> the format's largest), and 1 / scale."""
    scale = np.float32(largest / max(np.abs(a).max(), 1e-12))
    return np.clip(a * scale, -largest, largest).astype(dtype).astype(np.float32), np.float32(1 / scale)


def test_fp8_matmul_equals_masters_tensorwise_recipe():
    """Forward x @ w from e4m3 x and w, backward from the e5m2 output gradient, each scaled by its own max |.|:
    equal to a NumPy version built on ml_dtypes' fp8 rounding; within fp8's error of the exact products."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8, 256)).astype(np.float32)
    w = (rng.standard_normal((256, 128)) * 0.05).astype(np.float32)
    g = rng.standard_normal((3, 8, 128)).astype(np.float32)
    (xq, x_inv), (wq, w_inv) = (_fp8_reference(a, ml_dtypes.float8_e4m3fn, 448.0) for a in (x, w))
    gq, g_inv = _fp8_reference(g, ml_dtypes.float8_e5m2, 57344.0)
    y, vjp = jax.vjp(fp8_matmul, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    chex.assert_trees_all_close((y, dx, dw), ((xq @ wq) * (x_inv * w_inv), (gq @ wq.T) * (g_inv * w_inv),
                                              (xq.reshape(-1, 256).T @ gq.reshape(-1, 128)) * (x_inv * g_inv)),
                                rtol=1e-6, atol=1e-6)
    exact_dw = x.reshape(-1, 256).T @ g.reshape(-1, 128)
    for got, exact, bound in ((y, x @ w, 0.05), (dx, g @ w.T, 0.08), (dw, exact_dw, 0.08)):
        err = np.linalg.norm(np.asarray(got) - exact) / np.linalg.norm(exact)
        assert 0.01 < err < bound, err  # (e4m3 keeps 3 mantissa bits, e5m2 2)
    y16, vjp16 = jax.vjp(fp8_matmul, jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16))
    chex.assert_type(y16, jnp.bfloat16)
    assert np.linalg.norm(np.asarray(y16, np.float32) - x @ w) / np.linalg.norm(x @ w) < 0.05
    # in bf16 the weight gradient is rounded once, as master's (unscaled in fp32, then bf16; it was 75% equal when
    # the product was rounded to bf16 before the unscaling)
    bf16 = lambda a: np.asarray(a, ml_dtypes.bfloat16).astype(np.float32)  # noqa: E731
    (xq16, x16_inv), (gq16, g16_inv) = (_fp8_reference(bf16(x), ml_dtypes.float8_e4m3fn, 448.0),
                                        _fp8_reference(bf16(g), ml_dtypes.float8_e5m2, 57344.0))
    dw16 = vjp16(jnp.asarray(g, jnp.bfloat16))[1]
    np.testing.assert_array_equal(np.asarray(dw16, np.float32),
                                  bf16((xq16.reshape(-1, 256).T @ gq16.reshape(-1, 128)) * (x16_inv * g16_inv)))


@pytest.mark.parametrize("rows, mesh", [(4, (2, 2, 1)), (3, (2, 2, 1)), (4, (2, 1, 2))])
def test_fp8_gradients_on_a_mesh_equal_one_device(make_mesh, rows, mesh):
    """Under a mesh the weight gradient is unscaled per shard of the rows before the shards are summed (4 rows on
    data x fsdp = 2 x 2; rows the mesh does not split, 3, are one shard), and the input gradient per part of the
    output features tensor parallelism splits (data x tensor = 2 x 2). All give the single device's gradients."""
    x = jax.random.normal(jax.random.key(0), (rows, 5, 128))
    w = jax.random.normal(jax.random.key(1), (128, 128)) * 0.05
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(fp8_matmul(x, w, "heads"))), argnums=(0, 1)))
    single = grad(x, w)
    with jax.set_mesh(make_mesh(*mesh)):
        sharded = grad(x, w)
    chex.assert_trees_all_close(sharded, single, rtol=1e-5, atol=1e-5)


def test_train_in_fp8_takes_the_layers_masters_filter_takes():
    """Multiples of 16 at least 128 wide: every block matrix and the lm_head, not the value-embedding and smear
    gates, nor an lm_head over a vocabulary of 97; a model narrower than 128 keeps all its products as they were."""
    wide = dict(aspect_ratio=64, head_dim=64, vocab_size=128)  # width 128
    model = init_model(tiny(**wide, value_embeds=True, smear=True))
    assert train_in_fp8(model) == (2 * 6 + 1, 2 * 6 + 1 + 1 + 1)  # blocks, lm_head | + one ve gate, smear gate
    assert model.lm_head.fp8 and not model.smear_gate.fp8 and not model.blocks[1].attn.ve_gate.fp8
    assert train_in_fp8(init_model(tiny(aspect_ratio=64, head_dim=64))) == (12, 13)
    assert train_in_fp8(init_model(tiny())) == (0, 13)  # width 64
    tokens = tokens_for((2, 16), seed=3)
    fp8_model = random_model(tiny(**wide), seed=3)
    plain = nnx.merge(*nnx.split(fp8_model))
    train_in_fp8(fp8_model)
    exact, rounded = forward_jit(plain, tokens), forward_jit(fp8_model, tokens)
    err = float(jnp.max(jnp.abs(rounded - exact)) / jnp.max(jnp.abs(exact)))
    assert 0 < err < 0.1, err
