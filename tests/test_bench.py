"""bench/train_step.py end to end on a tiny model, the HLO summary on a hand-written module, bench/recipe.py's equal-FLOPs
step counts, and init_distributed staying off without its environment."""

import gzip
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from conftest import cpu_xla_flags
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import recipe  # noqa: E402
import train_step  # noqa: E402

from nanochat_jax import common, distributed  # noqa: E402
from nanochat_jax.config import ModelConfig, TrainConfig  # noqa: E402
from nanochat_jax.model import num_params  # noqa: E402

TINY = ["--model.depth=2", "--model.aspect_ratio=32", "--model.head_dim=32", "--model.vocab_size=512",
        "--model.sequence_len=64", "--model.compute_dtype=float32", "--train.device_batch_size=4", "--mesh.data=1"]


def test_train_step_bench_json(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=cpu_xla_flags(1))  # one CPU device, not the 8 of conftest
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "train_step.py"), *TINY, "--steps", "2",
                          "--warmup", "1", "--matmul-size", "512", "--breakdown", "--profile", str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    jsons = [i for i, line in enumerate(lines) if line.startswith("JSON ")]
    # the headline (step time, tok/s, MFU) comes first, before the profile and breakdown: a run cut short keeps it
    assert len(jsons) == 2 and jsons[0] < next(i for i, line in enumerate(lines) if line.startswith("profile"))
    r = json.loads(lines[jsons[-1]][5:])
    assert {k: v for k, v in r.items() if k not in ("profile", "breakdown")} == json.loads(lines[jsons[0]][5:])
    assert r["tokens_per_step"] == 4 * 64 and r["num_devices"] == 1
    assert r["tokens_per_sec"] > 0 and r["step_s_median"] > 0 and r["compile_s"] > 0
    assert r["tokens_per_sec"] == pytest.approx(r["tokens_per_step"] / r["step_s_median"])
    assert 0 < r["mfu_measured"] <= 1
    assert r["peak_datasheet_flops"] is None and r["mfu_datasheet"] is None  # CPU: no datasheet peak
    assert r["params"] == num_params(ModelConfig(depth=2, aspect_ratio=32, head_dim=32, vocab_size=512))
    assert r["mem_temp_bytes"] > 0
    b = r["breakdown"]
    assert b["forward_s"] > 0 and b["forward_backward_s"] > 0
    assert b["optimizer_s"] == pytest.approx(r["step_s_median"] - b["forward_backward_s"])
    p = r["profile"]
    assert p["steps"] == 3 and p["kernel_ms_per_step"] > 0 and p["top_kernels"]
    assert sum(p["by_kind_ms_per_step"].values()) == pytest.approx(p["kernel_ms_per_step"])
    assert list(tmp_path.rglob("*.trace.json.gz"))


def test_train_step_bench_compares_the_whole_cpu_with_nanochat(monkeypatch):
    """The 8 host devices of this test process share one CPU: nanochat's step (one process, the whole CPU) gets
    all 8 devices' rows and the ratio is of the whole CPU's tokens/s (it was ours / 8 against 4 rows)."""
    import nanochat_ref  # bench/nanochat_ref.py

    calls = []

    def fake_run(python, mode, options):
        calls.append(options)
        return {"tokens_per_sec": 1000.0, "flops_per_token": 1.0}

    monkeypatch.setattr(nanochat_ref, "run", fake_run)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", cpu_xla_flags(8))
    r = train_step.main([*TINY[:-1], "--steps", "1", "--warmup", "0", "--matmul-size", "128", "--nanochat-dir", "x"])
    (options,) = calls
    assert r["num_devices"] == 8 and r["tokens_per_step"] == 8 * 4 * 64
    assert options[options.index("--device-batch-size") + 1] == "32" and options[options.index("--device") + 1] == "cpu"
    assert r["nanochat"]["ratio"] == pytest.approx(r["tokens_per_sec"] / 1000.0)


def test_train_step_bench_compares_only_nanochats_model(capsys):
    """nanochat's step is its first release's model: cpu_modern's model (windows, value embeddings, ...) or GQA
    against it is refused before anything is timed (the ratio compared two different models)."""
    with pytest.raises(SystemExit, match=r"^train_step.py: --nanochat-dir times nanochat's first-release model, which "
                                         r"has no model.window_pattern='SSSL', model.value_embeds=True, model.smear=True"):
        train_step.main(["--config", str(ROOT / "configs" / "cpu_modern.toml"), "--nanochat-dir", "x"])
    with pytest.raises(SystemExit, match=r"which has no model.n_kv_head=1$"):
        train_step.main([*TINY, "--model.n_kv_head=1", "--nanochat-dir", "x"])


