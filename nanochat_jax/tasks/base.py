"""What every task shares: the Task interface, mixtures and sequences of tasks, multiple-choice prompts,
and loading rows from the Hugging Face hub (or from local rows / a JSONL file instead).

A task is a list of conversations ({"messages": [...]} plus task-specific keys) that can be sliced with
start/stop/step, and often a way to score a model's completion for one of them (1 correct, 0 wrong).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

from nanochat_jax.common import UserError

MIX_SEED = 42  # the fixed shuffle of TaskMixture
HUB_SHUFFLE_SEED = 42  # hub datasets are shuffled once after loading


class TaskDataError(UserError, RuntimeError):
    """A task's data could not be loaded or is malformed; the message says which and why in one line."""


class Task:
    """A sliceable view over a dataset of conversations: task[i] is example start + i * step."""

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if stop is not None and stop < start:
            raise ValueError(f"stop must be >= start, got start={start} stop={stop}")
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        self.start, self.stop, self.step = start, stop, step

    # 'categorical' (score from the logits of conversation['letters']) or 'generative' (sample, then evaluate);
    # every concrete task sets it as a class attribute
    eval_type: str

    def num_examples(self) -> int:
        """Tasks over hub rows keep them in self.rows; generated tasks override this."""
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def __len__(self) -> int:
        n = self.num_examples()
        stop = n if self.stop is None else min(self.stop, n)
        return max(0, -(-(stop - self.start) // self.step))

    def __getitem__(self, index: int) -> dict:
        if not isinstance(index, int):
            raise TypeError(f"{type(self).__name__} index must be an int, got {type(index).__name__}")
        if not 0 <= index < len(self):
            raise IndexError(f"{type(self).__name__} index {index} out of range for {len(self)} examples")
        return self.get_example(self.start + index * self.step)

    def evaluate(self, conversation: dict, completion: str) -> int:
        raise NotImplementedError(f"{type(self).__name__} has no evaluation")

    def reward(self, conversation: dict, completion: str) -> float:
        """The RL reward: the evaluation outcome as a float."""
        return float(self.evaluate(conversation, completion))


class HubTask(Task):
    """A task over one split of a Hugging Face hub dataset (self.rows), or over rows in the hub's format given as
    `data` (kept in the given order). Subclasses name the dataset and its subsets and splits."""

    hub_path: str
    subsets: tuple = (None,)
    splits: tuple

    def __init__(self, subset: str | None, split: str, data: list[dict] | None = None, **kwargs):
        super().__init__(**kwargs)
        check_choice(self, "subset", subset, self.subsets)
        check_choice(self, "split", split, self.splits)
        self.subset, self.split = subset, split
        self.rows = data if data is not None else load_hub_rows(self.hub_path, subset, split)


class GeneratedTask(Task):
    """A task of `size` examples made on demand, in a train and a test split."""

    eval_type = "generative"

    def __init__(self, size: int = 1000, split: str = "train", **kwargs):
        super().__init__(**kwargs)
        check_choice(self, "split", split, ("train", "test"))
        if size < 1:
            raise ValueError(f"{type(self).__name__} size must be >= 1, got {size}")
        self.size, self.split = size, split

    def num_examples(self) -> int:
        return self.size


def check_choice(task: Task, what: str, value, allowed: tuple) -> None:
    """ValueError unless a task's `what` (its subset, split) is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{type(task).__name__} {what} must be one of {allowed}, got {value!r}")


class TaskMixture(Task):
    """All examples of several tasks in one fixed shuffled order (list a task twice to oversample it)."""

    def __init__(self, tasks: Sequence[Task], **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.index_map = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(MIX_SEED).shuffle(self.index_map)

    def num_examples(self) -> int:
        return len(self.index_map)

    def get_example(self, index: int) -> dict:
        t, i = self.index_map[index]
        return self.tasks[t][i]


class TaskSequence(Task):
    """The tasks one after another (a curriculum)."""

    def __init__(self, tasks: Sequence[Task], **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.lengths = [len(task) for task in self.tasks]

    def num_examples(self) -> int:
        return sum(self.lengths)

    def get_example(self, index: int) -> dict:
        for task, n in zip(self.tasks, self.lengths):
            if index < n:
                return task[index]
            index -= n
        raise IndexError(f"TaskSequence index out of range for {sum(self.lengths)} examples")


def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """The multiple-choice prompt: each choice followed by '=' and its letter (no space, so the letter is
    the same token the assistant answers with; small models bind a letter better when it follows the choice)."""
    lines = [f"Multiple Choice question: {question}\n"]
    lines += [f"- {choice}={letter}\n" for letter, choice in zip(letters, choices)]
    lines.append("\nRespond only with the letter of the correct answer.")
    return "".join(lines)


def evaluate_letter(conversation: dict, completion: str) -> int:
    """For multiple-choice tasks: the completion (one of the letters) against the reference answer."""
    letters = conversation["letters"]
    if completion not in letters:
        raise ValueError(f"completion {completion!r} is not one of the answer letters {list(letters)}")
    return int(completion == conversation["messages"][-1]["content"])


def load_hub_rows(path: str, name: str | None, split: str):
    """A hub dataset split, shuffled with a fixed seed; TaskDataError (one line) when it cannot be loaded.

    Without a network the hub client retries for about half a minute before giving up; with
    HF_HUB_OFFLINE=1 (and nothing cached) it fails at once.
    """
    import datasets

    try:
        ds = datasets.load_dataset(path, name, split=split)
    except Exception as e:  # network, missing cache, hub errors: all end up the same for the caller
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        what = f"{path}" + (f" ({name})" if name else "") + f" split {split!r}"
        raise TaskDataError(f"cannot load {what} from the Hugging Face hub (offline?): {type(e).__name__}: "
                            f"{reason}") from None
    return ds.shuffle(seed=HUB_SHUFFLE_SEED)


def read_jsonl(path: str | Path) -> list:
    """The JSON value on each non-empty line; TaskDataError naming the file and line on bad input."""
    return [row for _, row in read_jsonl_numbered(path)]


def read_jsonl_numbered(path: str | Path) -> list[tuple[int, object]]:
    """(line number, JSON value) for each non-empty line; TaskDataError naming the file and line on bad input."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file")
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TaskDataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    return rows
