"""MMLU: four-choice questions over 57 subjects.

Hub dataset cais/mmlu, config "all", splits auxiliary_train (about 100K rows, for training) / validation /
dev / test. Rows: {"question": str, "subject": str, "choices": [4 str], "answer": int 0-3}. Some copies of
auxiliary_train wrap each row as {"train": row}; those are unwrapped.
"""

from __future__ import annotations

from nanochat_jax.tasks.base import HubTask, TaskDataError, evaluate_letter, render_mc

LETTERS = ("A", "B", "C", "D")


class MMLU(HubTask):
    eval_type = "categorical"
    hub_path, subsets, splits = "cais/mmlu", ("all",), ("auxiliary_train", "validation", "dev", "test")
    letters = LETTERS

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        if set(row) == {"train"}:
            row = row["train"]
        if len(row["choices"]) != 4 or row["answer"] not in range(4):
            raise TaskDataError(f"MMLU row {index}: expected 4 choices and an answer in 0-3, "
                                f"got {len(row['choices'])} choices and answer {row['answer']!r}")
        messages = [
            {"role": "user", "content": render_mc(row["question"], LETTERS, row["choices"])},
            {"role": "assistant", "content": LETTERS[row["answer"]]},
        ]
        return {"messages": messages, "subject": row["subject"], "letters": list(LETTERS)}

    def evaluate(self, conversation: dict, completion: str) -> int:
        """1 if the completion is the correct letter, else 0 (it must be one of A-D)."""
        return evaluate_letter(conversation, completion)
