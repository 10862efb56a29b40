"""karpathy/nanochat's own Engine, decode timed the way bench/decode.py times ours.

    python bench/nanochat_decode.py --nanochat-dir DIR [--depth 4] [--heads 0] [--vocab 65536] [--prompt-len 64]
                                    [--max-tokens 64] [--batch-sizes 1,16] [--dtype float32]

DIR holds nanochat's `nanochat/` package (gpt.py, engine.py) from a checkout of karpathy/nanochat outside this
repository. A freshly initialised model (nanochat's init_weights: a zero lm_head, so greedy decoding emits token 0
and no row stops early) in fp32 (its embedding cast back from bf16) or bf16, on a GPU when torch sees one, else
the CPU. One synthetic prompt, `batch` samples of it (nanochat's Engine prefills once and copies the cache into
the rows), greedy. Decode time = generate_batch(max_tokens) - generate_batch(1), best of two runs each, over
batch * (max_tokens - 1) tokens. Prints a line per batch size and a JSON line starting with `JSON `.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanochat-dir", required=True, help="directory that contains nanochat/gpt.py")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=0, help="attention heads (default: nanochat's, width / 128)")
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)

    sys.path.insert(0, args.nanochat_dir)
    import torch
    from nanochat.engine import Engine
    from nanochat.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    width = args.depth * 64  # nanochat's depth -> width rule
    heads = args.heads or max(1, (width + 127) // 128)
    config = GPTConfig(sequence_len=args.prompt_len + args.max_tokens, vocab_size=args.vocab, n_layer=args.depth,
                       n_head=heads, n_kv_head=heads, n_embd=width)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    model.to(dtype=dtype)  # nanochat keeps its rotary tables in bf16 (products with fp32 activations are fp32)
    model.cos, model.sin = model.cos.bfloat16(), model.sin.bfloat16()
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
    result = {"impl": "nanochat-torch", "torch": torch.__version__, "device": device, "dtype": args.dtype,
              "threads": torch.get_num_threads(), "depth": args.depth, "width": width, "heads": heads,
              "vocab": args.vocab, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "rows": rows}
    print("JSON " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
