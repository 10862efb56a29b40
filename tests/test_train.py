"""The sharded train step: same numbers on every mesh, gradient accumulation, overfitting, FSDP memory."""

import dataclasses
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanochat_jax.config import ConfigError, MeshConfig, ModelConfig, OptimConfig
from nanochat_jax.model import Linear
from nanochat_jax.sharding import make_mesh
from nanochat_jax.train import TrainRun, fp8_capable, microbatch_sharding

TINY = ModelConfig(depth=2, aspect_ratio=32, head_dim=16, vocab_size=128, sequence_len=16, compute_dtype="float32")
OPTIM = OptimConfig(warmdown_ratio=0.5, ns_dtype="float32")  # bf16 NS is not bit-stable across meshes


def bytes_per_device(tree) -> int:
    """Largest number of bytes any one device holds for the arrays of a pytree (for memory checks)."""
    totals: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return max(totals.values()) if totals else 0


def _batches(steps, micro, rows, seq, vocab, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(steps, micro, rows, seq + 1), dtype=np.int32)
    return [{"inputs": t[..., :-1], "targets": t[..., 1:]} for t in tokens]


def _run(mesh_shape, batches, cfg=TINY, steps=3):
    mesh = make_mesh(MeshConfig(*mesh_shape), devices=jax.devices()[: int(np.prod(mesh_shape))])
    run = TrainRun(cfg, OPTIM, steps, mesh, seed=0)
    losses = []
    for batch in batches[:steps]:
        metrics = run.step(jax.device_put(batch, microbatch_sharding(mesh)))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(run.params), run.state


@pytest.fixture(scope="module")
def reference():
    batches = _batches(3, 2, 8, TINY.sequence_len, TINY.vocab_size)
    losses, params, _ = _run((1, 1, 1), batches)
    return batches, losses, params


# (8, 1, 1) and (1, 1, 2) run with the slow tests: (2, 2, 2) has every axis, (1, 8, 1) the widest FSDP split
@pytest.mark.parametrize("mesh_shape", [pytest.param((8, 1, 1), marks=pytest.mark.slow), (1, 8, 1),
                                        pytest.param((1, 1, 2), marks=pytest.mark.slow), (2, 2, 2)])
def test_meshes_match_single_device(reference, mesh_shape):
    batches, ref_losses, ref_params = reference
    losses, params, _ = _run(mesh_shape, batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_tensor_parallel_shards_heads_and_mlp():
    cfg = ModelConfig(depth=2, aspect_ratio=64, head_dim=32, vocab_size=128, sequence_len=16, compute_dtype="float32")
    mesh = make_mesh(MeshConfig(1, 1, 8))
    state = TrainRun(cfg, OPTIM, 3, mesh).state
    c_q = state.params["blocks"][0]["attn"]["c_q"]["kernel"]
    c_fc = state.params["blocks"][0]["mlp"]["c_fc"]["kernel"]
    assert c_q.sharding.spec[1] == "tensor" and c_fc.sharding.spec[1] == "tensor"
    assert c_fc.addressable_shards[0].data.shape == (128, 512 // 8)


def test_grad_accumulation_equals_big_batch():
    """2 micro-batches of 4 rows give the same step as 1 micro-batch of 8 rows (mean loss per micro-batch)."""
    batch = _batches(1, 2, 4, TINY.sequence_len, TINY.vocab_size, seed=3)[0]
    merged = {k: v.reshape(1, 8, -1) for k, v in batch.items()}
    loss_a, params_a, _ = _run((1, 1, 1), [batch], steps=1)
    loss_b, params_b, _ = _run((1, 1, 1), [merged], steps=1)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fsdp_memory_is_one_eighth():
    cfg = ModelConfig(depth=2, aspect_ratio=64, head_dim=32, vocab_size=256, sequence_len=16, compute_dtype="float32")
    single = TrainRun(cfg, OPTIM, 3, make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])).state
    sharded = TrainRun(cfg, OPTIM, 3, make_mesh(MeshConfig(1, 8, 1))).state
    total = bytes_per_device((single.params, single.opt_state))
    per_device = bytes_per_device((sharded.params, sharded.opt_state))
    # every parameter and optimizer moment has a dimension divisible by 8; only scalars are replicated
    assert per_device <= total / 8 * 1.01, (per_device, total)


