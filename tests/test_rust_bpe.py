"""Tests for the rust_bpe extension (byte-level BPE trainer).

The ground truth is a deliberately naive pure-Python trainer below: split with
the `regex` module, count chunks, then for every merge rescan all pairs and
take the highest count, ties going to the smallest (left_id, right_id) pair.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rust_bpe
from conftest import load_script

tiktoken = pytest.importorskip("tiktoken")

ROOT = Path(__file__).resolve().parents[1]
NANOCHAT_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
GPT4_PATTERN = NANOCHAT_SPLIT_PATTERN.replace(r"\p{N}{1,2}", r"\p{N}{1,3}")


# --------------------------------------------------------------------------- reference


def reference_train(texts, vocab_size, pattern=NANOCHAT_SPLIT_PATTERN):
    """Obviously-correct (and slow) BPE: full rescan of pair counts every merge."""
    chunk_counts = Counter()
    for t in texts:
        chunk_counts.update(regex.findall(pattern, t))
    words = [[list(c.encode("utf-8")), n] for c, n in chunk_counts.items()]
    vocab = [bytes([i]) for i in range(256)]
    for new_id in range(256, vocab_size):
        pairs = Counter()
        for ids, n in words:
            for p in zip(ids, ids[1:]):
                pairs[p] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # highest count, then smallest pair
        vocab.append(vocab[best[0]] + vocab[best[1]])
        for w in words:
            ids, out, i = w[0], [], 0
            while i < len(ids):
                if i + 1 < len(ids) and (ids[i], ids[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            w[0] = out
    return [(b, i) for i, b in enumerate(vocab)]


def train(texts, vocab_size, **kw):
    tok = rust_bpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, **kw)
    return tok


def load_bench():
    return load_script("tokenizer", "bench")


@pytest.fixture(scope="module")
def corpus():
    """~300 KB of mixed synthetic prose and Python source (deterministic)."""
    return load_bench().build_corpus(0.3, seed=7)


@pytest.fixture(scope="module")
def trained(corpus):
    tok = train(corpus, 1024)
    enc = tiktoken.Encoding(
        "rust_bpe_test",
        pat_str=tok.get_pattern(),
        mergeable_ranks=dict(tok.get_mergeable_ranks()),
        special_tokens={"<|bos|>": 1024},
    )
    return tok, enc


# --------------------------------------------------------------------------- vs reference

FIXED_INPUTS = {
    "ascii": ["hello world, hello there! the quick brown fox jumps over the lazy dog. " * 5, "Hello HELLO hello"],
    "unicode": ["Zürich café naïve façade — привет мир, 東京 データ 東京", "αβγ αβγ αβδ ñandú mañana"],
    "emoji": ["🙂🙂🙂 🚀🚀 rocket 🚀 🙂 smile", "👩‍👩‍👧 family 👩‍👩‍👧 🇫🇷🇫🇷"],
    "whitespace": ["a" + " " * 40 + "b\n\n\n\t\t  \r\n   c", "\n" * 10 + "x   \t   y" + " " * 17, "  "],
    "repeated": ["abababababab aaaaaaaaaa abcabcabc " * 3, "zzzz zzzz zzzzzzzz"],
    "digits_contractions": ["In 2024 we sold 1234567 units; it's 3.14159, they're 42 and I'll've done 007", "don't DON'T"],
    "code": ["def f(x):\n    return x ** 2  # square\n\nclass A(B):\n    pass\n" * 3],
}


@pytest.mark.parametrize("name", sorted(FIXED_INPUTS))
@pytest.mark.parametrize("vocab_size", [256, 270, 330])
def test_matches_reference_fixed(name, vocab_size):
    texts = FIXED_INPUTS[name]
    assert train(texts, vocab_size).get_mergeable_ranks() == reference_train(texts, vocab_size)


def test_matches_reference_other_pattern():
    texts = FIXED_INPUTS["digits_contractions"] + FIXED_INPUTS["ascii"]
    tok = train(texts, 320, pattern=GPT4_PATTERN)
    assert tok.get_pattern() == GPT4_PATTERN
    assert tok.get_mergeable_ranks() == reference_train(texts, 320, GPT4_PATTERN)
    simple = r"\w+|\s+|[^\w\s]+"
    assert train(texts, 300, pattern=simple).get_mergeable_ranks() == reference_train(texts, 300, simple)


# Characters on which the `regex` module and fancy-regex agree on \s, \p{L}, \p{N}
# (avoids Unicode-version/definition differences that are not about BPE).
REF_ALPHABET = st.sampled_from(list("aabbcde XYZ  \n\r\t'0123456789.,!?-_()é日本🙂🚀ßΩ"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    texts=st.lists(st.text(REF_ALPHABET, min_size=1, max_size=60), min_size=1, max_size=6),
    extra=st.integers(0, 60),
)
def test_matches_reference_property(texts, extra):
    vocab_size = 256 + extra
    assert train(texts, vocab_size, buffer_size=2).get_mergeable_ranks() == reference_train(texts, vocab_size)


def test_stops_early_when_pairs_run_out():
    ranks = train(["ab ab", "c"], 5000).get_mergeable_ranks()
    assert ranks == reference_train(["ab ab", "c"], 5000)
    assert len(ranks) == 258  # (a,b) then (' ', ab)


# --------------------------------------------------------------------------- vs nanochat's rustbpe


@pytest.mark.parametrize("vocab_size", [512, 1024])
def test_matches_nanochat_rustbpe(corpus, vocab_size):
    rustbpe = pytest.importorskip("rustbpe")
    ref = rustbpe.Tokenizer()
    ref.train_from_iterator(iter(corpus), vocab_size, pattern=NANOCHAT_SPLIT_PATTERN)
    ours = train(corpus, vocab_size, pattern=NANOCHAT_SPLIT_PATTERN)
    assert ours.get_mergeable_ranks() == ref.get_mergeable_ranks()
    sample = corpus[3][:2000]
    assert ours.encode(sample) == ref.encode(sample)


# --------------------------------------------------------------------------- tiktoken interop


def test_default_pattern_is_nanochat_split_pattern():
    tok = rust_bpe.Tokenizer()
    assert tok.get_pattern() == NANOCHAT_SPLIT_PATTERN
    assert rust_bpe.DEFAULT_PATTERN == NANOCHAT_SPLIT_PATTERN
    assert tok.encode("hi") == [ord("h"), ord("i")]  # untrained: bytes only


def test_ranks_shape(trained):
    tok, _ = trained
    ranks = tok.get_mergeable_ranks()
    assert [r for _, r in ranks] == list(range(len(ranks))) and len(ranks) == 1024 == tok.vocab_size
    assert ranks[:256] == [(bytes([i]), i) for i in range(256)]
    assert all(isinstance(b, bytes) for b, _ in ranks)
    assert len({b for b, _ in ranks}) == len(ranks)
    merges = tok.get_merges()
    assert len(merges) == 1024 - 256
    (a, b), new_id = merges[0]
    assert new_id == 256 and ranks[256][0] == ranks[a][0] + ranks[b][0]


VARIED = [
    "",
    "Hello, world! It's 2024-06-01 and we've got 1234567 reasons.",
    "def train(self, x):\n    return [y ** 2 for y in x]  # comment\n\n\n",
    "Zürich — naïve café; 東京のデータ 🙂🚀 👩‍👩‍👧 привет",
    "   leading and trailing spaces   \t\t\n\r\n  ",
    "x" * 300 + " " + "ab" * 200,
]


@pytest.mark.parametrize("text", VARIED)
def test_encode_matches_tiktoken(trained, text):
    tok, enc = trained
    ids = tok.encode(text)
    assert ids == enc.encode_ordinary(text)
    assert enc.decode(ids) == text


def test_encode_matches_tiktoken_on_corpus(trained, corpus):
    tok, enc = trained
    for doc in corpus[::25]:
        assert tok.encode(doc) == enc.encode_ordinary(doc)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_tiktoken_round_trip_property(trained, text):
    tok, enc = trained
    ids = enc.encode(text, allowed_special=set())
    assert enc.decode(ids) == text
    assert tok.encode(text) == ids


def test_special_tokens_on_top(trained):
    _, enc = trained
    ids = enc.encode("a<|bos|>b", allowed_special={"<|bos|>"})
    assert 1024 in ids and enc.decode(ids) == "a<|bos|>b"


# --------------------------------------------------------------------------- streaming / determinism


def test_buffer_size_and_iterator_kind_do_not_matter(corpus):
    small = corpus[:60]
    expected = train(small, 400).get_mergeable_ranks()
    assert train(small, 400, buffer_size=1).get_mergeable_ranks() == expected
    assert train(small, 400, buffer_size=7).get_mergeable_ranks() == expected
    tok = rust_bpe.Tokenizer()
    tok.train_from_iterator((s for s in small), 400)  # generator
    assert tok.get_mergeable_ranks() == expected
    tok.train_from_iterator(small, 400)  # plain list (iterable), retraining replaces state
    assert tok.get_mergeable_ranks() == expected


THREAD_SCRIPT = """
import hashlib, importlib.util, sys
import rust_bpe
spec = importlib.util.spec_from_file_location("b", sys.argv[1]); b = importlib.util.module_from_spec(spec)
spec.loader.exec_module(b)
tok = rust_bpe.Tokenizer()
tok.train_from_iterator(iter(b.build_corpus(0.3, seed=11)), 800, buffer_size=64)
print(hashlib.sha256(repr(tok.get_mergeable_ranks()).encode()).hexdigest())
"""


def test_same_merges_on_1_and_2_threads():
    digests = []
    for n in ("1", "2"):
        env = dict(os.environ, RAYON_NUM_THREADS=n)
        out = subprocess.run(
            [sys.executable, "-c", THREAD_SCRIPT, str(ROOT / "bench" / "tokenizer.py")],
            env=env, capture_output=True, text=True, timeout=120, check=True,
        )
        digests.append(out.stdout.strip())
    assert len(digests[0]) == 64 and digests[0] == digests[1]


# --------------------------------------------------------------------------- errors


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match=r"vocab_size must be >= 256.*255"):
        train(["hello"], 255)
    with pytest.raises(ValueError, match="vocab_size"):
        train(["hello"], -1)


def test_vocab_size_wrong_type():
    with pytest.raises(TypeError, match="vocab_size"):
        train(["hello"], "512")


def test_empty_iterator():
    with pytest.raises(ValueError, match="no text"):
        train([], 300)
    with pytest.raises(ValueError, match="empty"):
        train(["", ""], 300)


def test_non_str_items():
    with pytest.raises(TypeError, match=r"item 1 is of type int, expected str"):
        train(["ok", 5, "no"], 300)
    with pytest.raises(TypeError, match=r"item 0 is of type bytes, expected str"):
        train([b"bytes"], 300)


def test_not_iterable():
    tok = rust_bpe.Tokenizer()
    with pytest.raises(TypeError, match="iterable of str, got int"):
        tok.train_from_iterator(42, 300)


def test_invalid_pattern():
    with pytest.raises(ValueError, match="invalid regex pattern"):
        train(["hello"], 300, pattern="(unclosed")
    with pytest.raises(ValueError, match="pattern is empty"):
        train(["hello"], 300, pattern="")


def test_bad_buffer_size():
    with pytest.raises(ValueError, match="buffer_size must be >= 1"):
        train(["hello"], 300, buffer_size=0)


def test_lone_surrogates_count_as_replacement_characters():
    """Half an emoji from a JSON escape ("\\ud83d") trains like tiktoken encodes it: one U+FFFD per surrogate
    (it was a UnicodeEncodeError that ended training)."""
    texts = ["cut \ud83d emoji \ud83d\ud83d here", "ok \ufffd\ufffd text", "pair \ud83d\ude00"]
    clean = [t.encode("utf-16", "surrogatepass").decode("utf-16", "replace") for t in texts]
    assert clean[0] == "cut \ufffd emoji \ufffd\ufffd here" and clean[2] == "pair \U0001f600"
    tok = train(texts, 300)
    assert tok.get_merges() == train(clean, 300).get_merges()
    enc = tiktoken.Encoding("t", pat_str=tok.get_pattern(), mergeable_ranks=dict(tok.get_mergeable_ranks()),
                            special_tokens={})
    assert [enc.encode_ordinary(t) for t in texts] == [enc.encode_ordinary(t) for t in clean]


def test_iterator_exception_propagates():
    def gen():
        yield "hello world"
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        train(gen(), 300)


def test_failed_training_keeps_previous_state():
    tok = train(["hello hello world"], 260)
    before = tok.get_mergeable_ranks()
    with pytest.raises(TypeError):
        tok.train_from_iterator(["x", None], 300)
    assert tok.get_mergeable_ranks() == before


# --------------------------------------------------------------------------- fast splitter == regex

SPLIT_CASES = [
    "Hello world's 'S 'LL 'Ve 're 'ſ 'x ''s'' don't",
    "12345 ١٢٣٤ ½⅓ x2y 3.14\u00a0\u00a05",
    "a  b   c\t\td \n\n  \r\n x  \u2028\u3000y\x1c\x85z   ",
    "  ...!!\n\n?? --\r\n\r\n_foo @bar #1",
    "𝔘𝔫𝔦 𝟘𝟙𝟚 🙂🙂 🇫🇷 e\u0301 \u212a ß",
    " ", "\n", "'", "a", "1", ".", "\t", " \u00a0",
]


@pytest.mark.parametrize("pattern", [NANOCHAT_SPLIT_PATTERN, GPT4_PATTERN])
@pytest.mark.parametrize("text", SPLIT_CASES)
def test_fast_split_equals_regex(pattern, text):
    fast = rust_bpe._split(text, pattern)
    assert fast == rust_bpe._split(text, pattern, regex_only=True)
    assert "".join(fast) == text
    assert fast == regex.findall(pattern, text)


SPLIT_ALPHABET = st.sampled_from(
    list("aZ '\r\n\t 0.,!_-ſ\u00a0\u2028\u3000\x1c\x85ß\u0301\u212a") + ["١", "½", "𝔘", "𝟘", "🙂", "𐍈"]
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(SPLIT_ALPHABET, max_size=30), st.text(max_size=30)))
def test_fast_split_equals_regex_property(text):
    for pattern in (NANOCHAT_SPLIT_PATTERN, GPT4_PATTERN):
        assert rust_bpe._split(text, pattern) == rust_bpe._split(text, pattern, regex_only=True)
