"""One config system for every stage: typed dataclasses, TOML files, and --section.key=value overrides.

A run's configuration is a single `Config` made of sections (model, optim, train, data, ...).
`load_config(argv)` reads `--config FILE.toml` (any subset of sections), then applies command-line
overrides such as `--model.depth=4` or `--train.device_batch_size 8`. Unknown keys, wrong types and
invalid values stop with one `ConfigError` line that names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from nanochat_jax.common import UserError


class ConfigError(UserError, ValueError):
    """A bad configuration value; the message names the key and what is allowed."""


DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    depth: int = 20  # number of transformer blocks; width = depth * aspect_ratio
    aspect_ratio: int = 64  # model width per layer of depth
    head_dim: int = 128  # target head dimension; n_head = ceil(width / head_dim)
    n_kv_head: int = 0  # key/value heads for GQA/MQA; 0 means "same as n_head"
    vocab_size: int = 65536  # set from the tokenizer by the training scripts
    sequence_len: int = 2048
    softcap: float = 15.0  # logit soft-capping, computed in fp32
    rope_theta: float = 10000.0
    compute_dtype: str = "bfloat16"  # activations / matmuls; parameters stay fp32
    param_dtype: str = "float32"  # float32 | bfloat16 (AdamW stores its moments in it and computes in fp32)
    attention_impl: str = "xla"  # xla | cudnn (flash attention on NVIDIA GPUs) | splash (flash attention on TPU)
    remat: str = "none"  # none | block | dots_saveable
    loss_chunk: int = 0  # >0: cross-entropy over chunks of this many tokens (no full (B,T,V) logits)
    # nanochat master's architecture options (model.py); the defaults are the first release's
    window_pattern: str = "L"  # per layer, tiled: L = full context, S = sliding window (master's short window:
    #                            sequence_len / 4 rounded up to a multiple of 128); the last layer is always L
    value_embeds: bool = False  # ResFormer value embeddings on alternating layers (the last included), gated per kv head
    smear: bool = False  # each position adds a gated copy of the previous token's embedding (a cheap bigram)
    backout: bool = False  # subtract a learned multiple of the middle layer's residual before the final norm
    layer_lambdas: bool = False  # learned per-layer scales of the residual and of x0 (the embedding) before each block
    qk_scale: float = 1.0  # q and k multiplied by this after the QK norm (master: 1.2)
    pad_vocab_to: int = 1  # embedding tables and lm_head padded to a multiple of this (master: 64); logits sliced back
    init: str = "first_release"  # first_release | master (wte std 0.8, lm_head std 0.001, uniform matrices)

    @property
    def n_layer(self) -> int:
        return self.depth

    @property
    def n_embd(self) -> int:
        return self.depth * self.aspect_ratio

    @property
    def n_head(self) -> int:
        return max(1, math.ceil(self.n_embd / self.head_dim))

    @property
    def n_kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    def validate(self) -> None:
        _positive(self, "model", "depth", "aspect_ratio", "head_dim", "vocab_size", "sequence_len")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model: width {self.n_embd} (depth*aspect_ratio) is not divisible by n_head {self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ConfigError(f"model: head dimension {self.n_embd // self.n_head} must be even for rotary embeddings")
        if self.n_kv_head < 0 or self.n_head % self.n_kv_heads:
            raise ConfigError(f"model.n_kv_head={self.n_kv_head} must divide n_head={self.n_head} (0 = same as n_head)")
        _choice(self, "model", "compute_dtype", DTYPES)
        if self.param_dtype == "float16":  # (master keeps fp32 weights for fp16 training)
            raise ConfigError("model.param_dtype='float16' is not supported (its range cannot hold the optimizer's "
                              "updates: the loss is NaN within a few steps); use float32 or bfloat16")
        _choice(self, "model", "param_dtype", DTYPES)
        _choice(self, "model", "attention_impl", ("xla", "cudnn", "splash"))
        _choice(self, "model", "remat", ("none", "block", "dots_saveable"))
        if self.softcap < 0 or self.loss_chunk < 0:
            raise ConfigError("model.softcap and model.loss_chunk must be >= 0")
        if not self.window_pattern or set(self.window_pattern) - {"S", "L"}:
            raise ConfigError(f"model.window_pattern={self.window_pattern!r} must be a non-empty string of S and L")
        if self.qk_scale <= 0 or self.pad_vocab_to < 1:
            raise ConfigError("model.qk_scale must be > 0 and model.pad_vocab_to >= 1")
        _choice(self, "model", "init", ("first_release", "master"))


# [model] fields that say how a model runs, not what it is: a run may change them on any checkpoint
RUNTIME_MODEL_FIELDS = ("sequence_len", "compute_dtype", "attention_impl", "remat", "loss_chunk")


ADAM_GROUPS = ("embedding", "unembedding", "value_embedding", "resid_lambdas", "x0_lambdas", "scalar")


@dataclass
class OptimConfig:
    """The first release's optimizer by default; nanochat master's options (Polar Express, MuonEq, Muon+,
    NorMuon, cautious weight decay, per-group AdamW, its schedules and depth scaling) are all off."""

    embedding_lr: float = 0.2  # AdamW, token embedding (scaled by (width/768)^-0.5)
    unembedding_lr: float = 0.004  # AdamW, lm_head (scaled by (width/768)^-0.5)
    matrix_lr: float = 0.02  # Muon, every 2-D matrix inside the blocks
    value_embedding_lr: float = 0.15  # AdamW, value embeddings (scaled by (width/768)^-0.5; master: embedding's / 2)
    resid_lambdas_lr: float = 0.005  # AdamW, per-layer residual scales (master: scalar lr 0.5 x 0.01)
    x0_lambdas_lr: float = 0.5  # AdamW, per-layer x0 mixing scales
    scalar_lr: float = 0.2  # AdamW, every other scalar or gate (smear, backout); never depth-scaled, as master's
    weight_decay: float = 0.0  # AdamW weight decay
    adam_beta1: float = 0.8
    adam_beta2: float = 0.95
    adam_eps: float = 1e-10
    # one AdamW group's own "beta1,beta2,eps,weight_decay" ("" = adam_beta1, adam_beta2, adam_eps, weight_decay)
    adam_embedding: str = ""  # master: "0.8,0.995,1e-10,0.001"
    adam_unembedding: str = ""  # master: "0.8,0.96,1e-10,0.01"
    adam_value_embedding: str = ""  # master: "0.8,0.995,1e-10,0.01"
    adam_resid_lambdas: str = ""  # master: "0.8,0.95,1e-10,0.05"
    adam_x0_lambdas: str = ""  # master: "0.96,0.95,1e-10,0.0"
    adam_scalar: str = ""  # master: "0.8,0.95,1e-10,0.0"
    muon_momentum: float = 0.95
    muon_momentum_start: float = 0.85  # Muon momentum warms up linearly from this value ...
    muon_momentum_warmup_steps: int = 300  # ... over this many steps
    muon_momentum_final: float = -1.0  # >= 0: momentum falls linearly to this over the LR warm-down (master: 0.9)
    muon_nesterov: bool = True
    orthogonalizer: str = "newton_schulz"  # newton_schulz (quintic, fixed coefficients) | polar_express (master's)
    ns_steps: int = 5  # orthogonalisation iterations (polar_express: at most 5)
    ns_dtype: str = "bfloat16"  # Newton-Schulz compute dtype (float32 for bit-stable tests)
    muon_eq: bool = False  # MuonEq: each neuron's weights rescaled to the mean norm before orthogonalising
    muon_plus: bool = False  # Muon+: orthogonalised update rescaled to Frobenius norm sqrt(min(rows, cols))
    normuon: bool = False  # NorMuon: factored per-neuron second moment normalises the orthogonalised update
    normuon_beta2: float = 0.9  # NorMuon's second-moment decay
    muon_weight_decay: float = 0.0  # Muon decoupled weight decay, times Muon's aspect-scaled learning rate
    muon_weight_decay_schedule: str = "constant"  # constant | cosine (to 0 at the last step, as master)
    cautious_weight_decay: bool = False  # Muon decays only entries where the update and the weight share a sign
    warmup_ratio: float = 0.0  # fraction of steps with linear LR warm-up
    warmup_steps: int = 0  # > 0: LR warm-up steps instead of warmup_ratio (master: 40)
    warmdown_ratio: float = 0.2  # fraction of steps with linear LR warm-down
    final_lr_frac: float = 0.0  # LR multiplier reached at the end of the warm-down
    grad_clip: float = 1.0  # base training's global-norm clipping (0 disables); mid/sft/rl have their own
    # depth scaling (base training, as master's base_train): tokens = train.target_param_data_ratio x the scaling
    # parameters (blocks + lm_head); train.total_batch_size = -1 takes the power-law batch; learning rates x
    # sqrt(B / reference_batch_size); muon_weight_decay x sqrt(B / reference_batch_size) x D_ref / D
    reference_depth: int = 0  # > 0: scale from a model of this depth (master: 12); 0 = off
    reference_batch_size: int = 524288  # tokens per step best at reference_depth (master: 2^19)
    batch_size_exponent: float = 0.383  # B = reference_batch_size x (D / D_ref)^exponent, to a power of 2

    def adam_group(self, group: str) -> tuple[float, float, float, float]:
        """(beta1, beta2, eps, weight_decay) of an AdamW group."""
        spec = getattr(self, f"adam_{group}")
        if not spec:
            return self.adam_beta1, self.adam_beta2, self.adam_eps, self.weight_decay
        try:
            b1, b2, eps, wd = (float(x) for x in spec.split(","))
        except ValueError:
            raise ConfigError(f"optim.adam_{group}={spec!r} is not 'beta1,beta2,eps,weight_decay' "
                              "(four numbers)") from None
        if not (0 <= b1 < 1 and 0 <= b2 < 1 and eps >= 0 and wd >= 0):  # (a beta of 1 makes AdamW's update NaN)
            raise ConfigError(f"optim.adam_{group}={spec!r}: betas must be in [0, 1), eps and weight_decay >= 0")
        return b1, b2, eps, wd

    def scale_lrs(self, factor: float) -> "OptimConfig":
        """A copy with every learning rate times factor."""
        return dataclasses.replace(self, **{name: getattr(self, name) * factor for name in LR_FIELDS})

    def validate(self) -> None:
        _non_negative(self, "optim", *LR_FIELDS, "weight_decay", "adam_eps", "grad_clip", "muon_weight_decay",
                      "warmup_steps", "reference_depth")
        for name in ("muon_momentum", "muon_momentum_start", "normuon_beta2", "warmup_ratio", "warmdown_ratio",
                     "final_lr_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"optim.{name}={getattr(self, name)} must be in [0, 1]")
        for name in ("adam_beta1", "adam_beta2"):  # (a beta of 1 makes AdamW's update NaN)
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optim.{name}={getattr(self, name)} must be in [0, 1)")
        if self.muon_momentum_final != -1.0 and not 0.0 <= self.muon_momentum_final <= 1.0:
            raise ConfigError(f"optim.muon_momentum_final={self.muon_momentum_final} must be in [0, 1] (-1: none)")
        if self.warmup_ratio + self.warmdown_ratio > 1.0:
            raise ConfigError("optim.warmup_ratio + optim.warmdown_ratio must be <= 1")
        if self.warmup_steps > 0 and self.warmup_ratio > 0:
            raise ConfigError("optim: set warmup_steps or warmup_ratio, not both")
        _positive(self, "optim", "ns_steps", "reference_batch_size", "batch_size_exponent")
        _choice(self, "optim", "ns_dtype", DTYPES)
        _choice(self, "optim", "orthogonalizer", ("newton_schulz", "polar_express"))
        _choice(self, "optim", "muon_weight_decay_schedule", ("constant", "cosine"))
        if self.orthogonalizer == "polar_express" and self.ns_steps > 5:
            raise ConfigError(f"optim.ns_steps={self.ns_steps}: polar_express has coefficients for 5 steps at most")
        for group in ADAM_GROUPS:
            self.adam_group(group)


LR_FIELDS = ("embedding_lr", "unembedding_lr", "matrix_lr", "value_embedding_lr", "resid_lambdas_lr",
             "x0_lambdas_lr", "scalar_lr")


@dataclass
class MeshConfig:
    """Device mesh axis sizes; their product is the device count. -1 on one axis means 'the rest'."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def validate(self) -> None:
        sizes = [self.data, self.fsdp, self.tensor]
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(f"mesh: sizes {sizes} must be positive, with at most one -1 ('the rest')")