def test_d2_overfits_one_batch():
    cfg = ModelConfig(depth=2, aspect_ratio=64, head_dim=64, vocab_size=64, sequence_len=32, compute_dtype="float32")
    optim = OptimConfig(warmdown_ratio=0.0, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.02)
    steps = 150
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    run = TrainRun(cfg, optim, steps, mesh)
    batch = jax.device_put(_batches(1, 1, 4, cfg.sequence_len, cfg.vocab_size, seed=7)[0], microbatch_sharding(mesh))
    first = None
    for _ in range(steps):
        metrics = run.step(batch)
        first = first if first is not None else float(metrics["loss"])
    final = float(metrics["loss"])
    assert first == pytest.approx(np.log(64), rel=1e-3)  # zero-initialised head: uniform predictions
    assert final < 0.1, final
    assert int(run.state.step) == steps and jnp.isfinite(metrics["grad_norm"])


def test_init_from_given_params_on_another_mesh():
    """Fine-tuning stages start from a checkpoint's parameters, placed on their own mesh, with a fresh optimizer."""
    base = TrainRun(TINY, OPTIM, 3, make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1]), seed=5)
    given = jax.tree.map(lambda a: np.asarray(a) + 1.0, jax.device_get(base.params))
    mesh = make_mesh(MeshConfig(2, 2, 2))
    run = TrainRun(TINY, OPTIM, 3, mesh, params=given)
    state = run.state
    for a, b, sh in zip(jax.tree.leaves(state.params), jax.tree.leaves(given), jax.tree.leaves(run.shardings.params)):
        np.testing.assert_array_equal(np.asarray(a), b)
        assert a.sharding == sh
    assert int(state.step) == 0
    mu = state.opt_state  # fresh moments: all zero
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(mu) if x.ndim >= 2)


def test_warm_start_takes_the_moments_of_another_runs_checkpoint(tmp_path):
    """nanochat master's SFT warm start: the base run's momentum and second-moment buffers, restored onto another
    mesh, into an optimizer whose schedules differ (no weight decay: two state arrays fewer); this run keeps its own
    step counts and hyperparameters. A checkpoint without an optimizer state is refused in one line."""
    from nanochat_jax.checkpoint import Checkpointer, CheckpointError
    from nanochat_jax.finetune import stage_optim

    base_optim = dataclasses.replace(OPTIM, muon_weight_decay=0.2, muon_weight_decay_schedule="cosine", normuon=True)
    base = TrainRun(TINY, base_optim, 3, make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1]), seed=0)
    for batch in _batches(3, 1, 4, 16, 128):
        base.step(batch)
    ckpt = Checkpointer(tmp_path / "base", async_save=False)
    base.save(ckpt, 3, None, {"step": 3})

    sft_optim = stage_optim(base_optim, 0.8, warmdown_ratio=0.5, final_lr_frac=0.0, muon_momentum_start=0.85)
    sft = TrainRun(TINY, sft_optim, 5, make_mesh(MeshConfig(2, 2, 2)), params=jax.device_get(base.params))
    fresh = sft.state.opt_state
    assert len(jax.tree.leaves(fresh)) == len(jax.tree.leaves(base.state.opt_state)) - 2
    taken = sft.warm_start(ckpt, 3, base_optim)
    ckpt.close()
    old = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(base.state.opt_state)}
    moments = 0
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(sft.state.opt_state), jax.tree.leaves(fresh)):
        key = jax.tree_util.keystr(path)
        if jnp.issubdtype(got.dtype, jnp.floating) and "hyperparams" not in key:
            np.testing.assert_array_equal(np.asarray(got), np.asarray(old[key]))  # the base run's moment
            moments += int(np.abs(np.asarray(got)).max() > 0)
        else:  # counts and hyperparameters: this run's own
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert taken > 0 and moments > 0 and int(sft.state.step) == 0
    sft.step(jax.device_put(_batches(1, 1, 4, 16, 128, seed=1)[0], microbatch_sharding(sft.mesh)))  # and it trains

    bare = Checkpointer(tmp_path / "imported", async_save=False)
    bare.save(1, jax.device_get(base.params), None, None, {"step": 1})
    with pytest.raises(CheckpointError, match="has no optimizer state"):
        sft.warm_start(bare, 1, base_optim)
    bare.close()


