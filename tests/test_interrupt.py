"""Nothing lost: base_train (and mid, SFT, RL) stopped by SIGTERM, or killed by SIGKILL during a step or in the
middle of a save, resumes bit-identical: parameters, optimizer state, data position and the logged losses."""

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

from conftest import cpu_xla_flags

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
TINY = [
    "--config", str(ROOT / "configs" / "cpu_tiny.toml"), "--model.depth=1", "--model.aspect_ratio=32",
    "--model.head_dim=32", "--model.sequence_len=32", "--train.device_batch_size=4", "--train.total_batch_size=128",
    "--train.eval_tokens=512", "--train.sample_every=0", "--train.eval_every=0", "--train.log_every=1",
    "--mesh.data=1", f"--train.num_iterations={STEPS}", "--train.checkpoint_every=5", "--train.keep_checkpoints=3",
]
STAGES = {  # stage: (script, its settings), mid and SFT on the cpu mixtures, each from the stage before
    "base": ("scripts/base_train.py", []),
    "mid": ("scripts/mid_train.py", ["--mid.mixture=cpu", "--mid.device_batch_size=4", "--mid.total_batch_size=128",
                                     "--mid.eval_tokens=512", f"--mid.num_iterations={STEPS}", "--mid.eval_every=0"]),
    "sft": ("scripts/chat_sft.py", ["--sft.mixture=cpu", "--sft.device_batch_size=4",
                                    "--sft.target_examples_per_step=4", "--sft.eval_steps=1", f"--sft.num_iterations={STEPS}", "--sft.eval_every=0",
                                    "--sft.eval_metrics_every=0"]),
    # RL from the mid run, on a reward the tiny model earns (see the script); it evaluates pass@k at 10 and 20
    "rl": ("tests/rl_dense_reward.py", ["--rl.source=mid", "--rl.task=cpu", "--rl.num_samples=4",
                                        "--rl.examples_per_step=2", "--rl.max_new_tokens=16", "--rl.device_batch_size=4",
                                        f"--rl.num_iterations={STEPS}", "--rl.eval_examples=2", "--rl.eval_every=10",
                                        "--rl.save_every=5"]),
}


def start(home: Path, *args: str, devices: int = 1, stage: str = "base", **env: str) -> subprocess.Popen:
    env = dict(os.environ, NANOCHAT_JAX_HOME=str(home), JAX_PLATFORMS="cpu",
               XLA_FLAGS=cpu_xla_flags(devices), **env)
    script, settings = STAGES[stage]
    return subprocess.Popen([sys.executable, script, *TINY, *settings, *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> tuple[str, str] | None:
    """SIGKILL `proc` as soon as ready() holds (polled every millisecond): its (stdout, stderr); None when it
    finished first."""
    deadline = time.time() + timeout
    while proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            output = proc.communicate()
            assert proc.returncode == -signal.SIGKILL
            return output
        assert time.time() < deadline, "the run neither finished nor became ready to kill"
        time.sleep(0.001)
    return None


def saving(home: Path, step: int | None = None, stage: str = "base") -> bool:
    """Whether a save (of `step`, default any) is under way: Orbax's temporary directory exists."""
    return any(run_dir(home, stage).glob(f"{step if step is not None else '*'}.orbax-checkpoint-tmp*"))


def finish(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"base_train failed:\n{out[-3000:]}\n{err[-3000:]}"
    return out, err


def run_dir(home: Path, stage: str = "base", depth: int = 1) -> Path:
    root = Path(os.environ.get("NANOCHAT_JAX_CHECKPOINTS", home / "checkpoints"))  # (set by small_disk)
    return root / stage / f"d{depth}"


def state_hash(home: Path, step: int = STEPS, stage: str = "base", depth: int = 1) -> str:
    """sha256 of checkpoint `step`'s parameters, optimizer state and data position (restored onto one device,
    whatever devices and processes saved them)."""
    digest, ckptr = hashlib.sha256(), ocp.StandardCheckpointer()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for item in ("params", "opt_state"):
        path = run_dir(home, stage, depth) / str(step) / item
        tree = ckptr.restore(path, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
                                                ckptr.metadata(path).item_metadata))
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            digest.update(item.encode() + jax.tree_util.keystr(path).encode() + np.asarray(leaf).tobytes())
    digest.update((run_dir(home, stage, depth) / str(step) / "data" / "metadata").read_bytes())
    return digest.hexdigest()


def logged_steps(home: Path, stage: str = "base") -> list[int]:
    path = home / "report" / f"{stage}_train.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}") and '"loss"' in line]


