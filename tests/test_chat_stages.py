"""Mid-training and SFT: the batches (packing, padding, assistant-only targets, resume) and the scripts end to end."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanochat_jax.chat_data import PackedConversations, SFTBatches, collate_sft
from nanochat_jax.tasks.corpuschat import SmallTalk, WordProblems
from nanochat_jax.tasks.base import TaskMixture
from nanochat_jax.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer({bytes([i]): i for i in range(256)})


@pytest.fixture(scope="module")
def task():
    return TaskMixture([WordProblems(20), SmallTalk(20)])


# ---------------------------------------------------------------------------------------------
# Batches


def test_sft_targets_are_the_assistant_tokens_only(tok, task):
    seq_len = 512
    batches = SFTBatches(task, tok, rows=4, seq_len=seq_len, process_index=0, process_count=1)
    micro = batches.next_step(2)
    pad = tok.encode_special("<|assistant_end|>")
    width = micro[0]["inputs"].shape[1]
    rendered = [tok.render_conversation(task[i], max_tokens=seq_len + 1) for i in range(8)]
    longest = max(len(ids) - 1 for ids, _ in rendered)
    assert width == 1 << (longest - 1).bit_length() and width <= seq_len  # one power-of-two width per step
    for b in range(2):
        assert micro[b]["inputs"].shape == micro[b]["targets"].shape == (4, width)
        for r in range(4):
            ids, mask = rendered[4 * b + r]
            inputs, targets = micro[b]["inputs"][r], micro[b]["targets"][r]
            n = len(ids) - 1
            for t in range(width):  # token by token against the render
                if t < n:
                    assert inputs[t] == ids[t]
                    assert targets[t] == (ids[t + 1] if mask[t + 1] else -1)
                else:
                    assert inputs[t] == pad and targets[t] == -1
    # a tool-using conversation: the calculator's output is never a target, the python call is
    ids, mask = rendered[next(i for i in range(8) if isinstance(task[i]["messages"][1]["content"], list))]
    out_start = tok.encode_special("<|output_start|>")
    k = ids.index(out_start)
    assert mask[k] == 0 and mask[k - 1] == 1  # <|python_end|> trained, <|output_start|> not


def test_sft_truncates_strides_processes_and_resumes(tok, task):
    short = SFTBatches(task, tok, rows=2, seq_len=24, process_index=0, process_count=1)
    micro = short.next_step(1)[0]
    assert micro["inputs"].shape == (2, 24)  # capped at seq_len
    second = SFTBatches(task, tok, rows=4, seq_len=512, process_index=1, process_count=2)
    (micro,) = second.next_step(1)
    expected = collate_sft([tok.render_conversation(task[i], max_tokens=513) for i in (1, 3)],
                           micro["inputs"].shape[1], tok.encode_special("<|assistant_end|>"))
    np.testing.assert_array_equal(micro["inputs"], expected["inputs"])
    np.testing.assert_array_equal(micro["targets"], expected["targets"])
    state = second.get_state()
    after = second.next_step(3)
    again = SFTBatches(task, tok, rows=4, seq_len=512, process_index=1, process_count=2)
    again.set_state(state)
    for a, b in zip(after, again.next_step(3)):
        np.testing.assert_array_equal(a["targets"], b["targets"])


def test_mid_packing_preserves_the_token_stream(tok, task):
    seq_len, rows = 32, 3
    it = PackedConversations(task, tok, rows=rows, seq_len=seq_len, process_index=0, process_count=1)
    batches = [next(it) for _ in range(12)]
    stream = np.concatenate([tok.render_conversation(task[i])[0] for i in range(len(task))] * 2)
    for k, b in enumerate(batches):
        assert b["inputs"].shape == b["targets"].shape == (rows, seq_len)
        for r in range(rows):
            start = (k * rows + r) * (seq_len + 1)
            np.testing.assert_array_equal(b["inputs"][r], stream[start:start + seq_len])
            np.testing.assert_array_equal(b["targets"][r], stream[start + 1:start + seq_len + 1])
    assert it.get_state()["epoch"] >= 0 and 0 < it.progress


def test_mid_packing_resumes_exactly_and_wraps(tok, task):
    it = PackedConversations(task, tok, rows=4, seq_len=50, process_index=1, process_count=2)
    for _ in range(5):
        next(it)
    state = it.get_state()
    assert state["cursor"] % 2 == 1  # this process only takes odd conversations
    expected = [next(it) for _ in range(60)]  # runs through more than an epoch of the 20 odd conversations
    assert it.get_state()["epoch"] >= 1
    again = PackedConversations(task, tok, rows=4, seq_len=50, process_index=1, process_count=2)
    again.set_state(json.loads(json.dumps(state)))  # as stored in a checkpoint
    for e in expected:
        np.testing.assert_array_equal(next(again)["inputs"], e["inputs"])
    odd = np.concatenate([tok.render_conversation(task[i])[0] for i in range(1, len(task), 2)])
    first = next(PackedConversations(task, tok, rows=4, seq_len=50, process_index=1, process_count=2))
    assert first["inputs"].shape == (2, 50)  # rows are global: each of the 2 processes yields half
    np.testing.assert_array_equal(first["inputs"][0], odd[:50])
    np.testing.assert_array_equal(first["inputs"][1], odd[51:101])


def test_a_position_saved_for_another_mixture_size_restarts_the_order(tok, task, capsys):
    """A mixture that shrank (or grew) since the checkpoint: the saved cursor would point past the end or at other
    conversations, so both iterators warn and start over."""
    packed = PackedConversations(task, tok, rows=2, seq_len=50, process_index=0, process_count=1)
    for _ in range(5):
        next(packed)
    state = packed.get_state()
    assert state["conversations"] == len(task) == 40 and state["cursor"] > 0
    smaller = TaskMixture([WordProblems(20)])
    again = PackedConversations(smaller, tok, rows=2, seq_len=50, process_index=0, process_count=1)
    again.set_state(state)
    assert "saved for a mixture of 40 conversations" in capsys.readouterr().err
    np.testing.assert_array_equal(next(again)["inputs"],
                                  next(PackedConversations(smaller, tok, rows=2, seq_len=50))["inputs"])

    sft = SFTBatches(task, tok, rows=2, seq_len=64, process_index=0, process_count=1)
    sft.next_step(5)
    moved = SFTBatches(smaller, tok, rows=2, seq_len=64, process_index=0, process_count=1)
    moved.set_state(sft.get_state())
    assert moved.position == 0 and "its order starts from the beginning" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Scripts end to end

TINY = ["--config", str(ROOT / "configs" / "cpu_tiny.toml"), "--model.depth=2", "--model.aspect_ratio=32",
        "--model.head_dim=32", "--model.sequence_len=64", "--mesh.data=1"]


def run(script: str, *args: str, home: Path) -> str:
    env = dict(os.environ, NANOCHAT_JAX_HOME=str(home), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def records(home: Path, stage: str) -> list[dict]:
    return [json.loads(x) for x in (home / "report" / f"{stage}_train.jsonl").read_text().splitlines()]


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta" / "metadata").read_text())


@pytest.fixture(scope="module")
def chat_home(tmp_path_factory):
    """tokenizer -> 40 base steps -> 30 mid steps -> 20 SFT steps on the cpu mixtures, each in a fresh process."""
    home = tmp_path_factory.mktemp("home")
    run("tok_train.py", "--config", str(ROOT / "configs" / "cpu_tiny.toml"), "--tokenizer.vocab_size=512", home=home)
    run("base_train.py", *TINY, "--train.device_batch_size=8", "--train.total_batch_size=1024",
        "--train.eval_tokens=2048", "--train.sample_every=0", "--train.num_iterations=40", "--train.eval_every=0",
        home=home)
    run("mid_train.py", *TINY, "--mid.mixture=cpu", "--mid.device_batch_size=8", "--mid.total_batch_size=1024",
        "--mid.eval_tokens=2048", "--mid.num_iterations=30", "--mid.eval_every=15", home=home)
    run("chat_sft.py", *TINY, "--sft.mixture=cpu", "--sft.device_batch_size=8", "--sft.target_examples_per_step=16",
        "--sft.eval_steps=4", "--sft.num_iterations=20", "--sft.eval_every=10", "--sft.init_lr_frac=0.5", home=home)
    return home


def test_mid_checkpoint_and_loss(chat_home):
    mid = records(chat_home, "mid")
    losses = {r["step"]: r["loss"] for r in mid if "loss" in r}
    bpb = [r["val_bpb"] for r in mid if "val_bpb" in r]
    assert sorted(losses) == list(range(1, 31)) and len(bpb) == 3
    # measured: loss 4.95 -> 2.10, val bpb 3.68 -> 1.83 (the base model has never seen the chat special tokens)
    assert np.mean([losses[s] for s in range(26, 31)]) < losses[1] - 0.8
    assert bpb[-1] < bpb[0]
    meta = read_meta(chat_home / "checkpoints" / "mid" / "d2" / "30")
    assert meta["stage"] == "mid" and meta["step"] == 30 and meta["model"]["depth"] == 2
    assert meta["config"]["mid"]["mixture"] == "cpu" and meta["tokenizer"].endswith("tokenizer")
    summary = json.loads((chat_home / "report" / "mid_train.json").read_text())
    assert summary["steps"] == 30 and summary["val_bpb"] == bpb[-1] and len(summary["samples"]) == 4
    assert summary["min_val_bpb"] == min(bpb)
    assert summary["wall_time_s"] > 0


def test_sft_checkpoint_and_loss(chat_home):
    sft = records(chat_home, "sft")
    losses = {r["step"]: r["loss"] for r in sft if "loss" in r}
    val = [r["val_loss"] for r in sft if "val_loss" in r]
    assert sorted(losses) == list(range(1, 21)) and len(val) == 3
    # measured: val loss 2.75 -> 2.17 over the 20 steps
    assert val[-1] < val[0] - 0.2
    assert all(0 < r["num_tokens"] < 16 * 64 for r in sft if "loss" in r)  # only assistant tokens count
    lrm = [r["lr_multiplier"] for r in sft if "loss" in r]
    np.testing.assert_allclose(lrm, [1 - s / 20 for s in range(20)], rtol=1e-5)  # linear decay to 0
    meta = read_meta(chat_home / "checkpoints" / "sft" / "d2" / "20")
    assert meta["stage"] == "sft" and meta["step"] == 20
    summary = json.loads((chat_home / "report" / "sft_train.json").read_text())
    assert {"WorldFacts_acc", "WordProblems_acc", "SimpleSpelling_acc"} <= set(summary)
    assert summary["train_loss"] == pytest.approx(losses[20])
    assert summary["samples"][1].startswith("Who are you? -> ")


def test_chat_cli_answers_from_the_sft_checkpoint(chat_home, monkeypatch):
    """chat_cli -p prints the SFT model's greedy reply: the Engine's, decoded (tool calls shown as calculator
    markup, so compared up to the first tool call)."""
    out = run("chat_cli.py", "--source", "sft", "-p", "What is the capital of Gorsica?", "-t", "0", home=chat_home)
    assert "source=sft step=20" in out and "Assistant: " in out
    from nanochat_jax.checkpoint import load_model
    from nanochat_jax.engine import Engine

    monkeypatch.setenv("NANOCHAT_JAX_HOME", str(chat_home))
    engine = Engine(*load_model("sft")[:2])
    tok = engine.tokenizer
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "What is the capital of Gorsica?"},
                                                     {"role": "assistant", "content": ""}]})
    (tokens,), _ = engine.generate_batch([prompt], max_tokens=256, temperature=0.0)
    reply = tok.decode([t for t in tokens[len(prompt):]]).split("<|python_start|>")[0].strip()
    assert reply and out.split("Assistant: ", 1)[1].startswith(reply), (reply, out[-500:])


@pytest.mark.parametrize("stage", ["mid", pytest.param("sft", marks=pytest.mark.slow)])  # (SFTBatches' state: above)
def test_rerun_then_resume_is_exact(chat_home, tmp_path, stage):
    """A new run in a directory holding another run's checkpoints sets them aside (<dir>.previous-1), and a
    resumed run from its step-4 checkpoint redoes steps 5..8 with the straight run's losses."""
    home = tmp_path / "home"
    shutil.copytree(chat_home, home)
    script, args = {
        "mid": ("mid_train.py", ["--mid.mixture=cpu", "--mid.device_batch_size=8", "--mid.total_batch_size=1024",
                                 "--mid.eval_tokens=2048", "--mid.num_iterations=8", "--mid.eval_every=4"]),
        "sft": ("chat_sft.py", ["--sft.mixture=cpu", "--sft.device_batch_size=8", "--sft.target_examples_per_step=16",
                                "--sft.eval_steps=2", "--sft.num_iterations=8", "--sft.eval_every=4",
                                "--sft.eval_metrics_every=0"]),
    }[stage]
    run(script, *TINY, *args, "--train.checkpoint_every=4", home=home)
    ckpt = home / "checkpoints" / stage / "d2"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["4", "8"]
    assert sorted(p.name for p in (ckpt.parent / "d2.previous-1").iterdir()) == sorted(
        [{"mid": "30", "sft": "20"}[stage], "config.toml"])
    straight = {r["step"]: r["loss"] for r in records(home, stage) if "loss" in r}
    straight_smooth = {r["step"]: r["loss_smooth"] for r in records(home, stage) if "loss" in r}
    summary = json.loads((home / "report" / f"{stage}_train.json").read_text())

    shutil.rmtree(ckpt / "8")
    run(script, *TINY, *args, "--train.checkpoint_every=4", "--train.resume=true", home=home)
    resumed = {r["step"]: r["loss"] for r in records(home, stage) if "loss" in r}
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6), (stage, step)
    # the smoothed curve and the best validation figure span both sessions, as in the straight run
    smooth = {r["step"]: r["loss_smooth"] for r in records(home, stage) if "loss" in r}
    assert smooth[5] == pytest.approx(straight_smooth[5], rel=1e-6)
    if stage == "mid":
        resumed_summary = json.loads((home / "report" / "mid_train.json").read_text())
        assert resumed_summary["min_val_bpb"] == pytest.approx(summary["min_val_bpb"], rel=1e-6)
