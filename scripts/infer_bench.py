"""What a trained checkpoint costs to run (nanochat master's infer_bench): latency, throughput and how close
decoding gets to the device's memory bandwidth, over a sweep of batch sizes. An evaluation beside the scores:
GQA or a wider model show up here (sliding windows in the card: the Engine reads a power-of-two window of the cache
in every layer and masks, so its steps do not get cheaper with them).

    python scripts/infer_bench.py -i base                          # the latest base checkpoint
    python scripts/infer_bench.py -i sft --batch-sizes 1,4,16 --decode-tokens 128
    python scripts/infer_bench.py -i base | tail -1 | jq .sweep    # the last line is all of it as JSON

First a card of what the architecture implies: the bytes a decode step must read (the matrices in the Engine's
compute dtype, the embedding lookups' few rows left out, and each row's keys and values at the middle of the
generation, sliding windows capping theirs), the batch-1 ceiling (peak bandwidth / those bytes) and how many
full-context rows fit beside the weights. Then per batch size (`batch` samples of one prompt, as the Engine and
nanochat's run them): TTFT (until an Engine that streams every token, chunk 1, yields the first one: prefill and
one decode step, with the KV cache of the whole generation), the first column (the Engine decodes `chunk` tokens
per compiled call and streams them together: when a chat user sees the first `chunk` tokens), TPOT (per token after
it in the same stream: (end - first column) / (N - chunk), every chunk on the same cache), decode tokens/s, MBU (the
bytes a step must read over TPOT, against the peak bandwidth), MFU (decode FLOPs against the peak) and the device's
peak memory so far in the process. Prefill (tokens/s, MFU) is batch 1's TTFT (so with one decode step in it).
Each figure is from the faster of two runs after one that compiles. Greedy by default; every row decodes exactly
--decode-tokens tokens (the Engines are given the special tokens as ids past the vocabulary, so no row ends its
turn early or calls the calculator).

Peaks: the datasheet figures of targets.CHIPS for a known GPU / TPU kind; on a CPU the measured ones (a jitted
sum over 256 MiB for the bandwidth, common.cpu_peak_flops for FLOP/s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp

from nanochat_jax.common import UserError, add_checkpoint_flags, load_checkpoint, peak_flops_per_device, run_script
from nanochat_jax.config import model_config_from_dict
from nanochat_jax.engine import Engine
from nanochat_jax.model import (attended_positions, decode_flops_per_token, decode_weight_bytes, kv_bytes,
                                matmul_params, num_params, prefill_flops)
from nanochat_jax.targets import chip_of

PARAGRAPH = ("A river carries water from the hills to the sea. Along its banks people built farms, mills and "
             "towns, and the river gave them fish, power and a road for their boats. ")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_checkpoint_flags(parser, default="base")
    parser.add_argument("--prompt-tokens", type=int, default=2048, help="prompt length (cut to fit the context)")
    parser.add_argument("--decode-tokens", type=int, default=None,
                        help="tokens generated per row (default 256, or half the context where that is less)")
    parser.add_argument("--batch-sizes", default="1,8,32,128", help="comma-separated decode batch sizes")
    parser.add_argument("-t", "--temperature", type=float, default=0.0)
    parser.add_argument("--chunk", type=int, default=16, help="the Engine's decode steps per compiled call")
    args = parser.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes takes whole numbers separated by commas, got {args.batch_sizes!r}")
    if (min(args.batch_sizes) < 1 or args.prompt_tokens < 1 or args.chunk < 1
            or (args.decode_tokens is not None and args.decode_tokens < 2)):
        parser.error("need batch sizes >= 1, --prompt-tokens >= 1, --decode-tokens >= 2 and --chunk >= 1")
    if not args.temperature >= 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    return args


def measured_bandwidth(size: int = 2 ** 26, rounds: int = 5) -> float:
    """Bytes/s one device reads: a jitted sum over `size` float32 values (256 MiB), best of `rounds`."""
    x = jnp.ones((size,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 4 * size / best


def device_peaks(compute_dtype: str) -> dict:
    """The first device's kind, peak bandwidth (bytes/s), peak FLOP/s and memory (bytes; None where unknown)."""
    device = jax.devices()[0]
    chip = chip_of(device.device_kind)
    cpu = device.platform == "cpu"
    bandwidth = measured_bandwidth() if cpu else chip.hbm_bandwidth if chip else None
    memory = (device.memory_stats() or {}).get("bytes_limit")
    return {"device": device.device_kind, "peak_bandwidth": bandwidth, "peak_flops":
            peak_flops_per_device(device.device_kind, compute_dtype), "memory": memory}