def test_newton_schulz_work_is_split_over_the_mesh():
    """Muon stacks every same-shaped matrix (wide orientation) and splits the stack over all devices: on a
    2-device data-parallel mesh each device's NS matmuls hold half of the 16 square and 8 wide matrices of
    a depth-4 model, not all of them on every device."""
    cfg = ModelConfig(depth=4, aspect_ratio=32, head_dim=16, vocab_size=128, sequence_len=16, compute_dtype="float32")
    mesh = make_mesh(MeshConfig(data=2), devices=jax.devices()[:2])
    run = TrainRun(cfg, OPTIM, 3, mesh, seed=0)
    batch = jax.device_put(_batches(1, 1, 4, cfg.sequence_len, cfg.vocab_size)[0], microbatch_sharding(mesh))
    with jax.set_mesh(mesh):
        hlo = run.jitted.lower(run.state, batch).compile().as_text()
    stacks = {int(n) for n in re.findall(r"= f32\[(\d+),128,(?:128|512)\]\{[^}]*\} (?:dot|fusion)\(", hlo)}
    assert stacks and max(stacks) <= 8, stacks  # 16 square matrices / 2 devices; never the whole stack of 16
    assert 8 in stacks and 4 in stacks, stacks


def test_out_of_memory_names_the_knobs_to_turn():
    """A step that runs out of device memory (simulated: XLA's error raised while tracing) says per-device rows
    and which settings lower the memory, instead of XLA's bare RESOURCE_EXHAUSTED."""
    mesh = make_mesh(MeshConfig(8, 1, 1))

    def objective(model, micro):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.50GiB.\nmore")

    run = TrainRun(TINY, OPTIM, 3, mesh, objective=objective)
    batch = jax.device_put(_batches(1, 2, 16, TINY.sequence_len, TINY.vocab_size)[0], microbatch_sharding(mesh))
    with pytest.raises(MemoryError, match=r"2 rows of 16 tokens per device.*device_batch_size.*remat.*"
                                          r"allocate 9\.50GiB\.$"):
        run.step(batch)


def _compiled_step_hlo(vocab_size: int, mesh_shape: tuple, rows: int) -> str:
    """Optimized HLO of a 2-micro-step train step of a width-64 model on a mesh of the 8 CPU devices."""
    cfg = ModelConfig(depth=2, aspect_ratio=32, head_dim=16, vocab_size=vocab_size, sequence_len=16,
                      compute_dtype="float32")
    mesh = make_mesh(MeshConfig(*mesh_shape))
    run = TrainRun(cfg, OPTIM, 3, mesh, seed=0)
    batch = jax.device_put(_batches(1, 2, rows, cfg.sequence_len, cfg.vocab_size)[0], microbatch_sharding(mesh))
    with jax.set_mesh(mesh):
        return run.jitted.lower(run.state, batch).compile().as_text()


def test_data_by_fsdp_mesh_never_gathers_the_batch_activations():
    """On a 2 x 4 data x FSDP mesh the embedding lookup's rows go from (data rows, FSDP-split width) to
    (data x FSDP rows, whole width) by an all-to-all; without the lookup's constraint XLA gathered all 16 rows
    of the micro-batch's activations on every device (f32[16,16,16]: "involuntary full rematerialization")."""
    hlo = _compiled_step_hlo(128, (2, 4, 1), rows=16)
    gathered = re.findall(r"= (f32\[[\d,]+\])\{[^}]*\} all-gather", hlo)
    assert gathered and not [g for g in gathered if g.startswith("f32[16,16,")], gathered  # rows x positions x ...


def test_muon_stacks_on_a_data_fsdp_tensor_mesh_never_gather_whole_matrices():
    """On a 2 x 2 x 2 mesh each Muon matrix (FSDP rows, tensor columns, replicated over data) goes to rows over
    (fsdp, tensor) and then into its stack split over every device, and back the same way; going there directly
    made XLA gather every whole matrix (and whole stacks) on every device ("involuntary full rematerialization")."""
    hlo = _compiled_step_hlo(256, (2, 2, 2), rows=8)  # (vocab 256: lm_head's FSDP gather is not C x C)
    gathered = set(re.findall(r"= f32\[([\d,]+)\]\{[^}]*\} all-gather", hlo))
    c = 64  # width: depth 2 x aspect ratio 32
    whole = {f"{c},{c}", f"{c},{4 * c}", f"{4 * c},{c}"}
    assert gathered and not [g for g in gathered if g in whole or g.count(",") >= 2], gathered


