"""Data pipeline: sources, packing, checkpointable iterator state, process sharding, downloader."""

import http.server
import io
import json
import re
import socket
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

from nanochat_jax import data, packing
from nanochat_jax.config import DataConfig


class ByteTokenizer:
    """Stand-in with the Tokenizer.encode contract: one token per byte, BOS = 256."""

    bos_token_id = 256

    def __init__(self):
        self.enc = tiktoken.Encoding("bytes", pat_str=r"[\s\S]", mergeable_ranks={bytes([i]): i for i in range(256)},
                                     special_tokens={"<|bos|>": 256})

    def encode(self, texts, prepend=None, num_threads=1):
        ids = self.enc.encode_ordinary_batch(texts, num_threads=num_threads)
        return [[prepend] + x for x in ids]


class ListSource:
    """Documents in memory, chunks of k documents."""

    def __init__(self, docs, k=5):
        self.docs = docs
        self.chunks = [(s, min(s + k, len(docs))) for s in range(0, len(docs), k)]

    def __len__(self):
        return len(self.docs)

    def read(self, start, stop):
        return self.docs[start:stop]


def make_docs(n):
    return [f"document {i}: " + "abcdefgh"[: i % 9] * (i % 5) for i in range(n)]


def split_docs(tokens):
    """Token stream -> list of documents (text between BOS tokens)."""
    tokens = list(tokens)
    cuts = [i for i, t in enumerate(tokens) if t == 256] + [len(tokens)]
    return [bytes(tokens[a + 1:b]).decode() for a, b in zip(cuts, cuts[1:])]


def take(it, n):
    return [next(it) for _ in range(n)]


def test_packing_preserves_token_stream_and_targets_are_shifted():
    docs = make_docs(40)
    it = data.make_batch_iterator(ListSource(docs), ByteTokenizer(), 3, 16, shuffle=False, infinite=False,
                                  process_index=0, process_count=1)
    batches = list(it)
    reference = np.concatenate([[256] + list(d.encode()) for d in docs])
    rows = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1) for b in batches])
    assert rows.shape == (len(reference) // 51 * 3, 17)  # only the incomplete tail of the pass is dropped
    np.testing.assert_array_equal(rows.reshape(-1), reference[: rows.size])
    for b in batches:
        assert b["inputs"].dtype == np.int32 and b["inputs"].shape == (3, 16)
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])


