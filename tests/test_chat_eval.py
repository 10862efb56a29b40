"""Chat evals: categorical scoring from the letters' logits at the answer position (bigram stub, padded
batches, a mesh), pass@k, ChatCORE arithmetic, task loading, and the base_eval / chat_eval scripts on a
tiny checkpoint (including unavailable tasks and the offline bundle error)."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nanochat_jax.chat_eval import (BASELINES, CHAT_TASKS, chatcore, letter_token_ids, load_task, make_answer_logits,
                                    pass_at_k, run_categorical_eval, run_generative_eval)
from nanochat_jax.checkpoint import CheckpointError
from nanochat_jax.core_eval import BundleError, evaluate_core, make_scorer
from nanochat_jax.config import Config, ModelConfig, to_dict
from nanochat_jax.model import Linear, init_model
from nanochat_jax.tasks import ARC, MMLU, Task, TaskDataError
from nanochat_jax.tasks.base import read_jsonl
from nanochat_jax.tokenizer import Tokenizer
from conftest import load_script

ROOT = Path(__file__).parent.parent
TASKS = ROOT / "tests" / "fixtures" / "tasks"
V = 256 + 9


@pytest.fixture(scope="module")
def tok():
    return Tokenizer({bytes([i]): i for i in range(256)})


def letter_stub(tok):
    """Bigram logits: after <|assistant_start|>, 'Z' > 'B' > '3' > everything else; after <|bos|> (the
    padding), 'A' and '1' are highest. So reading a padded position would answer 'A' / '1'."""
    table = np.zeros((V, V), np.float32)
    start = tok.encode_special("<|assistant_start|>")
    table[start, ord("Z")], table[start, ord("B")], table[start, ord("3")] = 9.0, 5.0, 4.0
    table[tok.bos_token_id, ord("A")] = table[tok.bos_token_id, ord("1")] = 50.0
    table = jnp.asarray(table)
    return lambda tokens: table[tokens]


def test_categorical_picks_the_highest_letter_logit(tok, make_mesh):
    arc = ARC(data=read_jsonl(TASKS / "arc.jsonl"), subset="ARC-Easy", split="test")  # answers B, 2, B
    mmlu = MMLU(data=read_jsonl(TASKS / "mmlu.jsonl"), subset="all", split="test")  # answers B, C, A
    # ARC: B (right), then letters 1-3 -> '3' (wrong), then B (right); MMLU: B, B, B -> 1 of 3
    for batch_size in (8, 2, 1):
        fn = make_answer_logits(letter_stub(tok))
        assert run_categorical_eval(arc, tok, fn, batch_size) == (2, 3)
        assert run_categorical_eval(mmlu, tok, fn, batch_size) == (1, 3)
    assert run_categorical_eval(arc, tok, make_answer_logits(letter_stub(tok), make_mesh(2, 1, 1)), 2) == (2, 3)
    assert run_categorical_eval(arc, tok, make_answer_logits(letter_stub(tok)), 8, max_problems=2) == (1, 2)


def test_categorical_batches_that_do_not_divide_over_the_mesh(tok, make_mesh):
    """chat_sft's quick metrics pass 4 x sft.device_batch_size rows per batch: 4 or 12 rows on 8 devices are
    padded to a multiple of the batch shards (not an IndivisibleError), and score as without a mesh."""
    arc = ARC(data=read_jsonl(TASKS / "arc.jsonl"), subset="ARC-Easy", split="test")
    for batch_size in (4, 3, 12):
        fn = make_answer_logits(letter_stub(tok), make_mesh(8, 1, 1))
        assert run_categorical_eval(arc, tok, fn, batch_size) == (2, 3)
    out = make_answer_logits(letter_stub(tok), make_mesh(4, 2, 1))(jnp.zeros((3, 16), jnp.int32), jnp.zeros(3, jnp.int32))
    assert out.shape == (3, V)


def test_answer_logits_of_a_real_model_match_an_unpadded_forward(tok):
    cfg = ModelConfig(depth=1, aspect_ratio=32, head_dim=16, vocab_size=V, sequence_len=64, compute_dtype="float32")
    model = init_model(cfg, seed=0)
    model.lm_head.kernel[...] = jax.random.normal(jax.random.key(1), model.lm_head.kernel.shape)
    prompts = [[tok.bos_token_id, 70, 71, 72], [tok.bos_token_id, 80]]
    tokens = np.full((2, 16), tok.bos_token_id, np.int32)
    for r, p in enumerate(prompts):
        tokens[r, :len(p)] = p
    got = make_answer_logits(model)(jnp.asarray(tokens), jnp.asarray([3, 1]))
    for r, p in enumerate(prompts):
        want = nnx.jit(lambda m, t: m(t))(model, jnp.asarray([p]))[0, -1]
        np.testing.assert_allclose(got[r], want, rtol=1e-5, atol=1e-5)


def test_letters_must_be_single_tokens(tok):
    cache = {}
    assert letter_token_ids(tok, ["A", "B"], cache) == [65, 66] and cache == {"A": 65, "B": 66}
    with pytest.raises(ValueError, match="answer letter 'AB' is 2 tokens"):
        letter_token_ids(tok, ["AB"])


class Echo(Task):
    """Problems 'p0', 'p1', ...; a completion passes if it is 'yes'."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return self.n

    def get_example(self, i):
        return {"messages": [{"role": "user", "content": f"p{i}"}, {"role": "assistant", "content": "yes"}]}

    def evaluate(self, conversation, completion):
        return int(completion == "yes")


