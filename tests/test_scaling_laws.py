"""scripts/scaling_laws.py: the isoFLOP fit on rows from a known law, resuming a sweep from its results.csv, the
options it refuses, and (slow) a real sweep of base_train.py runs on CPU."""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanochat_jax.config import load_config
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
scaling_laws = load_script("scaling_laws")


def law_rows(budgets, params, exponent=0.5, n0=1e6):
    """Rows whose val bpb is a parabola in log N around N*(C) = n0 (C / 1e15)^exponent, tokens = C / (6 N)."""
    rows = []
    for c in budgets:
        best = n0 * (c / 1e15) ** exponent
        for depth, n in enumerate(params, 1):
            rows.append({"flops_budget": c, "depth": depth, "width": 64 * depth, "matmul_params": n, "params": n,
                         "flops_per_token": 6 * n, "steps": 10, "tokens": c / (6 * n),
                         "val_bpb": 1.0 + 0.05 * math.log(n / best) ** 2 - 0.01 * math.log(c), "core_metric": None,
                         "wall_time_s": 1.0, "tokens_per_sec": 1.0, "mfu": 0.5})
    return rows


def test_fit_finds_each_budgets_optimum_and_the_exponents():
    budgets, params = [1e15, 4e15, 1.6e16], np.geomspace(2e5, 2e7, 7)
    result = scaling_laws.fit(law_rows(budgets, params))
    for c in budgets:
        optimum = result["budgets"][c]["optimum"]
        assert optimum["inside"] and optimum["params"] == pytest.approx(1e6 * (c / 1e15) ** 0.5, rel=1e-6)
        assert optimum["tokens"] == pytest.approx(c / (6 * optimum["params"]), rel=1e-6)
    assert result["law"]["params_exponent"] == pytest.approx(0.5, abs=1e-6)
    assert result["law"]["tokens_exponent"] == pytest.approx(0.5, abs=1e-6)  # D* = C / 6N*
    lines = scaling_laws.describe(law_rows(budgets, params), result)
    assert lines[-1] == "scaling: N* ~ C^0.500, D* ~ C^0.500"


def test_fit_says_when_a_budget_has_no_optimum_inside_its_depths():
    rows = law_rows([1e15], np.geomspace(2e6, 2e7, 3))  # all larger than N* = 1e6: bpb rises with N
    rows += law_rows([1e16], [1e6, 2e6])  # two depths only
    result = scaling_laws.fit(rows)
    assert result["budgets"][1e15]["optimum"]["inside"] is False and result["budgets"][1e16]["optimum"] is None
    text = "\n".join(scaling_laws.describe(rows, result))
    assert "(outside the depths tried: extend them that way)" in text
    assert "budget 1e+16: no optimum (fewer than 3 depths)" in text
    assert "scaling: needs two budgets or more" in text


CONFIG = ["--config", str(ROOT / "configs" / "cpu_tiny.toml")]


