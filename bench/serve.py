"""Chat serving latency: time to first token and the gap between streamed tokens for one chat turn, through
the same generator the web chat and the CLI stream from (`web.stream_tokens` over `Engine.generate`).

    python bench/serve.py [--depth 4] [--vocab-size 2048] [--chunks 1,4,16] [--prompt-len 64]
                          [--max-tokens 64] [--turns 3] [--compute-dtype float32]
    python bench/serve.py --load [--clients 32] [--requests 256] [--slots 32] [--cpu-devices 2] [--repeats 3]
                          [--config configs/cpu_tiny.toml] [--depth N] [--prompt-len 64] [--max-tokens 64]

--load: a load test of the chat server's API (nanochat_jax/api.py over the Scheduler, served by uvicorn on
127.0.0.1 only): `--clients` threads (in a second process) send `--requests` streamed greedy chat completions in all, first with
`--slots` decode slots (continuous batching; on a CPU split into `--cpu-devices` devices that share the slots, as
scripts/chat_web.py serves) and with one slot on one device (one reply at a time), both servers up at once and
their rounds alternating `--repeats` times, and print the medians of requests/s, p50/p95 time to first token,
generated tokens/s and errors side by side with their ratio, then the tokens/s ratio of each round. The model has the
sizes of --config's [model] and its tokenizer's vocabulary (by default run_cpu.sh's: depth 4, width 256, vocab
2048); the chat renders with a byte-level tokenizer (256 bytes + the special tokens); a warm-up round (the whole
load for the batched server, one request for the other) compiles first.

The engine hands tokens to the host once per chunk of decode steps (one jitted while_loop per chunk), so the
chunk size trades host round trips for streaming smoothness: a reply arrives in bursts of `chunk` tokens.
For each chunk size: the first turn's time to first token (includes compiling), then over the next turns
the median time to first token, the median gap between consecutive streamed tokens (0 inside a burst), the
largest gap, and tokens/s. A freshly initialised model (zero lm_head: it never stops early) and synthetic
prompts; nothing to download.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
for path in (_ROOT, _ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def time_turn(engine, tokenizer, prompt: list[int], max_tokens: int) -> tuple[float, list[float], int]:
    """(seconds to the first streamed token, gaps between later tokens, tokens) of one greedy turn."""
    from nanochat_jax.web import stream_tokens

    start = last = time.perf_counter()
    first, gaps, count = None, [], 0
    for tokens in stream_tokens(engine, tokenizer, prompt, max_tokens=max_tokens, temperature=0.0):
        now = time.perf_counter()
        if first is None:
            first = now - start
        else:
            gaps.append(now - last)
        last, count = now, len(tokens)
    return first, gaps, count


def load_round(url: str, clients: int, requests: int, prompts: list[str], max_tokens: int) -> dict:
    """`requests` streamed completions from `clients` threads: requests/s, time-to-first-token percentiles,
    tokens/s and errors."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import numpy as np

    # one client for all threads: its connections are reused, and making an httpx client costs ~20 ms of CPU (its
    # TLS context), which would otherwise be spent per request on the cores the server runs on
    client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=clients, max_keepalive_connections=clients))

    def one(i: int):
        body = {"messages": [{"role": "user", "content": prompts[i % len(prompts)]}], "temperature": 0,
                "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
        start, first, tokens = time.perf_counter(), None, 0
        try:
            with client.stream("POST", url, json=body) as response:
                if response.status_code != 200:
                    return None
                for line in response.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    if any(c["delta"].get("content") for c in event["choices"]) and first is None:
                        first = time.perf_counter() - start
                    tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
        except httpx.HTTPError:
            return None
        return first, tokens

    start = time.perf_counter()
    with client, ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    seconds = time.perf_counter() - start
    done = [r for r in results if r is not None and r[0] is not None]
    firsts = np.array([f for f, _ in done] or [float("nan")])
    return {"requests_per_sec": len(done) / seconds, "ttft_p50_s": float(np.percentile(firsts, 50)),
            "ttft_p95_s": float(np.percentile(firsts, 95)), "tokens_per_sec": sum(t for _, t in done) / seconds,
            "errors": requests - len(done)}


def load_test(args) -> dict:
    """The batched scheduler against one slot, through the HTTP API on the loopback interface: both servers up at
    once, their rounds alternating `--repeats` times (a noisy machine slows both alike); medians are printed."""
    import multiprocessing
    import socket
    import threading
    from concurrent.futures import ProcessPoolExecutor

    import fastapi
    import jax
    import numpy as np
    import uvicorn

    from nanochat_jax.api import api_router
    from nanochat_jax.config import load_config
    from nanochat_jax.engine import Engine
    from nanochat_jax.model import init_model
    from nanochat_jax.scheduler import Scheduler, serving_engine, split_cpu
    from nanochat_jax.tokenizer import Tokenizer

    split_cpu(args.cpu_devices)
    tokenizer = Tokenizer({bytes([i]): i for i in range(256)})
    config = load_config(["--config", args.config])
    cfg = config.model
    cfg.vocab_size, cfg.depth = config.tokenizer.vocab_size, args.depth or cfg.depth
    model = init_model(cfg)  # zero lm_head: every reply runs to max_tokens
    rng = np.random.default_rng(0)
    prompts = ["".join(chr(c) for c in rng.integers(97, 123, args.prompt_len)) for _ in range(64)]
    engines = {args.slots: serving_engine(model, tokenizer, args.slots, args.cpu_devices), 1: Engine(model, tokenizer)}
    servers, urls = [], {}
    for slots, engine in engines.items():
        scheduler = Scheduler(engine, slots=slots, max_queue=args.clients)
        app = fastapi.FastAPI()
        app.include_router(api_router(scheduler, tokenizer, model="bench", max_tokens=args.max_tokens))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread, scheduler))
        urls[slots] = f"http://127.0.0.1:{port}/v1/chat/completions"
    rounds: dict[int, list[dict]] = {slots: [] for slots in urls}
    try:
        while not all(server.started for server, _, _ in servers):
            time.sleep(0.05)
        # the clients run in a process of their own: their threads would otherwise share the server's GIL
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as clients:
            for slots, url in urls.items():  # warm-up: compiles every shape the rounds use (the batched server
                # prefills the prompts that arrive together in groups of 1 to 32 rows: a whole round meets them all)
                warm = (args.clients, args.requests) if slots > 1 else (1, 1)
                clients.submit(load_round, url, *warm, prompts, args.max_tokens).result()
            for _ in range(args.repeats):
                for slots, url in urls.items():
                    rounds[slots].append(clients.submit(load_round, url, args.clients, args.requests, prompts,
                                                        args.max_tokens).result())
    finally:
        for server, thread, scheduler in servers:
            server.should_exit = True
            thread.join()
            scheduler.close()
    results = {slots: {key: float(np.median([r[key] for r in runs])) for key in runs[0]}
               for slots, runs in rounds.items()}
    batched, single = results[args.slots], results[1]
    devices = 1 if engines[args.slots].mesh is None else engines[args.slots].mesh.size
    print(f"load: {args.requests} requests from {args.clients} clients, prompt {args.prompt_len} characters, "
          f"{args.max_tokens} tokens each, depth {cfg.depth}, width {cfg.n_embd}, vocab {cfg.vocab_size}, "
          f"{jax.default_backend()} {args.slots} slots on {devices} device(s); medians of {args.repeats} "
          f"alternating rounds")
    print(f"{'':16s} {f'slots={args.slots}':>12s} {'slots=1':>12s} {'ratio':>8s}")
    for name, key, scale in [("requests/s", "requests_per_sec", 1), ("TTFT p50 (ms)", "ttft_p50_s", 1e3),
                             ("TTFT p95 (ms)", "ttft_p95_s", 1e3), ("tokens/s", "tokens_per_sec", 1),
                             ("errors", "errors", 1)]:
        a, b = batched[key] * scale, single[key] * scale
        ratio = f"{a / b:8.2f}" if b else f"{'-':>8s}"
        digits = 0 if key == "errors" else 1
        print(f"{name:16s} {a:12.{digits}f} {b:12.{digits}f} {ratio}")
    ratios = [b["tokens_per_sec"] / s["tokens_per_sec"] for b, s in zip(rounds[args.slots], rounds[1])]
    print("tokens/s ratio per round: " + ", ".join(f"{r:.2f}" for r in ratios))
    return {"batched": batched, "single": single, "ratios": ratios}


