"""Benchmark BPE tokenizer training: rust_bpe vs nanochat's rustbpe vs HF tokenizers.

Corpus (deterministic, no network): documents that alternate between
  * synthetic English-like prose: a seeded RNG draws words with Zipfian
    frequencies from a ~20k pseudo-word lexicon (syllable-built) plus common
    English function words, with capitalisation, punctuation, numbers,
    dates, some accented/CJK/emoji words and paragraph breaks;
  * real text: the Python standard library sources of the running
    interpreter (``*.py`` under ``sysconfig.get_paths()['stdlib']``, sorted
    by path, cycled), cut into documents of <= 8 KB.
The two are interleaved until the requested size (--mb, UTF-8 megabytes) is
reached. The stdlib part depends on the Python version installed.

All trainers get the same documents, the same split regex (nanochat's
SPLIT_PATTERN), the same vocab size (256 byte tokens + merges; no special
tokens) and the same thread count (RAYON_NUM_THREADS for the two rayon
trainers and RAYON_RS_NUM_CPUS for HF tokenizers, set before import).
Times are wall-clock seconds of the training call only (corpus already in
memory). Encode throughput is measured with tiktoken built from rust_bpe's
ranks (encode_ordinary_batch over the whole corpus).

Usage:
    python bench/tokenizer.py --mb 20 --vocab-sizes 4096,32768 --threads 2
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import sysconfig
import time
from pathlib import Path

SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

FUNCTION_WORDS = (
    "the of and to a in is that for it as was with be by on not he i this are or his from at which "
    "but have an they you were her she there one all we their can been has more if will would who "
    "so no what when up out about into than them only other its time some could these two may then "
    "do first any my now such like our over man me even most made after also did many before must "
    "through back where much your way well down should because each just those people how too"
).split()
SYLLABLES = (
    "ka ri to ne sa mi lo ve ra tu pe shi an or en el in ar ul ba de fi go hu jo ky li mo nu py "
    "qu st th ch tr pl gr br cl fl pr str ing er ed es ly tion ment ness able ous ive al"
).split()
UNICODE_WORDS = ["café", "naïve", "Zürich", "façade", "東京", "データ", "привет", "mañana", "αβγ", "🙂", "🚀", "—", "…"]
PUNCT = [".", ".", ".", ",", ",", ",", ";", ":", "!", "?", " -", "'s", "n't"]


def synthetic_doc(rng: random.Random, lexicon: list[str], weights: list[float], n_words: int) -> str:
    words = rng.choices(lexicon, weights=weights, k=n_words)
    out: list[str] = []
    cap = True
    for i, w in enumerate(words):
        r = rng.random()
        if r < 0.01:
            w = str(rng.randint(0, 10 ** rng.randint(1, 6)))
        elif r < 0.013:
            w = f"{rng.randint(1900, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        elif r < 0.02:
            w = rng.choice(UNICODE_WORDS)
        if cap:
            w = w[:1].upper() + w[1:]
            cap = False
        out.append(w)
        r = rng.random()
        if r < 0.12:
            p = rng.choice(PUNCT)
            out[-1] += p
            if p in ".!?":
                cap = True
                if rng.random() < 0.15:
                    out[-1] += "\n\n" if rng.random() < 0.7 else "\n"
    text = " ".join(out)
    return text.replace("\n ", "\n")


def make_lexicon(rng: random.Random, n: int = 20000) -> tuple[list[str], list[float]]:
    seen: set[str] = set(FUNCTION_WORDS)
    words = list(FUNCTION_WORDS)
    while len(words) < n:
        w = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3, 3, 4))))
        if w not in seen:
            seen.add(w)
            words.append(w)
    weights = [1.0 / (rank + 1) ** 1.05 for rank in range(len(words))]
    return words, weights


def stdlib_docs(max_doc_bytes: int = 8192):
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if not files:
        return
    while True:
        for p in files:
            try:
                text = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            for i in range(0, len(text), max_doc_bytes):
                piece = text[i : i + max_doc_bytes]
                if piece:
                    yield piece


def build_corpus(mb: float, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    lexicon, weights = make_lexicon(rng)
    target = int(mb * 1_000_000)
    docs: list[str] = []
    size = 0
    code = stdlib_docs()
    while size < target:
        d = synthetic_doc(rng, lexicon, weights, rng.randint(200, 1500))
        docs.append(d)
        size += len(d.encode("utf-8"))
        c = next(code, None)
        if c is not None and size < target:
            docs.append(c)
            size += len(c.encode("utf-8"))
    return docs


def best_of(n, fn, docs, vocab):
    best, obj = float("inf"), None
    for _ in range(max(1, n)):
        t, obj = fn(docs, vocab)
        best = min(best, t)
    return best, obj


def train_rust_bpe(docs, vocab):
    import rust_bpe

    tok = rust_bpe.Tokenizer()
    t0 = time.perf_counter()
    tok.train_from_iterator(iter(docs), vocab, pattern=SPLIT_PATTERN)
    return time.perf_counter() - t0, tok


def train_rustbpe(docs, vocab):
    import rustbpe

    tok = rustbpe.Tokenizer()
    t0 = time.perf_counter()
    tok.train_from_iterator(iter(docs), vocab, pattern=SPLIT_PATTERN)
    return time.perf_counter() - t0, tok


def train_hf(docs, vocab):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=False, unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        show_progress=False,
        min_frequency=0,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    t0 = time.perf_counter()
    tok.train_from_iterator(docs, trainer)
    return time.perf_counter() - t0, tok


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=20.0, help="corpus size in MB of UTF-8 text (default 20)")
    ap.add_argument("--vocab-sizes", default="4096,32768", help="comma-separated vocab sizes (default 4096,32768)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="rayon threads for all trainers")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--repeat", type=int, default=1, help="train each config N times and report the fastest (default 1)")
    ap.add_argument("--skip", default="", help="comma-separated trainers to skip: rustbpe,tokenizers")
    args = ap.parse_args(argv)
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    os.environ["RAYON_RS_NUM_CPUS"] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    skip = {s for s in args.skip.split(",") if s}

    t0 = time.perf_counter()
    docs = build_corpus(args.mb, args.seed)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    print(f"corpus: {len(docs)} docs, {nbytes / 1e6:.1f} MB, built in {time.perf_counter() - t0:.1f}s; "
          f"threads={args.threads}; repeat={args.repeat}; python {sys.version.split()[0]}; "
          f"load avg {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")

    import tiktoken

    header = f"{'vocab':>6} | {'rust_bpe s':>10} | {'rustbpe s':>9} | {'HF tok s':>8} | {'rust_bpe/rustbpe':>16} | {'rust_bpe/HF':>11} | {'same merges':>11} | {'encode MB/s':>11}"
    rows = []
    for vocab in [int(v) for v in args.vocab_sizes.split(",")]:
        t_ours, ours = best_of(args.repeat, train_rust_bpe, docs, vocab)
        ranks = ours.get_mergeable_ranks()
        t_ref = t_hf = float("nan")
        same = "n/a"
        if "rustbpe" not in skip:
            try:
                t_ref, ref = best_of(args.repeat, train_rustbpe, docs, vocab)
                same = str(ref.get_mergeable_ranks() == ranks)
            except ImportError:
                pass
        if "tokenizers" not in skip:
            try:
                t_hf, _ = best_of(args.repeat, train_hf, docs, vocab)
            except ImportError:
                pass
        enc = tiktoken.Encoding(f"bench{vocab}", pat_str=ours.get_pattern(), mergeable_ranks=dict(ranks), special_tokens={})
        t0 = time.perf_counter()
        enc.encode_ordinary_batch(docs, num_threads=args.threads)
        enc_mbs = nbytes / 1e6 / (time.perf_counter() - t0)
        rows.append(
            f"{vocab:>6} | {t_ours:>10.2f} | {t_ref:>9.2f} | {t_hf:>8.2f} | {t_ours / t_ref:>16.2f} | "
            f"{t_ours / t_hf:>11.2f} | {same:>11} | {enc_mbs:>11.1f}"
        )
        print(f"vocab {vocab}: rust_bpe {t_ours:.2f}s, rustbpe {t_ref:.2f}s, HF {t_hf:.2f}s, same merges: {same}", flush=True)
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
