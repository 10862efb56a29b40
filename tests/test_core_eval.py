"""CORE: prompt rendering and few-shot rules, row scoring against an unpadded NumPy reference (also on a
mesh), hand-computed accuracies on a toy bundle with a bigram stub model, centering and the CORE mean,
left cropping, bundle download/unzip and the offline error."""

import shutil
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanochat_jax.common import UserError
from nanochat_jax.config import ModelConfig
from nanochat_jax.core_eval import (BundleError, centered_accuracy, crop_left, ensure_bundle, evaluate_core,
                                    evaluate_task, fewshot_examples, item_rows, load_task_data, load_task_specs,
                                    make_scorer, render_prompts, score_rows)
from nanochat_jax.model import Linear, init_model
from nanochat_jax.tokenizer import Tokenizer

BUNDLE = Path(__file__).parent / "fixtures" / "core"
V = 256 + 9  # byte tokenizer: ids 0..255 are bytes, then the special tokens


@pytest.fixture(scope="module")
def tok():
    return Tokenizer({bytes([i]): i for i in range(256)})


def bigram_stub():
    """logits[b, t] depend only on tokens[b, t]: after any token 'x' gets logit 10, except after 'k', where
    ' ' gets 20. So 'x' costs ~0 nats and other tokens ~10; ' ' after 'k' costs ~0."""
    table = np.zeros((V, V), np.float32)
    table[:, ord("x")] = 10.0
    table[ord("k"), ord(" ")] = 20.0
    table = jnp.asarray(table)
    return lambda tokens: table[tokens]


def test_render_prompts_each_kind():
    mc = {"query": "Q", "choices": ["a", "b"], "gold": 1}
    shot = {"query": "S", "choices": ["c", "d"], "gold": 0}
    assert render_prompts(mc, "multiple_choice", ": ", [shot, shot]) == ["S: c\n\nS: c\n\nQ: a", "S: c\n\nS: c\n\nQ: b"]
    sc = {"context_options": ["c1", "c2"], "continuation": "end", "gold": 0}
    sshot = {"context_options": ["o1", "o2"], "continuation": "fin", "gold": 1}
    assert render_prompts(sc, "schema", " ", [sshot]) == ["o2 fin\n\nc1 end", "o2 fin\n\nc2 end"]
    lm = {"context": " ctx  ", "continuation": "cont"}
    lshot = {"context": "\tc0 ", "continuation": "k0"}
    assert render_prompts(lm, "language_modeling", " ", [lshot]) == ["c0 k0\n\nctx", "c0 k0\n\nctx cont"]
    with pytest.raises(ValueError, match="unknown CORE task type 'bogus'"):
        render_prompts(lm, "bogus", " ", [])


def test_fewshot_is_seeded_by_index_and_excludes_the_item():
    data = load_task_data(BUNDLE, load_task_specs(BUNDLE)[0])
    # shuffled with Random(1337): file rows 1, 0, 3, 2; item 0 draws index 2 with Random(1234)
    assert [d["query"] for d in data] == ["Q2: pick", "Q1: pick", "Q4: pick", "Q3: pick"]
    assert fewshot_examples(data, 0, 1) == [data[2]]
    prompts = render_prompts(data[0], "multiple_choice", " ", fewshot_examples(data, 0, 1))
    assert prompts == ["Q4: pick qq\n\nQ2: pick abc", "Q4: pick qq\n\nQ2: pick xxa"]
    for idx in range(4):
        shots = fewshot_examples(data, idx, 2)
        assert shots == fewshot_examples(data, idx, 2) and data[idx] not in shots and len(shots) == 2
    assert fewshot_examples(data, 0, 0) == []
    assert len(load_task_data(BUNDLE, load_task_specs(BUNDLE)[0], max_per_task=3)) == 3


