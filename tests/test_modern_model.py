"""nanochat master's model options (ModelConfig: window_pattern, value_embeds, smear, backout, layer_lambdas,
qk_scale, pad_vocab_to, init): each against an independent float64 NumPy version of master's formulas, sliding
windows against dense attention with the window mask (XLA, splash, KV-cache decode for any prefill chunking and in
the Engine), FLOPs by master's formula, the optimizer's groups, 8 devices = 1, and HF export refusing them."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanochat_jax import splash
from nanochat_jax.config import ConfigError, MeshConfig, ModelConfig, OptimConfig
from nanochat_jax.engine import Engine, _prefill
from nanochat_jax.hf import HFFormatError, hf_config
from nanochat_jax.model import KVCache, attention_windows, flops_per_token, init_model, num_params
from nanochat_jax.optim import build_optimizer, param_labels
from nanochat_jax.sharding import make_mesh
from nanochat_jax.tokenizer import Tokenizer
from nanochat_jax.train import TrainRun, microbatch_sharding, summed_grads

V = 97
EPS32 = float(np.finfo(np.float32).eps)
OPTIONS = dict(window_pattern="SSL", value_embeds=True, smear=True, backout=True, layer_lambdas=True, qk_scale=1.2,
               pad_vocab_to=64, rope_theta=100000.0)


def tiny(**kw) -> ModelConfig:
    """depth 3 (value embeddings on layers 0 and 2, backout after layer 1), 6 query heads of 16 over 2 kv heads;
    sequence_len 512 makes master's short window 128."""
    base = dict(depth=3, aspect_ratio=32, head_dim=16, n_kv_head=2, vocab_size=V, sequence_len=512,
                compute_dtype="float32")
    return ModelConfig(**{**base, **kw})


def modern(**kw) -> ModelConfig:
    return tiny(**{**OPTIONS, **kw})


def random_model(cfg: ModelConfig, seed: int = 0):
    """Every parameter random: matrices and tables normal / sqrt(rows), scalars and per-layer lambdas around 0.5."""
    model = init_model(cfg, seed)
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    new = [jax.random.normal(k, x.shape) / np.sqrt(x.shape[0]) if x.ndim == 2 else 0.5 + 0.3 * jax.random.normal(k, x.shape)
           for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


def weights(model) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(map(str, path)): np.asarray(var[...], np.float64) for path, var in flat}


def tokens_for(shape, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, V, dtype=jnp.int32)


forward_jit = nnx.jit(lambda model, tokens: model(tokens))
decode_jit = nnx.jit(lambda model, tokens, cache: model.decode(tokens, cache))


# ----------------------------------------------------------------------------------------------------------------------
# Float64 NumPy version of nanochat master's GPT.forward (gpt.py at 92d63d4), written from its formulas.


def ref_norm(x):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS32)


