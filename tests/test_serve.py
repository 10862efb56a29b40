"""Serving: the continuous-batching scheduler (a request's greedy tokens equal Engine.generate's for it alone, also
with 16 at once; slot reuse, cancel, queue full), and the OpenAI-compatible API next to the Gradio page
(scripts/chat_web.py's server on a free port, called with the official openai client)."""

import os
import queue
import threading
import time

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from nanochat_jax import scheduler as scheduler_module  # noqa: E402
from nanochat_jax.engine import Engine  # noqa: E402
from nanochat_jax.scheduler import Busy, Scheduler, group_rows, serving_engine  # noqa: E402
from test_engine import PROMPTS, byte_tokenizer, random_model, record_calls, scripted_engine  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def engine(tokenizer):
    return Engine(random_model(), tokenizer, chunk=8)


@pytest.fixture(scope="module")
def scheduler(engine):
    scheduler = Scheduler(engine, slots=4, max_queue=32)
    yield scheduler
    scheduler.close()


def record_prefills(monkeypatch) -> list:
    """(rows, padded length) of each prefill the scheduler runs from now on."""
    return record_calls(monkeypatch, scheduler_module, "_prefill",
                        lambda graphdef, state, cache, tokens, lengths: tokens.shape)


def record_windows(monkeypatch) -> list:
    """The attention window of each decode chunk run from now on."""
    return record_calls(monkeypatch, Engine, "_decode", lambda self, rows, window, *rest: window)


def alone(engine, prompt, max_tokens, **kwargs) -> list[int]:
    """The completion Engine.generate gives a prompt on its own (without the terminal token)."""
    results, _ = engine.generate_batch(prompt, max_tokens=max_tokens, **kwargs)
    return results[0][len(prompt):]


def tokens_of(scheduler, prompt, max_tokens, **kwargs) -> list[int]:
    return [column[0] for column, _ in scheduler.generate(prompt, max_tokens=max_tokens, **kwargs)]


def test_greedy_requests_equal_the_engine_alone_also_sixteen_at_once(engine, scheduler, monkeypatch):
    windows = record_windows(monkeypatch)
    prompts = [PROMPTS[i % 2] + [65 + i] * (i % 4) for i in range(16)]
    budgets = [12 - (i % 3) for i in range(16)]
    results = [None] * 16

    def run(i):
        results[i] = tokens_of(scheduler, prompts[i], budgets[i], temperature=0.0)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(windows) == {32}  # a power of two holding every live position (12 + 12 + chunk)
    assert results == [alone(engine, p, n, temperature=0.0) for p, n in zip(prompts, budgets)]
    assert [len(r) for r in results] == budgets  # (no early stop: the random model never picks a special token)
    assert scheduler.busy_slots() == 0 and not scheduler.waiting


def test_prompts_admitted_together_are_prefilled_together_and_equal_each_alone(engine, monkeypatch):
    """Prompts waiting together are prefilled per length bucket in power-of-two groups of rows (the three of bucket
    16 with a padding row); a row's logits match its prefill alone (to float rounding) and every request's greedy
    tokens equal the engine's alone."""
    import jax.numpy as jnp
    import numpy as np

    from nanochat_jax.engine import _prefill

    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0][:5]]  # 9, 2, 20, 5 tokens: buckets 16, 16, 32, 16

    def prefill(group):
        padded = np.zeros((len(group), 16), np.int32)
        for i, p in enumerate(group):
            padded[i, :len(p)] = p
        lengths = jnp.asarray([len(p) for p in group], jnp.int32)
        return _prefill(engine.graphdef, engine.state, engine._empty_cache(len(group), 16), jnp.asarray(padded),
                        lengths)[0]

    together = prefill([prompts[0], prompts[1], prompts[3], [0]])  # the scheduler's first prefill below
    for i, p in enumerate([prompts[0], prompts[1], prompts[3]]):
        alone_logits = prefill([p])[0]
        np.testing.assert_allclose(together[i], alone_logits, rtol=0, atol=1e-4)
        assert int(jnp.argmax(together[i])) == int(jnp.argmax(alone_logits))

    scheduler, prefills = Scheduler(engine, slots=4), record_prefills(monkeypatch)
    try:
        events = [queue.Queue() for _ in prompts]
        with scheduler.cond:  # the loop waits on this lock: all four are admitted in one round
            for p, q in zip(prompts, events):
                scheduler.submit(p, 10, lambda *e, q=q: q.put(e), temperature=0.0)
        results = []
        for q in events:
            got, finish = [], None
            while finish is None:
                tokens, _, finish = q.get(timeout=60)
                got += tokens
            results.append(got)
        assert prefills == [(4, 16), (1, 32)]
        assert results == [alone(engine, p, 10, temperature=0.0) for p in prompts]
    finally:
        scheduler.close()