def prompt_tokens(tokenizer, length: int) -> list[int]:
    """A natural-language prompt of `length` tokens after <|bos|> (random ids would do for the speed, but a real
    prompt keeps greedy decoding from settling on a stop token)."""
    tokens = [tokenizer.bos_token_id]
    while len(tokens) < length:
        tokens += tokenizer.encode(PARAGRAPH)
    return tokens[:length]


class NoStops:
    """The checkpoint's tokenizer with every special token moved past the vocabulary (whose logits the Engine
    never samples): no row ends early, none calls the calculator."""

    def __init__(self, tokenizer):
        self.vocab_size = self.bos_token_id = tokenizer.vocab_size

    def encode_special(self, name: str) -> int:
        return self.vocab_size + 1


def timed_stream(engine, prompt, batch: int, max_tokens: int, temperature: float) -> tuple[float, float]:
    """(seconds to the first streamed column, seconds to the last) of the faster of two runs streaming max_tokens
    columns of `batch` samples of the prompt."""
    best = (float("inf"), float("inf"))
    for _ in range(2):
        t0, first, columns = time.perf_counter(), None, 0
        for _ in engine.generate(prompt, num_samples=batch, max_tokens=max_tokens, temperature=temperature):
            first = first or time.perf_counter() - t0
            columns += 1
        assert columns == max_tokens
        best = min(best, (first, time.perf_counter() - t0), key=lambda times: times[1])
    return best


