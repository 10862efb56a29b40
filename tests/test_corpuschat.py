"""Generated chat tasks: grounded in the corpus text, deterministic, checkable; the named mixtures."""

import os
import subprocess
import sys

import pytest

from nanochat_jax import corpus
from nanochat_jax.calculator import calculate
from nanochat_jax.tasks import SimpleSpelling, SpellingBee, TaskMixture
from nanochat_jax.tasks.corpuschat import Identity, SmallTalk, WordProblems, WorldFacts
from nanochat_jax.tasks.mixtures import cpu_eval_tasks, mid_mixture, sft_mixture
from nanochat_jax.tokenizer import Tokenizer

PLURALS = {a[0]: a[1] for a in corpus.ANIMALS} | {f[0]: f[1] for f in corpus.FOODS}


@pytest.fixture(scope="module")
def corpus_lines():
    """Every line of the train documents, lower-cased, with each 'Q: ...' line joined to its 'A: ...' line."""
    lines = []
    for doc in corpus.documents("train"):
        lines += doc.lower().split("\n")
    return lines


def test_every_fact_is_stated_in_the_corpus(corpus_lines):
    """Each (subject, answer) pair asked about appears together on one line of the pretraining text."""
    pairs = {(c["subject"], c["answer_key"]) for split in ("train", "test")
             for c in (WorldFacts(1500, split)[i] for i in range(1500))}
    assert len(pairs) > 250  # the questions cover the world's tables
    missing = []
    for subject, key in sorted(pairs):
        names = {subject.lower(), PLURALS.get(subject, subject).lower()}
        if not any(key.lower() in line and any(n in line for n in names) for line in corpus_lines):
            missing.append((subject, key))
    assert not missing, missing[:10]


def test_facts_are_scored_on_the_key_answer():
    task = WorldFacts(200, "test")
    conv = next(task[i] for i in range(200) if task[i]["messages"][0]["content"].endswith("capital of Gorsica?"))
    assert conv["messages"][1]["content"] == "The capital of Gorsica is Belmonte."
    assert task.evaluate(conv, "The capital of Gorsica is Belmonte.") == 1
    assert task.evaluate(conv, "Belmonte!") == 1
    assert task.evaluate(conv, "The capital of Gorsica is Marisol.") == 0
    assert task.evaluate(conv, "Belmontes") == 0  # whole words only


def test_word_problems_use_the_calculator_and_end_with_the_answer():
    task = WordProblems(500, "train")
    for i in range(500):
        conv = task[i]
        text, python, output, closing = conv["messages"][1]["content"]
        assert [p["type"] for p in (text, python, output, closing)] == ["text", "python", "python_output", "text"]
        assert calculate(python["text"]) == output["text"]  # the tool really gives this output
        assert closing["text"].endswith(f"#### {output['text']}")
        assert task.evaluate(conv, f"so #### {output['text']}") == 1
        assert task.evaluate(conv, f"#### {int(output['text']) + 1}") == 0


def test_deterministic_and_splits_differ():
    for make in (WorldFacts, WordProblems, SmallTalk, Identity):
        a, b, test = make(50, "train"), make(50, "train"), make(50, "test")
        assert [a[i] for i in range(50)] == [b[i] for i in range(50)]
        assert [a[i] for i in range(50)] != [test[i] for i in range(50)]
    with pytest.raises(ValueError, match="split must be one of"):
        WorldFacts(10, "val")


def test_all_conversations_render():
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    for task in (WorldFacts(100), WordProblems(100), SmallTalk(100), Identity(100)):
        for i in range(len(task)):
            ids, mask = tok.render_conversation(task[i])
            assert sum(mask) > 0 and len(ids) == len(mask)
    talk = [SmallTalk(300)[i] for i in range(300)]
    assert max(len(c["messages"]) for c in talk) >= 6  # multi-turn
    identity = " ".join(str(Identity(50)[i]) for i in range(50))
    assert "I am nanochat-jax" in identity


def test_cpu_mixtures():
    mid, sft = mid_mixture("cpu", "train"), sft_mixture("cpu", "train")
    assert isinstance(mid, TaskMixture) and len(mid) == 8000 + 4000 + 3000 + 400 + 2 * 1000
    assert len(sft) == 2000 + 1000 + 800 + 200 + 2 * 300
    kinds = {type(t) for t in mid.tasks}
    assert kinds == {WorldFacts, WordProblems, SmallTalk, Identity, SimpleSpelling, SpellingBee}
    assert all(t.split == "test" for t in mid_mixture("cpu", "val").tasks)
    assert len(mid_mixture("cpu", "val")) == len(mid) // 20
    assert set(cpu_eval_tasks(8)) == {"WorldFacts", "WordProblems", "SimpleSpelling"}
    with pytest.raises(ValueError, match="unknown mid mixture 'web'; mid mixtures are: nanochat, cpu"):
        mid_mixture("web", "train")
    with pytest.raises(ValueError, match="unknown mid mixture 'master'"):  # master's mixture is its SFT's
        mid_mixture("master", "train")


def test_nanochat_mixture_offline_is_one_clear_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    code = ("from nanochat_jax.tasks.mixtures import sft_mixture\nfrom nanochat_jax.tasks import TaskDataError\n"
            "try:\n    sft_mixture('nanochat', 'train')\nexcept TaskDataError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("cannot load allenai/ai2_arc (ARC-Easy) split 'train' from the Hugging Face hub")
    assert out.stdout.count("\n") == 1


def test_facts_whose_subject_is_the_answer_need_the_answer():
    """'What colour is a ripe orange?' / 'What kind of animal is the fish?': restating the subject scored 1."""
    task = WorldFacts(2000, "test")
    orange = next(task[i] for i in range(2000) if task[i]["messages"][0]["content"].endswith("a ripe orange?"))
    assert task.evaluate(orange, "A ripe orange is orange.") == 1
    assert task.evaluate(orange, "A ripe orange is red.") == 0
    fish = next(task[i] for i in range(2000) if task[i]["messages"][0]["content"].endswith("animal is the fish?"))
    assert task.evaluate(fish, "The fish is a fish.") == 1
    assert task.evaluate(fish, "The fish is a mammal.") == 0
    for i in range(2000):  # every reference answer still scores 1
        assert task.evaluate(task[i], task[i]["messages"][-1]["content"]) == 1
