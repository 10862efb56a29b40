"""Request fuzz (bench/reliability.py's generator) against the chat server of test_serve (the Gradio page and the
API on one port, a tiny random model): every request gets an answer or a clear 4xx, never a 5xx; the server stays
up with bounded memory; text a user types never becomes a control token; a greedy request answers as before."""

import json
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import reliability  # noqa: E402
from test_serve import API_KEY, engine, start_server, tokenizer  # noqa: E402,F401  (module fixtures)


def rss_mib() -> float:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) / 1024


@pytest.fixture(scope="module")
def server(engine, tokenizer):  # noqa: F811
    url, scheduler, close = start_server(engine, tokenizer, api_key=API_KEY)
    yield url, scheduler
    close()


def greedy(url: str) -> dict:
    body = {"messages": [{"role": "user", "content": "hi there"}], "temperature": 0, "max_tokens": 10}
    response = httpx.post(url + reliability.PATH, json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                          timeout=120)
    assert response.status_code == 200, response.text
    return {k: response.json()[k] for k in ("choices", "usage")}


def run_fuzz(server, tokenizer, count: int, seed: int):  # noqa: F811
    """The fuzz with every submitted prompt checked: its special tokens are exactly those the renderer puts
    around the request's messages (rendered with each content replaced by "x"), whatever the text holds."""
    url, scheduler = server
    before, rss_before = greedy(url), rss_mib()
    specials, submitted, wrong = set(tokenizer.special.values()), [], []
    submit = scheduler.submit

    def spy(prompt, *args, **kwargs):
        submitted.append(list(prompt))
        return submit(prompt, *args, **kwargs)

    def check(request, status, body):
        method, path, _, data, kind = request
        assert status < 500, (status, request[:3], data[:300], body[:300])
        if path == reliability.PATH and method == "POST" and status in (400, 401):  # one clear line
            message = json.loads(body)["error"]["message"]
            assert message and "\n" not in message and "Traceback" not in message, message
        if status == 200 and path == reliability.PATH and method == "POST":
            messages = json.loads(data)["messages"]
            plain = [{"role": m["role"], "content": "x"} for m in messages] + [{"role": "assistant", "content": ""}]
            expected = [t for t in tokenizer.render_for_completion({"messages": plain}, max_tokens=1 << 30)
                        if t in specials]
            wrong.extend(p for p in submitted if [t for t in p if t in specials] != expected)
        submitted.clear()

    scheduler.submit = spy
    try:
        stats = reliability.fuzz(url, count, seed, API_KEY, check)
    finally:
        del scheduler.submit
    assert not wrong, wrong[:3]
    assert_unharmed(server, before, stats)
    return stats, rss_mib() - rss_before


def assert_unharmed(server, greedy_before, stats):
    """After a fuzz: no crash, every slot free and nothing waiting (abandoned requests cancelled), the server up and
    a greedy request answered as before."""
    url, scheduler = server
    deadline = time.time() + 60
    while (scheduler.busy_slots() or scheduler.waiting) and time.time() < deadline:
        time.sleep(0.05)
    assert scheduler.busy_slots() == 0 and not scheduler.waiting and scheduler.error is None
    assert stats["crashes"] == 0, stats
    assert httpx.get(url + "/health").json()["status"] == "ok"
    assert greedy(url) == greedy_before


def test_a_thousand_hostile_requests(server, tokenizer):  # noqa: F811
    stats, grown = run_fuzz(server, tokenizer, 1000, seed=0)
    assert stats["requests"] == 1000 + 100 + 20
    assert stats["answered"] > 50 and stats["refusals"] > 700, stats
    assert grown < 200, f"RSS grew by {grown:.0f} MiB"


@pytest.mark.slow
def test_ten_thousand_hostile_requests(server, tokenizer):  # noqa: F811
    """Memory stays bounded: the first 10,000 requests compile the prefill shapes hostile prompts reach (one per
    length bucket and group size) and grow the process by ~300 MiB (measured); 10,000 more add little (13 MiB)."""
    stats, _ = run_fuzz(server, tokenizer, 10_000, seed=1)
    assert stats["answered"] > 500 and stats["refusals"] > 7000, stats
    stats, grown = run_fuzz(server, tokenizer, 10_000, seed=2)
    assert stats["answered"] > 500 and stats["refusals"] > 7000, stats
    assert grown < 100, f"RSS grew by {grown:.0f} MiB"


