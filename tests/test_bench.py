"""bench/train_step.py end to end on a tiny model, bench/memory.py's analytic state bytes against real arrays,
the HLO summary on a hand-written module, and init_distributed staying off without its environment."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import memory  # noqa: E402
import train_step  # noqa: E402

from nanochat_jax import common  # noqa: E402
from nanochat_jax.config import ModelConfig, OptimConfig  # noqa: E402
from nanochat_jax.model import num_params  # noqa: E402
from nanochat_jax.train import init_train_state  # noqa: E402

TINY = ["--model.depth=2", "--model.aspect_ratio=32", "--model.head_dim=32", "--model.vocab_size=512",
        "--model.sequence_len=64", "--model.compute_dtype=float32", "--train.device_batch_size=4", "--mesh.data=1"]


def test_train_step_bench_json():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, not the 8 of conftest
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "train_step.py"), *TINY, "--steps", "2",
                          "--warmup", "1", "--matmul-size", "512"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("JSON "))
    r = json.loads(line[5:])
    assert r["tokens_per_step"] == 4 * 64 and r["num_devices"] == 1
    assert r["tokens_per_sec"] > 0 and r["step_s_median"] > 0 and r["compile_s"] > 0
    assert r["tokens_per_sec"] == pytest.approx(r["tokens_per_step"] / r["step_s_median"])
    assert 0 < r["mfu_measured"] <= 1
    assert r["peak_datasheet_flops"] is None and r["mfu_datasheet"] is None  # CPU: no datasheet peak
    assert r["params"] == num_params(ModelConfig(depth=2, aspect_ratio=32, head_dim=32, vocab_size=512))
    assert r["mem_temp_bytes"] > 0


def test_analytic_state_bytes_match_init_train_state(make_mesh):
    cfg = ModelConfig(depth=2, aspect_ratio=32, head_dim=32, vocab_size=512, sequence_len=64)
    _, _, state, _ = init_train_state(cfg, OptimConfig(), 10, make_mesh(), 0)
    actual_params = sum(x.nbytes for x in jax.tree.leaves(state.params))
    actual_opt = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
    assert memory.param_bytes(cfg) == actual_params
    assert memory.optimizer_bytes(cfg) == pytest.approx(actual_opt, rel=0.02)  # + a few step/lr scalars


def test_fsdp_estimate_divides_state_by_eight():
    cfg = ModelConfig(depth=4, aspect_ratio=64, vocab_size=1024, sequence_len=128)
    one, fsdp = memory.estimate(cfg, 2, 1), memory.estimate(cfg, 2, 8)
    for k in ("params", "optimizer", "grads"):
        assert fsdp[k] == pytest.approx(one[k] / 8)
    assert fsdp["activations"] == one["activations"]
    remat = memory.estimate(ModelConfig(depth=4, aspect_ratio=64, vocab_size=1024, sequence_len=128, remat="block"), 2, 1)
    assert remat["activations"] < one["activations"] / 2


def test_hlo_summary_counts_collectives_and_vocab_buffers():
    hlo = """
  %ag = f32[4,1280,1280]{2,1,0} all-gather(f32[4,160,1280]{2,1,0} %p), dimensions={1}
  %ars = (f32[], f32[1280,1280]{1,0}) all-reduce-start(f32[] %a, f32[1280,1280]{1,0} %b), to_apply=%add
  %ard = (f32[], f32[1280,1280]{1,0}) all-reduce-done((f32[], f32[1280,1280]{1,0}) %ars)
  %rs = bf16[8,1280]{1,0} reduce-scatter(bf16[64,1280]{1,0} %g), dimensions={0}
  %logits = f32[2,256,65536]{2,1,0} fusion(bf16[2,256,1280]{2,1,0} %x), kind=kOutput
  %ns = bf16[4,1280,1280]{2,1,0} dot(bf16[4,1280,1280]{2,1,0} %x, bf16[4,1280,1280]{2,1,0} %y)
"""
    s = train_step.hlo_summary(hlo, 65536)
    assert s["collectives"] == {"all-gather": 1, "reduce-scatter": 1, "all-reduce": 1, "all-to-all": 0,
                                "collective-permute": 0}
    assert s["largest_vocab_buffer"] == "f32[2,256,65536]"
    assert s["largest_vocab_buffer_bytes"] == 4 * 2 * 256 * 65536
    assert "bf16[4,1280,1280]" in s["rank3_dot_shapes"]


def test_init_distributed_is_a_noop_without_env(monkeypatch):
    for var in ("NANOCHAT_JAX_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
        monkeypatch.delenv(var, raising=False)
    assert common.init_distributed() is False
    assert common.init_distributed() is False
    assert not jax.distributed.is_initialized()
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2")  # a single-host TPU VM stays single-process
    assert common._wants_distributed() is False
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2,10.0.0.3")
    assert common._wants_distributed() is True
    monkeypatch.setenv("NANOCHAT_JAX_DISTRIBUTED", "0")
    assert common._wants_distributed() is False and common.init_distributed() is False
    monkeypatch.setenv("NANOCHAT_JAX_DISTRIBUTED", "1")
    assert common._wants_distributed() is True