def test_rows_per_device_shrink_when_one_micro_batch_would_exceed_the_step(make_mesh, capsys):
    """(global rows, micro-steps): the configured rows while they divide the step; on so many devices that one
    micro-batch would hold more than the step, fewer rows per device (said once); otherwise a ConfigError."""
    from nanochat_jax.config import ConfigError
    from nanochat_jax.train import rows_and_accum

    mesh = make_mesh(8, 1, 1)
    assert rows_and_accum(4, 64, 1, mesh, "sft.target_examples_per_step") == (32, 2)
    assert capsys.readouterr().out == ""
    assert rows_and_accum(4, 16, 1, mesh, "sft.target_examples_per_step") == (16, 1)  # 2 rows per device
    assert capsys.readouterr().out == ("sft.target_examples_per_step=16 is less than one micro-batch of 4 rows on "
                                       "each of 8 devices: 2 rows per device\n")
    assert rows_and_accum(32, 8 * 16 * 2048, 2048, mesh, "train.total_batch_size") == (128, 1)
    with pytest.raises(ConfigError, match=r"sft.target_examples_per_step=20 is not a multiple of the 32 per "
                                          r"micro-batch \(= device_batch_size 4 x batch-sharded devices 8\)"):
        rows_and_accum(4, 20, 1, mesh, "sft.target_examples_per_step")
    with pytest.raises(ConfigError, match=r"=4 is not a multiple of the 32 per micro-batch"):
        rows_and_accum(4, 4, 1, mesh, "sft.target_examples_per_step")  # fewer than one row per device


@pytest.mark.parametrize("change, message", [
    (dict(compute_dtype="float16"), "model.compute_dtype='float16' cannot train: its gradients underflow"),
    (dict(compute_dtype="bfloat16", attention_impl="cudnn"), "model.attention_impl='cudnn' runs on NVIDIA GPUs only"),
])
def test_settings_that_cannot_train_here_are_refused_in_one_line(change, message):
    """float16 training had no loss scaling (on CPUs its attention did not even compile: 'F16_F16_F32' is not
    supported), cuDNN attention off NVIDIA GPUs failed at the first step ('cuDNN is not detected')."""
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])  # (the tests' CPU devices)
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainRun(dataclasses.replace(TINY, **change), OPTIM, 3, mesh)


FP8 = ModelConfig(depth=2, aspect_ratio=64, head_dim=64, vocab_size=128, sequence_len=32, compute_dtype="float32")


def _fp8_run(mesh_shape, batches, fp8=True):
    mesh = make_mesh(MeshConfig(*mesh_shape), devices=jax.devices()[: int(np.prod(mesh_shape))])
    run = TrainRun(FP8, OPTIM, len(batches), mesh, seed=0, fp8=fp8)
    losses = [float(run.step(jax.device_put(b, microbatch_sharding(mesh)))["loss"]) for b in batches]
    return np.array(losses), run


def test_fp8_training_tracks_full_precision_and_evaluates_without_it(capsys):
    """train.fp8 (master's --fp8): the step's products in fp8 follow fp32 training to within fp8's rounding, the
    scales are whole-tensor maxima on any mesh (a sharded run gives the single device's numbers), and run.graphdef,
    which the evaluations and samples use, keeps every product in the compute dtype."""
    batches = _batches(1, 1, 8, FP8.sequence_len, FP8.vocab_size, seed=5) * 12  # one batch, learnt by heart
    exact, _ = _fp8_run((1, 1, 1), batches, fp8=False)
    rounded, run = _fp8_run((1, 1, 1), batches)
    assert "fp8 training: 13 of 13 linear layers" in capsys.readouterr().out and run.fp8_layers == 13
    assert not np.array_equal(rounded, exact)
    np.testing.assert_allclose(rounded, exact, rtol=0.05)  # (3.6% apart after 12 steps)
    assert rounded[-1] < rounded[0] / 5
    linears = lambda graphdef: [m.fp8 for _, m in nnx.iter_graph(nnx.merge(graphdef, run.params))  # noqa: E731
                                if isinstance(m, Linear)]
    assert all(linears(run.step_graphdef)) and not any(linears(run.graphdef))
    sharded, _ = _fp8_run((2, 2, 2), batches[:4])
    np.testing.assert_allclose(sharded, rounded[:4], rtol=1e-4)


@pytest.mark.parametrize("platform, kind, capability, applies", [
    ("cpu", "cpu", None, True), ("gpu", "NVIDIA H100 80GB HBM3", "9.0", True), ("gpu", "NVIDIA L4", "8.9", True),
    ("gpu", "NVIDIA A100-SXM4-80GB", "8.0", False), ("tpu", "TPU v6 lite", None, False)])
def test_fp8_is_ignored_with_a_warning_where_there_are_no_fp8_matmuls(platform, kind, capability, applies, capsys):
    device = SimpleNamespace(platform=platform, device_kind=kind, compute_capability=capability)
    assert fp8_capable(device) is applies
    assert ("train.fp8 ignored" in capsys.readouterr().out) is not applies
