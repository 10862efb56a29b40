"""Export a checkpoint and its tokenizer as a Hugging Face transformers `NanoChat` folder.

    python scripts/export_hf.py --source sft --out ./nanochat-hf            # latest sft checkpoint
    python scripts/export_hf.py --source base --depth 20 --dtype bfloat16

The folder loads with `AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)`;
`tokenizer.apply_chat_template(messages)` renders chats like our Tokenizer. Weights are safetensors.
Default output: <home>/hf/<source>_d<depth>.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Export a nanochat-jax checkpoint to a Hugging Face NanoChat folder")
    parser.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"], help="checkpoint stage")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--depth", type=int, default=None, help="model depth (default: most recently written)")
    parser.add_argument("-o", "--out", default=None, help="output folder (default: <home>/hf/<source>_d<depth>)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the weights")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    from flax import nnx

    from nanochat_jax.checkpoint import CheckpointError, load_model
    from nanochat_jax.common import artifacts_dir
    from nanochat_jax.config import model_config_from_dict
    from nanochat_jax.hf import HFFormatError, export_hf

    try:
        model, tokenizer, meta = load_model(args.source, step=args.step, depth=args.depth)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"export_hf: cannot load the {args.source} checkpoint: {e}", file=sys.stderr)
        return 1
    cfg = model_config_from_dict(meta["model"])
    out = args.out or artifacts_dir("hf", f"{args.source}_d{cfg.depth}")
    params = jax.tree.map(jax.device_get, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    try:
        export_hf(params, cfg, tokenizer, out, dtype=args.dtype)
    except HFFormatError as e:
        print(f"export_hf: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.source} step {meta['step']} (depth {cfg.depth}, {args.dtype}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
