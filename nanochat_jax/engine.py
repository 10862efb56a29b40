"""Fast batched sampling from a GPT with a preallocated KV cache, plus the calculator tool.

Design
- The model is split once (nnx.split) and two pure jitted functions do the work: `_prefill` runs the
  (right-padded) prompts through `GPT.decode` into a fresh cache, and `_decode_chunk` runs a
  `lax.while_loop` of up to `chunk` decode steps. Shapes are static: prompts are padded to
  prompt_bucket(length) (a power of two >= 16 up to 64, then a multiple of an eighth of the next power of two:
  a prefill's cost is its padded length) and the cache length is bucket(padded prompt + max_tokens), so prefill
  compiles once per (prompts, padded length, cache length) and decoding once per (rows, cache length, window).
- Attention reads a window of the cache, not all of it: the smallest power of two that holds every position
  the next chunk can write (prefill: the prompt bucket). Decode cost follows the live length; the few
  window sizes are each compiled once.
- On a mesh that splits only the rows (the whole model on every device: chat_web.py's CPU split, the evals'
  data meshes), each device runs the decode loop on its own rows (shard_map): no step waits on another device.
- Parameters are held in the compute dtype (cast once when the engine is made): the forward would cast
  them in every step anyway, and a decode step's time is the bytes of weights it reads.
- `num_samples` completions of a prompt share one prefill: prefill runs on the distinct prompts and
  the cache is repeated along the batch axis.
- Every decode step samples one token per row from the logits carried from the previous step (or
  takes the row's next forced token), then feeds it to the model. Rows stop on <|assistant_end|> or
  <|bos|> or after max_tokens. Each row has its own PRNG key, split every step.
- Tool use (as in nanochat): when a row closes <|python_start|> expr <|python_end|>, the host must run
  the calculator. The device loop therefore *freezes* that row right after <|python_end|> (the row
  stops advancing while the others continue) and the host, between chunks, evaluates the expression
  with `calculator.calculate` and queues <|output_start|> result <|output_end|> for the row. Queued
  tokens are handed to the next chunk (at most `chunk` per chunk) and fed one per step with mask 0.
  So the host only sees each row once per chunk, never once per token.
- `generate` streams columns: column i holds every row's i-th generated token. Rows that have
  finished get <|assistant_end|> with mask 0 as filler; the stream ends when every row has finished.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from nanochat_jax.calculator import calculate
from nanochat_jax.model import KVCache
from nanochat_jax.sharding import batch_shards, logical_to_spec

MIN_BUCKET = 16


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


def prompt_bucket(n: int) -> int:
    """The padded length of an n-token prompt: bucket(n) up to 64, above it the next multiple of bucket(n) / 8
    (68 -> 80, 130 -> 160; four lengths per octave, at most a quarter of padding, where a power of two pads a
    68-token prompt to 128 and nearly doubles its prefill)."""
    if n <= 64:
        return bucket(n)
    step = bucket(n) // 8
    return -(-int(n) // step) * step


# ---------------------------------------------------------------------------------------------
# Sampling


TOP_K_FAST = 256  # top_k up to this takes the partial top-k path in sample_tokens


def greedy(logits: jax.Array) -> jax.Array:
    """argmax over the last axis (the first of equal maxima) as two plain reductions: XLA's CPU backend runs
    argmax's (value, index) reduction unvectorised, ~0.3 ms of a ~5 ms 16-row decode step at vocab 8192."""
    V = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    at_top = (logits == top) | jnp.isnan(logits)  # a NaN is the maximum, as for jnp.argmax
    return jnp.min(jnp.where(at_top, jnp.arange(V, dtype=jnp.int32), V), axis=-1)


