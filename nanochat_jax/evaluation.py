"""Evaluation during base training. Bits-per-byte: a tokenizer-independent loss for base models.

bpb = (sum over target tokens of the cross-entropy in nats) / (ln 2 * sum of the targets' UTF-8 bytes),
where special tokens (0 bytes in the token-bytes table) and ignored targets (-1) count for neither.
Also greedy samples, and nanochat's CORE estimate (CORE on a few hundred items per task, core_eval.py).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
from flax import nnx


def bpb_sums(model, inputs: jax.Array, targets: jax.Array, token_bytes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of nats, sum of bytes) over the targets that have bytes."""
    losses = model.loss(inputs, targets, reduction="none")  # (B, T), 0 where targets == -1
    nbytes = jnp.where(targets >= 0, token_bytes[jnp.maximum(targets, 0)], 0)
    return jnp.sum(jnp.where(nbytes > 0, losses, 0.0)), jnp.sum(nbytes)


def make_bpb_step(graphdef) -> Callable:
    """Jitted (params, inputs, targets, token_bytes) -> (nats, bytes) for one batch."""

    @jax.jit
    def step(params, inputs, targets, token_bytes):
        return bpb_sums(nnx.merge(graphdef, params), inputs, targets, token_bytes)

    return step


def evaluate_bpb(step: Callable, params, batches: Iterable[tuple[jax.Array, jax.Array]], token_bytes) -> float:
    """Bits per byte over the given (inputs, targets) batches; one host sync at the end."""
    total_nats, total_bytes = jnp.zeros(()), jnp.zeros((), jnp.int32)
    token_bytes = jnp.asarray(token_bytes)
    for inputs, targets in batches:
        nats, nbytes = step(params, inputs, targets, token_bytes)
        total_nats, total_bytes = total_nats + nats, total_bytes + nbytes
    total_nats, total_bytes = jax.device_get((total_nats, total_bytes))
    if total_bytes == 0:
        raise ValueError("bits-per-byte over zero bytes: the evaluation batches hold no ordinary tokens")
    return float(total_nats) / (math.log(2) * float(total_bytes))


def split_bpb(cfg, tokenizer, step: Callable, params, token_bytes, rows: int, mesh, split: str) -> float:
    """Bits per byte on the first cfg.train.eval_tokens tokens of a data split (same tokens every call)."""
    return evaluate_bpb(step, params, split_batches(cfg, tokenizer, rows, mesh, split), token_bytes)


def split_batches(cfg, tokenizer, rows: int, mesh, split: str) -> list[tuple[jax.Array, jax.Array]]:
    """The (inputs, targets) batches, on the mesh, of the first cfg.train.eval_tokens tokens of a data split:
    tokenized once, so that a run evaluating every few hundred steps keeps them (d20: ~84 MB over the mesh)."""
    from nanochat_jax.data import make_batch_iterator, make_source
    from nanochat_jax.train import global_batch

    # infinite (wrapping around a small split) so that every process runs the same number of batches
    it = make_batch_iterator(make_source(cfg.data, split), tokenizer, batch_rows=rows, seq_len=cfg.model.sequence_len,
                             packing=cfg.data.packing, shuffle=False, infinite=True,
                             num_threads=cfg.data.tokenizer_threads)
    num_batches = max(1, cfg.train.eval_tokens // (rows * cfg.model.sequence_len))
    batches = []
    for _, local in zip(range(num_batches), it):
        batch = global_batch([local], mesh)
        batches.append((batch["inputs"][0], batch["targets"][0]))
    return batches


def core_bundle(cfg):
    """The CORE eval bundle for base_train's estimates, or None (said once) when they are off or it cannot be had:
    a missing bundle must not stop a training run. With several processes, None on all unless every one has it
    (the estimates' count sums are collectives)."""
    if cfg.train.core_every <= 0:
        return None
    from nanochat_jax.common import print0
    from nanochat_jax.distributed import errors_anywhere
    from nanochat_jax.core_eval import EVAL_BUNDLE_URL, BundleError, check_max_per_task, ensure_bundle, load_task_specs

    try:
        bundle, error = ensure_bundle(cfg.eval.bundle_dir or None, cfg.eval.bundle_url or EVAL_BUNDLE_URL), None
    except BundleError as e:
        bundle, error = None, str(e)
    except OSError as e:  # unzipping or moving it: still not a reason to leave the other processes waiting
        bundle, error = None, f"{type(e).__name__}: {e}"
    if errors := errors_anywhere(error):
        print0(f"CORE estimates off (train.core_every=0 silences this): {errors[0]}")
        return None
    check_max_per_task(load_task_specs(bundle), cfg.train.core_max_per_task, "train.core_max_per_task")  # (now)
    return bundle


def core_estimate(graphdef, params, tokenizer, bundle, cfg, mesh) -> float:
    """The CORE metric on at most cfg.train.core_max_per_task items per task. mesh: an eval_mesh (each process
    scores its own items); params are brought onto it."""
    from nanochat_jax.core_eval import evaluate_core, make_scorer
    from nanochat_jax.distributed import replicated_on
    from nanochat_jax.sharding import batch_shards

    model = nnx.merge(graphdef, replicated_on(params, mesh))
    out = evaluate_core(make_scorer(model, mesh), tokenizer, bundle, cfg.train.core_max_per_task,
                        cfg.eval.max_seq_len or None, cfg.eval.batch_tokens, batch_shards(mesh), log=lambda _: None)
    return out["core_metric"]


SAMPLE_PROMPTS = ["The capital of", "Once upon a time,", "12 + 7 =", "The cat"]


def sample_texts(graphdef, params, tokenizer, prompts=SAMPLE_PROMPTS, max_tokens: int = 24) -> list[str]:
    """Greedy continuations of fixed prompts through the engine (the model's KV-cache decode path)."""
    from nanochat_jax.engine import Engine

    engine = Engine(nnx.merge(graphdef, params), tokenizer)
    tokens = [tokenizer.encode(p, prepend=tokenizer.bos_token_id) for p in prompts]
    results, _ = engine.generate_batch(tokens, max_tokens=max_tokens, temperature=0.0)
    return [tokenizer.decode(r[1:]) for r in results]
