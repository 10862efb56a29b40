"""Checkpoints: Orbax save/restore of params, optimizer state, data-iterator state and metadata; load_model.

Layout: `<root>/<stage>/d<depth>/<step>/` with one Orbax item per part, where root is `<home>/checkpoints` or
`$NANOCHAT_JAX_CHECKPOINTS` (a multi-host run needs a root every host sees; Checkpointer checks that it does):
- params: the pure nested dict of parameter arrays (possibly sharded: each process writes its own shards);
- opt_state: the optax state pytree;
- data: {"process_count": n, "states": [iterator state of process 0, 1, ...]} (JSON, gathered from all
  processes at save time, since every process reads different documents);
- meta: JSON: step, stage, resolved config, model config dict, tokenizer directory ("tokenizer": relative to the
  artifacts home when inside it, so a copied home works) and its fingerprint, ...
Saving is asynchronous (Orbax writes in the background; `wait()` blocks until it is on disk) and keeps the
newest `keep` steps. Orbax writes a step in `<step>.orbax-checkpoint-tmp` and renames it when complete, so a kill
during a save leaves that temporary directory, which no listing counts; `set_aside_unfinished` and `set_aside`
(used when a run resumes) move such leftovers and steps that fail to restore to `<directory>.broken/`, and a new
run moves what a previous run left (and its metrics log) to `<directory>.previous-<n>/` (`set_aside_previous_run`):
nothing is deleted.
Restoring takes abstract targets (`jax.ShapeDtypeStruct` with a sharding), so a checkpoint written on one mesh
restores onto any other mesh.

`load_model(stage)` rebuilds an nnx GPT from the latest checkpoint of a stage for inference. With mesh=None
the parameters land on one device (the first local one): right for chat/eval of small models; pass a mesh
to shard a large model.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from nanochat_jax.common import UserError, artifacts_dir
from nanochat_jax.distributed import errors_anywhere, gather_json

STAGE_SCRIPTS = {"base": "scripts/base_train.py", "mid": "scripts/mid_train.py", "sft": "scripts/chat_sft.py",
                 "rl": "scripts/chat_rl.py"}


class CheckpointError(UserError, RuntimeError):
    """A missing, incomplete or corrupt checkpoint; the message names the directory."""


class BrokenCheckpoint(CheckpointError):
    """A checkpoint whose files are incomplete or corrupt (not one that is sound but unfit for this run)."""


CHECKPOINTS_ENV = "NANOCHAT_JAX_CHECKPOINTS"


def checkpoints_root() -> Path:
    """$NANOCHAT_JAX_CHECKPOINTS (storage that every host of a multi-host run sees), else <home>/checkpoints."""
    root = os.environ.get(CHECKPOINTS_ENV)
    return Path(root).expanduser() if root else artifacts_dir("checkpoints", create=False)


def checkpoint_dir(stage: str, depth: int) -> Path:
    path = checkpoints_root() / stage / f"d{depth}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _check_shared(directory: Path) -> None:
    """With several processes, CheckpointError on every process unless all of them see `directory` as one
    place: each process writes its own shards of a checkpoint and process 0 finishes it, so a directory on
    each host's local disk would give checkpoints that no host can restore, found out only at the end."""
    if jax.process_count() == 1:
        return
    import secrets

    from jax.experimental import multihost_utils

    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".shared-check-{gather_json(secrets.token_hex(8))[0]}"
    error = None
    if jax.process_index() == 0:
        try:
            probe.touch()
        except OSError as e:
            error = f"{type(e).__name__}: {e}"
    if errors := errors_anywhere(error):
        raise CheckpointError(f"process 0 cannot write to {directory}: {errors[0]}")
    multihost_utils.sync_global_devices("checkpoint: shared-storage probe written")
    blind = [i for i, seen in enumerate(gather_json(probe.exists())) if not seen]
    if jax.process_index() == 0:
        probe.unlink()
    if blind:
        raise CheckpointError(f"processes {blind} cannot see {directory} as process 0 does: every host of a "
                              f"multi-host run must write checkpoints to the same storage; set {CHECKPOINTS_ENV} "
                              "(or NANOCHAT_JAX_HOME) to a directory on a mount all hosts share")


