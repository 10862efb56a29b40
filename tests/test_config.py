import pytest

from nanochat_jax.config import Config, ConfigError, from_dict, load_config, to_dict, to_toml


def test_overrides_and_types():
    cfg = load_config(["--model.depth=4", "--train.resume", "true", "--optim.matrix_lr", "0.01"])
    assert cfg.model.depth == 4 and cfg.model.n_embd == 256 and cfg.model.n_head == 2
    assert cfg.train.resume is True and cfg.optim.matrix_lr == 0.01


def test_toml_file_then_cli(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('run = "x"\n[model]\ndepth = 6\nsequence_len = 64\n[train]\nnum_iterations = 5\n')
    cfg = load_config(["--config", str(path), "--model.depth=8"])
    assert (cfg.run, cfg.model.depth, cfg.model.sequence_len, cfg.train.num_iterations) == ("x", 8, 64, 5)


def test_round_trip_through_toml(tmp_path):
    cfg = load_config(["--model.depth=3", "--data.source=files", "--data.path=/x"])
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert load_config(["--config", str(path)]) == cfg
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model.dpth=3"], "unknown config key 'model.dpth'"),
        (["--modl.depth=3"], "unknown config section 'modl'"),
        (["--model.depth=x"], "model.depth='x' is not a valid int"),
        (["--model.depth=2.5"], "model.depth='2.5' is not a valid int"),
        (["--train.resume=maybe"], "train.resume='maybe' is not a valid bool"),
        (["--model.remat=foo"], "model.remat='foo' is not one of none, block, dots_saveable"),
        (["--train.device_batch_size=0"], "train.device_batch_size=0 must be > 0"),
        (["--model.n_kv_head=3", "--model.depth=4"], "model.n_kv_head=3 must divide n_head=2"),
        (["--mesh.data=-1", "--mesh.fsdp=-1"], "at most one -1"),
        (["--config", "/nonexistent.toml"], "config file not found"),
        (["positional"], "unexpected argument 'positional'"),
        (["--train.target_flops=inf"], "train.target_flops='inf' is not a valid float"),
        (["--train.target_param_data_ratio=nan"], "train.target_param_data_ratio='nan' is not a valid float"),
        (["--rl.grad_clip=-1"], "rl.grad_clip=-1.0 must be >= 0"),
    ],
)
def test_errors_name_the_key(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config(argv)


def test_bad_toml_type(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[model]\ndepth = \"four\"\n")
    with pytest.raises(ConfigError, match="model.depth='four' is not a valid int"):
        load_config(["--config", str(path)])
    for line, message in (("[model]\ndepth = [4, 6]", r"model.depth=\[4, 6\] is not a valid int"),
                          ("[train]\nseed = 1979-05-27", r"train.seed=datetime.date\(1979, 5, 27\) is not a valid int"),
                          ("[optim]\nmatrix_lr = [0.02]", r"optim.matrix_lr=\[0.02\] is not a valid float")):
        path.write_text(line + "\n")
        with pytest.raises(ConfigError, match=message):
            load_config(["--config", str(path)])


def test_defaults_follow_nanochat_d20():
    m = Config().model
    assert (m.n_layer, m.n_embd, m.n_head, m.n_kv_heads) == (20, 1280, 10, 10)


def test_only_base_training_clips_gradients_by_default():
    """nanochat 3a5e0bc clips the global gradient norm at 1.0 in base training only; mid, SFT and RL take
    [optim]'s learning rates but their own grad_clip (0: none)."""
    from nanochat_jax.finetune import stage_optim

    cfg = load_config(["--sft.grad_clip=0.5"])
    assert cfg.optim.grad_clip == 1.0 and cfg.mid.grad_clip == cfg.rl.grad_clip == 0.0
    assert stage_optim(cfg.optim, 1.0, grad_clip=cfg.mid.grad_clip).grad_clip == 0.0
    assert stage_optim(cfg.optim, 1.0, grad_clip=cfg.sft.grad_clip).grad_clip == 0.5
