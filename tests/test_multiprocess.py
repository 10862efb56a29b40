"""Real multi-process runs: two JAX processes on this machine (jax.distributed over localhost, CPU devices,
gloo collectives) stand in for two hosts of a GPU cluster or TPU pod. The train step over both processes'
devices equals one process holding all of them, and base_train runs, checkpoints and resumes exactly with
two processes writing one checkpoint."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cpu_xla_flags

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def spawn(argv: list[str], processes: int, devices_per_process: int, home: Path | None = None,
          **env_vars: str) -> list[subprocess.Popen]:
    """Start `python argv` as `processes` cooperating JAX processes (or one plain process), stderr in stdout."""
    port = free_port()
    procs = []
    for pid in range(processes):
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=cpu_xla_flags(devices_per_process), **env_vars)
        for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "NANOCHAT_JAX_DISTRIBUTED"):
            env.pop(var, None)
        if processes > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes),
                       JAX_PROCESS_ID=str(pid))
        if home is not None:
            env["NANOCHAT_JAX_HOME"] = str(home)
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def launch(argv: list[str], processes: int, devices_per_process: int, home: Path | None = None) -> list[str]:
    """Run `python argv` as `processes` cooperating JAX processes (or one plain process); their stdouts."""
    procs = spawn(argv, processes, devices_per_process, home)
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out)
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} of {processes} failed:\n{out[-4000:]}"
    return outputs


def result(output: str) -> dict:
    return json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])


@pytest.mark.parametrize("data,fsdp", [pytest.param(4, 1, marks=pytest.mark.slow), (2, 2)])  # 2 x 2: both axes
def test_two_processes_equal_one(data, fsdp):
    worker = [str(ROOT / "tests" / "multiprocess_worker.py"), str(data), str(fsdp), "3"]
    two = result(launch(worker, processes=2, devices_per_process=2)[0])
    one = result(launch(worker, processes=1, devices_per_process=4)[0])
    assert (two["processes"], two["devices"], one["processes"], one["devices"]) == (2, 4, 1, 4)
    assert two["local_rows"] == [0, 1, 2, 3] and one["local_rows"] == list(range(8))
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert two["losses"][-1] < two["losses"][0]
    assert two["param_sq"].keys() == one["param_sq"].keys()
    for name, value in one["param_sq"].items():
        assert two["param_sq"][name] == pytest.approx(value, rel=1e-5), name


def test_a_mesh_that_does_not_split_the_rows_over_the_processes_is_refused(tmp_path):
    """Tensor parallelism across the two processes, the batch not split: each process's rows stood for the same
    rows (the batch halved, its copies disagreeing) and the losses differed from one process's, without an error."""
    worker = [str(ROOT / "tests" / "multiprocess_worker.py"), "1", "1", "1", "4"]
    procs = spawn(worker, processes=2, devices_per_process=2)
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [1, 1]
    for out in outputs:
        assert ("ConfigError: mesh {'data': 1, 'fsdp': 1, 'tensor': 4}: each of the 2 processes feeds its own rows "
                "of the batch, so the batch axes (data x fsdp = 1) must split the rows over the processes") in out
    # base_loss's evaluation batches are fed the same way: refused at start, in one line
    procs = spawn([str(ROOT / "scripts" / "base_loss.py"), "--config", str(ROOT / "configs" / "cpu_tiny.toml"),
                   "--mesh.data=1", "--mesh.tensor=4"], processes=2, devices_per_process=2, home=tmp_path)
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [1, 1]
    for out in outputs:
        assert out.strip().splitlines()[-1].startswith("base_loss: mesh {'data': 1, 'fsdp': 1, 'tensor': 4}: each of")


MODEL_AND_MESH = ["--config", str(ROOT / "configs" / "cpu_tiny.toml"), "--model.depth=2", "--model.aspect_ratio=32",
                  "--model.head_dim=32", "--model.sequence_len=64", "--mesh.data=2", "--mesh.fsdp=2"]
TINY = [*MODEL_AND_MESH, "--train.device_batch_size=2", "--train.total_batch_size=512", "--train.eval_tokens=2048",
        "--train.sample_every=0", "--train.num_iterations=8", "--train.eval_every=4", "--train.checkpoint_every=4"]


