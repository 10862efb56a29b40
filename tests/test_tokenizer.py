"""Tokenizer: training, save/load, encoding vs independent references, token bytes, chat rendering, scripts."""

import copy
import itertools
import json
import types
from pathlib import Path

import numpy as np
import pytest
import regex
import rust_bpe
from hypothesis import given, settings, strategies as st

from nanochat_jax import corpus
from nanochat_jax.config import load_config
from nanochat_jax.tokenizer import (
    SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, TokenizerCorrupt, load_tokenizer, token_bytes,
)
from nanochat_jax.common import UserError
from conftest import load_script

VOCAB = 700
ROOT = Path(__file__).resolve().parents[1]


def training_texts():
    return itertools.islice(corpus.documents("train"), 400)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_from_iterator(training_texts(), VOCAB)


SAMPLES = ["", "Hello world!", "Zoë ate 12345 apples 🍎🍎 at 7:30.", "  leading spaces\n\n\ttabs\r\n",
           "東京は日本の首都です。", "def f(x):\n    return x ** 2  # square", corpus.document("val", 3)]


def bpe_reference(ranks: dict[bytes, int], text: str) -> list[int]:
    """Plain-Python BPE: split with the pattern, then repeatedly merge the adjacent pair of lowest rank."""
    out = []
    for chunk in regex.findall(SPLIT_PATTERN, text):
        parts = [bytes([b]) for b in chunk.encode()]
        while len(parts) > 1:
            pairs = [(ranks.get(a + b, float("inf")), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            parts[i: i + 2] = [parts[i] + parts[i + 1]]
        out += [ranks[p] for p in parts]
    return out


# ---------------------------------------------------------------------------------------------
# Training, encoding, saving


def test_vocab_layout(tok):
    assert tok.vocab_size == VOCAB
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(VOCAB - len(SPECIAL_TOKENS), VOCAB))
    assert tok.bos == tok.bos_token_id == VOCAB - len(SPECIAL_TOKENS)
    assert tok.get_special_tokens() == SPECIAL_TOKENS
    assert [tok.enc.decode_single_token_bytes(i) for i in range(256)] == [bytes([i]) for i in range(256)]
    assert tok.decode([tok.bos]) == "<|bos|>"
    # training learned frequent corpus words as single tokens
    assert len(tok.encode(" the")) == 1 and len(tok.encode(" capital")) == 1


def test_encode_matches_references(tok):
    ranks = {tok.enc.decode_single_token_bytes(i): i for i in range(VOCAB - len(SPECIAL_TOKENS))}
    trainer = rust_bpe.Tokenizer()
    trainer.train_from_iterator(training_texts(), VOCAB - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == bpe_reference(ranks, text)
        assert ids == list(trainer.encode(text))


def test_save_load_round_trip(tok, tmp_path):
    path = tok.save(tmp_path)
    table = json.loads(path.read_text())  # plain JSON, no pickle
    assert len(table["mergeable_ranks"]) == VOCAB - len(SPECIAL_TOKENS)
    assert table["special_tokens"]["<|bos|>"] == tok.bos
    loaded = Tokenizer.load(tmp_path)
    assert loaded.vocab_size == tok.vocab_size and loaded.pattern == tok.pattern
    assert loaded.encode(SAMPLES) == tok.encode(SAMPLES)
    assert [loaded.enc.decode_single_token_bytes(i) for i in range(VOCAB)] == \
           [tok.enc.decode_single_token_bytes(i) for i in range(VOCAB)]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_decode_encode_round_trip_and_token_bytes(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert int(token_bytes(tok)[ids].sum()) == len(text.encode())
    assert all(i < tok.bos for i in ids)


def test_special_token_text_stays_ordinary(tok):
    text = "<|bos|>hi<|assistant_end|>"
    ids = tok.encode(text)
    assert not set(ids) & {tok.encode_special(s) for s in SPECIAL_TOKENS}
    assert tok.decode(ids) == text
    assert ids == tok.encode("<|bos|>") + tok.encode("hi") + tok.encode("<|assistant_end|>")


def test_batched_encode_prepend_append(tok):
    assert tok.encode(SAMPLES, num_threads=2) == [tok.encode(s) for s in SAMPLES]
    end = tok.encode_special("<|assistant_end|>")
    assert tok.encode("hi", prepend="<|bos|>", append=end) == [tok.bos] + tok.encode("hi") + [end]
    assert tok.encode(["a", "b"], prepend=tok.bos) == [[tok.bos] + tok.encode("a"), [tok.bos] + tok.encode("b")]
    assert tok.decode(np.array(tok.encode("hi"))) == "hi"
    with pytest.raises(ValueError, match="unknown special token '<|nope|>'"):
        tok.encode_special("<|nope|>")
    with pytest.raises(TypeError, match="str or a list of str"):
        tok.encode(b"bytes")


def test_token_bytes(tok):
    tb = token_bytes(tok)
    assert tb.dtype == np.int32 and tb.shape == (VOCAB,)
    assert (tb[tok.bos:] == 0).all() and (tb[:256] == 1).all()
    assert tb[tok.encode(" capital")[0]] == len(" capital")


def test_missing_tokenizer_and_small_vocab(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer at .*run scripts/tok_train.py first"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="vocab_size=264 must be >= 265"):
        Tokenizer.train_from_iterator(["abc"], 264)


def test_corrupt_tokenizer_is_a_one_line_error(tok, tmp_path):
    path = tok.save(tmp_path)
    good = path.read_text()
    table = json.loads(good)
    broken = {
        "cut short": (good[:3000], r"Unterminated string"),
        "not utf-8": (b"\xff\xfe junk", r"can't decode byte 0xff"),
        "a list": ("[1, 2]", r"'list' object has no attribute 'get'"),
        "no ranks": (json.dumps({k: v for k, v in table.items() if k != "mergeable_ranks"}), r"no 'mergeable_ranks' entry"),
        # (without validation the bad entry decoded to b"", an empty token that loaded without complaint)
        "bad base64": (json.dumps({**table, "mergeable_ranks": table["mergeable_ranks"][:-1] + ["!!"]}), r"base64"),
        "bad pattern": (json.dumps({**table, "pattern": "("}), r"parenthesis"),
        "format 2": (json.dumps({**table, "format_version": 2}), r"format_version 2, expected 1"),
    }
    for name, (content, why) in broken.items():
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(TokenizerCorrupt, match=rf"^{path} is not a readable tokenizer \(.*{why}.*\); "
                                                   r"run scripts/tok_train.py again$") as info:
            load_tokenizer(tmp_path)
        assert isinstance(info.value, UserError), name  # a script prints it as one line, no traceback


# ---------------------------------------------------------------------------------------------
# Conversations


def specials(tok):
    return types.SimpleNamespace(**{s.strip("<|>"): tok.encode_special(s) for s in SPECIAL_TOKENS})


def test_render_simple(tok):
    s = specials(tok)
    conv = {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]}
    ids, mask = tok.render_conversation(conv)
    q, a = tok.encode("What is 2 + 3?"), tok.encode("5")
    assert ids == [s.bos, s.user_start, *q, s.user_end, s.assistant_start, *a, s.assistant_end]
    assert mask == [0, 0, *[0] * len(q), 0, 0, *[1] * len(a), 1]
    assert tok.render_conversation(conv, max_tokens=4) == (ids[:4], mask[:4])


def test_render_system_merged_and_not_mutated(tok):
    conv = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello!"}]}
    before = copy.deepcopy(conv)
    merged = {"messages": [{"role": "user", "content": "Be brief.\n\nHi"}, {"role": "assistant", "content": "Hello!"}]}
    assert tok.render_conversation(conv) == tok.render_conversation(merged)
    assert conv == before


def test_render_tool_parts(tok):
    s = specials(tok)
    parts = [{"type": "text", "text": "Let me compute."}, {"type": "python", "text": "12*7"},
             {"type": "python_output", "text": "84"}, {"type": "text", "text": "It is 84."}]
    conv = {"messages": [{"role": "user", "content": "12*7?"}, {"role": "assistant", "content": parts}]}
    ids, mask = tok.render_conversation(conv)
    e = tok.encode
    expected = [(s.bos, 0), (s.user_start, 0), *[(i, 0) for i in e("12*7?")], (s.user_end, 0),
                (s.assistant_start, 0), *[(i, 1) for i in e("Let me compute.")],
                (s.python_start, 1), *[(i, 1) for i in e("12*7")], (s.python_end, 1),
                (s.output_start, 0), *[(i, 0) for i in e("84")], (s.output_end, 0),
                *[(i, 1) for i in e("It is 84.")], (s.assistant_end, 1)]
    assert list(zip(ids, mask)) == expected


def test_render_multi_turn_and_completion(tok):
    s = specials(tok)
    turns = ["Hi", "Hello, how can I help?", "Capital of Valdoria?", "Mirenza."]
    conv = {"messages": [{"role": r, "content": c} for r, c in zip(["user", "assistant"] * 2, turns)]}
    ids, mask = tok.render_conversation(conv)
    exp_ids, exp_mask = [s.bos], [0]
    for k, text in enumerate(turns):
        body = tok.encode(text)
        if k % 2 == 0:
            exp_ids += [s.user_start, *body, s.user_end]
            exp_mask += [0] * (len(body) + 2)
        else:
            exp_ids += [s.assistant_start, *body, s.assistant_end]
            exp_mask += [0] + [1] * len(body) + [1]
    assert (ids, mask) == (exp_ids, exp_mask)
    before = copy.deepcopy(conv)
    prompt = tok.render_for_completion(conv)
    assert conv == before
    n_last = len(tok.encode("Mirenza.")) + 2
    assert prompt == ids[:-n_last] + [s.assistant_start]
    assert prompt[-1] == s.assistant_start


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty 'messages' list"),
    ([{"role": "robot", "content": "hi"}], "message 0: unknown role 'robot'"),
    ([{"role": "assistant", "content": "hi"}], "message 0: role is 'assistant' but should be 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1: role is 'user' but should be 'assistant'"),
    ([{"role": "user", "content": ["a"]}], "message 0: user content must be a string"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "message 1: a system message must be followed by a user"),
    ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}], "message 1: role is 'system' but should be 'assistant'"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     "message 1, part 0: unknown part type 'image'"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "text", "text": 3}]}],
     "message 1, part 0: 'text' must be a string"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": 7}], "message 1: assistant content must be"),
    ([{"role": "user"}], "message 0: must be a dict with 'role' and 'content'"),
])
def test_render_errors(tok, messages, message):
    with pytest.raises(ValueError, match=regex.escape(message)):
        tok.render_conversation({"messages": messages})


