"""Continuous batching in front of the Engine: the chat requests of all users share one KV cache.

Owns the serving loop and its state: a fixed number of decode slots (the rows of one preallocated cache of
bucket(context_len) positions), the bounded queue of requests waiting for a slot, and each request's sampling
settings (temperature, top_k, top_p, max_tokens, seed) and token stream.

One background thread runs the loop: admit waiting requests into free slots (the prompts admitted together are
prefilled together, one call per prompt-length bucket and power-of-two group of rows, and copied into their slots:
nobody waits for the others to finish; requests that arrived during a prefill are admitted before the next chunk,
else a reply one moment late would need a chunk more than the others), run one decode chunk for all slots
(Engine._decode: the engine's jitted while_loop with per-row sampling settings, and Engine._advance's calculator
state machine per row), hand each request its new tokens, free the slots of finished and cancelled requests.
Shapes stay fixed (slots rows, a power-of-two cache and windows), so the loop compiles a few programs once.
A request gets the tokens Engine.generate gives it alone (its prompt is padded to the same bucket, the prefill's
rows are independent, and its row has the same key).

On a CPU backend, `serving_engine` splits the slots over several host devices (`split_cpu`, before JAX starts):
each device decodes its share of the rows on a thread of its own (a decode step is bound by reading each row's
cache, which one thread does at about half the memory bandwidth of two).

Consumers receive (tokens, masks, finish) events through the request's `sink`: the new tokens (without the
terminal token; mask 0 = forced tool output) and finish = None, "stop" (the model ended the reply), "length"
(max_tokens or the context), "cancelled" or "error".
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from nanochat_jax.config import MeshConfig
from nanochat_jax.engine import Engine, _prefill, _Row, bucket, prompt_bucket
from nanochat_jax.sharding import make_mesh, replicated

CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def split_cpu(devices: int) -> None:
    """Have XLA present this machine's CPU as `devices` devices (call before JAX's first computation; a count
    already in $XLA_FLAGS wins). Accelerator backends are unaffected."""
    flags = os.environ.get("XLA_FLAGS", "")
    if devices > 1 and CPU_DEVICES_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {CPU_DEVICES_FLAG}={devices}".strip()


def serving_engine(model, tokenizer, slots: int, cpu_devices: int, chunk: int = 16) -> Engine:
    """The Engine a Scheduler of `slots` rows decodes with: on a CPU backend, a data mesh over the first
    `cpu_devices` host devices (those split_cpu made) when they divide the slots, with the weights replicated, so
    the rows are split over them; else the model's own device."""
    devices = jax.devices()[:cpu_devices]
    if jax.default_backend() != "cpu" or len(devices) < 2 or slots % len(devices):
        return Engine(model, tokenizer, chunk=chunk)
    mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1), devices)
    graphdef, state = nnx.split(model)
    return Engine(nnx.merge(graphdef, jax.device_put(state, replicated(mesh))), tokenizer, mesh=mesh, chunk=chunk)