def base_losses(home: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (home / "report" / "base_train.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


@pytest.fixture(scope="module")
def two_process_base(tmp_path_factory):
    """A tokenizer, then base_train over two processes (2 x 2 devices, data 2 x fsdp 2), checkpoints at 4 and 8."""
    home = tmp_path_factory.mktemp("home")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "tok_train.py"), "--config",
                    str(ROOT / "configs" / "cpu_tiny.toml"), "--tokenizer.vocab_size=512",
                    "--tokenizer.max_chars=2000000"], env=dict(os.environ, NANOCHAT_JAX_HOME=str(home)),
                   cwd=ROOT, check=True, capture_output=True)
    outputs = launch([str(ROOT / "scripts" / "base_train.py"), *TINY], processes=2, devices_per_process=2, home=home)
    return home, outputs


def test_two_process_base_train_checkpoints_and_resumes_exactly(two_process_base, tmp_path):
    import shutil

    home = tmp_path / "home"
    shutil.copytree(two_process_base[0], home)
    outputs = two_process_base[1]
    assert "devices: 4 x cpu" in outputs[0] and "devices:" not in outputs[1]  # print0: process 0 alone logs
    straight = base_losses(home)
    assert sorted(straight) == list(range(1, 9)) and straight[8] < straight[1]
    ckpt = home / "checkpoints" / "base" / "d2"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["4", "8"]

    # drop the final checkpoint, resume from step 4 with two fresh processes: steps 5..8 are redone exactly
    shutil.rmtree(ckpt / "8")
    launch([str(ROOT / "scripts" / "base_train.py"), *TINY, "--train.resume=true"], processes=2,
           devices_per_process=2, home=home)
    resumed = base_losses(home)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6), step


@pytest.mark.slow
def test_two_process_base_train_killed_resumes_bit_identical(two_process_base, tmp_path):
    """Process 1 SIGKILLed after step 5 (checkpoint 4 complete): process 0 does not hang in the step's collective,
    it ends once process 1 misses its heartbeats (10 s here) with JAX's line that another process died. Resumed by
    two processes, both killed at once after step 6, resumed again: the uninterrupted two-process run's parameters,
    optimizer state, data position and records, bit for bit."""
    import shutil
    import time

    from test_interrupt import complete_steps, kill_when, logged, logged_steps, state_hash

    home = tmp_path / "home"
    home.mkdir()
    shutil.copytree(two_process_base[0] / "tokenizer", home / "tokenizer")
    argv, resume = [str(ROOT / "scripts" / "base_train.py"), *TINY], ["--train.resume=true"]
    procs = spawn(argv, 2, 2, home, NANOCHAT_JAX_HEARTBEAT_TIMEOUT="10")
    assert kill_when(procs[1], lambda: max(logged_steps(home), default=0) >= 5 and 4 in complete_steps(home, depth=2))
    killed = time.time()
    out, _ = procs[0].communicate(timeout=120)
    assert procs[0].returncode != 0 and time.time() - killed < 60
    assert "This most likely indicates that another task died" in out, out[-3000:]

    procs = spawn(argv + resume, 2, 2, home)
    assert kill_when(procs[0], lambda: max(logged_steps(home), default=0) >= 6)  # (the resume dropped step 5's)
    procs[1].kill()
    procs[1].communicate()
    outputs = launch(argv + resume, 2, 2, home)
    assert f"resumed from {home}/checkpoints/base/d2/4" in outputs[0]
    assert state_hash(home, 8, depth=2) == state_hash(two_process_base[0], 8, depth=2)
    assert logged(home) == logged(two_process_base[0])


