"""Hugging Face interop: export/import round trips, tokenizer.json and the chat template against our Tokenizer,
clear errors for what the format cannot hold, the two scripts; and, where torch and transformers are installed,
logits and token ids equal to transformers' own NanoChat."""

import dataclasses
import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from nanochat_jax import corpus, hf
from nanochat_jax.common import UserError
from nanochat_jax.config import ModelConfig
from nanochat_jax.model import EPS, init_model
from nanochat_jax.tokenizer import SPECIAL_TOKENS, Tokenizer
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 600
# Letters, digits, punctuation, whitespace runs and multi-byte characters: everything the split regex cares about.
PIECES = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"()-_/\\#@$%&*+=<>|") + [
    " ", "  ", "\n", "\n\n", "\t", "\r\n", "'s", "'ll", "é", "ß", "東京", "😀", "🍎", "\u00a0"]
TEXTS = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)
SAMPLES = ["", "Hello world!", "Zoë ate 12345 apples 🍎🍎 at 7:30.", "  leading spaces\n\n\ttabs\r\n",
           "東京は日本の首都です。", "def f(x):\n    return x ** 2  # square", corpus.document("val", 3)]
CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there!"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3 ?\n"},
                  {"role": "assistant", "content": " 6 "}]},
    {"messages": [{"role": "user", "content": "Compute 12*7"},
                  {"role": "assistant", "content": [{"type": "text", "text": "Let me see. "},
                                                    {"type": "python", "text": "12*7"},
                                                    {"type": "python_output", "text": "84"},
                                                    {"type": "text", "text": " It is 84."}]}]},
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_from_iterator(itertools.islice(corpus.documents("train"), 200), VOCAB)


