"""Reliability campaign: training stages killed with SIGKILL at random moments and resumed, and hostile requests
against the chat server's API and page.

    python bench/reliability.py [--stages base,mid,sft,rl] [--kills 3] [--requests 1000] [--seed 0]

Kills: each of `--stages` (default base; tests/test_interrupt.py's tiny runs: mid from base, SFT and RL from mid)
is killed `--kills` times at random moments after its first logged step and resumed with --train.resume=true each
time; the final checkpoint (parameters, optimizer state, data position) and the logged records are compared with
an uninterrupted run of the stage from the same source checkpoint. Requests: `--requests`
generated requests (malformed JSON, wrong types, huge, empty, invalid UTF-8, control characters, special-token
text, out-of-range settings, concurrent and abandoned connections) against scripts/chat_web.py serving the
trained model, and as many to its page's Gradio queue. Prints kills, resumes, bit-identical runs, broken
checkpoints skipped, requests sent, refusals, crashes (5xx, dead server: must be 0) and the server's peak RSS.

`hostile_requests` and `send` are the request fuzz of the API, `gradio_requests` and `send_gradio` that of the
page; tests/test_fuzz_server.py runs them against test_serve's server.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import httpx

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
WEIRD = [None, True, False, 0, -1, 1, 3, -10**9, 10**9, 2**63, 2**64 + 1, -2**70, 0.5, -0.0, 1e308, -1e308,
         float("nan"), float("inf"), float("-inf"), "1", "", "x" * 1000, [], [1], ["a", "b"], {}, {"a": 1}, "<|bos|>"]
SETTINGS = ["temperature", "top_k", "top_p", "max_tokens", "max_completion_tokens", "n", "seed", "stop", "stream",
            "stream_options", "messages", "model", "user"]
PATH = "/v1/chat/completions"


def hostile_text(rng: random.Random) -> str:
    """A message: words, special-token strings, control characters, lone surrogates, emoji, combining marks."""
    pieces = ["hi", "what is 2+2?", " ", "\n", "\t", "\x00", "\x1b[31m", "\x7f", "\u200b", "\ufeff", "\ud800",
              "\udfff", "😀", "e\u0301", "Ω", "\u2028", "💩" * 3, "'; DROP TABLE x; --", "%s%n", "{{7*7}}"]
    return "".join(rng.choice(pieces + SPECIALS) for _ in range(rng.randint(0, 12)))


def hostile_requests(seed: int, count: int):
    """`count` requests (method, path, headers, body bytes, kind), generated from `seed`. About one in seven is
    a sound request (greedy or sampled, up to 3 tokens); the others are broken in one or more ways."""
    rng = random.Random(seed)
    for _ in range(count):
        body = {"messages": [{"role": "user", "content": hostile_text(rng) or "hi"}], "max_tokens": rng.randint(1, 3),
                "temperature": rng.choice([0, 0.7, 1.5])}
        headers = {"Content-Type": "application/json"}
        kind = rng.choice(["sound", "settings", "settings", "messages", "json", "utf8", "huge", "path", "headers"])
        if kind == "settings":
            for key in rng.sample(SETTINGS, rng.randint(1, 3)):
                body[key] = rng.choice(WEIRD)
        elif kind == "messages":
            body["messages"] = rng.choice([
                [], [{}], [{"role": "user"}], [{"role": "system", "content": hostile_text(rng)}],
                [{"role": "user", "content": [{"type": "text", "text": hostile_text(rng)}]}],
                [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                [{"role": rng.choice(["user", "assistant", "tool", "", None]), "content": hostile_text(rng)}
                 for _ in range(rng.randint(1, 6))],
                [{"role": "user", "content": "a"}] * 501, "hi", {"role": "user", "content": "hi"}])
        elif kind == "huge":
            body["messages"][0]["content"] = rng.choice(["x", "ab ", "<|bos|>", "é"]) * rng.choice([8001, 40000, 10**6])
        data = json.dumps(body).encode()  # (NaN, Infinity and lone surrogates as JSON allows them)
        if kind == "json":
            data = rng.choice([data[:rng.randint(0, len(data))], b"", b"null", b"[]", b"1", b'"s"', b"{" * 10000,
                               b"[" * 100000 + b"]" * 100000, bytes(rng.randrange(256) for _ in range(64)),
                               data.replace(b":", b"=", 1), data + b"}", b'{"messages": [' + b"1," * 10000 + b"1]}"])
        elif kind == "utf8":
            bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x80"])
            data = data.replace(b'"content": "', b'"content": "' + bad, 1)
        method, path = "POST", PATH
        if kind == "path":
            method = rng.choice(["GET", "POST", "PUT", "DELETE"])
            path = rng.choice(["/v1/chat/completions", "/v1/models", "/health", "/v1/completions", "/v1/../../etc/passwd",
                               "/%00", "/" + "a" * 5000, "/gradio_api/queue/join", "/gradio_api/info", "/config"])
        elif kind == "headers":
            headers = rng.choice([{}, {"Content-Type": "text/plain"}, {"Content-Type": "application/json; charset=latin-1"},
                                  {"Content-Encoding": "gzip"}, {"X-Huge": "h" * 6000}])
        yield method, path, headers, data, kind


def send(client: httpx.Client, request, api_key: str | None = None) -> tuple[int, bytes]:
    """Send one generated request and read its whole answer (a stream to its end): (status code, body)."""
    method, path, headers, data, kind = request
    if api_key and kind != "headers":
        headers = {**headers, "Authorization": f"Bearer {api_key}"}
    with client.stream(method, path, headers=headers, content=data) as response:
        return response.status_code, response.read()


def abandon(url: str, api_key: str | None, rng: random.Random) -> None:
    """A client that goes away: half a request on a raw socket, or a stream closed after its first chunk."""
    host, port = url.split("//")[1].split(":")
    if rng.random() < 0.5:
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(rng.choice([b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{",
                                  b"GET /health HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00garbage"]))
        return
    body = {"messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 50, "stream": True}
    with httpx.stream("POST", url + PATH, json=body, timeout=60,
                      headers={"Authorization": f"Bearer {api_key}"} if api_key else {}) as response:
        next(response.iter_raw(), None)


def fuzz(url: str, count: int, seed: int, api_key: str | None = None, check=None) -> dict:
    """`count` hostile requests: sequential ones (check(request, status, body) after each, e.g. to inspect what
    was submitted), then a tenth of them again from 8 threads at once, and count // 50 abandoned connections.
    Returns {"requests", "answered", "refusals", "crashes" (5xx), "statuses"}."""
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=url, timeout=120) as client:
        for request in hostile_requests(seed, count):
            status, body = send(client, request, api_key)
            statuses[status] = statuses.get(status, 0) + 1
            if check:
                check(request, status, body)
        with ThreadPoolExecutor(8) as pool:
            for status, _ in pool.map(lambda r: send(client, r, api_key), hostile_requests(seed + 1, count // 10)):
                statuses[status] = statuses.get(status, 0) + 1
    rng = random.Random(seed)
    for _ in range(count // 50):
        abandon(url, api_key, rng)
    return tally(statuses, count // 50)


def tally(statuses: dict[int, int], abandoned: int = 0) -> dict:
    return {"requests": sum(statuses.values()) + abandoned, "answered": statuses.get(200, 0),
            "refusals": sum(n for s, n in statuses.items() if 400 <= s < 500),
            "crashes": sum(n for s, n in statuses.items() if s >= 500), "statuses": dict(sorted(statuses.items()))}


def gradio_fuzz(url: str, count: int, seed: int, check=None) -> dict:
    """`count` requests to the page's Gradio queue (gradio_requests) as fuzz sends its own: sequential ones (with
    check(request, status, body) after each), then a tenth of them again from 8 threads at once. Returns fuzz's
    counts."""
    page, statuses = page_events(url), {}
    with httpx.Client(base_url=url, timeout=120) as client:
        for request in gradio_requests(seed, count, page):
            status, body = send_gradio(client, request)
            statuses[status] = statuses.get(status, 0) + 1
            if check:
                check(request, status, body)
        with ThreadPoolExecutor(8) as pool:
            for status, _ in pool.map(lambda r: send_gradio(client, r), gradio_requests(seed + 1, count // 10, page)):
                statuses[status] = statuses.get(status, 0) + 1
    return tally(statuses)


GRADIO = "/gradio_api"


def page_events(url: str) -> dict:
    """What the page's own Gradio client uses, read from /config: the chat event ("submit": fn_index, trigger ids,
    number of inputs) and the other events' fn_index."""
    config = httpx.get(url + "/config", timeout=60).json()
    events = {d["api_name"]: d for d in config["dependencies"]}
    chat = events["submit"]
    return {"chat": chat["id"], "triggers": [t for t, _ in chat["targets"]], "inputs": len(chat["inputs"]),
            "others": [d["id"] for d in config["dependencies"] if d is not chat]}