def set_aside_previous_run(directory, also: tuple[Path, ...] = ()) -> Path | None:
    """A new run in `directory`: whatever a previous run left there (checkpoints, saves a kill cut short, its
    config.toml) and the files of `also` that exist (its metrics log, which the new run would overwrite) move to
    `<directory>.previous-<n>/`, n one more than the highest already there, so the new run neither trips over
    their step numbers nor mixes its checkpoints with theirs, and nothing is ever deleted. Says so in one line;
    returns the new directory (None when there was nothing to move)."""
    directory = Path(directory).absolute()
    _check_shared(directory)
    left = sorted(p for p in directory.glob("*") if not p.name.startswith(".")) + [Path(p) for p in also
                                                                                 if Path(p).exists()]
    previous = None
    if left:
        taken = [int(p.name.rsplit("-", 1)[1]) for p in directory.parent.glob(f"{directory.name}.previous-*")
                 if p.name.rsplit("-", 1)[1].isdigit()]
        previous = directory.with_name(f"{directory.name}.previous-{max(taken, default=0) + 1}")
    if previous and jax.process_index() == 0:
        previous.mkdir()
        for path in left:
            shutil.move(path, previous / path.name)  # (the log may be on another disk than the checkpoints)
        steps = sorted((p.name for p in left if p.name.isdigit()), key=int)
        print(f"new run: moved the previous run in {directory} (steps {', '.join(steps) or 'none'}) to {previous}; "
              "--train.resume=true continues a run instead", file=sys.stderr)
    if jax.process_count() > 1:  # the others wait until process 0 has moved them
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("checkpoint: previous run set aside")
    return previous


