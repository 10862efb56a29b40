"""RL: group advantages, rollout rows and their masks, the policy-gradient objective against NumPy, a bandit
that learns its rewarded answer, the cpu task's rewards, and chat_rl.py end to end on a tiny checkpoint."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nanochat_jax.checkpoint import CheckpointError
from nanochat_jax.config import MeshConfig, ModelConfig, OptimConfig
from nanochat_jax.model import Linear, init_model
from nanochat_jax.rl import group_advantages, micro_batches, pass_at_k, pg_objective, rl_batch, rollout
from nanochat_jax.sharding import make_mesh
from nanochat_jax.tasks.corpuschat import WordProblems
from nanochat_jax.tasks.gsm8k import extract_answer
from nanochat_jax.tokenizer import Tokenizer
from nanochat_jax.train import TrainRun
from conftest import load_script

ROOT = Path(__file__).resolve().parent.parent
V = 256 + 9  # byte tokenizer + special tokens
TINY = ModelConfig(depth=2, aspect_ratio=32, head_dim=16, n_kv_head=2, vocab_size=V, sequence_len=64,
                   compute_dtype="float32")


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer({bytes([i]): i for i in range(256)})


def random_model(seed=0):
    """The tiny GPT with every kernel random (the real init zeroes lm_head and the output projections)."""
    model = init_model(TINY, seed=seed)
    key = jax.random.key(seed + 1)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, Linear):
            key, sub = jax.random.split(key)
            module.kernel[...] = jax.random.normal(sub, module.kernel.shape) / np.sqrt(module.kernel.shape[0])
    return model


def test_group_advantages_by_hand():
    rewards = [[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]]
    expected = [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [0.25, 0.25, 0.25, -0.75]]
    np.testing.assert_allclose(group_advantages(rewards), expected)


def test_pass_at_k_counts_questions_solved_within_k():
    rewards = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 1]])
    assert pass_at_k(rewards).tolist() == [1, 2, 3]


def test_rl_batch_targets_only_on_sampled_tokens():
    sequences = [[10, 11, 12, 13, 14, 15], [20, 21, 22]]
    masks = [[0, 0, 1, 0, 1, 1], [0, 1, 1]]  # row 0: prompt 10 11, sampled 12, forced 13, sampled 14 15
    batch = rl_batch(sequences, masks, [0.5, -2.0], pad_id=99, seq_len=8)
    assert batch["inputs"].tolist() == [[10, 11, 12, 13, 14, 99, 99, 99], [20, 21, 99, 99, 99, 99, 99, 99]]
    assert batch["targets"].tolist() == [[-1, 12, -1, 14, 15, -1, -1, -1], [21, 22, -1, -1, -1, -1, -1, -1]]
    assert batch["advantages"].tolist() == [[0, 0.5, 0, 0.5, 0.5, 0, 0, 0], [-2, -2, 0, 0, 0, 0, 0, 0]]
    for seq, mask, inputs, targets in zip(sequences, masks, batch["inputs"], batch["targets"]):  # token by token
        for t in range(8):
            sampled = t + 1 < len(seq) and mask[t + 1] == 1
            assert targets[t] == (seq[t + 1] if sampled else -1)
            assert inputs[t] == (seq[t] if t + 1 < len(seq) else 99)
    with pytest.raises(ValueError, match="more than seq_len"):
        rl_batch(sequences, masks, [0.0, 0.0], pad_id=99, seq_len=4)


def test_micro_batches_fill_with_rows_that_train_nothing():
    batch = rl_batch([[1, 2, 3]] * 5, [[0, 1, 1]] * 5, np.arange(5), pad_id=7, seq_len=4)
    micros = micro_batches(batch, rows=2, pad_id=7)
    assert len(micros) == 3 and all(m["inputs"].shape == (2, 4) for m in micros)
    np.testing.assert_array_equal(np.concatenate([m["targets"] for m in micros])[:5], batch["targets"])
    assert micros[2]["inputs"][1].tolist() == [7] * 4 and micros[2]["targets"][1].tolist() == [-1] * 4
    assert micros[2]["advantages"][1].tolist() == [0.0] * 4 and micros[2]["advantages"][0, 0] == 4.0


def test_pg_objective_equals_numpy(tokenizer):
    model = random_model()
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 256, (3, 12)).astype(np.int32)
    targets = rng.integers(0, 256, (3, 12)).astype(np.int32)
    targets[rng.random((3, 12)) < 0.4] = -1
    adv = np.repeat(rng.normal(size=(3, 1)), 12, axis=1).astype(np.float32)
    micro = {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets), "advantages": jnp.asarray(adv)}

    logits = np.asarray(model(jnp.asarray(inputs)), np.float64)  # independent of model.loss
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    picked = np.take_along_axis(logp, np.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    valid = targets >= 0
    expected = -(adv * picked * valid).sum() / valid.sum()
    np.testing.assert_allclose(float(pg_objective(model, micro)), expected, rtol=1e-5)

    via_loss = -np.asarray(model.loss(micro["inputs"], micro["targets"], reduction="none"))
    np.testing.assert_allclose(float(pg_objective(model, micro)), -(adv * via_loss).sum() / valid.sum(), rtol=1e-5)
    none = dict(micro, targets=jnp.full((3, 12), -1, jnp.int32))
    assert float(pg_objective(model, none)) == 0.0


def test_policy_gradient_raises_the_rewarded_completion():
    """A bandit: one prompt, two scripted completions, only the first rewarded. A few on-policy-style steps
    with the group-mean advantage make the rewarded completion more likely and the other less likely."""
    prompt, good, bad = [256, 5, 6, 7], [40, 41, 42, 43], [50, 51, 52, 53]
    sequences = [prompt + good, prompt + bad] * 2
    masks = [[0] * 4 + [1] * 4] * 4
    adv = group_advantages([[1.0, 0.0, 1.0, 0.0]])
    batch = rl_batch(sequences, masks, adv, pad_id=0, seq_len=8)
    optim = OptimConfig(ns_dtype="float32", warmdown_ratio=0.0)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    run = TrainRun(TINY, optim, 5, mesh, seed=0, objective=pg_objective)

    def logprob(params, row):
        model = nnx.merge(run.graphdef, params)
        return -float(model.loss(jnp.asarray(batch["inputs"][row:row + 1]), jnp.asarray(batch["targets"][row:row + 1]),
                                 reduction="sum"))

    before = [logprob(run.params, 0), logprob(run.params, 1)]
    np.testing.assert_allclose(before, [4 * -np.log(V)] * 2, rtol=1e-5)  # zero-initialised lm_head: uniform
    for _ in range(5):
        run.step({k: v[None] for k, v in batch.items()})
    after = [logprob(run.params, 0), logprob(run.params, 1)]
    assert after[0] > before[0] + 1.0 and after[1] < before[1]


class ScriptedEngine:
    """Stands in for the Engine: each prompt's samples are the scripted completions, in turn."""

    def __init__(self, tokenizer, completions):
        self.tokenizer, self.completions, self.calls = tokenizer, completions, []

    def generate_batch(self, prompts, num_samples, **kwargs):
        self.calls.append((len(prompts), num_samples, kwargs["seed"]))
        seqs, masks = [], []
        for p in prompts:
            for s in range(num_samples):
                done = self.tokenizer.encode(self.completions[s])
                seqs.append(list(p) + done)
                masks.append([0] * len(p) + [1] * len(done))
        return seqs, masks