@dataclass
class StageConfig:
    """What every training stage's section ([train] for base, [mid], [sft], [rl]) has."""

    device_batch_size: int = 32  # rows (sequences, conversations) per device per micro-batch
    num_iterations: int = -1  # optimizer steps (-1: derived, as each stage says)
    eval_every: int = 250  # steps between evaluations (0 = only at the end)

    def _validate(self, section: str, *positive: str) -> None:
        _positive(self, section, "device_batch_size", *positive)


@dataclass
class TrainConfig(StageConfig):
    """Base training; resume, checkpoint_every, keep_checkpoints and log_every apply to every stage, seed (the
    initialisation and data order) to base training and RL (its rollouts)."""

    total_batch_size: int = 524288  # tokens per optimizer step; grad accumulation is derived (-1: depth scaling's)
    target_flops: float = -1.0  # (num_iterations -1: derive from target_flops or the ratio)
    target_param_data_ratio: float = 20.0  # tokens : params (Chinchilla = 20)
    eval_tokens: int = 20 * 524288
    sample_every: int = 2000  # steps between greedy samples (0 = only at the end)
    core_every: int = 2000  # steps between CORE estimates, and at the end (0 = none; needs the eval bundle)
    core_max_per_task: int = 500  # items per CORE task in those estimates (base_eval scores them all)
    checkpoint_every: int = 0  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    resume: bool = False  # continue from the latest checkpoint of this stage and depth
    fp8: bool = False  # the train step's matmuls in fp8 (master's --fp8; NVIDIA compute capability >= 8.9)

    def validate(self) -> None:
        self._validate("train", "eval_tokens", "keep_checkpoints", "log_every", "core_max_per_task")
        if self.total_batch_size <= 0 and self.total_batch_size != -1:
            raise ConfigError(f"train.total_batch_size={self.total_batch_size} must be > 0 "
                              "(-1: from optim's depth scaling)")
        _non_negative(self, "train", "core_every")
        if self.num_iterations <= 0 and self.target_flops <= 0 and self.target_param_data_ratio <= 0:
            raise ConfigError("train: set one of num_iterations, target_flops or target_param_data_ratio (> 0)")


