"""Tasks: exact renderings of fixture rows, scoring of right and wrong completions, slicing, mixtures,
and the one-line error when a hub dataset cannot be loaded."""

import collections
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat_jax.calculator import calculate
from nanochat_jax.tasks import (ARC, GSM8K, MMLU, CustomJSON, HumanEval, SimpleSpelling, SmolTalk, SpellingBee,
                                Task, TaskDataError, TaskMixture, TaskSequence, render_mc)
from nanochat_jax.tasks.base import read_jsonl
from nanochat_jax.tasks.gsm8k import answer_to_parts, extract_answer
from nanochat_jax.tasks.humaneval import extract_imports, extract_program
from nanochat_jax.tasks.spellingbee import WORDS, counting_parts
from nanochat_jax.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"


class Numbers(Task):
    """A toy task whose example i is {"messages": [], "i": i}, for slicing and mixing tests."""

    def __init__(self, n, tag="", **kwargs):
        super().__init__(**kwargs)
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [], "i": f"{self.tag}{index}"}


# ----- base: slicing, mixtures, sequences, multiple choice


def test_slicing_start_stop_step():
    t = Numbers(10, start=2, stop=9, step=3)
    assert len(t) == 3 and [x["i"] for x in t] == ["2", "5", "8"]
    assert len(Numbers(10, start=4)) == 6 and len(Numbers(3, stop=100)) == 3 and len(Numbers(5, start=7)) == 0
    with pytest.raises(IndexError):
        t[3]
    with pytest.raises(TypeError):
        t[0:2]
    for bad in [dict(start=-1), dict(start=5, stop=4), dict(step=0)]:
        with pytest.raises(ValueError):
            Numbers(10, **bad)


def test_mixture_is_a_fixed_shuffle_covering_every_example():
    tasks = [Numbers(5, "a"), Numbers(3, "b"), Numbers(5, "a")]  # 'a' listed twice: oversampled
    mix = TaskMixture(tasks)
    items = [x["i"] for x in mix]
    assert items == [x["i"] for x in TaskMixture(tasks)]  # deterministic
    assert collections.Counter(items) == collections.Counter([f"a{i}" for i in range(5)] * 2 + ["b0", "b1", "b2"])
    # independent reference: the (task, index) list shuffled by random.Random(42)
    ref = [(t, i) for t, n in enumerate([5, 3, 5]) for i in range(n)]
    random.Random(42).shuffle(ref)
    assert items == [f"{'aba'[t]}{i}" for t, i in ref]
    assert items != [x["i"] for x in TaskSequence(tasks)]
    assert [x["i"] for x in TaskMixture(tasks, start=2, step=4)] == items[2::4]


def test_sequence_concatenates():
    seq = TaskSequence([Numbers(2, "a"), Numbers(0, "z"), Numbers(3, "b")])
    assert [x["i"] for x in seq] == ["a0", "a1", "b0", "b1", "b2"]


def test_render_mc():
    assert render_mc("2+2?", ["A", "B"], ["3", "4"]) == (
        "Multiple Choice question: 2+2?\n- 3=A\n- 4=B\n\nRespond only with the letter of the correct answer.")


# ----- multiple choice tasks


def test_arc_rendering_and_scoring():
    task = ARC(data=read_jsonl(FIXTURES / "arc.jsonl"), subset="ARC-Easy", split="test")
    assert len(task) == 3 and task.eval_type == "categorical"
    conv = task[0]
    assert conv == {
        "messages": [
            {"role": "user", "content": "Multiple Choice question: Which tool is best for measuring the length of a "
                                        "pencil?\n- a thermometer=A\n- a ruler=B\n- a balance=C\n- a stopwatch=D\n\n"
                                        "Respond only with the letter of the correct answer."},
            {"role": "assistant", "content": "B"},
        ],
        "letters": ["A", "B", "C", "D"],
    }
    assert task.evaluate(conv, "B") == 1 and task.evaluate(conv, "A") == 0 and task.reward(conv, "B") == 1.0
    with pytest.raises(ValueError, match="not one of the answer letters"):
        task.evaluate(conv, "E")
    assert task[1]["letters"] == ["1", "2", "3"] and task[1]["messages"][1]["content"] == "2"
    assert task.evaluate(task[1], "2") == 1 and task.evaluate(task[1], "3") == 0
    assert len(task[2]["letters"]) == 5
    with pytest.raises(ValueError, match="ARC subset"):
        ARC("ARC-Hard", "test", data=[])