class ScriptedEngine:
    """Answers problem i's sample j with script[i][j]; records each call's prompts and arguments."""

    def __init__(self, tok, script):
        self.tok, self.script, self.calls = tok, script, []

    def generate_batch(self, prompts, num_samples, **kwargs):
        self.calls.append((len(prompts), num_samples, kwargs))
        results = []
        for p in prompts:
            i = int(self.tok.decode(p).split("<|user_start|>p")[1].split("<|user_end|>")[0])
            results += [list(p) + self.tok.encode(self.script[i][j]) for j in range(num_samples)]
        return results, [[0] * len(r) for r in results]


def test_generative_pass_at_k(tok):
    script = [["no", "yes", "no"], ["no", "no", "no"], ["yes", "no", "no"], ["nah", "nope", "yes"], ["x", "y", "z"]]
    engine = ScriptedEngine(tok, script)
    assert run_generative_eval(Echo(5), tok, engine, num_samples=3, max_new_tokens=7, batch_size=2) == (3, 5)
    assert [c[:2] for c in engine.calls] == [(2, 3), (2, 3), (1, 3)]
    assert engine.calls[0][2]["max_tokens"] == 7 and [c[2]["seed"] for c in engine.calls] == [0, 2, 4]
    assert run_generative_eval(Echo(5), tok, ScriptedEngine(tok, script), num_samples=1) == (1, 5)  # pass@1
    assert run_generative_eval(Echo(5), tok, ScriptedEngine(tok, script), num_samples=3, max_problems=2) == (1, 2)
    assert pass_at_k(Echo(1), {}, ["no", "yes"])
    assert not pass_at_k(Echo(1), {}, ["no"]) and not pass_at_k(Echo(1), {}, [])


def test_chatcore():
    assert chatcore({"ARC-Easy": 0.5}) is None
    results = {"ARC-Easy": 0.625, "ARC-Challenge": 0.25, "MMLU": 1.0, "GSM8K": 0.1, "HumanEval": 0.0,
               "SpellingBee": 0.5}
    # centered: 0.5, 0, 1, 0.1, 0 (SpellingBee is evaluated but, as in nanochat 3a5e0bc, not in ChatCORE)
    assert chatcore(results) == pytest.approx(1.6 / 5)
    del results["SpellingBee"]
    assert chatcore(results) == pytest.approx(1.6 / 5)
    assert set(BASELINES) == set(CHAT_TASKS) and BASELINES["MMLU"] == 0.25 and BASELINES["GSM8K"] == 0.0


def test_load_task(tmp_path):
    shutil.copy(TASKS / "arc.jsonl", tmp_path / "ARC-Challenge.jsonl")
    task = load_task("ARC-Challenge", tmp_path)
    assert len(task) == 3 and task.eval_type == "categorical" and task.subset == "ARC-Challenge"
    bee = load_task("SpellingBee")
    assert len(bee) == 256 and bee.eval_type == "generative" and bee.split == "test"
    for name in ("WorldFacts", "WordProblems"):  # the corpus world's tasks: generated, offline
        task = load_task(name)
        conv = task[0]
        assert len(task) == 256 and task.eval_type == "generative"
        answer = conv["messages"][-1]["content"]
        text = answer if isinstance(answer, str) else "".join(p["text"] for p in answer)
        assert task.evaluate(conv, text) == 1 and task.evaluate(conv, "no idea") == 0
    with pytest.raises(ValueError, match="unknown chat task 'Bogus'"):
        load_task("Bogus")


