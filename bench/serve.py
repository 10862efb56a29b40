"""Chat serving latency: time to first token and the gap between streamed tokens for one chat turn, through
the same generator the web chat and the CLI stream from (`web.stream_tokens` over `Engine.generate`).

    python bench/serve.py [--depth 4] [--vocab-size 2048] [--chunks 1,4,16] [--prompt-len 64]
                          [--max-tokens 64] [--turns 3] [--compute-dtype float32]

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


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--chunks", default="1,4,16", help="engine chunk sizes to compare")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--turns", type=int, default=3, help="timed turns after the first (compiling) one")
    parser.add_argument("--compute-dtype", default="float32")
    args = parser.parse_args(argv)

    import numpy as np

    from decode import _NoSpecialsTokenizer  # bench/decode.py: special ids past the vocabulary
    from nanochat_jax.config import ModelConfig
    from nanochat_jax.engine import Engine
    from nanochat_jax.model import init_model

    cfg = ModelConfig(depth=args.depth, vocab_size=args.vocab_size, compute_dtype=args.compute_dtype,
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
