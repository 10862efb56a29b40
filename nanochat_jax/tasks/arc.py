"""ARC (AI2 Reasoning Challenge): grade-school science questions with 3-5 lettered choices.

Hub dataset allenai/ai2_arc, configs ARC-Easy / ARC-Challenge, splits train / validation / test.
Rows: {"question": str, "choices": {"text": [str], "label": [str]}, "answerKey": str}.
"""

from __future__ import annotations

from nanochat_jax.tasks.base import Task, TaskDataError, evaluate_letter, load_hub_rows, render_mc

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset: str, split: str, data: list[dict] | None = None, **kwargs):
        """`data`: rows in the hub format to use instead of the hub (kept in the given order)."""
        super().__init__(**kwargs)
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset must be one of {SUBSETS}, got {subset!r}")
        if split not in SPLITS:
            raise ValueError(f"ARC split must be one of {SPLITS}, got {split!r}")
        self.subset, self.split = subset, split
        self.rows = data if data is not None else load_hub_rows("allenai/ai2_arc", subset, split)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        letters, choices, answer = row["choices"]["label"], row["choices"]["text"], row["answerKey"]
        if answer not in letters:
            raise TaskDataError(f"ARC row {index}: answerKey {answer!r} is not one of the labels {letters}")
        messages = [
            {"role": "user", "content": render_mc(row["question"], letters, choices)},
            {"role": "assistant", "content": answer},
        ]
        return {"messages": messages, "letters": list(letters)}

    def evaluate(self, conversation: dict, completion: str) -> int:
        """1 if the completion is the correct letter, else 0 (it must be one of conversation['letters'])."""
        return evaluate_letter(conversation, completion)