def test_render_for_completion_needs_assistant_last(tok):
    with pytest.raises(ValueError, match="last message must be from the assistant"):
        tok.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})


# ---------------------------------------------------------------------------------------------
# Scripts


def test_capped_texts():
    tok_train = load_script("tok_train")
    sample = []

    class Progress:
        n = 0

        def update(self, k):
            self.n += k

    progress, cut = Progress(), [0]
    texts = list(tok_train.capped_texts(iter(["abcdef", "", "gh", "ijkl", "mnop"]), 7, 4, sample, progress, cut))
    assert texts == ["abcd", "gh", "i"] and sample == texts and progress.n == 7
    assert cut == [1]  # "abcdef" was longer than doc_cap (tok_train then says so: a whole .txt file is one document)


def test_source_texts(tmp_path):
    """The embedded corpus, or the documents of the [data] source (local files here; FineWeb shards are files
    of the same kind): the train split is every file but the last."""
    tok_train = load_script("tok_train")
    assert next(iter(tok_train.source_texts(load_config([])))) == corpus.document("train", 0)
    for name, docs in (("a.jsonl", ["first doc", "second doc"]), ("b.jsonl", ["third"]), ("c.jsonl", ["val doc"])):
        (tmp_path / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = load_config(["--data.source=files", f"--data.path={tmp_path}"])
    assert list(tok_train.source_texts(cfg, "train")) == ["first doc", "second doc", "third"]
    assert list(tok_train.source_texts(cfg, "val")) == ["val doc"]


def test_tok_train_on_json_with_half_an_emoji(home, tmp_path):
    """A JSON escape of a lone surrogate (an emoji cut in half) is read as U+FFFD, as tiktoken encodes it;
    training used to stop with a UnicodeEncodeError traceback, then the round-trip check failed on it."""
    docs = [f"document {i} about cats and dogs" for i in range(50)] + ["half an emoji \ud83d here"]
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert '"half an emoji \\ud83d here"' in (tmp_path / "a.jsonl").read_text()
    summary = load_script("tok_train").main(["--tokenizer.vocab_size=300", "--data.source=files",
                                             f"--data.path={tmp_path}"])
    tok = load_tokenizer()
    assert summary["vocab_size"] == tok.vocab_size == 300
    assert tok.decode(tok.encode("half an emoji \ud83d here")) == "half an emoji \ufffd here"


def test_tok_train_on_empty_documents(home, tmp_path):
    """Data whose documents are all empty is a one-line error (it was the trainer's ValueError traceback)."""
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text('{"text": ""}\n{"text": ""}\n')
    with pytest.raises(UserError, match=r"^no text to train the tokenizer on: every train document of "
                                        r"data.source='files' is empty$"):
        load_script("tok_train").main(["--data.source=files", f"--data.path={tmp_path}"])
    assert not (home / "tokenizer" / "tokenizer.json").exists()


def test_tok_train_and_eval_scripts(home, monkeypatch, capsys):
    import tiktoken

    summary = load_script("tok_train").main(["--tokenizer.vocab_size=600", "--tokenizer.max_chars=300000",
                                             "--tokenizer.doc_cap=800"])
    out = home / "tokenizer"
    tok = load_tokenizer()
    assert tok.vocab_size == 600 == summary["vocab_size"]
    assert summary["train_chars"] == 300000
    assert 1.8 < summary["train_sample_bytes_per_token"] < 6
    assert summary["token_bytes_min"] == 1 and summary["token_bytes_max"] > 4
    assert load_config(["--config", str(out / "config.toml")]).tokenizer.vocab_size == 600
    assert json.loads((home / "report" / "tokenizer.json").read_text())["train"] == summary
    out_text = capsys.readouterr().out
    assert "trained a 600-token tokenizer on 300,000 characters" in out_text
    assert regex.search(r"note: [\d,]+ document\(s\) were cut to tokenizer.doc_cap=800 characters", out_text)

    def offline(name):
        raise ConnectionError(f"no network for {name}")

    tok_eval = load_script("tok_eval")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    result = tok_eval.main([])
    assert "cannot load the gpt2 (gpt2) encoding, skipping it: ConnectionError" in capsys.readouterr().out
    texts = tok_eval.eval_texts()
    assert result["baselines"] == [] and set(result["texts"]) == set(texts)
    for kind, row in result["texts"].items():
        assert row["bytes"] == len(texts[kind].encode())
        assert row["ours_tokens"] == len(tok.encode(texts[kind]))
    rows = result["texts"]
    assert rows["corpus-val"]["ours_bytes_per_token"] > max(1.8, 1.5 * rows["multilingual"]["ours_bytes_per_token"])

    # with a loadable baseline (here: our own encoding standing in) the comparison columns appear
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: tok.enc)
    result = tok_eval.main([])
    assert result["baselines"] == ["gpt2", "gpt4"]
    assert all(row["gpt2_tokens"] == row["ours_tokens"] for row in result["texts"].values())
    report = json.loads((home / "report" / "tokenizer.json").read_text())
    assert report["train"] == summary and report["eval"] == result