@dataclass
class ChatStageConfig(StageConfig):
    """Mid, SFT and RL: a stage that starts from another stage's checkpoint with a fresh optimizer."""

    source: str = "base"  # stage whose checkpoint to start from
    init_lr_frac: float = 1.0  # learning rates are the [optim] ones times this
    grad_clip: float = 0.0  # global-norm clipping, 0 = none: nanochat clips only base training

    def _validate(self, section: str, *positive: str) -> None:
        super()._validate(section, "init_lr_frac", *positive)
        _non_negative(self, section, "grad_clip")


@dataclass
class DataConfig:
    source: str = "embedded"  # embedded | fineweb | climbmix | files
    path: str = ""  # for source=files: a directory or glob of .parquet / .jsonl / .txt files
    text_column: str = "text"
    num_shards: int = 8  # fineweb / climbmix shards to download (the last shard is always the validation split)
    packing: str = "concat"  # concat (documents back to back) | bestfit (nanochat master's: rows start with a BOS)
    download_workers: int = 4
    tokenizer_threads: int = 4
    skip_bad_shards: bool = False  # warn and skip an unreadable shard instead of stopping
    prefetch: int = 2

    def validate(self) -> None:
        _choice(self, "data", "source", ("embedded", "fineweb", "climbmix", "files"))
        _choice(self, "data", "packing", ("concat", "bestfit"))
        if self.source == "files" and not self.path:
            raise ConfigError("data.path must be set when data.source='files'")
        _positive(self, "data", "num_shards", "download_workers", "tokenizer_threads")
        if self.source in ("fineweb", "climbmix") and self.num_shards < 2:
            raise ConfigError(f"data.num_shards={self.num_shards} must be >= 2 for data.source={self.source}: the "
                              "last shard is the validation split, the others are the training data")
        _non_negative(self, "data", "prefetch")


