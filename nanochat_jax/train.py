"""The training state and the one jit-compiled, pure training step.

`init_train_state` builds parameters directly on the mesh (each device materialises only its shards)
and the optimizer state with the same shardings. `make_train_step` returns
`train_step(state, batch) -> (state, metrics)`: gradient accumulation over the leading micro-batch axis
of `batch` runs inside the jit (`lax.scan`), the state is donated, and metrics stay on device, so the
host only feeds batches and reads metrics when it logs. `StopSignal` turns SIGTERM / Ctrl-C into a checkpoint
at the next step boundary and a clean exit; `resume_latest` continues from the newest complete checkpoint.
"""

from __future__ import annotations

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

from nanochat_jax.common import print0
from nanochat_jax.config import RUNTIME_MODEL_FIELDS, ModelConfig, OptimConfig, model_config_from_dict, to_dict
from nanochat_jax.model import init_model
from nanochat_jax.optim import build_optimizer, lr_multiplier
from nanochat_jax.sharding import like_params, named_sharding, param_shardings, replicated


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # pure nested dict of fp32 arrays, sharded by the rule table
    opt_state: Any


def abstract_model(model_cfg: ModelConfig, seed: int = 0):
    """(graphdef, abstract nnx State of the parameters) without allocating anything."""
    return nnx.split(nnx.eval_shape(lambda: init_model(model_cfg, seed)), nnx.Param)


def state_shardings(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh, seed: int = 0):
    """(graphdef, TrainState of NamedShardings). Optimizer leaves shaped like a parameter share its sharding."""
    graphdef, abstract = abstract_model(model_cfg, seed)
    params_sh = param_shardings(abstract, mesh)
    abstract_opt = jax.eval_shape(optimizer.init, nnx.to_pure_dict(abstract))
    opt_sh = like_params(abstract_opt, params_sh, mesh)
    return graphdef, TrainState(step=replicated(mesh), params=params_sh, opt_state=opt_sh)


def init_train_state(model_cfg: ModelConfig, optim_cfg: OptimConfig, num_iterations: int, mesh: Mesh, seed: int = 0,
                     params=None):
    """Returns (graphdef, optimizer, state, shardings) with the state created directly in its shardings.

    params: start from these parameters (a pure dict, e.g. a loaded checkpoint's) instead of a fresh init;
    the optimizer state always starts fresh."""
    optimizer = build_optimizer(optim_cfg, model_cfg.n_embd, num_iterations)
    graphdef, shardings = state_shardings(model_cfg, optimizer, mesh, seed)

    def create(params) -> TrainState:
        if params is None:
            params = nnx.to_pure_dict(nnx.split(init_model(model_cfg, seed), nnx.Param)[1])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

    if params is not None:
        params = jax.device_put(params, shardings.params)
    state = jax.jit(create, out_shardings=shardings)(params)
    return graphdef, optimizer, state, shardings


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


def resume_latest(ckpt, state: TrainState, shardings: TrainState, data_iter, num_iterations: int,
                  model_cfg: ModelConfig, tokenizer_dir=None, seed: int | None = None):
    """Continue from the checkpointer's newest complete step: parameters and optimizer state restored into the
    shardings of `state` (any mesh), the step counter, and the data iterator's position when the checkpoint has
    one for this process (else its order restarts, as Checkpointer.restore warns). Returns (state, step).
    Saves that a kill cut short, and steps whose files fail to restore, are moved aside (one line each) and the
    step before them is taken. The checkpoint must be of this architecture and (when given) data seed, see
    check_resumable; tokenizer_dir: the tokenizer this run uses (default: the trained one), which must be the
    checkpoint's."""
    from nanochat_jax.checkpoint import BrokenCheckpoint, check_tokenizer  # (the GPU benchmarks import this module)

    ckpt.set_aside_unfinished()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    for step in reversed(ckpt.all_steps()):
        if step > num_iterations:
            raise SystemExit(f"--train.resume: the latest checkpoint in {ckpt.directory} is step {step}, past this "
                             f"run's num_iterations={num_iterations}; raise it or start a new run")
        try:
            meta = ckpt.read_meta(step)
            check_resumable(meta, model_cfg, seed, ckpt.directory / str(step))
            check_tokenizer(meta, tokenizer_dir, ckpt.directory / str(step))
            restored = ckpt.restore(step, abstract.params, abstract.opt_state)
            break
        except BrokenCheckpoint as e:
            ckpt.set_aside(step, f"it is incomplete or corrupt ({str(e).split(': ', 1)[-1][:200]})")
    else:
        raise SystemExit(f"--train.resume: no complete checkpoint in {ckpt.directory}")
    state = TrainState(step=jax.device_put(jnp.asarray(step, jnp.int32), shardings.step),
                       params=restored["params"], opt_state=restored["opt_state"])
    if restored["data"] is not None:
        data_iter.set_state(restored["data"])
    print0(f"resumed from {ckpt.directory}/{step}")
    return state, step


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


def out_of_memory_advice(shape: tuple[int, int, int], mesh: Mesh, error: str) -> str:
    """What to change when a train step of batch shape (micro_steps, rows, T) does not fit in device memory."""
    from nanochat_jax.sharding import shard_count

    with jax.set_mesh(mesh):
        rows = shard_count("batch")
    first_line = error.strip().splitlines()[0][:300]
    return (f"the train step ran out of device memory with {shape[1] // rows} rows of {shape[2]} tokens per device "
            f"and micro-batch: lower --train.device_batch_size (gradient accumulation keeps total_batch_size), "
            f"or set --model.remat=dots_saveable (or block) or --model.loss_chunk=256; scripts/plan.py compiles "
            f"the memory per device. XLA said: {first_line}")


def make_train_step(graphdef, optimizer: optax.GradientTransformation, shardings: TrainState, mesh: Mesh,
                    num_iterations: int, optim_cfg: OptimConfig, objective: Callable = lm_loss) -> Callable:
    """train_step(state, batch) -> (state, metrics); batch = {"inputs", "targets", ...} of shape (A, B, T).

    objective(model, micro_batch) -> scalar loss; the default is lm_loss (RL passes a policy-gradient one).
    Every array of the batch is split along its leading micro-step axis."""

    def train_step(state: TrainState, batch: dict):
        num_micro = batch["inputs"].shape[0]
        grads, losses = summed_grads(graphdef, state.params, batch, objective)
        grads = jax.tree.map(lambda g: g / num_micro, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": jnp.mean(losses),
            "grad_norm": optax.tree.norm(grads),
            "lr_multiplier": lr_multiplier(state.step, num_iterations, optim_cfg),
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    jitted = jax.jit(
        train_step,
        in_shardings=(shardings, microbatch_sharding(mesh)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=0,
    )

    def run(state: TrainState, batch: dict):
        with jax.set_mesh(mesh):  # lets the model pin its activations' sharding (sharding.constrain)
            try:
                return jitted(state, batch)
            except jax.errors.JaxRuntimeError as e:
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                raise MemoryError(out_of_memory_advice(batch["inputs"].shape, mesh, str(e))) from e

    run.jitted = jitted  # for lowering / inspection (bench/train_step.py)
    return run
