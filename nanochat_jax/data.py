"""Pretraining data: nanochat's parquet shards (FineWeb-EDU, ClimbMix), document sources, and the packed,
checkpointable batch iterator.

Sources. A source is random access over documents: `len(src)`, `src[i] -> str`, plus `src.chunks`, the
(start, stop) document ranges that are cheap to read together (`src.read(start, stop)`). Chunks are the
unit of reading, shuffling, process sharding and batched tokenization:
- `EmbeddedSource(split)`: the small corpus shipped in the package (chunks of 32 documents).
- `FileSource(files, text_column)`: `.parquet` files (one chunk per row group, read
  lazily through pyarrow from the row counts in the parquet footers), `.jsonl` files (one JSON object per
  line; the text is `obj[text_column]`) and `.txt` files (the whole file is ONE document).
- `make_source(cfg.data, split)` picks one: "embedded"; "fineweb" or "climbmix" (`SHARD_SETS`: downloads missing
  shards into artifacts_dir("data", source); the last shard of the dataset is the validation split, all others
  train); "files" (a directory or glob; with the same rule: the last file in sorted order is validation, so at
  least two files are needed).
Unreadable files, a missing text column or non-string text stop with a `DataError` naming the file;
with `skip_bad_shards` an unreadable file is skipped (when its footer/lines are indexed) with a warning.

Batches. `make_batch_iterator` builds a grain pipeline:
  chunk ids -> this process's chunks (strided: chunk c goes to process c % process_count)
  -> per-epoch shuffle of chunk order (grain shuffle, reseeded every epoch) and of documents inside a chunk
  (numpy rng seeded by (seed, epoch, chunk)) -> repeat forever (train) or one pass (val)
  -> read + tokenize each chunk with a BOS before every document (tokenizer.encode, batched, threaded)
  -> `packing.PackDataset`: rows of seq_len+1 tokens, "concat" or "bestfit" (its module says how, and what
     its state is: restoring it continues with exactly the batch that would have come next)
  -> grain batch of local rows -> {"inputs": row[:, :-1], "targets": row[:, 1:]} (int32) -> thread prefetch.
`train.global_batch` assembles the processes' local batches into global jax.Arrays sharded over (data, fsdp).
"""

from __future__ import annotations

import atexit
import bisect
import concurrent.futures
import glob
import json
import os
import sys
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grain
import numpy as np

from nanochat_jax.common import UserError, artifacts_dir
from nanochat_jax.packing import PackDataset


@dataclass(frozen=True)
class ShardSet:
    """A dataset pre-shuffled and repackaged by karpathy into parquet shards shard_00000.parquet ... (~250M
    characters each, row groups of 1024 documents, a "text" column); the last shard is the validation split."""

    title: str
    url: str
    max_shard: int  # the last shard's index


_HF = "https://huggingface.co/datasets/karpathy"
SHARD_SETS = {  # data.source -> its shards: nanochat's first-release dataset and master's
    "fineweb": ShardSet("FineWeb-EDU", f"{_HF}/fineweb-edu-100b-shuffle/resolve/main", 1822),
    "climbmix": ShardSet("ClimbMix", f"{_HF}/climbmix-400b-shuffle/resolve/main", 6542),
}
EMBEDDED_CHUNK_DOCS = 32  # documents per chunk for sources without natural chunks
JSONL_CHUNK_DOCS = 256


class DataError(UserError, RuntimeError):
    """Data that cannot be downloaded or read; the message names the file and what is wrong."""


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def _warn(msg: str) -> None:
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Download


def shards_dir(source: str) -> Path:
    return artifacts_dir("data", source)


def _check_parquet(path: Path) -> None:
    import pyarrow.parquet as pq

    pq.ParquetFile(path).metadata  # raises on a truncated or corrupt footer