def test_rollout_rewards_each_decoded_completion(tokenizer):
    task = WordProblems(5, "test")
    indices = [0, 1, 2]
    answers = [answer_of(task[i]) for i in indices]
    engine = ScriptedEngine(tokenizer, [f"so #### {answers[0]}", f"#### {answers[1]}", "no idea"])
    sequences, masks, rewards = rollout(engine, tokenizer, task, indices, num_samples=3, max_new_tokens=8,
                                        temperature=1.0, top_k=5, seed=40, max_rows=7)
    assert engine.calls == [(2, 3, 40), (1, 3, 41)]  # two questions (6 rows) fit in 7 rows
    expected = [[float(a == answers[0]), float(a == answers[1]), 0.0] for a in answers]
    np.testing.assert_array_equal(rewards, expected)
    assert rewards[0, 0] == rewards[1, 1] == 1.0
    prompt, done = tokenizer.render_for_completion(task[1]), f"#### {answers[1]}"
    assert sequences[4] == prompt + tokenizer.encode(done) and masks[4] == [0] * len(prompt) + [1] * len(done)


def answer_of(conversation) -> str:
    return extract_answer(conversation["messages"][-1]["content"][-1]["text"])


def reference_completion(tokenizer, conversation) -> str:
    """What the assistant writes for the reference answer (decoded, special tokens included)."""
    ids, _ = tokenizer.render_conversation(conversation)
    start = len(tokenizer.render_for_completion(conversation))
    return tokenizer.decode(ids[start:-1])  # without the final <|assistant_end|>


def test_cpu_task_rewards_right_and_wrong_answers(tokenizer):
    train, test = load_chat_rl().load_tasks("cpu")
    assert len(train) == 8000 and train[0] != test[0]
    for i in range(50):
        ex = train[i]
        completion = reference_completion(tokenizer, ex)
        assert "<|python_start|>" in completion and "<|output_start|>" in completion
        assert train.reward(ex, completion) == 1.0
        right = answer_of(ex)
        assert train.reward(ex, completion.replace(f"#### {right}", f"#### {int(right) + 1}")) == 0.0
        assert train.reward(ex, completion.replace("####", "answer:")) == 0.0
    ids, mask = tokenizer.render_conversation(train[0])
    python_start, output_start = (tokenizer.encode_special(t) for t in ("<|python_start|>", "<|output_start|>"))
    assert mask[ids.index(python_start)] == 1 and mask[ids.index(output_start)] == 0  # the tool writes outputs


def save_tiny_checkpoint(home, model, tokenizer, stage="sft", step=3):
    from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir

    tokenizer.save(home / "tok")
    params = nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])
    meta = {"step": step, "stage": stage, "model": dataclasses.asdict(TINY), "tokenizer": str(home / "tok")}
    ckpt = Checkpointer(checkpoint_dir(stage, TINY.depth), async_save=False)
    ckpt.save(step, params, optax.sgd(0.1).init(params), {}, meta)
    ckpt.close()
    return params