def test_benches_time_nanochat_before_jax_starts():
    """nanochat's torch process runs before this process starts JAX's backends (on a GPU they take most of its
    memory); bench/decode.py started them first to ask for the backend's name."""
    code = ("import sys; sys.path.insert(0, 'bench'); import nanochat_ref; from jax._src import xla_bridge\n"
            "def run(python, mode, options):\n"
            "    print(mode, xla_bridge.backends_are_initialized()); raise SystemExit(0)\n"
            "nanochat_ref.run = run\n"
            "import decode, train_step\n"
            "module = decode if sys.argv[1] == 'decode' else train_step\n"
            "module.main(sys.argv[2:])\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=cpu_xla_flags(1))
    for argv in (["decode", "--depth", "1", "--vocab-size", "256", "--nanochat-dir", "x"],
                 ["train", *TINY, "--nanochat-dir", "x"]):
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, cwd=ROOT,
                             timeout=120)
        assert out.stdout.strip() == f"{argv[0]} False", out.stderr[-2000:]


def test_train_step_bench_refuses_counts_it_cannot_time(capsys):
    for flags in (["--steps", "0"], ["--micro-steps", "0"], ["--warmup", "-1"]):  # no median; no batch to lower
        with pytest.raises(SystemExit) as exit_:
            train_step.parse_args(flags)
        assert exit_.value.code == 2 and "--steps and --micro-steps must be at least 1" in capsys.readouterr().err


def test_trace_summary_counts_device_kernels(tmp_path):
    meta = lambda kind, pid, tid, name: {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}  # noqa: E731
    kernel = lambda name, ts, dur: {"ph": "X", "pid": 2, "tid": 7, "name": name, "ts": ts, "dur": dur}  # noqa: E731
    events = [meta("process_name", 1, 0, "/host:CPU"), meta("process_name", 2, 0, "/device:GPU:0"),
              meta("thread_name", 2, 7, "Stream #13(Compute)"),
              {"ph": "X", "pid": 1, "tid": 3, "name": "PjitFunction(train_step)", "ts": 0, "dur": 5000},  # host: ignored
              kernel("sm90_xmma_gemm_bf16bf16_bf16f32", 0, 400), kernel("sm90_xmma_gemm_bf16bf16_bf16f32", 500, 400),
              kernel("cudnn_generated_fort_native_sdpa_sm90", 1000, 300),
              kernel("ncclDevKernel_AllGather_RING_LL", 1300, 100), kernel("loop_multiply_fusion_3", 1500, 500)]
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = train_step.trace_summary(path, steps=2)
    assert s["kernel_ms_per_step"] == pytest.approx(1.7 / 2)
    assert s["span_ms_per_step"] == pytest.approx(2.0 / 2)
    assert s["busy"] == pytest.approx(0.85)
    assert s["by_kind_ms_per_step"] == pytest.approx({"matmul": 0.4, "attention": 0.15, "collective": 0.05,
                                                      "fusion": 0.25})
    assert list(s["by_kind_ms_per_step"]) == ["matmul", "fusion", "attention", "collective"]  # largest first
    assert s["top_kernels"][0] == ("sm90_xmma_gemm_bf16bf16_bf16f32", pytest.approx(0.4))


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
    for var in ("NANOCHAT_JAX_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.init_distributed() is False
    assert distributed.init_distributed() is False
    assert not jax.distributed.is_initialized()
    monkeypatch.delenv("OMPI_MCA_orte_hnp_uri", raising=False)
    for var in ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"):  # srun / mpirun of one process: single; of two: not
        monkeypatch.setenv(var, "1")
        assert distributed._wants_distributed() is False
        monkeypatch.setenv(var, "2")
        if var == "OMPI_COMM_WORLD_SIZE":  # only the Open MPI launches that jax.distributed can read (4.x)
            assert distributed._wants_distributed() is False
            monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "123.0;tcp://10.0.0.1:4000")
        assert distributed._wants_distributed() is True
        monkeypatch.delenv(var)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2")  # a single-host TPU VM stays single-process
    assert distributed._wants_distributed() is False
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2,10.0.0.3")
    assert distributed._wants_distributed() is True
    monkeypatch.setenv("NANOCHAT_JAX_DISTRIBUTED", "0")
    assert distributed._wants_distributed() is False and distributed.init_distributed() is False
    monkeypatch.setenv("NANOCHAT_JAX_DISTRIBUTED", "1")
    assert distributed._wants_distributed() is True
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' must be a non-negative integer"):
        distributed.init_distributed()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    for value in ("0", "10s"):
        monkeypatch.setenv("NANOCHAT_JAX_HEARTBEAT_TIMEOUT", value)
        with pytest.raises(ValueError, match=f"^NANOCHAT_JAX_HEARTBEAT_TIMEOUT='{value}' must be a positive number "
                                             "of seconds$"):
            distributed.init_distributed()
    assert not jax.distributed.is_initialized()


