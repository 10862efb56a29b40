"""report.md from fixture stage files: the summary table cell by cell, PNG plots, sections, wall time and
cost; log_section; reset; the scripts/report.py entry point."""

import shutil
from pathlib import Path

import pytest

from nanochat_jax import report
from conftest import load_script

ROOT = Path(__file__).parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "report"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

EXPECTED_TABLE = """\
| Metric          | BASE     | MID      | SFT      | RL       |
|-----------------|----------|----------|----------|----------|
| CORE            | 0.2219   | -        | -        | -        |
| ARC-Challenge   | -        | 0.2875   | 0.2807   | -        |
| ARC-Easy        | -        | 0.3561   | 0.3876   | -        |
| GSM8K           | -        | 0.0250   | 0.0455   | 0.0758   |
| HumanEval       | -        | 0.0671   | -        | -        |
| MMLU            | -        | 0.3111   | 0.3151   | -        |
| SpellingBee     | -        | 0.1200   | -        | -        |
| ChatCORE        | -        | 0.0730   | -        | -        |
"""


@pytest.fixture
def filled(home):
    directory = home / "report"
    shutil.copytree(FIXTURES, directory)
    return directory


def test_generate_from_fixture_files(filled):
    path = report.generate(hourly_price=10.0)
    assert path == filled / "report.md"
    text = path.read_text()
    assert EXPECTED_TABLE in text
    # 120 (tokenizer) + 10800 + 600 + 300 + 600 + 300 + 180 seconds = 3h35m; at $10/hour: $35.83
    assert "Total wall clock time: 3h35m\n" in text
    assert "Estimated cost: $35.83 (at $10.00/hour)" in text
    for png in ("base_train_loss.png", "base_val_bpb.png", "sft_train_loss.png"):
        data = (filled / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
        assert f"]({png})" in text
    assert not (filled / "sft_val_bpb.png").exists()  # the SFT log has no val_bpb lines
    heads = [line for line in text.splitlines() if line.startswith("## ")]
    assert heads == ["## Environment", "## Tokenizer training", "## Tokenizer evaluation", "## Base model training",
                     "## Base model loss", "## Base model evaluation", "## Chat evaluation mid", "## Chat SFT",
                     "## Chat evaluation sft", "## Chat evaluation rl", "## Summary"]
    assert "- Commit: " in text and "- JAX: " in text and "Run: fixture-d20" in text
    assert "- Training devices: 8x NVIDIA H100 80GB HBM3 (gpu), 1 process(es)" in text
    assert "- Training mesh: data=8, fsdp=1, tensor=1" in text
    assert "- params: 560,988,160\n" in text and "- val_bpb: 0.8125\n" in text
    assert "| english | 1000 | 4.55 | 4.35 |" in text
    assert "| arc_easy | 0.5000 | 0.3333 |" in text and "- CORE metric: 0.2219" in text
    assert "- HumanEval: unavailable (cannot load openai/openai_humaneval" in text
    # a final-number task's score sits beside what answering its most common number every time scores
    assert "- SpellingBee: 0.1200\n- SpellingBee (answering 1 every time): 0.6250\n" in text
    assert '- `Once upon a \\"time\\"\\nthere was`' in text  # samples stay on one line
    assert "- `Björn waves 🙂`" in text  # the characters themselves, not JSON escapes
    summary = text.split("## Summary\n", 1)[1]
    assert "- Lines: " in summary and "- Files: " in summary  # bloat numbers repeated in the summary


def test_a_summary_cut_short_is_left_out_and_named(filled, capsys):
    """A summary a kill cut short (or any file that is not a JSON object) does not stop the report: that stage's
    cells show '-' and the file is named."""
    (filled / "chat_eval_rl.json").write_text('{"stage": "rl", "GSM8K": 0.07')
    (filled / "base_eval.json").write_text("[1, 2]")
    text = report.generate().read_text()
    assert "| GSM8K           | -        | 0.0250   | 0.0455   | -        |" in text
    assert "| CORE            | -        | -        | -        | -        |" in text
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith(f"report: left out {filled / 'chat_eval_rl.json'}: not a readable summary "
                               "(JSONDecodeError: ") for line in err)
    assert f"report: left out {filled / 'base_eval.json'}: not a readable summary ([1, 2])" in err