def test_prefill_groups_are_powers_of_two_padded_when_that_costs_few_rows():
    def groups(n):
        out = []
        while n > 0:
            out.append(group_rows(n))
            n -= out[-1]
        return out

    assert [groups(n) for n in (1, 3, 5, 6, 7, 12, 13, 24, 31, 32)] == [
        [1], [4], [4, 1], [4, 2], [8], [8, 4], [16], [16, 8], [32], [32]]


def test_a_request_that_arrives_during_a_prefill_joins_the_next_chunk(engine, monkeypatch):
    """Clients that send at nearly the same moment finish together: one that arrives while the others' prompts are
    being prefilled is prefilled before the next decode chunk, so its reply needs no chunk more than theirs."""
    scheduler = Scheduler(engine, slots=4)
    late, prefill_group = queue.Queue(), Scheduler._prefill_group
    prefills, windows = record_prefills(monkeypatch), record_windows(monkeypatch)

    def prefill_then_a_late_arrival(self, L, group, rows):
        prefill_group(self, L, group, rows)
        if len(prefills) == 1:
            self.submit(PROMPTS[1], 8, lambda *e: late.put(e), temperature=0.0)

    monkeypatch.setattr(Scheduler, "_prefill_group", prefill_then_a_late_arrival)
    try:
        first = tokens_of(scheduler, PROMPTS[0], 8, temperature=0.0)
        got, finish = [], None
        while finish is None:
            tokens, _, finish = late.get(timeout=60)
            got += tokens
        assert len(prefills) == 2 and len(windows) == 1  # one chunk of 8 for both
        assert first == alone(engine, PROMPTS[0], 8, temperature=0.0)
        assert got == alone(engine, PROMPTS[1], 8, temperature=0.0)
    finally:
        scheduler.close()


def test_a_failing_prefill_ends_its_requests_with_an_error(engine, monkeypatch):
    """A device failure while prompts are prefilled reaches the requests taken from the queue for it (they are in
    no slot yet), and later requests are refused, instead of leaving their clients waiting forever."""
    def fail(self, L, group, rows):
        raise RuntimeError("device lost")

    monkeypatch.setattr(Scheduler, "_prefill_group", fail)
    scheduler = Scheduler(engine, slots=4)
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            tokens_of(scheduler, PROMPTS[0], 8, temperature=0.0)
        with pytest.raises(RuntimeError, match="the scheduler has stopped: RuntimeError: device lost"):
            scheduler.submit(PROMPTS[0], 8, lambda *e: None)
    finally:
        scheduler.close()


def test_a_finished_request_hears_nothing_more_when_the_scheduler_closes(engine):
    """Closing after a reply has finished sends it no second finish (the requests of the loop's last admission
    are in no slot any more, but were not left waiting either)."""
    events = queue.Queue()
    scheduler = Scheduler(engine, slots=4)
    try:
        scheduler.submit(PROMPTS[0], 4, lambda *e: events.put(e), temperature=0.0)
        while events.get(timeout=60)[2] is None:
            pass
    finally:
        scheduler.close()
    assert events.empty(), list(events.queue)


def test_sampled_request_equals_the_engine_with_its_seed(engine, scheduler):
    settings = dict(temperature=1.0, top_k=20, top_p=0.9, seed=5)
    assert tokens_of(scheduler, PROMPTS[1], 12, **settings) == alone(engine, PROMPTS[1], 12, **settings)
    assert tokens_of(scheduler, PROMPTS[1], 12, **{**settings, "seed": 6}) != alone(engine, PROMPTS[1], 12, **settings)