def gradio_requests(seed: int, count: int, page: dict):
    """`count` requests to the page's Gradio queue, generated from `seed` (bench's `page_events` gives `page`), as
    (method, path, headers, body bytes, kind). A join ("sound" ones: the browser's own, up to 3 tokens) is followed
    by the stream of its session (see send_gradio); "twice" joins two events on one session before it, "abandon"
    goes away after the stream's first line. The chat event's inputs are the message box, the history (server-side
    state: the sent value is ignored), temperature, top-k, max tokens and the run state."""
    rng = random.Random(seed)
    for _ in range(count):
        session = f"fuzz{seed}-{rng.randrange(1 << 30)}"
        data = [hostile_text(rng) or "hi", [], rng.choice([0.0, 0.7]), rng.choice([0, 50]), rng.randint(1, 3), None]
        body = {"data": data, "fn_index": page["chat"], "session_hash": session, "event_data": None,
                "trigger_id": rng.choice(page["triggers"])}
        kind = rng.choice(["sound", "data", "data", "history", "huge", "event", "session", "json", "utf8", "twice",
                           "abandon", "call", "path"])
        path = GRADIO + "/queue/join"
        if kind == "data":
            for i in rng.sample(range(len(data)), rng.randint(1, 3)):
                data[i] = rng.choice(WEIRD)
            body["data"] = rng.choice([data, data, data[:rng.randrange(len(data))], data + [1], "hi", None, {}])
        elif kind == "history":
            data[1] = [{"role": rng.choice(["user", "assistant", "system", "tool", "", None]),
                        "content": rng.choice([hostile_text(rng), "".join(SPECIALS),
                                               [{"type": "text", "text": "<|bos|>"}]])}
                       for _ in range(rng.randint(1, 6))]
        elif kind == "huge":
            data[0] = rng.choice(["x", "ab ", "<|assistant_end|>", "é"]) * rng.choice([8001, 40000, 10**6])
        elif kind == "event":
            key = rng.choice(["fn_index", "trigger_id", "event_data", "batched", "event_id", "extra"])
            body[key] = rng.choice([99, -1, 2**70, "0", None, 1.5, [], {"index": 1}, True] + page["others"])
        elif kind == "session":
            body["session_hash"] = rng.choice([None, 7, [], "", "\x00" + session, "é😀/../" + session, "s" * 5000])
        method, headers = "POST", {"Content-Type": "application/json"}
        if kind == "call":
            path = GRADIO + rng.choice(["/call/submit", "/call/v2/submit", "/call/nope", "/run/submit", "/api/submit",
                                        "/call/stop", "/cancel"])
            body = rng.choice([{"data": [data[0], *data[2:5]]}, {"data": data}, {"user_text": data[0]},
                               {"user_text": data[0], "temperature": rng.choice(WEIRD)}, {"bogus": 1}, {},
                               {"session_hash": session, "fn_index": page["chat"], "event_id": "x"}])
        elif kind == "path":
            method, body = "GET", None
            path = rng.choice(["/config", GRADIO + "/info", f"{GRADIO}/queue/data?session_hash={session}",
                               f"{GRADIO}/queue/data", f"{GRADIO}/call/submit/{session}",
                               GRADIO + "/file=/etc/passwd", "/"])
        raw = b"" if body is None else json.dumps(body).encode()  # (NaN, Infinity and lone surrogates as JSON allows)
        if kind == "json":
            raw = rng.choice([raw[:rng.randint(0, len(raw))], b"", b"null", b"[]", b"{" * 10000, raw + b"}",
                              bytes(rng.randrange(256) for _ in range(64)), b'{"data": [' + b"1," * 10000 + b"1]}"])
        elif kind == "utf8":
            raw = raw.replace(b'"data": ["', b'"data": ["' + rng.choice([b"\xff", b"\xed\xa0\x80", b"\xc0\xaf"]), 1)
        yield method, path, headers, raw, kind


