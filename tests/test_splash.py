"""Splash attention (model.attention_impl = "splash", TPU flash attention) run in Pallas' interpreter on CPU:
the same outputs and gradients as XLA's attention, alone and inside the sharded train step."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanochat_jax import splash
from nanochat_jax.config import MeshConfig, ModelConfig, OptimConfig
from nanochat_jax.model import init_model
from nanochat_jax.sharding import make_mesh
from nanochat_jax.train import TrainRun, microbatch_sharding, summed_grads


def test_block_size_picks_the_largest_dividing_tile():
    assert [splash.block_size(t) for t in (2048, 768, 640, 128, 100, 64)] == [512, 256, 128, 128, None, None]


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_matches_xla_attention_and_its_gradients(kv_heads):
    B, T, H, D = 2, 256, 4, 32
    keys = jax.random.split(jax.random.key(kv_heads), 4)
    q = jax.random.normal(keys[0], (B, T, H, D), jnp.float32)
    k, v = (jax.random.normal(key, (B, T, kv_heads, D), jnp.float32) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], (B, T, H, D), jnp.float32)

    def xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)

    out, pullback = jax.vjp(splash.causal_attention, q, k, v)
    ref, ref_pullback = jax.vjp(xla, q, k, v)
    chex.assert_shape(out, (B, T, H, D))
    chex.assert_type(out, jnp.float32)
    np.testing.assert_allclose(out, ref, atol=2e-6)
    for name, g, r in zip("qkv", pullback(cotangent), ref_pullback(cotangent)):
        np.testing.assert_allclose(g, r, atol=5e-5, err_msg=name)


def test_bfloat16_stays_within_bfloat16_rounding():
    B, T, H, D = 1, 128, 2, 64
    q, k, v = (jax.random.normal(key, (B, T, H, D), jnp.bfloat16) for key in jax.random.split(jax.random.key(0), 3))
    out = splash.causal_attention(q, k, v)
    chex.assert_type(out, jnp.bfloat16)
    ref = jax.nn.dot_product_attention(*(a.astype(jnp.float32) for a in (q, k, v)), is_causal=True)
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2)


def test_model_falls_back_to_xla_when_no_tile_divides_the_sequence():
    cfg = ModelConfig(depth=1, aspect_ratio=64, head_dim=32, vocab_size=64, sequence_len=256,
                      compute_dtype="float32", attention_impl="splash")
    model, xla_model = init_model(cfg), init_model(dataclasses.replace(cfg, attention_impl="xla"))
    tokens = jax.random.randint(jax.random.key(1), (2, 100), 0, 64)  # 100 positions: no 128-multiple tile
    np.testing.assert_array_equal(model.loss(tokens, tokens, reduction="none"),
                                  xla_model.loss(tokens, tokens, reduction="none"))


def test_model_uses_xla_attention_outside_a_mesh_on_several_devices(monkeypatch):
    """Evaluations jit over several devices without `jax.set_mesh`; the TPU compiler cannot partition the kernel
    there, so the model takes XLA's attention, and the kernel only inside a mesh (shard_map) or on one device."""
    assert jax.device_count() > 1
    cfg = ModelConfig(depth=1, aspect_ratio=64, head_dim=32, vocab_size=64, sequence_len=128,
                      compute_dtype="float32", attention_impl="splash")
    model, xla_model = init_model(cfg), init_model(dataclasses.replace(cfg, attention_impl="xla"))
    tokens = jax.random.randint(jax.random.key(1), (2, 128), 0, 64)
    want = xla_model.loss(tokens, tokens, reduction="none")

    def kernel_called(*args):
        raise AssertionError("the splash kernel ran")

    monkeypatch.setattr(splash, "_local_attention", kernel_called)
    assert not splash.usable(128)
    np.testing.assert_array_equal(model.loss(tokens, tokens, reduction="none"), want)
    with jax.set_mesh(make_mesh(MeshConfig(2, 1, 1), devices=jax.devices()[:2])):
        assert splash.usable(128) and not splash.usable(100)
        with pytest.raises(AssertionError, match="the splash kernel ran"):
            model.loss(tokens, tokens, reduction="none")
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert splash.usable(128)


OPTIM = OptimConfig(warmdown_ratio=0.5, ns_dtype="float32")
TINY = ModelConfig(depth=2, aspect_ratio=32, head_dim=16, vocab_size=128, sequence_len=128, compute_dtype="float32")


def _train(cfg, mesh_shape, steps=2):
    """(losses of `steps` train steps, gradients of the first batch at the initial parameters) on a mesh."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, size=(steps, 2, 8, cfg.sequence_len + 1), dtype=np.int32)
    batches = [{"inputs": t[..., :-1], "targets": t[..., 1:]} for t in tokens]
    mesh = make_mesh(MeshConfig(*mesh_shape), devices=jax.devices()[: int(np.prod(mesh_shape))])
    run = TrainRun(cfg, OPTIM, steps, mesh, seed=0)
    with jax.set_mesh(mesh):
        first = jax.device_put(batches[0], microbatch_sharding(mesh))
        grads = jax.jit(lambda p, b: summed_grads(run.graphdef, p, b)[0])(run.params, first)
    losses = []
    for batch in batches:
        metrics = run.step(jax.device_put(batch, microbatch_sharding(mesh)))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(grads)


@pytest.mark.parametrize("n_kv_head,mesh_shape", [(2, (2, 2, 2)), (1, (1, 1, 2))])
def test_sharded_train_step_matches_xla_attention_on_one_device(n_kv_head, mesh_shape):
    """(2, 2, 2): rows over data x fsdp and query and key/value heads over tensor inside shard_map;
    (1, 1, 2): one key/value head cannot be split over 2 tensor shards, so it is repeated per query head.
    Gradients are compared directly: after an Adam step, near-zero embedding gradients turn float noise
    into sign flips of a whole learning-rate-sized update."""
    cfg = dataclasses.replace(TINY, n_kv_head=n_kv_head)
    ref_losses, ref_grads = _train(cfg, (1, 1, 1))
    losses, grads = _train(dataclasses.replace(cfg, attention_impl="splash"), mesh_shape)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), err_msg=jax.tree_util.keystr(path))