@pytest.mark.parametrize("packing_", ["concat", "bestfit"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_state_restore_gives_next_batch_exactly(shuffle, packing_, monkeypatch):
    """bestfit with a buffer of 7 documents: refilled (chunks of 5) every few rows; the pending documents,
    some from earlier chunks and epochs, are re-tokenized from the source indices in the state."""
    monkeypatch.setattr(packing, "BUFFER_DOCS", 7)
    src, tok = ListSource(make_docs(23)), ByteTokenizer()  # ~330 tokens/epoch: epochs every ~4 batches
    kw = dict(packing=packing_, seed=7, shuffle=shuffle, process_index=0, process_count=1, num_threads=2)
    it = data.make_batch_iterator(src, tok, 2, 40, **kw)
    states, batches = [], []
    for _ in range(14):
        states.append(it.get_state())
        batches.append(next(it))
    assert states[-1]["epoch"] >= 2  # the run crossed epoch boundaries
    if packing_ == "bestfit":  # fewer than the buffer and one chunk, and never none once started
        assert all(0 < len(s["pending"]) < 7 + 5 for s in states[1:])
    json.dumps(states)
    for k in (0, 1, 5, 9, 13):
        fresh = data.make_batch_iterator(src, tok, 2, 40, **kw)
        fresh.set_state(json.loads(json.dumps(states[k])))
        for want in batches[k:]:
            got = next(fresh)
            np.testing.assert_array_equal(got["inputs"], want["inputs"])
            np.testing.assert_array_equal(got["targets"], want["targets"])


def test_a_position_saved_over_other_data_restarts_the_order_with_a_warning(capsys, monkeypatch):
    """A checkpoint's data position is an index into one data set's shuffled chunk order; with more or fewer
    chunks (data.num_shards changed) it would land somewhere arbitrary, so the order starts over, said aloud."""
    tok, kw = ByteTokenizer(), dict(seed=7, process_index=0, process_count=1)
    it = data.make_batch_iterator(ListSource(make_docs(23)), tok, 2, 40, **kw)
    first = next(it)
    next(it)
    state = it.get_state()
    other = data.make_batch_iterator(ListSource(make_docs(23)[:20]), tok, 2, 40, **kw)  # fewer chunks
    other.set_state(state)
    assert "the data order starts over" in capsys.readouterr().err
    fresh = next(data.make_batch_iterator(ListSource(make_docs(23)[:20]), tok, 2, 40, **kw))
    np.testing.assert_array_equal(next(other)["inputs"], fresh["inputs"])
    assert state["chunks"] == len(ListSource(make_docs(23)).chunks) and first["inputs"].shape == (2, 40)
    # with 2 processes, 5 -> 6 chunks leaves process 0 with 3 of them either way: the total is what is compared
    kw = dict(seed=7, process_index=0, process_count=2)
    it = data.make_batch_iterator(ListSource(make_docs(23)), tok, 2, 40, **kw)
    next(it)
    state = it.get_state()
    data.make_batch_iterator(ListSource(make_docs(26)), tok, 2, 40, **kw).set_state(state)
    assert "an order of 5 chunks of documents, this run has 6" in capsys.readouterr().err
    # another data.packing: the concat position names no pending documents, a bestfit one no skip
    monkeypatch.setattr(packing, "BUFFER_DOCS", 7)
    other = data.make_batch_iterator(ListSource(make_docs(23)), tok, 2, 40, packing="bestfit", **kw)
    other.set_state(state)
    err = capsys.readouterr().err
    assert "comes from data.packing=concat, this run packs with bestfit; the data order starts over" in err
    fresh = data.make_batch_iterator(ListSource(make_docs(23)), tok, 2, 40, packing="bestfit", **kw)
    np.testing.assert_array_equal(next(other)["inputs"], next(fresh)["inputs"])


def test_train_epochs_are_reshuffled_and_complete():
    per_epoch = 4
    stream = list(data.chunk_stream(per_epoch, seed=3)[: 3 * per_epoch])
    epochs = [stream[i:i + per_epoch] for i in range(0, len(stream), per_epoch)]
    assert all(sorted(e) == list(range(per_epoch)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1
    # one chunk of 20 documents: only the per-epoch shuffle inside the chunk can change the order
    src = ListSource(make_docs(20), k=20)
    it = data.make_batch_iterator(src, ByteTokenizer(), 1, 15, seed=1, process_index=0, process_count=1)
    tokens = np.concatenate([np.append(b["inputs"][0], b["targets"][0, -1]) for b in take(it, 80)])
    docs = split_docs(tokens)
    first, second = docs[0:20], docs[20:40]
    assert sorted(first) == sorted(second) == sorted(src.docs) and first != second


@pytest.mark.parametrize("count", [2, 4])
def test_process_slices_are_disjoint_and_cover_everything(count):
    num_chunks = 11
    seen = []
    for index in range(count):
        seen += list(data.chunk_stream(num_chunks, seed=5, infinite=False, process_index=index, process_count=count))
    assert sorted(seen) == list(range(num_chunks))
    # end to end: each process's token stream holds only its own documents
    docs = make_docs(44)
    src = ListSource(docs, k=4)
    got = []
    for index in range(count):
        it = data.make_batch_iterator(src, ByteTokenizer(), count, 8, shuffle=False, infinite=False,
                                      process_index=index, process_count=count)
        tokens = [t for b in it for t in np.concatenate([b["inputs"], b["targets"][:, -1:]], 1).reshape(-1)]
        mine = {d for c in range(index, len(src.chunks), count) for d in docs[src.chunks[c][0]:src.chunks[c][1]]}
        stream_docs = split_docs(tokens)
        assert set(stream_docs[:-1]) <= mine  # the last may be cut off by the dropped tail
        got += stream_docs[:-1]
    assert len(got) == len(set(got))


def reference_bestfit(chunks, row_len, buffer_docs):
    """nanochat master's best fit over plain lists: chunks (lists of BOS+document token lists) -> rows."""
    chunks, pending, rows = iter(chunks), [], []
    while True:
        row = []
        while len(row) < row_len:
            while len(pending) < buffer_docs and (chunk := next(chunks, None)) is not None:
                pending += chunk
            if not pending:
                return rows
            space = row_len - len(row)
            fitting = [d for d in pending if len(d) <= space]
            doc = max(fitting, key=len) if fitting else min(pending, key=len)  # the first of equal lengths
            pending.remove(doc)
            row += doc[:space]
        rows.append(row)


@pytest.mark.parametrize("index, count", [(0, 1), (1, 2)])
def test_bestfit_rows_start_with_a_document_and_follow_master(index, count, monkeypatch):
    monkeypatch.setattr(packing, "BUFFER_DOCS", 6)
    docs = [f"d{i} " + "xyz"[i % 3] * (i * 37 % 90) for i in range(60)]  # 3 to 92 bytes; rows of 41 tokens
    src = ListSource(docs, k=4)
    it = data.make_batch_iterator(src, ByteTokenizer(), 2 * count, 40, packing="bestfit", shuffle=False,
                                  infinite=False, process_index=index, process_count=count)
    rows = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1) for b in it])
    mine = [[[256] + list(d.encode()) for d in docs[a:b]] for a, b in src.chunks[index::count]]
    np.testing.assert_array_equal(rows, reference_bestfit(mine, 41, 6))
    assert (rows[:, 0] == 256).all() and len(rows) == (42, 20)[index]
    pieces = [p for row in rows for p in split_docs(row)]
    own = [d for chunk in mine for d in chunk]
    assert all(any(bytes(d[1:]).decode().startswith(p) for d in own) for p in pieces)  # this process's, in order
    used = [p for p in pieces if p in docs]  # whole documents, each once; the rest are cropped ones' heads
    assert len(used) == len(set(used)) and len(pieces) - len(used) <= len(rows)


def test_bestfit_crops_what_concat_cuts_off_its_start():
    """One pass over 2000 documents of the embedded corpus (1,064 bytes each on average) in rows of 2049 byte
    tokens: bestfit drops 5% of the tokens (cropped documents' tails) and every token sees its document's BOS;
    concat drops only the pass's last partial rows, but 30% of its tokens sit in a row before the first BOS,
    cut off from their document's start."""
    src, tok = ListSource(data.EmbeddedSource("train").read(0, 2000), k=32), ByteTokenizer()
    total = sum(len(d.encode()) + 1 for d in src.docs)
    got = {}
    for packing_ in ("concat", "bestfit"):
        it = data.make_batch_iterator(src, tok, 8, 2048, packing=packing_, shuffle=False, infinite=False,
                                      process_index=0, process_count=1)
        rows = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1) for b in it])
        first_bos = np.where((rows == 256).any(1), (rows == 256).argmax(1), rows.shape[1])
        got[packing_] = len(rows), round(1 - rows.size / total, 4), round(float(first_bos.sum() / rows.size), 4)
    assert total == 2_125_194
    assert got == {"concat": (1032, 0.005, 0.3055), "bestfit": (984, 0.0513, 0.0)}


