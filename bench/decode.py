"""Inference throughput of the Engine: prefill tokens/s and decode tokens/s per batch size, next to the
memory-bandwidth bound for decoding.

    python bench/decode.py --depth 4 --prompt-len 64 --max-tokens 64 --batch-sizes 1,16 [--cpu-devices 2]
                           [--nanochat-dir DIR --nanochat-python PYTHON]

Synthetic prompts, a freshly initialised model (its zero lm_head makes greedy decoding emit token 0
forever, so no row stops early). Prefill is timed on the engine's jitted prefill; decode is the
end-to-end `generate_batch` time for max_tokens minus the same for 1 token (prefill and first sample),
divided into batch * (max_tokens - 1) tokens, for `batch` samples of one prompt (one prefill, the cache
copied into the rows, as nanochat's Engine does); each time is the best of two runs. With --nanochat-dir,
karpathy/nanochat's own Engine is timed the same way first (bench/nanochat_ref.py, same shapes and compute
dtype, in its own process) and the ratio is printed per batch size. --cpu-devices N splits a CPU into N host
devices that share the rows, as scripts/chat_web.py serves (scheduler.serving_engine; batches N does not divide
stay on one device).
Bandwidth bound: every decode step must read all weights once (in the compute dtype: the engine casts the
parameters once; the embedding table only gathers rows) and the live keys/values (prompt + tokens so far,
on average prompt + max_tokens / 2 per row; the engine's attention window is at most twice that), so
tokens/s <= batch * bandwidth / (weight bytes + live cache bytes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as `python bench/decode.py`

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nanochat_jax import engine as engine_lib  # noqa: E402
from nanochat_jax.config import ModelConfig  # noqa: E402
from nanochat_jax.model import decode_weight_bytes, init_model, kv_bytes, num_params  # noqa: E402
from nanochat_jax.scheduler import serving_engine, split_cpu  # noqa: E402


class _NoSpecialsTokenizer:
    """Just enough tokenizer for the engine: special ids past the vocabulary (never sampled), no text."""

    def __init__(self, vocab_size: int):
        names = ["<|bos|>", "<|assistant_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>",
                 "<|output_end|>"]
        self.ids = {name: vocab_size + i for i, name in enumerate(names)}
        self.bos_token_id, self.vocab_size = self.ids["<|bos|>"], vocab_size + len(names)

    def encode_special(self, name: str) -> int:
        return self.ids[name]


def bandwidth_bound(cfg: ModelConfig, batch: int, live_len: float, bandwidth_gbs: float) -> float:
    """Decode tokens/s if every step only had to stream the weights and the live part of the KV cache (live_len
    positions per row, the average over the generation) from memory."""
    return batch * bandwidth_gbs * 1e9 / (decode_weight_bytes(cfg) + batch * live_len * kv_bytes(cfg, 1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=65536)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--chunk", type=int, default=16, help="decode steps per jitted call")
    parser.add_argument("--compute-dtype", default="float32")
    parser.add_argument("--cpu-devices", type=int, default=1, help="on a CPU: host devices that share the rows")
    parser.add_argument("--nanochat-dir", default="", help="also time karpathy/nanochat's Engine from this checkout")
    parser.add_argument("--nanochat-python", default=sys.executable, help="the Python that runs it (one with torch)")
    parser.add_argument("--bandwidth-gbs", type=float, default=None,
                        help="memory bandwidth in GB/s for the bound (default 4800, an H200's HBM)")
    args = parser.parse_args(argv)
    if args.max_tokens < 2:
        parser.error("--max-tokens must be at least 2 (decode time is the time past the first token)")
    split_cpu(args.cpu_devices)  # before JAX starts
    cfg = ModelConfig(depth=args.depth, vocab_size=args.vocab_size, sequence_len=args.prompt_len + args.max_tokens,
                      compute_dtype=args.compute_dtype)
    # nanochat's Engine first, in its own process: once JAX starts it holds most of a GPU's memory
    theirs = run_nanochat(args, cfg) if args.nanochat_dir else {}
    if args.bandwidth_gbs is None:
        args.bandwidth_gbs = 4800.0
        if jax.default_backend() == "cpu":
            print("note: the bandwidth bound below is for an H200 (4800 GB/s); this CPU's is unknown, "
                  "pass --bandwidth-gbs")

    model = init_model(cfg)
    tokenizer = _NoSpecialsTokenizer(cfg.vocab_size)
    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} depth={cfg.depth} width={cfg.n_embd} "
          f"heads={cfg.n_head} params={num_params(cfg) / 1e6:.1f}M vocab={cfg.vocab_size} dtype={cfg.compute_dtype} "
          f"prompt={args.prompt_len} max_tokens={args.max_tokens} chunk={args.chunk}")
    rng = np.random.default_rng(0)
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = rng.integers(0, cfg.vocab_size, (batch, args.prompt_len)).tolist()
        engine = serving_engine(model, tokenizer, batch, args.cpu_devices, chunk=args.chunk)
        L = engine_lib.prompt_bucket(args.prompt_len)
        max_len = engine_lib.bucket(L + args.max_tokens)
        padded, lengths = np.zeros((batch, L), np.int32), jnp.full((batch,), args.prompt_len, jnp.int32)
        padded[:, :args.prompt_len] = prompts

        def prefill():
            cache = engine._empty_cache(batch, max_len)
            logits, cache = engine_lib._prefill(engine.graphdef, engine.state, cache, jnp.asarray(padded), lengths)
            return jax.block_until_ready(logits)

        prefill()  # compile
        t0 = time.perf_counter()
        prefill()
        t_prefill = time.perf_counter() - t0

        def generate(max_tokens: int) -> float:
            best = float("inf")
            for _ in range(2):
                t0 = time.perf_counter()
                results, _ = engine.generate_batch(prompts[0], num_samples=batch, max_tokens=max_tokens,
                                                   temperature=0.0)
                best = min(best, time.perf_counter() - t0)
                assert all(len(r) == args.prompt_len + max_tokens for r in results), "a row stopped early"
            return best

        generate(1), generate(args.max_tokens)  # compile every window the timed runs use
        t_first = generate(1)
        t_decode = generate(args.max_tokens) - t_first
        decode_tps = batch * (args.max_tokens - 1) / t_decode
        bound = bandwidth_bound(cfg, batch, args.prompt_len + args.max_tokens / 2, args.bandwidth_gbs)
        # the engine attends over power-of-two cache windows: the bound for the positions it actually reads
        read = bandwidth_bound(cfg, batch, float(np.mean(engine.decode_windows)), args.bandwidth_gbs)
        devices = 1 if engine.mesh is None else engine.mesh.size
        print(f"batch={batch:3d} devices={devices} cache_len={max_len} | prefill {batch * args.prompt_len / t_prefill:10.0f} tok/s "
              f"({t_prefill * 1e3:.1f} ms) | decode {decode_tps:8.1f} tok/s ({t_decode / (args.max_tokens - 1) * 1e3:.2f} "
              f"ms/step) | bandwidth bound at {args.bandwidth_gbs:g} GB/s: {bound:10.0f} tok/s (live cache), "
              f"{read:.0f} tok/s (windows read) | decode / bound {decode_tps / bound:.2f}")
        if batch in theirs:
            print(f"RATIO batch={batch} ours/nanochat decode tokens/s = {decode_tps / theirs[batch]:.2f} "
                  f"({decode_tps:,.0f} vs {theirs[batch]:,.0f})")


def run_nanochat(args, cfg: ModelConfig) -> dict[int, float]:
    """nanochat's Engine on the same shapes (bench/nanochat_ref.py decode): {batch: decode tok/s}."""
    from nanochat_ref import run
    result = run(args.nanochat_python, "decode", [
        "--nanochat-dir", args.nanochat_dir, "--depth", str(cfg.depth), "--width", str(cfg.n_embd),
        "--heads", str(cfg.n_head), "--vocab", str(cfg.vocab_size), "--prompt-len", str(args.prompt_len),
        "--max-tokens", str(args.max_tokens), "--batch-sizes", args.batch_sizes, "--dtype", args.compute_dtype])
    return {row["batch"]: row["decode_tokens_per_sec"] for row in result["rows"]}


if __name__ == "__main__":
    main()