def card(cfg, peaks: dict, prompt_len: int, decode_tokens: int) -> dict:
    """What the architecture implies for decoding, before any timing."""
    weights = decode_weight_bytes(cfg)
    itemsize = weights // matmul_params(cfg)  # (bytes per parameter as the Engine holds them)
    context = prompt_len + decode_tokens // 2  # the middle of a generation
    kv_read = kv_bytes(cfg, attended_positions(cfg, context))
    bandwidth, memory = peaks["peak_bandwidth"], peaks["memory"]
    rows = int((memory - num_params(cfg) * itemsize) // kv_bytes(cfg, cfg.sequence_len)) if memory else None
    return {"num_params": num_params(cfg), "compute_dtype": cfg.compute_dtype, "weight_bytes_per_step": weights,
            "kv_bytes_per_token": kv_bytes(cfg, 1), "kv_read_bytes_per_step": kv_read, "context_mid": context,
            "decode_flops_per_token": decode_flops_per_token(cfg, context),
            "ceiling_batch1_tok_per_sec": bandwidth / (weights + kv_read) if bandwidth else None,
            "max_full_context_rows": rows}


def first_token_seconds(engine, prompt, batch: int, max_tokens: int, temperature: float) -> float:
    """Seconds until `engine` streams its first column (of `batch` samples of the prompt, max_tokens each), the
    faster of two runs after one that compiles."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        stream = engine.generate(prompt, num_samples=batch, max_tokens=max_tokens, temperature=temperature)
        next(stream)
        times.append(time.perf_counter() - t0)
        stream.close()
    return min(times[1:])


def sweep_row(engines, prompt, batch: int, args, costs: dict, peaks: dict) -> dict:
    """One batch size: TTFT (the chunk-1 Engine of `engines`), first column, TPOT, tokens/s, MBU, MFU, peak
    memory."""
    engine, token_by_token = engines
    engine.generate_batch(prompt, num_samples=batch, max_tokens=args.decode_tokens,  # compiles every window used
                          temperature=args.temperature)
    first, end = timed_stream(engine, prompt, batch, args.decode_tokens, args.temperature)
    tpot = (end - first) / (args.decode_tokens - args.chunk)
    ttft = first_token_seconds(token_by_token, prompt, batch, args.decode_tokens, args.temperature)
    step_bytes = costs["weight_bytes_per_step"] + batch * costs["kv_read_bytes_per_step"]
    step_flops = batch * costs["decode_flops_per_token"]
    stats = jax.devices()[0].memory_stats() or {}
    return {"batch_size": batch, "ttft_sec": ttft, "first_column_sec": first, "tpot_sec": tpot,
            "tok_per_sec": batch / tpot,
            "mbu_percent": 100 * step_bytes / tpot / peaks["peak_bandwidth"] if peaks["peak_bandwidth"] else None,
            "mfu_percent": 100 * step_flops / tpot / peaks["peak_flops"] if peaks["peak_flops"] else None,
            "peak_memory_bytes": stats.get("peak_bytes_in_use")}


def show(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def main(argv=None) -> int:
    args = parse_args(argv)
    model, tokenizer, meta = load_checkpoint(args)
    cfg = dataclasses.replace(model_config_from_dict(meta["model"]), compute_dtype=model.compute_dtype)  # as run here
    args.decode_tokens = args.decode_tokens or min(256, cfg.sequence_len // 2)
    print(f"settings: {json.dumps(vars(args))}")
    if args.decode_tokens <= args.chunk:
        raise UserError(f"--decode-tokens {args.decode_tokens} must be more than --chunk {args.chunk}: TPOT is timed "
                        "over the chunks after the first")
    prompt_len = min(args.prompt_tokens, cfg.sequence_len - args.decode_tokens)
    if prompt_len < 1:
        raise UserError(f"--decode-tokens {args.decode_tokens} leaves no room for a prompt in the model's context "
                        f"of {cfg.sequence_len} tokens")
    if prompt_len < args.prompt_tokens:
        print(f"note: prompt cut to {prompt_len} tokens so that it and the generation fit the context "
              f"({cfg.sequence_len})")
    prompt = prompt_tokens(tokenizer, prompt_len)
    engines = Engine(model, NoStops(tokenizer), chunk=args.chunk), Engine(model, NoStops(tokenizer), chunk=1)
    peaks = device_peaks(cfg.compute_dtype)
    costs = card(cfg, peaks, prompt_len, args.decode_tokens)
    print(f"model: {args.source} step {meta['step']} | depth {cfg.depth}, width {cfg.n_embd}, heads {cfg.n_head}, "
          f"kv heads {cfg.n_kv_heads}, windows {cfg.window_pattern} | {costs['num_params']:,} parameters, "
          f"{cfg.compute_dtype}")
    bandwidth, flops, memory = (peaks[k] and peaks[k] / unit for k, unit in
                                (("peak_bandwidth", 1e9), ("peak_flops", 1e12), ("memory", 2 ** 30)))
    print(f"device: {peaks['device']} | peak bandwidth {show(bandwidth, ',.0f')} GB/s | peak {show(flops, ',.1f')} "
          f"TFLOP/s | memory {show(memory, '.1f')}{' GiB' if memory else ''}")
    print(f"per decode step: weights {costs['weight_bytes_per_step'] / 2 ** 20:,.1f} MiB + per row "
          f"{costs['kv_read_bytes_per_step'] / 2 ** 20:,.2f} MiB of keys/values at context {costs['context_mid']} "
          f"({costs['kv_bytes_per_token']:,} bytes per token) | batch-1 ceiling "
          f"{show(costs['ceiling_batch1_tok_per_sec'], ',.0f')} tok/s | full-context rows that fit: "
          f"{show(costs['max_full_context_rows'], ',')}")

    batch1 = sweep_row(engines, prompt, 1, args, costs, peaks)
    prefill_time = batch1["ttft_sec"]
    prefill_mfu = prefill_flops(cfg, prompt_len) / prefill_time / peaks["peak_flops"] if peaks["peak_flops"] else None
    print(f"prefill (batch 1, {prompt_len} tokens): {prompt_len / prefill_time:,.0f} tok/s | MFU "
          f"{show(prefill_mfu and 100 * prefill_mfu, '.1f')}%")
    header = " ".join(f"{name:>{width}}" for name, width in (
        ("batch", 6), ("TTFT ms", 9), ("1st column ms", 13), ("TPOT ms", 9), ("tok/s", 10), ("MBU %", 7),
        ("MFU %", 7), ("peak GiB", 9)))
    print(header + "\n" + "-" * len(header))
    sweep = []
    for batch in args.batch_sizes:
        row = batch1 if batch == 1 else sweep_row(engines, prompt, batch, args, costs, peaks)
        sweep.append(row)
        print(f"{batch:>6} {row['ttft_sec'] * 1e3:>9.1f} {row['first_column_sec'] * 1e3:>13.1f} "
              f"{row['tpot_sec'] * 1e3:>9.2f} {row['tok_per_sec']:>10,.0f} "
              f"{show(row['mbu_percent'], '.1f'):>7} {show(row['mfu_percent'], '.2f'):>7} "
              f"{show(row['peak_memory_bytes'] and row['peak_memory_bytes'] / 2 ** 30, '.2f'):>9}")
    print(json.dumps({"source": args.source, "step": meta["step"], "model": meta["model"], **peaks, **costs,
                      "prompt_tokens": prompt_len, "decode_tokens": args.decode_tokens, "chunk": args.chunk,
                      "temperature": args.temperature, "prefill": {
                          "tok_per_sec": prompt_len / prefill_time, "time_sec": prefill_time,
                          "mfu_percent": prefill_mfu and 100 * prefill_mfu}, "sweep": sweep}))
    return 0


if __name__ == "__main__":
    run_script(main)
