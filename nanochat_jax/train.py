"""Training: the state, the one jit-compiled pure step, and the loop base, mid and SFT share.

`TrainRun` builds parameters directly on the mesh (each device materialises only its shards) and the optimizer
state with the same shardings; `run.step(batch)` takes an optimizer step: gradient accumulation over the leading
micro-batch axis of `batch` runs inside the jit (`lax.scan`), the state is donated, and metrics stay on device,
so the host only feeds batches and reads metrics when it logs. `run_stage` is the loop around it (checkpoints,
evals, logging, resume); RL calls `run.step` from its own. `StopSignal` turns SIGTERM / Ctrl-C into a checkpoint
at the next step boundary and a clean exit.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import sys
import threading
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from nanochat_jax import splash
from nanochat_jax.common import artifacts_dir, device_info, is_main_process, peak_flops_per_device, print0
from nanochat_jax.config import (RUNTIME_MODEL_FIELDS, Config, ConfigError, ModelConfig, OptimConfig,
                                 model_config_from_dict, to_dict, to_toml)
from nanochat_jax.distributed import errors_anywhere
from nanochat_jax.model import NATIVE_PLATFORMS, init_model, train_in_fp8
from nanochat_jax.optim import build_optimizer, depth_scaling, lr_multiplier, scaling_param_count
from nanochat_jax.progress import StepLogger
from nanochat_jax.sharding import (batch_shards, check_rows_per_process, like_params, named_sharding, param_shardings,
                                   replicated)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # pure nested dict of fp32 arrays, sharded by the rule table
    opt_state: Any


def check_resumable(meta: dict, model_cfg: ModelConfig, seed: int | None, checkpoint) -> None:
    """SystemExit unless the checkpoint was written for this architecture (every [model] field but the runtime
    ones; some changes, like head_dim, keep every parameter's shape and would otherwise restore silently) and,
    when given, this data seed (the saved data position indexes the shuffled order the seed makes)."""
    saved_model = model_config_from_dict(meta["model"]) if "model" in meta else model_cfg
    changed = [f"model.{name}: checkpoint {getattr(saved_model, name)!r}, this run {getattr(model_cfg, name)!r}"
               for name in to_dict(model_cfg)
               if name not in RUNTIME_MODEL_FIELDS and getattr(saved_model, name) != getattr(model_cfg, name)]
    saved_seed = meta.get("config", {}).get("train", {}).get("seed", seed)
    if seed is not None and saved_seed != seed:
        changed.append(f"train.seed: checkpoint {saved_seed!r}, this run {seed!r}")
    if changed:
        raise SystemExit(f"--train.resume: checkpoint {checkpoint} was written by a run with other settings "
                         f"({'; '.join(changed)}); resume with the checkpoint's settings, or start a new run "
                         f"without --train.resume")


class StopSignal:
    """SIGTERM or Ctrl-C (SIGINT) sets `requested` (the signal's name); the training loop reads it at each step
    boundary, saves a checkpoint there and calls `exit`. A second Ctrl-C ends the process at once, unsaved.
    Single-process runs only: several processes would first have to agree on the step (a collective every
    step), so there the signals keep their default effect."""

    def __init__(self):
        self.requested, self._previous = None, {}
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def close(self) -> None:
        """Give the signals their previous handlers back (the loop is over)."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            os.write(2, b"second Ctrl-C: exiting now, without a checkpoint\n")
            os._exit(130)
        self.requested = signal.Signals(signum).name

    def exit(self, ckpt, step: int) -> None:
        """Wait for the checkpoint of `step`, say how to resume, end the process with exit code 0."""
        self.close()
        ckpt.close()
        resume = [] if sys.argv[-1] == "--train.resume=true" else ["--train.resume=true"]  # (the last one counts)
        print(f"{self.requested}: stopped at step {step}, checkpoint {ckpt.directory / str(step)}; resume with: "
              f"python {shlex.join(sys.argv + resume)}", flush=True)
        raise SystemExit(0)


def rows_and_accum(device_batch_size: int, per_step: int, row_len: int, mesh: Mesh, setting: str) -> tuple[int, int]:
    """(global rows per micro-batch, micro-steps per optimizer step) for `per_step` tokens of rows of row_len
    tokens (row_len=1: per_step rows, e.g. conversations); ConfigError naming `setting` unless it divides. When
    one micro-batch of device_batch_size rows would hold more than a whole step (many devices), each device takes
    fewer rows: the step stays per_step."""
    shards = batch_shards(mesh)
    if per_step < device_batch_size * shards * row_len and per_step % (shards * row_len) == 0:
        print0(f"{setting}={per_step} is less than one micro-batch of {device_batch_size} rows on each of {shards} "
               f"devices: {per_step // (shards * row_len)} rows per device")
        device_batch_size = per_step // (shards * row_len)
    rows = device_batch_size * shards
    if per_step % (rows * row_len):
        raise ConfigError(f"{setting}={per_step} is not a multiple of the {rows * row_len} per micro-batch (= "
                          f"device_batch_size {device_batch_size} x batch-sharded devices {batch_shards(mesh)}"
                          + (f" x sequence_len {row_len})" if row_len > 1 else ")"))
    return rows, per_step // (rows * row_len)


def microbatch_sharding(mesh: Mesh, ndim: int = 3):
    """Batches fed to the train step are (micro_steps, rows, T): rows sharded over (data, fsdp)."""
    return named_sharding(mesh, (None, "batch") + (None,) * (ndim - 2))


def global_batch(local_batches: list[dict], mesh: Mesh) -> dict:
    """Stack this process's micro-batches into global (A, B, T) arrays sharded over the mesh."""
    sharding = microbatch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.stack([b[k] for b in local_batches]))
            for k in local_batches[0]}


