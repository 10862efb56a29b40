"""The inference engine: KV-cache generation equals naive recomputation, batching, shared prefill,
sampling filters, and the calculator tool-use state machine."""

import dataclasses
import io

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanochat_jax.common import UserError
from nanochat_jax.config import ModelConfig
from nanochat_jax.checkpoint import load_model
from nanochat_jax import engine as engine_module
from nanochat_jax.engine import Engine, _decode_chunk, bucket, per_device_mesh, greedy, prompt_bucket, sample_tokens
from nanochat_jax.model import GPT, Linear, init_model
from nanochat_jax.tokenizer import Tokenizer
from conftest import load_script

N_BYTES = 256  # byte-level tokenizer: ids 0..255 are bytes, 256.. are the special tokens


def byte_tokenizer() -> Tokenizer:
    return Tokenizer({bytes([i]): i for i in range(N_BYTES)})


def tiny_config() -> ModelConfig:
    return ModelConfig(depth=2, aspect_ratio=32, head_dim=16, n_kv_head=2, vocab_size=N_BYTES + 9,
                       sequence_len=128, compute_dtype="float32")


def random_model(seed: int = 0) -> GPT:
    """A tiny GPT with every kernel random (the real init zeroes lm_head and the projections); the special
    tokens' lm_head columns are zero, so greedy decoding never picks them."""
    model = init_model(tiny_config(), seed=seed)
    key = jax.random.key(seed + 100)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, Linear):
            key, sub = jax.random.split(key)
            fan_in = module.kernel.shape[0]
            module.kernel[...] = jax.random.normal(sub, module.kernel.shape) / np.sqrt(fan_in)
    model.lm_head.kernel[...] = (3.0 * model.lm_head.kernel[...]).at[:, N_BYTES:].set(0.0)
    return model


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    return Engine(model, tokenizer, chunk=8)


def naive_greedy(model, prompt, max_tokens, stop, width=64):
    """Recompute the full forward for every new token (padded to a fixed width: causal, so padding after
    the last real token does not change its logits; one compilation)."""
    forward = nnx.jit(lambda model, tokens: model(tokens))
    tokens = list(prompt)
    for _ in range(max_tokens):
        padded = jnp.asarray([tokens + [0] * (width - len(tokens))])
        token = int(jnp.argmax(forward(model, padded)[0, len(tokens) - 1]))
        if token in stop:
            break
        tokens.append(token)
    return tokens


PROMPTS = [[256, 72, 105, 32, 116, 104, 101, 114, 101], [256, 65], list(range(60, 80))]


def test_bucket():
    assert [bucket(n) for n in (1, 16, 17, 100, 128, 129)] == [16, 16, 32, 128, 128, 256]
    # prompts: powers of two up to 64, then multiples of an eighth of the next power of two
    lengths = (1, 17, 33, 64, 65, 68, 80, 81, 100, 128, 129, 130, 161, 256, 257)
    assert [prompt_bucket(n) for n in lengths] == [16, 32, 64, 64, 80, 80, 80, 96, 112, 128, 160, 160, 192, 256, 320]
    for n in range(1, 2049):
        padded = prompt_bucket(n)
        assert n <= padded <= bucket(n) and (n <= 64 or padded - n < padded // 4 + 1)


def test_greedy_equals_naive_recompute(model, engine, tokenizer):
    stop = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id}
    for prompt in PROMPTS:
        expected = naive_greedy(model, prompt, 20, stop)
        results, masks = engine.generate_batch(prompt, max_tokens=20, temperature=0.0)
        assert results == [expected]
        assert masks == [[0] * len(prompt) + [1] * (len(expected) - len(prompt))]


def test_bf16_engine_holds_bf16_weights_and_equals_fp32_storage(tokenizer):
    """With compute_dtype bfloat16 the engine casts the fp32 parameters once; since the forward casts every
    weight to bf16 anyway, greedy generation equals the naive recompute on the fp32-stored model."""
    cfg = dataclasses.replace(tiny_config(), compute_dtype="bfloat16")
    model = random_model()
    model_bf16 = nnx.merge(nnx.graphdef(init_model(cfg)), nnx.state(model))  # same fp32 params, bf16 compute
    engine = Engine(model_bf16, tokenizer, chunk=8)
    assert {x.dtype for x in jax.tree.leaves(engine.state)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model_bf16))} == {jnp.dtype(jnp.float32)}  # model untouched
    stop = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id}
    expected = naive_greedy(model_bf16, PROMPTS[0], 12, stop)
    assert engine.generate_batch(PROMPTS[0], max_tokens=12, temperature=0.0)[0] == [expected]


