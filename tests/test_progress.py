"""progress.StepLogger: debiased EMA by hand, MFU arithmetic, JSONL records (fresh start and resume)."""

import json

import pytest

from nanochat_jax.progress import EMA, StepLogger, mfu


def test_ema_debiased_by_hand():
    ema = EMA(0.9)
    assert ema.update(4.0) == pytest.approx(4.0)  # 0.4 / 0.1
    # raw = 0.9*0.4 + 0.1*2 = 0.56; debiased = 0.56 / (1 - 0.81) = 2.947368...
    assert ema.update(2.0) == pytest.approx(0.56 / 0.19)
    # raw = 0.9*0.56 + 0.1*1 = 0.604; debiased = 0.604 / (1 - 0.729)
    assert ema.update(1.0) == pytest.approx(0.604 / 0.271)
    assert EMA(0.5).update(3.0) == 3.0


def test_mfu_arithmetic():
    # 6e9 FLOPs/token * 1e4 tokens/s = 6e13 FLOP/s over 8 devices of 1e13 peak = 0.75
    assert mfu(6e9, 1e4, 1e13, 8) == pytest.approx(0.75)
    assert mfu(6e9, 1e4, None, 8) is None


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_records_rates_and_resume(tmp_path, capsys):
    clock = FakeClock()
    log = StepLogger("sft", total_steps=4, flops_per_token=1e6, peak_flops=1e9, num_devices=2, directory=tmp_path,
                     clock=clock)
    clock.t += 2.0
    r1 = log.log(1, 3.0, 1000, grad_norm=0.5, lr_multiplier=1.0)
    clock.t += 0.5
    r2 = log.log(2, 1.0, 1000, grad_norm=0.25, lr_multiplier=0.5)
    log.eval({"step": 2, "val_loss": 1.5}, "step 2 | val loss 1.5")
    log.eval({"step": 2, "core_metric": 0.25}, "step 2 | CORE 0.25")
    log.close()
    assert r1 == {"step": 1, "loss": 3.0, "loss_smooth": pytest.approx(3.0), "grad_norm": 0.5, "lr_multiplier": 1.0,
                  "tokens_per_sec": pytest.approx(500.0), "mfu": pytest.approx(1e6 * 500 / 2e9), "elapsed_s": 2.0}
    assert r2["tokens_per_sec"] == pytest.approx(2000.0) and r2["elapsed_s"] == pytest.approx(2.5)
    assert r2["loss_smooth"] == pytest.approx((0.9 * 0.3 + 0.1 * 1.0) / 0.19)
    lines = [json.loads(x) for x in (tmp_path / "sft_train.jsonl").read_text().splitlines()]
    assert lines == [json.loads(json.dumps(r1)), json.loads(json.dumps(r2)), {"step": 2, "val_loss": 1.5},
                     {"step": 2, "core_metric": 0.25}]

    # resuming from the step-2 checkpoint: the evals at step 2 are redone by the resumed run, so they are dropped
    # (all of them, so that they are written again in their order); the killed first session left half a line
    # behind: skipped with a warning naming the file
    with (tmp_path / "sft_train.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')
    clock.t += 100.0  # the restart
    resumed = StepLogger("sft", total_steps=4, start_step=2, append=True, directory=tmp_path, clock=clock)
    assert "sft_train.jsonl:5 is not a JSON record" in capsys.readouterr().err
    assert resumed.kept == [json.loads(json.dumps(r1)), json.loads(json.dumps(r2))]
    clock.t += 1.0
    r3 = resumed.log(3, 2.0, 10)
    assert r3["mfu"] is None  # no FLOPs or peak given
    # the smoothed loss continues over the first session's losses, as in a run that never stopped
    assert r3["loss_smooth"] == pytest.approx((0.9 * (0.9 * 0.3 + 0.1 * 1.0) + 0.1 * 2.0) / (1 - 0.9 ** 3))
    # the run's wall time continues from the first session's 2.5 s; rates count this session only
    assert r3["elapsed_s"] == pytest.approx(3.5) and resumed.elapsed == pytest.approx(3.5)
    assert resumed.train_seconds == pytest.approx(1.0) and r3["tokens_per_sec"] == pytest.approx(10.0)
    # the summary's figures: this session's 2 steps of 10 tokens over its 1 s
    assert resumed.run_record(10) == {"steps": 4, "wall_time_s": pytest.approx(3.5), "tokens_per_sec": pytest.approx(20.0),
                                      "mfu": None}
    assert log.run_record(1000) == {"steps": 4, "wall_time_s": pytest.approx(103.5),
                                    "tokens_per_sec": pytest.approx(4000 / 103.5), "mfu": pytest.approx(1e6 * 4000 / 103.5 / 2e9)}
    assert resumed.run_record() == {"steps": 4, "wall_time_s": pytest.approx(3.5)}
    resumed.close()
    records = [json.loads(x) for x in (tmp_path / "sft_train.jsonl").read_text().splitlines()]
    assert [(r["step"], "loss" in r) for r in records] == [(1, True), (2, True), (3, True)]

    # resuming from an earlier checkpoint (step 1) drops the records of the steps that will be redone
    StepLogger("sft", total_steps=4, start_step=1, append=True, directory=tmp_path, clock=clock).close()
    assert [json.loads(x)["step"] for x in (tmp_path / "sft_train.jsonl").read_text().splitlines()] == [1]

    StepLogger("sft", total_steps=4, directory=tmp_path).close()  # a fresh start truncates
    assert (tmp_path / "sft_train.jsonl").read_text() == ""


def test_paused_time_is_not_counted_in_rates(tmp_path):
    clock = FakeClock()
    log = StepLogger("base", total_steps=2, directory=tmp_path, clock=clock)
    clock.t += 1.0
    log.log(1, 1.0, 100)
    with log.paused():  # e.g. a validation pass
        clock.t += 5.0
    clock.t += 1.0
    record = log.log(2, 1.0, 100)
    log.close()
    assert record["tokens_per_sec"] == pytest.approx(100.0) and record["elapsed_s"] == pytest.approx(7.0)
    assert log.train_seconds == pytest.approx(2.0) and log.paused_s == pytest.approx(5.0)


def test_a_resume_cut_short_while_rewriting_the_log_leaves_it_whole(tmp_path, monkeypatch):
    """The resumed run rewrites the log without the steps it redoes; a kill in the middle of that write (here: the
    write stops after half its text) must not leave a log cut short: the earlier records are all still there."""
    log = StepLogger("base", total_steps=4, directory=tmp_path)
    for step in range(1, 5):
        log.log(step, 5.0 - step, 10)
    log.close()
    before = (tmp_path / "base_train.jsonl").read_text()

    def killed_halfway(path, text, **kwargs):
        with open(path, "w") as f:
            f.write(text[: len(text) // 2])
        raise KeyboardInterrupt  # (stands in for the SIGKILL)

    monkeypatch.setattr("pathlib.Path.write_text", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        StepLogger("base", total_steps=4, start_step=2, append=True, directory=tmp_path)
    assert (tmp_path / "base_train.jsonl").read_text() == before
    monkeypatch.undo()
    StepLogger("base", total_steps=4, start_step=2, append=True, directory=tmp_path).close()  # the resume, again
    assert [json.loads(x)["step"] for x in (tmp_path / "base_train.jsonl").read_text().splitlines()] == [1, 2]