def lm_loss(model, micro: dict) -> jax.Array:
    """The default objective: mean next-token cross-entropy (targets -1 ignored, optional per-token mask)."""
    return model.loss(micro["inputs"], micro["targets"], micro.get("mask"))


def summed_grads(graphdef, params, batch: dict, objective: Callable = lm_loss):
    """(gradients summed over the micro-steps, per-micro-step losses): one value_and_grad per slice of the
    batch's leading micro-step axis, accumulated in a lax.scan (the forward+backward half of a train step)."""

    def accumulate(grads, micro):
        loss, micro_grads = jax.value_and_grad(lambda p: objective(nnx.merge(graphdef, p), micro))(params)
        return jax.tree.map(jnp.add, grads, micro_grads), loss

    return jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params), batch)


def fp8_capable(device) -> bool:
    """Whether train.fp8 applies on this device (prints why not): NVIDIA GPUs with fp8 tensor cores (compute
    capability >= 8.9: Ada, Hopper, Blackwell) run the GEMMs in fp8, CPUs emulate them (tests, the planner's
    checks); elsewhere (TPUs, older GPUs) training stays in the compute dtype, as master ignores --fp8 off CUDA."""
    capability = getattr(device, "compute_capability", None)
    if device.platform == "cpu" or (device.platform in ("gpu", "cuda") and
                                    (capability is None or tuple(map(int, str(capability).split("."))) >= (8, 9))):
        return True
    print0(f"WARNING: train.fp8 ignored: {device.device_kind} has no fp8 matmuls this port uses (NVIDIA compute "
           "capability >= 8.9); training in the compute dtype")
    return False


def out_of_memory_advice(shape: tuple[int, int, int], mesh: Mesh, error: str) -> str:
    """What to change when a train step of batch shape (micro_steps, rows, T) does not fit in device memory."""
    rows = batch_shards(mesh)
    first_line = error.strip().splitlines()[0][:300]
    return (f"the train step ran out of device memory with {shape[1] // rows} rows of {shape[2]} tokens per device "
            f"and micro-batch: lower --train.device_batch_size (gradient accumulation keeps total_batch_size), "
            f"or set --model.remat=dots_saveable (or block) or --model.loss_chunk=256; scripts/plan.py compiles "
            f"the memory per device. XLA said: {first_line}")


def resolve_depth_scaling(cfg: Config) -> tuple[OptimConfig, int | None]:
    """Base training's optimizer settings and horizon parameter count: [optim] and None, or with
    optim.reference_depth set, nanochat master's depth scaling (printed), which also resolves
    train.total_batch_size = -1 to the power-law batch. [optim] itself is kept, so a rerun derives the same."""
    if not cfg.optim.reference_depth:
        return cfg.optim, None

    def scaling_params(model_cfg: ModelConfig) -> int:  # blocks + lm_head, without allocating
        return scaling_param_count(nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: init_model(model_cfg)),
                                                              nnx.Param)))

    scaling = depth_scaling(cfg.optim, cfg.train, scaling_params(cfg.model),
                            scaling_params(dataclasses.replace(cfg.model, depth=cfg.optim.reference_depth)))
    print0(scaling.summary(cfg.model.depth, cfg.optim.reference_depth))
    cfg.train.total_batch_size = scaling.total_batch_size
    return scaling.optim, scaling.scaling_params