@dataclass
class TokenizerConfig:
    vocab_size: int = 65536  # including the special tokens
    max_chars: int = 2_000_000_000  # characters of training text to use
    doc_cap: int = 10_000  # characters per document at most
    buffer_size: int = 8192  # documents per batch handed to the Rust trainer

    def validate(self) -> None:
        _positive(self, "tokenizer", "max_chars", "doc_cap", "buffer_size")
        if self.vocab_size < 256 + 9:
            raise ConfigError(f"tokenizer.vocab_size={self.vocab_size} must be >= 265 (256 bytes + 9 special tokens)")
        if self.vocab_size > 2**31 - 1:  # token ids are int32 (the data pipeline, the trainer)
            raise ConfigError(f"tokenizer.vocab_size={self.vocab_size} must be <= {2**31 - 1:,} (token ids are int32)")


@dataclass
class MidConfig(ChatStageConfig):
    """Mid-training: conversations rendered and packed like pretraining text, loss on every token.
    num_iterations -1: one pass over the mixture."""

    mixture: str = "nanochat"  # nanochat (hub datasets) | cpu (generated from the embedded corpus)
    total_batch_size: int = 524288  # tokens per optimizer step
    eval_every: int = 150
    eval_tokens: int = 20 * 524288

    def validate(self) -> None:
        _choice(self, "mid", "source", ("base", "mid"))
        _choice(self, "mid", "mixture", ("nanochat", "cpu"))
        self._validate("mid", "total_batch_size", "eval_tokens")


