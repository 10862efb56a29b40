"""karpathy/nanochat's own code, timed the way our benches time ours: its training step (`train`, the reference of
bench/train_step.py) and its Engine's decoding (`decode`, the reference of bench/decode.py).

    python bench/nanochat_ref.py train --nanochat-dir DIR [--depth 20] [--width 0] [--heads 0] [--vocab 65536]
        [--dtype bfloat16] [--ns-dtype bfloat16] [--device-batch-size 32] [--seq 2048] [--micro-steps 1] [--steps 10]
        [--warmup 3] [--device D]
    python bench/nanochat_ref.py decode --nanochat-dir DIR [--depth 4] [--width 0] [--heads 0] [--vocab 65536]
        [--dtype float32] [--prompt-len 64] [--max-tokens 64] [--batch-sizes 1,16] [--device D]

DIR holds nanochat's `nanochat/` package (gpt.py, engine.py, muon.py, adamw.py, common.py) from a checkout of
karpathy/nanochat outside this repository (its source is never copied into the repo). The model is built as
nanochat's scripts build it (meta-device init, to_empty, init_weights) with our shapes: width 0 = nanochat's
depth * 64, heads 0 = width / 128; on a GPU when torch sees one (or --device).

train: compiled as nanochat's base_train.py does (torch.compile(dynamic=False), bf16 autocast, AdamW + Muon from
GPT.setup_optimizers, grad clip 1.0) on synthetic tokens; `--dtype float32` drops the autocast (the model in fp32,
like for like with a model whose compute dtype is fp32, cpu_tiny's). nanochat's Muon orthogonalises in bf16 whatever
the autocast; `--ns-dtype float32` runs the same quintic Newton-Schulz iteration in fp32 instead (like for like with
our optim.ns_dtype=float32; on CPUs without bf16 instructions torch's bf16 matmuls are 50-100x slower than its fp32
ones and dominate nanochat's step). One step = --micro-steps forward/backward
passes then the optimizer steps; the median of --steps after --warmup.
decode: nanochat's Engine on a fresh model (its zero lm_head makes greedy decoding emit token 0, so no row stops
early), `batch` greedy samples of one synthetic prompt (its Engine prefills once and copies the cache into the rows).
Decode time = generate_batch(max_tokens) - generate_batch(1), best of two runs each, over batch * (max_tokens - 1).

Each prints its lines and a JSON line starting with `JSON `. The benches call `run`, which runs this file in a fresh
process (one that ends before JAX claims the device) and returns that JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run(python: str, mode: str, options: list[str]) -> dict:
    """This file's `mode` under `python` (one with torch), its output streamed with a [nanochat] prefix (a time limit
    that stops the bench keeps what it printed); returns its JSON result."""
    lines = []
    cmd = [python, str(Path(__file__).resolve()), mode, *options]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            print("[nanochat] " + line, end="", flush=True)
            lines.append(line)
    results = [line for line in lines if line.startswith("JSON ")]
    if proc.returncode != 0 or not results:
        raise SystemExit(f"bench/nanochat_ref.py {mode} failed (exit {proc.returncode}; its output is above)")
    return json.loads(results[0][5:])


def build_model(args):
    """nanochat's GPT at our shapes, initialised as its scripts do; returns (model, device, width, heads)."""
    sys.path.insert(0, args.nanochat_dir)
    import torch
    from nanochat.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    width = args.width or args.depth * 64
    heads = args.heads or max(1, (width + 127) // 128)
    config = GPTConfig(sequence_len=args.seq, vocab_size=args.vocab, n_layer=args.depth, n_head=heads,
                       n_kv_head=heads, n_embd=width)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model, device, width, heads


def time_train(args) -> dict:
    import torch

    torch.set_float32_matmul_precision("high")  # nanochat's compute_init does the same
    orig_model, device, width, heads = build_model(args)
    if args.ns_dtype == "float32":
        import nanochat.muon
        nanochat.muon.zeropower_via_newtonschulz5 = torch.compile(newton_schulz_fp32)
    if args.dtype == "float32":  # nanochat keeps the embedding in bf16 for autocast; its rotary tables stay bf16 (the
        orig_model.transformer.wte.to(dtype=torch.float32)  # products with fp32 activations are fp32)
    model = torch.compile(orig_model, dynamic=False)
    optimizers = model.setup_optimizers()
    autocast = torch.amp.autocast(device_type=device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    B, T, A = args.device_batch_size, args.seq, args.micro_steps
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, args.vocab, (B, T), device=device, generator=gen)
    y = torch.randint(0, args.vocab, (B, T), device=device, generator=gen)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        for _ in range(A):
            with autocast:
                loss = model(x, y)
            (loss / A).backward()
        torch.nn.utils.clip_grad_norm_(orig_model.parameters(), 1.0)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    step()
    sync()
    compile_s = time.perf_counter() - t0
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        loss = step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            losses.append(loss.item())
    step_s = statistics.median(times)
    tok_s = A * B * T / step_s
    params = sum(p.numel() for p in orig_model.parameters())
    result = {"impl": "nanochat-torch", "torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "dtype": args.dtype, "depth": args.depth, "width": width, "heads": heads, "params": params, "vocab": args.vocab, "seq": T,
              "device_batch_size": B, "micro_steps": A, "compile_s": compile_s, "step_s_median": step_s,
              "step_s_min": min(times), "tokens_per_sec": tok_s, "flops_per_token": orig_model.estimate_flops(),
              "loss_first": losses[0], "loss_last": losses[-1],
              "max_memory_allocated_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None}
    result["mfu_989"] = result["flops_per_token"] * tok_s / 989e12
    print(f"nanochat torch d{args.depth} ({params / 1e6:.1f}M params, {heads} heads, {args.dtype}) | batch {A}x{B}x{T} | compile {compile_s:.1f}s | "
          f"step {1e3 * step_s:.1f} ms | {tok_s:,.0f} tok/s | MFU {100 * result['mfu_989']:.1f}% of 989 TFLOP/s")
    return result


def newton_schulz_fp32(G, steps: int):
    """nanochat's orthogonalisation (the quintic iteration, coefficients 3.4445, -4.7750, 2.0315, on the wide
    orientation, spectral norm first scaled to <= 1) computed in fp32 instead of bf16."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = G.size(-2) > G.size(-1)
    X = G.float().mT if tall else G.float()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


class NoSpecialsTokenizer:
    """Just enough tokenizer for nanochat's Engine: special ids past the vocabulary (never sampled)."""

    def __init__(self, vocab_size: int):
        names = ["<|bos|>", "<|assistant_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>",
                 "<|output_end|>"]
        self.ids = {name: vocab_size + i for i, name in enumerate(names)}

    def encode_special(self, name: str) -> int:
        return self.ids[name]

    def get_bos_token_id(self) -> int:
        return self.ids["<|bos|>"]


def time_decode(args) -> dict:
    import torch

    args.seq = args.prompt_len + args.max_tokens
    model, device, width, heads = build_model(args)
    from nanochat.engine import Engine  # (build_model put DIR on the path)

    model.to(dtype=torch.float32 if args.dtype == "float32" else torch.bfloat16)
    model.cos, model.sin = model.cos.bfloat16(), model.sin.bfloat16()  # nanochat keeps its rotary tables in bf16
    model.eval()
    engine = Engine(model, NoSpecialsTokenizer(args.vocab))
    prompt = torch.randint(0, args.vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        def generate(max_tokens: int) -> float:
            best = float("inf")
            for _ in range(2):
                sync()
                t0 = time.perf_counter()
                results, _ = engine.generate_batch(prompt, num_samples=batch, max_tokens=max_tokens, temperature=0.0)
                sync()
                best = min(best, time.perf_counter() - t0)
                assert all(len(r) == args.prompt_len + max_tokens for r in results), "a row stopped early"
            return best

        generate(2)  # warm-up
        t_decode = generate(args.max_tokens) - generate(1)
        tps = batch * (args.max_tokens - 1) / t_decode
        rows.append({"batch": batch, "decode_tokens_per_sec": tps, "ms_per_step": t_decode / (args.max_tokens - 1) * 1e3})
        print(f"nanochat batch={batch:3d} | decode {tps:8.1f} tok/s ({rows[-1]['ms_per_step']:.2f} ms/step)", flush=True)
    return {"impl": "nanochat-torch", "torch": torch.__version__, "device": device, "dtype": args.dtype,
            "threads": torch.get_num_threads(), "depth": args.depth, "width": width, "heads": heads,
            "vocab": args.vocab, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "rows": rows}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["train", "decode"])
    parser.add_argument("--nanochat-dir", required=True, help="directory that contains nanochat/gpt.py")
    parser.add_argument("--depth", type=int, default=None, help="layers (default: train 20, decode 4)")
    parser.add_argument("--width", type=int, default=0, help="model width (default: nanochat's, depth * 64)")
    parser.add_argument("--heads", type=int, default=0, help="attention heads (default: nanochat's, width / 128)")
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                        help="train: bfloat16 = nanochat's autocast (default), float32 = none; decode: default float32")
    parser.add_argument("--ns-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="train: Muon's Newton-Schulz dtype (bfloat16 = nanochat's)")
    parser.add_argument("--device", default="", help="cuda or cpu (default: cuda when torch sees a GPU)")
    parser.add_argument("--device-batch-size", type=int, default=32, help="train")
    parser.add_argument("--seq", type=int, default=2048, help="train")
    parser.add_argument("--micro-steps", type=int, default=1, help="train")
    parser.add_argument("--steps", type=int, default=10, help="train")
    parser.add_argument("--warmup", type=int, default=3, help="train")
    parser.add_argument("--prompt-len", type=int, default=64, help="decode")
    parser.add_argument("--max-tokens", type=int, default=64, help="decode")
    parser.add_argument("--batch-sizes", default="1,16", help="decode")
    args = parser.parse_args(argv)
    train = args.mode == "train"
    args.depth = args.depth or (20 if train else 4)
    args.dtype = args.dtype or ("bfloat16" if train else "float32")
    result = time_train(args) if train else time_decode(args)
    print("JSON " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
