"""The run report: what each stage leaves in artifacts_dir("report"), and report.md generated from it.

Stages write JSON there: tokenizer.json ({"train", "eval"}), <stage>_train.json (a summary) and
<stage>_train.jsonl (one record per logged step or eval) for stage in base/mid/sft/rl, base_loss.json,
base_eval.json (CORE) and chat_eval_<stage>.json. Anything else can be added with log_section(), which
writes a markdown section <slug>.md. generate() writes report.md: a header (date, git, software, hardware,
lines of code), one section per stage from whatever files exist, loss and bits-per-byte curves as PNG
files next to report.md, the extra sections, and nanochat's summary table with total wall time and cost.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from nanochat_jax.common import artifacts_dir
from nanochat_jax.progress import read_log

STAGES = ("base", "mid", "sft", "rl")
STAGE_TITLES = {"base": "Base model training", "mid": "Midtraining", "sft": "Chat SFT", "rl": "Chat RL"}
SUMMARY_ROWS = ("CORE", "ARC-Challenge", "ARC-Easy", "GSM8K", "HumanEval", "MMLU", "ChatCORE")
METRIC_WIDTH, VALUE_WIDTH = 15, 8  # summary table column widths (as nanochat)
SOURCE_SUFFIXES = (".py", ".md", ".rs", ".toml", ".sh", ".html")
REPO_ROOT = Path(__file__).resolve().parent.parent


def report_dir() -> Path:
    return artifacts_dir("report")


def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def format_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.3e}" if abs(v) >= 1e6 else f"{v:,.1f}" if abs(v) >= 1e3 else f"{v:.4f}"
    if isinstance(v, int) and not isinstance(v, bool) and v >= 10000:
        return f"{v:,}"
    return str(v)


def render_items(data) -> str:
    """Markdown for a dict ("- key: value" lines) or a list of dicts and strings (empty items skipped)."""
    items = data if isinstance(data, list) else [data]
    lines = []
    for item in items:
        if not item:
            continue
        if isinstance(item, str):
            lines.append(item.rstrip("\n"))
        else:
            lines += [f"- {k}: {format_value(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


def log_section(name: str, data: dict | list, directory: Path | None = None) -> Path:
    """Write (or overwrite) the extra section `name` of the report as <slug>.md."""
    slug = slugify(name)
    if not slug or slug == "report":
        raise ValueError(f"section name {name!r} is not usable (its file would be {slug or '(empty)'}.md)")
    path = (directory or report_dir()) / f"{slug}.md"
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    path.write_text(f"## {name}\ntimestamp: {stamp}\n\n{render_items(data)}\n")
    return path


# ---------------------------------------------------------------------------------------------
# Environment


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info(root: Path = REPO_ROOT) -> dict:
    status = _run(["git", "status", "--porcelain"], root)
    return {"commit": _run(["git", "rev-parse", "--short", "HEAD"], root) or "unknown",
            "branch": _run(["git", "rev-parse", "--abbrev-ref", "HEAD"], root) or "unknown",
            "dirty": bool(status), "message": (_run(["git", "log", "-1", "--pretty=%s"], root) or "")[:80]}


def source_files(root: Path = REPO_ROOT) -> list[Path]:
    listed = _run(["git", "ls-files"], root)
    if listed is not None:
        paths = [root / p for p in listed.splitlines()]
    else:
        paths = [p for p in root.rglob("*")
                 if not any(part.startswith(".") or part == "target" for part in p.relative_to(root).parts)]
    return sorted(p for p in paths if p.suffix in SOURCE_SUFFIXES and p.is_file())


def bloat(root: Path = REPO_ROOT) -> dict:
    """Size of the code: files, lines, characters, approximate tokens (4 characters each), dependencies."""
    texts = [p.read_text(errors="replace") for p in source_files(root)]
    chars = sum(len(t) for t in texts)
    deps = 0
    if (root / "pyproject.toml").is_file():
        import tomllib

        deps = len(tomllib.loads((root / "pyproject.toml").read_text()).get("project", {}).get("dependencies", []))
    return {"Characters": chars, "Lines": sum(len(t.splitlines()) for t in texts),
            "Files": len(texts), "Tokens (approx)": chars // 4, "Dependencies (pyproject)": deps}


def _memory_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError, AttributeError):
        return None


def header(train_summary: dict | None, root: Path = REPO_ROOT) -> str:
    import flax
    import jax
    import optax

    git = git_info(root)
    lines = ["# nanochat-jax training report", "",
             f"Generated: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}", ""]
    if train_summary and train_summary.get("run"):
        lines += [f"Run: {train_summary['run']}", ""]
    lines += ["## Environment", "", "### Git Information", f"- Branch: {git['branch']}",
              f"- Commit: {git['commit']} {'(dirty)' if git['dirty'] else '(clean)'}", f"- Message: {git['message']}",
              "", "### Hardware", f"- Platform: {platform.platform()}", f"- CPUs: {os.cpu_count()} logical"]
    memory = _memory_gb()
    if memory:
        lines.append(f"- Memory: {memory:.1f} GB")
    gpus = _run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"])
    if gpus:
        names = [g.strip() for g in gpus.splitlines()]
        lines.append(f"- GPUs: {len(names)}x {', '.join(sorted(set(names)))}")
    devices = jax.devices()
    lines.append(f"- JAX devices here: {len(devices)}x {devices[0].device_kind} ({jax.default_backend()})")
    if train_summary and train_summary.get("device"):
        d = train_summary["device"]
        lines.append(f"- Training devices: {d.get('num_devices')}x {d.get('device_kind')} ({d.get('backend')}), "
                     f"{d.get('num_processes', 1)} process(es)")
    if train_summary and train_summary.get("mesh"):
        lines.append("- Training mesh: " + ", ".join(f"{k}={v}" for k, v in train_summary["mesh"].items()))
    lines += ["", "### Software", f"- Python: {platform.python_version()}", f"- JAX: {jax.__version__}",
              f"- Flax: {flax.__version__}", f"- Optax: {optax.__version__}", "", "### Bloat"]
    lines += [f"- {k}: {v:,}" for k, v in bloat(root).items()]
    return "\n".join(lines) + "\n\n"


# ---------------------------------------------------------------------------------------------
# Sections


def read_json(path: Path) -> dict | None:
    """A script's summary, or None when there is none; one that cannot be read is said and left out."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        data = f"{type(e).__name__}: {e}"
    if not isinstance(data, dict):
        print(f"report: left out {path}: not a readable summary ({str(data)[:120]})", file=sys.stderr)
        return None
    return data