def test_bestfit_buffer_holds_at_most_an_epoch_of_a_small_split():
    """Two documents far longer than a row (whole .txt files): the buffer of 1000 documents was filled with 500
    copies of each, re-read and re-tokenized (97 s and 0.6 GB for the first batch of two 200 KB files), and as
    a copy of the shorter one was always there to crop, the longer one never made a row. The buffer now holds at
    most one epoch of the process's documents."""
    class Counting(ByteTokenizer):
        encoded = 0

        def encode(self, texts, prepend=None, num_threads=1):
            Counting.encoded += len(texts)
            return super().encode(texts, prepend, num_threads)

    it = data.make_batch_iterator(ListSource(["a" * 5000, "b" * 6000], k=1), Counting(), 2, 40, packing="bestfit",
                                  shuffle=False, process_index=0, process_count=1, prefetch=0)
    rows = [np.append(r, t[-1]) for b in take(it, 3) for r, t in zip(b["inputs"], b["targets"])]
    assert all(r[0] == 256 and len(set(r[1:].tolist())) == 1 for r in rows)  # each a document's cropped head
    assert "".join(chr(r[1]) for r in rows) == "aababa"  # was "aaaaaa"
    assert Counting.encoded == 8  # was 1006


def test_global_batch_is_sharded_over_the_batch_axes(make_mesh):
    mesh = make_mesh(2, 2, 2)
    from nanochat_jax.train import global_batch

    local = [{"inputs": np.arange(8 * 5, dtype=np.int32).reshape(8, 5) + 100 * m, "targets": np.ones((8, 5), np.int32)}
             for m in range(3)]  # three micro-batches
    batch = global_batch(local, mesh)
    assert batch["inputs"].shape == (3, 8, 5)
    np.testing.assert_array_equal(np.asarray(batch["inputs"]), np.stack([b["inputs"] for b in local]))
    assert batch["inputs"].sharding.spec[:2] == (None, ("data", "fsdp"))
    assert {s.data.shape for s in batch["inputs"].addressable_shards} == {(3, 2, 5)}


