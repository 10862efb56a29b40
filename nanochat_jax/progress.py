"""The training-loop logger shared by every stage: smoothed loss, tokens/s, MFU, ETA, a progress bar, JSONL.

    logger = StepLogger("mid", total_steps=500, start_step=0, flops_per_token=f, peak_flops=peak, num_devices=8)
    record = logger.log(step + 1, loss, tokens, grad_norm=g, lr_multiplier=lrm)   # after an optimizer step
    logger.eval({"step": step, "val_bpb": v}, f"step {step} | val bpb {v:.4f}")   # an eval line
    with logger.paused(): ...   # evals, samples, checkpoints: excluded from tokens/s and MFU
    logger.close()

Records go to artifacts_dir("report")/<stage>_train.jsonl, which the report generator plots: started anew on a
fresh start (train.open_checkpoints has set a previous run's log aside with its checkpoints); on resume, the records of the steps being redone (training steps after start_step, evals from
start_step on) are dropped and new ones appended, so every step appears once. Only process 0 writes anything.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from nanochat_jax.common import artifacts_dir, is_main_process, write_atomically

SHORT_NAMES = {"lr_multiplier": "lrm"}  # progress-bar labels; grad_norm only goes to the JSONL
HIDDEN = ("grad_norm",)


class EMA:
    """Exponential moving average, debiased like Adam: after n updates, sum_i (1-b) b^(n-i) x_i / (1 - b^n)."""

    def __init__(self, beta: float = 0.9):
        self.beta, self.value, self.count = beta, 0.0, 0

    def update(self, x: float) -> float:
        self.value = self.beta * self.value + (1 - self.beta) * x
        self.count += 1
        return self.debiased

    @property
    def debiased(self) -> float:
        return self.value / (1 - self.beta ** self.count) if self.count else float("nan")


def mfu(flops_per_token: float | None, tokens_per_sec: float, peak_flops: float | None, num_devices: int):
    """Model FLOPs utilisation: achieved FLOP/s over the devices' combined peak; None when the peak is unknown."""
    if not peak_flops or not flops_per_token:
        return None
    return flops_per_token * tokens_per_sec / (peak_flops * num_devices)


def read_log(path: Path) -> list[dict]:
    """The records of a JSONL log; a line that is not JSON (the last one, cut short when a run was killed
    mid-write) is skipped with a warning naming the file."""
    records = []
    if not path.is_file():
        return records
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"WARNING: {path}:{number} is not a JSON record (cut short?); skipped", file=sys.stderr)
    return records


