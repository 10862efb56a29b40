"""HumanEval: 164 Python functions to complete, checked by running their unit tests.

Hub dataset openai/openai_humaneval, split test. Rows: {"task_id", "prompt" (imports, signature and
docstring), "canonical_solution" (the body), "test" (defines check(candidate)), "entry_point"}.
A completion is scored by running prompt imports + the completion's code + the tests in the sandbox of
nanochat_jax.execution.
"""

from __future__ import annotations

import re

from nanochat_jax.execution import execute_code
from nanochat_jax.tasks.base import HubTask

CODE_BLOCK_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def extract_imports(prompt: str) -> str:
    """The import lines at the top of a prompt (blank and comment lines skipped, stop at the first other line)."""
    imports = []
    for line in prompt.splitlines():
        line = line.strip()
        if line.startswith(("import ", "from ")):
            imports.append(line)
        elif line and not line.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion: str) -> str:
    """The first ```python (or bare ```) block of a completion, else the whole completion, stripped."""
    match = CODE_BLOCK_RE.search(completion)
    return (match.group(1) if match else completion).strip()


def build_program(conversation: dict, completion: str) -> str:
    """The test program: the prompt's imports, the completion's code, the tests, and the call to check()."""
    imports = extract_imports(conversation["messages"][0]["content"])
    return (f"{imports}\n\n{extract_program(completion)}\n\n{conversation['test']}\n"
            f"check({conversation['entry_point']})\n")


class HumanEval(HubTask):
    eval_type = "generative"
    hub_path, splits = "openai/openai_humaneval", ("test",)

    def __init__(self, data: list[dict] | None = None, timeout: float = 5.0, **kwargs):
        """`timeout`: seconds per test program."""
        super().__init__(None, "test", data, **kwargs)
        self.timeout = timeout

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        messages = [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},
        ]
        return {"messages": messages, "entry_point": row["entry_point"], "test": row["test"]}

    def evaluate(self, conversation: dict, completion: str) -> int:
        """1 if the completion's code passes the problem's tests in the sandbox, else 0."""
        return int(execute_code(build_program(conversation, completion), timeout=self.timeout).success)
