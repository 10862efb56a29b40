"""karpathy/nanochat's own PyTorch training step, timed the way bench/train_step.py times ours.

    python bench/nanochat_torch.py --nanochat-dir DIR [--depth 20] [--heads 0] [--device-batch-size 32] [--seq 2048]
                                   [--vocab 65536] [--micro-steps 1] [--steps 10] [--warmup 3] [--dtype bfloat16]

DIR holds nanochat's `nanochat/` package (gpt.py, muon.py, adamw.py, common.py) from a checkout of
karpathy/nanochat that lives outside this repository (its source is never copied into the repo). The
model is built and compiled as nanochat's scripts/base_train.py does (meta-device init, to_empty,
init_weights, torch.compile(dynamic=False), bf16 autocast, AdamW + Muon from GPT.setup_optimizers, grad
clip 1.0), fed synthetic random tokens. `--dtype float32` drops the autocast: the whole step in fp32, like for like
with a model whose compute dtype is fp32 (cpu_tiny's). One step = --micro-steps forward/backward passes then the
optimizer steps, between two torch.cuda.synchronize() calls (on a GPU). Needs torch; prints a one-line
summary and a JSON line starting with `JSON `.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanochat-dir", required=True, help="directory that contains nanochat/gpt.py")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--heads", type=int, default=0, help="attention heads (default: nanochat's, width / 128)")
    parser.add_argument("--device-batch-size", type=int, default=32)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--micro-steps", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="bfloat16: nanochat's bf16 autocast; float32: no autocast")
    parser.add_argument("--device", default="", help="cuda or cpu (default: cuda when torch sees a GPU)")
    args = parser.parse_args(argv)

    sys.path.insert(0, args.nanochat_dir)
    import torch
    from nanochat.gpt import GPT, GPTConfig

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high")  # nanochat's compute_init does the same
    width = args.depth * 64  # nanochat's depth -> width rule (aspect 64, head dim 128)
    heads = args.heads or max(1, (width + 127) // 128)
    config = GPTConfig(sequence_len=args.seq, vocab_size=args.vocab, n_layer=args.depth, n_head=heads,
                       n_kv_head=heads, n_embd=width)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=args.device)
    model.init_weights()
    if args.dtype == "float32":  # nanochat keeps the embedding in bf16 for autocast; its rotary tables stay bf16 (the
        model.transformer.wte.to(dtype=torch.float32)  # products with fp32 activations are fp32)
    orig_model = model
    model = torch.compile(model, dynamic=False)
    optimizers = model.setup_optimizers()
    flops_per_token = orig_model.estimate_flops()
    params = sum(p.numel() for p in orig_model.parameters())
    autocast = torch.amp.autocast(device_type=args.device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    B, T, A = args.device_batch_size, args.seq, args.micro_steps
    gen = torch.Generator(device=args.device).manual_seed(0)
    x = torch.randint(0, args.vocab, (B, T), device=args.device, generator=gen)
    y = torch.randint(0, args.vocab, (B, T), device=args.device, generator=gen)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

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
    result = {"impl": "nanochat-torch", "torch": torch.__version__, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "dtype": args.dtype, "depth": args.depth, "width": width, "heads": heads, "params": params, "vocab": args.vocab, "seq": T,
              "device_batch_size": B, "micro_steps": A, "compile_s": compile_s, "step_s_median": step_s,
              "step_s_min": min(times), "tokens_per_sec": tok_s, "flops_per_token": flops_per_token,
              "mfu_989": flops_per_token * tok_s / 989e12, "loss_first": losses[0], "loss_last": losses[-1],
              "max_memory_allocated_bytes": torch.cuda.max_memory_allocated() if args.device == "cuda" else None}
    print(f"nanochat torch d{args.depth} ({params / 1e6:.1f}M params, {heads} heads, {args.dtype}) | batch {A}x{B}x{T} | compile {compile_s:.1f}s | "
          f"step {1e3 * step_s:.1f} ms | {tok_s:,.0f} tok/s | MFU {100 * result['mfu_989']:.1f}% of 989 TFLOP/s")
    print("JSON " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