def ref_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def ref_windows(cfg):
    """Master's _compute_window_sizes: (left) window per layer, L = sequence_len, S = its quarter rounded up to 128."""
    long = cfg.sequence_len
    short = -(-long // 4 // 128) * 128
    windows = [short if cfg.window_pattern[i % len(cfg.window_pattern)] == "S" else long for i in range(cfg.n_layer)]
    return windows[:-1] + [long]


def ref_forward(w, tokens, cfg: ModelConfig):
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    C, H, K = cfg.n_embd, cfg.n_head, cfg.n_kv_heads
    D, n = C // H, cfg.n_layer
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, D, 2, dtype=np.float64) / D)
    freqs = np.outer(np.arange(T), inv_freq)
    cos, sin = np.cos(freqs)[None, :, None, :], np.sin(freqs)[None, :, None, :]

    def rotary(x):
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        return np.concatenate([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], axis=-1)

    x = ref_norm(w["wte/embedding"][tokens])
    if cfg.smear:
        gate = w["smear_lambda"] * ref_sigmoid(x[:, 1:, :24] @ w["smear_gate/kernel"])
        x = np.concatenate([x[:, :1], x[:, 1:] + gate * x[:, :-1]], axis=1)
    x0, middle = x, None
    rows, cols = np.arange(T)[:, None], np.arange(T)[None, :]
    for i, window in enumerate(ref_windows(cfg)):
        if cfg.layer_lambdas:
            x = w["resid_lambdas"][i] * x + w["x0_lambdas"][i] * x0
        p = f"blocks/{i}/"
        h = ref_norm(x)
        q = (h @ w[p + "attn/c_q/kernel"]).reshape(B, T, H, D)
        k = (h @ w[p + "attn/c_k/kernel"]).reshape(B, T, K, D)
        v = (h @ w[p + "attn/c_v/kernel"]).reshape(B, T, K, D)
        if cfg.value_embeds and i % 2 == (n - 1) % 2:
            ve = w[f"value_embeds/{i}/embedding"][tokens].reshape(B, T, K, D)
            v = v + 3 * ref_sigmoid(h[..., :12] @ w[p + "attn/ve_gate/kernel"])[..., None] * ve
        q, k = ref_norm(rotary(q)) * cfg.qk_scale, ref_norm(rotary(k)) * cfg.qk_scale
        q, k, v = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)
        allowed = (cols <= rows) & (rows - cols <= window)
        att = np.where(allowed, q @ k.transpose(0, 1, 3, 2) / np.sqrt(D), -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        y = (att / att.sum(-1, keepdims=True)) @ v
        x = x + y.transpose(0, 2, 1, 3).reshape(B, T, C) @ w[p + "attn/c_proj/kernel"]
        x = x + np.maximum(ref_norm(x) @ w[p + "mlp/c_fc/kernel"], 0.0) ** 2 @ w[p + "mlp/c_proj/kernel"]
        if i == n // 2:
            middle = x
    if cfg.backout:
        x = x - w["backout_lambda"] * middle
    logits = (ref_norm(x) @ w["lm_head/kernel"])[..., :cfg.vocab_size]
    return cfg.softcap * np.tanh(logits / cfg.softcap)


def assert_close(actual, expected, rel=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * np.abs(expected).max())


# ----------------------------------------------------------------------------------------------------------------------


SLOW = pytest.mark.slow  # one option at a time (each compiles a model); every option together runs by default


@pytest.mark.parametrize("option", [OPTIONS] + [pytest.param({k: v}, marks=SLOW) for k, v in OPTIONS.items()],
                         ids=lambda o: "+".join(o) if len(o) < 3 else "all")
def test_option_matches_numpy_reference(option):
    cfg = tiny(**option)
    model = random_model(cfg)
    tokens = tokens_for((2, 200))  # past the short window of 128
    logits = forward_jit(model, tokens)
    chex.assert_shape(logits, (2, 200, V))
    w = weights(model)
    expected = ref_forward(w, tokens, cfg)
    assert np.abs(expected).max() > 1.0
    assert_close(logits, expected)
    if "S" in cfg.window_pattern:  # the window matters exactly past its 128 positions
        dense = ref_forward(w, tokens, dataclasses.replace(cfg, window_pattern="L"))
        np.testing.assert_allclose(dense[:, :129], expected[:, :129], rtol=1e-9, atol=1e-9)
        assert np.abs(dense[:, 129:] - expected[:, 129:]).max() > 1e-2


def test_windows_follow_master():
    assert attention_windows(tiny(depth=8, sequence_len=2048, window_pattern="SSSL")) == (512,) * 3 + (None,) + (512,) * 3 + (None,)
    assert attention_windows(tiny(depth=4, window_pattern="S")) == (128, 128, 128, None)  # last layer always long
    assert attention_windows(tiny(depth=3, sequence_len=1000, window_pattern="SL")) == (256, None, None)
    assert attention_windows(tiny(depth=3, sequence_len=64, window_pattern="S")) == (None,) * 3  # 128 >= 64: full
    assert attention_windows(tiny()) == (None,) * 3
    with pytest.raises(ConfigError, match="window_pattern"):
        tiny(window_pattern="SXL").validate()
    with pytest.raises(ConfigError, match="init"):
        tiny(init="torch").validate()


@pytest.mark.parametrize("window", [100, pytest.param(128, marks=SLOW)])
def test_splash_sliding_window_equals_dense_with_the_window_mask(window):
    """Splash's local mask (3 blocks of 128: the first is skipped by the last queries) and XLA's local_window_size
    against XLA with an explicit mask: values and gradients (splash in Pallas' interpreter)."""
    T, D = 384, 16
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, (1, T, n, D)) for key, n in zip(keys, (2, 1, 1)))
    cotangent = jax.random.normal(keys[3], q.shape)
    rows, cols = np.arange(T)[:, None], np.arange(T)[None, :]
    mask = jnp.asarray((cols <= rows) & (rows - cols <= window))
    dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask)  # noqa: E731
    windowed = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(window, 0))  # noqa: E731
    want, pullback = jax.vjp(dense, q, k, v)
    for attention in (windowed, lambda q, k, v: splash.causal_attention(q, k, v, window)):
        got, pullback_got = jax.vjp(attention, q, k, v)
        np.testing.assert_allclose(got, want, atol=1e-5)
        for g, w in zip(pullback_got(cotangent), pullback(cotangent)):
            np.testing.assert_allclose(g, w, atol=1e-5 * np.abs(w).max())


# ----------------------------------------------------------------------------------------------------------------------
# KV cache and Engine