def test_data_bench_counts_tokens():
    import data as data_bench  # bench/data.py

    results = data_bench.main(["--rows", "2", "--seq", "64", "--threads", "1,2", "--batches", "3", "--one-pass"])
    timed, passes = results[:4], results[4:]
    assert [(r["packing"], r["threads"]) for r in timed] == [(p, t) for p in ("concat", "bestfit") for t in (1, 2)]
    assert all(r["tokens_per_sec"] > 0 and r["rows"] * r["seq"] == 128 and r["vocab"] == 2048 for r in timed)
    concat, bestfit = passes  # rows of 65 tokens, documents of ~280: bestfit crops most, concat cuts off most
    assert concat["dropped"] < 0.001 and concat["before_first_bos"] > 0.7
    assert bestfit["dropped"] > 0.7 and bestfit["before_first_bos"] == 0


def test_serve_bench_streams_in_bursts_of_one_chunk():
    import serve  # bench/serve.py

    results = serve.main(["--depth", "1", "--vocab-size", "256", "--chunks", "1,8", "--prompt-len", "8",
                          "--max-tokens", "16", "--turns", "1"])
    assert [r["chunk"] for r in results] == [1, 8]
    one, eight = results
    assert all(r["first_token_s"] > 0 and r["tokens_per_sec"] > 0 for r in results)
    # chunk 8 streams 16 tokens as two bursts: within a burst the gap is ~0, so the median gap is tiny
    assert eight["gap_median_s"] < 0.1 * eight["gap_max_s"]


def test_serve_bench_refuses_turns_without_gaps(capsys):
    import serve  # bench/serve.py

    for flags in (["--turns", "0"], ["--max-tokens", "1"]):  # no warm turn or no gap to take a median of
        with pytest.raises(SystemExit) as exit_:
            serve.main(["--depth", "1", "--vocab-size", "256", *flags])
        assert exit_.value.code == 2
        assert "--turns must be at least 1 and --max-tokens at least 2" in capsys.readouterr().err


