"""Train the BPE tokenizer on the configured text source and save it as an artifact.

Usage: python scripts/tok_train.py [--config FILE.toml] [--tokenizer.vocab_size=N] [--tokenizer.max_chars=N] ...
Writes artifacts_dir("tokenizer")/{tokenizer.json, config.toml} and a summary to
artifacts_dir("report")/tokenizer.json.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
from tqdm import tqdm

from nanochat_jax.common import Timer, UserError, artifacts_dir, run_script
from nanochat_jax.config import Config, load_config, to_toml
from nanochat_jax.tokenizer import Tokenizer, default_tokenizer_dir, token_bytes

SAMPLE_CHARS = 1_000_000  # characters of training text kept to measure compression


def source_texts(cfg: Config, split: str = "train"):
    """Documents of the configured data source ([data]: embedded, fineweb shards or local files)."""
    if cfg.data.source == "embedded":
        from nanochat_jax import corpus

        return corpus.documents(split)
    from nanochat_jax.data import text_iterator

    return text_iterator(cfg.data, split)


def capped_texts(texts, max_chars: int, doc_cap: int, sample: list[str], progress: tqdm, cut: list[int]):
    """Each document cut to doc_cap characters (counted in cut[0]), stopping after max_chars characters in total."""
    used = 0
    for text in texts:
        cut[0] += len(text) > doc_cap
        text = text[: min(doc_cap, max_chars - used)]
        if not text:
            continue
        if used < SAMPLE_CHARS:
            sample.append(text)
        used += len(text)
        progress.update(len(text))
        yield text
        if used >= max_chars:
            return


def main(argv=None) -> dict:
    cfg = load_config(argv)
    print(to_toml(cfg))
    tc = cfg.tokenizer
    sample: list[str] = []
    cut = [0]
    with tqdm(desc="tokenizer text", unit="char", unit_scale=True) as progress, Timer() as timer:
        texts = capped_texts(source_texts(cfg, "train"), tc.max_chars, tc.doc_cap, sample, progress, cut)
        first = next(texts, None)
        if first is None:
            raise UserError(f"no text to train the tokenizer on: every train document of data.source="
                            f"{cfg.data.source!r} is empty")
        tokenizer = Tokenizer.train_from_iterator(itertools.chain([first], texts), tc.vocab_size,
                                                  buffer_size=tc.buffer_size)
        train_chars = progress.n
    if cut[0]:  # (a .txt file is one document: one long file would train the tokenizer on its first 10k characters)
        print(f"note: {cut[0]:,} document(s) were cut to tokenizer.doc_cap={tc.doc_cap:,} characters (raise it for "
              "long documents such as whole .txt files)")
    if tokenizer.vocab_size < tc.vocab_size:
        print(f"note: the text ran out of pairs to merge; vocab_size is {tokenizer.vocab_size}, "
              f"not the requested {tc.vocab_size}")

    out = default_tokenizer_dir()
    tokenizer.save(out)
    (out / "config.toml").write_text(to_toml(cfg))

    # lone surrogates (JSON escapes of half an emoji) are read as U+FFFD, as tiktoken and the trainer do
    sample_text = "".join(sample).encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    assert tokenizer.decode(tokenizer.encode(sample_text)) == sample_text, "round trip failed on training text"
    sizes = token_bytes(tokenizer)
    sizes = sizes[sizes > 0].astype(np.float64)
    summary = {
        "source": cfg.data.source,
        "requested_vocab_size": tc.vocab_size,
        "vocab_size": tokenizer.vocab_size,
        "num_special_tokens": len(tokenizer.get_special_tokens()),
        "train_chars": train_chars,
        "train_seconds": round(timer.seconds, 3),
        "train_sample_bytes_per_token": len(sample_text.encode()) / max(1, len(tokenizer.encode(sample_text))),
        "token_bytes_min": int(sizes.min()),
        "token_bytes_max": int(sizes.max()),
        "token_bytes_mean": float(sizes.mean()),
        "token_bytes_std": float(sizes.std()),
    }
    report = artifacts_dir("report") / "tokenizer.json"
    report.write_text(json.dumps({"train": summary}, indent=2))
    print(f"trained a {tokenizer.vocab_size}-token tokenizer on {train_chars:,} characters in "
          f"{timer.seconds:.2f} s; {summary['train_sample_bytes_per_token']:.2f} bytes/token on the training text")
    print(f"saved to {out}; summary in {report}")
    return summary


if __name__ == "__main__":
    run_script(main)