def test_decode_equals_the_full_forward_for_any_chunking():
    """Windows, value embeddings and the smear across chunk boundaries: every chunk's first position smears in the
    cache's last token (master loses it at later multi-token chunks). Chunks of few sizes: one compile each."""
    cfg = modern()
    model = random_model(cfg, seed=2)
    tokens = tokens_for((2, 200), seed=3)
    full = forward_jit(model, tokens)
    for chunks in [(100, 100), (1, 49, 50, 100), (50, 50, 1, 49, 50)]:
        cache, parts, start = KVCache.init(cfg, batch=2, max_len=256), [], 0
        for n in chunks:
            logits, cache = decode_jit(model, tokens[:, start:start + n], cache)
            parts.append(logits)
            start += n
        chex.assert_trees_all_equal(cache.last, tokens[:, -1])
        assert_close(jnp.concatenate(parts, axis=1), full)


def test_decode_needs_the_last_token_with_the_smear():
    model = random_model(modern())
    with pytest.raises(ValueError, match="last"):
        model.decode(tokens_for((1, 4)), KVCache.init(tiny(), 1, 8))


N_BYTES = 256


def engine_model(seed=0):
    """A random modern model over a byte tokenizer whose special tokens are never the greedy pick."""
    model = random_model(modern(vocab_size=N_BYTES + 9, sequence_len=512), seed)
    model.lm_head.kernel[...] = (3.0 * model.lm_head.kernel[...]).at[:, N_BYTES:].set(0.0)
    return model


def naive_greedy(model, prompt, max_tokens, width=256):
    forward = nnx.jit(lambda model, tokens: model(tokens))
    tokens = list(prompt)
    for _ in range(max_tokens):
        padded = jnp.asarray([tokens + [0] * (width - len(tokens))])
        tokens.append(int(jnp.argmax(forward(model, padded)[0, len(tokens) - 1])))
    return tokens


def test_engine_greedy_equals_the_full_forward():
    """Ragged prompts longer than the window, prefilled together (right-padded) and decoded in chunks of 8."""
    model, tokenizer = engine_model(), Tokenizer({bytes([i]): i for i in range(N_BYTES)})
    engine = Engine(model, tokenizer, chunk=8)
    prompts = [list(np.random.default_rng(0).integers(0, N_BYTES, 150)), [256, 65, 66]]
    results, _ = engine.generate_batch(prompts, num_samples=2, max_tokens=20, temperature=0.0)
    for i, prompt in enumerate(prompts):
        want = naive_greedy(model, prompt, 20)
        assert results[2 * i] == results[2 * i + 1] == want


def test_frozen_rows_keep_their_last_token():
    """A row that is not active in a decode chunk (finished, or frozen for the calculator) keeps its cache."""
    engine = Engine(engine_model(), Tokenizer({bytes([i]): i for i in range(N_BYTES)}), chunk=4)
    tokens, lengths = jnp.asarray([[65, 66, 67, 0], [70, 71, 72, 73]], jnp.int32), jnp.asarray([3, 4], jnp.int32)
    logits, cache = _prefill(engine.graphdef, engine.state, engine._empty_cache(2, 32), tokens, lengths)
    chex.assert_trees_all_equal(cache.last, jnp.asarray([67, 73], jnp.int32))
    rows = [engine_row(4), engine_row(4, done=True)]
    sampling = (jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0))
    cache, _, _ = engine._decode(rows, 16, cache, logits, jax.random.split(jax.random.key(0), 2), sampling)
    assert int(cache.lengths[0]) == 7 and int(cache.last[0]) == rows[0].out[-1][0]
    assert int(cache.lengths[1]) == 4 and int(cache.last[1]) == 73


def engine_row(remaining, done=False):
    from nanochat_jax.engine import _Row

    return _Row(remaining=remaining, done=done)


# ----------------------------------------------------------------------------------------------------------------------
# Counts, init, optimizer, sharding, export