def load_chat_rl():
    return load_script("chat_rl")


def test_chat_rl_end_to_end_and_resume(home, tokenizer, monkeypatch):
    """chat_rl on a 2 x 2 x 2 mesh: its log, summary and checkpoints; then, resumed from the step-2 checkpoint,
    steps 3..4 repeat the straight run's losses and rewards (a step's questions and sampling seeds depend only on
    its number) and the summary spans both sessions."""
    chat_rl = load_chat_rl()
    args = ["--rl.task=cpu", "--rl.num_samples=2", "--rl.examples_per_step=2", "--rl.max_new_tokens=16",
            "--rl.num_iterations=4", "--rl.device_batch_size=1", "--rl.eval_examples=3", "--rl.eval_every=2",
            "--rl.save_every=2", "--mesh.data=2", "--mesh.fsdp=2", "--mesh.tensor=2"]
    with pytest.raises(CheckpointError, match="no checkpoints for stage 'sft'"):
        chat_rl.main(args)

    sft_params = save_tiny_checkpoint(home, random_model(), tokenizer)
    # a random model never writes '#### n': reward odd-length completions so the advantages are not all zero
    monkeypatch.setattr(WordProblems, "reward", lambda self, conversation, completion: float(len(completion) % 2))
    summary = chat_rl.main(args)

    saved = json.loads((home / "report" / "rl_train.json").read_text())
    assert saved["steps"] == 4 and saved["task"] == "cpu" and saved["source_step"] == 3
    assert saved["wall_time_s"] > 0 and 0 <= saved["reward_first_step"] <= 1
    assert saved["pass@1"] == summary["pass@1"] and 0 <= saved["pass@1"] <= 1 and "pass@2" not in saved
    test_task = chat_rl.load_tasks("cpu")[1]
    for j, sample in enumerate(saved["samples"]):  # one sample per question (pass@1 only): two questions
        assert sample.startswith(f"{test_task[j]['messages'][0]['content']} -> ") and "<|bos|>" not in sample

    def records():
        return [json.loads(line) for line in (home / "report" / "rl_train.jsonl").read_text().splitlines()]

    steps = [r for r in records() if "loss" in r]
    evals = [r for r in records() if "pass@1" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["step"] for r in evals] == [0, 2, 4]
    assert all(0 <= r["reward"] <= 1 and r["seq_len"] > 0 and r["sampled_tokens"] > 0 for r in steps)
    assert [r["lr_multiplier"] for r in steps] == [1.0, 0.75, 0.5, 0.25]  # linear decay to 0

    from nanochat_jax.checkpoint import load_model

    model, _, meta = load_model("rl")
    assert meta["step"] == 4 and meta["stage"] == "rl" and meta["source"] == "sft"
    rl_params = nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])
    changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(rl_params), jax.tree.leaves(sft_params))]
    assert any(changed)

    straight = {r["step"]: (r["loss"], r["reward"]) for r in steps}
    shutil.rmtree(home / "checkpoints" / "rl" / "d2" / "4")
    resumed = chat_rl.main([*args, "--train.resume=true"])
    again = {r["step"]: (r["loss"], r["reward"]) for r in records() if "loss" in r}
    assert sorted(again) == [1, 2, 3, 4]
    for step in (3, 4):
        assert again[step] == pytest.approx(straight[step], rel=1e-6), step
    assert resumed["reward_first_step"] == summary["reward_first_step"]
    assert resumed["reward_last_10pct"] == pytest.approx(summary["reward_last_10pct"], rel=1e-6)
    assert resumed["pass@1"] == summary["pass@1"]


def test_chat_rl_learns_a_dense_reward(home, tokenizer, monkeypatch):
    """The whole loop (sampling, advantages, updates, fresh policy each step) on a reward a random model can
    climb: the fraction of completion characters that are '7'. From ~1/256 it must get well above chance."""
    save_tiny_checkpoint(home, random_model(), tokenizer)
    monkeypatch.setattr(WordProblems, "reward", lambda self, conversation, c: c.count("7") / max(1, len(c)))
    load_chat_rl().main(["--rl.task=cpu", "--rl.num_iterations=12", "--rl.examples_per_step=4", "--rl.num_samples=8",
                         "--rl.max_new_tokens=16", "--rl.device_batch_size=4", "--rl.eval_every=0",
                         "--rl.eval_examples=1", "--rl.init_lr_frac=1.0"])
    records = [json.loads(line) for line in (home / "report" / "rl_train.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in records if "reward" in r]
    # measured: 0.007 at step 1 -> 0.46 over the last 3 steps (constant Muon momentum 0.95, as nanochat's RL)
    assert len(rewards) == 12 and rewards[0] < 0.05 and np.mean(rewards[-3:]) > 0.3
    assert all(0 < r["mfu"] < 1 for r in records if "reward" in r)  # against the CPU's measured peak, not "n/a"
