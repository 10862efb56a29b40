"""Batches of conversations for the chat stages: packed rows for mid-training, padded or best-fit rows for SFT.

Each walks a task (any sliceable list of conversations) with process p of P taking examples p, p + P, ...,
and each has a small JSON state for exact resume (`get_state` / `set_state`, saved in checkpoints).

- `PackedConversations` (mid-training, as nanochat): each conversation is rendered (`render_conversation`,
  ids only: every token is trained, the mask is ignored), the ids are concatenated into one stream and the
  stream is cut into rows of seq_len + 1 tokens like pretraining text; `next()` gives {"inputs", "targets"}
  of shape (rows, seq_len). Epochs wrap around forever. State: the cursor of the oldest conversation that
  still has unconsumed tokens, how many of its tokens were already used, and the epoch.
- `SFTBatches` (as nanochat's SFT collate): one conversation per row, truncated to seq_len + 1 tokens; inputs
  are padded with <|assistant_end|> and targets are -1 on padding and wherever the render mask is 0 (so the
  loss counts only the assistant's tokens). `next_step(accum)` returns `accum` micro-batches padded to one
  common width: the next power of two of the longest row (at least 16, at most seq_len), agreed by all
  processes, so the train step compiles once per width. State: examples consumed by this process.
- `BestFitConversations` (SFT with sft.recipe = "master", as nanochat master's SFT loader): rows of exactly
  seq_len + 1 tokens, each filled with whole conversations (cut to seq_len + 1 tokens, as SFTBatches cuts them;
  master never cuts and leaves a longer one in its buffer) chosen best fit from a buffer of BESTFIT_BUFFER: the
  longest that fits the space left, the first of equals; when none fits, the rest of the row is <|bos|> padding.
  Targets are -1 wherever the render mask is 0 and on the padding. `next()` gives one micro-batch (rows, seq_len).
  State: conversations fetched by this process and the fetch numbers of those still in the buffer.
"""

from __future__ import annotations

import sys
from collections import deque

import jax
import numpy as np

from nanochat_jax.config import ConfigError
from nanochat_jax.distributed import max_over_processes
from nanochat_jax.engine import bucket

MIN_WIDTH = 16
BESTFIT_BUFFER = 100  # conversations to choose from (nanochat master's buffer_size)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    return (jax.process_index() if process_index is None else process_index,
            jax.process_count() if process_count is None else process_count)


def _share(kind: str, task, rows: int, process_index: int | None, process_count: int | None) -> tuple[int, range]:
    """(rows this process collates of a micro-batch's global `rows`, the task indices it takes: p, p + P, ...)."""
    index, count = _process(process_index, process_count)
    if rows % count:
        raise ConfigError(f"rows={rows} is not divisible by the {count} processes")
    mine = range(index, len(task), count)
    if len(mine) == 0:
        raise ConfigError(f"{kind}: process {index} of {count} gets none of the task's {len(task)} examples")
    return rows // count, mine


def _task_changed(state: dict, task) -> bool:
    """True (with a warning) when a saved position belongs to a mixture of another size: it would point at other
    conversations, or past the end, so the order restarts instead."""
    saved = state["conversations"]
    if saved != len(task):
        print(f"WARNING: the data position was saved for a mixture of {saved} conversations, this one has "
              f"{len(task)}: its order starts from the beginning", file=sys.stderr, flush=True)
    return saved != len(task)


