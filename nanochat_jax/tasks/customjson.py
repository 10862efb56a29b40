"""Conversations from a local JSONL file (e.g. the identity conversations that teach the model who it is).

Each non-empty line is a JSON array of messages [{"role": "user", "content": ...}, {"role": "assistant",
...}, ...] (or an object {"messages": [...]}): an optional system message, then user and assistant turns
alternating, starting with the user, all contents strings. Every line is checked when the file is read;
errors name the file and line.
"""

from __future__ import annotations

from pathlib import Path

from nanochat_jax.tasks.base import Task, read_jsonl_numbered
from nanochat_jax.tasks.smoltalk import check_chat


class CustomJSON(Task):
    eval_type = "generative"

    def __init__(self, filepath: str | Path, **kwargs):
        super().__init__(**kwargs)
        self.filepath = Path(filepath)
        self.conversations = []
        for lineno, row in read_jsonl_numbered(self.filepath):
            messages = row.get("messages") if isinstance(row, dict) else row
            check_chat(messages, f"{self.filepath}:{lineno}")
            self.conversations.append(messages)

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return {"messages": self.conversations[index]}