def record_calls(monkeypatch, owner, name: str, what) -> list:
    """Wrap owner.<name> (a module's function or a class's method) so each call appends what(*args) to the list
    returned."""
    calls, original = [], getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append(what(*args))
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def test_attention_window_follows_the_live_length(model, tokenizer):
    """Decode chunks attend over the smallest power-of-two window holding every position they write (not the
    whole 128-position cache); 60 greedy tokens still equal the naive full recomputation."""
    engine = Engine(model, tokenizer, chunk=8)
    stop = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id}
    prompt = PROMPTS[0]  # 9 tokens: prefill bucket 16, cache bucket(16 + 60) = 128
    expected = naive_greedy(model, prompt, 60, stop, width=128)
    assert len(expected) == len(prompt) + 60  # no early stop: every chunk runs
    results, _ = engine.generate_batch(prompt, max_tokens=60, temperature=0.0)
    assert results == [expected]
    windows = engine.decode_windows
    live = [len(prompt) + 8 * i for i in range(len(windows))]  # cache length before each chunk
    assert windows == [min(128, bucket(n + 8)) for n in live]
    assert windows[:3] == [32, 32, 64] and windows[-1] == 128


def test_batched_prompts_equal_one_by_one(engine):
    batched, _ = engine.generate_batch(PROMPTS, max_tokens=20, temperature=0.0)
    single = [engine.generate_batch(p, max_tokens=20, temperature=0.0)[0][0] for p in PROMPTS]
    assert batched == single
    assert [len(r) for r in batched] == [len(p) + 20 for p in PROMPTS]


def test_streaming_columns(engine):
    columns = list(engine.generate(PROMPTS[:2], max_tokens=11, temperature=0.0))
    assert len(columns) == 11
    assert all(len(c) == 2 and len(m) == 2 and m == [1, 1] for c, m in columns)


def test_num_samples_share_one_prefill(model, tokenizer, monkeypatch):
    engine = Engine(model, tokenizer, chunk=8)
    prefills = record_calls(monkeypatch, engine_module, "_prefill", lambda graphdef, state, cache, tokens, lengths: tokens.shape)
    prompt = PROMPTS[0]
    results, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=16, temperature=1.0, seed=1)
    assert prefills == [(1, 16)]  # one prefill of one row for four samples
    assert len(results) == 4 and all(r[: len(prompt)] == prompt for r in results)
    assert len({tuple(r) for r in results}) > 1  # rows have their own keys
    again, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=16, temperature=1.0, seed=1)
    assert again == results
    other, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=16, temperature=1.0, seed=2)
    assert other != results
    greedy, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=16, temperature=0.0)
    assert greedy[0] == greedy[1] == greedy[2] == greedy[3]


def test_top_k_one_and_tiny_top_p_equal_greedy(engine):
    greedy, _ = engine.generate_batch(PROMPTS, max_tokens=12, temperature=0.0)
    top1, _ = engine.generate_batch(PROMPTS, max_tokens=12, temperature=1.5, top_k=1, seed=3)
    tiny_p, _ = engine.generate_batch(PROMPTS, max_tokens=12, temperature=1.5, top_p=1e-6, seed=4)
    assert top1 == greedy and tiny_p == greedy



def test_a_top_k_past_the_vocabulary_keeps_all_of_it(engine):
    """chat_cli -k 10000000000 was an OverflowError traceback (top_k went to an int32); nanochat clamps it to the
    vocabulary, as sample_tokens does."""
    every, _ = engine.generate_batch(PROMPTS, max_tokens=6, temperature=1.0, seed=5)
    assert engine.generate_batch(PROMPTS, max_tokens=6, temperature=1.0, top_k=10**10, seed=5)[0] == every

def test_sharded_cache_matches_unsharded(model, tokenizer, engine, make_mesh):
    sharded = Engine(model, tokenizer, mesh=make_mesh(data=2), chunk=8)
    expected, _ = engine.generate_batch(PROMPTS[:2], max_tokens=10, temperature=0.0)
    assert sharded.generate_batch(PROMPTS[:2], max_tokens=10, temperature=0.0)[0] == expected


