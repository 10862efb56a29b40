"""The README's main command end to end: run_cpu.sh -> a chat model + report.md. The full run is slow (~8 minutes on
2 cores); CI runs the same script on a tiny model with a few dozen steps per stage (the whole-pipeline smoke run),
and checks each stage script's outputs on it: mid-training and SFT learn, chat_cli answers as the Engine does,
a rerun sets the previous run aside and a resume is exact."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import cpu_xla_flags

ROOT = Path(__file__).resolve().parents[1]

MODEL = ["--model.depth=2", "--model.aspect_ratio=32", "--model.head_dim=32", "--model.sequence_len=64"]
STEPS = {"base": 40, "mid": 30, "sft": 20, "rl": 1}
SMOKE = [*MODEL, "--train.total_batch_size=1024", f"--train.num_iterations={STEPS['base']}", "--train.eval_every=40",
         "--train.eval_tokens=2048", "--train.checkpoint_every=0",
         "--mid.total_batch_size=1024", f"--mid.num_iterations={STEPS['mid']}", "--mid.eval_every=15",
         "--mid.eval_tokens=2048",
         f"--sft.num_iterations={STEPS['sft']}", "--sft.eval_every=10", "--sft.eval_steps=4", "--sft.init_lr_frac=0.5",
         f"--rl.num_iterations={STEPS['rl']}", "--rl.examples_per_step=2", "--rl.num_samples=2",
         "--rl.device_batch_size=2", "--rl.max_new_tokens=16", "--rl.eval_examples=2"]
TINY = ["--config", str(ROOT / "configs" / "cpu_tiny.toml"), *MODEL, "--mesh.data=1"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """run_cpu.sh on the tiny model: (home, stdout)."""
    home = tmp_path_factory.mktemp("home")
    env = dict(os.environ, NANOCHAT_JAX_HOME=str(home), EVAL_PROBLEMS="4", EVAL_TOKENS="32", XLA_FLAGS=cpu_xla_flags(1))
    proc = subprocess.run(["bash", str(ROOT / "run_cpu.sh"), *SMOKE], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return home, proc.stdout


def run(script: str, *args: str, home: Path) -> str:
    env = dict(os.environ, NANOCHAT_JAX_HOME=str(home), JAX_PLATFORMS="cpu",
               XLA_FLAGS=cpu_xla_flags(1))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def records(home: Path, stage: str) -> list[dict]:
    return [json.loads(x) for x in (home / "report" / f"{stage}_train.jsonl").read_text().splitlines()]


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta" / "metadata").read_text())


def test_run_cpu_smoke(smoke):
    """Every stage of run_cpu.sh, in order, through the real scripts: each one's outputs are the next one's inputs,
    and the report gathers all of them."""
    home, stdout = smoke
    assert [line for line in stdout.splitlines() if line.startswith("=== ")][-1] == "=== 9/9 report ==="
    for stage, steps in STEPS.items():
        summary = json.loads((home / "report" / f"{stage}_train.json").read_text())
        assert summary["steps"] == steps and summary["checkpoint"].endswith(f"/{stage}/d2/{steps}"), stage
    rl = json.loads((home / "report" / "rl_train.json").read_text())
    assert rl["source"] == "sft" and rl["source_step"] == STEPS["sft"]  # each stage started from the one before
    for source in ("mid", "sft", "rl"):
        results = json.loads((home / "report" / f"chat_eval_{source}.json").read_text())["results"]
        assert sorted(results) == ["SpellingBee", "WordProblems", "WorldFacts"]
        assert all(v in (0.0, 0.25, 0.5, 0.75, 1.0) for v in results.values())  # 4 problems each
    report = (home / "report" / "report.md").read_text()
    assert "| Metric" in report and "![rl mean reward](rl_reward.png)" in report
    assert "Assistant: " in stdout  # chat_cli answered from the RL checkpoint


def test_mid_checkpoint_and_loss(smoke):
    home = smoke[0]
    mid = records(home, "mid")
    losses = {r["step"]: r["loss"] for r in mid if "loss" in r}
    bpb = [r["val_bpb"] for r in mid if "val_bpb" in r]
    assert sorted(losses) == list(range(1, 31)) and len(bpb) == 3
    # measured: loss 8.13 -> 2.15, val bpb 4.26 -> 1.10 (the base model has never seen the chat special tokens)
    assert np.mean([losses[s] for s in range(26, 31)]) < losses[1] - 0.8
    assert bpb[-1] < bpb[0]
    meta = read_meta(home / "checkpoints" / "mid" / "d2" / "30")
    assert meta["stage"] == "mid" and meta["step"] == 30 and meta["model"]["depth"] == 2
    assert meta["config"]["mid"]["mixture"] == "cpu" and meta["tokenizer"].endswith("tokenizer")
    summary = json.loads((home / "report" / "mid_train.json").read_text())
    assert summary["steps"] == 30 and summary["val_bpb"] == bpb[-1] and len(summary["samples"]) == 4
    assert summary["min_val_bpb"] == min(bpb)
    assert summary["wall_time_s"] > 0


def test_sft_checkpoint_and_loss(smoke):
    home = smoke[0]
    sft = records(home, "sft")
    losses = {r["step"]: r["loss"] for r in sft if "loss" in r}
    val = [r["val_loss"] for r in sft if "val_loss" in r]
    assert sorted(losses) == list(range(1, 21)) and len(val) == 3
    # measured: val loss 2.10 -> 1.62 over the 20 steps
    assert val[-1] < val[0] - 0.2
    assert all(0 < r["num_tokens"] < 16 * 64 for r in sft if "loss" in r)  # only assistant tokens count
    lrm = [r["lr_multiplier"] for r in sft if "loss" in r]
    np.testing.assert_allclose(lrm, [1 - s / 20 for s in range(20)], rtol=1e-5)  # linear decay to 0
    meta = read_meta(home / "checkpoints" / "sft" / "d2" / "20")
    assert meta["stage"] == "sft" and meta["step"] == 20
    summary = json.loads((home / "report" / "sft_train.json").read_text())
    assert {"WorldFacts_acc", "WordProblems_acc", "SimpleSpelling_acc"} <= set(summary)
    assert summary["train_loss"] == pytest.approx(losses[20])
    assert summary["samples"][1].startswith("Who are you? -> ")


def test_master_sft_starts_from_the_base_model_and_learns(smoke, tmp_path):
    """sft.recipe = "master" (configs/cpu_modern.toml, d24_modern.toml): SFT straight from the base model, its
    optimizer moments included, on best-fit rows of full sequence length, total_batch_size tokens per step, LR
    constant then down to 0 over the last half, Muon momentum warming up from 0.85."""
    home = tmp_path / "home"
    for part in ("tokenizer", "checkpoints/base"):
        shutil.copytree(smoke[0] / part, home / part)
    out = run("chat_sft.py", *TINY, "--sft.recipe=master", "--sft.source=base", "--sft.mixture=cpu",
              "--sft.init_lr_frac=0.8", "--sft.device_batch_size=4", "--sft.total_batch_size=512",
              "--sft.num_iterations=20", "--sft.eval_every=10", "--sft.eval_steps=4", home=home)
    assert f"moment arrays from the base checkpoint, step {STEPS['base']}" in out  # master's warm start
    sft = records(home, "sft")
    steps = [r for r in sft if "loss" in r]
    val = [r["val_loss"] for r in sft if "val_loss" in r]
    assert len(steps) == 20 and len(val) == 3
    assert val[-1] < val[0] - 0.5  # the base model has never seen a conversation
    assert all(0 < r["num_tokens"] < 512 for r in steps)  # 2 micro-batches of 4 full rows: assistant tokens only
    np.testing.assert_allclose([r["lr_multiplier"] for r in steps], [min(1.0, (20 - s) / 10) for s in range(20)],
                               rtol=1e-5)
    summary = json.loads((home / "report" / "sft_train.json").read_text())
    assert summary["recipe"] == "master" and summary["source"] == "base" and 0 < summary["epochs"] < 1
    assert read_meta(home / "checkpoints" / "sft" / "d2" / "20")["config"]["sft"]["recipe"] == "master"


def test_chat_cli_answers_from_the_sft_checkpoint(smoke, monkeypatch):
    """chat_cli -p prints the SFT model's greedy reply: the Engine's, decoded (tool calls shown as calculator
    markup, so compared up to the first tool call)."""
    home = smoke[0]
    out = run("chat_cli.py", "--source", "sft", "-p", "What is the capital of Gorsica?", "-t", "0", home=home)
    assert "source=sft step=20" in out and "Assistant: " in out
    from nanochat_jax.checkpoint import load_model
    from nanochat_jax.engine import Engine

    monkeypatch.setenv("NANOCHAT_JAX_HOME", str(home))
    engine = Engine(*load_model("sft")[:2])
    tok = engine.tokenizer
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "What is the capital of Gorsica?"},
                                                     {"role": "assistant", "content": ""}]})
    (tokens,), _ = engine.generate_batch([prompt], max_tokens=256, temperature=0.0)
    reply = tok.decode([t for t in tokens[len(prompt):]]).split("<|python_start|>")[0].strip()
    assert reply and out.split("Assistant: ", 1)[1].startswith(reply), (reply, out[-500:])


@pytest.mark.parametrize("stage", ["mid", pytest.param("sft", marks=pytest.mark.slow)])  # (SFTBatches' state: test_chat_stages.py)
def test_rerun_then_resume_is_exact(smoke, tmp_path, stage):
    """A new run in a directory holding another run's checkpoints sets them and its log aside (<dir>.previous-1),
    and a resumed run from its step-4 checkpoint redoes steps 5..8 with the straight run's losses."""
    home = tmp_path / "home"
    shutil.copytree(smoke[0], home)
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
        [{"mid": "30", "sft": "20"}[stage], "config.toml", f"{stage}_train.json", f"{stage}_train.jsonl"])
    previous_log = (ckpt.parent / "d2.previous-1" / f"{stage}_train.jsonl").read_text().splitlines()
    assert [r["step"] for r in map(json.loads, previous_log) if "loss" in r] == list(range(1, STEPS[stage] + 1))
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


@pytest.mark.slow
def test_run_cpu_pipeline(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on a laptop
    env["NANOCHAT_JAX_HOME"] = str(tmp_path)
    proc = subprocess.run(["bash", str(ROOT / "run_cpu.sh")], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| Metric" in report and "WorldFacts" in report and "![base training loss]" in report
    base = json.loads((tmp_path / "report" / "base_train.json").read_text())
    assert base["val_bpb"] < 0.5  # measured 0.19; a unigram model of the corpus scores ~2.0
    rl = json.loads((tmp_path / "report" / "chat_eval_rl.json").read_text())
    assert rl["results"]["WorldFacts"] > 0.6 and rl["results"]["WordProblems"] > 0.6  # measured 0.92 / 0.95
    assert "Belmonte" in proc.stdout  # the RL model answers "What is the capital of Gorsica?"
