"""Chat-model evaluation: categorical tasks from the answer letters' logits, generative tasks by sampling
(pass@k), and ChatCORE, the mean centered accuracy over the chat tasks.

- Categorical (ARC, MMLU): each conversation is rendered for completion (ending in <|assistant_start|>);
  the logits at that last position, restricted to the token ids of the conversation's letters, pick the
  answer. Batches are right-padded with <|bos|> to a power-of-two length and a fixed number of rows, so
  the forward compiles once per length bucket. No sampling.
- Generative (GSM8K, HumanEval, SpellingBee): num_samples completions per problem from the Engine; the
  problem counts as passed if any completion passes the task's evaluate (pass@k with k = num_samples).
Process p takes batches (categorical) or problems (generative) p, p + P, ...; counts are summed over processes.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax.common import print0
from nanochat_jax.core_eval import centered_accuracy
from nanochat_jax.distributed import sum_over_processes

# chance accuracy of each chat task (1 of 4 letters; open-ended answers: 0)
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
             "SpellingBee": 0.0}
CHAT_TASKS = tuple(BASELINES)  # evaluated by default
CHATCORE_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")  # nanochat 3a5e0bc's ChatCORE: comparable
GENERATED_TASKS = ("WorldFacts", "WordProblems")  # the corpus world's checkable tasks (the CPU pipeline's evals)
KNOWN_TASKS = CHAT_TASKS + GENERATED_TASKS
SPELLING_BEE_SIZE = 256
GENERATED_SIZE = 256


def load_task(name: str, data_dir: str | Path | None = None):
    """The test split of a chat task; from <data_dir>/<name>.jsonl (hub-format rows) when that file exists.
    Raises TaskDataError (one line) when the hub cannot be reached, on every process when it cannot be reached
    from any of them: each process loads the task itself, and one that skipped a task would pair the count sums
    (collectives) of the tasks after it with another task's."""
    from nanochat_jax.distributed import errors_anywhere
    from nanochat_jax.tasks import TaskDataError

    task, error = None, None
    try:
        task = _load_task_here(name, data_dir)
    except TaskDataError as e:
        error = e
    errors = errors_anywhere(str(error) if error else None)
    if error is not None:
        raise error
    if errors:
        raise TaskDataError(f"{name}: unavailable on {len(errors)} other process(es)")
    return task


def _load_task_here(name: str, data_dir: str | Path | None = None):
    from nanochat_jax.tasks import ARC, GSM8K, MMLU, HumanEval, SpellingBee
    from nanochat_jax.tasks.corpuschat import WordProblems, WorldFacts

    makers = {
        "ARC-Easy": partial(ARC, subset="ARC-Easy", split="test"),
        "ARC-Challenge": partial(ARC, subset="ARC-Challenge", split="test"),
        "MMLU": partial(MMLU, subset="all", split="test"),
        "GSM8K": partial(GSM8K, subset="main", split="test"),
        "HumanEval": HumanEval,
    }
    generated = {"SpellingBee": partial(SpellingBee, size=SPELLING_BEE_SIZE, split="test"),
                 "WorldFacts": partial(WorldFacts, size=GENERATED_SIZE, split="test"),
                 "WordProblems": partial(WordProblems, size=GENERATED_SIZE, split="test")}
    if name in generated:  # needs no data
        return generated[name]()
    if name not in makers:
        raise ValueError(f"unknown chat task {name!r}; known: {', '.join(KNOWN_TASKS)}")
    local = Path(data_dir) / f"{name}.jsonl" if data_dir else None
    if local is not None and local.is_file():
        return _local_task(name, makers[name], local)
    return makers[name]()


def _local_task(name: str, make, path: Path):
    """A task over the hub-format rows of a local JSONL file, every row checked now: TaskDataError naming the
    file and line of the first one that is not a `name` row (instead of a KeyError in the middle of the eval)."""
    from nanochat_jax.tasks.base import TaskDataError, read_jsonl_numbered
    from nanochat_jax.tokenizer import check_conversation

    numbered = read_jsonl_numbered(path)
    if not numbered:  # else its accuracy would read 0/0 = 0% and count in ChatCORE
        raise TaskDataError(f"{path}: no rows")
    task = make(data=[row for _, row in numbered])
    for i, (lineno, _) in enumerate(numbered):
        try:
            check_conversation(task[i])
        except (KeyError, TypeError, IndexError, AttributeError, ValueError, TaskDataError) as e:
            why = f"no field {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
            raise TaskDataError(f"{path}:{lineno}: not a {name} row: {why}") from None
    return task


# ---------------------------------------------------------------------------------------------
# Categorical


