"""Reinforcement learning pieces (nanochat's simplified GRPO): rollouts, rewards, advantages, the objective.

nanochat's "GRPO" is close to plain REINFORCE: strictly on-policy (so no PPO ratio or clipping), no KL
penalty to a reference model, advantage = reward minus the mean reward of the question's group of samples
(no division by the standard deviation), and a token-level objective: the advantage-weighted sum of the
log-probabilities of the sampled tokens, divided by the number of sampled tokens in the micro-batch.

- `rollout` renders each question for completion, samples `num_samples` completions through the Engine
  and scores each with the task's reward.
- `group_advantages` centres the rewards of each question's group.
- `rl_batch` turns rollouts into fixed-length (inputs, targets, advantages) rows: targets are -1 wherever
  the token was not sampled by the policy (prompt, forced calculator output, padding), so only sampled
  tokens are trained. `micro_batches` pads the rows to whole micro-batches of a fixed size.
- `pg_objective(model, micro)` is the loss to minimise for `train.TrainRun(objective=...)`.
- `pass_at_k` counts, from (questions, samples) rewards, the questions solved within the first k samples.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def rollout(engine, tokenizer, task, indices, num_samples: int, max_new_tokens: int, temperature: float,
            top_k: int, seed: int, max_rows: int | None = None):
    """Sample num_samples completions for each question task[i], i in indices.

    Returns (sequences, masks, rewards): sequences/masks are E*S lists in question-major order (prompt +
    completion tokens; mask 1 on sampled tokens, 0 on the prompt and forced tool output, as the Engine
    gives them), rewards is a float32 (E, S) array of task.reward on each decoded completion. At most
    max_rows rows (whole questions, at least one) go through the Engine at once; Engine call c uses seed + c.
    """
    conversations = [task[int(i)] for i in indices]
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    per_call = len(prompts) if max_rows is None else max(1, max_rows // num_samples)
    sequences, masks = [], []
    for c, start in enumerate(range(0, len(prompts), per_call)):
        seqs, ms = engine.generate_batch(prompts[start:start + per_call], num_samples=num_samples,
                                         max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                         seed=seed + c)
        sequences += seqs
        masks += ms
    rewards = np.zeros((len(prompts), num_samples), np.float32)
    for e, (conversation, prompt) in enumerate(zip(conversations, prompts)):
        for s in range(num_samples):
            completion = tokenizer.decode(sequences[e * num_samples + s][len(prompt):])
            rewards[e, s] = task.reward(conversation, completion)
    return sequences, masks, rewards


def group_advantages(rewards) -> np.ndarray:
    """(E, S) rewards -> (E, S) advantages: each reward minus the mean of its question's S rewards."""
    rewards = np.asarray(rewards, np.float32)
    return rewards - rewards.mean(axis=1, keepdims=True)


def rl_batch(sequences, masks, advantages, pad_id: int, seq_len: int) -> dict[str, np.ndarray]:
    """Rows of next-token training data from N rollouts: {"inputs", "targets", "advantages"}, each (N, seq_len).

    inputs[t] = seq[t], targets[t] = seq[t + 1] where mask[t + 1] == 1 else -1; padding has input pad_id
    and target -1. advantages[t] is the row's advantage (one per sequence, N of them) on trained tokens, 0
    elsewhere. A sequence longer than seq_len + 1 tokens is an error (choose seq_len from the longest)."""
    advantages = np.asarray(advantages, np.float32).reshape(-1)
    if not len(sequences) == len(masks) == len(advantages):
        raise ValueError(f"rl_batch: {len(sequences)} sequences, {len(masks)} masks and {len(advantages)} "
                         "advantages must be as many")
    n = len(sequences)
    inputs = np.full((n, seq_len), pad_id, np.int32)
    targets = np.full((n, seq_len), -1, np.int32)
    for i, (seq, mask) in enumerate(zip(sequences, masks)):
        if len(seq) != len(mask):
            raise ValueError(f"rl_batch: row {i} has {len(seq)} tokens but {len(mask)} mask entries")
        if len(seq) - 1 > seq_len:
            raise ValueError(f"rl_batch: row {i} has {len(seq)} tokens, more than seq_len + 1 = {seq_len + 1}")
        t = len(seq) - 1
        inputs[i, :t] = seq[:-1]
        targets[i, :t] = np.where(np.asarray(mask[1:]) == 1, seq[1:], -1)
    return {"inputs": inputs, "targets": targets,
            "advantages": np.where(targets >= 0, advantages[:, None], 0.0).astype(np.float32)}


def micro_batches(batch: dict[str, np.ndarray], rows: int, pad_id: int) -> list[dict[str, np.ndarray]]:
    """Split (N, T) rows into ceil(N / rows) micro-batches of exactly `rows` rows; the last is filled with
    rows that train nothing (inputs pad_id, targets -1, advantages 0), so every micro-batch has one shape."""
    n = len(batch["inputs"])
    total = -(-n // rows) * rows
    fill = {"inputs": pad_id, "targets": -1, "advantages": 0.0}
    padded = {k: np.concatenate([v, np.full((total - n,) + v.shape[1:], fill[k], v.dtype)]) for k, v in batch.items()}
    return [{k: v[i:i + rows] for k, v in padded.items()} for i in range(0, total, rows)]


def pg_objective(model, micro: dict):
    """The loss to minimise: -sum(advantage * log p(target)) over trained tokens / their number (>= 1)."""
    logp = -model.loss(micro["inputs"], micro["targets"], reduction="none")  # 0 where targets == -1
    valid = micro["targets"] >= 0
    count = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    return -jnp.sum(jnp.where(valid, logp * micro["advantages"], 0.0)) / count


def pass_at_k(rewards) -> np.ndarray:
    """(E, S) rewards -> (S,) counts: entry k-1 is how many of the E questions some sample 1..k solved (> 0)."""
    solved = np.asarray(rewards) > 0
    return np.logical_or.accumulate(solved, axis=1).sum(axis=0)