def send_gradio(client: httpx.Client, request) -> tuple[int, bytes]:
    """Send one generated Gradio request and read its answer; a join answered 200 is followed, as the browser does,
    by the session's event stream read to its end (or, for "abandon", to its first line); "twice" joins the same
    body twice first. A /call POST answered 200 is followed by its event's stream. Returns (status, body)."""
    method, path, headers, data, kind = request
    joins = 2 if kind == "twice" else 1
    for _ in range(joins):
        response = client.request(method, path, headers=headers, content=data)
    followed = path.startswith((GRADIO + "/queue/join", GRADIO + "/call/"))
    if response.status_code != 200 or method != "POST" or not followed:
        return response.status_code, response.content
    if path.endswith("/queue/join"):
        stream = f"{GRADIO}/queue/data?session_hash={quote(json.loads(data)['session_hash'])}"
    else:
        stream = f"{path}/{response.json()['event_id']}"
    with client.stream("GET", stream) as events:
        body = next(events.iter_lines(), "").encode() if kind == "abandon" else events.read()
    return events.status_code, response.content + body


SOURCE = {"base": None, "mid": "base", "sft": "mid", "rl": "mid"}  # the stage each one starts from


def kill_campaign(work: Path, kills: int, seed: int, stages: list[str]) -> dict[str, dict]:
    """Uninterrupted tiny runs of `stages` and the stages they start from, in one reference home; each of
    `stages` also copied from there before it ran, killed `kills` times and resumed to the end."""
    sys.path.insert(0, str(ROOT / "tests"))
    import itertools

    import test_interrupt as t

    from nanochat_jax import corpus
    from nanochat_jax.tokenizer import Tokenizer

    reference = work / "reference"
    Tokenizer.train_from_iterator(itertools.islice(corpus.documents("train"), 2000), vocab_size=300).save(
        reference / "tokenizer")
    needed = {s for stage in stages for s in (stage, SOURCE[stage], SOURCE.get(SOURCE[stage])) if s}
    results = {}
    for stage in (s for s in SOURCE if s in needed):
        home = work / f"killed-{stage}"
        if stage in stages:
            shutil.copytree(reference, home)
        t.finish(t.start(reference, stage=stage))
        if stage in stages:
            campaign = t.kill_and_resume(home, kills, seed, stage=stage)
            same = (t.state_hash(home, stage=stage) == t.state_hash(reference, stage=stage)
                    and t.logged(home, stage) == t.logged(reference, stage))
            results[stage] = {"kills": len(campaign["hit"]), "kills_during_save": campaign["hit"].count("save"),
                              "resumes": campaign["resumes"], "bit_identical_runs": f"{int(same)}/1",
                              "broken_checkpoints_skipped": len(campaign["skipped"])}
    return results