class Checkpointer:
    """Numbered checkpoints of one run in `directory` (see the module docstring)."""

    def __init__(self, directory, keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        _check_shared(self.directory)
        self._bytes = 0  # the arrays of the latest save, about the space a checkpoint takes
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("params", "opt_state", "data", "meta"))

    def save(self, step: int, params, opt_state, data_state: dict | None, meta: dict, wait: bool = False) -> None:
        """Start writing checkpoint `step`; it returns before the write is done unless wait=True. Use wait=True
        for a run's last checkpoint: a write still under way when the process dies (say, a crash in the evaluation
        that follows) is lost. opt_state may be None (e.g. an imported model): such a checkpoint loads but cannot
        resume training."""
        data = {"process_count": jax.process_count(), "states": gather_json(data_state)}
        items = dict(params=ocp.args.StandardSave(params), data=ocp.args.JsonSave(data), meta=ocp.args.JsonSave(meta))
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self._bytes = sum(leaf.nbytes for leaf in jax.tree.leaves((params, opt_state)))
        with self._disk_full_said():  # (an asynchronous save's failure comes out at the next save or wait)
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        if wait:
            self.wait()

    @contextlib.contextmanager
    def _disk_full_said(self):
        """A save that ran out of disk space: CheckpointError in one line naming the directory, the space a
        checkpoint needs (as the newest complete one takes, else its arrays' bytes) and the space free; the
        complete checkpoints before it are untouched."""
        try:
            yield
        except Exception as e:
            if os.strerror(errno.ENOSPC) not in str(e):
                raise
            steps = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
            need = sum(f.stat().st_size for f in (self.directory / str(steps[-1])).rglob("*") if f.is_file()) \
                if steps else self._bytes
            intact = f"; step {steps[-1]} is intact: resume from it with --train.resume=true" if steps else ""
            raise CheckpointError(f"no space left on the disk of {self.directory} for a checkpoint: it needs about "
                                  f"{_mib(need)} free there, {_mib(shutil.disk_usage(self.directory).free)} "
                                  f"are free; free some space (or set {CHECKPOINTS_ENV} to a larger disk){intact}"
                                  ) from None

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def _check_step(self, step: int) -> Path:
        path = self.directory / str(step)
        self._manager.reload()  # pick up steps written by another process or run
        if step not in self.all_steps():
            have = ", ".join(map(str, self.all_steps())) or "none"
            raise CheckpointError(f"no complete checkpoint for step {step} in {self.directory} (steps: {have})")
        return path

    def _restore(self, step: int, **items):
        path = self._check_step(step)
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            if "not compatible with the stored shape" in str(e):  # a sound checkpoint of another model size
                raise CheckpointError(f"checkpoint {path} holds a model of another size than this run's ("
                                      f"{str(e).splitlines()[0][:200]}): resume with the [model] settings it was "
                                      "trained with (its metadata's \"model\"), or start a new run") from None
            if "tree structures do not match" in str(e):  # a sound checkpoint of other optimizer settings
                raise CheckpointError(f"checkpoint {path} holds an optimizer state of another structure than this "
                                      "run's: [optim] settings that add or remove a part of it (grad_clip or "
                                      "muon_weight_decay 0 or not, normuon, ...) differ; resume with the settings "
                                      f"in {self.directory / 'config.toml'}, or start a new run") from None
            earlier = [s for s in self.all_steps() if s < step]
            way_out = f" (remove {path} to fall back to step {earlier[-1]})" if earlier else ""
            raise BrokenCheckpoint(f"checkpoint {path} is incomplete or corrupt{way_out}: {type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:500]}") from None

    def read_meta(self, step: int) -> dict:
        return dict(self._restore(step, meta=ocp.args.JsonRestore())["meta"])

    def restore(self, step: int, abstract_params, abstract_opt_state=None) -> dict:
        """{"params", "opt_state" (None unless asked for), "data" (this process's iterator state), "meta"}.

        abstract_*: pytrees of jax.ShapeDtypeStruct with the target shardings (any mesh). The data state is
        None when the checkpoint was written by a different number of processes (the data order restarts)."""
        items = dict(params=ocp.args.StandardRestore(abstract_params), data=ocp.args.JsonRestore(),
                     meta=ocp.args.JsonRestore())
        if abstract_opt_state is not None:
            self._check_opt_state(step)
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        restored = self._restore(step, **items)
        data = restored["data"]
        state = None
        if data["process_count"] == jax.process_count():
            state = data["states"][jax.process_index()]
        else:
            print(f"WARNING: checkpoint {self.directory / str(step)} was written by {data['process_count']} processes, "
                  f"this run has {jax.process_count()}: the data iterator starts from the beginning",
                  file=sys.stderr, flush=True)
        return {"params": restored["params"], "opt_state": restored.get("opt_state"), "data": state,
                "meta": dict(restored["meta"])}

    def restore_opt_state(self, step: int, abstract_opt_state):
        """The optimizer state of `step` alone, into abstract_opt_state's shardings (another run's moments to start
        from: its parameters and data position are not read)."""
        self._check_opt_state(step)
        return self._restore(step, opt_state=ocp.args.StandardRestore(abstract_opt_state))["opt_state"]

    def _check_opt_state(self, step: int) -> None:
        if not (self._check_step(step) / "opt_state").exists():
            raise CheckpointError(f"checkpoint {self.directory / str(step)} has no optimizer state (an imported "
                                  "model): it loads as a model but cannot resume training")

    def set_aside(self, step: int, why: str) -> None:
        """Move step `step` (a broken one) to `<directory>.broken/`, saying so in one line; its step number is
        then free for this run's next save of it."""
        if jax.process_index() == 0:
            self._move_broken(self.directory / str(step), f"skipped step {step}: {why}")
        self._after_process_0("checkpoint: broken step set aside")

    def set_aside_unfinished(self) -> None:
        """Move the temporary directories of saves that a kill cut short to `<directory>.broken/` (one line each).
        Process 0 lists and moves them (a list made by each process could miss one process 0 has moved)."""
        if jax.process_index() == 0:
            for path in sorted(self.directory.glob("*.orbax-checkpoint-tmp*")):
                step = path.name.split(".")[0]
                self._move_broken(path, f"skipped step {step}: its save was cut short (Orbax never finished "
                                        f"{path.name})")
        self._after_process_0("checkpoint: unfinished saves set aside")

    def _move_broken(self, path: Path, line: str) -> None:
        broken = self.directory.with_name(self.directory.name + ".broken")
        broken.mkdir(exist_ok=True)
        target, n = broken / path.name, 1
        while target.exists():  # an earlier broken copy of the same step stays too
            target, n = broken / f"{path.name}.{n}", n + 1
        path.rename(target)
        print(f"resume: {line}; moved it to {target}", file=sys.stderr, flush=True)

    def _after_process_0(self, what: str) -> None:
        """Every process waits for process 0's moves, then sees the steps as they are now."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(what)
        self._manager.reload()

    def wait(self) -> None:
        with self._disk_full_said():
            self._manager.wait_until_finished()

    def close(self, quiet: bool = False) -> None:
        """Wait for the saves in flight, then stop Orbax's threads. quiet: an error doing so is dropped (another
        error, the one to report, is already on its way)."""
        try:
            self.wait()
        except Exception:
            if not quiet:
                raise
            return
        self._manager.close()


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _depth_dirs(stage: str) -> tuple[Path, list[Path]]:
    root = checkpoints_root() / stage
    dirs = [d for d in root.glob("d*") if d.is_dir() and d.name[1:].isdigit() and any(
        s.is_dir() and s.name.isdigit() for s in d.iterdir())] if root.is_dir() else []
    return root, dirs


def find_checkpoint(stage: str, depth: int | None = None, step: int | None = None,
                    preferred_depth: int | None = None) -> tuple[Path, int]:
    """(run directory, step): the given depth; else preferred_depth when the stage has it (with that step, when given:
    a run's --model.depth); else the most recently written depth (with only a step given: the most recently written
    one that has it: an imported model, or a run trained with another --model.depth); the given step or the latest."""
    root, dirs = _depth_dirs(stage)
    hint = f"; run {STAGE_SCRIPTS[stage]} first" if stage in STAGE_SCRIPTS else ""
    present = sorted((d.name for d in dirs), key=lambda name: int(name[1:]))
    if depth is None and preferred_depth is not None:
        preferred = root / f"d{preferred_depth}"
        if preferred in dirs and (step is None or (preferred / str(step)).is_dir()):
            depth = preferred_depth
    if depth is not None:
        dirs = [d for d in dirs if d.name == f"d{depth}"]
    if not dirs:
        what = f"stage '{stage}'" + (f" at depth {depth}" if depth is not None else "")
        there = f" (depths there: {', '.join(present)})" if present else ""
        raise CheckpointError(f"no checkpoints for {what} under {root}{there}{hint}")
    if depth is None and step is not None:  # --step alone: the newest depth that has that step
        dirs = [d for d in dirs if (d / str(step)).is_dir()] or dirs
    directory = max(dirs, key=lambda d: max(s.stat().st_mtime for s in d.iterdir() if s.name.isdigit()))
    steps = sorted(int(s.name) for s in directory.iterdir() if s.is_dir() and s.name.isdigit())
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {directory} (steps: {', '.join(map(str, steps))})")
    return directory, step


def check_tokenizer(meta: dict, directory, checkpoint: Path) -> None:
    """CheckpointError unless the tokenizer in `directory` (as metadata names it; None: the trained one) is the
    one the checkpoint recorded; a retrained or replaced one would feed the model other token ids. Checkpoints
    written before the fingerprint was recorded pass."""
    from nanochat_jax.tokenizer import tokenizer_dir, tokenizer_fingerprint

    recorded = meta.get("tokenizer_fingerprint")
    if recorded and recorded != tokenizer_fingerprint(directory):
        raise CheckpointError(f"the tokenizer in {tokenizer_dir(directory)} is not the one checkpoint "
                              f"{checkpoint} was trained with (retrained or replaced since), so the model would read "
                              "other token ids: restore that tokenizer or train the model again")


def load_model(stage: str, step: int | None = None, depth: int | None = None, mesh=None,
               preferred_depth: int | None = None):
    """(model, tokenizer, meta) from a checkpoint of a stage ('base', 'mid', 'sft', 'rl'); see find_checkpoint."""
    from flax import nnx

    from nanochat_jax.config import MeshConfig, model_config_from_dict
    from nanochat_jax.model import init_model, runnable_on
    from nanochat_jax.sharding import make_mesh, param_shardings
    from nanochat_jax.tokenizer import load_tokenizer, tokenizer_dir

    directory, step = find_checkpoint(stage, depth, step, preferred_depth)
    ckpt = Checkpointer(directory, async_save=False)
    try:
        meta = ckpt.read_meta(step)
        if "model" not in meta:
            raise CheckpointError(f"checkpoint {directory / str(step)} has no model config in its metadata")
        if mesh is None:
            mesh = make_mesh(MeshConfig(1, 1, 1), jax.local_devices()[:1])
        model_cfg = runnable_on(model_config_from_dict(meta["model"]), mesh.devices.flat[0].platform)
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: init_model(model_cfg)), nnx.Param)
        shardings = param_shardings(abstract, mesh)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              nnx.to_pure_dict(abstract), shardings)
        params = ckpt.restore(step, target)["params"]
    finally:
        ckpt.close()
    nnx.replace_by_pure_dict(abstract, params)
    model = nnx.merge(graphdef, abstract)
    tokenizer = load_tokenizer(meta.get("tokenizer"))
    check_tokenizer(meta, meta.get("tokenizer"), directory / str(step))
    if tokenizer.vocab_size > model_cfg.vocab_size:  # (a model's table may be padded past the tokenizer's size)
        raise CheckpointError(f"the tokenizer in {tokenizer_dir(meta.get('tokenizer'))} has {tokenizer.vocab_size} "
                              f"tokens, more than the {model_cfg.vocab_size} of checkpoint {directory / str(step)}: "
                              "not its tokenizer")
    return model, tokenizer, meta


def checkpoint_meta(stage: str, step: int, cfg, model_cfg, tokenizer: str | None = None,
                    fingerprint: str | None = None, **extra) -> dict:
    """A checkpoint's metadata: step, stage, the run's config, the model config, the tokenizer (a record as
    tokenizer_record makes; default: the trained one) with its fingerprint, and `extra`. fingerprint: the one
    taken when the run loaded its tokenizer (default: the file's now; a training run passes its own, so that a
    tokenizer retrained while it runs does not get stamped on a model trained with the old token ids)."""
    from nanochat_jax.config import to_dict
    from nanochat_jax.tokenizer import default_tokenizer_dir, tokenizer_fingerprint, tokenizer_record

    tokenizer = tokenizer or tokenizer_record(default_tokenizer_dir())
    return {"step": step, "stage": stage, "config": to_dict(cfg), "model": to_dict(model_cfg),
            "tokenizer": tokenizer, "tokenizer_fingerprint": fingerprint or tokenizer_fingerprint(tokenizer), **extra}