def make_answer_logits(model, mesh=None) -> Callable:
    """A jitted (tokens (B, L), positions (B,)) -> logits (B, V) at each row's position, for an nnx GPT or any
    function tokens -> logits. With a mesh, rows are sharded over its batch axes (any number of rows)."""
    from flax import nnx

    def at(logits, positions):
        return jnp.take_along_axis(logits, positions[:, None, None], axis=1)[:, 0]

    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda state, t, p: at(nnx.merge(graphdef, state)(t), p))
        fn = lambda t, p: forward(state, t, p)  # noqa: E731
    else:
        fn = jax.jit(lambda t, p: at(model(t), p))
    if mesh is None:
        return fn
    from nanochat_jax.sharding import batch_sharding, batch_shards

    rows, cols, shards = batch_sharding(mesh, 1), batch_sharding(mesh, 2), batch_shards(mesh)

    def sharded(t, p):  # rows padded up to a multiple of the batch shards (a batch of 4 on 8 devices), then cut
        n, pad = t.shape[0], -t.shape[0] % shards
        t, p = jnp.pad(jnp.asarray(t), ((0, pad), (0, 0))), jnp.pad(jnp.asarray(p), (0, pad))
        return fn(jax.device_put(t, cols), jax.device_put(p, rows))[:n]

    return sharded


def letter_token_ids(tokenizer, letters, cache: dict | None = None) -> list[int]:
    cache = {} if cache is None else cache
    ids = []
    for letter in letters:
        if letter not in cache:
            encoded = tokenizer.encode(letter)
            if len(encoded) != 1:
                raise ValueError(f"answer letter {letter!r} is {len(encoded)} tokens, not one")
            cache[letter] = encoded[0]
        ids.append(cache[letter])
    return ids


def run_categorical_eval(task, tokenizer, answer_logits: Callable, batch_size: int = 8,
                         max_problems: int | None = None) -> tuple[int, int]:
    """(passed, total): the letter with the highest logit at the answer position is the model's answer."""
    from nanochat_jax.engine import bucket

    bos = tokenizer.bos_token_id
    n = len(task) if max_problems is None else min(len(task), max_problems)
    cache: dict = {}
    passed = total = 0
    for b in range(jax.process_index(), -(-n // batch_size), jax.process_count()):
        conversations = [task[i] for i in range(b * batch_size, min((b + 1) * batch_size, n))]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        tokens = np.full((batch_size, bucket(max(len(p) for p in prompts))), bos, np.int32)
        positions = np.zeros(batch_size, np.int32)
        for r, p in enumerate(prompts):
            tokens[r, :len(p)], positions[r] = p, len(p) - 1
        logits = np.asarray(answer_logits(jnp.asarray(tokens), jnp.asarray(positions)))
        for r, conversation in enumerate(conversations):
            letters = conversation["letters"]
            choice = int(np.argmax(logits[r, letter_token_ids(tokenizer, letters, cache)]))
            passed += task.evaluate(conversation, letters[choice])
            total += 1
    passed, total = sum_over_processes(np.array([passed, total], np.int64)).tolist()
    return int(passed), int(total)


# ---------------------------------------------------------------------------------------------
# Generative


def pass_at_k(task, conversation: dict, completions: list[str]) -> bool:
    """True if any of the completions passes."""
    return any(task.evaluate(conversation, c) for c in completions)


def run_generative_eval(task, tokenizer, engine, num_samples: int = 1, max_new_tokens: int = 512,
                        temperature: float = 0.0, top_k: int = 50, max_problems: int | None = None,
                        batch_size: int = 8, seed: int = 0) -> tuple[int, int]:
    """(passed, total): num_samples completions per problem, batch_size problems per Engine call."""
    n = len(task) if max_problems is None else min(len(task), max_problems)
    mine = list(range(jax.process_index(), n, jax.process_count()))
    passed = total = 0
    live, last_line = sys.stdout.isatty(), time.monotonic()  # a log file gets a plain line every 30 s instead
    for b in range(0, len(mine), batch_size):
        conversations = [task[i] for i in mine[b:b + batch_size]]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        results, _ = engine.generate_batch(prompts, num_samples=num_samples, max_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k, seed=seed + mine[b])
        for j, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            rows = results[j * num_samples:(j + 1) * num_samples]
            passed += pass_at_k(task, conversation, [tokenizer.decode(r[len(prompt):]) for r in rows])
            total += 1
        so_far = f"{task.__class__.__name__}: {passed}/{total} ({100 * passed / total:.1f}%)"
        if live:
            print0(f"\r\033[K{so_far}", end="")
        elif time.monotonic() - last_line > 30:
            print0(so_far)
            last_line = time.monotonic()
    if live:
        print0()
    passed, total = sum_over_processes(np.array([passed, total], np.int64)).tolist()
    return int(passed), int(total)


def most_common_answer(task, max_problems: int | None = None) -> tuple[str, float] | None:
    """(answer, share) for a task whose references end in '#### n' (GSM8K, WordProblems, SpellingBee): the most
    common reference number among the problems evaluated and the share of them it answers, which is what a model
    that gives that answer every time scores. None when some reference has no '#### n'."""
    from nanochat_jax.tasks.gsm8k import reference_answer

    n = len(task) if max_problems is None else min(len(task), max_problems)
    answers = [reference_answer(task[i]) for i in range(n)]
    if not answers or None in answers:
        return None
    answer, count = Counter(answers).most_common(1)[0]
    return answer, count / n


# ---------------------------------------------------------------------------------------------


def chatcore(results: dict[str, float]) -> float | None:
    """Mean centered accuracy over CHATCORE_TASKS, or None unless every one of them has a result."""
    if any(name not in results for name in CHATCORE_TASKS):
        return None
    return sum(centered_accuracy(results[name], BASELINES[name]) for name in CHATCORE_TASKS) / len(CHATCORE_TASKS)
