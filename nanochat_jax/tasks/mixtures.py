"""The named training mixtures of the chat stages: mid_mixture(name, split) and sft_mixture(name, split).

- "nanochat": nanochat's hub datasets (needs the network or a populated Hugging Face cache; offline the
  first task that cannot load raises its one-line TaskDataError).
  mid train: SmolTalk train (~460K) + MMLU auxiliary_train (~100K) + GSM8K main train (~8K);
  mid val: SmolTalk test + MMLU test[:5200] + GSM8K main test[:420] (about the train ratios);
  sft train: ARC-Easy train + ARC-Challenge train + GSM8K main train + SmolTalk train[:10000];
  sft val: SmolTalk test.
- "master": nanochat master's single post-training stage (SFT from the base model, sft.recipe = "master"):
  sft train: SmolTalk train + MMLU auxiliary_train x3 + GSM8K main train x4; sft val: as nanochat's mid val.
- "cpu": generated offline from the embedded corpus's world (tasks/corpuschat.py) plus the spelling tasks,
  sized for minutes of CPU training.
"""

from __future__ import annotations

from nanochat_jax.tasks.arc import ARC
from nanochat_jax.tasks.base import Task, TaskDataError, TaskMixture
from nanochat_jax.tasks.corpuschat import Identity, SmallTalk, WordProblems, WorldFacts
from nanochat_jax.tasks.gsm8k import GSM8K
from nanochat_jax.tasks.mmlu import MMLU
from nanochat_jax.tasks.smoltalk import SmolTalk
from nanochat_jax.tasks.spellingbee import SimpleSpelling, SpellingBee

MIXTURES = {"mid": ("nanochat", "cpu"), "sft": ("nanochat", "cpu", "master")}
SPLITS = ("train", "val")
VAL_FRACTION = 20  # the cpu mixtures' val split is 1/20 the size of train


def _check(stage: str, name: str, split: str) -> None:
    if name not in MIXTURES[stage]:
        raise ValueError(f"unknown {stage} mixture {name!r}; {stage} mixtures are: {', '.join(MIXTURES[stage])}")
    if split not in SPLITS:
        raise ValueError(f"mixture split must be one of {SPLITS}, got {split!r}")


def _cpu_tasks(split: str, facts: int, arithmetic: int, talk: int, identity: int, spelling: int) -> list[Task]:
    task_split = "train" if split == "train" else "test"
    div = 1 if split == "train" else VAL_FRACTION
    return [WorldFacts(max(1, facts // div), task_split), WordProblems(max(1, arithmetic // div), task_split),
            SmallTalk(max(1, talk // div), task_split), Identity(max(1, identity // div), task_split),
            SimpleSpelling(max(1, spelling // div), task_split), SpellingBee(max(1, spelling // div), task_split)]


def _offline_hint(stage: str, build):
    """build(); a hub task that cannot load gets the command-line way out added to its message."""
    try:
        return build()
    except TaskDataError as e:
        raise TaskDataError(f"{e}; without the hub, --{stage}.mixture=cpu trains on conversations generated from "
                            "the embedded corpus") from None


def mid_mixture(name: str, split: str) -> Task:
    """The mid-training conversations of a mixture ('nanochat' | 'cpu') and split ('train' | 'val')."""
    _check("mid", name, split)
    if name == "cpu":
        return TaskMixture(_cpu_tasks(split, facts=8000, arithmetic=4000, talk=3000, identity=400, spelling=1000))
    return _offline_hint("mid", lambda: _nanochat_mid(split))


def _nanochat_mid(split: str, mmlu_epochs: int = 1, gsm8k_epochs: int = 1) -> Task:
    if split == "train":
        return TaskMixture([SmolTalk(split="train"),
                            *[MMLU(subset="all", split="auxiliary_train") for _ in range(mmlu_epochs)],
                            *[GSM8K(subset="main", split="train") for _ in range(gsm8k_epochs)]])
    return TaskMixture([SmolTalk(split="test"), MMLU(subset="all", split="test", stop=5200),
                        GSM8K(subset="main", split="test", stop=420)])


def sft_mixture(name: str, split: str) -> Task:
    """The SFT conversations of a mixture ('nanochat' | 'cpu' | 'master') and split ('train' | 'val')."""
    _check("sft", name, split)
    if name == "master":  # nanochat master's chat_sft defaults: --mmlu-epochs 3 --gsm8k-epochs 4
        return _offline_hint("sft", lambda: _nanochat_mid(split, mmlu_epochs=3, gsm8k_epochs=4))
    if name == "cpu":
        return TaskMixture(_cpu_tasks(split, facts=2000, arithmetic=1000, talk=800, identity=200, spelling=300))
    if split == "train":
        return _offline_hint("sft", lambda: TaskMixture([ARC(subset="ARC-Easy", split="train"),
                                                         ARC(subset="ARC-Challenge", split="train"),
                                                         GSM8K(subset="main", split="train"),
                                                         SmolTalk(split="train", stop=10_000)]))
    return _offline_hint("sft", lambda: SmolTalk(split="test"))


def cpu_eval_tasks(max_problems: int = 0) -> dict[str, Task]:
    """The checkable test tasks of the cpu mixture (for quick accuracies during SFT and in chat_eval)."""
    size = max_problems or 200
    return {"WorldFacts": WorldFacts(size, "test"), "WordProblems": WordProblems(size, "test"),
            "SimpleSpelling": SimpleSpelling(size, "test")}
