"""Packing tokenized documents into the rows of pretraining batches (`data.packing`), with exact positions.

A packer reads a grain stream of chunks, each `(ids, docs)`: the source indices of the chunk's documents in their
(shuffled) order and each document's tokens with a leading BOS. It yields rows of row_len = seq_len + 1 tokens.
- "concat": the documents back to back, cut every row_len tokens; a row may start inside a document. Nothing
  is dropped but the incomplete tail of a finite pass. State `{"docs": {"next_index": k}, "skip": s, "epoch",
  "chunks"}`: k is the stream position of the oldest chunk with unemitted tokens, s how many of its tokens were
  emitted; restoring re-reads that one chunk.
- "bestfit": nanochat master's BOS-aligned best fit. A buffer holds at least BUFFER_DOCS documents (refilled a
  chunk at a time; at most one epoch of this process's documents, so a split of fewer, long documents, e.g. whole
  .txt files, is not read and tokenized over and over to fill it); a row is filled from its start with the largest
  buffered document that fits the space left (the first of equal ones) until none fits, then the shortest one is
  cropped to the space left and its rest dropped. Every row starts with a BOS and nothing is padded; a document
  longer than a row waits until it is the shortest, then is cropped. State `{"docs": {"next_index": k}, "pending":
  [...], "epoch", "chunks"}`: k is the stream position of the next chunk to read, pending the source indices of
  the buffered documents in buffer order; restoring re-reads and re-tokenizes those documents only.
A state saved over another data set (another number of chunks) or by the other packer starts the order over,
said on stderr.
"""

from __future__ import annotations

import sys
from collections import deque

import grain
import numpy as np

BUFFER_DOCS = 1000  # bestfit: documents to choose from (nanochat master's buffer_size)


class PackDataset(grain.IterDataset):
    """Rows of row_len tokens from a stream of (ids, docs) chunks; encode(ids) re-tokenizes source documents."""

    def __init__(self, parent: grain.IterDataset, packing: str, row_len: int, chunks_per_epoch: int,
                 num_chunks: int, encode, docs_per_epoch: int | None = None):
        super().__init__(parent)
        self.packer = {"concat": _Concat, "bestfit": _BestFit}[packing]
        self.args = (row_len, chunks_per_epoch, num_chunks, encode, docs_per_epoch)

    def __iter__(self):
        return self.packer(self._parent.__iter__(), *self.args)


class _Packer(grain.DatasetIterator):
    packing = ""

    def __init__(self, parent, row_len: int, chunks_per_epoch: int, num_chunks: int, encode, docs_per_epoch=None):
        super().__init__(parent)
        self.row_len, self.chunks_per_epoch, self.encode = row_len, chunks_per_epoch, encode
        self.buffer_docs = min(BUFFER_DOCS, docs_per_epoch or BUFFER_DOCS)  # (bestfit)
        self.num_chunks = num_chunks  # of the whole source (all processes): the shuffled order is over these

    def _state(self, docs: dict, **position) -> dict:
        return {"docs": dict(docs), **position, "epoch": docs["next_index"] // self.chunks_per_epoch,
                "chunks": self.num_chunks}

    def _same_order(self, state: dict) -> bool:
        saved = "bestfit" if "pending" in state else "concat"
        if saved != self.packing:
            reason = f"comes from data.packing={saved}, this run packs with {self.packing}"
        elif state["chunks"] != self.num_chunks:
            reason = (f"is in an order of {state['chunks']} chunks of documents, this run has {self.num_chunks} "
                      "(data.num_shards or the files changed)")
        else:
            return True
        print(f"data: the saved position {reason}; the data order starts over", file=sys.stderr)
        return False


class _Concat(_Packer):
    packing = "concat"

    def __init__(self, *args):
        super().__init__(*args)
        self._chunks: deque = deque()  # (parent state before this chunk, its tokens)
        self._skip = 0  # tokens of the first buffered chunk already emitted
        self._buffered = 0

    def __next__(self) -> np.ndarray:
        while self._buffered < self.row_len:
            before = self._parent.get_state()
            _, docs = next(self._parent)  # StopIteration ends a finite pass; the incomplete tail is dropped
            tokens = np.concatenate(docs)
            self._chunks.append((before, tokens))
            self._buffered += len(tokens)
        row, need = [], self.row_len
        while need:
            tokens = self._chunks[0][1]
            take = min(need, len(tokens) - self._skip)
            row.append(tokens[self._skip:self._skip + take])
            self._skip += take
            need -= take
            if self._skip == len(tokens):
                self._chunks.popleft()
                self._skip = 0
        self._buffered -= self.row_len
        return np.concatenate(row)

    def get_state(self) -> dict:
        return self._state(self._chunks[0][0] if self._chunks else self._parent.get_state(), skip=self._skip)

    def set_state(self, state: dict) -> None:
        if not self._same_order(state):
            return
        self._parent.set_state(dict(state["docs"]))
        self._chunks.clear()
        self._buffered = 0
        skip = int(state["skip"])
        if skip:
            tokens = np.concatenate(next(self._parent)[1])
            self._chunks.append((dict(state["docs"]), tokens))
            self._skip, self._buffered = skip, len(tokens) - skip


class _BestFit(_Packer):
    packing = "bestfit"

    def __init__(self, *args):
        super().__init__(*args)
        self._ids: list[int] = []  # the buffer: source indices, tokens and lengths of its documents
        self._docs: list[np.ndarray] = []
        self._lens = np.zeros(0, np.int64)
        self._done = False  # a finite pass has no more chunks

    def _add(self, ids: list[int], docs: list[np.ndarray]) -> None:
        self._ids += ids
        self._docs += docs
        self._lens = np.concatenate([self._lens, [len(d) for d in docs]])

    def _refill(self) -> None:
        while len(self._docs) < self.buffer_docs and not self._done:
            try:
                ids, docs = next(self._parent)
            except StopIteration:
                self._done = True
            else:
                self._add([int(i) for i in ids], docs)

    def __next__(self) -> np.ndarray:
        row, pos = np.empty(self.row_len, np.int32), 0
        while pos < self.row_len:
            self._refill()
            if not self._docs:
                raise StopIteration  # the end of a finite pass: the incomplete row is dropped
            space = self.row_len - pos
            fits = np.where(self._lens <= space, self._lens, 0)
            i = int(fits.argmax()) if fits.any() else int(self._lens.argmin())
            del self._ids[i]
            self._lens = np.delete(self._lens, i)
            doc = self._docs.pop(i)[:space]
            row[pos:pos + len(doc)] = doc
            pos += len(doc)
        return row

    def get_state(self) -> dict:
        return self._state(self._parent.get_state(), pending=list(self._ids))

    def set_state(self, state: dict) -> None:
        if not self._same_order(state):
            return
        self._parent.set_state(dict(state["docs"]))
        ids = [int(i) for i in state["pending"]]
        self._ids, self._docs, self._lens, self._done = [], [], np.zeros(0, np.int64), False
        self._add(ids, self.encode(ids))
