"""SmolTalk: general multi-turn conversations for SFT (the "smol" version, sized for small models).

Hub dataset HuggingFaceTB/smol-smoltalk, splits train (about 460K rows) / test (about 24K). Rows:
{"messages": [{"role", "content"}, ...]}: an optional system message, then user and assistant turns
alternating, starting with the user. Training data only: there is no evaluation.
"""

from __future__ import annotations

from nanochat_jax.tasks.base import HubTask, TaskDataError


def check_chat(messages, where: str) -> None:
    """TaskDataError naming `where` unless messages are [system?] user, assistant, user, ... with string contents."""
    if not isinstance(messages, list) or not messages:
        raise TaskDataError(f"{where}: expected a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise TaskDataError(f"{where}: message {i} must be an object with a 'role' and a string 'content'")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if len(turns) < 2:
        raise TaskDataError(f"{where}: needs at least a user and an assistant message, got {len(turns)} turns")
    offset = len(messages) - len(turns)
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise TaskDataError(f"{where}: message {i + offset} has role {m['role']!r}, expected {expected!r}")


class SmolTalk(HubTask):
    eval_type = "generative"
    hub_path, splits = "HuggingFaceTB/smol-smoltalk", ("train", "test")

    def __init__(self, split: str, data: list[dict] | None = None, **kwargs):
        super().__init__(None, split, data, **kwargs)

    def get_example(self, index: int) -> dict:
        messages = self.rows[index]["messages"]
        check_chat(messages, f"SmolTalk row {index}")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
