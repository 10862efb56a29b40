"""GSM8K: grade-school math word problems whose worked answers use a calculator.

Hub dataset openai/gsm8k, configs main / socratic, splits train / test. Rows: {"question": str,
"answer": str}; the answer interleaves prose with calculator annotations "<<48/2=24>>" and ends with
"#### 72". Each annotation becomes a python tool call (the expression) followed by its output (the
result), which is how our assistant uses its calculator.
"""

from __future__ import annotations

import re

from nanochat_jax.tasks.base import HubTask

ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
CALC_RE = re.compile(r"(<<[^>]+>>)")
# a calculator output in a decoded completion (to its end when max_tokens cut it short): written by the tool, not the model
TOOL_OUTPUT_RE = re.compile(r"<\|output_start\|>.*?(?:<\|output_end\|>|$)", re.S)


def extract_answer(text: str) -> str | None:
    """The number after '#### ' with thousands commas removed (the official GSM8K normalisation), or None."""
    match = ANSWER_RE.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def answer_to_parts(answer: str) -> list[dict]:
    """The worked answer as assistant parts: text, with each <<expr=result>> as a python call and its output."""
    parts = []
    for piece in CALC_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, _, result = piece[2:-2].rpartition("=")
            if not _:  # no '=': the whole annotation is the expression
                expr, result = result, ""
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def reference_answer(conversation: dict) -> str | None:
    """The '#### n' number of the reference answer's last part (None when it has none)."""
    reference = conversation["messages"][-1]["content"]
    return extract_answer(reference[-1]["text"] if isinstance(reference, list) else reference)


def evaluate_final_number(conversation: dict, completion: str) -> int:
    """1 if the completion's '#### n' matches the one in the reference answer's last part, else 0. Calculator outputs
    in the completion are not the model's answer: the calculator evaluates string literals ('#### 7' prints #### 7)."""
    return int(extract_answer(TOOL_OUTPUT_RE.sub("", completion)) == reference_answer(conversation))


class GSM8K(HubTask):
    eval_type = "generative"
    hub_path, subsets, splits = "openai/gsm8k", ("main", "socratic"), ("train", "test")

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        messages = [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": answer_to_parts(row["answer"])},
        ]
        return {"messages": messages}

    def evaluate(self, conversation: dict, completion: str) -> int:
        """1 if the completion's final '#### n' equals the reference number, else 0."""
        return evaluate_final_number(conversation, completion)
