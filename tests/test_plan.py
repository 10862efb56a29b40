"""The compile planner: target names, reading collectives from HLO, and real compiles for TPU and H100 targets.

The compiles run scripts/plan.py in a subprocess: the plan extra (libtpu, the CUDA plugin) lives in .venv/plan-site
and must be on the path before JAX starts, which this test process has already done without it."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanochat_jax import plan, targets

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/cpu_tiny.toml", "--model.depth=2", "--model.aspect_ratio=64", "--model.head_dim=64",
        "--model.vocab_size=1024", "--model.sequence_len=128", "--model.compute_dtype=bfloat16",
        "--train.device_batch_size=4", "--train.total_batch_size=1024"]  # width 128, 2 heads, 8 rows x 128
needs_plan_extra = pytest.mark.skipif(not targets.PLAN_SITE.is_dir(),
                                      reason="the plan extra is not installed (PLAN=1 bash scripts/ensure_env.sh)")


def test_target_names():
    t = targets.parse_target("v6e-8")
    assert (t.platform, t.topology, t.num_slices, t.chip.peak_flops) == ("tpu", "v6e:2x4", 1, 918e12)
    assert targets.parse_target("v5p-8").topology == "v5p:2x2x1"  # v5p is named by TensorCores: 4 chips
    assert targets.parse_target("v5e-16x2").num_slices == 2
    gpus = targets.parse_target("16xH100")
    assert (gpus.platform, gpus.topology, gpus.num_slices) == ("cuda", "1x2x8", 2)
    for bad, message in (("v6e-6", "no v6e slice of that size"), ("12xh100", "nodes of 8"), ("a100", "unknown"),
                         ("v5e-4x0", "at least 1 slice")):  # (v5e-4x0 planned '0 slice(s)' of 4 chips)
        with pytest.raises(targets.TargetError, match=message):
            targets.parse_target(bad)


def test_v5p_data_center_network_is_the_datasheets_50_gbps_per_chip():
    """cloud.google.com/tpu/docs/v5p: 'Data center network (DCN) bandwidth per chip (Gbps) | 50' (it was 4 x 200
    Gbps per host over 4 chips: 25 GB/s, four times the page's 6.25 GB/s)."""
    assert targets.CHIPS["v5p"].network_bandwidth == 50e9 / 8


def test_replica_groups_explicit_and_iota():
    assert plan.replica_groups("x, replica_groups={{0,1},{2,3}}, y", 4) == [[0, 1], [2, 3]]
    assert plan.replica_groups("replica_groups=[2,4]<=[8]", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    want = np.arange(8).reshape(2, 4).T.reshape(4, 2).tolist()  # [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert plan.replica_groups("replica_groups=[4,2]<=[2,4]T(1,0)", 8) == want
    named = "replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, dimensions={0}"
    assert plan.replica_groups(named, 8) == want


HLO = """HloModule m

%body (p: (s32[], f32[64])) -> (s32[], f32[64]) {
  %ar = f32[64]{0} all-reduce(%x), channel_id=1, replica_groups=[1,4]<=[4], to_apply=%add
  ROOT %t = (s32[], f32[64]) tuple(%i, %ar)
}

%cond (p: (s32[], f32[64])) -> pred[] {
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

ENTRY %main (a: bf16[32,16], /*index=1*/b: f32[64]) -> bf16[128,16] {
  %ag = bf16[128,16]{1,0} all-gather(%a), channel_id=2, replica_groups={{0,1,2,3}}, dimensions={0}
  %rs = f32[16]{0} reduce-scatter(%b), channel_id=3, replica_groups={{0,1},{2,3}}, dimensions={0}
  %w = (s32[], f32[64]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %r = bf16[128,16]{1,0} copy(%ag)
}
"""


def test_collective_bytes_counts_loops_and_ring_traffic():
    sent, network = plan.collective_bytes(HLO, slice_of=[0, 0, 1, 1])
    assert sent["all-gather"] == pytest.approx(3 / 4 * 128 * 16 * 2)  # (n-1)/n of the gathered result
    assert sent["reduce-scatter"] == pytest.approx(1 * 16 * 4)  # (n-1) x the scattered result, n = 2
    assert sent["all-reduce"] == pytest.approx(5 * 2 * 3 / 4 * 64 * 4)  # in a loop of 5 trips
    # the all-gather and the loop's all-reduce span both nodes, 2 devices each: a ring of 2 channels, each NIC
    # carries half of a device's traffic; the reduce-scatter stays inside each node
    assert network == pytest.approx((sent["all-gather"] + sent["all-reduce"]) / 2)
    # one device per node in each group (nodes 0,1,0,1): the groups {0,1} and {2,3} send all of it over the network
    assert plan.collective_bytes(HLO, slice_of=[0, 1, 0, 1])[1] == pytest.approx(
        sent["all-gather"] / 2 + sent["reduce-scatter"] + sent["all-reduce"] / 2)


ASYNC_HLO = """HloModule m

%region_1.2_spmd (p: (s32[], f32[64])) -> pred[] {
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

%region_0.1_spmd (p: (s32[], f32[64])) -> (s32[], f32[64]) {
  %ag = ((bf16[16,8]{1,0}, f32[4]{0}), (bf16[64,8]{1,0}, f32[16]{0})) all-gather-start(%a, %b), channel_id=1, replica_groups=mesh['axis_0'=1,'axis_1'=4] {'axis_1'}, dimensions={0}
  %rs = ((f32[32,128]{1,0}), f32[8,128]{1,0}) reduce-scatter-start(%c), channel_id=2, replica_groups=mesh['axis_0'=1,'axis_1'=4] {'axis_1'}, dimensions={0}, to_apply=%add
  %a2a = ((bf16[4,1,16,512]{3,2,1,0}), bf16[4,1,16,512]{3,2,1,0}) all-to-all-start(%d), channel_id=3, replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0)) {'axis_1'}, dimensions={0}
  %cp = ((bf16[1,128,128]{2,1,0}, bf16[1,128,512]{1,0,2}), (bf16[1,128,128]{2,1,0}, bf16[1,128,512]{1,0,2})) collective-permute-start(%e, %f), channel_id=4, source_target_pairs={{1,0}}
  %cp.1 = (f32[1,64,64]{2,1,0:T(8,128)S(1)}, f32[1,64,64]{2,1,0:T(8,128)S(1)}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%g), channel_id=5, source_target_pairs={{0,1},{1,0}}
  ROOT %t = (s32[], f32[64]) tuple(%i, %x)
}

ENTRY %main.58_spmd (a: f32[64]) -> f32[64] {
  %while.36 = (s32[], f32[64]) while(%init), condition=%region_1.2_spmd, body=%region_0.1_spmd, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %r = f32[64]{0} get-tuple-element(%while.36), index=1
}
"""


def test_collective_bytes_of_async_collectives_in_a_loop_body_as_xla_names_them():
    """The micro-step loop's body (condition=%region_1, body=%region_0: it was never visited, so FSDP's gathers
    and tensor-parallel traffic of every accumulating step were lost) and the async -start forms, whose type is
    (operands, results[, context]): only the results count (all-to-all / reduce-scatter counted both, a
    collective-permute of two buffers only the second operand)."""
    sent, _ = plan.collective_bytes(ASYNC_HLO, slice_of=[0, 0, 1, 1])
    assert sent["all-gather"] == pytest.approx(3 * 3 / 4 * (64 * 8 * 2 + 16 * 4))
    assert sent["reduce-scatter"] == pytest.approx(3 * 3 * 8 * 128 * 4)
    assert sent["all-to-all"] == pytest.approx(3 * 1 / 2 * 4 * 16 * 512 * 2)  # groups of 2 ({{0,2},{1,3}})
    assert sent["collective-permute"] == pytest.approx(3 * (128 * 128 * 2 + 128 * 512 * 2 + 64 * 64 * 4))
    named = "replica_groups=mesh['axis_0'=2,'axis_1'=2,'axis_2'=1], device_ids=([2,2]T(1,0)) {'axis_1'}, dims={0}"
    assert plan.replica_groups(named, 4) == [[0, 2], [1, 3]]  # (it was every device: [[0, 1, 2, 3]])


def test_collectives_between_tpu_slices_go_over_the_network():
    """A multi-slice TPU program holds only its slice's collectives; what crosses slices is a megascale send
    (it was not counted: every v6e-8x2 plan said network 0.0 ms)."""
    hlo = """ENTRY %main (a: f32[64]) -> f32[64] {
  %send.1 = (f32[40,8,128]{2,1,0:T(8,128)}, u32[], token[]) send(%a, %after-all), channel_id=3, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_reduce_operation="SUM",_xla_megascale_target="{1,2,3,4}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}
  %send.8 = (bf16[1,32,128]{2,1,0}, u32[], token[]) send(%b, %after-all.8), channel_id=20, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_target={{200000->100001}},_xla_megascale_transfer_type="ONE_TO_ONE"}
  %recv.1 = (f32[40,8,128]{2,1,0:T(8,128)}, u32[], token[]) recv(%after-all), channel_id=4, is_host_transfer=true, frontend_attributes={_xla_megascale_target="{1,2,3,4}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}
  ROOT %r = f32[64]{0} copy(%a)
}
"""
    sent, network = plan.collective_bytes(hlo, slice_of=[0] * 4)
    assert sent == {"all-reduce": pytest.approx(2 * 3 / 4 * 40 * 8 * 128 * 4),  # a ring over 4 slices
                    "collective-permute": 32 * 128 * 2}
    assert network == pytest.approx(sum(sent.values()))


@needs_plan_extra
def test_a_mesh_over_two_tpu_slices_keeps_fsdp_inside_each_slice():
    """On v5e-4x2 the (data=2, fsdp=4) mesh put each FSDP group across both slices ([[0, 1, 0, 1], [1, 0, 1, 0]]):
    every weight gather went over the data-center network. The data axis now spans the slices."""
    code = ("import sys; sys.path.insert(0, '.'); from nanochat_jax import targets; targets.use_plan_packages(); "
            "from nanochat_jax.config import MeshConfig; from nanochat_jax.sharding import make_mesh; "
            "from nanochat_jax.plan import slices_of; "
            "devices = targets.target_devices(targets.parse_target('v5e-4x2')); "
            "mesh = make_mesh(MeshConfig(data=2, fsdp=4, tensor=1), devices); "
            "print([slices_of(list(row.flat)) for row in mesh.devices])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[[0, 0, 0, 0], [1, 1, 1, 1]]"


def test_mesh_options_divide_devices_and_heads():
    options = plan.mesh_options(8, n_head=4, n_kv_heads=4)
    assert all(m.data * m.fsdp * m.tensor == 8 for m in options)
    assert {m.tensor for m in options} == {1, 2, 4}  # 8 does not divide 4 heads
    assert len(options) == 4 + 3 + 2


def run_plan(tmp_path, *args) -> dict:
    out = tmp_path / "plan"
    proc = subprocess.run([sys.executable, "scripts/plan.py", *args, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "plan.json").read_text()), proc.stdout


@needs_plan_extra
def test_tiny_model_compiles_for_a_tpu_slice_with_fsdp_and_tensor_parallelism(tmp_path, make_mesh):
    """cpu_tiny-shaped model on a v5e-4 slice (fsdp=2 x tensor=2), splash attention compiled ahead of time."""
    import jax

    from nanochat_jax.config import load_config
    from nanochat_jax.train import TrainRun

    overrides = TINY + ["--mesh.data=1", "--mesh.fsdp=2", "--mesh.tensor=2", "--model.attention_impl=splash"]
    plans, stdout = run_plan(tmp_path, "--target", "v5e-4", "--programs", "train,bpb", *overrides)
    assert "train" in stdout and "fits" in stdout and "roofline" in stdout

    cfg = load_config(overrides)
    run = TrainRun(cfg.model, cfg.optim, 1, make_mesh(1, 2, 2), abstract=True)
    shardings = run.shardings.params
    leaves = jax.tree.leaves(run.params)
    total = sum(4 * math.prod(a.shape) for a in leaves)
    per_device = sum(4 * math.prod(s.shard_shape(a.shape)) for a, s in zip(leaves, jax.tree.leaves(shardings)))
    assert per_device < total / 2  # the matrices and tables are split 4 ways, nothing is left whole but norms
    rows, T, V = 8, 128, 1024
    batch = 2 * rows // 2 * T * 4  # inputs and targets, rows split over fsdp=2
    # what the compiler holds per device: at least this device's shards, and far less than a whole copy
    assert per_device + batch + V * 4 <= plans["bpb"]["arguments"] < total / 2
    train = plans["train"]
    assert train["error"] == "" and train["compiler_flops"] > 0 and train["flops"] > 0
    assert train["collectives"].get("all-gather", 0) > 0  # FSDP gathers the weights ...
    assert train["collectives"].get("all-reduce", 0) + train["collectives"].get("reduce-scatter", 0) > 0  # ... and reduces grads


@needs_plan_extra
def test_prefill_flops_match_the_tpu_compilers_count(tmp_path):
    """The prompt through the blocks and its attention, the lm_head at the last position only (as the Engine's
    prefill runs it): it counted the lm_head at every position and no attention (+28% here, ~15% at d20)."""
    plans, _ = run_plan(tmp_path, "--target", "v5e-4", "--programs", "prefill", "--decode-rows", "4",
                        "--prompt-len", "128", *TINY, "--model.sequence_len=256", "--mesh.data=4")
    prefill = plans["prefill"]
    assert prefill["flops"] == (2 * 2 * 12 * 128 * 128 + 4 * 2 * 128 * 128) * 128 + 2 * 1024 * 128  # one row each
    assert prefill["compiler_flops"] == pytest.approx(prefill["flops"], rel=0.05)  # (+ norms, softmax, rotary)


@needs_plan_extra
def test_tiny_model_compiles_for_eight_h100s_with_cudnn_attention_and_fp8(tmp_path):
    """train.fp8: the compiled step's products of the 13 linear layers take fp8 operands (forward, input and
    weight gradients), the Muon iterations stay in bf16."""
    plans, stdout = run_plan(tmp_path, "--target", "8xh100", "--programs", "train,decode", "--decode-rows", "8",
                             "--prompt-len", "32", *TINY, "--model.attention_impl=cudnn", "--train.fp8=true",
                             "--train.total_batch_size=4096")  # 8 GPUs x 4 rows x 128
    assert "8 x H100" in stdout and "fp8 training: 13 of 13 linear layers" in stdout
    train, decode = plans["train"], plans["decode"]
    assert train["error"] == "" and decode["error"] == ""
    assert train["fp8_dots"] >= 3 * 13 and train["dots"] > train["fp8_dots"] and decode["fp8_dots"] == 0
    assert f"fp8 GEMMs: {train['fp8_dots']} of {train['dots']} products" in stdout
    assert train["compiler_flops"] == 0 and train["flops"] > 0 and train["temporaries"] > 0  # no cost model on GPU
    assert train["collectives"].get("all-reduce", 0) > 0  # data parallel over 8 GPUs: gradients all-reduced
    assert decode["passes"] == 16 and decode["tokens"] == 8 * 16
    assert not decode["collectives"]  # rows split 8 ways, each GPU decodes its own (the Engine's per-device program)


MODERN = ["--model.depth=3", "--model.sequence_len=512", "--model.window_pattern=SSL", "--model.value_embeds=true",
          "--model.smear=true", "--model.backout=true", "--model.layer_lambdas=true", "--model.qk_scale=1.2",
          "--model.pad_vocab_to=64", "--model.init=master"]  # nanochat master's options; sliding windows of 128


@needs_plan_extra
@pytest.mark.slow
@pytest.mark.parametrize("target,extra", [
    ("8xh100", ["--programs", "train,prefill,decode", "--decode-rows", "8", "--prompt-len", "32",
                "--model.attention_impl=cudnn", "--train.total_batch_size=16384", "--model.loss_chunk=64",
                "--train.fp8=true"]),  # as d24_modern: chunked loss, fp8
    ("v5e-4", ["--programs", "train", "--mesh.data=1", "--mesh.fsdp=2", "--mesh.tensor=2", "--model.attention_impl=splash",
               "--train.total_batch_size=4096"]),
])
def test_tiny_model_with_masters_options_compiles(tmp_path, target, extra):
    """cuDNN's sliding window (and the KV cache's) on 8 H100s with fp8 products, splash's local mask on a v5e slice
    (where train.fp8 would be ignored)."""
    plans, _ = run_plan(tmp_path, "--target", target, *TINY, *MODERN, *extra)
    assert plans and all(p["error"] == "" for p in plans.values())
    assert (plans["train"]["fp8_dots"] > 0) == (target == "8xh100")


@needs_plan_extra
@pytest.mark.slow
@pytest.mark.parametrize("mesh", [["--mesh.data=8"], ["--mesh.data=2", "--mesh.fsdp=4"],
                                  ["--mesh.data=4", "--mesh.tensor=2"]])
def test_fp8_sums_the_weight_gradients_over_gpus_as_bf16_does(tmp_path, mesh):
    """With fp8 products the gradients cross the GPUs as without: the weight gradients in bf16 (fp32 product
    outputs moved 2.3x the bytes here) and once per step, not per micro-step (unscaled after the sum, the
    per-micro-step scale kept XLA from moving the sum out of the accumulation loop: 1.44x here, 3.2x at d24); under
    tensor parallelism the input gradients of q, k and v in one sum (1.28x when each was summed on its own)."""
    args = ["--target", "8xh100", "--programs", "train", *TINY, "--model.attention_impl=cudnn",
            "--train.total_batch_size=8192", *mesh]  # 2 micro-steps
    bf16, _ = run_plan(tmp_path / "bf16", *args)
    fp8, _ = run_plan(tmp_path / "fp8", *args, "--train.fp8=true")
    assert fp8["train"]["fp8_dots"] > 0 and bf16["train"]["fp8_dots"] == 0
    for kind in ("all-reduce", "reduce-scatter"):
        sent = fp8["train"]["collectives"].get(kind, 0)  # (+ the fp8 scales' maxima: a few hundred bytes)
        assert sent == pytest.approx(bf16["train"]["collectives"].get(kind, 0), rel=1e-3), kind


@needs_plan_extra
@pytest.mark.slow
def test_sweep_ranks_meshes_and_recommends_an_override(tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "scripts/plan.py", "--target", "v5e-4", "--sweep", *TINY, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recommended: --mesh.data=" in proc.stdout and (out / "sweep.png").stat().st_size > 0
    assert proc.stdout.count("fits") >= 3


@needs_plan_extra
@pytest.mark.slow
@pytest.mark.parametrize("config,target", [("d20", "8xh100"), ("d20", "8xh200"), ("d26", "8xh100"),
                                           ("d26", "8xh200"), ("tpu_v6e_8", "v6e-8")])
def test_every_shipped_accelerator_config_fits_its_target(tmp_path, config, target):
    """The shipped configs' train steps, as run_gpu.sh / run_tpu.sh run them, fit with the planner's headroom."""
    plans, _ = run_plan(tmp_path, "--config", f"configs/{config}.toml", "--target", target, "--programs", "train")
    assert plans["train"]["error"] == ""
    assert plans["train"]["arguments"] + plans["train"]["temporaries"] > 1e9  # a real d20/d26-sized program


@pytest.mark.parametrize("args, message", [
    (["--programs", "trian"], "plan: --programs trian: no program trian (the programs: train,bpb,prefill,decode)"),
    (["--decode-rows", "-4"], "plan: --decode-rows, --prompt-len and --cache-len must be >= 1"),
    (["--cache-len", "0"], "plan: --decode-rows, --prompt-len and --cache-len must be >= 1"),
])
def test_bad_planner_options_are_one_line(args, message):
    proc = subprocess.run([sys.executable, "scripts/plan.py", "--target", "v5e-4", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.splitlines()[-1] == message and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["--config", "configs/d20.toml", "--help"]])
def test_help_without_a_target_prints_the_usage(args):
    """--help needs no --target: it prints the docstring and the settings (it said '--target is required', exit 1)."""
    proc = subprocess.run([sys.executable, "scripts/plan.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python plan.py") and "--target 8xh100" in proc.stdout
    assert "[model]\ndepth = 20" in proc.stdout and "required" not in proc.stderr


@pytest.mark.parametrize("target, message", [
    ("bogus", "plan: unknown target 'bogus'; targets look like 8xh100, "),
    ("v6e-3", "plan: target 'v6e-3': no v6e slice of that size; sizes: v6e-1, v6e-4, "),
    ("12xh100", "plan: target '12xh100': GPUs come in nodes of 8: use 1-8 or a multiple of 8"),
])
def test_bad_target_is_one_line(target, message):
    """A target the planner does not know ended in a traceback (TargetError was no UserError)."""
    proc = subprocess.run([sys.executable, "scripts/plan.py", "--target", target], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.splitlines()[-1].startswith(message)
    assert "Traceback" not in proc.stderr


def test_missing_plan_extra_is_one_line():
    """Without the plan extra the planner says how to install it in one line (it was a traceback)."""
    script = ROOT / "scripts" / "plan.py"
    code = ("import sys, runpy; from pathlib import Path; from nanochat_jax import targets; "
            "targets.PLAN_SITE = Path('/nonexistent'); sys.argv = ['plan.py', '--target', 'v6e-8', *sys.argv[1:]]; "
            f"runpy.run_path({str(script)!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, *TINY, "--programs", "train"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1].startswith("plan: cannot compile for v6e-8: libtpu is not usable here (")
    assert proc.stderr.splitlines()[-1].endswith("install the plan extra with `PLAN=1 bash scripts/ensure_env.sh`")


def test_a_sweep_where_nothing_fits_exits_3(tmp_path):
    """As a plan that does not fit: exit code 3 (the sweep said "no mesh fits" and exited 0). The compiler is
    replaced by a refusal, so nothing compiles."""
    script = ROOT / "scripts" / "plan.py"
    code = ("import sys, importlib.util; "
            f"spec = importlib.util.spec_from_file_location('plan_script', {str(script)!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "from nanochat_jax.plan import ProgramPlan; "
            "m.train_plan = lambda *a: ProgramPlan('train', error='RESOURCE_EXHAUSTED'); "
            "m.target_devices = lambda target: list(range(4)); "
            "sys.exit(m.main(['--target', 'v5e-4', '--sweep', *sys.argv[1:]]))")
    proc = subprocess.run([sys.executable, "-c", code, *TINY, "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stdout.count("does not compile") >= 3
    assert proc.stdout.rstrip().endswith("no mesh fits: try a smaller model or sequence, or more devices")


def test_the_sweep_cache_tells_fp8_from_bf16(tmp_path):
    """A train step cached by a sweep without train.fp8 is not the answer for one with it (it was: the key left the
    setting out). The compiler is replaced by a counter, so nothing compiles."""
    script = ROOT / "scripts" / "plan.py"
    code = ("import sys, json, importlib.util; from pathlib import Path; "
            f"spec = importlib.util.spec_from_file_location('plan_script', {str(script)!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "import nanochat_jax.plan as plan; from nanochat_jax.config import load_config; "
            "from nanochat_jax.targets import parse_target; calls = []; "
            "plan.plan_programs = lambda cfg, *a, **k: calls.append(cfg.train.fp8) or "
            "{'train': plan.ProgramPlan('train', fp8_dots=int(cfg.train.fp8))}; "
            "cache, path = {}, Path(sys.argv[1]); "
            "got = [m.train_plan(load_config(sys.argv[2:] + [f'--train.fp8={f}']), parse_target('8xh100'), [], cache, "
            "path).fp8_dots for f in ('false', 'true', 'false', 'true')]; "
            "print(json.dumps({'calls': calls, 'got': got}))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache.json"), *TINY], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"calls": [False, True], "got": [0, 1, 0, 1]}
