"""Bits-per-byte on hand-computed cases."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from nanochat_jax.evaluation import bpb_sums, evaluate_bpb


class FixedLossModel:
    """Stands in for GPT: per-token losses are given, 0 where the target is ignored (as GPT.loss does)."""

    def __init__(self, losses):
        self.losses = jnp.asarray(losses, jnp.float32)

    def loss(self, inputs, targets, reduction="none"):
        assert reduction == "none"
        return jnp.where(targets >= 0, self.losses, 0.0)


TOKEN_BYTES = jnp.array([0, 1, 2, 3], jnp.int32)  # token 0 is a special token: no bytes


def test_bpb_sums_by_hand():
    model = FixedLossModel([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    targets = jnp.array([[1, 2, 0], [3, -1, 1]])
    nats, nbytes = bpb_sums(model, None, targets, TOKEN_BYTES)
    # counted: (1 nat, 1 byte) (2, 2) (4, 3) (6, 1); the special token and the ignored target count for neither
    assert float(nats) == pytest.approx(13.0) and int(nbytes) == 7


def test_evaluate_bpb_sums_over_batches_then_divides():
    batches = [(None, jnp.array([[1, 2, 0]])), (None, jnp.array([[3, -1, 1]]))]
    losses = iter([[[1.0, 2.0, 3.0]], [[4.0, 5.0, 6.0]]])
    step = lambda params, inputs, targets, tb: bpb_sums(FixedLossModel(next(losses)), inputs, targets, tb)  # noqa: E731
    assert evaluate_bpb(step, None, batches, TOKEN_BYTES) == pytest.approx(13.0 / (math.log(2) * 7))


def test_evaluate_bpb_refuses_zero_bytes():
    step = lambda *a: (jnp.zeros(()), jnp.zeros((), jnp.int32))  # noqa: E731
    with pytest.raises(ValueError, match="zero bytes"):
        evaluate_bpb(step, None, [(None, None)], TOKEN_BYTES)


def unigram_bpb(token_ids: np.ndarray, token_bytes: np.ndarray, train_ids: np.ndarray | None = None) -> float:
    """Bits-per-byte of a unigram model (token frequencies of train_ids, add-one smoothed) on token_ids.

    The baseline a trained model must beat clearly; specials are excluded like in evaluate_bpb.
    """
    train_ids = token_ids if train_ids is None else train_ids
    counts = np.bincount(train_ids, minlength=len(token_bytes)).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    nbytes = token_bytes[token_ids]
    keep = nbytes > 0
    return float(-logp[token_ids[keep]].sum() / (math.log(2) * nbytes[keep].sum()))


def test_unigram_bpb_by_hand():
    ids = np.array([1, 1, 2, 3])
    tb = np.array([0, 1, 2, 3])
    # add-one counts: token0 1, token1 3, token2 2, token3 2 -> total 8
    expected = -(2 * math.log(3 / 8) + math.log(2 / 8) + math.log(2 / 8)) / (math.log(2) * (1 + 1 + 2 + 3))
    assert unigram_bpb(ids, tb) == pytest.approx(expected)


def test_bpb_of_a_real_model_on_8_devices_equals_one(make_mesh):
    """make_bpb_step on a GPT with params and batches sharded over 2 x 2 x 2 devices gives one device's bits per
    byte (batches with ignored targets and special tokens, as validation batches have)."""
    import jax
    from flax import nnx

    from nanochat_jax.config import ModelConfig
    from nanochat_jax.evaluation import make_bpb_step
    from nanochat_jax.model import init_model
    from nanochat_jax.sharding import batch_sharding, param_shardings

    cfg = ModelConfig(depth=2, aspect_ratio=32, head_dim=16, vocab_size=96, sequence_len=32, compute_dtype="float32")
    model = init_model(cfg, seed=1)
    graphdef, state = nnx.split(model, nnx.Param)
    params = jax.tree.map(lambda a: a + 0.02 * np.random.default_rng(0).standard_normal(a.shape).astype(a.dtype),
                          nnx.to_pure_dict(state))  # (zero-initialised lm_head would give a uniform model)
    rng = np.random.default_rng(1)
    batches = []
    for _ in range(3):
        inputs = rng.integers(0, cfg.vocab_size, (8, cfg.sequence_len)).astype(np.int32)
        targets = np.where(rng.random((8, cfg.sequence_len)) < 0.1, -1, np.roll(inputs, -1, axis=1)).astype(np.int32)
        batches.append((inputs, targets))
    token_bytes = jnp.asarray(np.r_[0, 0, rng.integers(1, 5, cfg.vocab_size - 2)].astype(np.int32))
    step = make_bpb_step(graphdef)
    one = evaluate_bpb(step, params, [(jnp.asarray(i), jnp.asarray(t)) for i, t in batches], token_bytes)
    mesh = make_mesh(2, 2, 2)
    sharded = jax.device_put(params, param_shardings(state, mesh))
    on_mesh = [tuple(jax.device_put(a, batch_sharding(mesh)) for a in b) for b in batches]
    with jax.set_mesh(mesh):
        eight = evaluate_bpb(step, sharded, on_mesh, token_bytes)
    assert 2.0 < one < 20.0
    assert eight == pytest.approx(one, rel=1e-6)