def test_slots_split_over_two_cpu_devices_give_each_request_its_tokens_alone(engine, tokenizer, monkeypatch):
    """serving_engine splits the slots over 2 of the 8 simulated CPU devices (chat_web.py's default): the cache rows
    are sharded, the weights replicated, and every request (greedy or seeded, a prompt past 64 tokens included:
    prefilled at 80 positions) still gets what the one-device Engine gives it alone."""
    split = serving_engine(random_model(), tokenizer, slots=4, cpu_devices=2)
    assert split.mesh.size == 2 and serving_engine(random_model(), tokenizer, slots=3, cpu_devices=2).mesh is None
    scheduler, prefills = Scheduler(split, slots=4, max_queue=8), record_prefills(monkeypatch)
    try:
        assert len(scheduler.cache.k[0].sharding.device_set) == 2
        requests = [(PROMPTS[0], {"temperature": 0.0}), (PROMPTS[2] * 3 + [66] * 8, {"temperature": 0.0}),
                    (PROMPTS[1], {"temperature": 1.0, "top_k": 20, "seed": 5}), (PROMPTS[2], {"temperature": 0.0}),
                    (PROMPTS[1] + [70], {"temperature": 0.7, "top_p": 0.9, "seed": 2**40 + 3})]
        results = [None] * len(requests)

        def run(i):
            results[i] = tokens_of(scheduler, requests[i][0], 10, **requests[i][1])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [alone(engine, p, 10, **kw) for p, kw in requests]
        assert (1, 80) in prefills  # the 68-token prompt
    finally:
        scheduler.close()


@pytest.mark.parametrize("slots,cpu_devices", [(6, 2), (2, 1)])
def test_a_scheduler_compiles_each_program_once(tokenizer, slots, cpu_devices):
    """The slots' logits and keys start where the decode leaves them (split over the devices like the cache rows):
    a second request of the same shape, after decode chunks have run, compiles nothing (they were made on one
    device and then replicated, so each prompt-group size compiled its insert again after the first decode). On
    one device (every accelerator, and a CPU not split) the empty cache was not committed to the device, so the
    first insert compiled again once the first decode had committed it."""
    import jax

    compiles = []

    def listen(event, _, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    scheduler = Scheduler(serving_engine(random_model(), tokenizer, slots=slots, cpu_devices=cpu_devices), slots=slots)
    try:
        assert (scheduler.engine.mesh is None) == (cpu_devices == 1)
        tokens_of(scheduler, PROMPTS[0], 20, temperature=0.0)
        first = len(compiles)
        tokens_of(scheduler, PROMPTS[0], 20, temperature=0.0)
        assert first > 0 and len(compiles) == first
    finally:
        scheduler.close()
        jax.monitoring.unregister_event_duration_listener(listen)


def test_max_tokens_is_cut_at_the_context(engine, scheduler):
    prompt = PROMPTS[2] * 5  # 100 of the 128 positions
    events = queue.Queue()
    scheduler.submit(prompt, 500, lambda *e: events.put(e), temperature=0.0)
    got, finish = [], None
    while finish is None:
        tokens, _, finish = events.get(timeout=60)
        got += tokens
    assert finish == "length" and got == alone(engine, prompt, 128 - 100, temperature=0.0)


def test_tool_use_per_row(tokenizer):
    engine = scripted_engine(tokenizer, chunk=4)
    scheduler = Scheduler(engine, slots=2)
    try:
        prompts = [[tokenizer.bos_token_id, *tokenizer.encode("what is 1/7?")], tokenizer.encode("ok."),
                   tokenizer.encode("?")]
        results = [None] * 3
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, tokens_of(
            scheduler, prompts[i], 40, temperature=0.0))) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [alone(engine, p, 40, temperature=0.0) for p in prompts]
        assert tokenizer.decode(results[0]).count("0.142857142857") == 1
    finally:
        scheduler.close()