def logged(home: Path, stage: str = "base") -> list[dict]:
    """The metrics file's records without their timings: every loss, smoothed loss, gradient norm, lr multiplier
    and evaluation, in order."""
    timings = ("tokens_per_sec", "mfu", "elapsed_s", "rollout_s", "train_s")
    records = (json.loads(line) for line in (home / "report" / f"{stage}_train.jsonl").read_text().splitlines())
    return [{k: v for k, v in r.items() if k not in timings} for r in records]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A tokenizer and an uninterrupted 20-step depth-1 run (checkpoints 10, 15, 20 kept): (home, state hash of
    step 20, logged records)."""
    from nanochat_jax import corpus
    from nanochat_jax.tokenizer import Tokenizer

    home = tmp_path_factory.mktemp("home")
    Tokenizer.train_from_iterator(itertools.islice(corpus.documents("train"), 2000), vocab_size=300).save(
        home / "tokenizer")
    finish(start(home))
    assert sorted(p.name for p in run_dir(home).iterdir() if p.name.isdigit()) == ["10", "15", "20"]
    return home, state_hash(home), logged(home)


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
    assert state_hash(home) == straight[1]


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
    assert state_hash(home) == straight[1]


def fresh_home(straight, tmp_path, name: str = "home") -> Path:
    home = tmp_path / name
    home.mkdir()
    shutil.copytree(straight[0] / "tokenizer", home / "tokenizer")
    return home


def complete_steps(home: Path, stage: str = "base", depth: int = 1) -> list[int]:
    return sorted(int(p.name) for p in run_dir(home, stage, depth).glob("*") if p.name.isdigit())


def test_sigkill_during_a_save_then_resume_is_bit_identical(straight, tmp_path):
    """SIGKILL while step 10's save is being written (its Orbax temporary directory exists): the resumed run
    sets the cut-short save aside, continues from step 5 and ends with the uninterrupted run's parameters,
    optimizer state, data position and logged records, bit for bit."""
    home = fresh_home(straight, tmp_path)
    assert kill_when(start(home), lambda: saving(home, 10))
    assert saving(home, 10) and complete_steps(home) == [5]
    out, err = finish(start(home, "--train.resume=true"))
    assert (f"resume: skipped step 10: its save was cut short (Orbax never finished 10.orbax-checkpoint-tmp); "
            f"moved it to {run_dir(home)}.broken/10.orbax-checkpoint-tmp") in err.splitlines()
    assert f"resumed from {run_dir(home)}/5" in out
    assert state_hash(home) == straight[1]
    assert logged(home) == straight[2]


EVALS = ("--train.eval_every=10", "--train.core_every=10", f"--eval.bundle_dir={ROOT / 'tests' / 'fixtures' / 'core'}",
         "--train.core_max_per_task=6")  # val bpb at 0, 10, 20; a CORE estimate on the fixture bundle at 10, 20


def evaluated(home: Path, step: int, key: str) -> bool:
    """Whether the metrics file holds a complete `key` record (val_bpb, core_metric) of `step`."""
    path = home / "report" / "base_train.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return any(key in r and r["step"] == step for r in (json.loads(x) for x in lines if x.endswith("}")))


@pytest.mark.slow
def test_sigkill_during_an_evaluation_then_resume_is_bit_identical(straight, tmp_path):
    """Killed while step 10's CORE estimate runs (its val bpb logged, the CORE record not yet), resumed, killed
    again right after that CORE record with step 10's checkpoint complete, resumed to the end: the uninterrupted
    run's parameters, optimizer state, data position and records (every val bpb and CORE point once, in order)."""
    ref = fresh_home(straight, tmp_path, "reference")
    finish(start(ref, *EVALS))
    assert [r["step"] for r in logged(ref) if "core_metric" in r] == [10, 20]
    home = fresh_home(straight, tmp_path)
    assert kill_when(start(home, *EVALS), lambda: evaluated(home, 10, "val_bpb") and 10 in complete_steps(home))
    assert not evaluated(home, 10, "core_metric")
    assert kill_when(start(home, *EVALS, "--train.resume=true"),
                     lambda: evaluated(home, 10, "core_metric") and 10 in complete_steps(home))
    out, _ = finish(start(home, *EVALS, "--train.resume=true"))
    assert f"resumed from {run_dir(home)}/10" in out
    assert state_hash(home) == state_hash(ref)
    assert logged(home) == logged(ref)