def test_summary_table_with_nothing():
    table = report.summary_table({})
    lines = table.splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == list(report.SUMMARY_ROWS)
    assert all(line.count(" - ") == 4 for line in lines[2:])


def test_bloat_counts_source_files(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\ny = 2\n")
    (tmp_path / "b.md").write_text("# t")
    (tmp_path / "c.bin").write_text("ignored")
    (tmp_path / "pyproject.toml").write_text('[project]\ndependencies = ["jax", "flax"]\n')
    got = report.bloat(tmp_path)
    chars = len("x = 1\ny = 2\n") + 3 + len('[project]\ndependencies = ["jax", "flax"]\n')
    assert got == {"Characters": chars, "Lines": 5, "Files": 3, "Tokens (approx)": chars // 4,
                   "Dependencies (pyproject)": 2}


def test_log_section_is_included(home):
    path = report.log_section("Chat RL notes", [{"reward": 0.25, "tokens": 123456, "note": "ok"}, "free text\n", None])
    assert path == home / "report" / "chat-rl-notes.md"
    body = path.read_text()
    assert body.startswith("## Chat RL notes\ntimestamp: ")
    assert body.endswith("- reward: 0.2500\n- tokens: 123,456\n- note: ok\nfree text\n\n")
    text = report.generate().read_text()
    assert "## Chat RL notes" in text and "Total wall clock time: unknown" in text
    assert "Estimated cost" not in text  # no GPU training to price
    assert "| CORE            | -        | -        | -        | -        |" in text
    with pytest.raises(ValueError, match="not usable"):
        report.log_section("Report", {})


def test_script_generate_and_reset(filled, capsys):
    script = load_script("report")
    script.main(["generate"])  # base training ran on 8 GPUs: $3 per GPU-hour, nanochat's $24/hour
    assert "Estimated cost: $86.00 (at $24.00/hour)" in (filled / "report.md").read_text()
    script.main(["generate", "--hourly-price", "12"])
    assert "Estimated cost: $43.00 (at $12.00/hour)" in (filled / "report.md").read_text()
    removed = script.main(["reset"])
    out = capsys.readouterr().out
    assert filled / "report.md" in removed and filled / "base_train.json" in removed
    assert f"removed {filled / 'base_eval.json'}" in out
    assert list(filled.iterdir()) == []


def test_plot_curves_per_stage_metrics(tmp_path):
    """SFT's val_loss and RL's reward get their own plots; a stage without such records gets none."""
    import json

    from nanochat_jax.report import plot_curves

    lines = [{"step": 1, "loss": 2.0, "loss_smooth": 2.0}, {"step": 2, "val_loss": 1.5}]
    (tmp_path / "sft_train.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    (tmp_path / "rl_train.jsonl").write_text(json.dumps({"step": 1, "loss": -0.1, "reward": 0.25}))
    assert [name for _, name in plot_curves(tmp_path, "sft")] == ["sft_train_loss.png", "sft_val_loss.png"]
    assert [name for _, name in plot_curves(tmp_path, "rl")] == ["rl_train_loss.png", "rl_reward.png"]
    assert plot_curves(tmp_path, "mid") == []
    assert (tmp_path / "rl_reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("price", ["-5", "nan", "inf"])
def test_script_refuses_a_price_that_is_no_price(filled, capsys, price):
    """--hourly-price -5 wrote "Estimated cost: $-17.92 (at $-5.00/hour)" (nan, inf: $nan, $inf) into report.md."""
    script = load_script("report")
    with pytest.raises(SystemExit) as exit_info:
        script.main(["generate", f"--hourly-price={price}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f": error: --hourly-price must be a number >= 0, got {float(price)}")
    assert not (filled / "report.md").exists()
