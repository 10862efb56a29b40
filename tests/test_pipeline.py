"""End to end through the real scripts, each in a fresh process: tokenizer -> base_train -> resume -> base_loss."""

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
TINY = [
    "--config", str(ROOT / "configs" / "cpu_tiny.toml"),
    "--model.depth=2", "--model.aspect_ratio=32", "--model.head_dim=32", "--model.sequence_len=64",
    "--train.device_batch_size=8", "--train.total_batch_size=1024", "--train.eval_tokens=4096",
    "--train.sample_every=0", "--mesh.data=1",
]


def run(script: str, *args: str, home: Path, devices: int = 1, fails: bool = False) -> str:
    """The script's stdout; with fails=True it must exit non-zero, and its stderr is returned."""
    env = dict(os.environ, NANOCHAT_JAX_HOME=str(home), JAX_PLATFORMS="cpu",
               XLA_FLAGS=cpu_xla_flags(devices))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if fails:
        assert proc.returncode != 0, f"{script} did not fail:\n{proc.stdout[-3000:]}"
        return proc.stderr
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def losses(home: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (home / "report" / "base_train.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tokenizer and a 60-step base model on the embedded corpus, checkpointed every 30 steps."""
    home = tmp_path_factory.mktemp("home")
    run("tok_train.py", "--config", str(ROOT / "configs" / "cpu_tiny.toml"), "--tokenizer.vocab_size=512", home=home)
    run("base_train.py", *TINY, "--train.num_iterations=60", "--train.eval_every=30",
        "--train.checkpoint_every=30", *CORE, "--train.core_every=30", home=home)
    return home


CORE = ["--eval.bundle_dir", str(ROOT / "tests" / "fixtures" / "core"), "--train.core_max_per_task=6"]


def test_base_train_estimates_core_like_base_eval(trained):
    """nanochat's in-training CORE estimate (at most core_max_per_task items per task) at steps 30 and 60; at the
    last step it is base_eval's CORE of the final checkpoint on the same items."""
    records = [json.loads(line) for line in (trained / "report" / "base_train.jsonl").read_text().splitlines()]
    estimates = {r["step"]: r["core_metric"] for r in records if "core_metric" in r}
    summary = json.loads((trained / "report" / "base_train.json").read_text())
    assert sorted(estimates) == [30, 60] and summary["core_metric_estimate"] == estimates[60]
    run("base_eval.py", *TINY, "--max-per-task=6", "--bundle-dir", CORE[1], home=trained)
    assert json.loads((trained / "report" / "base_eval.json").read_text())["core_metric"] == \
        pytest.approx(estimates[60], abs=1e-9)


def test_base_train_learns_the_corpus(trained):
    from nanochat_jax import corpus
    from nanochat_jax.tokenizer import Tokenizer, token_bytes
    from test_evaluation import unigram_bpb

    summary = json.loads((trained / "report" / "base_train.json").read_text())
    tok = Tokenizer.load(trained / "tokenizer")
    tb = token_bytes(tok)
    train_ids = np.concatenate([tok.encode(d) for d in corpus.documents("train")][:2000])
    val_ids = np.concatenate([tok.encode(d) for d in corpus.documents("val")])
    baseline = unigram_bpb(val_ids, tb, train_ids)
    # measured: unigram baseline ~2.0 bpb; the 60-step d2 model reaches ~1.0
    assert baseline > 1.8
    assert summary["val_bpb"] < 0.7 * baseline, (summary["val_bpb"], baseline)
    steps = losses(trained)
    assert steps[60] < steps[1] - 2.0
    assert summary["steps"] == 60 and summary["params"] > 0 and summary["tokens"] == 60 * 1024


def test_resume_is_exact(trained, tmp_path):
    """Straight run's steps 31..60 == restore step 30 in a fresh process and run 30 more."""
    home = tmp_path / "home"
    shutil.copytree(trained, home)
    straight = losses(home)
    shutil.rmtree(home / "checkpoints" / "base" / "d2" / "60")
    run("base_train.py", *TINY, "--train.num_iterations=60", "--train.eval_every=30",
        "--train.checkpoint_every=30", "--train.resume=true", home=home)
    lines = [json.loads(x) for x in (home / "report" / "base_train.jsonl").read_text().splitlines()]
    resumed = {r["step"]: r["loss"] for r in lines if "loss" in r and r["step"] > 30}
    assert sorted(resumed) == list(range(31, 61))
    for step, loss in resumed.items():
        assert loss == pytest.approx(straight[step], rel=1e-6), step


def test_resume_refuses_another_architecture_or_data_seed(trained):
    """head_dim=16 keeps every parameter's shape (so the restore itself would succeed) and another seed would
    index a different shuffled order with the saved position: both are refused, and nothing is touched."""
    before = sorted(p.name for p in (trained / "checkpoints" / "base" / "d2").iterdir())
    common = [*TINY, "--train.num_iterations=60", "--train.resume=true"]
    err = run("base_train.py", *common, "--model.head_dim=16", home=trained, fails=True)
    assert "model.head_dim: checkpoint 32, this run 16" in err
    err = run("base_train.py", *common, "--train.seed=7", home=trained, fails=True)
    assert "train.seed: checkpoint 0, this run 7" in err
    assert sorted(p.name for p in (trained / "checkpoints" / "base" / "d2").iterdir()) == before


def test_base_loss_reads_the_checkpoint(trained):
    out = run("base_loss.py", *TINY, home=trained)
    result = json.loads((trained / "report" / "base_loss.json").read_text())
    summary = json.loads((trained / "report" / "base_train.json").read_text())
    assert result["step"] == 60
    assert result["val_bpb"] == pytest.approx(summary["val_bpb"], rel=1e-4)
    assert result["train_bpb"] < 2.0 and len(result["samples"]) == 4
    assert "val bpb" in out


def test_resume_from_a_checkpoint_of_another_process_count(trained, tmp_path):
    """A checkpoint written by 2 processes resumes on 1: weights and optimizer restored, the data order restarts."""
    home = tmp_path / "home"
    shutil.copytree(trained, home)
    shutil.rmtree(home / "checkpoints" / "base" / "d2" / "60")
    data_item = home / "checkpoints" / "base" / "d2" / "30" / "data" / "metadata"
    state = json.loads(data_item.read_text())["states"][0]
    data_item.write_text(json.dumps({"process_count": 2, "states": [state, state]}))
    run("base_train.py", *TINY, "--train.num_iterations=32", "--train.eval_every=30",
        "--train.checkpoint_every=30", "--train.resume=true", home=home)
    lines = [json.loads(x) for x in (home / "report" / "base_train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r][-2:] == [31, 32]


def test_resume_after_the_tokenizer_was_retrained_is_refused(trained, tmp_path):
    """Same vocabulary size, other merges (trained on less text): the checkpoint's tokenizer fingerprint differs,
    so resuming (which would feed the model other token ids) stops with a message naming the tokenizer."""
    home = tmp_path / "home"
    shutil.copytree(trained, home)
    run("tok_train.py", "--config", str(ROOT / "configs" / "cpu_tiny.toml"), "--tokenizer.vocab_size=512",
        "--tokenizer.max_chars=200000", home=home)
    env = dict(os.environ, NANOCHAT_JAX_HOME=str(home), JAX_PLATFORMS="cpu",
               XLA_FLAGS=cpu_xla_flags(1))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "base_train.py"), *TINY, "--train.num_iterations=60",
                           "--train.resume=true"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "tokenizer" in proc.stderr and "retrained or replaced since" in proc.stderr, \
        proc.stderr[-2000:]


def test_resume_past_the_horizon_is_a_clear_error(trained, tmp_path):
    """The latest checkpoint (60) is beyond --train.num_iterations=30: stop before touching the report."""
    home = tmp_path / "home"
    shutil.copytree(trained, home)
    summary = (home / "report" / "base_train.json").read_text()
    env = dict(os.environ, NANOCHAT_JAX_HOME=str(home), JAX_PLATFORMS="cpu",
               XLA_FLAGS=cpu_xla_flags(1))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "base_train.py"), *TINY, "--train.num_iterations=30",
                           "--train.resume=true"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "step 60" in proc.stderr and "num_iterations=30" in proc.stderr, proc.stderr[-2000:]
    assert (home / "report" / "base_train.json").read_text() == summary


def test_the_speedrun_data_path_on_local_fineweb_shards(tmp_path):
    """run_gpu.sh / run_tpu.sh read FineWeb shards (data.source=fineweb): tokenizer training, base training and
    base_loss on shards already in the home (named like the real ones, so nothing is downloaded)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nanochat_jax import corpus, data

    home = tmp_path / "home"
    shards = home / "data" / "fineweb"
    shards.mkdir(parents=True)
    docs = list(corpus.documents("train"))
    last = data.SHARD_SETS["fineweb"].max_shard
    for i, name in enumerate([data.shard_name(0), data.shard_name(1), data.shard_name(last)]):
        part = docs[i::3] if i < 2 else list(corpus.documents("val"))
        pq.write_table(pa.table({"text": part}), shards / name, row_group_size=64)
    fineweb = ["--data.source=fineweb", "--data.num_shards=3"]
    run("tok_train.py", "--config", str(ROOT / "configs" / "cpu_tiny.toml"), "--tokenizer.vocab_size=512",
        "--tokenizer.max_chars=3000000", *fineweb, home=home)
    assert json.loads((home / "report" / "tokenizer.json").read_text())["train"]["train_chars"] > 1_000_000
    run("base_train.py", *TINY, *fineweb, "--train.num_iterations=4", "--train.eval_every=4", home=home)
    run("base_loss.py", *TINY, *fineweb, home=home)
    result = json.loads((home / "report" / "base_loss.json").read_text())
    summary = json.loads((home / "report" / "base_train.json").read_text())
    assert result["step"] == 4 and result["val_bpb"] == pytest.approx(summary["val_bpb"], rel=1e-4)  # shard_01822


def test_fp8_base_training_through_the_script(trained, tmp_path):
    """--train.fp8=true from the command line: the step's 13 linear layers in fp8 (emulated on CPU), said in the log
    and recorded in the summary; it learns as the compute-dtype run does (the evaluations stay in that dtype)."""
    home = tmp_path / "home"
    shutil.copytree(trained / "tokenizer", home / "tokenizer")
    wide = [*TINY, "--model.aspect_ratio=64", "--model.head_dim=64", "--train.num_iterations=20",
            "--train.eval_every=0"]
    out = run("base_train.py", *wide, "--train.fp8=true", home=home)
    assert "fp8 training: 13 of 13 linear layers" in out
    fp8 = json.loads((home / "report" / "base_train.json").read_text())
    run("base_train.py", *wide, home=home)
    plain = json.loads((home / "report" / "base_train.json").read_text())
    assert fp8["fp8_layers"] == 13 and "fp8_layers" not in plain
    assert fp8["val_bpb"] == pytest.approx(plain["val_bpb"], rel=0.03), (fp8["val_bpb"], plain["val_bpb"])