def test_rows_split_over_devices_decode_without_talking_to_each_other(model, tokenizer, make_mesh):
    """On a mesh that splits only rows (the whole model on every device), each device runs the decode loop on its own
    rows: the compiled chunk has no collective, where the loop over the whole batch agrees on `any(active)` and on
    the sampling branch across devices in every step. A mesh that splits the model keeps the whole-batch loop."""
    engine = Engine(model, tokenizer, mesh=make_mesh(data=2), chunk=4)
    split_model = Engine(model, tokenizer, mesh=make_mesh(tensor=2))
    assert per_device_mesh(engine.mesh, engine.state, 2) is engine.mesh and per_device_mesh(engine.mesh, engine.state, 3) is None
    assert per_device_mesh(split_model.mesh, split_model.state, 2) is None
    B, n = 2, np.zeros(2, np.int32)
    args = (engine.state, engine._empty_cache(B, 32), jnp.zeros((B, model.vocab_size), jnp.float32),
            jax.random.split(jax.random.key(0), B), np.ones(B, bool), np.zeros(B, bool), n + 8,
            np.zeros((B, 4), np.int32), n, np.float32(0), np.int32(0), np.float32(1))
    specials = (engine.assistant_end, engine.bos, engine.python_start, engine.python_end)
    hlo = lambda mesh: _decode_chunk.lower(engine.graphdef, 4, specials, 16, mesh, *args).compile().as_text()  # noqa: E731
    assert "all-reduce" not in hlo(engine.mesh) and "all-reduce" in hlo(None)


def test_a_table_padded_past_the_tokenizer_samples_only_its_ids(tokenizer):
    """load_checkpoint and import_hf accept a model whose vocab_size exceeds the tokenizer's: the engine must never
    sample an id the tokenizer cannot decode (tiktoken's decode raised KeyError 'Invalid token for decoding: 315')."""
    model = init_model(dataclasses.replace(tiny_config(), vocab_size=320), seed=0)
    kernel = jnp.zeros_like(model.lm_head.kernel[...])
    model.lm_head.kernel[...] = kernel.at[:, N_BYTES + 9:].set(jax.random.normal(jax.random.key(1), (64, 320 - 265)))
    engine = Engine(model, tokenizer, chunk=4)
    prompt = tokenizer.encode("hi", prepend=tokenizer.bos_token_id)
    for temperature in (0.0, 1.0):
        results, _ = engine.generate_batch(prompt, max_tokens=12, temperature=temperature)
        assert len(results[0]) == len(prompt) + 12 and max(results[0]) < tokenizer.vocab_size
    assert model.vocab_size == 320  # the caller's model is unchanged
    out = io.StringIO()
    load_chat_cli().stream(engine, tokenizer, prompt, out=out, max_tokens=6, temperature=0.0)
    assert out.getvalue() == "\x00" * 6 + "\n"  # every id the tokenizer has scores 0: greedy takes the first


# ---------------------------------------------------------------------------------------------
# The sampling function on toy logits


sample = jax.jit(sample_tokens)


def test_sample_greedy_top_k_top_p():
    logits = jax.random.normal(jax.random.key(0), (64, 50)) * 3
    keys = jax.random.split(jax.random.key(1), 64)
    best = jnp.argmax(logits, -1)
    assert (sample(keys, logits, 0.0) == best).all()
    assert (sample(keys, logits, 1.0, 1) == best).all()  # top_k=1
    assert (sample(keys, logits, 1.0, 0, 1e-6) == best).all()  # top_p tiny
    assert (sample(keys, logits, 1.0, 0, 0.0) == best).all()  # top_p 0 keeps the top token, not everything


def test_greedy_is_argmax_with_its_ties_and_nans():
    x = np.random.default_rng(0).standard_normal((8, 300)).astype(np.float32)
    x[1, [7, 200]] = 9.0  # a tie: the first
    x[2, [10, 20]] = np.nan  # NaNs: the first, as argmax
    x[3, 5], x[4] = np.inf, -np.inf
    got = greedy(jnp.asarray(x))
    chex.assert_type(got, jnp.int32)
    np.testing.assert_array_equal(got, jnp.argmax(jnp.asarray(x), axis=-1))
    assert got[1] == 7 and got[2] == 10 and got[3] == 5 and got[4] == 0


