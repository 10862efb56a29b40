"""Checkpoints: round trip, restore onto other meshes, keep-last-N, load_model end to end, clear errors."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from nanochat_jax import checkpoint
from nanochat_jax.checkpoint import CheckpointError, Checkpointer, set_aside_previous_run

ROOT = Path(__file__).resolve().parents[1]


def sharded_params(mesh):
    """A small params dict: one matrix FSDP-sharded over 8 devices, one replicated vector, a nested dict."""
    rng = np.random.default_rng(0)
    params = {"wte": rng.normal(size=(16, 8)).astype(np.float32),
              "blocks": {"0": {"w": rng.normal(size=(8, 24)).astype(np.float32)}},
              "scale": np.arange(3, dtype=np.float32)}
    specs = {"wte": P("fsdp", None), "blocks": {"0": {"w": P(None, "fsdp")}}, "scale": P()}
    return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)


def trained_opt_state(params):
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
    state = optimizer.init(params)
    grads = jax.tree.map(lambda p: p * 0.5 + 1.0, params)
    _, state = optimizer.update(grads, state, params)
    return state


def abstract_on(tree, mesh, spec_fn=lambda a: P()):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec_fn(a))), tree)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_and_restore_onto_other_meshes(tmp_path, make_mesh):
    mesh8 = make_mesh(1, 8, 1)
    params = sharded_params(mesh8)
    opt_state = trained_opt_state(params)
    data_state = {"docs": {"next_index": 12}, "skip": 345, "epoch": 1}
    meta = {"step": 10, "model": {"depth": 2}, "val_bpb": 1.25, "tokenizer": "/x/tok"}
    ckpt = Checkpointer(tmp_path / "run", keep=2)
    ckpt.save(10, params, opt_state, data_state, meta)
    ckpt.wait()
    assert ckpt.latest_step() == 10 and ckpt.all_steps() == [10]
    assert ckpt.read_meta(10) == meta

    same = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), (params, opt_state))
    out = ckpt.restore(10, *same)
    assert_trees_equal(out["params"], params)
    assert_trees_equal(out["opt_state"], opt_state)
    assert type(out["opt_state"][1][0]).__name__ == "ScaleByAdamState"  # optax structure, not plain dicts
    assert out["data"] == data_state and out["meta"] == meta
    assert out["params"]["wte"].sharding.spec == P("fsdp", None)

    one = make_mesh(1, 1, 1)
    out = ckpt.restore(10, abstract_on(params, one))
    assert out["opt_state"] is None
    assert_trees_equal(out["params"], params)
    assert out["params"]["wte"].sharding.device_set == {jax.devices()[0]}

    cube = make_mesh(2, 2, 2)
    tp = lambda a: P(*([None] * (a.ndim - 1) + ["tensor"])) if a.ndim and a.shape[-1] % 2 == 0 else P()
    out = ckpt.restore(10, abstract_on(params, cube, tp), abstract_on(opt_state, cube, tp))
    assert_trees_equal(out["params"], params)
    assert_trees_equal(out["opt_state"], opt_state)
    assert out["params"]["blocks"]["0"]["w"].sharding.spec == P(None, "tensor")
    assert {s.data.shape for s in out["params"]["blocks"]["0"]["w"].addressable_shards} == {(8, 12)}
    # a run with a wider model: not "corrupt" (which invites deleting a good checkpoint) but another size
    wider = dict(params, wte=jax.ShapeDtypeStruct((16, 16), jnp.float32, sharding=NamedSharding(one, P())))
    with pytest.raises(CheckpointError, match=r"holds a model of another size than this run's .*\(16, 16\)"):
        ckpt.restore(10, {**abstract_on(params, one), "wte": wider["wte"]})
    ckpt.close()


def test_keep_last_n_and_latest_step(tmp_path, make_mesh):
    params = {"w": jnp.ones((4,))}
    ckpt = Checkpointer(tmp_path, keep=2)
    assert ckpt.latest_step() is None
    for step in (1, 2, 3, 4):
        ckpt.save(step, jax.tree.map(lambda a: a * step, params), {"m": jnp.zeros(2)}, {"n": step}, {"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["3", "4"]
    out = ckpt.restore(3, abstract_on(params, make_mesh(1, 1, 1)))
    np.testing.assert_array_equal(out["params"]["w"], np.full(4, 3.0))
    assert out["data"] == {"n": 3}
    with pytest.raises(CheckpointError, match=r"no complete checkpoint for step 1 in .* \(steps: 3, 4\)"):
        ckpt.restore(1, abstract_on(params, make_mesh(1, 1, 1)))
    ckpt.close()


def test_fresh_run_sets_every_previous_run_aside_and_deletes_nothing(tmp_path, capsys):
    """A new (not resumed) run in a directory that a previous run left things in moves all of it (steps, a save
    a kill cut short, config.toml) to <dir>.previous-<n>, n counting up: three runs later every run is still
    there and restorable."""
    run_dir = tmp_path / "d2"
    params = {"w": jnp.ones((4,))}
    first = Checkpointer(run_dir, keep=3, async_save=False)
    for step in (10, 20):
        first.save(step, params, None, {}, {"step": step, "run": 1})
    first.close()
    (run_dir / "config.toml").write_text("run 1")
    (run_dir / "30.orbax-checkpoint-tmp").mkdir()

    assert set_aside_previous_run(run_dir) == tmp_path / "d2.previous-1"
    assert capsys.readouterr().err == (f"new run: moved the previous run in {run_dir} (steps 10, 20) to "
                                       f"{tmp_path / 'd2.previous-1'}; --train.resume=true continues a run instead\n")
    assert list(run_dir.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "d2.previous-1").iterdir()) == [
        "10", "20", "30.orbax-checkpoint-tmp", "config.toml"]
    for run in (2, 3):
        ckpt = Checkpointer(run_dir, keep=3, async_save=False)
        assert ckpt.all_steps() == []
        ckpt.save(20, jax.tree.map(lambda a: run * a, params), None, {}, {"step": 20, "run": run})  # same step
        ckpt.close()
        assert set_aside_previous_run(run_dir) == tmp_path / f"d2.previous-{run}"
    assert capsys.readouterr().err.count("new run: moved the previous run") == 2
    for run in (1, 2, 3):
        old = Checkpointer(tmp_path / f"d2.previous-{run}", async_save=False)
        restored = old.restore(20, params)
        assert restored["meta"]["run"] == run and float(restored["params"]["w"][0]) == run
        old.close()
    assert set_aside_previous_run(tmp_path / "empty") is None  # nothing to move: nothing said
    assert "moved" not in capsys.readouterr().err


def test_a_new_run_sets_the_previous_runs_log_aside_and_a_resumed_run_appends(home, capsys):
    """report/<stage>_train.jsonl follows the checkpoints: a resumed run appends to it; a new run moves it, with
    the previous run's checkpoints, to d<depth>.previous-<n>/ and starts its own (also when there is no checkpoint
    to move). So does its summary, report/<stage>_train.json (beside a new run's curves, it would be read as the new
    run's when that run is cut short)."""
    from nanochat_jax.config import TrainConfig
    from nanochat_jax.progress import StepLogger, save_summary
    from nanochat_jax.train import open_checkpoints

    def session(resume: bool, start: int, losses: list[float]) -> None:
        ckpt = open_checkpoints("mid", 2, TrainConfig(resume=resume))
        log = StepLogger("mid", 10, start, append=resume)
        for step, loss in enumerate(losses, start + 1):
            log.log(step, loss, 100)
        log.close()
        if losses:
            ckpt.save(start + len(losses), {"w": jnp.ones((2,))}, None, {}, {"step": start + len(losses)}, wait=True)
            save_summary("mid_train", {"losses": losses})
        ckpt.close()

    def losses(path) -> list[float]:
        return [json.loads(line)["loss"] for line in path.read_text().splitlines()]

    log, run_dir = home / "report" / "mid_train.jsonl", home / "checkpoints" / "mid" / "d2"
    session(False, 0, [5.0, 4.0])
    session(True, 2, [3.0])  # resumed from step 2: appends
    assert losses(log) == [5.0, 4.0, 3.0] and not (home / "checkpoints" / "mid" / "d2.previous-1").exists()
    capsys.readouterr()
    session(False, 0, [9.0])  # a new run
    previous = home / "checkpoints" / "mid" / "d2.previous-1"
    assert capsys.readouterr().err.startswith(f"new run: moved the previous run in {run_dir} (steps 2, 3) to "
                                              f"{previous}; --train.resume=true continues a run instead\n")
    assert sorted(p.name for p in previous.iterdir()) == ["2", "3", "mid_train.json", "mid_train.jsonl"]
    assert json.loads((home / "report" / "mid_train.json").read_text()) == {"losses": [9.0]}  # the new run's
    assert losses(previous / "mid_train.jsonl") == [5.0, 4.0, 3.0] and losses(log) == [9.0]
    shutil.rmtree(run_dir)  # only a log left behind (a run killed before its first checkpoint)
    session(False, 0, [])
    assert sorted(p.name for p in (run_dir.parent / "d2.previous-2").iterdir()) == ["mid_train.json", "mid_train.jsonl"]
    assert losses(run_dir.parent / "d2.previous-2" / "mid_train.jsonl") == [9.0] and log.read_text() == ""


def test_a_waited_save_survives_a_crash_right_after_it(tmp_path):
    """The last checkpoint of a run is saved with wait=True before the final evaluation: if that evaluation
    crashes the process, the checkpoint is complete on disk (an unwaited asynchronous save can be left half
    written: Orbax's writer threads stop with the interpreter)."""
    program = (
        "import sys, jax.numpy as jnp\n"
        "from nanochat_jax.checkpoint import Checkpointer\n"
        "ckpt = Checkpointer(sys.argv[1], keep=2)\n"
        "params = {'w': jnp.arange(1_000_000, dtype=jnp.float32)}\n"
        "ckpt.save(7, params, params, {'pos': 3}, {'step': 7}, wait=sys.argv[2] == 'wait')\n"
        "raise RuntimeError('the final evaluation failed')\n")
    proc = subprocess.run([sys.executable, "-c", program, str(tmp_path / "run"), "wait"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert "the final evaluation failed" in proc.stderr
    restored = Checkpointer(tmp_path / "run").restore(7, {"w": jax.ShapeDtypeStruct((1_000_000,), jnp.float32)})
    assert float(restored["params"]["w"][-1]) == 999_999.0 and restored["meta"]["step"] == 7


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, make_mesh):
    """The message names the broken step and the way back to the one before it."""
    ckpt = Checkpointer(tmp_path, keep=2, async_save=False)
    params = {"w": jnp.arange(64.0)}
    for step in (3, 5):
        ckpt.save(step, params, {"m": jnp.zeros(2)}, {}, {"step": step})
    ckpt.wait()
    for f in (tmp_path / "5" / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"^checkpoint {tmp_path}/5 is incomplete or corrupt \(remove "
                                              rf"{tmp_path}/5 to fall back to step 3\): [^\n]*$"):
        ckpt.restore(5, abstract_on(params, make_mesh(1, 1, 1)))
    assert float(ckpt.restore(3, abstract_on(params, make_mesh(1, 1, 1)))["params"]["w"][-1]) == 63.0
    ckpt.close()


def test_load_model_end_to_end(home, make_mesh):
    from flax import nnx

    from nanochat_jax.config import Config, ModelConfig, to_dict
    from nanochat_jax.model import init_model, runnable_on
    from nanochat_jax.tokenizer import Tokenizer, tokenizer_fingerprint

    with pytest.raises(CheckpointError, match=r"no checkpoints for stage 'sft' under .*; run scripts/chat_sft.py first"):
        checkpoint.load_model("sft")

    texts = ["the cat sat on the mat", "a dog ran in the park", "hello world"] * 20
    tokenizer = Tokenizer.train_from_iterator(texts, vocab_size=300)
    tok_dir = home / "tok"
    tokenizer.save(tok_dir)
    cfg = Config(model=ModelConfig(depth=1, aspect_ratio=32, head_dim=16, vocab_size=tokenizer.vocab_size,
                                   sequence_len=16, compute_dtype="float32"))
    model = init_model(cfg.model, seed=3)
    params = nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])
    params = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(make_mesh(1, 8, 1), P())), params)
    meta = {"step": 7, "stage": "base", "config": to_dict(cfg), "model": dataclasses.asdict(cfg.model),
            "tokenizer": str(tok_dir), "tokenizer_fingerprint": tokenizer_fingerprint(tok_dir), "val_bpb": 2.5}
    ckpt = Checkpointer(checkpoint.checkpoint_dir("base", 1))
    ckpt.save(7, params, optax.adam(1e-3).init(params), {"skip": 0}, meta)
    ckpt.close()

    loaded, tok, got_meta = checkpoint.load_model("base")
    assert got_meta == meta
    assert tok.encode("the cat sat") == tokenizer.encode("the cat sat")
    tokens = jnp.array([tokenizer.encode("the cat sat on the mat")[:8]])
    forward = nnx.jit(lambda m, t: m(t))
    want = forward(model, tokens)
    np.testing.assert_allclose(forward(loaded, tokens), want, rtol=1e-6, atol=1e-6)
    leaf = jax.tree.leaves(nnx.state(loaded, nnx.Param))[0]
    assert len(leaf.sharding.device_set) == 1

    sharded, _, _ = checkpoint.load_model("base", step=7, depth=1, mesh=make_mesh(2, 2, 2))
    np.testing.assert_allclose(forward(sharded, tokens), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 8 in .*d1 \(steps: 7\)"):
        checkpoint.load_model("base", step=8)
    with pytest.raises(CheckpointError, match=r"no checkpoints for stage 'base' at depth 7 under .* \(depths there: d1\)"):
        checkpoint.load_model("base", depth=7)

    # trained on TPUs (or GPUs): that backend's attention kernel becomes XLA's attention on this CPU
    for impl, native in (("cudnn", "cuda"), ("splash", "tpu")):
        cfg_impl = dataclasses.replace(cfg.model, attention_impl=impl)
        assert runnable_on(cfg_impl, "cpu").attention_impl == "xla"
        assert runnable_on(cfg_impl, native) == cfg_impl  # a laptop compiling for that platform keeps the kernel
    # float16 compute (an import with --compute-dtype float16) runs in float32 on CPUs: XLA:CPU's attention dot
    # cannot accumulate float16 in float32 ("F16_F16_F32 is not supported"); other platforms keep it
    f16 = dataclasses.replace(cfg.model, compute_dtype="float16")
    assert runnable_on(f16, "cpu").compute_dtype == "float32" and runnable_on(f16, "cuda") == f16
    np.testing.assert_allclose(forward(init_model(runnable_on(f16, "cpu"), seed=0), tokens),
                               forward(init_model(dataclasses.replace(cfg.model, compute_dtype="float32"), seed=0),
                                       tokens))
    ckpt = Checkpointer(checkpoint.checkpoint_dir("base", 1))
    ckpt.save(8, params, None, None, {**meta, "step": 8, "model": {**meta["model"], "attention_impl": "splash"}})
    ckpt.close()
    from_tpu, _, tpu_meta = checkpoint.load_model("base", step=8)
    assert tpu_meta["model"]["attention_impl"] == "splash" and from_tpu.blocks[0].attn.attention_impl == "xla"
    np.testing.assert_allclose(forward(from_tpu, tokens), want, rtol=1e-6, atol=1e-6)

    # the tokenizer retrained since (same size, other merges; or another size): other token ids, refused
    for vocab, corpus in ((300, ["zebras quietly juggle xylophones"] * 60), (290, texts)):
        Tokenizer.train_from_iterator(corpus, vocab_size=vocab).save(tok_dir)
        with pytest.raises(CheckpointError, match=r"not the one checkpoint .*d1/7 was trained with"):
            checkpoint.load_model("base", step=7)


def test_checkpoint_without_optimizer_state(tmp_path, make_mesh):
    """An imported model has no optimizer state: it saves and loads; asking for the state is a clear error."""
    params = {"w": jnp.arange(4.0)}
    ckpt = Checkpointer(tmp_path, keep=2, async_save=False)
    ckpt.save(0, params, None, None, {"step": 0})
    out = ckpt.restore(0, abstract_on(params, make_mesh(1, 1, 1)))
    np.testing.assert_array_equal(out["params"]["w"], np.arange(4.0))
    assert out["opt_state"] is None and out["meta"] == {"step": 0}
    with pytest.raises(CheckpointError, match="checkpoint .*0 has no optimizer state .* cannot resume training"):
        ckpt.restore(0, abstract_on(params, make_mesh(1, 1, 1)), abstract_on({"m": jnp.zeros(4)}, make_mesh(1, 1, 1)))
    ckpt.close()


def test_finetuning_starts_from_the_runs_depth_else_the_newest(home):
    """mid/SFT/RL load their source stage at --model.depth when it exists there (not whichever depth was written
    last), and fall back to the newest depth directory otherwise (e.g. an imported model of another depth)."""
    from flax import nnx

    from nanochat_jax.config import Config, MeshConfig, ModelConfig, to_dict
    from nanochat_jax.finetune import load_source
    from nanochat_jax.model import init_model
    from nanochat_jax.sharding import make_mesh as mesh_of
    from nanochat_jax.tokenizer import Tokenizer, tokenizer_fingerprint

    tokenizer = Tokenizer.train_from_iterator(["the cat sat on the mat"] * 20, vocab_size=280)
    tokenizer.save(home / "tok")
    for depth in (1, 2):  # d2 is written last
        model_cfg = ModelConfig(depth=depth, aspect_ratio=32, head_dim=16, vocab_size=tokenizer.vocab_size,
                                sequence_len=16, compute_dtype="float32")
        params = nnx.to_pure_dict(nnx.split(init_model(model_cfg), nnx.Param)[1])
        ckpt = Checkpointer(checkpoint.checkpoint_dir("base", depth))
        ckpt.save(5, params, None, None, {"step": 5, "model": to_dict(model_cfg), "tokenizer": str(home / "tok"),
                                          "tokenizer_fingerprint": tokenizer_fingerprint(home / "tok")})
        ckpt.close()
    mesh = mesh_of(MeshConfig(1, 1, 1), jax.devices()[:1])
    for asked, got in ((1, 1), (2, 2), (3, 2)):
        cfg = Config(model=ModelConfig(depth=asked, compute_dtype="float32"))
        assert load_source("base", cfg, mesh)[2].depth == got


def test_a_moved_artifacts_home_still_finds_its_tokenizer(home, monkeypatch, tmp_path):
    """Checkpoints name their tokenizer relative to the artifacts home, so a home trained on one machine and
    copied to another (or to another user's directory) loads; a tokenizer outside the home stays absolute."""
    import shutil

    from flax import nnx

    from nanochat_jax.config import Config, ModelConfig
    from nanochat_jax.model import init_model
    from nanochat_jax.tokenizer import Tokenizer, default_tokenizer_dir, tokenizer_dir, tokenizer_record

    tokenizer = Tokenizer.train_from_iterator(["the cat sat on the mat"] * 20, vocab_size=280)
    tokenizer.save(default_tokenizer_dir())
    model_cfg = ModelConfig(depth=1, aspect_ratio=32, head_dim=16, vocab_size=tokenizer.vocab_size,
                            sequence_len=16, compute_dtype="float32")
    meta = checkpoint.checkpoint_meta("base", 3, Config(model=model_cfg), model_cfg)
    assert meta["tokenizer"] == "tokenizer"
    ckpt = Checkpointer(checkpoint.checkpoint_dir("base", 1))
    ckpt.save(3, nnx.to_pure_dict(nnx.split(init_model(model_cfg), nnx.Param)[1]), None, None, meta)
    ckpt.close()

    moved = tmp_path / "elsewhere" / "home"
    shutil.copytree(home, moved)
    shutil.rmtree(home)
    monkeypatch.setenv("NANOCHAT_JAX_HOME", str(moved))
    _, tok, got = checkpoint.load_model("base")
    assert tok.encode("the cat sat") == tokenizer.encode("the cat sat")
    assert checkpoint.checkpoint_meta("mid", 1, Config(model=model_cfg), model_cfg, got["tokenizer"])["tokenizer"] == "tokenizer"
    assert tokenizer_dir("imported/sft_d1/tokenizer") == moved / "imported" / "sft_d1" / "tokenizer"
    assert tokenizer_record(moved / "imported" / "sft_d1" / "tokenizer") == "imported/sft_d1/tokenizer"
    assert tokenizer_record(tmp_path / "own_tok") == str(tmp_path / "own_tok")
    assert tokenizer_dir(str(tmp_path / "own_tok")) == tmp_path / "own_tok"


def run_tiny_stage(home, setup: str, evaluate: str, iterations: int) -> subprocess.CompletedProcess:
    """run_stage over random tokens on a depth-1 model (vocab 270, checkpoint_every 2) in a fresh process with
    NANOCHAT_JAX_HOME=home: `setup` runs first (it saves the tokenizer), `evaluate` is the body of the eval hook."""
    program = setup + (
        "import numpy as np\n"
        "from nanochat_jax.config import Config, MeshConfig, ModelConfig\n"
        "from nanochat_jax.sharding import make_mesh\n"
        "from nanochat_jax.tokenizer import Tokenizer, default_tokenizer_dir, tokenizer_fingerprint\n"
        "from nanochat_jax.train import TrainRun, global_batch, run_stage\n"
        "cfg = Config()\n"
        "cfg.model = ModelConfig(depth=1, aspect_ratio=32, head_dim=32, vocab_size=270, sequence_len=8,\n"
        "                        compute_dtype='float32')\n"
        "cfg.train.checkpoint_every, cfg.train.log_every = 2, 100\n"
        "mesh = make_mesh(MeshConfig())\n"
        "class Data:\n"
        "    i = 0\n"
        "    def get_state(self): return {'i': self.i}\n"
        "    def next(self):\n"
        "        self.i += 1\n"
        "        x = np.random.default_rng(self.i).integers(0, 270, (8, 9)).astype(np.int32)\n"
        "        return global_batch([{'inputs': x[:, :-1], 'targets': x[:, 1:]}], mesh)\n"
        "def evaluate(step, last, progress):\n"
        f"{evaluate}"
        "data = Data()\n"
        f"run_stage(TrainRun(cfg.model, cfg.optim, {iterations}, mesh), 'base', cfg, data, data.next, evaluate)\n")
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", NANOCHAT_JAX_HOME=str(home)))


def test_a_periodic_save_survives_an_evaluation_that_crashes_after_it(tmp_path):
    """run_stage saves every checkpoint_every steps asynchronously, then evaluates: when that evaluation raises,
    the save still being written completes before the error ends the process."""
    proc = run_tiny_stage(
        tmp_path,
        "import nanochat_jax.checkpoint as C\n"
        "C.checkpoint_meta = lambda stage, step, *args, **kw: {'step': step}\n"
        "from nanochat_jax.tokenizer import Tokenizer, default_tokenizer_dir\n"
        "Tokenizer.train_from_iterator(['ab ab'], 270).save(default_tokenizer_dir())  # (run_stage fingerprints it)\n",
        "    if step == 4: raise RuntimeError('the evaluation at step 4 failed')\n", iterations=6)
    assert "the evaluation at step 4 failed" in proc.stderr and proc.returncode == 1
    run_dir = tmp_path / "checkpoints" / "base" / "d1"
    assert sorted(p.name for p in run_dir.iterdir()) == ["2", "4", "config.toml"]
    assert Checkpointer(run_dir).read_meta(4) == {"step": 4}


def test_a_tokenizer_retrained_during_a_run_is_not_stamped_on_its_checkpoints(tmp_path):
    """tok_train run again while a stage trains replaces tokenizer.json; the run still encodes with the tokenizer
    it loaded, so its later checkpoints record that one's fingerprint (they recorded the new file's, and loading
    them with the new tokenizer passed the check: a model reading other token ids)."""
    proc = run_tiny_stage(
        tmp_path,
        "from nanochat_jax.tokenizer import Tokenizer, default_tokenizer_dir, tokenizer_fingerprint\n"
        "Tokenizer.train_from_iterator(['hello hello world'], 270).save(default_tokenizer_dir())\n"
        "print('loaded', tokenizer_fingerprint())\n",
        "    if step == 2:  # tok_train again, elsewhere\n"
        "        Tokenizer.train_from_iterator(['other text other text'], 270).save(default_tokenizer_dir())\n"
        "        print('retrained', tokenizer_fingerprint())\n", iterations=4)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = dict(line.split() for line in proc.stdout.splitlines() if line.startswith(("loaded", "retrained")))
    assert printed["loaded"] != printed["retrained"]
    run_dir = tmp_path / "checkpoints" / "base" / "d1"
    assert [Checkpointer(run_dir).read_meta(s)["tokenizer_fingerprint"] for s in (2, 4)] == [printed["loaded"]] * 2


def test_resuming_with_optimizer_settings_that_reshape_its_state_is_refused_and_moves_nothing(tmp_path, make_mesh):
    """grad_clip > 0 adds a part to the optimizer state: a checkpoint written with it is sound, not corrupt, for
    a run without it, so the error says which settings to use and no step is set aside as broken."""
    params = {"w": jnp.arange(8.0)}
    ckpt = Checkpointer(tmp_path / "run", keep=2, async_save=False)
    ckpt.save(3, params, trained_opt_state(params), {}, {"step": 3})
    other = optax.adamw(1e-2).init(params)  # no clip_by_global_norm in front
    with pytest.raises(CheckpointError, match=r"holds an optimizer state of another structure than this run's"):
        ckpt.restore(3, abstract_on(params, make_mesh(1, 1, 1)), abstract_on(other, make_mesh(1, 1, 1)))
    assert ckpt.all_steps() == [3] and not (tmp_path / "run.broken").exists()
    ckpt.close()


def test_a_step_alone_is_found_in_the_depth_that_has_it(home):
    """--step without --depth: the most recently written depth that holds that step, not an error because a newer
    depth lacks it; a step no depth has is still refused, naming the newest depth's steps."""
    for depth, step in ((2, 10), (1, 3)):  # d1 is written last
        directory = checkpoint.checkpoint_dir("base", depth)
        ckpt = Checkpointer(directory, async_save=False)
        ckpt.save(step, {"w": jnp.arange(4.0)}, None, None, {"step": step})
        ckpt.close()
    assert checkpoint.find_checkpoint("base") == (checkpoint.checkpoint_dir("base", 1), 3)
    assert checkpoint.find_checkpoint("base", step=10) == (checkpoint.checkpoint_dir("base", 2), 10)
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 7 in .*d1 \(steps: 3\)"):
        checkpoint.find_checkpoint("base", step=7)
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 10 in .*d1 \(steps: 3\)"):
        checkpoint.find_checkpoint("base", depth=1, step=10)
    # a preferred depth (the run's --model.depth) wins when it holds the step, else the rules above apply
    assert checkpoint.find_checkpoint("base", preferred_depth=2) == (checkpoint.checkpoint_dir("base", 2), 10)
    assert checkpoint.find_checkpoint("base", step=3, preferred_depth=2) == (checkpoint.checkpoint_dir("base", 1), 3)
    assert checkpoint.find_checkpoint("base", preferred_depth=7) == (checkpoint.checkpoint_dir("base", 1), 3)
    assert checkpoint.find_checkpoint("base", depth=1, preferred_depth=2) == (checkpoint.checkpoint_dir("base", 1), 3)