def _download_one(name: str, data_dir: Path, base_url: str, title: str, attempts: int, backoff: float,
                  stop: threading.Event, progress) -> Path:
    """Fetch one file into data_dir with resume (HTTP Range on its part file), retries and atomic rename."""
    path, part = data_dir / name, part_path(data_dir, name)
    url = f"{base_url}/{name}"
    for attempt in range(1, attempts + 1):
        if stop.is_set():
            raise DataError(f"download of {name} cancelled")
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                partial = have and response.status == 206  # a 200 means the server ignored Range
                total = _remote_size(response, have if partial else 0)
                with open(part, "ab" if partial else "wb") as f:
                    while block := response.read(1 << 20):
                        if stop.is_set():  # (what came so far stays in the part file for the next run)
                            raise DataError(f"download of {name} cancelled")
                        f.write(block)
                        progress(len(block))
            size = part.stat().st_size
            if total is not None and size < total:  # a connection closed early reads as a clean end of data
                raise ConnectionError(f"the connection closed after {size:,} of {total:,} bytes")
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise DataError(f"{url} does not exist (HTTP 404)") from None
            if e.code == 416:  # our partial file does not fit the remote one: start over
                part.unlink(missing_ok=True)
            reason = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, OSError) as e:  # the part file stays: the next attempt resumes it
            reason = str(getattr(e, "reason", None) or e)
        else:
            try:
                _check_parquet(part)
            except Exception as e:  # complete, yet not a readable parquet file: start over
                part.unlink(missing_ok=True)
                reason = f"downloaded file is not valid parquet ({e})"
            else:
                os.replace(part, path)
                return path
        if attempt < attempts:
            _warn(f"download of {name} failed ({reason}); retry {attempt}/{attempts - 1} in {backoff * 2 ** (attempt - 1):.1f}s")
            stop.wait(backoff * 2 ** (attempt - 1))
    host = urllib.parse.urlsplit(base_url).netloc
    raise DataError(f"cannot download {title} {name} from {host}: {reason}; download shards elsewhere "
                    f"and put them in {data_dir}, or use data.source=embedded")


def _remote_size(response, offset: int) -> int | None:
    """The whole remote file's size from a response starting at byte `offset` (None when not said)."""
    total = response.headers.get("Content-Range", "").rpartition("/")[2]
    if total.isdigit():
        return int(total)
    length = response.headers.get("Content-Length", "")
    return offset + int(length) if length.isdigit() else None


def part_path(data_dir: Path, name: str) -> Path:
    """Where an unfinished download of `name` grows: one per host, so hosts sharing a filesystem (a TPU pod's
    workers, each running the download) never write into the same file; the finished file is renamed in."""
    return data_dir / f"{name}.{socket.gethostname()}.part"


def download_shards(num_shards: int, workers: int = 4, source: str = "fineweb", data_dir: str | Path | None = None,
                    *, base_url: str | None = None, attempts: int = 5, backoff: float = 2.0) -> list[Path]:
    """Make sure num_shards shards of SHARD_SETS[source] are in data_dir (default shards_dir(source)): the first
    num_shards-1 (train) and the last shard of the dataset (validation). Returns the local paths in sorted order.
    Already present files are kept; interrupted downloads resume from their `.part` file."""
    from tqdm import tqdm

    if source not in SHARD_SETS:
        raise DataError(f"data.source={source!r} has no shards to download "
                        f"(those with shards: {', '.join(SHARD_SETS)})")
    shards = SHARD_SETS[source]
    data_dir = Path(data_dir) if data_dir is not None else shards_dir(source)
    data_dir.mkdir(parents=True, exist_ok=True)
    names = [shard_name(i) for i in range(min(num_shards - 1, shards.max_shard))] + [shard_name(shards.max_shard)]
    todo = [n for n in names if not (data_dir / n).exists()]
    if todo:
        stop = threading.Event()
        bar = tqdm(total=len(todo), unit="shard", desc=f"{shards.title} -> {data_dir}", disable=None)
        received = [0]

        def progress(nbytes: int) -> None:
            received[0] += nbytes
            bar.set_postfix_str(f"{received[0] / 1e6:.0f} MB", refresh=False)

        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            futures = [pool.submit(_download_one, n, data_dir, base_url or shards.url, shards.title, attempts,
                                   backoff, stop, progress)
                       for n in todo]
            try:
                for future in concurrent.futures.as_completed(futures):
                    future.result()
                    bar.update(1)
            except BaseException:
                stop.set()
                for future in futures:
                    future.cancel()
                raise
            finally:
                bar.close()
    return [data_dir / n for n in sorted(names)]


