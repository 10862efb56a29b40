"""Tasks: datasets of conversations for mid-training, SFT and evaluation (see base.py for the interface)."""

from nanochat_jax.tasks.arc import ARC
from nanochat_jax.tasks.base import Task, TaskDataError, TaskMixture, TaskSequence, render_mc
from nanochat_jax.tasks.customjson import CustomJSON
from nanochat_jax.tasks.gsm8k import GSM8K
from nanochat_jax.tasks.humaneval import HumanEval
from nanochat_jax.tasks.mmlu import MMLU
from nanochat_jax.tasks.smoltalk import SmolTalk
from nanochat_jax.tasks.spellingbee import SimpleSpelling, SpellingBee

__all__ = ["ARC", "CustomJSON", "GSM8K", "HumanEval", "MMLU", "SimpleSpelling", "SmolTalk", "SpellingBee",
           "Task", "TaskDataError", "TaskMixture", "TaskSequence", "render_mc"]