def test_item_rows_spans(tok):
    mc = item_rows([[1, 2, 3, 4], [1, 2, 5]], "multiple_choice")
    assert [(s, e) for _, s, e in mc] == [(2, 4), (2, 3)]
    schema = item_rows([[1, 7, 8, 9], [1, 2, 3, 8, 9]], "schema")
    assert [(s, e) for _, s, e in schema] == [(2, 4), (3, 5)]
    assert item_rows([[1, 2], [1, 2, 3, 4]], "language_modeling") == [([1, 2, 3, 4], 2, 4)]
    # an option that is a strict prefix of another still scores its last token (else its mean loss would be
    # over nothing, and such an option would always win)
    assert item_rows([[1, 2, 3], [1, 2, 3, 4]], "multiple_choice") == [([1, 2, 3], 2, 3), ([1, 2, 3, 4], 2, 4)]
    assert item_rows([[8, 9], [1, 8, 9]], "schema") == [([8, 9], 1, 2), ([1, 8, 9], 2, 3)]
    with pytest.raises(ValueError, match="prefix"):
        item_rows([[1, 9], [1, 2, 3]], "language_modeling")


def test_crop_left():
    row = (list(range(10)), 6, 10)
    assert crop_left(row, None) == row and crop_left(row, 10) == row
    assert crop_left(row, 6) == ([4, 5, 6, 7, 8, 9], 2, 6)
    with pytest.raises(ValueError, match="does not fit in max_seq_len=4"):
        crop_left(row, 4)


def test_task_specs_from_bundle():
    specs = load_task_specs(BUNDLE)
    assert [(t.label, t.task_type, t.num_fewshot, t.continuation_delimiter, t.random_baseline) for t in specs] == [
        ("toy_choice", "multiple_choice", 1, " ", 25.0), ("toy_schema", "schema", 1, " ", 50.0),
        ("toy_lm", "language_modeling", 0, " ", 0.0)]


def test_centered_accuracy():
    assert centered_accuracy(0.25, 0.25) == 0.0
    assert centered_accuracy(1.0, 0.25) == 1.0
    assert centered_accuracy(0.5, 0.25) == pytest.approx(1 / 3)
    assert centered_accuracy(0.1, 0.25) == pytest.approx(-0.2)
    assert centered_accuracy(0.4, 0.0) == 0.4


def test_too_few_items_for_the_few_shot_prompts_is_refused_before_any_scoring(tok):
    """The toy bundle's 1-shot tasks draw each item's example from the others: 1 item per task cannot."""
    scored = []
    with pytest.raises(UserError, match=r"^max_per_task=1 CORE items per task is too few: the 1-shot tasks draw each "
                                        r"item's examples from 1 other items; use at least 2, or -1 for all$"):
        evaluate_core(lambda *a: scored.append(a), tok, BUNDLE, max_per_task=1, log=lambda s: None)
    assert scored == []
    assert evaluate_core(make_scorer(bigram_stub()), tok, BUNDLE, max_per_task=2, log=lambda s: None)["results"]


def test_core_on_toy_bundle_with_a_stub_model(tok):
    """Hand-computed: choice 2/4 (items 1, 3 right), schema 2/3 (items 1, 3), LM 2/5 (items 1, 4)."""
    out = evaluate_core(make_scorer(bigram_stub()), tok, BUNDLE, log=lambda s: None)
    assert out["results"] == pytest.approx({"toy_choice": 0.5, "toy_schema": 2 / 3, "toy_lm": 0.4})
    assert out["centered_results"] == pytest.approx({"toy_choice": 1 / 3, "toy_schema": 1 / 3, "toy_lm": 0.4})
    assert out["core_metric"] == pytest.approx((1 / 3 + 1 / 3 + 0.4) / 3)
    # left cropping keeps the continuations, and a bigram model only looks one token back
    lm = load_task_specs(BUNDLE)[2]
    data = load_task_data(BUNDLE, lm)
    assert evaluate_task(make_scorer(bigram_stub()), tok, data, lm, max_seq_len=5) == pytest.approx(0.4)
    # tiny batches (one row per forward) give the same answers
    choice = load_task_specs(BUNDLE)[0]
    assert evaluate_task(make_scorer(bigram_stub()), tok, load_task_data(BUNDLE, choice), choice,
                         batch_tokens=1) == 0.5


def random_model():
    cfg = ModelConfig(depth=2, aspect_ratio=32, head_dim=16, vocab_size=V, sequence_len=64, compute_dtype="float32")
    model = init_model(cfg, seed=0)
    key = jax.random.key(1)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, Linear):
            key, sub = jax.random.split(key)
            module.kernel[...] = jax.random.normal(sub, module.kernel.shape) / np.sqrt(module.kernel.shape[0])
    return model