# (title, file suffix, [(JSONL key, label)]): a plot is made when any record of the stage has its first key
CURVES = (
    ("training loss", "train_loss", [("loss", "loss"), ("loss_smooth", "loss (smoothed)")]),
    ("validation bits per byte", "val_bpb", [("val_bpb", "val bpb")]),
    ("CORE estimate", "core", [("core_metric", "CORE")]),
    ("validation loss", "val_loss", [("val_loss", "val loss")]),
    ("mean reward", "reward", [("reward", "reward")]),
)


def plot_curves(directory: Path, stage: str) -> list[tuple[str, str]]:
    """PNG plots of <stage>_train.jsonl (the CURVES it has data for); returns (title, file name) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(directory / f"{stage}_train.jsonl")
    made = []
    for title, suffix, series in CURVES:
        rows = [r for r in records if r.get(series[0][0]) is not None]
        if not rows:
            continue
        name = f"{stage}_{suffix}.png"
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in series:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), label=label, marker="o" if len(points) < 20 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(series[0][1])
        ax.set_title(f"{stage}: {title}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(directory / name, dpi=100)
        plt.close(fig)
        made.append((f"{stage} {title}", name))
    return made


def _scalars(summary: dict, skip=()) -> dict:
    return {k: v for k, v in summary.items()
            if k not in skip and (v is None or isinstance(v, (str, int, float, bool)))}


def train_section(directory: Path, stage: str) -> str | None:
    summary = read_json(directory / f"{stage}_train.json")
    plots = plot_curves(directory, stage)
    if summary is None and not plots:
        return None
    out = [f"## {STAGE_TITLES[stage]}\n"]
    if summary:
        out.append(render_items(_scalars(summary, skip=("stage",))))
        if isinstance(summary.get("mesh"), dict):
            out.append("- mesh: " + ", ".join(f"{k}={v}" for k, v in summary["mesh"].items()) + "\n")
        out.append(_samples(summary.get("samples")))
    out += [f"![{title}]({name})\n" for title, name in plots]
    return "\n".join(s for s in out if s)


def _samples(samples) -> str:
    if not samples:
        return ""
    # as JSON string bodies (newlines shown as \n, one sample per line), but with the characters themselves
    return "Samples:\n\n" + "\n".join(f"- `{json.dumps(s, ensure_ascii=False)[1:-1]}`" for s in samples) + "\n"


def tokenizer_sections(directory: Path) -> list[str]:
    data = read_json(directory / "tokenizer.json") or {}
    out = []
    if data.get("train"):
        out.append("## Tokenizer training\n\n" + render_items(data["train"]))
    if data.get("eval"):
        ev = data["eval"]
        names = ["ours"] + list(ev.get("baselines", []))
        rows = ["| Text | Bytes | " + " | ".join(f"{n} bytes/token" for n in names) + " |",
                "|---|---|" + "---|" * len(names)]
        for kind, row in ev.get("texts", {}).items():
            ratios = " | ".join(f"{row.get(f'{n}_bytes_per_token', float('nan')):.2f}" for n in names)
            rows.append(f"| {kind} | {row.get('bytes', '-')} | {ratios} |")
        out.append(f"## Tokenizer evaluation\n\n- vocab_size: {ev.get('vocab_size')}\n\n" + "\n".join(rows) + "\n")
    return out


def base_loss_section(directory: Path) -> str | None:
    data = read_json(directory / "base_loss.json")
    if data is None:
        return None
    return "## Base model loss\n\n" + render_items(_scalars(data)) + "\n" + _samples(data.get("samples"))


def base_eval_section(directory: Path) -> str | None:
    data = read_json(directory / "base_eval.json")
    if data is None:
        return None
    rows = ["| Task | Accuracy | Centered |", "|---|---|---|"]
    rows += [f"| {label} | {acc:.4f} | {data['centered_results'][label]:.4f} |"
             for label, acc in data.get("results", {}).items()]
    info = {"step": data.get("step"), "CORE metric": data.get("core_metric"), "max_per_task": data.get("max_per_task"),
            "wall_time_s": data.get("wall_time_s")}
    return "## Base model evaluation\n\n" + render_items(info) + "\n" + "\n".join(rows) + "\n"


def chat_eval_section(directory: Path, stage: str) -> str | None:
    data = read_json(directory / f"chat_eval_{stage}.json")
    if data is None:
        return None
    info = {"step": data.get("step")}
    for name, accuracy in data.get("results", {}).items():
        info[name] = accuracy
        constant = data.get("constant_answer", {}).get(name)  # what answering one number every time scores
        if constant:
            info[f"{name} (answering {constant['answer']} every time)"] = constant["accuracy"]
    if data.get("ChatCORE") is not None:
        info["ChatCORE metric"] = data["ChatCORE"]
    info["wall_time_s"] = data.get("wall_time_s")
    text = f"## Chat evaluation {stage}\n\n" + render_items(info)
    for name, reason in data.get("unavailable", {}).items():
        text += f"- {name}: unavailable ({reason})\n"
    return text


# ---------------------------------------------------------------------------------------------
# Summary


def collect_metrics(directory: Path) -> dict[str, dict[str, float]]:
    """{stage: {metric: value}} for the summary table: CORE of the base model, chat-eval accuracies and ChatCORE."""
    metrics: dict[str, dict[str, float]] = {stage: {} for stage in STAGES}
    base = read_json(directory / "base_eval.json")
    if base and base.get("core_metric") is not None:
        metrics["base"]["CORE"] = base["core_metric"]
    for stage in STAGES:
        chat = read_json(directory / f"chat_eval_{stage}.json")
        if chat:
            metrics[stage].update(chat.get("results", {}))
            if chat.get("ChatCORE") is not None:
                metrics[stage]["ChatCORE"] = chat["ChatCORE"]
    return metrics


def summary_table(metrics: dict[str, dict[str, float]]) -> str:
    """nanochat's table: rows CORE, the chat tasks (alphabetical), ChatCORE; columns BASE MID SFT RL; '-' if missing."""
    names = set(SUMMARY_ROWS).union(*(m.keys() for m in metrics.values()))
    names = sorted(names, key=lambda x: (x != "CORE", x == "ChatCORE", x))
    lines = [f"| {'Metric'.ljust(METRIC_WIDTH)} |" + "".join(f" {s.upper().ljust(VALUE_WIDTH)} |" for s in STAGES),
             f"|{'-' * (METRIC_WIDTH + 2)}|" + "".join(f"{'-' * (VALUE_WIDTH + 2)}|" for _ in STAGES)]
    for name in names:
        cells = []
        for stage in STAGES:
            value = metrics.get(stage, {}).get(name)
            cells.append(f" {('-' if value is None else format_value(float(value))).ljust(VALUE_WIDTH)} |")
        lines.append(f"| {name.ljust(METRIC_WIDTH)} |" + "".join(cells))
    return "\n".join(lines) + "\n"


