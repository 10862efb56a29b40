"""The CORE metric (DCLM paper, arXiv 2406.11794) as nanochat computes it: 22 in-context-learning tasks
scored by a base model's log-likelihoods, each accuracy centered on its random baseline, then averaged.

The eval bundle (a zip: core.yaml, eval_data/*.jsonl, eval_meta_data.csv) is downloaded once into
artifacts_dir("eval_bundle"). Three kinds of task:
- multiple_choice: one prompt per choice, same context; the choice with the lowest mean loss over its
  continuation tokens wins;
- schema: one prompt per context option, same continuation; the option whose continuation has the lowest
  mean loss wins;
- language_modeling: every continuation token must be the model's argmax prediction.
Few-shot examples for item i are drawn (without item i) with random.Random(1234 + i). Prompts longer than
max_seq_len lose tokens from the left. Rows are grouped by a power-of-two length bucket and scored in
fixed-shape batches, so the forward compiles once per bucket; only per-row (mean loss, all-argmax-correct)
pairs come back to the host.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax.common import UserError, artifacts_dir
from nanochat_jax.distributed import sum_over_processes
from nanochat_jax.engine import bucket

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
FEWSHOT_SEED = 1234  # few-shot examples of item i: random.Random(FEWSHOT_SEED + i)
SHUFFLE_SEED = 1337  # each task's data is shuffled once before max_per_task crops it
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
MIN_BUCKET = 64


class BundleError(UserError, RuntimeError):
    """The eval bundle is missing, cannot be downloaded, or is malformed; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# The bundle


def ensure_bundle(bundle_dir: str | Path | None = None, url: str = EVAL_BUNDLE_URL, timeout: float = 60.0) -> Path:
    """The directory of an unzipped bundle (with core.yaml), downloading it to artifacts_dir("eval_bundle")
    when no bundle_dir is given and none is there yet."""
    if bundle_dir is not None:
        bundle_dir = Path(bundle_dir)
        if not (bundle_dir / "core.yaml").is_file():
            raise BundleError(f"{bundle_dir} is not an unzipped CORE eval bundle (no core.yaml in it)")
        return bundle_dir
    target = artifacts_dir("eval_bundle", create=False)
    if (target / "core.yaml").is_file():
        return target
    with tempfile.TemporaryDirectory(dir=artifacts_dir()) as tmp:
        zip_path = Path(tmp) / "eval_bundle.zip"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(zip_path, "wb") as f:
                shutil.copyfileobj(response, f)
            with zipfile.ZipFile(zip_path) as z:
                z.extractall(Path(tmp) / "unzipped")
        except (OSError, zipfile.BadZipFile) as e:
            reason = (str(e).strip().splitlines() or [""])[0][:160]
            raise BundleError(f"cannot download the CORE eval bundle from {url} ({type(e).__name__}: {reason}); "
                              f"download and unzip it elsewhere and put its contents in {target} "
                              f"(so that {target / 'core.yaml'} exists), or pass --bundle-dir") from None
        found = sorted(Path(tmp, "unzipped").rglob("core.yaml"), key=lambda p: len(p.parts))
        if not found:
            raise BundleError(f"the zip from {url} has no core.yaml")
        try:  # one atomic rename: processes sharing this home may fetch it at once, and the first one's stays
            found[0].parent.rename(target)
        except OSError:
            if (target / "core.yaml").is_file():
                return target
            shutil.rmtree(target, ignore_errors=True)  # a leftover that is not a bundle
            found[0].parent.rename(target)
    return target


@dataclass
class CoreTask:
    label: str
    task_type: str
    dataset_uri: str  # relative to <bundle>/eval_data
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float  # in percent, as in eval_meta_data.csv


def load_task_specs(bundle_dir: Path) -> list[CoreTask]:
    """The tasks of core.yaml with their random baselines from eval_meta_data.csv."""
    import yaml

    bundle_dir = Path(bundle_dir)
    config = yaml.safe_load((bundle_dir / "core.yaml").read_text())
    with open(bundle_dir / "eval_meta_data.csv", newline="") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    tasks = []
    for entry in config["icl_tasks"]:
        label = entry["label"]
        if entry["icl_task_type"] not in TASK_TYPES:
            raise BundleError(f"core.yaml task {label}: unknown icl_task_type {entry['icl_task_type']!r}")
        if label not in baselines:
            raise BundleError(f"core.yaml task {label} has no row in eval_meta_data.csv")
        fewshot = entry["num_fewshot"]
        tasks.append(CoreTask(label, entry["icl_task_type"], entry["dataset_uri"],
                              int(fewshot[0] if isinstance(fewshot, list) else fewshot),
                              entry.get("continuation_delimiter", " "), baselines[label]))
    return tasks