def test_small_top_k_takes_a_partial_top_k_with_the_same_samples(monkeypatch):
    """top_k <= TOP_K_FAST filters from lax.top_k's largest logits instead of sorting the vocabulary: the same
    kept set, so the same tokens for the same keys, with and without top_p."""
    import nanochat_jax.engine as engine_module

    logits = jax.random.normal(jax.random.key(3), (32, 1000)) * 2
    keys = jax.random.split(jax.random.key(4), 32)
    settings = [(1, 1.0), (5, 1.0), (50, 1.0), (50, 0.8), (256, 0.95), (300, 0.9), (0, 0.9)]
    fast = [sample_tokens(keys, logits, 1.0, k, p) for k, p in settings]
    monkeypatch.setattr(engine_module, "TOP_K_FAST", 0)  # every top_k through the full sort
    for (k, p), got in zip(settings, fast):
        np.testing.assert_array_equal(got, sample_tokens(keys, logits, 1.0, k, p), err_msg=f"top_k={k} top_p={p}")
    top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
    assert all(int(t) in row for t, row in zip(fast[1], top5))


def test_generate_refuses_bad_sampling_settings(engine):
    for bad in (dict(top_p=-0.1), dict(top_p=1.5), dict(top_p=float("nan")), dict(temperature=float("nan")),
                dict(top_k=-1), dict(top_k=0.5)):
        with pytest.raises(ValueError, match="top_p"):
            engine.generate_batch(PROMPTS, max_tokens=2, **bad)
    with pytest.raises(ValueError, match="num_samples=1.5"):
        next(engine.generate(PROMPTS, max_tokens=2, num_samples=1.5))
    with pytest.raises(ValueError, match="max_tokens=5.5"):  # (a fractional budget never reached 0: it ran away)
        engine.generate_batch(PROMPTS, max_tokens=5.5)
    tokens, _ = engine.generate_batch([np.array(PROMPTS[0])], max_tokens=2, temperature=0.0)  # numpy prompts
    assert len(tokens) == 1
    first = [column for column, _ in engine.generate(np.array(PROMPTS[0]), max_tokens=2, temperature=0.0)]
    both = [column for column, _ in engine.generate(np.array([PROMPTS[0], PROMPTS[0]]), max_tokens=2, temperature=0.0)]
    assert [c[0] for c in first] == [c[0] for c in both] == [c[1] for c in both]


def _frequencies(logits, n=20000, **kwargs):
    keys = jax.random.split(jax.random.key(7), n)
    tokens = sample_tokens(keys, jnp.tile(jnp.asarray(logits, jnp.float32)[None], (n, 1)), **kwargs)
    return np.bincount(np.asarray(tokens), minlength=len(logits)) / n


def test_sample_frequencies_follow_softmax():
    logits = np.array([1.0, 2.0, 0.5, -1.0])
    expected = np.asarray(jax.nn.softmax(logits / 0.7))
    np.testing.assert_allclose(_frequencies(logits, temperature=0.7), expected, atol=0.015)


def test_sample_frequencies_with_top_k_and_top_p():
    logits = np.log(np.array([0.3, 0.5, 0.05, 0.15]))
    np.testing.assert_allclose(_frequencies(logits, temperature=1.0, top_k=2), [0.375, 0.625, 0, 0], atol=0.015)
    # top_p=0.7: 0.5 alone is not enough, 0.5 + 0.3 is -> keep tokens 1 and 0
    np.testing.assert_allclose(_frequencies(logits, temperature=1.0, top_p=0.7), [0.375, 0.625, 0, 0], atol=0.015)
    np.testing.assert_allclose(_frequencies(logits, temperature=1.0, top_p=0.9), [0.3 / .95, 0.5 / .95, 0, 0.15 / .95],
                               atol=0.015)


# ---------------------------------------------------------------------------------------------
# Tool use with a scripted model


