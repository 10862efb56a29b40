import re
from pathlib import Path

import pytest

from nanochat_jax.config import Config, ConfigError, asks_for_help, from_dict, load_config, to_dict, to_toml


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
        (["--optim.adam_beta2=1.0"], "optim.adam_beta2=1.0 must be in [0, 1)"),
        (["--optim.adam_unembedding=0.8,1,1e-10,0"], "betas must be in [0, 1)"),
        (["--rl.temperature=-0.5"], "rl.temperature=-0.5 must be >= 0"),
        (["--rl.top_k=-1"], "rl.top_k=-1 must be >= 0"),
        (["--data.prefetch=-1"], "data.prefetch=-1 must be >= 0"),
        (["--data.source=fineweb", "--data.num_shards=1"], "data.num_shards=1 must be >= 2 for data.source=fineweb"),
        (["--run", "--train.num_iterations=50"], "missing value for '--run'"),
        (["--model.param_dtype=float16"], "model.param_dtype='float16' is not supported"),  # NaN loss by step 2
        # (the trainer's ValueError / OverflowError traceback after the data was opened)
        (["--tokenizer.vocab_size=99999999999"], "tokenizer.vocab_size=99999999999 must be <= 2,147,483,647"),
    ],
)
def test_errors_name_the_key(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(argv)


def test_bad_toml_type(tmp_path):
    path = tmp_path / "c.toml"
    for quoted in ('"four"', '"4"'):  # a quoted number in a TOML file is a string, not the number
        path.write_text(f"[model]\ndepth = {quoted}\n")
        with pytest.raises(ConfigError, match=f"model.depth='{quoted[1:-1]}' is a string where an integer belongs"):
            load_config(["--config", str(path)])
    path.write_text("[train]\nresume = \"true\"\n")
    with pytest.raises(ConfigError, match="train.resume='true' is a string where true or false belongs"):
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


def test_stages_after_base_have_no_warm_up_muon_weight_decay_or_momentum_warm_down():
    """The modern recipe's warm-up steps, Muon weight decay and momentum warm-down are pretraining's (nanochat
    master's SFT and RL have none of them): mid, SFT and RL start at their full learning rate."""
    from pathlib import Path

    from nanochat_jax.finetune import stage_optim
    from nanochat_jax.optim import lr_multiplier, muon_momentum

    cfg = load_config(["--config", str(Path(__file__).parents[1] / "configs" / "cpu_modern.toml")])
    assert (cfg.optim.warmup_steps, cfg.optim.muon_weight_decay, cfg.optim.muon_momentum_final) == (40, 0.28, 0.9)
    sft = stage_optim(cfg.optim, 0.5, warmdown_ratio=1.0, final_lr_frac=0.0, muon_momentum_start=0.97)
    assert (sft.warmup_steps, sft.warmup_ratio, sft.muon_weight_decay, sft.muon_momentum_final) == (0, 0.0, 0.0, -1.0)
    assert sft.matrix_lr == 0.5 * cfg.optim.matrix_lr
    assert [round(float(lr_multiplier(s, 60, sft)), 4) for s in (0, 30, 59)] == [1.0, 0.5, 0.0167]
    assert [round(float(muon_momentum(s, sft, 60)), 4) for s in (0, 30, 59)] == [0.97] * 3


def test_scripts_print_user_errors_on_one_line_and_help(tmp_path):
    """A bad setting ends a script with exit code 1 and one line naming the key (no traceback); --help prints
    the script's docstring and every setting with its default, and exits 0."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, NANOCHAT_JAX_HOME=str(tmp_path), JAX_PLATFORMS="cpu")

    def script(*args):
        return subprocess.run([sys.executable, str(root / "scripts" / "chat_sft.py"), *args], env=env,
                              capture_output=True, text=True, timeout=120)

    bad = script("--sft.device_batch_size=abc")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == "chat_sft: sft.device_batch_size='abc' is not a valid int"
    missing = script("--config", str(root / "configs" / "cpu_tiny.toml"))  # no mid checkpoint in this home
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "no checkpoints for stage 'mid'" in missing.stderr and "scripts/mid_train.py first" in missing.stderr
    helped = script("--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: python chat_sft.py [--config FILE.toml]")
    assert "Supervised fine-tuning, loss only on the assistant's tokens." in helped.stdout
    assert from_dict(__import__("tomllib").loads(helped.stdout.split("override them):\n\n", 1)[1])) == Config()


def test_help_is_asked_where_an_option_stands():
    assert asks_for_help(["--help"]) and asks_for_help(["--config", "c.toml", "-h"])
    assert asks_for_help(["--run=x", "--help"])
    assert not asks_for_help(["--run", "-h"]) and not asks_for_help(["--run", "--help"])  # a value, not an option


def hostile_configs(seed: int, count: int):
    """`count` bad inputs for load_config, each with one offending part: (argv, config file bytes or None, the
    names one of which its error must mention: the key, its section, the file)."""
    import dataclasses
    import random

    rng = random.Random(seed)
    sections = {f.name: [g.name for g in dataclasses.fields(f.type if not isinstance(f.type, str) else
                                                            type(getattr(Config(), f.name)))]
                for f in dataclasses.fields(Config) if dataclasses.is_dataclass(getattr(Config(), f.name))}
    keys = [f"{s}.{k}" for s, names in sections.items() for k in names] + ["run"]
    cli_values = ["", "x", "-1", "0", "-0", "1.5", "1e999", "-1e999", "nan", "inf", "9" * 5000, "-" + "9" * 30,
                  "2" * 19, "true", "no", "0x10", "1_000", " 3 ", "\x00", "é", "[1]", "{}", "=", "--", "\n", "\udcff"]
    toml_values = ["1", "-1", "0", "-99999999999999999999", "1" * 5000, "1.5", "-0.0", "inf", "-inf", "nan", "1e308",
                   '"x"', '"4"', '""', "true", "[1, 2]", "[]", "{a = 1}", "1979-05-27", "07:32:00", '"\\u0000"', "'é'",
                   "[" * 5000 + "]" * 5000, "{a = " * 2000 + "1" + "}" * 2000]
    key_typos = ["modle.depth", "model.dpeth", "model..depth", "model.depth.x", ".depth", "model.", "", "rn",
                 "model.depth\n", "mödel.depth", "train", "model\x00.depth", "a.b.c.d.e"]
    for _ in range(count):
        key = rng.choice(keys)
        section = key.split(".")[0]
        kind = rng.choice(["cli", "cli", "cli_key", "cli_shape", "toml", "toml", "toml_key", "toml_text", "bytes"])
        if kind == "cli":
            yield [f"--{key}={rng.choice(cli_values)}"], None, [key, section]
        elif kind == "cli_key":
            bad = rng.choice(key_typos)
            parts = bad.split(".")  # the error names the key, or the first of its sections that is not one
            yield [f"--{bad}=1"], None, [repr(".".join(parts[:j])) for j in range(1, len(parts) + 1)]
        elif kind == "cli_shape":
            yield rng.choice([[f"--{key}"], [key], ["-" + key + "=1"], ["--config"], ["--config", "/nonexistent"],
                              ["--config", "/"], ["--config", ""]]), None, [key, "config", "/nonexistent", "'/'", "''"]
        elif kind == "toml":
            name = key.split(".")[-1]
            text = (f"[{section}]\n" if "." in key else "") + f"{name} = {rng.choice(toml_values)}\n"
            yield [], text.encode(), [key, section]
        elif kind == "toml_key":
            header = rng.choice(["[nosuch]\nx = 1", f"[{section}.sub]\nx = 1", f"[[{section}]]\nx = 1",
                                 f'[{section}]\n"a\\nb" = 1', f"{section} = 1", f"[{section}]\n{section} = {{a = 1}}"])
            yield [], (header + "\n").encode(), ["nosuch", section, "a\\nb"]
        elif kind in ("toml_text", "bytes"):
            text = to_toml(Config()).encode()
            cut = rng.randrange(len(text))
            if kind == "toml_text":
                junk = rng.choice([b"[", b"]", b"=", b'"', b"\n[model]\n", b"x", b"[[", b"\\", b"= =", b"[" * 3000])
            else:  # not UTF-8
                junk = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xfe\xff"])
            yield [], text[:cut] + junk + text[cut:], []


def test_hostile_config_inputs_load_or_fail_in_one_line(tmp_path):
    """300 bad inputs for the config system (malformed TOML and non-UTF-8 files, wrong types per field, unknown
    sections and keys, malformed --section.key=value arguments, huge, negative and non-finite numbers): each loads,
    or raises ConfigError with one line naming the offending key, its section or the file; nothing else."""
    path = tmp_path / "c.toml"
    errors = 0
    for i, (argv, text, names) in enumerate(hostile_configs(0, 300)):
        if text is not None:
            path.write_bytes(text)
            argv = ["--config", str(path), *argv]
            names = [*names, str(path)]
        try:
            load_config(argv)
        except ConfigError as e:
            errors += 1
            message = str(e)
            assert "\n" not in message and 0 < len(message) < 20000, (i, argv, text, message)
            assert any(n and n in message for n in names), (i, argv, text, message)
    assert errors > 250  # (some mutations are sound configs)


def test_a_warm_up_that_leaves_no_room_for_the_warm_down_is_refused(make_mesh):
    from nanochat_jax.config import ModelConfig, OptimConfig
    from nanochat_jax.train import TrainRun

    model = ModelConfig(depth=1, aspect_ratio=32, head_dim=32, vocab_size=64, sequence_len=8)
    with pytest.raises(ConfigError, match=r"optim.warmup_steps=40 and the warm-down's 20 steps \(optim.warmdown_"
                                          r"ratio=0.65\) do not fit in 30 steps"):
        TrainRun(model, OptimConfig(warmup_steps=40, warmdown_ratio=0.65), 30, make_mesh(1, 1, 1), abstract=True)


def test_config_values_are_what_the_launchers_read():
    """python -m nanochat_jax.config KEY... -- [--config FILE] [overrides]: the resolved values, space-separated;
    an unknown key or a bad override is one line and exit code 1."""
    import subprocess
    import sys

    from nanochat_jax.config import config_values

    root = Path(__file__).resolve().parents[1]
    assert config_values(["sft.source", "mid.device_batch_size"], ["--config", str(root / "configs" / "d20.toml")]) \
        == "mid 32"
    assert config_values(["sft.source", "train.device_batch_size"],
                         ["--config", str(root / "configs" / "d24_modern.toml"), "--train.device_batch_size=4"]) \
        == "base 4"
    with pytest.raises(ConfigError, match="unknown config key 'sft.nope'"):
        config_values(["sft.nope"], [])
    with pytest.raises(ConfigError, match="unknown config key 'run.x'"):
        config_values(["run.x"], [])
    out = subprocess.run([sys.executable, "-m", "nanochat_jax.config", "data.source", "--", "--data.source=web"],
                         capture_output=True, text=True, cwd=root, timeout=60)
    assert out.returncode == 1 and out.stderr.strip().startswith("config: data.source=")