def test_gpu_suite_stages_run_on_cpu(tmp_path):
    """bench/gpu_suite.sh's train, decode, fp8 and infer stages, shrunk by overrides, run end to end here (CPU backend), so
    the one-call-per-stage GPU script does not rot between the sessions that have a GPU. The GPU machine's Python
    has no rust_bpe, grain, gradio or datasets: stubs that refuse to import stand in for them here."""
    missing = tmp_path / "missing"
    missing.mkdir()
    for name in ("rust_bpe", "grain", "gradio", "datasets"):
        (missing / f"{name}.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    env = dict(os.environ, XLA_FLAGS=cpu_xla_flags(1))
    env.update(PY=sys.executable, OUT=str(tmp_path), TRACE_DIR=str(tmp_path), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(missing), os.environ.get("PYTHONPATH")])))
    suite = ["bash", str(ROOT / "bench" / "gpu_suite.sh")]
    train = subprocess.run([*suite, "train", "1", "--model.sequence_len=32", "--train.device_batch_size=2",
                            "--model.vocab_size=256", "--model.aspect_ratio=32", "--steps", "1", "--warmup", "0",
                            "--matmul-size", "128"], env=env, capture_output=True, text=True, timeout=300)
    log = (tmp_path / "train.log").read_text()
    assert train.returncode == 0 and "breakdown: forward" in log and "by kind (ms/step)" in log, log[-2000:]
    result = json.loads([line for line in log.splitlines() if line.startswith("JSON ")][-1][5:])
    assert result["depth"] == 1 and result["profile"]["kernel_ms_per_step"] > 0
    decode = subprocess.run([*suite, "decode", "--depth", "1", "--vocab-size", "256", "--prompt-len", "8",
                             "--max-tokens", "8", "--batch-sizes", "1", "--compute-dtype", "float32"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert decode.returncode == 0 and "bandwidth bound at 4800 GB/s" in (tmp_path / "decode.log").read_text()
    fp8 = subprocess.run([*suite, "fp8", "1", "--model.sequence_len=32", "--train.device_batch_size=2",
                          "--model.vocab_size=256", "--model.aspect_ratio=128", "--steps", "1", "--warmup", "0",
                          "--matmul-size", "128"], env=env, capture_output=True, text=True, timeout=300)
    log = (tmp_path / "fp8.log").read_text()
    assert fp8.returncode == 0 and "fp8=true: fp8 training: 7 of 7 linear layers" in log, log[-2000:]
    assert re.search(r"RATIO fp8/bf16 tokens/s = [0-9.]+ \([0-9,]+ vs [0-9,]+\)", log), log[-2000:]
    infer = subprocess.run([*suite, "infer", "1", "--model.sequence_len=64", "--model.vocab_size=1024",
                            "--model.aspect_ratio=32", "--model.compute_dtype=float32"],
                           env={**env, "BATCH_SIZES": "1,2", "INFER_HOME": str(tmp_path / "home")},
                           capture_output=True, text=True, timeout=300)
    log = (tmp_path / "infer.log").read_text()
    assert infer.returncode == 0 and "a fresh depth-1 model (1,024-token vocabulary)" in log, log[-2000:]
    result = json.loads(log.strip().splitlines()[-1])  # infer_bench's last line
    assert [row["batch_size"] for row in result["sweep"]] == [1, 2] and result["decode_tokens"] == 32
    unknown = subprocess.run([*suite, "nonsense"], env=env, capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "unknown stage 'nonsense'" in unknown.stderr


def test_compilation_cache_goes_to_the_home_or_the_launchers_directory(monkeypatch, tmp_path):
    """chat_cli/chat_web keep compiled programs where run_gpu.sh and run_tpu.sh put theirs."""
    before = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.setenv("NANOCHAT_JAX_HOME", str(tmp_path / "home"))
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        common.enable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "home" / "xla_cache")
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "elsewhere"))
        common.enable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "elsewhere")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    # a script that has not imported jax yet (run_script runs first): the variable jax reads when it is imported
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    code = "from nanochat_jax import common; common.enable_compilation_cache(); import jax; print(jax.config.jax_compilation_cache_dir)"
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, NANOCHAT_JAX_HOME=str(tmp_path / "fresh")),
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.stdout.strip() == str(tmp_path / "fresh" / "xla_cache"), out.stderr


def test_run_script_prints_a_user_error_on_one_line(monkeypatch, capsys):
    """A message quoting a library's multi-line error (pyarrow: "Couldn't deserialize thrift...\nDeserializing page
    header failed.") is still one line: the script's name, then the message; exit code 1."""
    monkeypatch.setattr(sys, "argv", ["scripts/base_train.py"])
    monkeypatch.setattr(common, "enable_compilation_cache", lambda: None)
    monkeypatch.setattr(logging.getLogger("asyncio"), "disabled", False)  # (run_script silences it: restored after)

    def main():
        raise common.UserError("cannot read row group 0 of parquet file x.parquet: Couldn't deserialize thrift\n"
                               "Deserializing page header failed.\n")

    with pytest.raises(SystemExit) as exit_:
        common.run_script(main)
    assert exit_.value.code == 1
    assert capsys.readouterr().err == ("base_train: cannot read row group 0 of parquet file x.parquet: Couldn't "
                                       "deserialize thrift Deserializing page header failed.\n")


def test_run_script_keeps_the_spaces_within_a_line(monkeypatch, capsys):
    """Only line breaks are joined: a path with two spaces in a row is named as it is (it read "my data")."""
    monkeypatch.setattr(sys, "argv", ["scripts/tok_train.py"])
    monkeypatch.setattr(common, "enable_compilation_cache", lambda: None)
    monkeypatch.setattr(logging.getLogger("asyncio"), "disabled", False)

    def main():
        raise common.UserError("found 0 data file(s) in /data/my  data; need at least 2\r\n  (the last one)")

    with pytest.raises(SystemExit):
        common.run_script(main)
    assert capsys.readouterr().err == "tok_train: found 0 data file(s) in /data/my  data; need at least 2 (the last one)\n"