@pytest.mark.slow  # ~95 s: CI runs the same stages in one process (test_run_cpu.py, test_rl)
def test_two_process_chat_stages(two_process_base, tmp_path):
    """mid -> SFT (its sampled metrics on per-process meshes) -> chat_eval -> RL -> chat_eval, two processes each;
    problems are split between the processes and their counts summed."""
    import shutil

    home = tmp_path / "home"
    shutil.copytree(two_process_base[0], home)
    tasks = tmp_path / "tasks"  # categorical tasks from the fixtures, 3 questions each
    tasks.mkdir()
    shutil.copy(ROOT / "tests" / "fixtures" / "tasks" / "arc.jsonl", tasks / "ARC-Easy.jsonl")
    shutil.copy(ROOT / "tests" / "fixtures" / "tasks" / "mmlu.jsonl", tasks / "MMLU.jsonl")
    stages = [
        ("mid_train.py", "--mid.mixture=cpu", "--mid.device_batch_size=2", "--mid.total_batch_size=512",
         "--mid.eval_tokens=2048", "--mid.num_iterations=4", "--mid.eval_every=2"),
        ("chat_sft.py", "--sft.mixture=cpu", "--sft.device_batch_size=2", "--sft.target_examples_per_step=8",
         "--sft.eval_steps=2", "--sft.num_iterations=2", "--sft.eval_every=2"),
        ("chat_eval.py", "-i", "sft", "-a", "WorldFacts|WordProblems|ARC-Easy|MMLU", "-x", "5", "-m", "16",
         "--data-dir", str(tasks)),
        ("chat_rl.py", "--rl.task=cpu", "--rl.num_samples=2", "--rl.examples_per_step=2", "--rl.max_new_tokens=16",
         "--rl.num_iterations=2", "--rl.device_batch_size=1", "--rl.eval_examples=4", "--rl.eval_every=2"),
    ]
    for script, *args in stages:
        launch([str(ROOT / "scripts" / script), *MODEL_AND_MESH, *args], processes=2, devices_per_process=2, home=home)
    report = home / "report"
    sft = json.loads((report / "sft_train.json").read_text())
    assert sft["steps"] == 2 and 0 <= sft["WorldFacts_acc"] <= 1
    evals = json.loads((report / "chat_eval_sft.json").read_text())
    assert evals["counts"]["WorldFacts"][1] == 5 and evals["counts"]["WordProblems"][1] == 5  # 3 + 2 problems
    assert evals["counts"]["ARC-Easy"][1] == 3 and evals["counts"]["MMLU"][1] == 3
    rl = json.loads((report / "rl_train.json").read_text())
    assert rl["steps"] == 2 and isinstance(rl["reward_first_step"], float) and 0 <= rl["pass@1"] <= 1
    assert sorted(p.name for p in (home / "checkpoints" / "rl" / "d2").iterdir() if p.name.isdigit()) == ["2"]


@pytest.mark.slow  # ~40 s: CI runs master's SFT in one process (test_run_cpu.py) and its packing per process
def test_two_process_master_sft_from_base(two_process_base, tmp_path):
    """sft.recipe = "master" over two processes: each packs its own conversations best fit into its rows, the
    optimizer moments come from the base checkpoint sharded over both, and the run checkpoints and reports."""
    import shutil

    home = tmp_path / "home"
    shutil.copytree(two_process_base[0], home)
    outputs = launch([str(ROOT / "scripts" / "chat_sft.py"), *MODEL_AND_MESH, "--sft.recipe=master",
                      "--sft.source=base", "--sft.mixture=cpu", "--sft.device_batch_size=2",
                      "--sft.total_batch_size=512", "--sft.num_iterations=3", "--sft.eval_steps=2",
                      "--sft.eval_every=3"], processes=2, devices_per_process=2, home=home)
    assert "moment arrays from the base checkpoint, step 8" in outputs[0]
    sft = json.loads((home / "report" / "sft_train.json").read_text())
    assert sft["recipe"] == "master" and sft["steps"] == 3 and sft["val_loss"] < 20
    assert sorted(p.name for p in (home / "checkpoints" / "sft" / "d2").iterdir() if p.name.isdigit()) == ["3"]


def test_two_process_base_evals(two_process_base):
    """base_eval over two processes (CORE items split between them, counts summed) gives exactly the numbers of
    one process; base_loss too runs over two processes, on other documents (each process reads its own share
    of the validation documents, so a 2048-token sample differs: measured 3.057 vs 3.082 bpb)."""
    home = two_process_base[0]
    base_eval = [str(ROOT / "scripts" / "base_eval.py"), *MODEL_AND_MESH, "--bundle-dir",
                 str(ROOT / "tests" / "fixtures" / "core"), "--max-per-task", "8"]
    base_loss = [str(ROOT / "scripts" / "base_loss.py"), *MODEL_AND_MESH, "--train.device_batch_size=2",
                 "--train.eval_tokens=2048"]
    results = {}
    for processes, devices in ((2, 2), (1, 4)):
        launch(base_loss, processes=processes, devices_per_process=devices, home=home)
        launch(base_eval, processes=processes, devices_per_process=devices, home=home)
        report = home / "report"
        results[processes] = (json.loads((report / "base_loss.json").read_text()),
                              json.loads((report / "base_eval.json").read_text()))
    (loss2, core2), (loss1, core1) = results[2], results[1]
    assert loss2["val_bpb"] == pytest.approx(loss1["val_bpb"], rel=0.05)
    assert loss2["train_bpb"] == pytest.approx(loss1["train_bpb"], rel=0.05)
    assert core2["results"] == pytest.approx(core1["results"]) and core2["core_metric"] == pytest.approx(core1["core_metric"])