def main(argv=None) -> list[dict] | dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=None, help="default: 4, with --load the config's")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--chunks", default="1,4,16", help="engine chunk sizes to compare")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--turns", type=int, default=3, help="timed turns after the first (compiling) one")
    parser.add_argument("--compute-dtype", default="float32")
    parser.add_argument("--load", action="store_true", help="load-test the API: batched scheduler vs one slot")
    parser.add_argument("--clients", type=int, default=32, help="--load: concurrent clients")
    parser.add_argument("--requests", type=int, default=256, help="--load: requests in all")
    parser.add_argument("--slots", type=int, default=32, help="--load: decode slots of the batched scheduler")
    parser.add_argument("--cpu-devices", type=int, default=2, help="--load: devices a CPU is split into for the slots")
    parser.add_argument("--repeats", type=int, default=3, help="--load: rounds of each (alternating); medians")
    parser.add_argument("--config", default=str(_ROOT / "configs" / "cpu_tiny.toml"),
                        help="--load: the model's sizes ([model] and the tokenizer's vocab_size)")
    args = parser.parse_args(argv)
    if args.load and (args.slots < 2 or args.repeats < 1):
        parser.error("--load compares --slots >= 2 with one slot, over --repeats >= 1 rounds")
    if args.load:
        return load_test(args)
    if args.turns < 1 or args.max_tokens < 2:
        parser.error("--turns must be at least 1 and --max-tokens at least 2 (the gaps are between streamed tokens)")

    import numpy as np

    from decode import _NoSpecialsTokenizer  # bench/decode.py: special ids past the vocabulary
    from nanochat_jax.config import ModelConfig
    from nanochat_jax.engine import Engine
    from nanochat_jax.model import init_model

    cfg = ModelConfig(depth=args.depth or 4, vocab_size=args.vocab_size, compute_dtype=args.compute_dtype,
                      sequence_len=args.prompt_len + args.max_tokens)
    model, tokenizer = init_model(cfg), _NoSpecialsTokenizer(cfg.vocab_size)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt_len).tolist()
    results = []
    for chunk in [int(c) for c in args.chunks.split(",")]:
        engine = Engine(model, tokenizer, chunk=chunk)
        cold, _, _ = time_turn(engine, tokenizer, prompt, args.max_tokens)
        firsts, gaps, seconds, tokens = [], [], 0.0, 0
        for _ in range(args.turns):
            start = time.perf_counter()
            first, turn_gaps, count = time_turn(engine, tokenizer, prompt, args.max_tokens)
            seconds += time.perf_counter() - start
            firsts.append(first)
            gaps += turn_gaps
            tokens += count
        r = {"chunk": chunk, "first_token_cold_s": cold, "first_token_s": statistics.median(firsts),
             "gap_median_s": statistics.median(gaps), "gap_max_s": max(gaps), "tokens_per_sec": tokens / seconds}
        results.append(r)
        print(f"chunk={chunk:3d} | first token: cold {1e3 * cold:8.1f} ms, warm {1e3 * r['first_token_s']:7.1f} ms"
              f" | gap median {1e3 * r['gap_median_s']:6.2f} ms, max {1e3 * r['gap_max_s']:7.1f} ms"
              f" | {r['tokens_per_sec']:8.1f} tok/s")
    return results


if __name__ == "__main__":
    main()