def test_local_task_rows_are_checked_when_loaded(tmp_path):
    """A --data-dir file with a row the task cannot use is one TaskDataError naming the file and line when the task
    loads (chat_eval reports it as unavailable), not a KeyError in the middle of the evaluation."""
    good = (TASKS / "gsm8k.jsonl").read_text().splitlines()[0]
    cases = {
        "GSM8K": ('{"question": "What is 2+2?"}', "no field 'answer'"),
        "ARC-Easy": ('{"question": "q", "answerKey": "A"}', "no field 'choices'"),
        "HumanEval": ('{"prompt": "def f():"}', "no field 'canonical_solution'"),
        "MMLU": ('["not", "a", "row"]', "list indices must be integers"),
    }
    for name, (line, why) in cases.items():
        (tmp_path / f"{name}.jsonl").write_text(good + "\n\n" + line + "\n" if name == "GSM8K" else line + "\n")
        lineno = 3 if name == "GSM8K" else 1
        with pytest.raises(TaskDataError, match=rf"{name}\.jsonl:{lineno}: not a {name} row: {why}"):
            load_task(name, tmp_path)
    (tmp_path / "GSM8K.jsonl").write_text('{"question": 7, "answer": "#### 7"}\n')
    with pytest.raises(TaskDataError, match=r"GSM8K\.jsonl:1: not a GSM8K row: message 0: user content must be a string"):
        load_task("GSM8K", tmp_path)
    (tmp_path / "GSM8K.jsonl").write_bytes(good.encode() + b'\n{"question": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(TaskDataError, match=r"GSM8K\.jsonl:2: not UTF-8 text \(byte 18\)"):
        load_task("GSM8K", tmp_path)


def test_an_empty_task_file_is_unavailable_not_zero_percent(tmp_path):
    (tmp_path / "ARC-Easy.jsonl").write_text("\n")  # e.g. a download that wrote nothing
    with pytest.raises(TaskDataError, match="ARC-Easy.jsonl: no rows"):
        load_task("ARC-Easy", tmp_path)


# ---------------------------------------------------------------------------------------------
# The scripts on a tiny checkpoint


def save_tiny_checkpoint(home, stage, depth=1, step=3):
    from nanochat_jax import checkpoint

    tok = Tokenizer({bytes([i]): i for i in range(256)})
    tok.save(home / "tok")
    cfg = Config(model=ModelConfig(depth=depth, aspect_ratio=32, head_dim=16, vocab_size=V, sequence_len=64,
                                   compute_dtype="float32"))
    model = init_model(cfg.model, seed=0)
    for i, (_, module) in enumerate(m for m in nnx.iter_modules(model) if isinstance(m[1], Linear)):
        module.kernel[...] = jax.random.normal(jax.random.key(i), module.kernel.shape) / np.sqrt(module.kernel.shape[0])
    params = nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])
    meta = {"step": step, "stage": stage, "config": to_dict(cfg), "model": dataclasses.asdict(cfg.model),
            "tokenizer": str(home / "tok")}
    ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(stage, depth), async_save=False)
    ckpt.save(step, params, optax.sgd(0.1).init(params), {}, meta)
    ckpt.close()
    return model


def test_chat_eval_script(home, tmp_path):
    save_tiny_checkpoint(home, "sft")
    shutil.copy(TASKS / "arc.jsonl", tmp_path / "ARC-Easy.jsonl")
    shutil.copy(TASKS / "gsm8k.jsonl", tmp_path / "GSM8K.jsonl")
    (tmp_path / "MMLU.jsonl").write_text("{not json\n")  # a task whose data cannot be loaded
    out = load_script("chat_eval").main(["--source", "sft", "-a", "ARC-Easy|MMLU|GSM8K", "--data-dir", str(tmp_path),
                                         "-m", "4", "-n", "2", "-t", "1.0", "-b", "3", "--mesh.data=2",
                                         "--mesh.fsdp=4"])
    assert set(out["results"]) == {"ARC-Easy", "GSM8K"} and list(out["unavailable"]) == ["MMLU"]
    assert "MMLU.jsonl:1: invalid JSON" in out["unavailable"]["MMLU"]
    assert out["counts"]["ARC-Easy"][1] == 3 and out["counts"]["GSM8K"] == [0, 2]  # 4 tokens cannot say '#### 26'
    assert out["results"]["ARC-Easy"] == out["counts"]["ARC-Easy"][0] / 3 and out["ChatCORE"] is None
    saved = json.loads((home / "report" / "chat_eval_sft.json").read_text())
    assert saved["results"] == out["results"] and saved["step"] == 3 and saved["eval"]["num_samples"] == 2
    # GSM8K's two fixture problems answer 26 and 3000: a model answering 26 every time scores 1/2
    assert saved["constant_answer"] == {"GSM8K": {"answer": "26", "accuracy": 0.5}}