class TrainRun:
    """One model in training: the graphdef, optimizer, state shardings, the state and the jit-compiled step.

    `step(batch)` takes one optimizer step on a batch of arrays shaped (micro_steps, rows, T) and returns its
    metrics (on device); `resume` continues from a checkpoint. params: start from these (a pure dict, e.g. a
    loaded checkpoint's) instead of a fresh init; the optimizer state always starts fresh. objective(model, micro)
    -> scalar loss, lm_loss by default (RL passes a policy-gradient one). abstract=True builds everything but
    the arrays: the state is ShapeDtypeStructs carrying their shardings, for lowering the step (the planner).
    fp8=True (train.fp8): the step's products in fp8 (model.train_in_fp8; `fp8_layers` counts the layers switched,
    0 where fp8 does not apply); `graphdef`, what evaluations and samples merge the parameters into, keeps the
    compute dtype."""

    def __init__(self, model_cfg: ModelConfig, optim_cfg: OptimConfig, num_iterations: int, mesh: Mesh,
                 seed: int = 0, params=None, objective: Callable = lm_loss, abstract: bool = False,
                 fp8: bool = False):
        self.model_cfg, self.optim_cfg, self.num_iterations, self.mesh = model_cfg, optim_cfg, num_iterations, mesh
        self.objective = objective
        warmdown = round(optim_cfg.warmdown_ratio * num_iterations)
        if optim_cfg.warmup_steps + warmdown > num_iterations:  # (the ratios are checked by OptimConfig)
            raise ConfigError(f"optim.warmup_steps={optim_cfg.warmup_steps} and the warm-down's {warmdown} steps "
                              f"(optim.warmdown_ratio={optim_cfg.warmdown_ratio:g}) do not fit in {num_iterations} "
                              "steps: the learning rate would never decay; lower warmup_steps or train longer")
        if model_cfg.compute_dtype == "float16":  # (gradients of 1/tokens-sized logits flush to zero in float16)
            raise ConfigError("model.compute_dtype='float16' cannot train: its gradients underflow without loss "
                              "scaling (nanochat's GradScaler), which this port does not have; use bfloat16 or float32")
        platform = mesh.devices.flat[0].platform
        if model_cfg.attention_impl == "cudnn" and platform not in NATIVE_PLATFORMS["cudnn"]:
            raise ConfigError(f"model.attention_impl='cudnn' runs on NVIDIA GPUs only, not on this run's {platform} "
                              "devices; use xla")
        check_rows_per_process(mesh)  # (each process feeds its own rows)
        splash.prepare(model_cfg, mesh)  # the kernel built outside the step's trace serves every mesh
        self.optimizer = build_optimizer(optim_cfg, model_cfg.n_embd, num_iterations)
        model = nnx.eval_shape(lambda: init_model(model_cfg, seed))
        self.graphdef, abstract_params = nnx.split(model, nnx.Param)
        self.step_graphdef, self.fp8_layers = self.graphdef, 0
        if fp8 and fp8_capable(mesh.devices.flat[0]):
            self.fp8_layers, layers = train_in_fp8(model)
            self.step_graphdef = nnx.graphdef(model)
            emulated = "; on CPU it is emulated: for checking the numbers, not for speed" if platform == "cpu" else ""
            print0(f"fp8 training: {self.fp8_layers} of {layers} linear layers (the others: under 128 wide or not a "
                   f"multiple of 16){emulated}")
        shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=nnx.to_pure_dict(abstract_params),
                            opt_state=jax.eval_shape(self.optimizer.init, nnx.to_pure_dict(abstract_params)))
        params_sh = param_shardings(abstract_params, mesh)
        self.shardings = TrainState(step=replicated(mesh), params=params_sh,
                                    opt_state=like_params(shapes.opt_state, params_sh, mesh))
        self.jitted = jax.jit(self._train_step, in_shardings=(self.shardings, microbatch_sharding(mesh)),
                              out_shardings=(self.shardings, replicated(mesh)), donate_argnums=0)
        if abstract:
            self.state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      shapes, self.shardings)
        else:
            if params is not None:
                params = jax.device_put(params, self.shardings.params)
            self.state = jax.jit(self._create, static_argnums=1, out_shardings=self.shardings)(params, seed)

    def _create(self, params, seed: int) -> TrainState:
        if params is None:
            params = nnx.to_pure_dict(nnx.split(init_model(self.model_cfg, seed), nnx.Param)[1])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params))

    def _train_step(self, state: TrainState, batch: dict):
        num_micro = batch["inputs"].shape[0]
        grads, losses = summed_grads(self.step_graphdef, state.params, batch, self.objective)
        grads = jax.tree.map(lambda g: g / num_micro, grads)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        metrics = {"loss": jnp.mean(losses), "grad_norm": optax.tree.norm(grads),
                   "lr_multiplier": lr_multiplier(state.step, self.num_iterations, self.optim_cfg),
                   "num_tokens": jnp.sum(batch["targets"] >= 0)}  # the supervised ones
        params = optax.apply_updates(state.params, updates)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    @property
    def params(self):
        return self.state.params

    def step(self, batch: dict) -> dict:
        """One optimizer step: the state advances, the step's metrics come back (on device, not synced)."""
        with jax.set_mesh(self.mesh):  # lets the model pin its activations' sharding (sharding.constrain)
            try:
                self.state, metrics = self.jitted(self.state, batch)
            except jax.errors.JaxRuntimeError as e:
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                raise MemoryError(out_of_memory_advice(batch["inputs"].shape, self.mesh, str(e))) from e
        return metrics

    def save(self, ckpt, step: int, data_state: dict | None, meta: dict, wait: bool = False) -> None:
        ckpt.save(step, self.state.params, self.state.opt_state, data_state, meta, wait=wait)

    def warm_start(self, ckpt, step: int, source_optim: OptimConfig) -> int:
        """nanochat master's SFT warm start: the optimizer moments (momentum and second-moment buffers) of step
        `step` of another run's checkpoints, whose optimizer was built from source_optim, restored into this run's
        shardings. A moment is taken where this state has one at the same path with the same shape and dtype;
        step counts and hyperparameters (learning rates, betas, weight decay) stay this run's. Returns how many
        arrays were taken; CheckpointError when the checkpoint has no optimizer state or another structure."""
        source = build_optimizer(source_optim, self.model_cfg.n_embd, self.num_iterations)
        params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), self.state.params)
        shapes = jax.eval_shape(source.init, params)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                                like_params(shapes, self.shardings.params, self.mesh))
        loaded = {jax.tree_util.keystr(path): leaf for path, leaf in
                  jax.tree_util.tree_leaves_with_path(ckpt.restore_opt_state(step, abstract))}
        taken = []

        def take(path, fresh):
            key = jax.tree_util.keystr(path)
            old = loaded.get(key)
            if (old is None or "hyperparams" in key or not jnp.issubdtype(fresh.dtype, jnp.floating)
                    or (old.shape, old.dtype) != (fresh.shape, fresh.dtype)):
                return fresh
            taken.append(key)
            return old

        self.state = self.state.replace(opt_state=jax.tree_util.tree_map_with_path(take, self.state.opt_state))
        return len(taken)

    def resume(self, ckpt, data_iter, tokenizer_dir=None, seed: int | None = None) -> int:
        """Continue from the checkpointer's newest complete step: parameters and optimizer state restored into
        this run's shardings (any mesh), the step counter, and the data iterator's position when the checkpoint
        has one for this process (else its order restarts, as Checkpointer.restore warns). Returns the step.
        Saves that a kill cut short, and steps whose files fail to restore, are moved aside (one line each) and
        the step before them is taken. The checkpoint must be of this architecture and (when given) data seed,
        see check_resumable; tokenizer_dir: the tokenizer this run uses (default: the trained one), which must
        be the checkpoint's."""
        from nanochat_jax.checkpoint import BrokenCheckpoint, check_tokenizer  # (the GPU benchmarks import this)

        ckpt.set_aside_unfinished()
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), self.state)
        for step in reversed(ckpt.all_steps()):
            if step > self.num_iterations:
                raise SystemExit(f"--train.resume: the latest checkpoint in {ckpt.directory} is step {step}, past "
                                 f"this run's num_iterations={self.num_iterations}; raise it or start a new run")
            try:
                meta = ckpt.read_meta(step)
                check_resumable(meta, self.model_cfg, seed, ckpt.directory / str(step))
                check_tokenizer(meta, tokenizer_dir, ckpt.directory / str(step))
                restored, broken = ckpt.restore(step, abstract.params, abstract.opt_state), None
            except BrokenCheckpoint as e:
                broken = str(e).split(": ", 1)[-1][:200]
            if not (broken := errors_anywhere(broken)):  # (one verdict for every process)
                break
            ckpt.set_aside(step, f"it is incomplete or corrupt ({broken[0]})")
        else:
            raise SystemExit(f"--train.resume: no complete checkpoint in {ckpt.directory}")
        self.state = TrainState(step=jax.device_put(jnp.asarray(step, jnp.int32), self.shardings.step),
                                params=restored["params"], opt_state=restored["opt_state"])
        if restored["data"] is not None:
            data_iter.set_state(restored["data"])
        print0(f"resumed from {ckpt.directory}/{step}")
        return step