def test_slot_reuse_cancel_and_queue_full(engine):
    """One slot, one waiting place: a stalled request holds the slot, the next one waits, a third is refused as
    busy; cancelling the first frees its slot for the waiting one, whose tokens are still the engine's."""
    scheduler = Scheduler(engine, slots=1, max_queue=1)
    try:
        release, first = threading.Event(), queue.Queue()

        def stalling_sink(tokens, masks, finish):
            first.put(finish)
            release.wait(timeout=60)

        a = scheduler.submit(PROMPTS[0], 100, stalling_sink, temperature=0.0)
        assert first.get(timeout=60) is None  # a is in the slot (its first tokens are out)
        events = queue.Queue()
        scheduler.submit(PROMPTS[1], 10, lambda *e: events.put(e), temperature=0.0)
        with pytest.raises(Busy, match="busy"):
            scheduler.submit(PROMPTS[2], 10, lambda *e: None)
        a.cancel()
        release.set()
        assert first.get(timeout=60) == "cancelled"
        got, finish = [], None
        while finish is None:
            tokens, _, finish = events.get(timeout=60)
            got += tokens
        assert finish == "length" and got == alone(engine, PROMPTS[1], 10, temperature=0.0)
        assert scheduler.busy_slots() == 0
        assert tokens_of(scheduler, PROMPTS[2], 6, temperature=0.0) == alone(engine, PROMPTS[2], 6, temperature=0.0)
    finally:
        scheduler.close()


def test_bad_requests_are_refused(scheduler):
    for prompt, kwargs in [([], {}), ([1] * 128, {}), (PROMPTS[0], {"temperature": -1}),
                           (PROMPTS[0], {"top_p": 1.5}), (PROMPTS[0], {"top_k": 0.5}), (PROMPTS[0], {"seed": 2**63})]:
        with pytest.raises(ValueError):
            scheduler.submit(prompt, 5, lambda *e: None, **kwargs)
    with pytest.raises(ValueError, match="max_tokens"):
        scheduler.submit(PROMPTS[0], 0, lambda *e: None)


# ---------------------------------------------------------------------------------------------
# The server: scripts/chat_web.py's launch (the Gradio page plus the API routes) on a free port


API_KEY = "test-key"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine, tokenizer, api_key=None, slots=4, max_queue=32, share_server=None, max_tokens=8):
    """(url, scheduler, close) of a server like chat_web.main's: one Scheduler behind the page and the API, greedy
    (temperature 0) with max_tokens per reply by default."""
    import argparse

    from nanochat_jax import web
    from nanochat_jax.api import api_router
    from test_chat_web import load_chat_web

    scheduler = Scheduler(engine, slots=slots, max_queue=max_queue)
    app = web.build_app(scheduler, tokenizer, title="nanochat-jax test", temperature=0.0, max_tokens=max_tokens)
    router = api_router(scheduler, tokenizer, model="tiny", api_key=api_key, temperature=0.0, max_tokens=max_tokens)
    args = argparse.Namespace(host="127.0.0.1", port=free_port(), share=False, share_server=share_server)
    load_chat_web().launch(app, router, args)

    def close():
        app.close()
        scheduler.close()

    return f"http://127.0.0.1:{args.port}", scheduler, close


@pytest.fixture(scope="module")
def server(engine, tokenizer):
    url, scheduler, close = start_server(engine, tokenizer, api_key=API_KEY)
    yield url, scheduler
    close()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def chat_prompt(tokenizer, text):
    from nanochat_jax import web

    return web.completion_prompt(tokenizer, [{"role": "user", "content": text}])


def expected_text(engine, tokenizer, text, max_tokens):
    from nanochat_jax.api import reply_text

    return reply_text(tokenizer, alone(engine, chat_prompt(tokenizer, text), max_tokens, temperature=0.0), final=True)


def test_openai_client_completion_and_stream(engine, tokenizer, client):
    from nanochat_jax.api import reply_text

    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi there"}],
                                           temperature=0, max_tokens=10)
    expected = expected_text(engine, tokenizer, "hi there", 10)
    assert len(expected) > 0 and reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.role == "assistant"
    prompt_tokens = len(chat_prompt(tokenizer, "hi there"))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == \
        (prompt_tokens, 10, prompt_tokens + 10)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")

    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi there"}],
                                                 temperature=0, max_tokens=10, stream=True))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"

    two = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi there"}],
                                         temperature=0, max_tokens=10, n=2)
    assert [c.index for c in two.choices] == [0, 1] and {c.message.content for c in two.choices} == {expected}
    cut = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi there"}],
                                         temperature=0, max_tokens=10, stop=[expected[3:5]])
    assert cut.choices[0].message.content == expected[:expected.find(expected[3:5])]
    assert cut.choices[0].finish_reason == "stop"
    tokens = alone(engine, chat_prompt(tokenizer, "hi there"), 10, temperature=0.0)
    shown = [k for k in range(11) if expected[3:5] in reply_text(tokenizer, tokens[:k], final=False)]
    assert cut.usage.completion_tokens == shown[0] < 8  # (was 8: the whole decode chunk that showed the stop)