def wall_times(directory: Path) -> dict[str, float]:
    """Seconds spent per step of the pipeline, from the files that record it."""
    times = {}
    tok = (read_json(directory / "tokenizer.json") or {}).get("train") or {}
    if tok.get("train_seconds") is not None:
        times["tokenizer"] = float(tok["train_seconds"])
    files = [f"{s}_train.json" for s in STAGES] + ["base_eval.json"] + [f"chat_eval_{s}.json" for s in STAGES]
    for name in files:
        data = read_json(directory / name)
        if data and data.get("wall_time_s") is not None:
            times[name.removesuffix(".json")] = float(data["wall_time_s"])
    return times


GPU_HOUR_PRICE = 3.0  # dollars per GPU-hour: nanochat's $24/hour for 8 x H100


def generate(directory: Path | None = None, hourly_price: float | None = None, root: Path = REPO_ROOT) -> Path:
    """Write <report dir>/report.md (and its PNG plots) from whatever the stages left there. The cost line uses
    hourly_price, or without it GPU_HOUR_PRICE per GPU that base training ran on (none for CPU or TPU runs)."""
    directory = Path(directory or report_dir())
    train_summary = read_json(directory / "base_train.json")
    sections = tokenizer_sections(directory)
    for stage in STAGES:
        sections.append(train_section(directory, stage))
        if stage == "base":
            sections += [base_loss_section(directory), base_eval_section(directory)]
        sections.append(chat_eval_section(directory, stage))
    extra = sorted(p for p in directory.glob("*.md") if p.name != "report.md")
    sections += [p.read_text() for p in extra]

    times = wall_times(directory)
    total = sum(times.values())
    hours, minutes = int(total // 3600), int(total % 3600 // 60)
    head = header(train_summary, root)
    bloat_lines = head.split("### Bloat\n", 1)[1].strip()
    summary = ["## Summary", "", bloat_lines, "", summary_table(collect_metrics(directory))]
    summary += [f"- {name}: {seconds / 60:.1f} min" for name, seconds in times.items()]
    summary += ["", f"Total wall clock time: {hours}h{minutes}m" if times else "Total wall clock time: unknown"]
    device = (train_summary or {}).get("device") or {}
    if hourly_price is None and device.get("backend") == "gpu":
        hourly_price = GPU_HOUR_PRICE * device.get("num_devices", 1)
    if hourly_price is not None:
        summary.append(f"Estimated cost: ${total / 3600 * hourly_price:.2f} (at ${hourly_price:.2f}/hour)")
    path = directory / "report.md"
    path.write_text(head + "\n".join(s.rstrip("\n") + "\n" for s in sections if s) + "\n" + "\n".join(summary) + "\n")
    return path


def reset(directory: Path | None = None) -> list[Path]:
    """Delete everything in the report directory; returns what was removed."""
    import shutil

    directory = Path(directory or report_dir())
    removed = sorted(directory.iterdir())
    for p in removed:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return removed
