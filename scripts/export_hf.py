"""Export a checkpoint and its tokenizer as a Hugging Face transformers `NanoChat` folder.

    python scripts/export_hf.py --source sft --out ./nanochat-hf            # latest sft checkpoint
    python scripts/export_hf.py --source base --depth 20 --dtype bfloat16

The folder loads with `AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)`;
`tokenizer.apply_chat_template(messages)` renders chats like our Tokenizer. Weights are safetensors.
Default output: <home>/hf/<source>_d<depth>.
"""

from __future__ import annotations

import argparse

from nanochat_jax.common import UserError, add_checkpoint_flags, artifacts_dir, load_checkpoint, run_script


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Export a nanochat-jax checkpoint to a Hugging Face NanoChat folder")
    add_checkpoint_flags(parser)
    parser.add_argument("-o", "--out", default=None, help="output folder (default: <home>/hf/<source>_d<depth>)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the weights")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    from flax import nnx

    from nanochat_jax.config import model_config_from_dict
    from nanochat_jax.hf import export_hf

    model, tokenizer, meta = load_checkpoint(args)
    cfg = model_config_from_dict(meta["model"])
    out = args.out or artifacts_dir("hf", f"{args.source}_d{cfg.depth}")
    params = jax.tree.map(jax.device_get, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    try:
        export_hf(params, cfg, tokenizer, out, dtype=args.dtype)  # (HFFormatError: a UserError, one line)
    except OSError as e:  # --out names a file, a folder it may not write to, a full disk
        raise UserError(f"cannot write the export to {out}: {e}") from None
    print(f"exported {args.source} step {meta['step']} (depth {cfg.depth}, {args.dtype}) to {out}")
    return 0


if __name__ == "__main__":
    run_script(main)