_forward = nnx.jit(lambda m, t: m(t))


def single_row_logits(model, tokens, width=128):
    """Logits of one row on its own (right-padded to a fixed width: causal, so the padding is never seen)."""
    padded = np.zeros((1, width), np.int32)
    padded[0, :len(tokens)] = tokens
    return np.asarray(_forward(model, jnp.asarray(padded)), np.float64)[0, :len(tokens)]


def reference_scores(model, rows):
    """Each row alone, in float64 NumPy from the model's logits."""
    losses, correct = [], []
    for tokens, start, end in rows:
        logits = single_row_logits(model, tokens)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
            -1, keepdims=True)
        span = range(start - 1, end - 1)
        losses.append(-np.mean([logp[t, tokens[t + 1]] for t in span]))
        correct.append(all(np.argmax(logits[t]) == tokens[t + 1] for t in span))
    return np.array(losses), np.array(correct)


def test_score_rows_matches_unpadded_reference(make_mesh):
    model = random_model()
    rng = np.random.default_rng(0)
    rows = []
    for n in (5, 9, 17, 40, 70, 3, 64, 65):
        tokens = rng.integers(0, 256, n).tolist()
        start = int(rng.integers(1, n))
        rows.append((tokens, start, int(rng.integers(start + 1, n + 1))))
    # a row that the model predicts perfectly: its own greedy continuation
    prompt = [256, 1, 2, 3]
    for _ in range(4):
        prompt.append(int(np.argmax(single_row_logits(model, prompt)[-1])))
    rows.append((prompt, 4, 8))
    want_loss, want_ok = reference_scores(model, rows)
    assert want_ok[-1] and not want_ok[:-1].all()
    loss, ok = score_rows(make_scorer(model), rows, pad_id=256, batch_tokens=128)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ok, want_ok)
    loss, ok = score_rows(make_scorer(model, make_mesh(4, 1, 1)), rows, pad_id=256, batch_tokens=128, row_multiple=4)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ok, want_ok)


def test_one_compile_per_bucket(tok):
    calls = []

    def stub(tokens):
        calls.append(tokens.shape)  # runs at trace time only
        return bigram_stub()(tokens)

    scorer = make_scorer(stub)
    rows = [([256] + [1] * n, 1, n + 1) for n in (3, 10, 50, 63, 64, 100, 5, 7, 9, 11, 13)]
    score_rows(scorer, rows, pad_id=256, batch_tokens=256)
    assert sorted(calls) == [(2, 128), (4, 64)]


def make_zip(tmp_path) -> Path:
    zip_path = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(zip_path, "w") as z:
        for f in BUNDLE.rglob("*"):
            if f.is_file():
                z.write(f, Path("eval_bundle") / f.relative_to(BUNDLE))
    return zip_path


def test_bundle_download_unzip_and_offline_error(home, tmp_path):
    with pytest.raises(BundleError) as e:
        ensure_bundle(url="http://127.0.0.1:9/eval_bundle.zip", timeout=5)
    msg = str(e.value)
    assert "\n" not in msg and "http://127.0.0.1:9/eval_bundle.zip" in msg and str(home / "eval_bundle") in msg
    with pytest.raises(BundleError, match="not an unzipped CORE eval bundle"):
        ensure_bundle(tmp_path)
    assert ensure_bundle(BUNDLE) == BUNDLE

    got = ensure_bundle(url=make_zip(tmp_path).as_uri())
    assert got == home / "eval_bundle"
    assert (got / "eval_data" / "toy" / "lm.jsonl").read_text() == (BUNDLE / "eval_data/toy/lm.jsonl").read_text()
    assert ensure_bundle(url="http://127.0.0.1:9/unused.zip") == got  # already there: no download
    assert [t.label for t in load_task_specs(got)] == ["toy_choice", "toy_schema", "toy_lm"]
    assert not [p for p in home.iterdir() if p.name != "eval_bundle"]  # the temporary download is gone
    shutil.rmtree(got)
