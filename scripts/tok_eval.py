"""Measure the trained tokenizer's compression (bytes per token) on several kinds of held-out text.

Compares with the GPT-2 and GPT-4 (cl100k_base) encodings when tiktoken can load them (it downloads
them, so offline they are skipped with a one-line note). Prints a table and stores it under "eval"
in artifacts_dir("report")/tokenizer.json.
Usage: python scripts/tok_eval.py [--config FILE.toml]
"""

from __future__ import annotations

import dataclasses
import itertools
import json

from nanochat_jax import corpus
from nanochat_jax.common import artifacts_dir, run_script
from nanochat_jax.config import load_config, to_toml
from nanochat_jax.data import text_iterator
from nanochat_jax.tokenizer import load_tokenizer

BASELINES = {"gpt2": "gpt2", "gpt4": "cl100k_base"}

ENGLISH = """\
The museum opened its doors at nine, and by ten the queue reached the end of the street. Visitors had
come to see a clock that has not lost a second in two hundred years. Its keeper, a patient woman with
ink on her fingers, explained that the secret is boring: oil it every spring, never move it, and write
down everything. "People want magic," she said, "but what they get is a notebook."
"""

CODE = '''\
def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    total, out = 0.0, []
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i + 1 >= window:
            out.append(total / window)
    return out

print(moving_average([1, 2, 3, 4, 5], 2))  # [1.5, 2.5, 3.5, 4.5]
'''

MULTILINGUAL = """\
Le petit café au coin de la rue ouvre à sept heures ; on y sert du pain frais et du chocolat chaud.
El mercado del sábado está lleno de frutas, flores y música; todos hablan a la vez.
Der Zug nach München fährt um 14:35 Uhr von Gleis 3 ab. Bitte einsteigen!
Θέλω ένα ποτήρι νερό, παρακαλώ.
Москва — столица России, а Киев — столица Украины.
東京は日本の首都です。毎日たくさんの人が電車に乗ります。
오늘은 날씨가 맑고 바람이 시원합니다.
"""

MATH = r"""\
Let $f(x) = 3x^2 - 2x + 1$. Then $f'(x) = 6x - 2$, so $f$ has a minimum at $x = 1/3$ where
$f(1/3) = 3 \cdot \tfrac{1}{9} - \tfrac{2}{3} + 1 = \tfrac{2}{3}$.
\[ \int_0^1 f(x)\,dx = \left[x^3 - x^2 + x\right]_0^1 = 1. \]
Check: 17 * 23 = 391, 391 / 17 = 23, 2^10 = 1024, sqrt(144) = 12, 0.125 + 0.375 = 0.5.
"""


def eval_texts(data=None) -> dict[str, str]:
    """The texts measured: the first 50 validation documents of the [data] source (None: the embedded corpus),
    as "<source>-val" ("corpus-val" for the embedded one), then the fixed samples."""
    if data is None or data.source == "embedded":
        name, docs = "corpus-val", (corpus.document("val", i) for i in range(corpus.num_documents("val")))
    else:  # (2 shards: the first and the validation one; the tokenizer's 8 are there already)
        name, docs = f"{data.source}-val", text_iterator(dataclasses.replace(data, num_shards=2), "val")
    val = "\n\n".join(itertools.islice(filter(None, docs), 50))
    return {**({name: val} if val else {}), "english": ENGLISH, "code": CODE, "multilingual": MULTILINGUAL,
            "math": MATH}


def load_baselines() -> dict:
    """name -> tiktoken Encoding, for the reference encodings that tiktoken can load here."""
    import tiktoken

    found = {}
    for name, encoding in BASELINES.items():
        try:
            found[name] = tiktoken.get_encoding(encoding)
        except Exception as e:  # offline, or no cached file: skip this baseline
            print(f"cannot load the {name} ({encoding}) encoding, skipping it: {type(e).__name__}")
    return found


def main(argv=None) -> dict:
    cfg = load_config(argv)
    print(to_toml(cfg))
    tokenizer = load_tokenizer()
    baselines = load_baselines()
    results = {}
    for kind, text in eval_texts(cfg.data).items():
        n_bytes = len(text.encode())
        row = {"bytes": n_bytes, "ours_tokens": len(tokenizer.encode(text))}
        for name, enc in baselines.items():
            row[f"{name}_tokens"] = len(enc.encode_ordinary(text))
        for key in [k for k in row if k.endswith("_tokens")]:
            row[key.replace("_tokens", "_bytes_per_token")] = n_bytes / row[key]
        results[kind] = row

    names = ["ours"] + list(baselines)
    print(f"{'text':<14}{'bytes':>8}" + "".join(f"{n + ' tok':>12}{n + ' B/tok':>12}" for n in names))
    for kind, row in results.items():
        print(f"{kind:<14}{row['bytes']:>8}" + "".join(
            f"{row[n + '_tokens']:>12}{row[n + '_bytes_per_token']:>12.2f}" for n in names))

    path = artifacts_dir("report") / "tokenizer.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report["eval"] = {"vocab_size": tokenizer.vocab_size, "baselines": list(baselines), "texts": results}
    path.write_text(json.dumps(report, indent=2))
    print(f"results added to {path}")
    return report["eval"]


if __name__ == "__main__":
    run_script(main)