def kill_and_resume(home: Path, kills: int, seed: int, *args: str, devices: int = 1, stage: str = "base") -> dict:
    """Up to `kills` SIGKILLs, each at a random moment 0 to 0.4 s after the run (or the resumed run) logged a
    step past its start with a complete checkpoint there, each followed by a resume, then one to the end.
    Returns {"hit": what each kill hit ('save' when a save's temporary directory was left, else 'step'),
    "resumes": how many runs resumed, "skipped": the "resume: skipped ..." lines}."""
    rng = np.random.default_rng(seed)
    hit, resumes, skipped = [], 0, []
    while True:
        resume = ("--train.resume=true",) if hit else ()
        resumes += bool(resume)
        launched = time.time()
        proc = start(home, *args, *resume, devices=devices, stage=stage)
        if len(hit) == kills:
            output = finish(proc)
            break
        before, delay, since = (complete_steps(home, stage) or [0])[-1], rng.uniform(0, 0.4), []

        def ready() -> bool:  # (the records of a killed run's last steps stay until the run rewrites the file)
            log = home / "report" / f"{stage}_train.jsonl"
            fresh = log.exists() and log.stat().st_mtime > launched
            past = max(logged_steps(home, stage), default=0) > before
            if not since and fresh and past and complete_steps(home, stage):
                since.append(time.time())
            return bool(since) and time.time() >= since[0] + delay

        if (output := kill_when(proc, ready)) is None:
            output = finish(proc)
            break
        hit.append("save" if saving(home, stage=stage) else "step")
        skipped += [line for line in output[1].splitlines() if line.startswith("resume: skipped")]
    skipped += [line for line in output[1].splitlines() if line.startswith("resume: skipped")]
    return {"hit": hit, "resumes": resumes, "skipped": skipped}


@pytest.mark.slow
def test_repeated_sigkills_at_random_moments_resume_bit_identical(straight, tmp_path):
    home = fresh_home(straight, tmp_path)
    campaign = kill_and_resume(home, 4, seed=0)
    assert len(campaign["hit"]) >= 2, campaign
    assert state_hash(home) == straight[1]
    assert logged(home) == straight[2]


@pytest.mark.slow
def test_sigkill_and_resume_on_the_8_device_mesh_is_bit_identical(straight, tmp_path):
    """Eight simulated devices, the parameters sharded (fsdp=8): killed and resumed, the same run as there."""
    mesh = ("--mesh.fsdp=8", "--train.device_batch_size=1", "--train.total_batch_size=256")
    ref = fresh_home(straight, tmp_path, "reference")
    finish(start(ref, *mesh, devices=8))
    home = fresh_home(straight, tmp_path)
    campaign = kill_and_resume(home, 2, 1, *mesh, devices=8)
    assert campaign["hit"], "the run finished before a kill"
    assert state_hash(home) == state_hash(ref)
    assert logged(home) == logged(ref)


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A 600 KiB tmpfs as the checkpoint root (room for one checkpoint of the tiny run, not two); skipped where
    mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    monkeypatch.setenv("NANOCHAT_JAX_CHECKPOINTS", str(disk))
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_stops_the_run_in_one_line_and_the_previous_checkpoint_resumes(straight, tmp_path, small_disk):
    """Step 10's save runs out of space: exit 1 with one line naming the directory, the space a checkpoint needs
    and the space free; step 5 is intact: with more room the run resumes from it to the uninterrupted result."""
    home = fresh_home(straight, tmp_path)
    proc = start(home)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    line = err.strip().splitlines()[-1]
    step5 = sum(f.stat().st_size for f in (run_dir(home) / "5").rglob("*") if f.is_file())
    assert line.startswith(f"base_train: no space left on the disk of {run_dir(home)} for a checkpoint: it needs "
                           f"about {step5 / 2**20:.1f} MiB free there, 0.")
    assert line.endswith("MiB are free; free some space (or set NANOCHAT_JAX_CHECKPOINTS to a larger disk); step 5 "
                         "is intact: resume from it with --train.resume=true"), line
    assert complete_steps(home) == [5] and saving(home, 10)
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    out, err = finish(start(home, "--train.resume=true"))
    assert f"resumed from {run_dir(home)}/5" in out
    assert state_hash(home) == straight[1]
    assert logged(home) == straight[2]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["mid", "sft", "rl"])
def test_sigkills_in_mid_sft_and_rl_resume_bit_identical(straight, tmp_path, stage):
    """Mid training from the straight run's base checkpoint (SFT and RL from such a mid run's), killed at random
    moments and resumed: the same run as without the kills (RL: the same rollouts, rewards, pass@k evaluations
    and updates, which depend only on the step number and the seed)."""
    ref, home = tmp_path / "reference", tmp_path / "home"
    shutil.copytree(straight[0], ref)
    if stage in ("sft", "rl"):
        finish(start(ref, stage="mid"))
    shutil.copytree(ref, home)
    finish(start(ref, stage=stage))
    assert sum(r.get("grad_norm", 0) > 0 for r in logged(ref, stage)) >= STEPS // 2  # (RL: rewards, updates)
    campaign = kill_and_resume(home, 3 if stage == "rl" else 2, 2, stage=stage)
    assert campaign["hit"], "the run finished before a kill"
    assert state_hash(home, stage=stage) == state_hash(ref, stage=stage)
    assert logged(home, stage) == logged(ref, stage)