# ---------------------------------------------------------------------------------------------
# Sources


class EmbeddedSource:
    """The corpus shipped inside the package (nanochat_jax.corpus)."""

    def __init__(self, split: str = "train"):
        from nanochat_jax import corpus

        self.split, self._corpus = split, corpus
        self._n = corpus.num_documents(split)
        self.chunks = [(s, min(s + EMBEDDED_CHUNK_DOCS, self._n)) for s in range(0, self._n, EMBEDDED_CHUNK_DOCS)]

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> str:
        return self._corpus.document(self.split, i)

    def read(self, start: int, stop: int) -> list[str]:
        return [self[i] for i in range(start, stop)]

    def __repr__(self) -> str:
        return f"EmbeddedSource({self.split!r}, {self._n} documents)"


class _ParquetFile:
    """Keeps the footer only and opens the file per read: thousands of shards stay under the open-files limit."""

    def __init__(self, path: Path, column: str):
        import pyarrow.parquet as pq

        self.path, self.column = path, column
        try:
            with pq.ParquetFile(path) as f:
                self._metadata, names = f.metadata, f.schema_arrow.names
        except Exception as e:
            raise DataError(f"cannot read parquet file {path}: {e}") from None
        if column not in names:
            raise DataError(f"parquet file {path} has no column {column!r} (columns: {', '.join(names)})")
        self.chunk_sizes = [self._metadata.row_group(g).num_rows for g in range(self._metadata.num_row_groups)]

    def read_chunk(self, g: int) -> list[str]:
        import pyarrow.parquet as pq

        try:
            with pq.ParquetFile(self.path, metadata=self._metadata) as f:
                values = f.read_row_group(g, columns=[self.column]).column(0).to_pylist()
        except Exception as e:
            raise DataError(f"cannot read row group {g} of parquet file {self.path}: {e}") from None
        _check_strings(values, self.path, self.column)
        return values


class _JsonlFile:
    def __init__(self, path: Path, column: str):
        self.path, self.column = path, column
        offsets, pos = [], 0
        try:
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        offsets.append(pos)
                    pos += len(line)
        except OSError as e:
            raise DataError(f"cannot read {path}: {e}") from None
        self._offsets = np.array(offsets, np.int64)
        n = len(offsets)
        self.chunk_sizes = [min(JSONL_CHUNK_DOCS, n - s) for s in range(0, n, JSONL_CHUNK_DOCS)]

    def read_chunk(self, c: int) -> list[str]:
        values = []
        with open(self.path, "rb") as f:
            for k in range(c * JSONL_CHUNK_DOCS, c * JSONL_CHUNK_DOCS + self.chunk_sizes[c]):
                f.seek(self._offsets[k])
                line = f.readline()
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{self.path}: document {k} is not valid JSON ({e})") from None
                if not isinstance(obj, dict) or self.column not in obj:
                    raise DataError(f"{self.path}: document {k} has no {self.column!r} field")
                values.append(obj[self.column])
        _check_strings(values, self.path, self.column)
        return values


class _TextFile:
    def __init__(self, path: Path, column: str):
        self.path, self.chunk_sizes = path, [1]

    def read_chunk(self, c: int) -> list[str]:
        try:
            return [self.path.read_bytes().decode("utf-8")]  # as written: no newline translation
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read text file {self.path}: {e}") from None


_READERS = {".parquet": _ParquetFile, ".jsonl": _JsonlFile, ".txt": _TextFile}


def _check_strings(values: list, path: Path, column: str) -> None:
    bad = next((v for v in values if not isinstance(v, str)), "")
    if not isinstance(bad, str):
        raise DataError(f"{path}: column {column!r} holds {type(bad).__name__} values, expected strings")