def sample_tokens(keys: jax.Array, logits: jax.Array, temperature, top_k=0, top_p=1.0) -> jax.Array:
    """One token per row from logits (B, V) with per-row keys (B,); each setting is one value for all rows or
    one per row ((B,), as the scheduler's rows).

    temperature 0 -> argmax. Otherwise logits / temperature, restricted to the top_k largest (0 = all)
    and then to the smallest set of most likely tokens whose probability reaches top_p (1.0 = all);
    tokens tied with the last kept one are kept too. The sampling and the filtering run only when some row
    needs them (a batch of greedy rows sorts nothing).
    """
    B, V = logits.shape
    temperature, top_k, top_p = (jnp.broadcast_to(jnp.asarray(x, dtype), (B,))
                                 for x, dtype in ((temperature, jnp.float32), (top_k, jnp.int32), (top_p, jnp.float32)))
    few = min(TOP_K_FAST, V)
    filters = (temperature > 0) & ((top_k > 0) | (top_p < 1.0))

    def threshold(desc):
        """The smallest kept logit, from each row's largest logits in descending order (B, n)."""
        k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)[:, None]
        in_top_k = jnp.arange(desc.shape[-1])[None, :] < k
        probs = jax.nn.softmax(jnp.where(in_top_k, desc, -jnp.inf), axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = in_top_k & (mass_before < top_p[:, None])  # a prefix of the sorted order
        n_keep = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)  # rank 0 always (top_p = 0: greedy)
        return jnp.take_along_axis(desc, n_keep - 1, axis=-1)

    def filtered(x):
        # a small top_k (RL and evals use 50) needs only the `few` largest logits, not a sort of the vocabulary
        small = jnp.all(~filters | ((top_k > 0) & (top_k <= few)))
        t = jax.lax.cond(small, lambda x: threshold(jax.lax.top_k(x, few)[0]),
                         lambda x: threshold(-jnp.sort(-x, axis=-1)), x)
        return jnp.where(filters[:, None] & (x < t), -jnp.inf, x)

    def sampled(logits):
        x = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)[:, None]
        x = jax.lax.cond(jnp.any(filters), filtered, lambda x: x, x)
        tokens = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
        return jnp.where(temperature > 0, tokens, greedy(logits))

    return jax.lax.cond(jnp.any(temperature > 0), sampled, greedy, logits)


# ---------------------------------------------------------------------------------------------
# Jitted pure functions of (graphdef, state, ...)


# an empty cache made where it lives: one call, each device filling its own shard (cache_shardings' pair, or None
# for the default device), instead of zeros made on one device and then moved
_zero_cache = jax.jit(KVCache.zeros, static_argnums=(0, 1, 2, 3, 4))


@functools.partial(jax.jit, static_argnums=0)
def _prefill(graphdef, state, cache: KVCache, tokens, lengths):
    """Right-padded prompts (P, L) into an empty cache; returns (logits at each prompt's last token, cache)."""
    model = nnx.merge(graphdef, state)
    logits, cache = model.decode(tokens, cache, logits_at=lengths - 1, window=tokens.shape[1])
    last = None if cache.last is None else jnp.take_along_axis(tokens, lengths[:, None] - 1, axis=1)[:, 0]
    return logits, cache.replace(lengths=lengths, last=last)


@functools.partial(jax.jit, static_argnums=(1,))
def _repeat_rows(tree, n: int):
    """Repeat every row of a (cache, logits) pytree n times: prompt p -> rows p*n .. p*n+n-1."""
    cache, logits = tree
    rep = lambda x, axis: jnp.repeat(x, n, axis=axis)  # noqa: E731
    last = None if cache.last is None else rep(cache.last, 0)
    k, v = tuple(rep(x, 0) for x in cache.k), tuple(rep(x, 0) for x in cache.v)
    return cache.replace(k=k, v=v, lengths=rep(cache.lengths, 0), last=last), rep(logits, 0)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4), donate_argnames=("cache",))
def _decode_chunk(graphdef, chunk: int, specials: tuple[int, int, int, int], window: int, mesh, state,
                  cache: KVCache, logits, keys, active, in_block, budget, forced, n_forced, temperature, top_k, top_p):
    """`_decode_rows` for all rows. mesh: None, or a mesh whose devices hold the parameters whole and split the rows
    (every argument but the state has them first, or is a scalar): each device then runs the loop on its own rows,
    with no traffic between devices in any step (a loop over the whole batch would agree on `any(active)` and on
    the sampling branch across devices in every step)."""
    args = (cache, logits, keys, active, in_block, budget, forced, n_forced, temperature, top_k, top_p)
    run = functools.partial(_decode_rows, graphdef, chunk, specials, window)
    if mesh is not None:
        rows = logical_to_spec(("batch",))
        run = jax.shard_map(run, mesh=mesh, out_specs=rows, check_vma=False,
                            in_specs=(PartitionSpec(), *jax.tree.map(lambda x: rows if x.ndim else PartitionSpec(), args)))
    return run(state, *args)