SHARED_CHECK = """
import os, sys
from nanochat_jax.distributed import init_distributed
init_distributed()
own = sys.argv[2] == "own"  # each process its own checkpoint root, as with a home on each host's local disk
os.environ["NANOCHAT_JAX_CHECKPOINTS"] = os.path.join(sys.argv[1], "host" + os.environ["JAX_PROCESS_ID"] if own else "")
from nanochat_jax.checkpoint import CheckpointError, Checkpointer, checkpoint_dir, set_aside_previous_run
try:
    set_aside_previous_run(checkpoint_dir("base", 1))
    Checkpointer(checkpoint_dir("base", 1)).close()
    print("ACCEPTED", sorted(os.listdir(checkpoint_dir("base", 1))))
except CheckpointError as e:
    print("REFUSED", e)
"""


def test_checkpoints_on_storage_not_all_hosts_see_are_refused_at_start(tmp_path):
    """Every process must see the checkpoint directory process 0 sees; with a root on each host's own disk all
    processes stop at the Checkpointer with the same message, instead of a run whose checkpoints cannot load."""
    shared = launch(["-c", SHARED_CHECK, str(tmp_path / "shared"), "shared"], processes=2, devices_per_process=1)
    assert all(out.strip().splitlines()[-1] == "ACCEPTED []" for out in shared), shared  # the probe is gone
    own = launch(["-c", SHARED_CHECK, str(tmp_path / "own"), "own"], processes=2, devices_per_process=1)
    for out in own:
        assert "REFUSED processes [1] cannot see" in out and "NANOCHAT_JAX_CHECKPOINTS" in out, out


TASK_AGREEMENT = """
import os, sys
import numpy as np
from nanochat_jax.distributed import init_distributed
init_distributed()
from nanochat_jax.chat_eval import load_task
from nanochat_jax.distributed import sum_over_processes
from nanochat_jax.tasks import TaskDataError
pid = int(os.environ["JAX_PROCESS_ID"])
try:  # process 0 has the task's file; process 1 has none and (offline) no hub
    load_task("ARC-Easy", sys.argv[1] if pid == 0 else sys.argv[2])
    print("LOADED")
except TaskDataError as e:
    print("UNAVAILABLE", e)
print("SUM", int(sum_over_processes(np.array([pid + 1], np.int32))[0]))  # the next collective still pairs up
"""


def test_a_task_unavailable_on_one_process_is_skipped_by_all(tmp_path, monkeypatch):
    """chat_eval skips an unavailable task; all processes must skip it together, or the per-task count sums
    (collectives) of the following tasks pair up across different tasks."""
    import shutil

    has, lacks = tmp_path / "has", tmp_path / "lacks"
    has.mkdir()
    lacks.mkdir()
    shutil.copy(ROOT / "tests" / "fixtures" / "tasks" / "arc.jsonl", has / "ARC-Easy.jsonl")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no hub cache from earlier runs on this machine
    outputs = launch(["-c", TASK_AGREEMENT, str(has), str(lacks)], processes=2, devices_per_process=1)
    assert "UNAVAILABLE ARC-Easy: unavailable on 1 other process(es)" in outputs[0], outputs[0]
    assert "UNAVAILABLE" in outputs[1] and "LOADED" not in outputs[1], outputs[1]
    assert all("SUM 3" in out for out in outputs), outputs


SAME_FACTS = """
import os
from nanochat_jax.distributed import check_same_on_all_processes, init_distributed
init_distributed()
pid = int(os.environ["JAX_PROCESS_ID"])
check_same_on_all_processes({"tokenizer fingerprint": "abc", "training data chunks": 7})
print("AGREED")
try:  # host 1 lists one data file fewer
    check_same_on_all_processes({"tokenizer fingerprint": "abc", "training data chunks": 7 - pid})
except ValueError as e:
    print("DISAGREE", e)
"""


def test_hosts_with_different_data_or_tokenizer_are_refused_together():
    outputs = launch(["-c", SAME_FACTS], processes=2, devices_per_process=1)
    for out in outputs:
        assert "AGREED" in out
        assert "DISAGREE the processes of this run disagree on training data chunks (per process: [7, 6])" in out, out