def serve_fuzz(home: Path, count: int, seed: int) -> dict:
    """scripts/chat_web.py serving the reference run's base checkpoint, `count` hostile requests to its API and
    `count` to its page's Gradio queue, then its peak RSS."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**__import__("os").environ, "NANOCHAT_JAX_HOME": str(home), "JAX_PLATFORMS": "cpu",
           "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, "scripts/chat_web.py", "--source", "base", "-p", str(port),
                               "--api-key", "bench", "-t", "0", "-m", "8"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"chat_web did not start (exit code {server.returncode})")
            time.sleep(0.5)
        stats = fuzz(url, count, seed, "bench")
        stats["page"] = gradio_fuzz(url, count, seed)
        stats["server_alive"] = server.poll() is None and httpx.get(url + "/health").json()["status"] == "ok"
        status = Path(f"/proc/{server.pid}/status").read_text().splitlines()
        stats["server_peak_rss_mib"] = int(next(x for x in status if x.startswith("VmHWM")).split()[1]) // 1024
        return stats
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="base", help="comma-separated stages to kill: base, mid, sft, rl")
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs of each stage's run")
    parser.add_argument("--requests", type=int, default=1000, help="hostile requests to the server")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    stages = args.stages.split(",")
    if set(stages) - set(SOURCE):
        raise SystemExit(f"reliability.py: --stages={args.stages!r}: each must be one of {', '.join(SOURCE)}")
    with tempfile.TemporaryDirectory(prefix="nanochat-jax-reliability-") as work:
        t0 = time.time()
        kills = kill_campaign(Path(work), args.kills, args.seed, stages)
        t1 = time.time()
        requests = serve_fuzz(Path(work) / "reference", args.requests, args.seed)
        t2 = time.time()
    for stage, k in kills.items():
        print(f"{stage}: kills {k['kills']} ({k['kills_during_save']} during a save) | resumes {k['resumes']} | "
              f"bit-identical runs {k['bit_identical_runs']} | broken checkpoints skipped "
              f"{k['broken_checkpoints_skipped']}")
    print(f"kill campaigns: {t1 - t0:.0f} s")
    print(f"chat_web: requests sent {requests['requests']} | answered {requests['answered']} | refusals "
          f"{requests['refusals']} | crashes {requests['crashes'] + (not requests['server_alive'])} | peak RSS "
          f"{requests['server_peak_rss_mib']} MiB | statuses {requests['statuses']} | {t2 - t1:.0f} s")
    page = requests["page"]
    print(f"chat_web page (Gradio queue): requests sent {page['requests']} | answered {page['answered']} | refusals "
          f"{page['refusals']} | crashes {page['crashes']} | statuses {page['statuses']}")


if __name__ == "__main__":
    main()