def only_rendered_specials(tokenizer, prompt) -> bool:  # noqa: F811
    """The prompt's special tokens are the renderer's: <|bos|>, then turns user_start user_end assistant_start
    [the model's own tool tokens] assistant_end, then user_start user_end assistant_start."""
    sp = tokenizer.encode_special
    tools = {sp(name) for name in ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")}
    turn = [sp("<|user_start|>"), sp("<|user_end|>"), sp("<|assistant_start|>")]
    outer, in_reply = [], False
    for t in (t for t in prompt if t in set(tokenizer.special.values())):
        if not (in_reply and t in tools):
            outer.append(t)
            in_reply = t == turn[2] or (in_reply and t != sp("<|assistant_end|>"))
    return outer == [tokenizer.bos_token_id] + (turn + [sp("<|assistant_end|>")]) * ((len(outer) - 1) // 4) + turn


def run_gradio_fuzz(server, tokenizer, count: int, seed: int):  # noqa: F811
    """The fuzz of the page's Gradio queue (bench's gradio_fuzz), every answer read: never a 5xx or a traceback,
    every event that joined ends (an abandoned stream aside), a sound chat event succeeds, and every prompt the
    page's chat handler submitted holds only the renderer's special tokens."""
    url, scheduler = server
    before, rss_before = greedy(url), rss_mib()
    submitted = []
    submit = scheduler.submit
    scheduler.submit = lambda prompt, *args, **kwargs: submitted.append(list(prompt)) or submit(prompt, *args, **kwargs)

    def check(request, status, body):
        method, path, _, data, kind = request
        assert status < 500 and b"Traceback" not in body, (status, kind, path, data[:300], body[:300])
        if status == 200 and path.endswith("/queue/join") and kind != "abandon":
            assert body.count(b'"msg":"process_completed"') == 1 + (kind == "twice"), (kind, data[:300], body[-300:])
        if kind == "sound":
            assert status == 200 and b'"success":false' not in body, (data[:300], body[-300:])

    try:
        stats = reliability.gradio_fuzz(url, count, seed, check)
    finally:
        del scheduler.submit
    assert submitted and not [p for p in submitted if not only_rendered_specials(tokenizer, p)]
    assert_unharmed(server, before, stats)
    return stats, rss_mib() - rss_before


def test_hostile_requests_to_the_gradio_queue(server, tokenizer):  # noqa: F811
    stats, grown = run_gradio_fuzz(server, tokenizer, 200, seed=0)
    assert stats["requests"] == 200 + 20
    assert stats["answered"] > 100 and stats["refusals"] > 30, stats
    assert grown < 200, f"RSS grew by {grown:.0f} MiB"


@pytest.mark.slow
def test_thousands_of_hostile_requests_to_the_gradio_queue(server, tokenizer):  # noqa: F811
    stats, grown = run_gradio_fuzz(server, tokenizer, 3000, seed=1)
    assert stats["answered"] > 1500 and stats["refusals"] > 500, stats
    # Gradio keeps every session's state (up to its state_session_capacity, 10000): ~0.1 MiB each here, 425 MiB seen
    assert grown < 600, f"RSS grew by {grown:.0f} MiB"


def test_what_the_gradio_fuzz_found(server):
    """A message with a lone surrogate (JSON allows it, UTF-8 cannot hold it: Gradio's stream of the page's update
    broke) is answered with U+FFFD in its place; an unknown fn_index or endpoint is refused with one line (a 500
    and a dropped connection before) on a connection that stays usable; the stream of an unknown session ends
    properly; the direct /run route, which would skip the queue, is closed; a join with an empty session is
    refused and the queue keeps serving."""
    url, _ = server
    page = reliability.page_events(url)
    join = {"data": ["\ud800hi", [], 0.0, 0, 2, None], "fn_index": page["chat"], "session_hash": "surrogate",
            "trigger_id": page["triggers"][0]}
    with httpx.Client(base_url=url, timeout=60, headers={"Content-Type": "application/json"}) as client:
        post = lambda path, body: client.post(path, content=json.dumps(body))  # noqa: E731  (httpx: no surrogates)
        assert post("/gradio_api/queue/join", join).status_code == 200
        events = [json.loads(line[6:]) for line in client.get("/gradio_api/queue/data?session_hash=surrogate")
                  .text.splitlines() if line.startswith("data: ")]
        done = next(e for e in events if e["msg"] == "process_completed")
        assert done["success"] and done["output"]["data"][2][0]["content"][0]["text"] == "\ufffdhi"
        # an empty session_hash made Gradio file the event's messages under no session: its queue loop then died
        # and the page answered 503 to everyone
        empty = post("/gradio_api/queue/join", {**join, "session_hash": ""})
        assert empty.status_code == 400 and "empty session_hash" in empty.text
        for path, body in [("/gradio_api/queue/join", {**join, "fn_index": 99}), ("/gradio_api/call/v2/nope", {}),
                           ("/gradio_api/call/v2/submit", {"bogus": 1})]:
            response = post(path, body)
            assert response.status_code == 400 and response.json() == {
                "detail": "The server could not handle this request."}
        stream = client.get("/gradio_api/queue/data?session_hash=nobody")
        assert stream.status_code == 200 and '"session_not_found":true' in stream.text
        assert post("/gradio_api/run/submit", {"data": join["data"]}).status_code == 404
        assert post("/gradio_api/queue/join", {**join, "session_hash": "after"}).status_code == 200
        assert '"msg":"process_completed"' in client.get("/gradio_api/queue/data?session_hash=after").text