def test_most_common_answer_is_the_score_of_a_constant_answer():
    """SpellingBee's first 64 test problems: 40 answer 1, 17 answer 2, 5 answer 0, 2 answer 3, so a model saying 1
    to every one of them scores 62.5% (run_cpu.sh's depth-4 model does); tasks not scored on '#### n' have none."""
    from nanochat_jax.chat_eval import most_common_answer
    from nanochat_jax.tasks import SpellingBee
    from nanochat_jax.tasks.corpuschat import WordProblems, WorldFacts

    task = SpellingBee(256, "test")
    assert most_common_answer(task, 64) == ("1", 40 / 64)
    scores = [task.evaluate(task[i], "#### 1") for i in range(64)]
    assert sum(scores) == 40
    assert most_common_answer(WorldFacts(16, "test")) is None
    problems = WordProblems(64, "test")
    answer, share = most_common_answer(problems)
    assert share < 0.1 and sum(problems.evaluate(c, f"#### {answer}") for c in problems) == share * 64


def test_chat_eval_takes_the_depth_the_training_stages_take(home, tmp_path):
    """Without --depth, chat_eval evaluates the stage at --model.depth when it has it, as chat_sft / chat_rl /
    base_loss start from it (run_gpu.sh passes the same overrides to every stage); else the newest depth."""
    save_tiny_checkpoint(home, "mid", depth=1, step=3)
    save_tiny_checkpoint(home, "mid", depth=2, step=5)  # written last
    shutil.copy(TASKS / "arc.jsonl", tmp_path / "ARC-Easy.jsonl")
    chat_eval = load_script("chat_eval")
    args = ["-i", "mid", "-a", "ARC-Easy", "--data-dir", str(tmp_path), "-x", "1"]
    assert chat_eval.main(args + ["--model.depth=1"])["step"] == 3
    assert chat_eval.main(args + ["--model.depth=7"])["step"] == 5
    assert chat_eval.main(args + ["--model.depth=1", "--depth", "2"])["step"] == 5
    assert chat_eval.main(args + ["--model.depth=1", "--step", "5"])["step"] == 5


def test_base_eval_script(home):
    base_eval = load_script("base_eval")
    bundle = ROOT / "tests" / "fixtures" / "core"
    with pytest.raises(CheckpointError, match="no checkpoints for stage 'base'"):
        base_eval.main(["--bundle-dir", str(bundle)])
    model = save_tiny_checkpoint(home, "base")
    with pytest.raises(BundleError) as e:
        base_eval.main(["--bundle-url", "http://127.0.0.1:9/eval_bundle.zip"])
    err = str(e.value).strip()
    assert len(err.splitlines()) == 1 and "http://127.0.0.1:9/eval_bundle.zip" in err and "--bundle-dir" in err

    out = base_eval.main(["--bundle-dir", str(bundle), "--max-per-task", "3", "--mesh.data=4", "--mesh.fsdp=2"])
    assert list(out["results"]) == ["toy_choice", "toy_schema", "toy_lm"] and out["step"] == 3
    assert out["core_metric"] == pytest.approx(np.mean(list(out["centered_results"].values())))
    direct = evaluate_core(make_scorer(model), Tokenizer.load(home / "tok"), bundle, 3, log=lambda s: None)
    assert out["results"] == pytest.approx(direct["results"])  # the checkpoint's model, sharded, scores the same
    saved = json.loads((home / "report" / "base_eval.json").read_text())
    assert saved["core_metric"] == pytest.approx(out["core_metric"]) and saved["max_per_task"] == 3


def test_sft_quick_metrics_on_nanochat_tasks(monkeypatch):
    """chat_sft's quick metrics with the nanochat mixture (run_gpu.sh's SFT, every sft.eval_metrics_every steps):
    MMLU and ARC-Easy from the letter logits, GSM8K and HumanEval sampled, here on fixture rows."""
    from flax import nnx

    import nanochat_jax.chat_eval as chat_eval_lib
    from nanochat_jax.config import MeshConfig
    from nanochat_jax.sharding import make_mesh
    from nanochat_jax.tasks import ARC, GSM8K, MMLU, HumanEval
    from test_engine import byte_tokenizer, random_model

    def rows(name):
        return [json.loads(line) for line in (TASKS / f"{name}.jsonl").read_text().splitlines()]

    makers = {"MMLU": lambda: MMLU("all", "test", data=rows("mmlu")),
              "ARC-Easy": lambda: ARC("ARC-Easy", "test", data=rows("arc")),
              "GSM8K": lambda: GSM8K("main", "test", data=rows("gsm8k")),
              "HumanEval": lambda: HumanEval(data=rows("humaneval"))}
    monkeypatch.setattr(chat_eval_lib, "load_task", lambda name, data_dir=None: makers[name]())
    graphdef, params = nnx.split(random_model(), nnx.Param)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    metrics = load_script("chat_sft").quick_metrics("nanochat", graphdef, nnx.to_pure_dict(params), byte_tokenizer(),
                                                    mesh, 4)
    assert set(metrics) == {"mmlu_acc", "arc_easy_acc", "gsm8k_acc", "humaneval_acc"}
    assert all(0 <= v <= 1 for v in metrics.values())