class ScriptedGPT(GPT):
    """A GPT whose logits depend only on the last input token, through a (V, V) transition table."""

    def __init__(self, cfg, transitions: dict[int, int], default: int, *, rngs):
        super().__init__(cfg, rngs=rngs)
        table = np.full((cfg.vocab_size,), default, np.int32)
        for a, b in transitions.items():
            table[a] = b
        self.script = nnx.Param(jax.nn.one_hot(table, cfg.vocab_size) * 20.0)

    def decode(self, tokens, cache, logits_at=None, window=None):
        _, cache = super().decode(tokens, cache, window=window)
        if logits_at is not None:
            tokens = jnp.take_along_axis(tokens, logits_at[:, None], axis=1)[:, 0]
        return self.script[...][tokens], cache


def scripted_engine(tokenizer, chunk):
    sp = tokenizer.encode_special
    c = ord
    transitions = {
        c("?"): sp("<|python_start|>"), sp("<|python_start|>"): c("1"), c("1"): c("/"), c("/"): c("7"),
        c("7"): sp("<|python_end|>"), sp("<|output_end|>"): c("!"), c("!"): sp("<|assistant_end|>"),
        c("."): c("!"), sp("<|assistant_start|>"): c("?"),
    }
    model = ScriptedGPT(tiny_config(), transitions, default=c("Z"), rngs=nnx.Rngs(0))
    return Engine(model, tokenizer, chunk=chunk)


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_tool_use_forces_calculator_output(tokenizer, chunk):
    engine = scripted_engine(tokenizer, chunk)
    sp = tokenizer.encode_special
    tool_prompt, plain_prompt = [tokenizer.bos_token_id] + tokenizer.encode("what is 1/7?"), tokenizer.encode("ok.")
    results, masks = engine.generate_batch([tool_prompt, plain_prompt], max_tokens=40, temperature=0.0)
    output = tokenizer.encode("0.142857142857")
    expected = [sp("<|python_start|>"), *tokenizer.encode("1/7"), sp("<|python_end|>"),
                sp("<|output_start|>"), *output, sp("<|output_end|>"), ord("!")]
    assert results[0] == tool_prompt + expected
    assert masks[0] == [0] * len(tool_prompt) + [1] * 5 + [0] * (len(output) + 2) + [1]
    assert results[1] == plain_prompt + [ord("!")]
    assert masks[1] == [0] * len(plain_prompt) + [1]


def test_tool_use_streams_aligned_columns(tokenizer):
    engine = scripted_engine(tokenizer, chunk=4)
    columns = list(engine.generate([tokenizer.encode("?"), tokenizer.encode(".")], max_tokens=40, temperature=0.0))
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    assert len(columns) == 5 + 16 + 2  # the tool row: 5 sampled + 16 forced + "!" + <|assistant_end|>
    assert columns[-1] == ([assistant_end, assistant_end], [1, 0])  # the plain row finished long before
    assert columns[1][0] == [ord("1"), assistant_end]


def test_max_tokens_stops_inside_forced_output(tokenizer):
    engine = scripted_engine(tokenizer, chunk=4)
    results, masks = engine.generate_batch(tokenizer.encode("?"), max_tokens=8, temperature=0.0)
    assert len(results[0]) == 1 + 8 and masks[0][-3:] == [0, 0, 0]


# ---------------------------------------------------------------------------------------------
# scripts/chat_cli.py


def load_chat_cli():
    return load_script("chat_cli")


def test_chat_respond_keeps_tool_calls_as_parts(tokenizer):
    chat_cli = load_chat_cli()
    engine = scripted_engine(tokenizer, chunk=8)
    messages, out = [], io.StringIO()
    tokens = chat_cli.respond(engine, tokenizer, messages, "what is 1/7", out=out, max_tokens=40, temperature=0.0)
    assert messages == [{"role": "user", "content": "what is 1/7"},
                        {"role": "assistant", "content": [{"type": "text", "text": "?"},
                                                          {"type": "python", "text": "1/7"},
                                                          {"type": "python_output", "text": "0.142857142857"},
                                                          {"type": "text", "text": "!"}]}]
    assert out.getvalue() == tokenizer.decode(tokens) + "\n"
    # the next turn renders the reply exactly as generated
    ids, _ = tokenizer.render_conversation({"messages": messages})
    assert ids[-len(tokens) - 1:] == tokens + [tokenizer.encode_special("<|assistant_end|>")]