class PackedConversations:
    """Mid-training rows: rendered conversations packed into (rows, seq_len + 1) windows (module docstring).

    rows: the GLOBAL rows per batch; this process yields rows // process_count of them."""

    def __init__(self, task, tokenizer, rows: int, seq_len: int, *, process_index: int | None = None,
                 process_count: int | None = None):
        self.task, self.tokenizer, self.seq_len = task, tokenizer, seq_len
        self.index, self.count = _process(process_index, process_count)
        if rows % self.count:
            raise ConfigError(f"rows={rows} is not divisible by the {self.count} processes")
        if len(task) == 0:
            raise ConfigError("PackedConversations: the task has no conversations")
        self.local_rows = rows // self.count
        self.set_state({"cursor": self.index, "skip": 0, "epoch": 0, "conversations": len(task)})

    def _render(self, cursor: int) -> list[int]:
        return self.tokenizer.render_conversation(self.task[cursor])[0]

    def _advance(self) -> None:
        """Render the next conversation of this process into the buffer."""
        self.buffer.append((self.next_cursor, self.next_epoch, self._render(self.next_cursor)))
        self.next_cursor += self.count
        if self.next_cursor >= len(self.task):
            self.next_cursor -= len(self.task)
            self.next_epoch += 1

    def get_state(self) -> dict:
        if not self.buffer:
            return {"cursor": self.next_cursor, "skip": 0, "epoch": self.next_epoch, "conversations": len(self.task)}
        cursor, epoch, _ = self.buffer[0]
        return {"cursor": cursor, "skip": self.skip, "epoch": epoch, "conversations": len(self.task)}

    def set_state(self, state: dict) -> None:
        if _task_changed(state, self.task):
            state = {"cursor": self.index, "skip": 0, "epoch": 0}
        self.buffer: deque = deque()
        self.skip = 0
        self.next_cursor, self.next_epoch = int(state["cursor"]), int(state["epoch"])
        if state["skip"]:
            self._advance()
            self.skip = int(state["skip"])

    @property
    def progress(self) -> float:
        """Epochs done, fractional: epoch + cursor / len(task) of the oldest conversation in use."""
        state = self.get_state()
        return state["epoch"] + state["cursor"] / len(self.task)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        need = self.local_rows * (self.seq_len + 1)
        out = np.empty(need, np.int32)
        filled = 0
        while filled < need:
            if not self.buffer:
                self._advance()
            _, _, ids = self.buffer[0]
            take = min(len(ids) - self.skip, need - filled)
            out[filled:filled + take] = ids[self.skip:self.skip + take]
            filled, self.skip = filled + take, self.skip + take
            if self.skip == len(ids):
                self.buffer.popleft()
                self.skip = 0
        rows = out.reshape(self.local_rows, self.seq_len + 1)
        return {"inputs": rows[:, :-1], "targets": rows[:, 1:]}


def mean_tokens_per_conversation(task, tokenizer, samples: int = 2000) -> float:
    """Average rendered length over up to `samples` conversations spread evenly over the task."""
    n = len(task)
    picks = np.unique(np.linspace(0, n - 1, min(n, samples)).astype(int))
    return float(np.mean([len(tokenizer.render_conversation(task[int(i)])[0]) for i in picks]))


# ---------------------------------------------------------------------------------------------
# SFT


def collate_sft(rendered: list[tuple[list[int], list[int]]], width: int, pad_id: int) -> dict:
    """Rows of (ids, mask) -> {"inputs", "targets"} (len(rendered), width) int32: inputs ids[:-1] then pad_id,
    targets ids[1:] with -1 where mask[1:] is 0 and on the padding."""
    inputs = np.full((len(rendered), width), pad_id, np.int32)
    targets = np.full((len(rendered), width), -1, np.int32)
    for r, (ids, mask) in enumerate(rendered):
        n = len(ids) - 1
        if n > width:
            raise ValueError(f"collate_sft: a row of {n} inputs does not fit width {width}")
        ids, mask = np.asarray(ids, np.int32), np.asarray(mask, bool)
        inputs[r, :n] = ids[:-1]
        targets[r, :n] = np.where(mask[1:], ids[1:], -1)
    return {"inputs": inputs, "targets": targets}