@dataclass
class SFTConfig(ChatStageConfig):
    """Supervised fine-tuning, loss only on the assistant's tokens. recipe "first_release": one padded conversation
    per row, target_examples_per_step per step, LR decaying to 0 over the run; "master" (nanochat master's single
    post-training stage): conversations best-fit into full rows, total_batch_size tokens per step, LR constant then
    decaying to 0 over the last half, Muon momentum 0.85 -> 0.95 over 300 steps, the source's optimizer moments.
    num_iterations -1: num_epochs passes over the mixture."""

    recipe: str = "first_release"  # first_release | master
    source: str = "mid"
    mixture: str = "nanochat"  # nanochat | cpu | master (master's: SmolTalk, MMLU x3, GSM8K x4)
    device_batch_size: int = 4  # rows per device per micro-batch (first_release: one conversation each)
    target_examples_per_step: int = 32  # first_release: conversations per step
    total_batch_size: int = 524288  # master: tokens per step
    num_epochs: int = 1
    init_lr_frac: float = 0.02
    eval_every: int = 100  # steps between validation loss
    eval_steps: int = 100
    eval_metrics_every: int = 200  # steps between quick chat-task accuracies

    def validate(self) -> None:
        _choice(self, "sft", "recipe", ("first_release", "master"))
        _choice(self, "sft", "source", ("base", "mid", "sft"))
        _choice(self, "sft", "mixture", ("nanochat", "cpu", "master"))
        self._validate("sft", "target_examples_per_step", "total_batch_size", "num_epochs", "eval_steps")


@dataclass
class RLConfig(ChatStageConfig):
    """GRPO-style reinforcement learning on a task with a checkable answer (GSM8K).
    num_iterations -1: num_epochs passes over the task's train split."""

    source: str = "sft"
    task: str = "gsm8k"  # gsm8k | cpu (generated arithmetic questions answered with the calculator)
    device_batch_size: int = 8  # rows per forward pass at most
    examples_per_step: int = 16  # questions per step (each gets num_samples completions)
    num_samples: int = 16
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 50
    init_lr_frac: float = 0.05
    num_epochs: int = 1
    save_every: int = 60
    eval_every: int = 60
    eval_examples: int = 400

    def validate(self) -> None:
        _choice(self, "rl", "source", ("mid", "sft", "rl"))
        _choice(self, "rl", "task", ("gsm8k", "cpu"))
        self._validate("rl", "examples_per_step", "num_samples", "max_new_tokens", "num_epochs", "eval_examples")
        _non_negative(self, "rl", "temperature", "top_k")


@dataclass
class EvalConfig:
    """Evaluation settings shared by base_eval (CORE) and chat_eval."""

    bundle_url: str = ""  # empty: nanochat's DCLM CORE eval bundle
    bundle_dir: str = ""  # a local unzipped bundle instead of downloading
    max_per_task: int = -1  # CORE examples per task (-1 = all)
    batch_tokens: int = 16384
    max_seq_len: int = 0  # 0: no cropping of long CORE prompts
    tasks: str = "ARC-Easy|ARC-Challenge|MMLU|GSM8K|HumanEval|SpellingBee"  # chat tasks, '|'-separated
    max_problems: int = 0  # per chat task (0 = all)
    num_samples: int = 1  # pass@k for generative tasks
    temperature: float = 0.0
    top_k: int = 50
    max_new_tokens: int = 512
    batch_size: int = 8
    data_dir: str = ""  # local <task>.jsonl files instead of the hub

    def validate(self) -> None:
        _positive(self, "eval", "batch_tokens", "num_samples", "max_new_tokens", "batch_size")
        if self.temperature < 0 or self.top_k < 0 or self.max_seq_len < 0 or self.max_problems < 0:
            raise ConfigError("eval.temperature, top_k, max_seq_len and max_problems must be >= 0")