def group_rows(n: int) -> int:
    """How many of n waiting prompts of one length bucket to prefill in one call, and the rows of that call: a power
    of two (few compiled shapes), all n padded up to the next one when that adds at most a quarter of n rows (or
    one row), else the largest power of two <= n (a call costs about as much as a few rows more: 31 -> 32, 3 -> 4,
    but 6 -> 4 + 2)."""
    up = 1 << (n - 1).bit_length()
    return up if up - n <= max(1, n // 4) else up // 2


class Busy(RuntimeError):
    """The wait queue is full."""


@dataclass(eq=False)
class Request:
    """One completion: the prompt, its sampling settings, and where its events go."""

    prompt: list[int]
    max_tokens: int
    sink: Callable[[list[int], list[int], str | None], None]
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    cancelled: bool = False
    row: _Row | None = field(default=None, repr=False)
    sent: int = 0  # tokens of row.out handed to the sink

    def cancel(self) -> None:
        """Stop generating (the slot frees at the next chunk boundary); the sink gets finish="cancelled"."""
        self.cancelled = True


@functools.partial(jax.jit, donate_argnums=(0, 1, 2))
def _insert(cache, logits, keys, rows, row_logits, seeds, slots):
    """Copy prefilled prompts (a cache of P rows and L positions, their last logits) into rows `slots` (P,) of the
    shared state, each with the PRNG key Engine.generate gives one sample of its seed; a slot past the last one drops
    its row. seeds: (P,) uint32, the seeds modulo 2**32 (what jax.random.key makes of a Python int without x64)."""
    row_keys = jax.vmap(lambda seed: jax.random.split(jax.random.key(seed), 1)[0])(seeds)
    L = rows.k[0].shape[2]
    put = lambda whole, part: whole.at[slots].set(part, mode="drop")  # noqa: E731
    k = tuple(layer.at[slots, :, :L].set(new, mode="drop") for layer, new in zip(cache.k, rows.k))
    v = tuple(layer.at[slots, :, :L].set(new, mode="drop") for layer, new in zip(cache.v, rows.v))
    last = None if cache.last is None else put(cache.last, rows.last)
    cache = cache.replace(k=k, v=v, lengths=put(cache.lengths, rows.lengths), last=last)
    return cache, put(logits, row_logits), put(keys, row_keys)


class Scheduler:
    """Continuous batching over `slots` rows of one cache (see the module docstring)."""

    def __init__(self, engine, slots: int = 8, max_queue: int = 64):
        if slots < 1 or max_queue < 0:
            raise ValueError(f"need slots >= 1 and max_queue >= 0, got slots={slots}, max_queue={max_queue}")
        self.engine, self.slots, self.max_queue = engine, slots, max_queue
        self.context_len = engine.context_len
        self.cache_len = bucket(engine.context_len)
        self.requests: list[Request | None] = [None] * slots
        self.waiting: deque[Request] = deque()
        self.cond = threading.Condition()
        self.closed, self.error = False, None
        self.cache = engine._empty_cache(slots, self.cache_len)
        if engine.mesh is None:  # committed to its device as the decode leaves it (else every insert compiles twice)
            self.cache = jax.device_put(self.cache, self.cache.lengths.sharding)
        # the per-slot state lives where the decode leaves it (split like the cache's rows), so the programs that
        # insert prompts compile once for each group size, not again after the first decode has moved it
        self.row_sharding = self.cache.lengths.sharding
        self.logits = None  # (slots, vocab) fp32, made with the first prefill
        self.keys = jax.device_put(jax.random.split(jax.random.key(0), slots), self.row_sharding)
        self.thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self.thread.start()

    # -- the client side ---------------------------------------------------------------------------

    def submit(self, prompt: list[int], max_tokens: int, sink, *, temperature: float = 0.0, top_k: int | None = 0,
               top_p: float | None = 1.0, seed: int = 0) -> Request:
        """Queue a request; raises Busy when the queue is full, ValueError for bad settings. max_tokens is cut to
        what fits in the model's context after the prompt."""
        if not len(prompt) or len(prompt) >= self.context_len:
            raise ValueError(f"the prompt must hold 1 to {self.context_len - 1} tokens, got {len(prompt)}")
        top_k, top_p = top_k or 0, 1.0 if top_p is None else top_p
        if (not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1 or not temperature >= 0
                or not isinstance(top_k, (int, np.integer)) or top_k < 0 or not 0 <= top_p <= 1
                or not isinstance(seed, (int, np.integer)) or not -2**63 <= seed < 2**63):
            raise ValueError(f"need a whole max_tokens >= 1, temperature >= 0, a whole top_k >= 0, 0 <= top_p <= 1 "
                             f"and a 64-bit integer seed; got max_tokens={max_tokens!r}, temperature={temperature!r}, "
                             f"top_k={top_k!r}, top_p={top_p!r}, seed={seed!r}")
        request = Request(list(prompt), min(int(max_tokens), self.context_len - len(prompt)), sink,
                          float(temperature), int(top_k), float(top_p), int(seed))
        with self.cond:
            if self.closed or self.error:
                raise RuntimeError(f"the scheduler has stopped{f': {self.error}' if self.error else ''}")
            gone = [r for r in self.waiting if r.cancelled]  # (their clients left: they hold no waiting place)
            self.waiting = deque(r for r in self.waiting if not r.cancelled) if gone else self.waiting
            busy = len(self.waiting) >= self.max_queue and None not in self.requests
            if not busy:
                self.waiting.append(request)
                self.cond.notify()
        for r in gone:
            r.sink([], [], "cancelled")
        if busy:
            raise Busy(f"The server is busy: {len(self.waiting)} requests are already waiting. "
                       "Please try again in a moment.")
        return request

    def generate(self, tokens, num_samples: int = 1, max_tokens: int = 256, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0):
        """Engine.generate's interface for one prompt and one sample (the web chat streams from it): yields
        ([token], [mask]) per token; closing the generator cancels the request."""
        if num_samples != 1:
            raise ValueError("the scheduler generates one sample per request")
        events = queue.Queue()
        request = self.submit(tokens, max_tokens, lambda *event: events.put(event), temperature=temperature,
                              top_k=top_k, top_p=top_p, seed=seed)
        try:
            while True:
                tokens, masks, finish = events.get()
                for token, mask in zip(tokens, masks):
                    yield [token], [mask]
                if finish == "error":
                    raise RuntimeError(f"generation failed: {self.error}")
                if finish is not None:
                    return
        finally:
            request.cancel()

    def busy_slots(self) -> int:
        return sum(r is not None for r in self.requests)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join()

    # -- the loop ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        admitted = []
        try:
            while True:
                with self.cond:
                    while not self.closed and not self.waiting and self.busy_slots() == 0:
                        self.cond.wait()
                    if self.closed:
                        break
                    admitted = []
                    for slot in [i for i, r in enumerate(self.requests) if r is None]:
                        if not self.waiting:
                            break
                        admitted.append((slot, self.waiting.popleft()))
                for slot, request in admitted:
                    if request.cancelled:
                        request.sink([], [], "cancelled")
                self._admit([(slot, request) for slot, request in admitted if not request.cancelled])
                for slot, request in enumerate(self.requests):
                    if request is not None and request.cancelled:
                        self._finish(slot, "cancelled")
                with self.cond:  # requests that came during this prefill join the coming chunk, not the next one
                    if admitted and self.waiting and None in self.requests:
                        continue
                if self.busy_slots():
                    self._step()
        except Exception as e:  # a device failure: every request hears of it, later ones are refused
            with self.cond:
                self.error = f"{type(e).__name__}: {e}"
        with self.cond:
            pending = [r for r in self.requests if r is not None] + list(self.waiting)
            pending += [r for _, r in admitted if r.row is None and not r.cancelled]  # taken, never put in a slot
            self.requests, self.waiting = [None] * self.slots, deque()
        for request in pending:
            request.sink([], [], "error" if self.error else "cancelled")

    def _admit(self, admitted: list[tuple[int, Request]]) -> None:
        """Prefill the admitted prompts and copy them into their slots: one prefill per prompt-length bucket (each
        prompt padded as Engine.generate pads it alone) and group (group_rows)."""
        by_bucket: dict[int, list[tuple[int, Request]]] = {}
        for slot, request in admitted:
            by_bucket.setdefault(prompt_bucket(len(request.prompt)), []).append((slot, request))
        for L, group in by_bucket.items():
            while group:
                rows = group_rows(len(group))
                self._prefill_group(L, group[:rows], rows)
                group = group[rows:]

    def _prefill_group(self, L: int, group: list[tuple[int, Request]], rows: int) -> None:
        """Prefill one group of prompts padded to L positions and `rows` rows (engine._prefill; a padding row is a
        one-token prompt) and copy them into their slots."""
        engine = self.engine
        padded = np.zeros((rows, L), np.int32)
        lengths = np.ones((rows,), np.int32)
        seeds = np.zeros((rows,), np.uint32)
        slots = np.full((rows,), self.slots, np.int32)  # past the last slot: _insert drops the padding rows
        for i, (slot, request) in enumerate(group):
            padded[i, :len(request.prompt)] = request.prompt
            lengths[i], seeds[i], slots[i] = len(request.prompt), request.seed & 0xFFFFFFFF, slot
        logits, cache = _prefill(engine.graphdef, engine.state, engine._empty_cache(rows, L), padded, lengths)
        if self.logits is None:
            self.logits = jax.device_put(jnp.zeros((self.slots, logits.shape[-1]), logits.dtype), self.row_sharding)
        self.cache, self.logits, self.keys = _insert(self.cache, self.logits, self.keys, cache, logits, seeds, slots)
        for slot, request in group:
            request.row = _Row(remaining=request.max_tokens)
            self.requests[slot] = request

    def _step(self) -> None:
        """One decode chunk for every slot, then hand out the new tokens and free finished slots."""
        engine = self.engine
        rows = [r.row if r is not None else _Row(remaining=0, done=True) for r in self.requests]
        live = max(len(r.prompt) + len(r.row.out) for r in self.requests if r is not None)
        window = min(self.cache_len, bucket(live + engine.chunk))
        setting = lambda name, empty, dtype: np.asarray(  # noqa: E731
            [getattr(r, name) if r is not None else empty for r in self.requests], dtype)
        sampling = (setting("temperature", 0.0, np.float32), setting("top_k", 0, np.int32),
                    setting("top_p", 1.0, np.float32))
        self.cache, self.logits, self.keys = engine._decode(rows, window, self.cache, self.logits, self.keys, sampling)
        stop = (engine.assistant_end, engine.bos)
        for slot, request in enumerate(self.requests):
            if request is None:
                continue
            row = request.row
            new = row.out[request.sent:]
            request.sent = len(row.out)
            if row.done and row.out[-1][0] in stop:
                new, finish = new[:-1], "stop"
            else:
                finish = "length" if row.done else None
            if new or finish:
                request.sink([t for t, _ in new], [m for _, m in new], finish)
            if finish:
                self.requests[slot] = None

    def _finish(self, slot: int, finish: str) -> None:
        self.requests[slot].sink([], [], finish)
        self.requests[slot] = None