class SFTBatches:
    """Padded SFT micro-batches of one conversation per row (module docstring).

    rows: the GLOBAL rows per micro-batch; this process collates rows // process_count of them."""

    def __init__(self, task, tokenizer, rows: int, seq_len: int, *, process_index: int | None = None,
                 process_count: int | None = None):
        self.task, self.tokenizer, self.seq_len = task, tokenizer, seq_len
        self.local_rows, self.mine = _share("SFTBatches", task, rows, process_index, process_count)
        self.pad_id = tokenizer.encode_special("<|assistant_end|>")
        self.position = 0

    def get_state(self) -> dict:
        return {"position": self.position, "conversations": len(self.task)}

    def set_state(self, state: dict) -> None:
        self.position = 0 if _task_changed(state, self.task) else int(state["position"])

    @property
    def epoch(self) -> float:
        return self.position / len(self.mine)

    def _next_rendered(self) -> tuple[list[int], list[int]]:
        conversation = self.task[self.mine[self.position % len(self.mine)]]
        self.position += 1
        return self.tokenizer.render_conversation(conversation, max_tokens=self.seq_len + 1)

    def next_step(self, accum: int) -> list[dict]:
        """`accum` micro-batches of this process's rows, all padded to the same width."""
        rendered = [[self._next_rendered() for _ in range(self.local_rows)] for _ in range(accum)]
        longest = max(len(ids) - 1 for micro in rendered for ids, _ in micro)
        width = max_over_processes(min(self.seq_len, bucket(longest, MIN_WIDTH)))
        return [collate_sft(micro, width, self.pad_id) for micro in rendered]


class BestFitConversations:
    """SFT micro-batches of best-fit packed conversations (module docstring).

    rows: the GLOBAL rows per micro-batch; this process collates rows // process_count of them."""

    def __init__(self, task, tokenizer, rows: int, seq_len: int, *, process_index: int | None = None,
                 process_count: int | None = None):
        self.task, self.tokenizer, self.capacity = task, tokenizer, seq_len + 1
        self.local_rows, self.mine = _share("BestFitConversations", task, rows, process_index, process_count)
        self.pad_id = tokenizer.encode_special("<|bos|>")
        self.set_state({"fetched": 0, "buffer": [], "conversations": len(task)})

    def _fetch(self, number: int) -> tuple[int, list[int], list[int]]:
        """(number, ids, mask) of this process's conversation `number` (counting on through the epochs)."""
        conversation = self.task[self.mine[number % len(self.mine)]]
        return (number, *self.tokenizer.render_conversation(conversation, max_tokens=self.capacity))

    def get_state(self) -> dict:
        return {"fetched": self.fetched, "buffer": [number for number, _, _ in self.buffer],
                "conversations": len(self.task)}

    def set_state(self, state: dict) -> None:
        if _task_changed(state, self.task):
            state = {"fetched": 0, "buffer": []}
        self.fetched = int(state["fetched"])
        self.buffer = [self._fetch(int(number)) for number in state["buffer"]]

    @property
    def epoch(self) -> float:
        """Epochs of this process's conversations trained on (fetched and no longer in the buffer)."""
        return (self.fetched - len(self.buffer)) / len(self.mine)

    def _row(self) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []
        while len(ids) < self.capacity:
            while len(self.buffer) < BESTFIT_BUFFER:
                self.buffer.append(self._fetch(self.fetched))
                self.fetched += 1
            space = self.capacity - len(ids)
            fits = [i for i, (_, conv, _) in enumerate(self.buffer) if len(conv) <= space]
            if not fits:
                ids += [self.pad_id] * space
                mask += [0] * space
                break
            _, conv, conv_mask = self.buffer.pop(max(fits, key=lambda i: len(self.buffer[i][1])))
            ids += conv
            mask += conv_mask
        return ids, mask

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return collate_sft([self._row() for _ in range(self.local_rows)], self.capacity - 1, self.pad_id)


def bestfit_rows_per_epoch(task, tokenizer, seq_len: int, samples: int = 2000) -> float:
    """The rows one pass over the task fills when BestFitConversations packs it: counted on up to `samples`
    conversations spread evenly over the task (all of a smaller one), scaled to its size."""
    n = len(task)
    sample = [task[int(i)] for i in np.unique(np.linspace(0, n - 1, min(n, samples)).astype(int))]
    packer = BestFitConversations(sample, tokenizer, 1, seq_len, process_index=0, process_count=1)
    rows = 0
    while packer.epoch < 1:
        next(packer)
        rows += 1
    return rows * n / len(sample)

