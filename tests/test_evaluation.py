"""Bits-per-byte on hand-computed cases."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from nanochat_jax.evaluation import bpb_sums, evaluate_bpb, unigram_bpb


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


def test_unigram_bpb_by_hand():
    ids = np.array([1, 1, 2, 3])
    tb = np.array([0, 1, 2, 3])
    # add-one counts: token0 1, token1 3, token2 2, token3 2 -> total 8
    expected = -(2 * math.log(3 / 8) + math.log(2 / 8) + math.log(2 / 8)) / (math.log(2) * (1 + 1 + 2 + 3))
    assert unigram_bpb(ids, tb) == pytest.approx(expected)