def tiny_cfg(tok, **kw) -> ModelConfig:
    return ModelConfig(**{**dict(depth=2, aspect_ratio=32, head_dim=16, n_kv_head=2, vocab_size=tok.vocab_size,
                                 sequence_len=64, compute_dtype="float32"), **kw})


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Our pure param dict with every array random (the zero-initialised projections too), numpy float32."""
    rng = np.random.default_rng(seed)
    shapes = jax.tree.map(lambda a: a.shape, nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: init_model(cfg)), nnx.Param)))
    return jax.tree.map(lambda s: rng.normal(0, 0.5, s).astype(np.float32), shapes, is_leaf=lambda x: isinstance(x, tuple))


def model_with(cfg: ModelConfig, params: dict):
    model = init_model(cfg)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)
    return model


def our_logits(cfg, params, ids) -> np.ndarray:
    return np.asarray(model_with(cfg, params)(jnp.asarray(ids, jnp.int32)))


def random_ids(cfg, seed=0, shape=(3, 48)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape)


# ---------------------------------------------------------------------------------------------
# Without torch


def test_export_import_round_trip_is_exact(tok, tmp_path):
    cfg = tiny_cfg(tok, softcap=12.0, rope_theta=5000.0)
    params = random_params(cfg)
    hf.export_hf(params, cfg, tok, tmp_path / "f32")
    assert sorted(p.name for p in (tmp_path / "f32").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    mode = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "f32").iterdir()}
    assert mode["model.safetensors"] == mode["config.json"]  # as readable as the rest (safetensors writes 0600)
    config = json.loads((tmp_path / "f32" / "config.json").read_text())
    assert config["model_type"] == "nanochat" and config["rms_norm_eps"] == EPS == float(np.finfo(np.float32).eps)
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (64, 256, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["rope_parameters"]["rope_theta"] == 5000.0 and config["final_logit_softcapping"] == 12.0

    got_cfg, got, got_tok = hf.import_hf(tmp_path / "f32", compute_dtype="float32")
    assert got_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, got, params)
    assert got_tok.enc._mergeable_ranks == tok.enc._mergeable_ranks and got_tok.pattern == tok.pattern
    ids = random_ids(cfg)
    np.testing.assert_array_equal(our_logits(got_cfg, got, ids), our_logits(cfg, params, ids))

    hf.export_hf(params, cfg, tok, tmp_path / "bf16", dtype="bfloat16")
    _, got16, _ = hf.import_hf(tmp_path / "bf16", compute_dtype="float32")
    want16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(np.float32), params)
    jax.tree.map(np.testing.assert_array_equal, got16, want16)
    assert (tmp_path / "bf16" / "model.safetensors").stat().st_size < 0.6 * (tmp_path / "f32" / "model.safetensors").stat().st_size


def test_export_cuts_off_the_vocabulary_padding(tok, tmp_path):
    """pad_vocab_to only pads the tables (the logits are sliced back): a first-release model trained with it was
    refused ('model.pad_vocab_to=64 has no equivalent')."""
    cfg = tiny_cfg(tok, pad_vocab_to=64)
    params = random_params(cfg, seed=3)
    assert params["wte"]["embedding"].shape[0] == 640 != tok.vocab_size
    hf.export_hf(params, cfg, tok, tmp_path)
    got_cfg, got, _ = hf.import_hf(tmp_path, compute_dtype="float32")
    assert got_cfg == dataclasses.replace(cfg, pad_vocab_to=1)
    np.testing.assert_array_equal(got["wte"]["embedding"], params["wte"]["embedding"][:tok.vocab_size])
    ids = random_ids(cfg)
    np.testing.assert_allclose(our_logits(got_cfg, got, ids), our_logits(cfg, params, ids), rtol=0, atol=1e-5)


def test_import_reads_sharded_safetensors(tok, tmp_path):
    from safetensors.numpy import save_file

    cfg = tiny_cfg(tok)
    params = random_params(cfg, seed=7)
    folder = hf.export_hf(params, cfg, tok, tmp_path)
    tensors = hf.load_hf_weights(folder)
    (folder / "model.safetensors").unlink()
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[:5], "model-00002-of-00002.safetensors": keys[5:]}
    for name, shard_keys in shards.items():
        save_file({k: tensors[k] for k in shard_keys}, folder / name, metadata={"format": "pt"})
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _, got, _ = hf.import_hf(folder)
    jax.tree.map(np.testing.assert_array_equal, got, params)


def test_tokenizer_round_trip_through_tokenizer_json(tok):
    back = hf.tokenizer_from_hf_json(json.loads(json.dumps(hf.tokenizer_json(tok))))
    assert back.enc._mergeable_ranks == tok.enc._mergeable_ranks
    assert back.pattern == tok.pattern and back.special == tok.special
    for text in SAMPLES:
        assert back.encode(text) == tok.encode(text)


@pytest.fixture(scope="module")
def hf_tokenizer(tok):
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_str(json.dumps(hf.tokenizer_json(tok)))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(text=TEXTS)
def test_tokenizer_json_encodes_like_ours(tok, hf_tokenizer, text):
    ids = hf_tokenizer.encode(text, add_special_tokens=False).ids
    assert ids == tok.encode(text)
    assert hf_tokenizer.decode(ids) == text


def test_tokenizer_json_samples_and_specials(tok, hf_tokenizer):
    for text in SAMPLES:
        assert hf_tokenizer.encode(text, add_special_tokens=False).ids == tok.encode(text)
    assert [hf_tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [tok.encode_special(t) for t in SPECIAL_TOKENS]


def render_template(conversation, add_generation_prompt: bool) -> str:
    """The chat template rendered the way transformers renders it (sandboxed, trim_blocks, lstrip_blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    return env.from_string(hf.CHAT_TEMPLATE).render(messages=conversation["messages"], bos_token="<|bos|>",
                                                    add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_chat_template_renders_like_ours(tok, hf_tokenizer, conversation):
    text = render_template(conversation, add_generation_prompt=False)
    assert hf_tokenizer.encode(text, add_special_tokens=False).ids == tok.render_conversation(conversation)[0]
    prompt = render_template({"messages": conversation["messages"][:-1]}, add_generation_prompt=True)
    assert hf_tokenizer.encode(prompt, add_special_tokens=False).ids == tok.render_for_completion(conversation)


def base_hf_config(**changes) -> dict:
    config = {"model_type": "nanochat", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 256,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "relu2",
              "max_position_embeddings": 128, "rms_norm_eps": EPS, "final_logit_softcapping": 15.0,
              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    return {**config, **changes}


def test_model_config_from_hf_maps_fields():
    cfg = hf.model_config_from_hf(base_hf_config(), compute_dtype="float32")
    assert (cfg.depth, cfg.n_embd, cfg.n_head, cfg.n_kv_heads, cfg.sequence_len) == (2, 64, 4, 2, 128)
    assert (cfg.softcap, cfg.rope_theta, cfg.vocab_size) == (15.0, 10000.0, 512)
    legacy = hf.model_config_from_hf({**base_hf_config(rope_theta=500.0, final_logit_softcapping=None),
                                      "rope_parameters": None, "num_key_value_heads": 4})
    assert (legacy.rope_theta, legacy.softcap, legacy.n_kv_head, legacy.compute_dtype) == (500.0, 0.0, 0, "bfloat16")


@pytest.mark.parametrize("changes, match", [
    ({"model_type": "llama"}, r"model_type='llama' is not supported"),
    ({"hidden_act": "silu"}, r"hidden_act='silu' is not supported: nanochat's MLP uses relu"),
    ({"attention_bias": True}, r"attention_bias=True is not supported: our linear layers have no biases"),
    ({"intermediate_size": 200}, r"intermediate_size=200 is not supported: our MLP width is 4 \* hidden_size = 256"),
    ({"num_hidden_layers": 3, "intermediate_size": 256}, r"hidden_size=64 is not supported: .*multiple of num_hidden_layers=3"),
    ({"num_attention_heads": 64}, r"num_attention_heads=64 is not supported: .*heads of an even width"),
    ({"num_key_value_heads": 3}, r"num_key_value_heads=3 is not supported: must divide num_attention_heads=4"),
    ({"head_dim": 32}, r"head_dim=32 is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, r"rope_type='yarn' is not supported"),
    ({"vocab_size": None}, r"vocab_size must be a positive integer"),
    ({"num_key_value_heads": 2.0}, r"num_key_value_heads must be a positive integer, got 2.0"),
    ({"num_key_value_heads": True}, r"num_key_value_heads must be a positive integer, got True"),
    ({"max_position_embeddings": 64.7}, r"max_position_embeddings must be a positive integer, got 64.7"),
    ({"rope_parameters": {"rope_theta": "abc"}}, r"rope_theta must be a number >= 0, got 'abc'"),
])
def test_unsupported_hf_configs_name_the_option(changes, match):
    with pytest.raises(hf.HFFormatError, match=match):
        hf.model_config_from_hf(base_hf_config(**changes))


def test_other_eps_warns():
    with pytest.warns(UserWarning, match=r"rms_norm_eps=1e-06 differs from ours"):
        hf.model_config_from_hf(base_hf_config(rms_norm_eps=1e-6))


def test_missing_keys_mean_transformers_defaults():
    """A config.json without final_logit_softcapping runs soft-capped at 15 in transformers (NanoChatConfig's
    default); the import read it as no soft-cap (logits differed by 2.4 on a tiny model)."""
    config = {k: v for k, v in base_hf_config().items() if k not in ("final_logit_softcapping", "rms_norm_eps")}
    with pytest.warns(UserWarning, match=r"rms_norm_eps=1e-06 differs from ours"):
        cfg = hf.model_config_from_hf(config)
    assert cfg.softcap == 15.0
    assert hf.model_config_from_hf(base_hf_config(final_logit_softcapping=None)).softcap == 0.0
    del config["intermediate_size"]  # transformers: 8192, the MLP width of a 2048-wide model only
    with pytest.raises(hf.HFFormatError, match=r"intermediate_size=8192 is not supported"):
        hf.model_config_from_hf(config)
    with pytest.warns(UserWarning, match=r"rms_norm_eps=1e-06"):
        assert hf.model_config_from_hf({**config, "hidden_size": 2048, "num_attention_heads": 16}).n_embd == 2048


def test_unrepresentable_weights_and_tokenizers_are_clear_errors(tok, tmp_path):
    cfg = tiny_cfg(tok)
    params = random_params(cfg)
    with pytest.raises(hf.HFFormatError, match=r"model.value_embeds=True has no equivalent in the Hugging Face NanoChat"):
        hf.export_hf(params, dataclasses.replace(cfg, value_embeds=True), tok, tmp_path / "x")
    hf.hf_config(dataclasses.replace(cfg, value_embeds=False), tok)  # at its default the option changes nothing
    hf.hf_config(dataclasses.replace(cfg, init="master"), tok)  # how the weights began does not change the forward
    hf.hf_config(dataclasses.replace(cfg, window_pattern="LL"), tok)  # every layer full context, as "L" (was refused)
    with pytest.raises(hf.HFFormatError, match=r"model.window_pattern='SL' has no equivalent"):
        hf.hf_config(dataclasses.replace(cfg, window_pattern="SL"), tok)
    with pytest.raises(hf.HFFormatError, match=r"parameters value_embeds have no equivalent"):
        hf.params_to_hf({**params, "value_embeds": np.zeros(3)}, cfg)
    with pytest.raises(hf.HFFormatError, match=r"dtype='float16' is not one of float32, bfloat16"):
        hf.export_hf(params, cfg, tok, tmp_path / "x", dtype="float16")
    tensors = hf.params_to_hf(params, cfg)
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    with pytest.raises(hf.HFFormatError, match=r"unexpected \(not representable\) \['model.layers.0.self_attn.q_proj.bias'\]"):
        hf.params_from_hf(tensors, cfg)
    del tensors["model.layers.0.self_attn.q_proj.bias"], tensors["lm_head.weight"]
    with pytest.raises(hf.HFFormatError, match=r"missing \['lm_head.weight'\]"):
        hf.params_from_hf(tensors, cfg)
    tied = hf.params_from_hf(tensors, cfg, tie_word_embeddings=True)
    np.testing.assert_array_equal(tied["lm_head"]["kernel"], params["wte"]["embedding"].T)

    table = hf.tokenizer_json(tok)
    with pytest.raises(hf.HFFormatError, match=r"model.type='Unigram' is not supported"):
        hf.tokenizer_from_hf_json({**table, "model": {"type": "Unigram"}})
    with pytest.raises(hf.HFFormatError, match=r"are not nanochat's special tokens"):
        hf.tokenizer_from_hf_json({**table, "added_tokens": table["added_tokens"][:-1]})
    with pytest.raises(hf.HFFormatError, match=r"pre_tokenizer has no Split regex"):
        hf.tokenizer_from_hf_json({**table, "pre_tokenizer": {"type": "ByteLevel"}})
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text(json.dumps(hf.hf_config(cfg, tok)))
    hf.save_hf_tokenizer(tok, tmp_path / "pickled", cfg.sequence_len)
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors or model.safetensors.index.json .*never pickles"):
        hf.import_hf(tmp_path / "pickled")


def test_malformed_folders_name_the_file(tok, tmp_path):
    """Damaged or foreign files give an HFFormatError naming the file, never a bare KeyError / TypeError."""
    cfg = tiny_cfg(tok)
    good = hf.export_hf(random_params(cfg), cfg, tok, tmp_path / "good")
    config = json.loads((good / "config.json").read_text())
    tokenizer = json.loads((good / "tokenizer.json").read_text())
    weights = (good / "model.safetensors").read_bytes()

    def folder(name, config_text=None, tokenizer_text=None, weights_bytes=None, index=None):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(config_text if config_text is not None else json.dumps(config))
        (d / "tokenizer.json").write_text(tokenizer_text if tokenizer_text is not None else json.dumps(tokenizer))
        if index is None:
            (d / "model.safetensors").write_bytes(weights if weights_bytes is None else weights_bytes)
        else:
            (d / "model.safetensors.index.json").write_text(index)
        return d

    no_vocab = {**tokenizer, "model": {k: v for k, v in tokenizer["model"].items() if k != "vocab"}}
    cases = [
        (folder("truncated_weights", weights_bytes=weights[:100]), r"model.safetensors is not a readable safetensors"),
        (folder("no_weight_map", index="{}"), r"model.safetensors.index.json: missing or malformed field"),
        (folder("config_list", config_text="[1, 2]"), r"config.json should hold a JSON object, not a list"),
        (folder("config_cut", config_text=json.dumps(config)[:40]), r"config.json is not valid JSON"),
        (folder("layers_bool", config_text=json.dumps({**config, "num_hidden_layers": True})),
         r"num_hidden_layers must be a positive integer, got True"),
        (folder("positions_null", config_text=json.dumps({**config, "max_position_embeddings": None})),
         r"config.json: max_position_embeddings must be a positive integer, got None"),
        (folder("tokenizer_no_vocab", tokenizer_text=json.dumps(no_vocab)), r"tokenizer.json: missing or malformed"),
    ]
    for path, message in cases:
        with pytest.raises(hf.HFFormatError, match=message):
            hf.import_hf(path)


def test_scripts_import_then_export(tok, home, tmp_path, capsys):
    from nanochat_jax.checkpoint import load_model

    cfg = tiny_cfg(tok)
    params = random_params(cfg, seed=1)
    folder = hf.export_hf(params, cfg, tok, tmp_path / "hf_in")
    import_hf = load_script("import_hf")
    assert import_hf.main([str(folder), "--stage", "sft", "--step", "5", "--compute-dtype", "float32"]) == 0
    model, got_tok, meta = load_model("sft")
    assert (meta["step"], meta["stage"], meta["model"]["depth"]) == (5, "sft", 2)
    assert got_tok.encode(SAMPLES[2]) == tok.encode(SAMPLES[2])
    ids = random_ids(cfg, seed=2)
    np.testing.assert_array_equal(np.asarray(model(jnp.asarray(ids, jnp.int32))), our_logits(cfg, params, ids))
    with pytest.raises(UserError, match=r"already holds checkpoints \(steps 5\)"):  # run_script: one line, exit 1
        import_hf.main([str(folder), "--stage", "sft"])
    # --force on the same step: the old import is set aside (it crashed with Orbax's StepAlreadyExists before)
    assert import_hf.main([str(folder), "--stage", "sft", "--step", "5", "--force", "--compute-dtype", "float32"]) == 0
    assert "moved the previous run in " in (err := capsys.readouterr().err) and "(steps 5) to " in err
    assert load_model("sft")[2]["step"] == 5

    export_hf = load_script("export_hf")
    assert export_hf.main(["--source", "sft", "--out", str(tmp_path / "hf_out")]) == 0
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf_out" / name).read_text() == (folder / name).read_text()
    _, back, _ = hf.import_hf(tmp_path / "hf_out")
    jax.tree.map(np.testing.assert_array_equal, back, params)
    with pytest.raises(UserError, match="cannot load the base checkpoint"):  # run_script prints it, exit code 1
        export_hf.main(["--source", "base"])


def test_import_refuses_a_negative_step(tok, home, tmp_path, capsys):
    """A checkpoint directory named -5 is one that no listing counts: the import said it succeeded, then nothing
    found it (and a second import saw no checkpoints there)."""
    folder = hf.export_hf(random_params(tiny_cfg(tok)), tiny_cfg(tok), tok, tmp_path / "hf_in")
    with pytest.raises(SystemExit) as e:
        load_script("import_hf").main([str(folder), "--stage", "mid", "--step", "-5"])
    assert e.value.code == 2 and "--step must be >= 0, got -5" in capsys.readouterr().err
    assert not (home / "checkpoints" / "mid" / "d2").exists() or not any((home / "checkpoints" / "mid" / "d2").iterdir())


def test_export_to_a_path_it_cannot_write_is_one_line(tok, home, tmp_path):
    folder = hf.export_hf(random_params(tiny_cfg(tok)), tiny_cfg(tok), tok, tmp_path / "hf_in")
    assert load_script("import_hf").main([str(folder), "--stage", "sft"]) == 0
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match=r"cannot write the export to .*a_file: \[Errno 17\] File exists"):
        load_script("export_hf").main(["--source", "sft", "--out", str(tmp_path / "a_file")])


# ---------------------------------------------------------------------------------------------
# Against transformers itself (skipped where torch or transformers is missing)


@pytest.fixture(scope="module")
def torch_and_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "NanoChatForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no NanoChat model")
    return torch, transformers


def max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_transformers_model_imports_with_equal_logits(tok, tmp_path, torch_and_transformers):
    torch, transformers = torch_and_transformers
    config = transformers.NanoChatConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=EPS, final_logit_softcapping=15.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)
    torch.manual_seed(0)
    theirs = transformers.NanoChatForCausalLM(config).eval()
    with torch.no_grad():
        for p in theirs.parameters():  # the default init is too small to exercise the soft-cap
            p.normal_(0.0, 0.5)
    theirs.save_pretrained(tmp_path)
    hf.save_hf_tokenizer(tok, tmp_path, 64)
    cfg, params, _ = hf.import_hf(tmp_path, compute_dtype="float32")
    ids = random_ids(cfg, seed=3)
    with torch.no_grad():
        want = theirs(torch.tensor(ids)).logits.numpy()
    got = our_logits(cfg, params, ids)
    assert np.abs(want).max() > 5.0
    diff = max_abs_diff(got, want)
    print(f"transformers -> ours: max abs logit difference {diff:.3g}")
    assert diff < 1e-4


def test_exported_model_loads_in_transformers_with_equal_logits(tok, tmp_path, torch_and_transformers):
    torch, transformers = torch_and_transformers
    cfg = tiny_cfg(tok)
    params = random_params(cfg, seed=4)
    hf.export_hf(params, cfg, tok, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "NanoChatForCausalLM"
    ids = random_ids(cfg, seed=5)
    with torch.no_grad():
        want = theirs(torch.tensor(ids)).logits.numpy()
    got = our_logits(cfg, params, ids)
    assert np.abs(want).max() > 5.0
    diff = max_abs_diff(got, want)
    print(f"ours -> transformers: max abs logit difference {diff:.3g}")
    assert diff < 1e-4


def test_autotokenizer_encodes_and_renders_like_ours(tok, tmp_path, torch_and_transformers):
    _, transformers = torch_and_transformers
    hf.save_hf_tokenizer(tok, tmp_path, 2048)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    texts = SAMPLES + ["".join(rng.choice(PIECES, size=rng.integers(0, 60))) for _ in range(100)]
    for text in texts:
        assert auto(text)["input_ids"] == tok.encode(text)
        assert auto.decode(tok.encode(text)) == text
    for conversation in CONVERSATIONS:
        rendered = auto.apply_chat_template(conversation["messages"], tokenize=True, return_dict=True)["input_ids"]
        assert rendered == tok.render_conversation(conversation)[0]
        prompt = auto.apply_chat_template(conversation["messages"][:-1], tokenize=True, add_generation_prompt=True,
                                          return_dict=True)["input_ids"]
        assert prompt == tok.render_for_completion(conversation)


def test_a_forced_import_keeps_the_tokenizer_of_the_one_it_replaces(home, tmp_path):
    """import_hf --force of another model (other tokenizer) at the same stage and depth: the earlier import's
    tokenizer stays where its checkpoints, and a stage trained from it, name it (it was overwritten: they no longer
    loaded, and that tokenizer was nowhere on disk); the new one goes to tokenizer-2; the same tokenizer is reused."""
    from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir, load_model

    tok_a = Tokenizer.train_from_iterator(SAMPLES * 20, vocab_size=300)
    tok_b = Tokenizer.train_from_iterator(["zebras quietly juggle xylophones"] * 60, vocab_size=300)
    folders = {name: hf.export_hf(random_params(tiny_cfg(t)), tiny_cfg(t), t, tmp_path / name)
               for name, t in (("a", tok_a), ("b", tok_b))}
    import_hf = load_script("import_hf")
    assert import_hf.main([str(folders["a"]), "--stage", "base", "--compute-dtype", "float32"]) == 0
    model, _, meta = load_model("base")
    ckpt = Checkpointer(checkpoint_dir("mid", 2), async_save=False)  # a mid run trained from import a
    ckpt.save(3, nnx.to_pure_dict(nnx.state(model, nnx.Param)), None, None, {**meta, "stage": "mid", "step": 3})
    ckpt.close()
    assert import_hf.main([str(folders["b"]), "--stage", "base", "--force", "--compute-dtype", "float32"]) == 0
    _, got_b, meta_b = load_model("base")
    assert meta_b["tokenizer"] == "imported/base_d2/tokenizer-2" and got_b.encode("zebras") == tok_b.encode("zebras")
    _, got_a, meta_a = load_model("mid")
    assert meta_a["tokenizer"] == "imported/base_d2/tokenizer" and got_a.encode(SAMPLES[0]) == tok_a.encode(SAMPLES[0])
    assert import_hf.main([str(folders["a"]), "--stage", "base", "--force", "--compute-dtype", "float32"]) == 0
    assert load_model("base")[2]["tokenizer"] == "imported/base_d2/tokenizer"
    assert sorted(p.name for p in (home / "imported" / "base_d2").iterdir()) == ["tokenizer", "tokenizer-2"]