def test_mmlu_rendering_and_scoring():
    task = MMLU(data=read_jsonl(FIXTURES / "mmlu.jsonl"), subset="all", split="auxiliary_train")
    conv = task[1]
    assert conv == {
        "messages": [
            {"role": "user", "content": "Multiple Choice question: Which planet is closest to the Sun?\n- Venus=A\n"
                                        "- Earth=B\n- Mercury=C\n- Mars=D\n\nRespond only with the letter of the "
                                        "correct answer."},
            {"role": "assistant", "content": "C"},
        ],
        "subject": "astronomy",
        "letters": ["A", "B", "C", "D"],
    }
    assert [task.evaluate(conv, letter) for letter in "ABCD"] == [0, 0, 1, 0]
    assert [task[i]["messages"][1]["content"] for i in range(3)] == ["B", "C", "A"]
    rows = [json.loads(line) for line in (FIXTURES / "mmlu.jsonl").read_text().splitlines()]
    assert MMLU("all", "auxiliary_train", data=[{"train": r} for r in rows])[1] == conv  # wrapped rows unwrapped
    with pytest.raises(TaskDataError, match="MMLU row 0"):
        MMLU("all", "test", data=[dict(rows[0], answer=4)])[0]


# ----- generative tasks


def test_gsm8k_annotations_become_python_calls():
    task = GSM8K(data=read_jsonl(FIXTURES / "gsm8k.jsonl"), subset="main", split="test")
    assert task.eval_type == "generative"
    assert task[0] == {"messages": [
        {"role": "user", "content": "Mia buys 3 packs of stickers with 12 stickers each. She gives away 10. "
                                    "How many stickers does she have left?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Mia buys 3*12="},
            {"type": "python", "text": "3*12"},
            {"type": "python_output", "text": "36"},
            {"type": "text", "text": "36 stickers.\nAfter giving some away she has 36-10="},
            {"type": "python", "text": "36-10"},
            {"type": "python_output", "text": "26"},
            {"type": "text", "text": "26 stickers.\n#### 26"},
        ]},
    ]}
    assert answer_to_parts("<<5>>x") == [{"type": "python", "text": "5"}, {"type": "python_output", "text": ""},
                                         {"type": "text", "text": "x"}]
    # the calculator reproduces every annotated result
    for part_a, part_b in zip(task[0]["messages"][1]["content"], task[0]["messages"][1]["content"][1:]):
        if part_a["type"] == "python":
            assert calculate(part_a["text"]) == part_b["text"]


def test_gsm8k_renders_with_the_tokenizer():
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    ids, mask = tok.render_conversation(GSM8K(data=read_jsonl(FIXTURES / "gsm8k.jsonl"), subset="main", split="test")[0])
    sp = tok.encode_special
    start, end = ids.index(sp("<|python_start|>")), ids.index(sp("<|python_end|>"))
    assert tok.decode(ids[start + 1:end]) == "3*12" and set(mask[start:end + 1]) == {1}
    ostart, oend = ids.index(sp("<|output_start|>")), ids.index(sp("<|output_end|>"))
    assert ostart == end + 1 and tok.decode(ids[ostart + 1:oend]) == "36" and set(mask[ostart:oend + 1]) == {0}


def test_gsm8k_scoring():
    task = GSM8K(data=read_jsonl(FIXTURES / "gsm8k.jsonl"), subset="main", split="test")
    conv = task[0]
    assert task.evaluate(conv, "She has 26 left.\n#### 26") == 1
    assert task.evaluate(conv, "#### 25") == 0
    assert task.evaluate(conv, "The answer is 26") == 0  # no final-answer marker
    assert task.evaluate(task[1], "so #### 3000") == 1 and task.evaluate(task[1], "#### 3,000") == 1
    assert extract_answer("#### -1,234.5 dollars") == "-1234.5" and extract_answer("nothing") is None


def test_gsm8k_scores_the_models_answer_not_a_calculator_output():
    """The calculator evaluates string literals, so its output can read '#### n': that is not the model's answer
    (it used to be taken first, scoring a completion that ends '#### 25' as 26)."""
    task = GSM8K(data=read_jsonl(FIXTURES / "gsm8k.jsonl"), subset="main", split="test")
    expr = "'####' + ' 26'"
    assert calculate(expr) == "#### 26"
    call = f"<|python_start|>{expr}<|python_end|><|output_start|>{calculate(expr)}<|output_end|>"
    assert task.evaluate(task[0], call + "So she has 25 left.\n#### 25") == 0
    assert task.evaluate(task[0], call.replace("26", "25") + "So she has 26 left.\n#### 26") == 1
    assert task.reward(task[0], f"It is 26 {call.replace('<|output_end|>', '')}") == 0.0  # output cut by max_tokens


