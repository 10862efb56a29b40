"""The README's main command end to end: run_cpu.sh -> a chat model + report.md. The full run is slow (~8 minutes on
2 cores); CI runs the same script on a tiny model and a few steps of every stage (the whole-pipeline smoke test)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


TINY = ["--model.depth=2", "--model.aspect_ratio=32", "--model.head_dim=32", "--model.sequence_len=64",
        "--train.num_iterations=4", "--train.eval_every=4", "--train.eval_tokens=2048", "--train.checkpoint_every=0",
        "--mid.num_iterations=2", "--mid.eval_every=2", "--mid.eval_tokens=1024",
        "--sft.num_iterations=2", "--sft.eval_every=2", "--sft.eval_steps=1",
        "--rl.num_iterations=1", "--rl.examples_per_step=2", "--rl.num_samples=2", "--rl.device_batch_size=2",
        "--rl.max_new_tokens=16", "--rl.eval_examples=2"]


def test_run_cpu_smoke(tmp_path):
    """Every stage of run_cpu.sh, in order, through the real scripts: each one's outputs are the next one's inputs,
    and the report gathers all of them."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(NANOCHAT_JAX_HOME=str(tmp_path), EVAL_PROBLEMS="4", EVAL_TOKENS="32")
    proc = subprocess.run(["bash", str(ROOT / "run_cpu.sh"), *TINY], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [line for line in proc.stdout.splitlines() if line.startswith("=== ")][-1] == "=== 9/9 report ==="
    for stage, steps in (("base", 4), ("mid", 2), ("sft", 2), ("rl", 1)):
        summary = json.loads((tmp_path / "report" / f"{stage}_train.json").read_text())
        assert summary["steps"] == steps and summary["checkpoint"].endswith(f"/{stage}/d2/{steps}"), stage
    rl = json.loads((tmp_path / "report" / "rl_train.json").read_text())
    assert rl["source"] == "sft" and rl["source_step"] == 2  # each stage started from the one before
    for source in ("mid", "sft", "rl"):
        results = json.loads((tmp_path / "report" / f"chat_eval_{source}.json").read_text())["results"]
        assert sorted(results) == ["SpellingBee", "WordProblems", "WorldFacts"]
        assert all(v in (0.0, 0.25, 0.5, 0.75, 1.0) for v in results.values())  # 4 problems each
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| Metric" in report and "![rl mean reward](rl_reward.png)" in report
    assert "Assistant: " in proc.stdout  # chat_cli answered from the RL checkpoint


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
