"""ARC (AI2 Reasoning Challenge): grade-school science questions with 3-5 lettered choices.

Hub dataset allenai/ai2_arc, configs ARC-Easy / ARC-Challenge, splits train / validation / test.
Rows: {"question": str, "choices": {"text": [str], "label": [str]}, "answerKey": str}.
"""

from __future__ import annotations

from nanochat_jax.tasks.base import HubTask, TaskDataError, evaluate_letter, render_mc


class ARC(HubTask):
    eval_type = "categorical"
    hub_path, subsets, splits = "allenai/ai2_arc", ("ARC-Easy", "ARC-Challenge"), ("train", "validation", "test")

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