class StepLogger:
    """Per-step metrics of one training run (see the module docstring)."""

    def __init__(self, stage: str, total_steps: int, start_step: int = 0, flops_per_token: float | None = None,
                 peak_flops: float | None = None, num_devices: int = 1, append: bool = False, ema_beta: float = 0.9,
                 directory: Path | None = None, clock: Callable[[], float] = time.perf_counter):
        self.stage, self.total, self.start = stage, total_steps, start_step
        self.flops, self.peak, self.num_devices = flops_per_token, peak_flops, num_devices
        self.enabled = is_main_process()
        self.path = Path(directory or artifacts_dir("report")) / f"{stage}_train.jsonl"
        kept = [r for r in self._records() if self._before_start(r)] if append and self.enabled else []
        self.kept = kept  # the earlier sessions' records (process 0), e.g. for a best-so-far metric
        if self.enabled:  # written beside it, then renamed over it: a kill during the rewrite leaves the log whole
            write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        # a resumed run's wall time continues from its earlier sessions' (as logged up to the resumed step)
        self.prior_s = max((r.get("elapsed_s", 0.0) for r in kept if "loss" in r), default=0.0)
        self.paused_s = 0.0
        self.loss_ema = EMA(ema_beta)
        self.last: dict = {}
        for record in kept:  # the smoothed loss continues as if the run had never stopped
            if "loss" in record:
                self.loss_ema.update(record["loss"])
        self.clock = clock
        self.t_start = self.t_last = clock()
        tty = sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not self.enabled, dynamic_ncols=True,
                        mininterval=1.0 if tty else 30.0, desc=stage)

    def _records(self) -> list[dict]:
        return read_log(self.path)

    def _before_start(self, record: dict) -> bool:
        """Kept on resume: training records up to start_step, eval records before it (the resumed run redoes
        all the evaluations of start_step, so they stay in their order even when a kill cut them short)."""
        step = record.get("step", 0)
        return step <= self.start if "loss" in record else step < self.start

    @property
    def elapsed(self) -> float:
        """Wall time of the whole run: this session's plus, after a resume, the earlier sessions'."""
        return self.prior_s + self.clock() - self.t_start

    @property
    def train_seconds(self) -> float:
        """This session's wall time minus the paused() time: what tokens/s and MFU are measured against."""
        return self.clock() - self.t_start - self.paused_s

    @contextlib.contextmanager
    def paused(self):
        """Work inside (evals, samples, checkpoint saves) does not count in the next step's tokens/s and MFU."""
        t0 = self.clock()
        try:
            yield
        finally:
            dt = self.clock() - t0
            self.t_last += dt
            self.paused_s += dt

    def log(self, step: int, loss: float, tokens: int, **metrics) -> dict:
        """After optimizer step `step` (1-based count of steps done): `tokens` processed since the previous call.
        Returns the JSONL record: step, loss, loss_smooth, **metrics, tokens_per_sec, mfu, elapsed_s."""
        now = self.clock()
        dt, self.t_last = max(now - self.t_last, 1e-9), now
        tok_s = tokens / dt
        session = now - self.t_start
        elapsed = self.prior_s + session
        record = {"step": step, "loss": float(loss), "loss_smooth": self.loss_ema.update(float(loss)),
                  **{k: (None if v is None else float(v)) for k, v in metrics.items()},
                  "tokens_per_sec": tok_s, "mfu": mfu(self.flops, tok_s, self.peak, self.num_devices),
                  "elapsed_s": elapsed}
        done = step - self.start
        eta = session / done * (self.total - step) if done > 0 else float("nan")
        parts = [f"loss {record['loss_smooth']:.4f}"]
        parts += [f"{SHORT_NAMES.get(k, k)} {v:.3g}" for k, v in metrics.items() if k not in HIDDEN and v is not None]
        parts += [f"{tok_s:,.0f} tok/s", "MFU " + (f"{100 * record['mfu']:.1f}%" if record["mfu"] is not None else "n/a"),
                  f"ETA {eta / 60:.1f} min"]
        self.bar.set_postfix_str(" | ".join(parts), refresh=False)
        self.bar.update(step - self.bar.n)
        self.append(record)
        self.last = record  # the latest training record (a stage's final loss)
        return record

    def run_record(self, tokens_per_step: int | None = None) -> dict:
        """The fields every stage's summary has: steps and wall time; given the tokens per step also this session's
        tokens/s (compilation included, the paused evals not) and its MFU."""
        record = {"steps": self.total, "wall_time_s": self.elapsed}
        if tokens_per_step:
            tok_s = (self.total - self.start) * tokens_per_step / self.train_seconds
            record |= {"tokens_per_sec": tok_s, "mfu": mfu(self.flops, tok_s, self.peak, self.num_devices)}
        return record

    def eval(self, record: dict, message: str) -> None:
        """An evaluation result: a JSONL record (e.g. {"step", "val_bpb"}) and a line printed above the bar."""
        self.append(record)
        self.write(message)

    def append(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def write(self, message: str) -> None:
        if self.enabled:
            self.bar.write(message)

    def close(self) -> None:
        self.bar.close()


def save_summary(name: str, summary: dict) -> dict:
    """<home>/report/<name>.json, a script's summary for the report (written by process 0); returns it."""
    if is_main_process():
        write_atomically(artifacts_dir("report") / f"{name}.json", json.dumps(summary, indent=2))
    return summary