def test_mfu_on_cpu_is_against_the_measured_matmul_peak():
    """CPU has no datasheet peak: MFU there is against one measured dense matmul, split over the simulated devices."""
    whole = common.cpu_peak_flops("float32")
    assert 1e8 < whole < 1e14  # FLOP/s of a real CPU
    assert common.peak_flops_per_device("cpu", "float32") * jax.local_device_count() == pytest.approx(whole)
    assert common.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12  # accelerators: the datasheet
    assert common.peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
    assert [common.peak_flops_per_device(f"TPU {v}") for v in ("v5 lite", "v5", "v6 lite")] == [197e12, 459e12, 918e12]
    assert common.peak_flops_per_device("some new accelerator") is None


def test_cpu_peak_is_the_best_this_machine_has_measured(home):
    """Every stage's MFU is against the same peak: the best measured on this machine so far, kept in the home
    (a busy moment at one stage's start no longer inflates its MFU); an unreadable file is measured over."""
    path = home / "cpu_peak_flops.json"
    home.mkdir(parents=True)
    path.write_text("not json")
    common.cpu_peak_flops.cache_clear()
    try:
        measured = common.cpu_peak_flops("float32")
        (key, stored), = json.loads(path.read_text()).items()
        assert stored == measured and key.endswith(f" {len(os.sched_getaffinity(0))} cores float32")  # per core count
        path.write_text(json.dumps({key: 100 * measured}))  # a better figure seen before wins
        common.cpu_peak_flops.cache_clear()
        assert common.cpu_peak_flops("float32") == 100 * measured
    finally:
        common.cpu_peak_flops.cache_clear()


def test_recipe_bench_gives_both_recipes_the_same_flops():
    recipes, every = recipe.plans(8e12, points=4)
    first, modern = recipes["first_release"], recipes["modern"]
    assert (first["steps"], modern["steps"], every) == (78, 81, 19)  # windows: 4.7% fewer FLOPs per modern token
    assert (first["flops_per_token"], modern["flops_per_token"]) == (25_165_824, 23_986_896)
    # the same matrices (+120 gate weights); the value-embedding tables are lookups, counted apart
    assert (first["matmul_params"], modern["matmul_params"]) == (3_670_016, 3_670_136)
    assert (first["table_params"], modern["table_params"]) == (2048 * 256, 3 * 2048 * 256)
    assert (first["params"], modern["params"]) == (4_194_304, 5_243_010)
    base_train = load_script("base_train")
    for p in recipes.values():
        assert p["flops"] == p["steps"] * p["flops_per_token"] * 4096
        assert abs(p["flops"] - 8e12) <= p["flops_per_token"] * 4096 / 2  # within half a step of the budget
        horizon = TrainConfig(num_iterations=-1, target_flops=8e12, total_batch_size=p["tokens_per_step"])
        assert base_train.training_horizon(horizon, p["params"], p["flops_per_token"]) == p["steps"]
    assert recipe.budget(recipe.parse_args([])) == 6e13  # 10 minutes at CPU_TRAIN_FLOPS
    assert recipe.budget(recipe.parse_args(["--minutes", "1", "--flops", "2e12"])) == 2e12
    default, _ = recipe.plans(6e13, points=10)
    assert (default["first_release"]["steps"], default["modern"]["steps"]) == (582, 611)
    assert default["modern"]["flops"] / default["first_release"]["flops"] == pytest.approx(1.0006, abs=1e-4)
    with pytest.raises(SystemExit):
        recipe.parse_args(["--points", "0"])
    # a budget too small for the modern recipe's 40 warm-up steps is refused before either recipe trains (base_train
    # refused it after the first recipe had trained): 113 steps is the least with 40 + round(0.65 x steps) <= steps
    assert (first["least_steps"], modern["least_steps"]) == (1, 113)
    with pytest.raises(SystemExit, match=r"^recipe.py: configs/cpu_modern.toml would train 2 steps, fewer than its "
                                         r"LR warm-up and warm-down take \(113\): use --flops 1.11e\+13 or more$"):
        recipe.main(["--flops", "2e11"])