def test_params_and_flops_by_masters_formulas():
    """d24 with master's options: the tables are lookups, the gates are matmuls; attention counts the window."""
    cfg = ModelConfig(depth=24, vocab_size=32768, sequence_len=2048, **OPTIONS)  # width 1536, 12 heads of 128
    C, Vp, L = 1536, 32768, 24
    matmul = Vp * C + L * 12 * C * C + 12 * 12 * 12 + 24  # lm_head, blocks, 12 value-embedding gates, smear gate
    assert num_params(cfg) == matmul + Vp * C + 12 * Vp * C + 2 * L + 2  # + wte, 12 value embeddings, scalars
    windows = [512, 512, 2048] * 7 + [512, 512, 2048]  # SSL tiled, the last (24th) long either way
    assert flops_per_token(cfg) == 6 * matmul + sum(12 * 12 * 128 * w for w in windows)
    assert num_params(tiny(vocab_size=100, pad_vocab_to=64)) - num_params(tiny(vocab_size=100)) == 2 * 28 * 96
    model = init_model(modern())
    assert num_params(modern()) == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_master_init():
    cfg = modern(init="master", aspect_ratio=128)  # width 384
    w = weights(init_model(cfg, seed=1))
    C, s = 384, np.sqrt(3 / 384)
    assert abs(w["wte/embedding"].std() / 0.8 - 1) < 0.05 and abs(w["lm_head/kernel"].std() / 0.001 - 1) < 0.05
    for name, bound in [("blocks/0/attn/c_q/kernel", s), ("blocks/1/attn/c_v/kernel", s),
                        ("blocks/2/mlp/c_fc/kernel", 0.4 * s), ("value_embeds/2/embedding", s)]:
        assert np.abs(w[name]).max() <= bound and np.abs(w[name]).max() > 0.95 * bound, name
    assert all(np.all(w[f"blocks/{i}/{m}/c_proj/kernel"] == 0) for i in range(3) for m in ("attn", "mlp"))
    for name in ("smear_gate/kernel", "blocks/0/attn/ve_gate/kernel"):
        assert 0 <= w[name].min() and w[name].max() <= 0.02
    np.testing.assert_allclose(w["resid_lambdas"], [1.15, 1.10, 1.05], rtol=1e-6)
    np.testing.assert_allclose(w["x0_lambdas"], [0.20, 0.125, 0.05], rtol=1e-6)
    assert w["smear_lambda"] == 0 and np.isclose(w["backout_lambda"], 0.2)
    assert C == cfg.n_embd


def test_optimizer_groups():
    params = nnx.to_pure_dict(nnx.state(init_model(modern()), nnx.Param))
    labels = param_labels(params)
    assert labels["blocks"][0]["attn"]["ve_gate"]["kernel"] == "muon"  # inside the blocks, as in master
    assert labels["value_embeds"]["0"]["embedding"] == "value_embedding"
    assert (labels["resid_lambdas"], labels["x0_lambdas"], labels["smear_lambda"], labels["backout_lambda"],
            labels["smear_gate"]["kernel"]) == ("resid_lambdas", "x0_lambdas", "scalar", "scalar", "scalar")
    optimizer = build_optimizer(OptimConfig(), 96, 10)
    groups = next(s for s in optimizer.init(params) if hasattr(s, "inner_states")).inner_states
    assert set(groups) == {"embedding", "unembedding", "muon", "value_embedding", "resid_lambdas", "x0_lambdas",
                           "scalar"}
    first_release = nnx.to_pure_dict(nnx.state(init_model(tiny()), nnx.Param))
    groups = next(s for s in optimizer.init(first_release) if hasattr(s, "inner_states")).inner_states
    assert set(groups) == {"embedding", "unembedding", "muon"}  # the state (and checkpoints) it always had


def _loss_and_grads(cfg, params, mesh_shape):
    """(loss, gradients) of one batch of 8 rows for the train state's parameters sharded on a mesh."""
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, 8, cfg.sequence_len + 1), dtype=np.int32)
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}
    mesh = make_mesh(MeshConfig(*mesh_shape), devices=jax.devices()[: int(np.prod(mesh_shape))])
    run = TrainRun(cfg, OptimConfig(), 1, mesh, params=params)
    with jax.set_mesh(mesh):
        grads, losses = jax.jit(lambda p, b: summed_grads(run.graphdef, p, b))(
            run.params, jax.device_put(batch, microbatch_sharding(mesh)))
    return float(losses[0]), jax.device_get(grads)


def test_eight_devices_equal_one_with_every_option():
    """Loss and gradients of a model with every option (random parameters: at master's init the backout's gradient is
    exactly 0 in theory, float noise in practice) on a data x fsdp x tensor mesh of 8 simulated devices equal one
    device's. (The optimizer's new groups are plain AdamW, elementwise.)"""
    cfg = modern(sequence_len=256)
    params = nnx.to_pure_dict(nnx.state(random_model(cfg, seed=4), nnx.Param))
    ref_loss, ref_grads = _loss_and_grads(cfg, params, (1, 1, 1))
    loss, grads = _loss_and_grads(cfg, params, (2, 2, 2))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), err_msg=jax.tree_util.keystr(path))


def test_hf_export_refuses_the_options_in_one_line():
    for field, value in OPTIONS.items():
        if field in ("rope_theta", "pad_vocab_to"):  # config.json holds it; the padding is cut off on export
            continue
        with pytest.raises(HFFormatError, match=f"model.{field}=.*first-release architecture only") as e:
            hf_config(dataclasses.replace(tiny(), **{field: value}), tokenizer=None)
        assert "\n" not in str(e.value)