def open_checkpoints(stage: str, depth: int, train):
    """The stage's Checkpointer; a run that does not resume first sets a previous run's checkpoints and metrics log
    (report/<stage>_train.jsonl, which StepLogger starts anew) aside; a resumed run appends to the log."""
    from nanochat_jax.checkpoint import Checkpointer, checkpoint_dir, set_aside_previous_run

    if not train.resume:
        report = artifacts_dir("report")
        set_aside_previous_run(checkpoint_dir(stage, depth), also=(report / f"{stage}_train.jsonl",
                                                                   report / f"{stage}_train.json"))
    return Checkpointer(checkpoint_dir(stage, depth), keep=train.keep_checkpoints)


def run_stage(run: TrainRun, stage: str, cfg: Config, data, next_batch: Callable[[], dict], evaluate: Callable,
              flops_per_token: float | None = None, source_meta: dict | None = None, seed: int | None = None) -> StepLogger:
    """The training loop of base, mid and SFT, from step 0 (or the checkpoint --train.resume finds) to
    run.num_iterations. At every step boundary, paused in the progress clock: the checkpoint first (every
    train.checkpoint_every steps and at the end; a failing evaluation cannot lose the trained model), then
    evaluate(step, last, progress), the stage's evals and samples. A SIGTERM / Ctrl-C saves and exits there.
    data: the iterator next_batch() reads from (its get_state/set_state make the checkpointed position);
    source_meta: the metadata of the checkpoint the stage starts from (its tokenizer is this run's); seed: the
    data seed a resumed checkpoint must have. Returns the closed StepLogger (elapsed and train_seconds)."""
    from nanochat_jax.checkpoint import checkpoint_meta
    from nanochat_jax.tokenizer import tokenizer_fingerprint

    train, tokenizer = cfg.train, (source_meta or {}).get("tokenizer")
    fingerprint = tokenizer_fingerprint(tokenizer)  # the run's tokenizer, also if tok_train replaces it meanwhile
    ckpt = open_checkpoints(stage, run.model_cfg.depth, train)
    start = run.resume(ckpt, data, tokenizer, seed) if train.resume else 0
    if is_main_process():  # after a resume succeeded: a refused one leaves the run's config.toml as it was
        (ckpt.directory / "config.toml").write_text(to_toml(cfg))
    data_state = data.get_state()  # the iterator state from which the batch of step `start` comes
    batch = next_batch()
    info = device_info()
    progress = StepLogger(stage, run.num_iterations, start, flops_per_token=flops_per_token,
                          peak_flops=peak_flops_per_device(compute_dtype=run.model_cfg.compute_dtype), num_devices=info["num_devices"], append=train.resume)
    tokens, stop = 0, StopSignal()
    try:
        for step in range(start, run.num_iterations + 1):
            last = step == run.num_iterations
            stopping = stop.requested  # (read once: a signal arriving later is acted on at the next boundary)
            with progress.paused():  # evals, samples and checkpoints do not count in tokens/s and MFU
                if (step > start and (last or (train.checkpoint_every > 0 and step % train.checkpoint_every == 0))
                        or (stopping and ckpt.latest_step() != step)):
                    run.save(ckpt, step, data_state, checkpoint_meta(stage, step, cfg, run.model_cfg, tokenizer, fingerprint),
                             wait=last)
                if stopping:
                    progress.close()
                    stop.exit(ckpt, step)
                evaluate(step, last, progress)
            if last:
                break
            metrics = run.step(batch)
            data_state = data.get_state()  # before fetching: the batch of step+1 comes from here
            tokens += batch["inputs"].size
            batch = next_batch()  # overlaps the device's step
            if (step + 1) % train.log_every == 0 or step + 1 == run.num_iterations:
                m = jax.device_get(metrics)  # the one host sync of the loop
                progress.log(step + 1, m["loss"], tokens, grad_norm=m["grad_norm"],
                             lr_multiplier=m["lr_multiplier"], num_tokens=m["num_tokens"])
                tokens = 0
    finally:  # (the bar's last line comes before an error's)
        stop.close()
        progress.close()
        ckpt.close(quiet=sys.exc_info()[1] is not None)  # a save still being written completes, also after an error
    return progress