def _decode_rows(graphdef, chunk: int, specials: tuple[int, int, int, int], window: int, state, cache: KVCache,
                 logits, keys, active, in_block, budget, forced, n_forced, temperature, top_k, top_p):
    """Up to `chunk` steps for all rows. Per row: take the next forced token or sample from `logits`,
    feed it, stop on a terminal token or an exhausted budget, freeze after a closing <|python_end|>.
    Attention reads the first `window` cache positions (> every position this chunk writes): the loop runs on
    that window, sliced once here and written back at the end (on CPUs, slicing it in every step copied it for
    every layer, which cost as much as the positions it saved reading).
    Returns tokens/emitted/was_forced (B, chunk) and the new cache, logits and keys."""
    model = nnx.merge(graphdef, state)
    full = cache
    cache = cache.replace(k=tuple(x[:, :, :window] for x in cache.k), v=tuple(x[:, :, :window] for x in cache.v))
    assistant_end, bos, python_start, python_end = specials
    B = logits.shape[0]
    rows = jnp.arange(B)
    out = jnp.zeros((B, chunk), jnp.int32)

    def cond(carry):
        step, active = carry[0], carry[5]
        return (step < chunk) & jnp.any(active)

    def body(carry):
        step, cache, logits, keys, fpos, active, in_block, count, tokens, emitted, was_forced = carry
        split = jax.vmap(jax.random.split)(keys)
        keys, sub = split[:, 0], split[:, 1]
        sampled = sample_tokens(sub, logits, temperature, top_k, top_p)
        has_forced = fpos < n_forced
        tok = jnp.where(has_forced, forced[rows, jnp.minimum(fpos, chunk - 1)], sampled)
        new_logits, new_cache = model.decode(tok[:, None], cache)
        last = None if cache.last is None else jnp.where(active, new_cache.last, cache.last)
        cache = new_cache.replace(lengths=jnp.where(active, new_cache.lengths, cache.lengths), last=last)
        logits = jnp.where(active[:, None], new_logits[:, 0], logits)
        tokens = tokens.at[:, step].set(tok)
        emitted = emitted.at[:, step].set(active)
        was_forced = was_forced.at[:, step].set(active & has_forced)
        fpos = fpos + (active & has_forced)
        count = count + active
        closes_block = in_block & (tok == python_end) & ~has_forced
        finished = (tok == assistant_end) | (tok == bos)
        in_block = jnp.where(active & ~has_forced & (tok == python_start), True, in_block & ~(active & closes_block))
        active = active & ~finished & ~closes_block & (count < budget)
        return step + 1, cache, logits, keys, fpos, active, in_block, count, tokens, emitted, was_forced

    zeros = jnp.zeros((B,), jnp.int32)
    carry = (0, cache, logits, keys, zeros, active, in_block, zeros, out, out.astype(bool), out.astype(bool))
    _, cache, logits, keys, _, _, _, _, tokens, emitted, was_forced = jax.lax.while_loop(cond, body, carry)
    put_back = lambda whole, part: whole.at[:, :, :window].set(part)  # noqa: E731
    cache = cache.replace(k=tuple(map(put_back, full.k, cache.k)), v=tuple(map(put_back, full.v, cache.v)))
    return tokens, emitted, was_forced, cache, logits, keys


# ---------------------------------------------------------------------------------------------
# The host side


@dataclass
class _Row:
    """Host-side state of one generated row (the tool-use state machine)."""

    remaining: int  # tokens this row may still generate
    out: list = field(default_factory=list)  # (token, mask) pairs generated so far
    forced: deque = field(default_factory=deque)
    in_block: bool = False
    expr: list = field(default_factory=list)
    done: bool = False


def cache_shardings(mesh, kv_shape: tuple[int, ...]):
    """(shardings of each layer's keys and values, of the lengths (and last)) for a cache whose layers are kv_shape
    (B, Hkv, max_len, D)."""
    from nanochat_jax.sharding import named_sharding

    return (named_sharding(mesh, ("batch", "kv_heads", "cache_len", None), kv_shape),
            named_sharding(mesh, ("batch",), kv_shape[:1]))


def _to_compute_dtype(x: jax.Array, dtype) -> jax.Array:
    """Floating parameters wider than the compute dtype are cast once, here, instead of in every decode step:
    the forward casts every weight to the compute dtype anyway (so outputs are unchanged), and decoding is
    bound by the bytes of weights read per step (bf16 halves them against fp32 storage)."""
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize > jnp.dtype(dtype).itemsize:
        return x.astype(dtype)
    return x