def test_humaneval_rendering_and_scoring():
    task = HumanEval(data=read_jsonl(FIXTURES / "humaneval.jsonl"), timeout=3.0)
    row = json.loads((FIXTURES / "humaneval.jsonl").read_text().splitlines()[0])
    conv = task[0]
    assert conv == {"messages": [{"role": "user", "content": row["prompt"]},
                                 {"role": "assistant", "content": row["prompt"] + "\n" + row["canonical_solution"]}],
                    "entry_point": "total_even", "test": row["test"]}
    assert task.evaluate(conv, conv["messages"][1]["content"]) == 1
    fenced = ("Here you go:\n```python\ndef total_even(numbers: List[int]) -> int:\n"
              "    return sum(x for x in numbers if not x % 2)\n```\nHope it helps.")
    assert task.evaluate(conv, fenced) == 1  # code block extracted, `List` import taken from the prompt
    assert task.evaluate(conv, "def total_even(numbers):\n    return sum(numbers)\n") == 0
    assert task.evaluate(conv, "def total_even(numbers):\n    while True:\n        pass\n") == 0
    assert task.evaluate(task[1], "```\ndef shout(text):\n    return text.upper() + '!'\n```") == 1
    assert task.evaluate(task[1], "def shout(text): return text + '!'") == 0


def test_humaneval_extraction():
    assert extract_imports("# header\nimport math\n\nfrom typing import List\ndef f():\n    import os\n") == \
        "import math\nfrom typing import List"
    assert extract_program("a\n```python\nx = 1\n```\nb\n```python\ny = 2\n```") == "x = 1"
    assert extract_program("  y = 2\n") == "y = 2"


def test_smoltalk_rendering():
    task = SmolTalk(data=read_jsonl(FIXTURES / "smoltalk.jsonl"), split="train")
    assert task.eval_type == "generative" and len(task) == 2
    assert task[1] == {"messages": [{"role": "system", "content": "You answer in one word."},
                                    {"role": "user", "content": "Capital of France?"},
                                    {"role": "assistant", "content": "Paris."}]}
    assert len(task[0]["messages"]) == 4
    with pytest.raises(NotImplementedError, match="SmolTalk has no evaluation"):
        task.evaluate(task[0], "Cheerful.")
    bad = SmolTalk("train", data=[{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "?"}]}])
    with pytest.raises(TaskDataError, match="SmolTalk row 0: message 1 has role 'user', expected 'assistant'"):
        bad[0]


def test_spellingbee_exact_answer():
    assert counting_parts("kayak", "k") == [
        {"type": "text", "text": "We need the number of 'k' in the word 'kayak'. Counting by hand first.\n\n"
                                 "Spelled out:\nkayak:k,a,y,a,k\n\nGoing through the letters looking for 'k':\n"
                                 "1:k hit! count=1\n2:a\n3:y\n4:a\n5:k hit! count=2\n\nBy hand that makes 2."},
        {"type": "text", "text": "\n\nChecking with Python:\n\n"},
        {"type": "python", "text": "'kayak'.count('k')"},
        {"type": "python_output", "text": "2"},
        {"type": "text", "text": "\n\nPython also says 2.\n\nMy final answer is:\n\n#### 2"},
    ]


def test_spellingbee_is_deterministic_correct_and_scored():
    train, test = SpellingBee(size=200, split="train"), SpellingBee(size=200, split="test")
    assert len(train) == 200 and [train[i] for i in range(5)] == [SpellingBee(size=5)[i] for i in range(5)]
    assert [train[i] for i in range(20)] != [test[i] for i in range(20)]
    for conv in [train[i] for i in range(200)] + [test[i] for i in range(50)]:
        parts = conv["messages"][1]["content"]
        call, output = parts[2]["text"], parts[3]["text"]
        word, letter = call.split("'")[1], call.split("'")[3]
        assert word in WORDS and output == str(word.count(letter)) and calculate(call) == output
        assert letter in conv["messages"][0]["content"] and word in conv["messages"][0]["content"]
        assert train.evaluate(conv, f"... so\n#### {output}") == 1
        assert train.evaluate(conv, f"#### {int(output) + 1}") == 0
    assert 300 <= len(WORDS) == len(set(WORDS)) and all(w.isalpha() and w.islower() and w.isascii() for w in WORDS)


def test_simple_spelling():
    task = SimpleSpelling(size=3, words=["cat"])
    assert task[2] == {"messages": [{"role": "user", "content": "Spell the word: cat"},
                                    {"role": "assistant", "content": "cat:c,a,t"}]}
    assert task.evaluate(task[0], " cat:c,a,t\n") == 1 and task.evaluate(task[0], "cat:c,a,t,t") == 0
    assert len({SimpleSpelling(size=50)[i]["messages"][0]["content"] for i in range(50)}) > 30
    with pytest.raises(ValueError, match="lowercase a-z"):
        SimpleSpelling(words=["it's"])


