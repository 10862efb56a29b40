"""Import a Hugging Face transformers `NanoChat` folder as one of our checkpoints plus its tokenizer.

    python scripts/import_hf.py path/to/nanochat-d32                  # -> the sft stage, step 0
    python scripts/import_hf.py path/to/folder --stage base --step 1000
    python scripts/chat_cli.py --source sft --depth 32                  # then chat / evaluate as usual

The folder needs config.json, model.safetensors (or a safetensors index with its shards) and tokenizer.json
(no pickles are read). The tokenizer is written in our format to
<home>/imported/<stage>_d<depth>/tokenizer (tokenizer-2, ... when an earlier import left another one there) and
recorded in the checkpoint's metadata. The checkpoint holds no optimizer state. Refuses to write into a run
directory that already holds checkpoints unless --force.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nanochat_jax.common import UserError, run_script


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Import a Hugging Face NanoChat folder as a nanochat-jax checkpoint")
    parser.add_argument("folder", help="Hugging Face NanoChat folder (config.json, model.safetensors, tokenizer.json)")
    parser.add_argument("--stage", default="sft", choices=["base", "mid", "sft", "rl"], help="stage to file it under")
    parser.add_argument("--step", type=int, default=0, help="step number of the checkpoint")
    parser.add_argument("--compute-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                        help="model.compute_dtype recorded in the checkpoint (parameters are stored in float32)")
    parser.add_argument("--force", action="store_true", help="import even if the run directory holds checkpoints "
                        "(they are set aside to <dir>.previous-<n>)")
    args = parser.parse_args(argv)
    if args.step < 0:  # a step directory named -5 is one no listing counts: the import would never be found
        parser.error(f"--step must be >= 0, got {args.step}")
    return args


def save_tokenizer(parent: Path, tokenizer) -> Path:
    """Save an import's tokenizer as parent/tokenizer, else tokenizer-2, -3, ...: the first directory that holds no
    tokenizer or this same one. An earlier import's other tokenizer is never overwritten: its checkpoints (set aside
    by --force) and the stages trained from it name that directory, and refuse any other tokenizer there."""
    from nanochat_jax.tokenizer import TOKENIZER_FILE

    staged, n = tokenizer.save(parent / ".staged"), 1
    while (path := parent / ("tokenizer" if n == 1 else f"tokenizer-{n}") / TOKENIZER_FILE).exists() \
            and path.read_bytes() != staged.read_bytes():
        n += 1
    path.parent.mkdir(exist_ok=True)
    staged.replace(path)
    staged.parent.rmdir()
    return path.parent


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir, checkpoint_meta, set_aside_previous_run
    from nanochat_jax.common import artifacts_dir
    from nanochat_jax.config import Config
    from nanochat_jax.hf import import_hf
    from nanochat_jax.tokenizer import tokenizer_record

    try:
        cfg, params, tokenizer = import_hf(args.folder, compute_dtype=args.compute_dtype)
    except (ValueError, FileNotFoundError) as e:  # HFFormatError, ConfigError, a malformed JSON file
        raise UserError(e) from None
    directory = checkpoint_dir(args.stage, cfg.depth)
    existing = sorted(p.name for p in directory.iterdir() if p.name.isdigit())
    if existing and not args.force:
        raise UserError(f"{directory} already holds checkpoints (steps {', '.join(existing)}); "
                        "choose another --stage or pass --force")
    tok_dir = save_tokenizer(artifacts_dir("imported", f"{args.stage}_d{cfg.depth}"), tokenizer)
    meta = checkpoint_meta(args.stage, args.step, Config(model=cfg), cfg, tokenizer_record(tok_dir),
                           imported_from=str(Path(args.folder).absolute()))
    # --force: the checkpoints there are set aside to <directory>.previous-<n> (their tokenizer stays, see save_tokenizer)
    if args.force:
        set_aside_previous_run(directory)
    ckpt = Checkpointer(directory, keep=2, async_save=False)
    ckpt.save(args.step, params, None, None, meta)  # no optimizer state: loads, cannot resume
    ckpt.close()
    n_params = sum(leaf.size for leaf in jax.tree.leaves(params))
    print(f"imported {args.folder} ({n_params:,} parameters, depth {cfg.depth}, width {cfg.n_embd}, "
          f"{cfg.n_head} heads) as {args.stage} step {args.step} in {directory}; tokenizer in {tok_dir}")
    return 0


if __name__ == "__main__":
    run_script(main)