def test_a_rerun_trains_only_the_pairs_missing_from_results_csv(home, monkeypatch, capsys):
    (home / "tokenizer").mkdir(parents=True)
    sweep = home / "scaling" / "s"
    sweep.mkdir(parents=True)
    for row in law_rows([1e15], [2e5, 1e6]):
        scaling_laws.append_row(sweep / "results.csv", row)
    with (sweep / "results.csv").open("a") as f:
        f.write("1e+15,3,192,5000000.0,5000000")  # a row cut short by a kill
    (sweep / "sweep.json").write_text(json.dumps({"base_train_args": CONFIG}))
    trained = []

    def train_one(flops, depth, passthrough, model, folder, keep):
        trained.append((flops, depth, passthrough))
        return law_rows([flops], [[2e5, 1e6, 5e6][depth - 1]])[0] | {"depth": depth}

    monkeypatch.setattr(scaling_laws, "train_one", train_one)
    monkeypatch.setattr("nanochat_jax.tokenizer.load_tokenizer", lambda: type("T", (), {"vocab_size": 512})())
    result = scaling_laws.main(["--flops", "1e15", "--depths", "1,2,3", "--label", "s", *CONFIG])
    assert trained == [(1e15, 3, CONFIG)]
    assert [int(r["depth"]) for r in scaling_laws.read_rows(sweep / "results.csv")] == [1, 2, 3]
    assert result["budgets"][1e15]["optimum"]["inside"]
    assert json.loads((sweep / "fit.json").read_text())["budgets"]["1e+15"]["depths"] == [1, 2, 3]
    assert (sweep / "isoflop.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "1 incomplete row(s) left out" in out and "1 to train" in out
    with pytest.raises(scaling_laws.UserError, match="would not compare with .* --train.fp8=true: pass those"):
        scaling_laws.main(["--flops", "1e15", "--depths", "1,2,3", "--label", "s", *CONFIG, "--train.fp8=true"])


def test_a_miniseries_trains_each_depth_once_to_the_configs_horizon(home, monkeypatch, capsys):
    """Without --flops (master's miniseries.sh): one run per depth, in the "miniseries" folder, a table and
    miniseries.png; a rerun trains nothing, and an isoFLOP sweep is refused that folder."""
    (home / "tokenizer").mkdir(parents=True)
    trained = []

    def train_one(flops, depth, passthrough, model, folder, keep):
        trained.append((flops, depth))
        row = law_rows([1e15], [[2e5, 1e6][depth - 1]])[0] | {"depth": depth, "core_metric": 0.01 * depth}
        return row | {"flops_budget": row["flops_per_token"] * row["tokens"]}

    monkeypatch.setattr(scaling_laws, "train_one", train_one)
    monkeypatch.setattr("nanochat_jax.tokenizer.load_tokenizer", lambda: type("T", (), {"vocab_size": 512})())
    result = scaling_laws.main(["--depths", "2,1", *CONFIG, "--train.num_iterations=50"])
    assert trained == [(None, 1), (None, 2)] and [int(r["depth"]) for r in result["series"]] == [1, 2]
    folder = home / "scaling" / "miniseries"
    assert (folder / "miniseries.png").stat().st_size > 0 and not (folder / "fit.json").exists()
    out = capsys.readouterr().out
    assert "miniseries of 2 depths, 0 done earlier, 2 to train" in out and "  0.0200 " in out  # depth 2's CORE
    scaling_laws.main(["--depths", "1,2", *CONFIG, "--train.num_iterations=50"])
    assert len(trained) == 2 and "2 done earlier, 0 to train" in capsys.readouterr().out
    with pytest.raises(scaling_laws.UserError, match="sweep 'miniseries' is a miniseries: pass another --label"):
        scaling_laws.main(["--flops", "1e15", "--depths", "1,2", "--label", "miniseries", *CONFIG])


@pytest.mark.parametrize("flops, folder", [(2.154e18, "d3_2.154e+18"), (None, "d3")])
def test_each_run_links_the_homes_tokenizer_data_and_bundle(home, monkeypatch, flops, folder):
    """A run's home reads the home's tokenizer, data shards and eval bundle (downloads land there once; the runs
    downloaded every shard into their own homes) and the budget names it exactly; a miniseries run keeps the
    config's horizon and records the FLOPs it trained for."""
    for name in ("tokenizer", "data/fineweb", "eval_bundle"):
        (home / name).mkdir(parents=True)
    seen = {}

    class Finished:
        returncode, stdout = 0, iter(["done: 1 steps\n"])

        def __init__(self, cmd, env, **kwargs):
            seen.update(cmd=cmd, home=Path(env["NANOCHAT_JAX_HOME"]))
            (seen["home"] / "report").mkdir()
            (seen["home"] / "report" / "base_train.json").write_text(json.dumps(
                {"params": 1, "flops_per_token": 3.0, "steps": 1, "tokens": 7, "val_bpb": 1.0,
                 "core_metric_estimate": None, "wall_time_s": 1.0, "tokens_per_sec": 1.0, "mfu": 0.1}))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(scaling_laws.subprocess, "Popen", Finished)
    model = dataclasses.replace(load_config(CONFIG).model, vocab_size=512)
    row = scaling_laws.train_one(flops, 3, CONFIG, model, home / "scaling" / "s", keep_checkpoints=False)
    assert seen["home"].name == folder and ("--train.target_flops=2.154e+18" in seen["cmd"]) == bool(flops)
    assert ("--train.num_iterations=-1" in seen["cmd"]) == bool(flops) and "--model.depth=3" in seen["cmd"]
    assert row["flops_budget"] == (flops or 3.0 * 7)  # flops_per_token x tokens
    for name in ("tokenizer", "data", "eval_bundle"):
        assert (seen["home"] / name).resolve() == (home / name).resolve()
    assert row["depth"] == 3 and row["width"] == 192 and row["val_bpb"] == 1.0


@pytest.mark.parametrize("args, message", [
    (["--flops", "1e15", "--depths", "2,x"], "must be comma-separated numbers"),
    (["--flops", "1e15", "--depths", "0"], "must be positive"),
    (["--flops", "1e15", "--depths", "2", "--model.depth=4"], "--model.depth is the sweep's to set"),
    (["--flops", "1e15", "--depths", "2", "--train.num_iterations=9"], "--train.num_iterations is the sweep's to set"),
    (["--depths", "2", "--model.depth=4"], "--model.depth is the sweep's to set"),  # a miniseries
    (["--flops", "", "--depths", "2"], "must be comma-separated numbers"),  # (an empty variable: not a miniseries)
])
def test_bad_options_are_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        scaling_laws.parse_args(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_without_a_tokenizer_it_says_what_to_run_first(home):
    with pytest.raises(scaling_laws.UserError, match="train one first"):
        scaling_laws.main(["--flops", "1e15", "--depths", "2", *CONFIG])


@pytest.mark.slow
def test_a_cpu_sweep_trains_each_depth_at_each_budget(home, tmp_path):
    """Two budgets x three depths of real base_train.py runs on the embedded corpus; checkpoints deleted."""
    env = {"NANOCHAT_JAX_HOME": str(home), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    config = ["--config", "configs/cpu_tiny.toml", "--train.eval_tokens=8192", "--train.device_batch_size=4",
              "--train.total_batch_size=1024", "--model.sequence_len=128", "--tokenizer.vocab_size=512"]
    subprocess.run([sys.executable, "scripts/tok_train.py", *config], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    proc = subprocess.run([sys.executable, "scripts/scaling_laws.py", "--flops", "5e10,1e11", "--depths", "1,2,3",
                           *config], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = scaling_laws.read_rows(home / "scaling" / "sweep" / "results.csv")
    pairs = sorted((r["flops_budget"], int(r["depth"])) for r in rows)
    assert pairs == [(c, d) for c in (5e10, 1e11) for d in (1, 2, 3)]
    for r in rows:  # each run spent its budget, to within a step
        assert abs(r["steps"] * 1024 * r["flops_per_token"] - r["flops_budget"]) <= 1024 * r["flops_per_token"] / 2
        assert 0 < r["val_bpb"] < 8
    assert not list((home / "scaling" / "sweep").glob("*/checkpoints"))
    assert "scaling:" in proc.stdout and (home / "scaling" / "sweep" / "isoflop.png").stat().st_size > 0


@pytest.mark.slow
def test_a_cpu_miniseries_trains_each_depth_to_the_configs_horizon(home):
    """Two depths of real base_train.py runs of 12 steps each (the config's horizon), recorded with their FLOPs."""
    env = {"NANOCHAT_JAX_HOME": str(home), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    config = ["--config", "configs/cpu_tiny.toml", "--train.eval_tokens=8192", "--train.device_batch_size=4",
              "--train.total_batch_size=1024", "--model.sequence_len=128", "--tokenizer.vocab_size=512",
              "--train.num_iterations=12"]
    subprocess.run([sys.executable, "scripts/tok_train.py", *config], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    proc = subprocess.run([sys.executable, "scripts/scaling_laws.py", "--depths", "1,2", *config], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = scaling_laws.read_rows(home / "scaling" / "miniseries" / "results.csv")
    assert [(int(r["depth"]), int(r["steps"])) for r in rows] == [(1, 12), (2, 12)]
    for r in rows:
        assert r["flops_budget"] == r["flops_per_token"] * r["tokens"] and r["tokens"] == 12 * 1024
    assert rows[1]["flops_budget"] > rows[0]["flops_budget"]
    assert (home / "scaling" / "miniseries" / "miniseries.png").stat().st_size > 0