def test_customjson_loads_and_validates(tmp_path):
    task = CustomJSON(FIXTURES / "identity.jsonl")
    assert len(task) == 3 and task.eval_type == "generative"
    assert task[0] == {"messages": [{"role": "user", "content": "Who are you?"},
                                    {"role": "assistant", "content": "I am nanochat-jax, a small chat model trained with JAX."}]}
    assert task[2]["messages"][0]["content"] == "What can you do?"  # {"messages": [...]} lines accepted too
    good = json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    cases = {
        "not json": ("{oops", r":2: invalid JSON"),
        "role order": (json.dumps([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]),
                       r":2: message 0 has role 'assistant', expected 'user'"),
        "too short": (json.dumps([{"role": "user", "content": "a"}]), r":2: needs at least a user and an assistant"),
        "content type": (json.dumps([{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]),
                         r":2: message 0 must be an object with a 'role' and a string 'content'"),
    }
    for name, (line, message) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.jsonl"
        path.write_text(good + "\n\n" + line + "\n" if name == "not json" else good + "\n" + line + "\n")
        expected = message.replace(":2:", ":3:") if name == "not json" else message
        with pytest.raises(TaskDataError, match=f"{path.name}{expected}"):
            CustomJSON(path)
    with pytest.raises(TaskDataError, match="no such file"):
        CustomJSON(tmp_path / "missing.jsonl")


# ----- loading from the hub


@pytest.mark.parametrize("make, dataset", [
    (lambda: ARC("ARC-Challenge", "test"), "allenai/ai2_arc (ARC-Challenge) split 'test'"),
    (lambda: MMLU("all", "auxiliary_train"), "cais/mmlu (all) split 'auxiliary_train'"),
    (lambda: GSM8K("main", "train"), "openai/gsm8k (main) split 'train'"),
    (lambda: HumanEval(), "openai/openai_humaneval split 'test'"),
    (lambda: SmolTalk("train"), "HuggingFaceTB/smol-smoltalk split 'train'"),
])
def test_hub_failure_is_one_clear_line(monkeypatch, make, dataset):
    import datasets

    calls = []

    def unreachable(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)\nmore details")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(TaskDataError) as err:
        make()
    message = str(err.value)
    assert "\n" not in message and err.value.__cause__ is None and err.value.__suppress_context__
    assert message.startswith(f"cannot load {dataset} from the Hugging Face hub (offline?): ConnectionError: ")
    assert "more details" not in message and len(calls) == 1


def test_offline_mixture_names_the_command_line_way_out(monkeypatch):
    import datasets

    from nanochat_jax.tasks.mixtures import mid_mixture, sft_mixture

    def unreachable(path, name=None, split=None, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    for stage, build in (("mid", mid_mixture), ("sft", sft_mixture)):
        with pytest.raises(TaskDataError, match=rf"^cannot load .* \(offline\?\): ConnectionError: Couldn't reach the "
                                                rf"Hub; without the hub, --{stage}.mixture=cpu trains on conversations"):
            build("nanochat", "train")


def test_hub_offline_for_real_fails_fast(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    code = ("from nanochat_jax.tasks import GSM8K, TaskDataError\n"
            "try:\n    GSM8K('main', 'test')\nexcept TaskDataError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("cannot load openai/gsm8k (main) split 'test' from the Hugging Face hub (offline?): ")
    assert out.stdout.count("\n") == 1


def test_nanochat_mixtures_build_and_render_from_a_fake_hub(monkeypatch):
    """mid_train's and chat_sft's 'nanochat' mixtures (what run_gpu.sh trains on), built from fixture rows served
    as hub datasets: every task loads its split, and every conversation renders with a loss mask that trains
    assistant tokens only."""
    import datasets

    from nanochat_jax.tasks.mixtures import mid_mixture, sft_mixture

    fixture = {"allenai/ai2_arc": "arc", "cais/mmlu": "mmlu", "openai/gsm8k": "gsm8k",
               "HuggingFaceTB/smol-smoltalk": "smoltalk"}
    loaded = []

    def fake_hub(path, name=None, split=None, **kwargs):
        loaded.append((path, name, split))
        rows = [json.loads(line) for line in (FIXTURES / f"{fixture[path]}.jsonl").read_text().splitlines()]
        if (path, split) == ("cais/mmlu", "auxiliary_train"):
            rows = [{"train": row} for row in rows]  # the hub nests that split's rows
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    tok = Tokenizer.train_from_iterator(["The quick brown fox 0123456789 jumps."] * 5, vocab_size=300)
    for make in (mid_mixture, sft_mixture):
        for split in ("train", "val"):
            mixture = make("nanochat", split)
            assert len(mixture) > 0
            for i in range(len(mixture)):
                ids, mask = tok.render_conversation(mixture[i])
                assert len(ids) == len(mask) and 0 < sum(mask) < len(ids)
    assert {path for path, _, _ in loaded} == set(fixture)
    assert ("cais/mmlu", "all", "auxiliary_train") in loaded and ("allenai/ai2_arc", "ARC-Challenge", "train") in loaded
