"""The README's main command end to end (slow: ~7 minutes on 2 cores): run_cpu.sh -> a chat model + report.md."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
