"""Pretraining data pipeline throughput: tokens/s that the packed batch iterator delivers to the train loop.

    python bench/data.py [--rows 32] [--seq 2048] [--threads 1,2,4] [--packing concat,bestfit] [--batches 20]
                         [--tokenizer DIR] [--files 'DIR/*.parquet'] [--one-pass]

The train step needs this many tokens per second per process (one process drives all its local GPUs):
nanochat's d20 speedrun consumes about 1.07M tokens/s on 8 x H100, so an 8-GPU host's data loader must
stay well above that or the GPUs wait. Tokenization (tiktoken, BOS per document, threads over the
documents of a chunk) is the work; packing and batching are numpy. Without --tokenizer a 2048-token BPE
is trained on the embedded corpus first (a few seconds); tiktoken's speed depends little on vocab size.
Prints tokens/s per packing (data.packing) and thread count. --one-pass adds, per packing, one unshuffled
pass over the source: the share of its tokens that no row holds (bestfit's cropped tails, the pass's last
partial row) and the share of the rows' tokens that sit before their row's first BOS, cut off from their
document's start.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32, help="rows per batch (one process)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--threads", default="1,2,4", help="tokenizer thread counts to try")
    parser.add_argument("--packing", default="concat,bestfit", help="data.packing values to try")
    parser.add_argument("--batches", type=int, default=20, help="timed batches (after 2 untimed)")
    parser.add_argument("--tokenizer", default="", help="a saved tokenizer directory (default: train one)")
    parser.add_argument("--files", default="", help="parquet/jsonl/txt files (a glob or directory) instead of "
                        "the embedded corpus")
    parser.add_argument("--one-pass", action="store_true", help="also the dropped / cut-off token shares")
    args = parser.parse_args(argv)

    from nanochat_jax import corpus
    from nanochat_jax.config import DataConfig
    from nanochat_jax.data import make_batch_iterator, make_source
    from nanochat_jax.tokenizer import Tokenizer

    if args.tokenizer:
        tokenizer = Tokenizer.load(args.tokenizer)
    else:
        tokenizer = Tokenizer.train_from_iterator(corpus.documents("train"), vocab_size=2048)
    data_cfg = DataConfig(source="files", path=args.files) if args.files else DataConfig(source="embedded")
    source = make_source(data_cfg, "train")
    results = []
    for packing, threads in [(p, int(t)) for p in args.packing.split(",") for t in args.threads.split(",")]:
        it = make_batch_iterator(source, tokenizer, args.rows, args.seq, packing=packing, seed=0, num_threads=threads)
        for _ in range(2):
            next(it)
        start = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        seconds = time.perf_counter() - start
        it.close()
        tokens = args.batches * args.rows * args.seq
        r = {"packing": packing, "threads": threads, "tokens_per_sec": tokens / seconds, "batches": args.batches,
             "rows": args.rows, "seq": args.seq, "vocab": tokenizer.vocab_size}
        results.append(r)
        print(f"{packing} | threads={threads} | {args.batches} batches of {args.rows} x {args.seq} | "
              f"{r['tokens_per_sec']:,.0f} tokens/s")
    if args.one_pass:
        total = sum(len(t) for a, b in source.chunks for t in tokenizer.encode(source.read(a, b),
                                                                                  prepend=tokenizer.bos_token_id))
        for packing in args.packing.split(","):
            it = make_batch_iterator(source, tokenizer, 1, args.seq, packing=packing, shuffle=False, infinite=False,
                                     process_index=0, process_count=1)  # batches of one row: a tail under a row
            rows = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1) for b in it])
            bos = rows == tokenizer.bos_token_id
            before = np.where(bos.any(1), bos.argmax(1), rows.shape[1]).sum()
            r = {"packing": packing, "dropped": 1 - rows.size / total, "before_first_bos": before / rows.size}
            results.append(r)
            print(f"{packing} | one pass of {total:,} tokens in rows of {args.seq + 1} | dropped "
                  f"{r['dropped']:.1%} | before their row's first BOS {r['before_first_bos']:.1%}")
    return results


if __name__ == "__main__":
    main()