def test_chat_cli_refuses_a_conversation_over_the_context_and_keeps_it(model, tokenizer):
    from nanochat_jax.web import ChatError

    chat_cli = load_chat_cli()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(ChatError, match="this model reads at most 127"):
        chat_cli.respond(Engine(model, tokenizer), tokenizer, messages, "tell me " * 40, out=io.StringIO())
    assert messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    for bad in (["--max-tokens", "0"], ["-t", "inf"], ["-t", "nan"]):  # (-t inf sampled uniformly at random)
        with pytest.raises(SystemExit):
            chat_cli.parse_args(bad)
    # a reply ends at the trained context (128) even when --max-tokens asks for more
    prompt = tokenizer.encode("z" * 120, prepend=tokenizer.bos_token_id)
    tokens = chat_cli.stream(Engine(model, tokenizer), tokenizer, prompt, out=io.StringIO(), max_tokens=500,
                             temperature=1.0, seed=0)
    assert len(tokens) <= 128 - len(prompt)


def save_tiny_checkpoint(home, model, tokenizer, stage="sft", step=3):
    import optax

    from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir

    tokenizer.save(home / "tok")
    params = nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])
    meta = {"step": step, "stage": stage, "model": dataclasses.asdict(tiny_config()), "tokenizer": str(home / "tok")}
    ckpt = Checkpointer(checkpoint_dir(stage, tiny_config().depth))
    ckpt.save(step, params, optax.sgd(0.1).init(params), {}, meta)
    ckpt.close()


def test_chat_cli_prompt_and_interactive(home, model, tokenizer, capsys, monkeypatch):
    chat_cli = load_chat_cli()
    with pytest.raises(UserError, match="^cannot load the rl checkpoint: [^\n]*$"):  # run_script prints it
        chat_cli.main(["--source", "rl", "-p", "hi"])

    save_tiny_checkpoint(home, model, tokenizer)
    expected = io.StringIO()
    chat_cli.respond(Engine(model, tokenizer), tokenizer, [], "hi", out=expected, max_tokens=8, temperature=0.0)
    assert chat_cli.main(["--source", "sft", "-p", "hi", "-t", "0", "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "source=sft step=3 depth=2" in out and "temperature=0.0" in out
    assert out.endswith("Assistant: " + expected.getvalue())

    lines = iter(["hello", "clear", "", "hi", "exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert chat_cli.main(["--source", "sft", "-t", "0", "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("Assistant: ") == 2 and "Conversation cleared." in out
    assert out.endswith("Assistant: " + expected.getvalue())  # after 'clear', "hi" is a fresh conversation

    loaded = Engine(*load_model("sft")[:2])
    prompt = tokenizer.encode("hello", prepend=tokenizer.bos_token_id)
    assert loaded.generate_batch(prompt, max_tokens=8, temperature=0.0) == \
        Engine(model, tokenizer).generate_batch(prompt, max_tokens=8, temperature=0.0)


def test_chat_cli_reads_input_that_is_not_utf8(home, model, tokenizer, capsys, monkeypatch):
    """A terminal's stdin decodes strictly under a UTF-8 locale: a Latin-1 line ended the chat with a
    UnicodeDecodeError traceback (and the lines after it were lost)."""
    chat_cli = load_chat_cli()
    save_tiny_checkpoint(home, model, tokenizer)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9\nclear\nexit\n"), encoding="utf-8",
                                                      errors="strict"))
    assert chat_cli.main(["--source", "sft", "-t", "0", "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("Assistant: ") == 1 and "Conversation cleared." in out


def test_chat_cli_base_model_continues_plain_text(home, model, tokenizer, capsys):
    chat_cli = load_chat_cli()
    save_tiny_checkpoint(home, model, tokenizer, stage="base")
    assert chat_cli.main(["--source", "base", "-p", "hello", "-t", "0", "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    results, _ = Engine(model, tokenizer).generate_batch(
        tokenizer.encode("hello", prepend=tokenizer.bos_token_id), max_tokens=8, temperature=0.0)
    stop = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id}
    continuation = []
    for t in results[0][len(tokenizer.encode("hello")) + 1:]:
        if t in stop:
            break
        continuation.append(t)
    assert "Assistant:" not in out and out.endswith("hello" + tokenizer.decode(continuation) + "\n")