# ---------------------------------------------------------------------------------------------
# File sources


def write_parquet(path, texts, row_group_size=3, column="text"):
    pq.write_table(pa.table({column: texts}), path, row_group_size=row_group_size)


def test_parquet_source_random_access_over_files_and_row_groups(tmp_path):
    write_parquet(tmp_path / "a.parquet", [f"a{i}" for i in range(7)])
    write_parquet(tmp_path / "b.parquet", [f"b{i}" for i in range(5)], row_group_size=2)
    src = data.FileSource([tmp_path / "a.parquet", tmp_path / "b.parquet"], "text")
    assert len(src) == 12
    assert src.chunks == [(0, 3), (3, 6), (6, 7), (7, 9), (9, 11), (11, 12)]  # row groups
    assert [src[i] for i in (11, 0, 8, 6)] == ["b4", "a0", "b1", "a6"]
    assert src.read(2, 9) == ["a2", "a3", "a4", "a5", "a6", "b0", "b1"]


def test_jsonl_and_txt_sources(tmp_path):
    lines = [json.dumps({"text": f"line {i}", "id": i}) for i in range(300)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n")
    (tmp_path / "b.txt").write_text("a whole file\n\nis one document")
    src = data.FileSource([tmp_path / "a.jsonl", tmp_path / "b.txt"])
    assert len(src) == 301 and src.chunks == [(0, 256), (256, 300), (300, 301)]
    assert src[0] == "line 0" and src[299] == "line 299" and src[300] == "a whole file\n\nis one document"
    cfg = DataConfig(source="files", path=str(tmp_path))
    assert len(data.make_source(cfg, "train")) == 300 and len(data.make_source(cfg, "val")) == 1
    assert list(data.text_iterator(cfg, "train", max_chars=20, doc_cap=4)) == ["line"] * 5
    # the .txt validation file is one chunk: enough for one process, refused up front for two
    data.check_enough_chunks(data.make_source(cfg, "val"), "val", process_count=1)
    with pytest.raises(data.DataError, match=r"the val split has 1 chunk\(s\) of documents .* fewer than the 2 "
                                             r"processes, so some would get no data"):
        data.check_enough_chunks(data.make_source(cfg, "val"), "val", process_count=2)


def test_txt_documents_keep_their_bytes_like_jsonl_and_parquet(tmp_path):
    """read_text translated newlines: a .txt file's CR LF became LF and a lone CR (a progress bar's) LF, while the
    same text in a .jsonl or .parquet file kept them."""
    text = "line 1\r\nline 2\rstill 2\x00\n"
    (tmp_path / "a.txt").write_bytes(text.encode())
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": text}) + "\n")
    write_parquet(tmp_path / "c.parquet", [text])
    src = data.FileSource(sorted(tmp_path.iterdir()))
    assert src.read(0, 3) == [text] * 3  # the .txt was "line 1\nline 2\nstill 2\x00\n"


def test_bad_files_raise_clear_errors(tmp_path):
    write_parquet(tmp_path / "nocol.parquet", ["x"], column="content")
    with pytest.raises(data.DataError, match=r"nocol\.parquet has no column 'text'"):
        data.FileSource([tmp_path / "nocol.parquet"])
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(data.DataError, match=r"ints\.parquet: column 'text' holds int values"):
        data.FileSource([tmp_path / "ints.parquet"]).read(0, 2)
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(data.DataError, match=r"x\.jsonl: document 1 has no 'text' field"):
        data.FileSource([tmp_path / "x.jsonl"]).read(0, 2)
    cfg = DataConfig(source="files", path=str(tmp_path / "x.jsonl"))
    with pytest.raises(data.DataError, match="need at least 2"):
        data.make_source(cfg, "train")
    split = tmp_path / "split"
    split.mkdir()
    (split / "a.jsonl").write_text('{"text": "a document"}\n')
    (split / "b.jsonl").write_text("")
    with pytest.raises(data.DataError, match=r"the val split has no documents: .*b\.jsonl"):
        data.make_source(DataConfig(source="files", path=str(split)), "val")


@pytest.mark.parametrize("source", data.SHARD_SETS)
def test_corrupt_shard_error_or_skip(source, home, capsys):
    shards = data.shards_dir(source)
    assert shards == home / "data" / source
    for i in range(3):
        write_parquet(shards / data.shard_name(i), [f"s{i}-{k}" for k in range(4)])
    write_parquet(shards / data.shard_name(data.SHARD_SETS[source].max_shard), ["val"])
    good = (shards / data.shard_name(1)).read_bytes()
    (shards / data.shard_name(1)).write_bytes(good[: len(good) // 2])  # truncated download
    cfg = DataConfig(source=source, num_shards=3)
    with pytest.raises(data.DataError, match=r"shard_00001\.parquet"):
        data.make_source(cfg, "train")
    cfg.skip_bad_shards = True
    src = data.make_source(cfg, "train")
    assert "skipping unreadable data file" in capsys.readouterr().err
    # num_shards=3 means shards 0 and 1 (train) plus the last one (val): shard 2 on disk is not used
    assert src.read(0, len(src)) == [f"s0-{k}" for k in range(4)]
    cfg.num_shards = 4
    assert data.make_source(cfg, "train").read(0, 8) == [f"s{i}-{k}" for i in (0, 2) for k in range(4)]
    assert data.make_source(cfg, "val").read(0, 1) == ["val"]


# ---------------------------------------------------------------------------------------------
# Downloader against a local HTTP server


def parquet_bytes(texts):
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf)
    return buf.getvalue()


@pytest.fixture
def server():
    """A local HTTP server with Range support; `fail[name] = k` makes the next k requests for name fail with 500,
    `cut[name] = k` makes the next k responses for name stop half way (the full length announced)."""
    files, fail, ranges, cut = {}, {}, [], {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            name = self.path.rsplit("/", 1)[-1]
            if fail.get(name, 0) > 0:
                fail[name] -= 1
                self.send_error(500)
                return
            if name not in files:
                self.send_error(404)
                return
            body, status = files[name], 200
            if rng := self.headers.get("Range"):
                ranges.append((name, rng))
                body, status = body[int(rng.split("=")[1].rstrip("-")):], 206
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if cut.get(name, 0) > 0:
                cut[name] -= 1
                body = body[: len(body) // 2]
                self.close_connection = True
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", files, fail, ranges, cut
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("source", data.SHARD_SETS)
def test_download_resume_retry_and_layout(source, server, tmp_path):
    url, files, fail, ranges, _ = server
    names = [data.shard_name(0), data.shard_name(1), data.shard_name(data.SHARD_SETS[source].max_shard)]
    for k, name in enumerate(names):
        files[name] = parquet_bytes([f"doc {k} {j}" for j in range(50)])
    data.part_path(tmp_path, names[1]).write_bytes(files[names[1]][:100])  # an interrupted download
    fail[names[2]] = 2  # two server errors, then success
    paths = data.download_shards(3, 2, source, tmp_path, base_url=url, backoff=0.01)
    assert paths == [tmp_path / n for n in names]
    assert all(p.read_bytes() == files[p.name] for p in paths)
    assert ranges == [(names[1], "bytes=100-")]
    assert fail[names[2]] == 0 and not list(tmp_path.glob("*.part"))


def test_a_download_cut_short_resumes_where_it_stopped(server, tmp_path, capsys):
    """A connection that closes early reads like a clean end of data: the size check keeps the part file and
    the next attempt asks for the rest, instead of calling the file invalid parquet and starting over."""
    url, files, _, ranges, cut = server
    names = [data.shard_name(0), data.shard_name(data.SHARD_SETS["fineweb"].max_shard)]
    for k, name in enumerate(names):
        files[name] = parquet_bytes([f"doc {k} {j}" for j in range(200)])
    cut[names[0]] = 1
    paths = data.download_shards(2, 1, "fineweb", tmp_path, base_url=url, backoff=0.01)
    assert all(p.read_bytes() == files[p.name] for p in paths)
    assert ranges == [(names[0], f"bytes={len(files[names[0]]) // 2}-")]
    assert "closed after" in capsys.readouterr().err


@pytest.mark.parametrize("source, title", [("fineweb", "FineWeb-EDU"), ("climbmix", "ClimbMix")])
def test_download_unreachable_is_one_clear_error(source, title, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    with pytest.raises(data.DataError) as e:
        data.download_shards(2, 2, source, tmp_path, base_url=f"http://127.0.0.1:{port}", attempts=2, backoff=0.01)
    msg = str(e.value)
    assert re.search(rf"cannot download {title} shard_\d+\.parquet from 127\.0\.0\.1:{port}: \[Errno 111\] "
                     "Connection refused; ", msg)  # (the first shard to fail of the two fetched at once)
    assert str(tmp_path) in msg and "data.source=embedded" in msg and "\n" not in msg
    with pytest.raises(data.DataError, match=r"data.source='files' has no shards to download \(those with shards: "
                                             r"fineweb, climbmix\)"):
        data.download_shards(2, source="files")


def test_embedded_source_with_the_real_tokenizer():
    from nanochat_jax import corpus
    from nanochat_jax.tokenizer import Tokenizer

    src = data.EmbeddedSource("val")
    assert len(src) == corpus.num_documents("val") > 0
    assert src.read(0, 2) == [corpus.document("val", 0), corpus.document("val", 1)]
    texts = list(data.text_iterator(DataConfig(), "train", max_chars=200_000, doc_cap=500))
    assert all(len(t) <= 500 for t in texts) and 200_000 <= sum(map(len, texts)) < 200_500
    tok = Tokenizer.train_from_iterator(texts, vocab_size=512)
    it = data.make_batch_iterator(src, tok, 4, 64, shuffle=False, infinite=False, process_index=0, process_count=1)
    batch = next(it)
    stream = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], 1).reshape(-1)
    reference = [t for d in src.read(0, 40) for t in [tok.bos_token_id] + tok.encode(d)]
    np.testing.assert_array_equal(stream, reference[: stream.size])
    it.close()


def test_many_parquet_files_hold_no_open_files(tmp_path):
    """A source of thousands of shards must stay under the usual 1024 open-files limit: footers only are kept."""
    import os

    paths = [tmp_path / f"s{i:03d}.parquet" for i in range(60)]
    for i, path in enumerate(paths):
        write_parquet(path, [f"doc {i}"])
    before = len(os.listdir("/proc/self/fd"))
    src = data.FileSource(paths)
    assert len(os.listdir("/proc/self/fd")) - before < 5
    assert src.read(58, 60) == ["doc 58", "doc 59"]