class FileSource:
    """Documents from .parquet / .jsonl / .txt files, in file order; chunks are parquet row groups,
    runs of JSONL_CHUNK_DOCS jsonl lines, or one whole .txt file. Recently read chunks are cached."""

    def __init__(self, files, text_column: str = "text", skip_bad: bool = False, cache_chunks: int = 4):
        self.files = []
        readers = []
        for path in map(Path, files):
            if path.suffix not in _READERS:
                raise DataError(f"unsupported data file {path}: expected .parquet, .jsonl or .txt")
            try:
                reader = _READERS[path.suffix](path, text_column)
            except DataError as e:
                if not skip_bad:
                    raise
                _warn(f"skipping unreadable data file ({e})")
                continue
            readers.append(reader)
            self.files.append(path)
        self._where = []  # chunk -> (reader, local chunk index)
        self.chunks = []
        start = 0
        for reader in readers:
            for c, size in enumerate(reader.chunk_sizes):
                if size:
                    self._where.append((reader, c))
                    self.chunks.append((start, start + size))
                    start += size
        self._n = start
        self._starts = [s for s, _ in self.chunks]
        self._cache: OrderedDict[int, list[str]] = OrderedDict()
        self._cache_size = cache_chunks
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._n

    def _chunk(self, c: int) -> list[str]:
        with self._lock:
            if c in self._cache:
                self._cache.move_to_end(c)
                return self._cache[c]
        reader, local = self._where[c]
        values = reader.read_chunk(local)
        with self._lock:
            self._cache[c] = values
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return values

    def __getitem__(self, i: int) -> str:
        if not 0 <= i < self._n:
            raise IndexError(f"document {i} out of range for {self._n} documents")
        c = bisect.bisect_right(self._starts, i) - 1
        return self._chunk(c)[i - self._starts[c]]

    def read(self, start: int, stop: int) -> list[str]:
        out = []
        while start < stop:
            c = bisect.bisect_right(self._starts, start) - 1
            c_start, c_stop = self.chunks[c]
            out += self._chunk(c)[start - c_start:min(stop, c_stop) - c_start]
            start = min(stop, c_stop)
        return out

    def __repr__(self) -> str:
        return f"FileSource({len(self.files)} files, {self._n} documents)"




def _list_files(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.suffix in _READERS and p.is_file()]
    else:
        files = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).suffix in _READERS]
    return sorted(files)


def _split_files(files: list[Path], split: str, where: str) -> list[Path]:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if len(files) < 2:
        raise DataError(f"found {len(files)} data file(s) in {where}; need at least 2 (the last one is the validation split)")
    return files[:-1] if split == "train" else files[-1:]


def make_source(cfg, split: str):
    """The document source for a DataConfig and split ('train' | 'val')."""
    if cfg.source == "embedded":
        return EmbeddedSource(split)
    if cfg.source in SHARD_SETS:
        data_dir = shards_dir(cfg.source)
        # exactly these, present ones kept
        files = download_shards(cfg.num_shards, cfg.download_workers, cfg.source, data_dir)
        files = _split_files(files, split, str(data_dir))
    elif cfg.source == "files":
        files = _split_files(_list_files(cfg.path), split, cfg.path)
    else:
        raise DataError(f"unknown data.source {cfg.source!r}")
    source = FileSource(files, cfg.text_column, cfg.skip_bad_shards)
    if not source.chunks:  # (skip_bad_shards can leave none)
        raise DataError(f"the {split} split has no documents: {', '.join(str(f) for f in files)}")
    return source


def check_enough_chunks(source, split: str, process_count: int | None = None) -> None:
    """DataError unless every process gets at least one chunk of the split (chunk c goes to process c % count):
    said at start, before a run sets a previous one aside, instead of at the first evaluation."""
    if process_count is None:
        import jax

        process_count = jax.process_count()
    if len(source.chunks) < process_count:
        raise DataError(f"the {split} split has {len(source.chunks)} chunk(s) of documents (row groups of parquet "
                        f"files, {JSONL_CHUNK_DOCS} lines of .jsonl files, whole .txt files), fewer than the "
                        f"{process_count} processes, so some would get no data: give it more or larger files")


def text_iterator(cfg, split: str = "train", max_chars: int | None = None, doc_cap: int | None = None) -> Iterator[str]:
    """Documents of a split in order, each cropped to doc_cap characters, until max_chars characters."""
    source = make_source(cfg, split)
    total = 0
    for start, stop in source.chunks:
        for text in source.read(start, stop):
            text = text[:doc_cap] if doc_cap else text
            yield text
            total += len(text)
            if max_chars is not None and total >= max_chars:
                return


