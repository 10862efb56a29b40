"""What the chat stages (mid, SFT, RL) share: starting from another stage's checkpoint, the stage's optimizer
settings and chat samples for the report.

The architecture always comes from the source checkpoint's metadata; the runtime fields of the run's
[model] section (sequence_len, compute_dtype, attention_impl, remat, loss_chunk) apply on top.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from nanochat_jax.common import print0
from nanochat_jax.config import (RUNTIME_MODEL_FIELDS, Config, ConfigError, ModelConfig, OptimConfig, from_dict,
                                 model_config_from_dict)

SAMPLE_QUESTIONS = [
    "What is the capital of Gorsica?",
    "Who are you?",
    "Anna has 7 apples and buys 5 more. How many apples does Anna have now?",
    "Hello!",
]


def source_model_config(checkpoint_model: dict, run_model: ModelConfig) -> ModelConfig:
    """The checkpoint's architecture with the run's runtime fields."""
    model_cfg = model_config_from_dict(checkpoint_model)
    for name in RUNTIME_MODEL_FIELDS:
        setattr(model_cfg, name, getattr(run_model, name))
    model_cfg.validate()
    return model_cfg


def load_source(stage: str, cfg: Config, mesh):
    """(params as a pure dict sharded on the mesh, tokenizer, model config, source meta) of a stage's latest
    checkpoint at the run's --model.depth, or, when the stage has none at that depth (an imported model, say),
    in its most recently written depth directory. The architecture comes from the checkpoint."""
    from nanochat_jax.checkpoint import load_model

    model, tokenizer, meta = load_model(stage, preferred_depth=cfg.model.depth, mesh=mesh)
    model_cfg = source_model_config(meta["model"], cfg.model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    print0(f"starting from the {stage} checkpoint, step {meta.get('step')} (depth {model_cfg.depth}, "
           f"width {model_cfg.n_embd}, vocab {model_cfg.vocab_size}, sequence_len {model_cfg.sequence_len})")
    return params, tokenizer, model_cfg, meta


def warm_start(run, stage: str, meta: dict) -> None:
    """nanochat master's SFT: the run's optimizer moments from the source checkpoint (TrainRun.warm_start) with
    its own learning rates and step counts; a source without an optimizer state (an imported model) or with one
    that does not restore leaves the optimizer fresh, with a warning (as master's)."""
    from nanochat_jax.checkpoint import CheckpointError, Checkpointer, checkpoint_dir

    ckpt = Checkpointer(checkpoint_dir(stage, meta["model"]["depth"]), async_save=False)
    try:
        taken = run.warm_start(ckpt, meta["step"], from_dict(meta["config"]).optim)
        print0(f"optimizer: {taken} moment arrays from the {stage} checkpoint, step {meta['step']} (learning rates "
               "and step counts fresh)")
    except (CheckpointError, ConfigError) as e:  # (ConfigError: a source config this version cannot read)
        print0(f"WARNING: the optimizer starts fresh: {e}")
    finally:
        ckpt.close()


def stage_optim(optim: OptimConfig, init_lr_frac: float, **schedule) -> OptimConfig:
    """A copy of [optim] for a stage after base training: every learning rate times init_lr_frac, the stage's
    schedule fields set, and what only pretraining has switched off (as nanochat master's SFT and RL do): no LR
    warm-up, no Muon weight decay (pretraining's schedule has taken it to zero), no momentum warm-down."""
    out = dataclasses.replace(optim.scale_lrs(init_lr_frac), warmup_steps=0, warmup_ratio=0.0, muon_weight_decay=0.0,
                              muon_momentum_final=-1.0, **schedule)
    out.validate()
    print0(f"optimizer: lr embedding {out.embedding_lr:g}, unembedding {out.unembedding_lr:g}, matrix "
           f"{out.matrix_lr:g} (= [optim] x init_lr_frac {init_lr_frac:g}) | no warm-up, "
           f"warmdown_ratio {out.warmdown_ratio:g}, final_lr_frac {out.final_lr_frac:g} | Muon momentum "
           f"{out.muon_momentum_start:g} -> {out.muon_momentum:g} over {out.muon_momentum_warmup_steps} steps | "
           f"grad_clip {out.grad_clip:g}")
    return out


def chat_samples(graphdef, params, tokenizer, questions=SAMPLE_QUESTIONS, max_tokens: int = 64) -> list[str]:
    """'question -> answer' for fixed one-turn questions, answered greedily through the Engine (tools on), and
    printed."""
    from nanochat_jax.engine import Engine

    engine = Engine(nnx.merge(graphdef, params), tokenizer)
    prompts = [tokenizer.render_for_completion({"messages": [{"role": "user", "content": q},
                                                             {"role": "assistant", "content": ""}]})
               for q in questions]
    results, _ = engine.generate_batch(prompts, max_tokens=max_tokens, temperature=0.0)
    samples = [f"{q} -> {tokenizer.decode(r[len(p):])}" for q, p, r in zip(questions, prompts, results)]
    for s in samples:
        print0(f"  sample: {s!r}")
    return samples