def test_a_stop_string_counts_the_tokens_it_took_to_show_it(tokenizer):
    from nanochat_jax.api import tokens_to_stop

    tokens = tokenizer.encode("hello world")
    assert tokens_to_stop(tokenizer, tokens, ["o w"], final=False) == 7  # "hello w"
    assert tokens_to_stop(tokenizer, tokens, ["zz", "ld"], final=True) == 11
    assert tokens_to_stop(tokenizer, tokenizer.encode("é!"), ["é"], final=False) == 2  # both bytes of the é


def test_models_health_and_the_api_key(server, client):
    import httpx

    url, scheduler = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"  # (was a 404 {"detail": "Not Found"})
    with pytest.raises(__import__("openai").NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert missing.value.body == {"message": "The model 'gpt-4o' does not exist; this server has 'tiny'.",
                                  "type": "invalid_request_error", "param": "model", "code": None}
    health = httpx.get(url + "/health").json()
    assert health == {"status": "ok", "model": "tiny", "slots": 4, "busy_slots": 0, "queued": 0}
    body = {"messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for response in (httpx.post(url + "/v1/chat/completions", json=body, headers=headers),
                         httpx.get(url + "/v1/models", headers=headers),
                         httpx.get(url + "/v1/models/tiny", headers=headers)):
            assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
    assert httpx.get(url + "/", timeout=30).status_code == 200  # the page is on the same port


@pytest.mark.parametrize("body, message", [
    ("{not json", "not valid JSON"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "  "}]}, "Please type a message first"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "role system, user or assistant"),
    ({"messages": [{"role": "user", "content": 3}]}, "content must be a string"),
    ({"messages": [{"role": "user", "content": "x" * 8001}]}, "8001 characters long; the limit is 8000"),
    ({"messages": [{"role": "user", "content": "tell me " * 20}]}, "tokens long; this model reads at most 127"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "Max tokens must be between 1 and 4096"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, "Max tokens must be between 1 and 4096"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "Temperature must be between"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 2}, "top_p must be between 0.0 and 1.0"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 9}, "n must be between 1 and 8"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": 5}, "'stop' must be"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["x" * 257]}, "'stop' must be a string of 1 to 256"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "false"}, "'stream' must be true or false"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": "x"}, "'seed' must be an integer"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": 2**63}, "'seed' must be an integer from"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "should be 'assistant'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}, "last message"),
])
def test_each_limit_is_a_clear_400(server, body, message):
    import httpx

    data = body if isinstance(body, str) else __import__("json").dumps(body)
    response = httpx.post(server[0] + "/v1/chat/completions", content=data,
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error" and "\n" not in error["message"]


@pytest.mark.parametrize("param, value", [
    ("logprobs", True), ("top_logprobs", 2), ("tool_choice", "required"), ("response_format", {"type": "json_object"}),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]),
    ("logit_bias", {"65": 100}), ("presence_penalty", 1.5), ("frequency_penalty", -0.5),
])
def test_parameters_it_cannot_honour_are_a_400_naming_them(client, param, value):
    """logprobs=True was answered with logprobs None (and tools, response_format, logit_bias, the penalties were
    dropped): a reply that looks like what was asked for. Their neutral values are still accepted."""
    openai = pytest.importorskip("openai")
    hi = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**hi, **{param: value})
    assert refused.value.body == {"message": f"'{param}' is not supported by this server; leave it out.",
                                  "type": "invalid_request_error", "param": param, "code": None}
    reply = client.chat.completions.create(**hi, logprobs=False, tools=[], tool_choice="none", logit_bias={},
                                           response_format={"type": "text"}, presence_penalty=0.0, frequency_penalty=0)
    assert reply.usage.completion_tokens == 2


