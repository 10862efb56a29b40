"""The launchers' stage commands parse: every `scripts/*.py` call in run_gpu.sh, run_tpu.sh and run_cpu.sh names a
script that exists, and its flags and config overrides are accepted with the launcher's default config. A renamed
config key would otherwise surface only on the GPU or TPU machine, hours into a run, at the stage that uses it."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from nanochat_jax.config import load_config

ROOT = Path(__file__).resolve().parents[1]
NO_CONFIG = {"report.py"}  # takes reset / generate, no config


def stage_commands(launcher: str) -> list[tuple[str, list[str]]]:
    """(script, argv) of each `run scripts/X.py ...` / `"$PY" scripts/X.py ...` line, with the launcher's
    variables substituted ($CONFIG by its default, "$@" dropped)."""
    text = (ROOT / launcher).read_text()  # with the stages it sources
    text = text.replace("source scripts/speedrun.sh", (ROOT / "scripts/speedrun.sh").read_text())
    text = text.replace("\\\n", " ")
    variables = {}
    for name, default in re.findall(r'(?:^|\s)(\w+)=\$\{\w+:-([^}]*)\}', text, re.M):  # CONFIG=${CONFIG:-x.toml}
        variables.setdefault(name, default)  # the first: the default RECIPE's
    variables.update(re.findall(r'^(\w+)="([^"$]*)"', text, re.M))  # CPU_TASKS="..."
    commands = []
    for match in re.finditer(r'(?:^|\s)(?:run|"\$PY")\s+(scripts/\S+\.py)([^\n]*)', text, re.M):
        args = match.group(2).split("#")[0].replace('"$@"', "")
        args = re.sub(r'"\$(\w+)"', lambda m: shlex.quote(variables[m.group(1)]), args)
        args = re.sub(r'\$(\w+)', lambda m: variables[m.group(1)], args)  # unquoted: word-split options
        commands.append((match.group(1), shlex.split(args)))
    return commands


def _load(script: str):
    spec = importlib.util.spec_from_file_location(Path(script).stem + "_launch_check", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("launcher", ["run_gpu.sh", "run_tpu.sh", "run_cpu.sh"])
def test_every_stage_command_parses(launcher):
    commands = stage_commands(launcher)
    scripts = {script for script, _ in commands}
    assert {"scripts/base_train.py", "scripts/mid_train.py", "scripts/chat_sft.py", "scripts/chat_rl.py",
            "scripts/chat_eval.py", "scripts/report.py"} <= scripts, scripts
    for script, argv in commands:
        assert (ROOT / script).is_file(), script
        if Path(script).name in NO_CONFIG:
            continue
        module = _load(script)
        parsed = module.parse_args(argv) if hasattr(module, "parse_args") else (None, argv)
        if isinstance(parsed, tuple):  # (script flags, config overrides)
            cfg = load_config(parsed[1])
            assert "--config" not in argv or cfg.run != "default", (script, argv)


def test_gpu_and_tpu_launchers_use_their_configs():
    gpu = dict(stage_commands("run_gpu.sh"))["scripts/base_train.py"]
    tpu = dict(stage_commands("run_tpu.sh"))["scripts/base_train.py"]
    assert load_config(gpu).model.attention_impl == "cudnn" and load_config(gpu).model.depth == 20
    assert load_config(tpu).model.attention_impl == "splash" and load_config(tpu).mesh.fsdp == -1


@pytest.mark.parametrize("launcher", ["run_gpu.sh", "run_tpu.sh"])
def test_modern_recipe_config_loads_with_the_launchers_overrides(launcher):
    """RECIPE=modern: configs/d24_modern.toml, with run_tpu.sh's TPU settings put before the user's overrides."""
    text = (ROOT / launcher).read_text()
    block = re.search(r"\n\s*modern\) CONFIG=\$\{CONFIG:-(\S+)\}(.*?);;", text, re.S)
    overrides = re.findall(r"--\S+", block.group(2))
    cfg = load_config(["--config", block.group(1), *overrides])
    assert cfg.run == "d24_modern" and cfg.model.depth == 24 and cfg.model.window_pattern == "SSSL"
    assert cfg.optim.orthogonalizer == "polar_express" and cfg.tokenizer.vocab_size == 32768
    assert cfg.model.attention_impl == ("splash" if launcher == "run_tpu.sh" else "cudnn")
    # master's one post-training stage: SFT from the base model on its mixture, rows of 2048 tokens like pretraining
    assert (cfg.sft.recipe, cfg.sft.source, cfg.sft.mixture) == ("master", "base", "master")
    if launcher == "run_tpu.sh":  # 8 rows plan over a v6e chip's 32 GB (bench/RESULTS.md)
        assert cfg.train.device_batch_size == cfg.sft.device_batch_size == 4
    else:  # 16 rows plan at 73.1 GB per H100 (bench/RESULTS.md); mid-training's default 32 would not fit either
        assert cfg.train.device_batch_size == cfg.mid.device_batch_size == cfg.sft.device_batch_size == 8


@pytest.mark.parametrize("config, mid", [("configs/d20.toml", True), ("configs/d24_modern.toml", False)])
def test_speedrun_stages_skip_mid_training_when_sft_starts_from_base(tmp_path, config, mid):
    """The modern recipe has nanochat master's one post-training stage: the GPU/TPU stages then run no mid-training
    (a Python stand-in records the stage scripts; the config check itself runs)."""
    import subprocess
    import sys

    py = tmp_path / "py"
    py.write_text(f'#!/bin/bash\ncase "$1" in -c|-m) exec {sys.executable} "$@" ;; esac\necho "STAGE $1"\n')
    py.chmod(0o755)
    out = subprocess.run(["bash", "-c", f'set -euo pipefail; source scripts/speedrun.sh; PY={py}; CONFIG={config}; '
                          'ROWS=""; speedrun_stages --train.num_iterations=1'], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    stages = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("STAGE ")]
    assert ("scripts/mid_train.py" in stages) == mid and "scripts/chat_sft.py" in stages
    assert stages[-1] == "scripts/report.py"


def test_a_bad_override_stops_the_launchers_before_anything_runs():
    """The config check's command substitution is assigned first: `read X <<< "$(failing)"` succeeds under set -e
    and the launcher would go on (resetting the report) with empty sizes."""
    for launcher in ("run_gpu.sh", "run_tpu.sh"):
        text = (ROOT / launcher).read_text()
        assert re.search(r"^SIZES=\$\(", text, re.M) and 'read -r SOURCE NUM_SHARDS' in text, launcher
        assert not re.search(r'<<<\s*"\$\(', text), launcher


@pytest.mark.parametrize("launcher, want", [("run_gpu.sh", "climbmix 171 8 8 8"), ("run_tpu.sh", "climbmix 171")])
def test_the_launchers_read_their_sizes_from_the_config(launcher, want):
    """The SIZES line (python -m nanochat_jax.config) as the launcher runs it, on the modern preset with an
    override; a bad override fails it (set -e then stops the launcher before anything runs)."""
    import subprocess
    import sys

    line = re.search(r"^(SIZES=\$\(.*?\| tail -1\))", (ROOT / launcher).read_text(), re.M | re.S).group(1)

    def sizes(*overrides: str) -> subprocess.CompletedProcess:
        script = f'set -euo pipefail; PY={sys.executable}; CONFIG=configs/d24_modern.toml; {line}; echo "$SIZES"'
        return subprocess.run(["bash", "-c", script, "launcher", *overrides], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    assert sizes("--data.num_shards=171").stdout.split() == want.split()
    bad = sizes("--sft.device_batch_size=abc")
    assert bad.returncode != 0 and "sft.device_batch_size='abc' is not a valid int" in bad.stderr


def test_gpu_launcher_halves_rows_with_real_config_keys():
    """run_gpu.sh halves the training rows per GPU on cards under 64 GiB; the keys it sets must exist."""
    text = (ROOT / "run_gpu.sh").read_text()
    keys = " ".join(re.findall(r'ROWS="(.*)"', text)[1:]).replace("$ROWS", "")
    overrides = re.sub(r"\$\(\(.*?\)\)", "16", keys).split()
    assert len(overrides) == 3
    cfg = load_config(["--config", "configs/d20.toml", *overrides])
    assert cfg.train.device_batch_size == cfg.mid.device_batch_size == cfg.sft.device_batch_size == 16


def test_gpu_env_xla_flags_are_known_to_this_jaxlib():
    """XLA aborts the process on an unknown flag in XLA_FLAGS, so a flag renamed or removed by a newer jaxlib
    would kill run_gpu.sh at its first JAX call. The GPU flags are parsed by every jaxlib, CPU ones included."""
    import os
    import subprocess
    import sys

    flags = subprocess.run(["bash", "-c", "XLA_FLAGS= && source scripts/gpu_env.sh && echo $XLA_FLAGS"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    ok = subprocess.run([sys.executable, "-c", "import jax; print(jax.numpy.ones(2).sum())"], env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.strip() == "2.0", ok.stderr[-2000:]
    env["XLA_FLAGS"] += " --xla_gpu_no_such_flag=true"  # the check itself: a bad flag is fatal
    bad = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.ones(2).sum()"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "xla_gpu_no_such_flag" in bad.stderr