# ---------------------------------------------------------------------------------------------
# Batches


def chunk_stream(num_chunks: int, *, seed: int = 0, shuffle: bool = True, infinite: bool = True,
                 process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """This process's chunk ids as a grain MapDataset, shuffled per epoch and repeated when asked."""
    ds = grain.MapDataset.range(num_chunks)[process_index::process_count]
    if len(ds) == 0:
        raise DataError(f"process {process_index} of {process_count} gets no data: only {num_chunks} chunks of documents")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat() if infinite else ds


def _encode(tokenizer, texts: list[str], num_threads: int) -> list[np.ndarray]:
    ids = tokenizer.encode(texts, prepend=tokenizer.bos_token_id, num_threads=num_threads)
    return [np.asarray(t, np.int32) for t in ids]


def _tokenize_chunk(source, tokenizer, per_epoch: int, seed: int, shuffle: bool, num_threads: int):
    """Map function: (stream index, chunk id) -> (source indices of its documents in their order, their
    BOS+document tokens)."""

    def tokenize(index: int, chunk: int) -> tuple[np.ndarray, list[np.ndarray]]:
        start, stop = source.chunks[chunk]
        ids = np.arange(start, stop)
        if shuffle:
            epoch = index // per_epoch
            ids = start + np.random.default_rng([seed, epoch, chunk]).permutation(stop - start)
        texts = source.read(start, stop)
        return ids, _encode(tokenizer, [texts[i - start] for i in ids], num_threads)

    return tokenize


def _encode_documents(source, tokenizer, num_threads: int):
    """Source indices -> their BOS+document tokens (for restoring a bestfit buffer)."""

    def encode(ids: list[int]) -> list[np.ndarray]:
        texts = {i: source.read(i, i + 1)[0] for i in sorted(set(ids))}  # in order: each chunk read once
        return _encode(tokenizer, [texts[i] for i in ids], num_threads)

    return encode


class BatchIterator:
    """Iterator of local batches {"inputs", "targets"} (int32, (B_local, T)) with get_state()/set_state()."""

    def __init__(self, dataset: grain.IterDataset):
        self._it = iter(dataset)
        ref = weakref.ref(self)  # release grain's threads before interpreter teardown (it errors during it)
        atexit.register(lambda: (me := ref()) is not None and me.close())

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict:
        return json.loads(json.dumps(self._it.get_state()))

    def set_state(self, state: dict) -> None:
        self._it.set_state(state)

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None


def _split_rows(rows: np.ndarray) -> dict[str, np.ndarray]:
    return {"inputs": rows[:, :-1], "targets": rows[:, 1:]}


def make_batch_iterator(source, tokenizer, batch_rows: int, seq_len: int, *, packing: str = "concat",
                        seed: int = 0, shuffle: bool = True, infinite: bool = True, process_index: int | None = None,
                        process_count: int | None = None, num_threads: int = 4, prefetch: int = 2) -> BatchIterator:
    """Packed next-token batches from a source (packing: see nanochat_jax.packing). batch_rows is the GLOBAL
    number of rows per batch; each of the process_count processes yields batch_rows // process_count rows from
    its own disjoint documents."""
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if batch_rows % process_count:
        raise DataError(f"batch_rows={batch_rows} is not divisible by the {process_count} processes")
    chunks = chunk_stream(len(source.chunks), seed=seed, shuffle=shuffle, infinite=infinite,
                          process_index=process_index, process_count=process_count)
    per_epoch = len(range(process_index, len(source.chunks), process_count))
    docs_per_epoch = sum(stop - start for start, stop in source.chunks[process_index::process_count])
    ds = chunks.map_with_index(_tokenize_chunk(source, tokenizer, per_epoch, seed, shuffle, num_threads))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    ds = PackDataset(ds, packing, seq_len + 1, per_epoch, len(source.chunks),
                     _encode_documents(source, tokenizer, num_threads), docs_per_epoch)
    ds = ds.batch(batch_rows // process_count, drop_remainder=True).map(_split_rows)
    if prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return BatchIterator(ds)