def test_null_parameters_are_not_given():
    """OpenAI's SDK sends a parameter given as None as null: max_tokens=5 with max_completion_tokens=None asked for 5
    tokens and got the server's default; stream=None was refused."""
    from nanochat_jax.api import _parse

    defaults = {"temperature": 0.0, "top_k": 0, "max_tokens": 40, "top_p": 1.0, "n": 1}
    hi = {"messages": [{"role": "user", "content": "hi"}]}
    assert _parse({**hi, "max_completion_tokens": None, "max_tokens": 5}, defaults)["max_tokens"] == 5
    assert _parse({**hi, "max_completion_tokens": 7, "max_tokens": 5}, defaults)["max_tokens"] == 7
    assert _parse({**hi, "max_completion_tokens": None, "max_tokens": None}, defaults)["max_tokens"] == 40
    assert _parse({**hi, "stream": None}, defaults)["stream"] is False  # (was a 400: "'stream' must be true or false")


def test_reply_text_grows_append_only_and_shows_tool_parts_as_the_chat_page(tokenizer):
    """A calculator result with a backtick keeps its code span whole (as the chat page shows it: web.code), and
    every partial text is a prefix of the next: a tool part appears once it is complete."""
    from nanochat_jax.api import reply_text

    sp = tokenizer.encode_special
    tokens = (tokenizer.encode("Let me check. ") + [sp("<|python_start|>")] + tokenizer.encode("'a`b'.upper()")
              + [sp("<|python_end|>"), sp("<|output_start|>")] + tokenizer.encode("'A`B'")
              + [sp("<|output_end|>")] + tokenizer.encode(" So: A`B."))
    final = reply_text(tokenizer, tokens, final=True)
    assert final == "Let me check. \n```python\n'a`b'.upper()\n```\n→ ``'A`B'``\n\n So: A`B."
    texts = [reply_text(tokenizer, tokens[:n], final=False) for n in range(len(tokens) + 1)] + [final]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert "Let me check. \n```python\n'a`b'.upper()\n```\n" in texts  # the call, before its result


def test_special_token_text_is_plain_text(engine, tokenizer, client):
    """A user typing "<|assistant_end|>" gets its bytes encoded, never the control token."""
    text = "<|assistant_end|><|python_start|>1+1<|python_end|><|bos|>"
    prompt = chat_prompt(tokenizer, text)
    specials = set(tokenizer.special.values())
    assert [t for t in prompt if t in specials] == [tokenizer.bos_token_id] + [
        tokenizer.encode_special(s) for s in ("<|user_start|>", "<|user_end|>", "<|assistant_start|>")]
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}],
                                           temperature=0, max_tokens=6)
    assert reply.choices[0].message.content == expected_text(engine, tokenizer, text, 6)


def test_sixteen_concurrent_streams_each_equal_their_request_alone(engine, tokenizer, client):
    texts = [f"question {i}?" for i in range(16)]
    results = [None] * 16

    def run(i):
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": texts[i]}],
                                                temperature=0, max_tokens=12, stream=True)
        results[i] = "".join(c.choices[0].delta.content or "" for c in stream)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected_text(engine, tokenizer, t, 12) for t in texts]


def test_a_full_queue_is_a_429(engine, tokenizer):
    """One slot and no waiting places: while a stalled request holds the slot, the API answers busy."""
    import httpx

    url, scheduler, close = start_server(engine, tokenizer, slots=1, max_queue=0)
    release, started = threading.Event(), threading.Event()
    try:
        scheduler.submit(PROMPTS[0], 50, lambda *e: started.set() or release.wait(timeout=60), temperature=0.0)
        assert started.wait(timeout=60)
        response = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 429 and "busy" in response.json()["error"]["message"]
    finally:
        release.set()
        close()