@dataclass
class Config:
    run: str = "default"  # a name for this run, shown in logs and the report
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    mid: MidConfig = field(default_factory=MidConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate()
        if self.train.total_batch_size == -1 and self.optim.reference_depth <= 0:
            raise ConfigError("train.total_batch_size=-1 (derived) needs optim.reference_depth > 0")
        if self.optim.reference_depth > 0 and self.train.target_param_data_ratio <= 0:
            raise ConfigError("optim.reference_depth > 0 (depth scaling) needs train.target_param_data_ratio > 0")
        return self


# ---------------------------------------------------------------------------------------------
# Loading, overriding and printing


def _positive(obj, section: str, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{section}.{name}={getattr(obj, name)} must be > 0")


def _non_negative(obj, section: str, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 0:
            raise ConfigError(f"{section}.{name}={getattr(obj, name)} must be >= 0")


def _choice(obj, section: str, name: str, allowed: tuple[str, ...]) -> None:
    if getattr(obj, name) not in allowed:
        raise ConfigError(f"{section}.{name}={getattr(obj, name)!r} is not one of {', '.join(allowed)}")


def _coerce(key: str, value, typ, cli: bool = False):
    """Convert a TOML value or (cli=True) a command-line string to the field's type, or raise ConfigError."""
    from_cli = cli and isinstance(value, str) and typ is not str
    if isinstance(value, str) and typ is not str and not cli:
        kind = {"int": "an integer", "float": "a number", "bool": "true or false"}.get(typ.__name__, typ.__name__)
        raise ConfigError(f"{key}={value!r} is a string where {kind} belongs: write it without quotes")
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if from_cli and value.lower() in ("true", "1", "yes", "on"):
                return True
            if from_cli and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or isinstance(value, float):
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool) or not math.isfinite(float(value)):  # inf / nan: no setting wants them
                raise ValueError
            return float(value)
        if typ is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (ValueError, TypeError):  # TypeError: a TOML array, table or date where a number belongs
        pass
    else:
        raise ConfigError(f"{key}: unsupported field type {typ}")
    raise ConfigError(f"{key}={value!r} is not a valid {typ.__name__}")


def _fields(obj) -> dict[str, type]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def _set(cfg: Config, key: str, value, cli: bool = False) -> None:
    parts = key.split(".")
    obj, prefix = cfg, []
    for part in parts[:-1]:
        sub = getattr(obj, part, None) if part in _fields(obj) else None
        if not dataclasses.is_dataclass(sub):
            sections = [n for n, t in _fields(obj).items() if dataclasses.is_dataclass(t)]
            raise ConfigError(f"unknown config section {'.'.join(prefix + [part])!r}; sections are: {', '.join(sections)}")
        obj, prefix = sub, prefix + [part]
    name = parts[-1]
    fields = _fields(obj)
    if name not in fields or dataclasses.is_dataclass(fields[name]):
        where = f"[{'.'.join(prefix)}]" if prefix else "the top level"
        allowed = [n for n, t in fields.items() if not dataclasses.is_dataclass(t)]
        raise ConfigError(f"unknown config key {key!r}; keys allowed in {where}: {', '.join(allowed)}")
    setattr(obj, name, _coerce(key, value, fields[name], cli))


def _flatten(table: dict, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for k, v in table.items():
        if isinstance(v, dict):
            items += _flatten(v, f"{prefix}{k}.")
        else:
            items.append((f"{prefix}{k}", v))
    return items


def parse_overrides(argv: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """Split argv into (config file, [(dotted key, value)]). Accepts --k=v and --k v."""
    config_file, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; use --config FILE.toml and --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"missing value for {arg!r}")
            value, i = argv[i + 1], i + 1
        if key == "config":
            config_file = value
        else:
            overrides.append((key, value))
        i += 1
    return config_file, overrides


def flag_overrides(parser, argv: list[str] | None, section: str = "eval") -> tuple:
    """(script flags, config overrides) for a script whose short flags alias keys of a config section: every flag
    given whose dest is a key of [section] joins the other arguments as --section.key=value."""
    args, rest = parser.parse_known_args(argv)
    keys = _fields(getattr(Config(), section))
    return args, rest + [f"--{section}.{k}={v}" for k, v in vars(args).items() if k in keys and v is not None]


def asks_for_help(argv: list[str]) -> bool:
    """-h or --help where an option may stand (not as the value of --key value)."""
    i = 0
    while i < len(argv):
        if argv[i] in ("-h", "--help"):
            return True
        i += 1 if "=" in argv[i] or not argv[i].startswith("--") else 2
    return False


def usage(cfg: Config) -> str:
    """--help of a config-driven script: its docstring and every setting with its default."""
    doc = (getattr(sys.modules.get("__main__"), "__doc__", None) or "").strip()
    return (f"usage: python {Path(sys.argv[0]).name} [--config FILE.toml] [--section.key=value ...]\n\n"
            + (f"{doc}\n\n" if doc else "")
            + "Settings and their defaults (a --config file, then --section.key=value, override them):\n\n"
            + to_toml(cfg))


def load_config(argv: list[str] | None = None, defaults: Config | None = None) -> Config:
    """Defaults <- TOML file (--config) <- command-line overrides; then validate."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = from_dict(to_dict(defaults)) if defaults else Config()
    if asks_for_help(argv):
        print(usage(cfg))
        raise SystemExit(0)
    config_file, overrides = parse_overrides(argv)
    if config_file is not None:
        path = Path(config_file)
        if not path.exists():
            raise ConfigError(f"config file not found: {config_file!r}")
        try:
            table = tomllib.loads(path.read_bytes().decode())
        except OSError as e:  # a directory, no permission
            raise ConfigError(f"config file {config_file!r} cannot be read: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {config_file!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at "
                              f"offset {e.start})") from None
        except ValueError as e:  # TOMLDecodeError, or an integer of more than 4300 digits
            raise ConfigError(f"config file {config_file!r} is not valid TOML: {e}") from None
        except RecursionError:
            raise ConfigError(f"config file {config_file!r} is not valid TOML: arrays or tables nested too "
                              "deeply") from None
        try:
            for key, value in _flatten(table):
                _set(cfg, key, value)
        except ConfigError as e:
            raise ConfigError(f"config file {config_file!r}: {e}") from None
    for key, value in overrides:
        _set(cfg, key, value, cli=True)
    return cfg.validate()


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(table: dict) -> Config:
    """Rebuild a Config from to_dict() output (e.g. the config stored in a checkpoint)."""
    cfg = Config()
    for key, value in _flatten(table):
        _set(cfg, key, value)
    return cfg


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def to_toml(cfg) -> str:
    """Render a config (or any flat-section dataclass) as TOML that load_config reads back."""
    table = to_dict(cfg)
    top = [f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    lines = top + ([""] if top else [])
    for section, values in table.items():
        if isinstance(values, dict):
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
            lines.append("")
    return "\n".join(lines)


def model_config_from_dict(table: dict) -> ModelConfig:
    cfg = ModelConfig()
    for key, value in table.items():
        if key not in _fields(cfg):
            raise ConfigError(f"unknown model config key '{key}' in checkpoint metadata")
        setattr(cfg, key, _coerce(f"model.{key}", value, _fields(cfg)[key]))
    cfg.validate()
    return cfg


def config_values(keys: list[str], argv: list[str]) -> str:
    """The resolved values of `section.key` names under a config file and overrides, space-separated: what the
    launchers read before they start (`python -m nanochat_jax.config data.source sft.source -- --config FILE ...`)."""
    cfg = load_config(argv)
    values = []
    for key in keys:
        section, _, name = key.partition(".")
        table = getattr(cfg, section) if section in _fields(cfg) else None
        if not dataclasses.is_dataclass(table) or name not in _fields(table):
            raise ConfigError(f"unknown config key {key!r}")
        values.append(str(getattr(table, name)))
    return " ".join(values)


if __name__ == "__main__":
    args = sys.argv[1:]
    split = args.index("--") if "--" in args else len(args)
    try:
        print(config_values(args[:split], args[split + 1:]))
    except ConfigError as e:
        sys.exit(f"config: {e}")

