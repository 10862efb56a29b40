"""Nothing lost: base_train stopped by SIGTERM, or killed in the middle of a save, resumes bit-identical."""

import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
TINY = [
    "--config", str(ROOT / "configs" / "cpu_tiny.toml"), "--model.depth=1", "--model.aspect_ratio=32",
    "--model.head_dim=32", "--model.sequence_len=32", "--train.device_batch_size=4", "--train.total_batch_size=128",
    "--train.eval_tokens=512", "--train.sample_every=0", "--train.eval_every=0", "--train.log_every=1",
    "--mesh.data=1", f"--train.num_iterations={STEPS}", "--train.checkpoint_every=5", "--train.keep_checkpoints=3",
]


def start(home: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, NANOCHAT_JAX_HOME=str(home), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.Popen([sys.executable, "scripts/base_train.py", *TINY, *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"base_train failed:\n{out[-3000:]}\n{err[-3000:]}"
    return out, err


def run_dir(home: Path) -> Path:
    return home / "checkpoints" / "base" / "d1"


def params_hash(home: Path, step: int = STEPS) -> str:
    params = ocp.StandardCheckpointer().restore(run_dir(home) / str(step) / "params")
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        digest.update(jax.tree_util.keystr(path).encode() + np.asarray(leaf).tobytes())
    return digest.hexdigest()


def logged_steps(home: Path) -> list[int]:
    path = home / "report" / "base_train.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}") and '"loss"' in line]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A tokenizer and an uninterrupted 20-step depth-1 run (checkpoints 10, 15, 20 kept): (home, params hash)."""
    from nanochat_jax import corpus
    from nanochat_jax.tokenizer import Tokenizer

    home = tmp_path_factory.mktemp("home")
    Tokenizer.train_from_iterator(itertools.islice(corpus.documents("train"), 2000), vocab_size=300).save(
        home / "tokenizer")
    finish(start(home))
    assert sorted(p.name for p in run_dir(home).iterdir() if p.name.isdigit()) == ["10", "15", "20"]
    return home, params_hash(home)


def test_a_save_cut_short_and_a_corrupt_step_are_set_aside(straight, tmp_path):
    """Step 20's save cut short by a kill (Orbax's temporary directory left, half written) and step 15 corrupt:
    the resumed run says so in one line each, moves both to d1.broken/, continues from step 10, saves steps 15
    and 20 again under their own numbers and ends with the uninterrupted run's parameters."""
    home = tmp_path / "home"
    shutil.copytree(straight[0], home)
    ckpts = run_dir(home)
    (ckpts / "20").rename(ckpts / "20.orbax-checkpoint-tmp")
    for f in itertools.chain((ckpts / "20.orbax-checkpoint-tmp").rglob("*"), (ckpts / "15" / "params").rglob("*")):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    out, err = finish(start(home, "--train.resume=true"))
    lines = [line for line in err.splitlines() if line.startswith("resume: skipped")]
    assert len(lines) == 2, err[-3000:]
    assert lines[0] == (f"resume: skipped step 20: its save was cut short (Orbax never finished "
                        f"20.orbax-checkpoint-tmp); moved it to {ckpts}.broken/20.orbax-checkpoint-tmp")
    assert lines[1].startswith("resume: skipped step 15: it is incomplete or corrupt (")
    assert lines[1].endswith(f"); moved it to {ckpts}.broken/15")
    assert f"resumed from {ckpts}/10" in out
    assert sorted(p.name for p in Path(f"{ckpts}.broken").iterdir()) == ["15", "20.orbax-checkpoint-tmp"]
    assert logged_steps(home)[-10:] == list(range(11, 21))
    assert params_hash(home) == straight[1]


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_the_resumed_run_is_bit_identical(straight, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copytree(straight[0] / "tokenizer", home / "tokenizer")
    proc = start(home)
    deadline = time.time() + 300
    while not logged_steps(home) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = finish(proc)
    stopped = [line for line in out.splitlines() if line.startswith("SIGTERM: stopped at step")]
    assert len(stopped) == 1, out[-3000:]
    step = int(stopped[0].split()[4].rstrip(","))
    assert 0 < step < STEPS and str(step) in os.listdir(run_dir(home))
    assert stopped[0].endswith(f"; resume with: python scripts/base_train.py {' '.join(TINY)} --train.resume=true")
    out, _ = finish(start(home, "--train.resume=true"))
    assert f"resumed from {run_dir(home)}/{step}" in out
    assert params_hash(home) == straight[1]