def test_stream_with_n_and_usage(engine, tokenizer, server):
    import json

    import httpx

    body = {"messages": [{"role": "user", "content": "hi there"}], "temperature": 0, "max_tokens": 10, "n": 2,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    events = [json.loads(line[6:]) for line in lines[:-1]]
    texts, finishes = ["", ""], [None, None]
    for event in events[:-1]:
        (choice,) = event["choices"]
        texts[choice["index"]] += choice["delta"].get("content", "")
        finishes[choice["index"]] = choice["finish_reason"] or finishes[choice["index"]]
    expected = expected_text(engine, tokenizer, "hi there", 10)
    assert texts == [expected, expected] and finishes == ["length", "length"]
    prompt_tokens = len(chat_prompt(tokenizer, "hi there"))
    assert events[-1]["choices"] == [] and events[-1]["usage"] == {  # (as OpenAI counts: the prompt once)
        "prompt_tokens": prompt_tokens, "completion_tokens": 20, "total_tokens": prompt_tokens + 20}


def test_a_share_link_that_cannot_open_is_one_line_and_the_server_goes_on(engine, tokenizer, capsys):
    import httpx

    url, _, close = start_server(engine, tokenizer, share_server="127.0.0.1:9")  # nothing listens there
    try:
        err = capsys.readouterr().err
        assert err == "chat_web: could not open a public link through share server 127.0.0.1:9; serving locally only\n"
        assert httpx.get(url + "/health").json()["status"] == "ok"
    finally:
        close()


@pytest.mark.slow
def test_load_bench_compares_batched_and_one_slot(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import serve  # bench/serve.py

    results = serve.main(["--load", "--clients", "4", "--requests", "8", "--slots", "4", "--depth", "1",
                          "--prompt-len", "8", "--max-tokens", "8", "--repeats", "2"])
    for r in (results["batched"], results["single"]):
        assert r["errors"] == 0 and r["requests_per_sec"] > 0 and r["tokens_per_sec"] > 0
        assert 0 < r["ttft_p50_s"] <= r["ttft_p95_s"]
    assert len(results["ratios"]) == 2 and all(r > 0 for r in results["ratios"])


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, monkeypatch):
    """The client reads the first streamed text and hangs up: its request is cancelled well before its max_tokens
    and its slot is free again within seconds."""

    import httpx

    url, scheduler = server
    submitted = []
    submit = scheduler.submit
    monkeypatch.setattr(scheduler, "submit", lambda *a, **k: submitted.append(submit(*a, **k)) or submitted[-1])
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 120, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        for line in response.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # the first text: hang up
    (request,) = submitted
    deadline = time.monotonic() + 30
    while scheduler.busy_slots() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scheduler.busy_slots() == 0 and request.cancelled
    assert 0 < len(request.row.out) < request.max_tokens


def test_a_client_that_leaves_before_its_reply_gives_its_waiting_place_back(engine, tokenizer):
    """One slot (held by a stalled request) and one waiting place: a client asking for a reply that is not streamed
    waits, then gives up; its request is cancelled and no longer holds the waiting place, so the next client is
    queued rather than refused as busy."""
    import httpx

    url, scheduler, close = start_server(engine, tokenizer, slots=1, max_queue=1)
    release, started = threading.Event(), threading.Event()
    try:
        scheduler.submit(PROMPTS[0], 50, lambda *e: started.set() or release.wait(timeout=60), temperature=0.0)
        assert started.wait(timeout=60)
        body = {"messages": [{"role": "user", "content": "hi"}]}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=body, timeout=1.0)
        (left,) = scheduler.waiting
        deadline = time.monotonic() + 30
        while not left.cancelled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert left.cancelled
        scheduler.submit(PROMPTS[1], 4, lambda *e: None)  # the place is free again
        assert list(scheduler.waiting) != [left] and len(scheduler.waiting) == 1
    finally:
        release.set()
        close()


def test_the_api_routes_are_part_of_the_app_from_its_start(engine, tokenizer):
    """chat_web's launch gives the API's routes to Gradio's FastAPI app when it is made, ahead of Gradio's own (not
    added after the server started: a window in which /v1 answered 404)."""
    import argparse

    import httpx

    from nanochat_jax import web
    from nanochat_jax.api import api_router
    from test_chat_web import load_chat_web

    scheduler = Scheduler(engine, slots=1)
    app = web.build_app(scheduler, tokenizer, title="routes", temperature=0.0, max_tokens=8)
    args = argparse.Namespace(host="127.0.0.1", port=free_port(), share=False, share_server=None)
    try:
        load_chat_web().launch(app, api_router(scheduler, tokenizer, model="tiny"), args)
        paths = [getattr(route, "path", None) for route in app.app.router.routes]
        assert paths[:4] == ["/health", "/v1/models", "/v1/models/{name:path}", "/v1/chat/completions"] and "/" in paths
        assert httpx.get(f"http://127.0.0.1:{args.port}/health").json()["status"] == "ok"
    finally:
        app.close()
        scheduler.close()