def per_device_mesh(mesh: jax.sharding.Mesh | None, state, rows: int) -> jax.sharding.Mesh | None:
    """The mesh over which a decode chunk of `rows` rows runs per device (_decode_chunk), or None: `mesh` when
    every device holds the whole model (`state`'s leaves, arrays or abstract) and the rows split evenly."""
    whole_model = mesh is not None and mesh.shape.get("tensor", 1) == 1 and all(
        x.sharding.is_fully_replicated for x in jax.tree.leaves(state))
    return mesh if whole_model and rows % batch_shards(mesh) == 0 else None


class Engine:
    """Batched generation with tool use for a GPT held in memory (see the module docstring)."""

    def __init__(self, model, tokenizer, *, mesh: jax.sharding.Mesh | None = None, chunk: int = 16):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.tokenizer, self.mesh, self.chunk = tokenizer, mesh, chunk
        self.context_len = model.sequence_len
        self.graphdef, state = nnx.split(model)
        if tokenizer.vocab_size < model.vocab_size:  # a table padded past the tokenizer (load_checkpoint allows it):
            view = nnx.merge(self.graphdef, state)  # sample only ids the tokenizer can decode (the model's logits
            view.vocab_size = tokenizer.vocab_size  # are cut to them, as they are cut to vocab_size from the table)
            self.graphdef, state = nnx.split(view)
        attn = model.blocks[0].attn
        self.n_layer, self.n_kv_heads, self.head_dim = len(model.blocks), attn.n_kv_heads, attn.head_dim
        self.smear = model.smear  # the cache then carries each row's last token
        self.cache_dtype = jnp.dtype(model.compute_dtype)
        self.state = jax.tree.map(lambda x: _to_compute_dtype(x, self.cache_dtype), state)
        sp = tokenizer.encode_special
        self.assistant_end, self.bos = sp("<|assistant_end|>"), tokenizer.bos_token_id
        self.python_start, self.python_end = sp("<|python_start|>"), sp("<|python_end|>")
        self.output_start, self.output_end = sp("<|output_start|>"), sp("<|output_end|>")
        self.decode_windows: list[int] = []  # the attention window of each decode chunk of the latest generate call

    def _empty_cache(self, batch: int, max_len: int) -> KVCache:
        shape = (batch, self.n_kv_heads, max_len, self.head_dim)
        shardings = None if self.mesh is None else cache_shardings(self.mesh, shape)
        return _zero_cache(self.n_layer, shape, self.cache_dtype, self.smear, shardings)

    def _place(self, cache: KVCache) -> KVCache:
        """With a mesh: shard the cache rows over the batch mesh axes when they divide, else replicate."""
        if self.mesh is None:
            return cache
        kv, lengths = cache_shardings(self.mesh, cache.k[0].shape)
        last = None if cache.last is None else jax.device_put(cache.last, lengths)
        return cache.replace(k=jax.device_put(cache.k, kv), v=jax.device_put(cache.v, kv),
                             lengths=jax.device_put(cache.lengths, lengths), last=last)

    def generate(self, tokens, num_samples: int = 1, max_tokens: int = 256, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0):
        """Yield (token_column, mask_column) per step for num_samples rows per prompt (prompt-major order).

        tokens: one prompt (list[int]) or several (list[list[int]]). mask 1 = sampled, 0 = forced tool
        output (or filler after a row has finished)."""
        prompts = [tokens] if len(tokens) and isinstance(tokens[0], (int, np.integer)) else tokens
        if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one non-empty prompt")
        whole = all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in (num_samples, max_tokens))
        if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 0):
            whole = False
        if (not whole or num_samples < 1 or max_tokens < 1 or not temperature >= 0
                or (top_p is not None and not 0 <= top_p <= 1)):
            raise ValueError(f"need whole numbers num_samples >= 1, max_tokens >= 1 and top_k >= 0 (or None), "
                             f"temperature >= 0 and 0 <= top_p <= 1; got num_samples={num_samples!r}, "
                             f"max_tokens={max_tokens!r}, top_k={top_k!r}, temperature={temperature!r}, top_p={top_p!r}")
        P, B = len(prompts), len(prompts) * num_samples
        L = prompt_bucket(max(len(p) for p in prompts))
        max_len = bucket(L + max_tokens)

        padded = np.zeros((P, L), np.int32)
        for i, p in enumerate(prompts):
            padded[i, :len(p)] = p
        lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
        self.decode_windows = []
        logits, cache = _prefill(self.graphdef, self.state, self._empty_cache(P, max_len), jnp.asarray(padded), lengths)
        if num_samples > 1:
            cache, logits = _repeat_rows((cache, logits), num_samples)
            cache = self._place(cache)
        keys = jax.random.split(jax.random.key(seed), B)

        rows = [_Row(remaining=max_tokens) for _ in range(B)]
        top_k = min(top_k or 0, np.iinfo(np.int32).max)  # any top_k past the vocabulary keeps all of it
        sampling = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(1.0 if top_p is None else top_p))
        yielded = 0
        while not all(r.done for r in rows):
            # attend over a power-of-two window that holds every position this chunk can write
            live = max(len(prompts[i // num_samples]) + len(r.out) for i, r in enumerate(rows))
            window = min(max_len, bucket(live + self.chunk))
            self.decode_windows.append(window)
            cache, logits, keys = self._decode(rows, window, cache, logits, keys, sampling)
            # stream every column that all unfinished rows have reached
            while any(len(r.out) > yielded for r in rows) and all(len(r.out) > yielded or r.done for r in rows):
                column = [r.out[yielded] if len(r.out) > yielded else (self.assistant_end, 0) for r in rows]
                yield [t for t, _ in column], [m for _, m in column]
                yielded += 1

    def _decode(self, rows: list[_Row], window: int, cache, logits, keys, sampling):
        """One decode chunk for every row (finished rows stay inactive): the tokens go through _advance; returns
        the new (cache, logits, keys). sampling: (temperature, top_k, top_p), scalars or one value per row."""
        forced = np.zeros((len(rows), self.chunk), np.int32)
        n_forced = np.zeros((len(rows),), np.int32)
        for i, r in enumerate(rows):
            queued = list(r.forced)[: self.chunk]
            forced[i, :len(queued)], n_forced[i] = queued, len(queued)
        # host arrays as numpy: the jitted call moves them in one batch (jnp.asarray of a list is an eager op each)
        active = np.asarray([not r.done for r in rows])
        in_block = np.asarray([r.in_block for r in rows])
        budget = np.asarray([r.remaining for r in rows], np.int32)
        specials = (self.assistant_end, self.bos, self.python_start, self.python_end)
        mesh = per_device_mesh(self.mesh, self.state, len(rows))
        out = _decode_chunk(self.graphdef, self.chunk, specials, window, mesh, self.state, cache, logits, keys, active,
                            in_block, budget, forced, n_forced, *sampling)
        toks, emitted, was_forced, cache, logits, keys = out
        toks, emitted, was_forced = np.asarray(toks), np.asarray(emitted), np.asarray(was_forced)
        for i, r in enumerate(rows):
            for t, f in zip(toks[i][emitted[i]], was_forced[i][emitted[i]]):
                self._advance(r, int(t), bool(f))
        return cache, logits, keys

    def _advance(self, r: _Row, token: int, was_forced: bool) -> None:
        """Record one emitted token of a row and run the tool-use state machine (mirrors the device loop)."""
        if was_forced:
            r.forced.popleft()
        r.out.append((token, 0 if was_forced else 1))
        r.remaining -= 1
        if token in (self.assistant_end, self.bos) or r.remaining == 0:
            r.done = True
        if was_forced:
            return
        if token == self.python_start:
            r.in_block, r.expr = True, []
        elif token == self.python_end and r.in_block:
            r.in_block = False
            if r.expr:
                result = calculate(self.tokenizer.decode(r.expr))
                r.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
            r.expr = []
        elif r.in_block:
            r.expr.append(token)

    def generate_batch(self, tokens, num_samples: int = 1, **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """Full sequences (prompt + completion, without the terminal token) and masks (0 on the prompt and on
        forced tool output, 1 on sampled tokens), num_samples rows per prompt in prompt-major order."""
        prompts = [tokens] if len(tokens) and isinstance(tokens[0], (int, np.integer)) else tokens
        results = [list(p) for p in prompts for _ in range(num_samples)]
        masks = [[0] * len(p) for p in prompts for _ in range(num_samples)]
        completed = [False] * len(results)
        for column, mask_column in self.generate(prompts, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, mask_column)):
                if completed[i]:
                    continue
                if token in (self.assistant_end, self.bos):
                    completed[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
        return results, masks