def check_max_per_task(tasks: list[CoreTask], max_per_task: int, setting: str = "max_per_task") -> None:
    """UserError when max_per_task leaves a task fewer items than its few-shot prompts draw from the others."""
    most = max((t.num_fewshot for t in tasks), default=0)
    if 0 < max_per_task <= most:
        raise UserError(f"{setting}={max_per_task} CORE items per task is too few: the {most}-shot tasks draw "
                        f"each item's examples from {most} other items; use at least {most + 1}, or -1 for all")


def load_task_data(bundle_dir: Path, task: CoreTask, max_per_task: int = -1) -> list[dict]:
    """The task's items, shuffled with SHUFFLE_SEED and cropped to max_per_task (-1 = all)."""
    path = Path(bundle_dir) / "eval_data" / task.dataset_uri
    with open(path, encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    random.Random(SHUFFLE_SEED).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


# ---------------------------------------------------------------------------------------------
# Prompts


def fewshot_examples(data: list[dict], idx: int, num_fewshot: int) -> list[dict]:
    if num_fewshot <= 0:
        return []
    others = [i for i in range(len(data)) if i != idx]
    return [data[i] for i in random.Random(FEWSHOT_SEED + idx).sample(others, num_fewshot)]


def render_prompts(item: dict, task_type: str, delimiter: str, fewshot: list[dict]) -> list[str]:
    """The prompt texts of one item: one per choice (MC), one per context option (schema), or the context
    without and with the continuation (LM). Few-shot examples come first, each followed by a blank line."""
    if task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{context}{delimiter}{item['continuation']}" for context in item["context_options"]]
    if task_type == "language_modeling":
        shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        prefix = f"{shots}{item['context'].strip()}{delimiter}"
        return [prefix.strip(), prefix + item["continuation"]]
    raise ValueError(f"unknown CORE task type {task_type!r}; known: {', '.join(TASK_TYPES)}")


def common_length(seqs: list[list[int]], from_end: bool = False) -> int:
    """Length of the longest common prefix (or suffix) of the sequences."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        j = -1 - i if from_end else i
        if any(s[j] != seqs[0][j] for s in seqs):
            return i
    return n


def item_rows(tokens: list[list[int]], task_type: str) -> list[tuple[list[int], int, int]]:
    """(tokens, start, end) per scored row; tokens[start:end] is the continuation to score."""
    # an option that is a whole prefix (suffix) of another would leave nothing to score (or no context before
    # it): the shared part stops one token short of the shortest row, so every row scores at least one token
    shortest = min(len(t) for t in tokens)
    if task_type == "multiple_choice":
        start = min(common_length(tokens), shortest - 1)
        return [(t, start, len(t)) for t in tokens]
    if task_type == "schema":
        suffix = min(common_length(tokens, from_end=True), shortest - 1)
        return [(t, len(t) - suffix, len(t)) for t in tokens]
    without, with_ = tokens
    if len(without) >= len(with_) or with_[:len(without)] != without:
        raise ValueError("language_modeling: the prompt without the continuation does not tokenize to a prefix "
                         "of the prompt with it")
    return [(with_, len(without), len(with_))]


def crop_left(row: tuple[list[int], int, int], max_len: int | None) -> tuple[list[int], int, int]:
    """Drop tokens from the left so the row fits in max_len, shifting start and end."""
    tokens, start, end = row
    cut = len(tokens) - max_len if max_len else 0
    if cut <= 0:
        return row
    if start - cut < 1:
        raise ValueError(f"a continuation of {end - start} tokens does not fit in max_seq_len={max_len}")
    return tokens[cut:], start - cut, end - cut


# ---------------------------------------------------------------------------------------------
# Scoring


def row_scores(logits: jax.Array, tokens: jax.Array, starts: jax.Array, ends: jax.Array):
    """Per row: mean cross-entropy of tokens[start:end] and whether each of them is the argmax prediction.
    Position t predicts token t+1, so the continuation is predicted at positions start-1 .. end-2."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:]
    pos = jnp.arange(targets.shape[1])[None, :]
    mask = (pos >= starts[:, None] - 1) & (pos < ends[:, None] - 1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    losses = jax.nn.logsumexp(logits, axis=-1) - picked
    count = jnp.maximum(jnp.sum(mask, axis=1), 1)
    mean_loss = jnp.sum(jnp.where(mask, losses, 0.0), axis=1) / count
    correct = jnp.all(~mask | (jnp.argmax(logits, axis=-1) == targets), axis=1)
    return mean_loss, correct


def make_scorer(model, mesh=None) -> Callable:
    """A jitted (tokens, starts, ends) -> (mean_loss, all_correct) for an nnx GPT or any function tokens ->
    logits. With a mesh, batch rows are sharded over its batch axes."""
    from flax import nnx

    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda state, t, s, e: row_scores(nnx.merge(graphdef, state)(t), t, s, e))
        score = lambda t, s, e: forward(state, t, s, e)  # noqa: E731
    else:
        score = jax.jit(lambda t, s, e: row_scores(model(t), t, s, e))
    if mesh is None:
        return score
    from nanochat_jax.sharding import batch_sharding

    rows, cols = batch_sharding(mesh, 1), batch_sharding(mesh, 2)
    return lambda t, s, e: score(jax.device_put(t, cols), jax.device_put(s, rows), jax.device_put(e, rows))


def score_rows(scorer: Callable, rows: list[tuple[list[int], int, int]], pad_id: int, batch_tokens: int = 16384,
               row_multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(mean_loss, all_correct) for every row. Rows are grouped by length bucket; each bucket runs in batches of
    a fixed number of rows (about batch_tokens tokens, a multiple of row_multiple) padded with pad_id."""
    losses, correct = np.zeros(len(rows), np.float32), np.zeros(len(rows), bool)
    by_bucket: dict[int, list[int]] = {}
    for i, (tokens, _, _) in enumerate(rows):
        by_bucket.setdefault(bucket(len(tokens), MIN_BUCKET), []).append(i)
    for length, members in sorted(by_bucket.items()):
        per_batch = max(1, batch_tokens // length)
        per_batch = -(-per_batch // row_multiple) * row_multiple
        for b in range(0, len(members), per_batch):
            chunk = members[b:b + per_batch]
            tokens = np.full((per_batch, length), pad_id, np.int32)
            starts, ends = np.ones(per_batch, np.int32), np.ones(per_batch, np.int32)  # filler rows: empty span
            for r, i in enumerate(chunk):
                t, starts[r], ends[r] = rows[i]
                tokens[r, :len(t)] = t
            mean_loss, ok = jax.device_get(scorer(jnp.asarray(tokens), jnp.asarray(starts), jnp.asarray(ends)))
            losses[chunk], correct[chunk] = mean_loss[:len(chunk)], ok[:len(chunk)]
    return losses, correct


def evaluate_task(scorer: Callable, tokenizer, data: list[dict], task: CoreTask, max_seq_len: int | None = None,
                  batch_tokens: int = 16384, row_multiple: int = 1) -> float:
    """Accuracy on the items of one task. Process p scores items p, p + P, ...; counts are summed over processes."""
    bos = tokenizer.bos_token_id
    mine = range(jax.process_index(), len(data), jax.process_count())
    rows, owner = [], []
    for idx in mine:
        prompts = render_prompts(data[idx], task.task_type, task.continuation_delimiter,
                                 fewshot_examples(data, idx, task.num_fewshot))
        for row in item_rows(tokenizer.encode(prompts, prepend=bos), task.task_type):
            rows.append(crop_left(row, max_seq_len))
            owner.append(idx)
    losses, correct = score_rows(scorer, rows, bos, batch_tokens, row_multiple) if rows else ([], [])
    per_item: dict[int, list[int]] = {}
    for r, idx in enumerate(owner):
        per_item.setdefault(idx, []).append(r)
    num_correct = 0
    for idx, members in per_item.items():
        if task.task_type == "language_modeling":
            num_correct += bool(correct[members[0]])
        else:
            num_correct += int(np.argmin(losses[members])) == data[idx]["gold"]
    total = sum_over_processes(np.array([num_correct, len(per_item)], np.int64))
    return float(total[0]) / max(1, int(total[1]))


def centered_accuracy(accuracy: float, baseline: float) -> float:
    """Accuracy rescaled so that the random baseline (a fraction) maps to 0 and perfect to 1."""
    return (accuracy - baseline) / (1.0 - baseline)


def evaluate_core(scorer: Callable, tokenizer, bundle_dir: Path, max_per_task: int = -1,
                  max_seq_len: int | None = None, batch_tokens: int = 16384, row_multiple: int = 1,
                  log: Callable[[str], None] = print) -> dict:
    """{"results": {label: accuracy}, "centered_results": {label: centered}, "core_metric": mean centered}."""
    import time

    results, centered, tasks = {}, {}, load_task_specs(bundle_dir)
    check_max_per_task(tasks, max_per_task)
    for task in tasks:
        t0 = time.perf_counter()
        data = load_task_data(bundle_dir, task, max_per_task)
        acc = evaluate_task(scorer, tokenizer, data, task, max_seq_len, batch_tokens, row_multiple)
        results[task.label] = acc
        centered[task.label] = centered_accuracy(acc, 0.01 * task.random_baseline)
        log(f"{task.label:<35} {task.num_fewshot:>2}-shot {task.task_type:<18} accuracy {acc:.4f} | "
            f"centered {centered[task.label]:.4f} | {time.perf_counter() - t0:.1f}s")
    core = sum(centered.values()) / len(centered) if centered else float("nan")
    return {"results": results, "centered_results": centered, "core_metric": core}