def test_tok_eval_measures_the_configured_sources_validation_text(home, tmp_path, monkeypatch):
    """Its held-out row is the [data] source's validation documents, as nanochat's fwe-val: with data.source=files
    or fineweb it was the embedded generated corpus, whatever the tokenizer was trained on."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tiktoken

    from nanochat_jax import data
    from nanochat_jax.config import DataConfig

    train_docs = [f"def f{i}(x):\n    return x * {i}\n" for i in range(300)]
    val_docs = [f"class C{i}:\n    value = {i}\n" for i in range(80)] + [""]
    for name, docs in (("a.jsonl", train_docs), ("b.jsonl", ["", *val_docs])):
        (tmp_path / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    files = ["--data.source=files", f"--data.path={tmp_path}"]
    load_script("tok_train").main([*files, "--tokenizer.vocab_size=400"])
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: (_ for _ in ()).throw(ConnectionError(name)))
    rows = load_script("tok_eval").main(files)["texts"]
    expected = "\n\n".join(val_docs[:50])  # the first 50 non-empty documents
    assert list(rows) == ["files-val", "english", "code", "multilingual", "math"]
    assert rows["files-val"]["bytes"] == len(expected.encode())
    assert rows["files-val"]["ours_tokens"] == len(load_tokenizer().encode(expected))

    # fineweb: the validation shard present, the other 239 of num_shards=240 not: nothing is downloaded
    shards = home / "data" / "fineweb"
    shards.mkdir(parents=True)
    for name, docs in ((data.shard_name(0), train_docs), (data.shard_name(data.SHARD_SETS["fineweb"].max_shard), val_docs)):
        pq.write_table(pa.table({"text": docs}), shards / name)
    texts = load_script("tok_eval").eval_texts(DataConfig(source="fineweb", num_shards=240))
    assert texts["fineweb-val"] == expected and "corpus-val" not in texts
