"""Hugging Face interop: our model and tokenizer <-> a transformers `NanoChat` folder (safetensors + JSON only).

A folder holds `config.json` (model_type "nanochat"), `model.safetensors` (torch layout: Linear weights are
(out, in), the transpose of our kernels), `tokenizer.json` (a `tokenizers` byte-level BPE whose merges come
from our tiktoken ranks), `tokenizer_config.json` (with a Jinja chat template that renders conversations like
`Tokenizer.render_conversation`) and `generation_config.json`. transformers' NanoChat runs nanochat's
first-release forward: its q/k/v/o_proj, fc1/fc2, embed_tokens and lm_head are our c_q/c_k/c_v/c_proj,
c_fc/c_proj, wte and lm_head; its RMSNorms carry no weights; its rotate_half convention equals ours.

Nothing here needs torch or transformers: weights go through `safetensors.numpy`, the rest is plain JSON.
Known differences: a Hugging Face tokenizer turns text that spells a special token (e.g. "<|bos|>") into that
token, while our `encode` never does; the chat template renders a message's parts as one string, while
`render_conversation` (as nanochat's) encodes each part on its own, so two text parts in a row (SpellingBee's
answers) can merge into other tokens at their seam.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from nanochat_jax.common import UserError
from nanochat_jax.config import RUNTIME_MODEL_FIELDS, ModelConfig
from nanochat_jax.model import EPS, padded_vocab
from nanochat_jax.tokenizer import SPECIAL_TOKENS, Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
DTYPES = ("float32", "bfloat16")

# ModelConfig fields that only change how the forward runs or is stored (or how the weights were initialised), not
# what it computes: not exported (pad_vocab_to's padding rows and columns are cut off).
RUNTIME_FIELDS = {*RUNTIME_MODEL_FIELDS, "param_dtype", "init", "pad_vocab_to"}
# ModelConfig fields that the exported config.json encodes.
ARCH_FIELDS = {"depth", "aspect_ratio", "head_dim", "n_kv_head", "vocab_size", "sequence_len", "softcap", "rope_theta"}

# Renders {"messages": [...]} exactly like Tokenizer.render_conversation / render_for_completion: a leading
# system message is joined to the next user message with a blank line; assistant content is a string or a
# list of text / python / python_output parts.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = message['content'] + '\\n\\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '<|user_start|>' + ns.system + message['content'] + '<|user_end|>' -}}"
    "{%- set ns.system = '' -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'python' -%}"
    "{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}"
    "{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- else -%}"
    "{{- raise_exception('unknown role ' + message['role'] + ' (expected system, user or assistant)') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- endif -%}"
)


# transformers' NanoChatConfig defaults for the fields a config.json may leave out (where they differ from ours)
HF_DEFAULTS = {"final_logit_softcapping": 15.0, "rms_norm_eps": 1e-6, "intermediate_size": 8192}


class HFFormatError(UserError, ValueError):
    """A folder or model that the NanoChat format (or our ModelConfig) cannot represent; names the option."""


# ---------------------------------------------------------------------------------------------
# Model config


def hf_config(cfg: ModelConfig, tokenizer: Tokenizer, dtype: str = "float32") -> dict:
    """config.json of a transformers NanoChatForCausalLM computing the same forward as our model."""
    defaults = type(cfg)()
    for f in dataclasses.fields(cfg):
        if f.name == "window_pattern" and set(cfg.window_pattern) == {"L"}:  # "LL": full context everywhere, as "L"
            continue
        if f.name not in RUNTIME_FIELDS | ARCH_FIELDS and getattr(cfg, f.name) != getattr(defaults, f.name):
            raise HFFormatError(f"model.{f.name}={getattr(cfg, f.name)!r} has no equivalent in the Hugging Face "
                                "NanoChat format; export supports nanochat's first-release architecture only")
    if dtype not in DTYPES:
        raise HFFormatError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    special = tokenizer.special
    return {
        "architectures": ["NanoChatForCausalLM"],
        "model_type": "nanochat",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": 4 * cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_heads,
        "max_position_embeddings": cfg.sequence_len,
        "hidden_act": "relu2",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rms_norm_eps": EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "final_logit_softcapping": float(cfg.softcap) if cfg.softcap > 0 else None,
        "tie_word_embeddings": False,
        "bos_token_id": special["<|bos|>"],
        "eos_token_id": [special["<|assistant_end|>"], special["<|bos|>"]],
        "pad_token_id": special["<|assistant_end|>"],
        "use_cache": True,
        "dtype": dtype,
    }


def model_config_from_hf(config: dict, compute_dtype: str = "bfloat16") -> ModelConfig:
    """Our ModelConfig for a transformers NanoChat config.json; HFFormatError names what cannot be represented."""
    config = {**HF_DEFAULTS, **config}  # a missing key means what transformers makes of it

    def need(key, ok: bool, why: str):
        if not ok:
            raise HFFormatError(f"config.json: {key}={config.get(key)!r} is not supported: {why}")

    need("model_type", config.get("model_type") == "nanochat", "expected 'nanochat'")
    optional = [k for k in ("max_position_embeddings", "num_key_value_heads") if k in config]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", *optional):
        if type(config.get(key)) is not int or config[key] <= 0:  # (bool is an int too)
            if not (key == "num_key_value_heads" and config[key] is None):  # (null: as many as the heads)
                raise HFFormatError(f"config.json: {key} must be a positive integer, got {config.get(key)!r}")
    C, L, H = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or H
    need("hidden_act", config.get("hidden_act", "relu2") == "relu2", "nanochat's MLP uses relu(x)^2 ('relu2')")
    need("attention_bias", not config.get("attention_bias", False), "our linear layers have no biases")
    need("intermediate_size", config.get("intermediate_size") == 4 * C, f"our MLP width is 4 * hidden_size = {4 * C}")
    need("hidden_size", C % L == 0,
         f"our width is depth * aspect_ratio, so it must be a multiple of num_hidden_layers={L}")
    need("num_attention_heads", C % H == 0 and (C // H) % 2 == 0,
         f"hidden_size={C} must split into heads of an even width")
    need("head_dim", config.get("head_dim") in (None, C // H), f"the head width must be hidden_size / heads = {C // H}")
    need("num_key_value_heads", H % kv == 0, f"must divide num_attention_heads={H}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise HFFormatError(f"config.json: rope_parameters.rope_type={rope_type!r} is not supported: "
                            "we implement only 'default' rotary embeddings")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    softcap = config.get("final_logit_softcapping")
    eps = config.get("rms_norm_eps")
    for key, value in (("rope_theta", theta), ("final_logit_softcapping", softcap or 0.0), ("rms_norm_eps", eps)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise HFFormatError(f"config.json: {key} must be a number >= 0, got {value!r}")
    if not np.isclose(eps, EPS, rtol=1e-6, atol=0):
        warnings.warn(f"config.json: rms_norm_eps={eps} differs from ours (float32 eps {EPS}); "
                      "logits will differ very slightly from transformers'", stacklevel=2)
    cfg = ModelConfig(depth=L, aspect_ratio=C // L, head_dim=C // H, n_kv_head=kv if kv != H else 0,
                      vocab_size=config["vocab_size"], sequence_len=config.get("max_position_embeddings", 2048),
                      softcap=float(softcap or 0.0), rope_theta=float(theta), compute_dtype=compute_dtype)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------
# Weights: our pure param dict <-> torch-layout state dict


# transformers module under model.layers.<i> -> our (module, linear) under blocks[i]
LAYER_KEYS = {"self_attn.q_proj": ("attn", "c_q"), "self_attn.k_proj": ("attn", "c_k"),
              "self_attn.v_proj": ("attn", "c_v"), "self_attn.o_proj": ("attn", "c_proj"),
              "mlp.fc1": ("mlp", "c_fc"), "mlp.fc2": ("mlp", "c_proj")}


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """HF key -> torch shape (out, in) for a model of this config."""
    C, V, D = cfg.n_embd, cfg.vocab_size, cfg.n_embd // cfg.n_head
    q, kv = cfg.n_head * D, cfg.n_kv_heads * D
    shapes = {"model.embed_tokens.weight": (V, C), "lm_head.weight": (V, C)}
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.self_attn.q_proj.weight": (q, C), f"{p}.self_attn.k_proj.weight": (kv, C),
                       f"{p}.self_attn.v_proj.weight": (kv, C), f"{p}.self_attn.o_proj.weight": (C, q),
                       f"{p}.mlp.fc1.weight": (4 * C, C), f"{p}.mlp.fc2.weight": (C, 4 * C)})
    return shapes


def params_to_hf(params: dict, cfg: ModelConfig, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The transformers state dict (numpy, contiguous, in `dtype`) of our pure param dict."""
    np_dtype = jnp.dtype(dtype)
    known = {"wte", "lm_head", "blocks"}
    extra = sorted(set(params) - known) + [f"blocks.{i}" for i in params.get("blocks", {}) if not 0 <= i < cfg.n_layer]
    if extra:
        raise HFFormatError(f"parameters {', '.join(map(str, extra))} have no equivalent in the NanoChat format")
    wte, lm_head = np.asarray(params["wte"]["embedding"]), np.asarray(params["lm_head"]["kernel"])
    if wte.shape[0] == lm_head.shape[-1] == padded_vocab(cfg):  # pad_vocab_to's padding: the logits never see it
        wte, lm_head = wte[:cfg.vocab_size], lm_head[:, :cfg.vocab_size]
    out = {"model.embed_tokens.weight": wte, "lm_head.weight": lm_head.T}
    for i in range(cfg.n_layer):
        block = params["blocks"][i]
        for key, (module, name) in LAYER_KEYS.items():
            out[f"model.layers.{i}.{key}.weight"] = np.asarray(block[module][name]["kernel"]).T
    out = {k: np.ascontiguousarray(np.asarray(v).astype(np_dtype)) for k, v in out.items()}
    _check_shapes(out, cfg, "our parameters")
    return out


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, tie_word_embeddings: bool = False) -> dict:
    """Our pure param dict (numpy arrays in cfg.param_dtype) from a transformers state dict."""
    tensors = dict(tensors)
    if tie_word_embeddings:
        tensors.setdefault("lm_head.weight", tensors.get("model.embed_tokens.weight"))
    _check_shapes(tensors, cfg, "the safetensors weights")
    dtype = jnp.dtype(cfg.param_dtype)

    def get(key, transpose=True):
        w = np.asarray(tensors[key]).astype(np.float32)
        return np.ascontiguousarray((w.T if transpose else w).astype(dtype))

    blocks = {}
    for i in range(cfg.n_layer):
        block = {"attn": {}, "mlp": {}}
        for key, (module, name) in LAYER_KEYS.items():
            block[module][name] = {"kernel": get(f"model.layers.{i}.{key}.weight")}
        blocks[i] = block
    return {"wte": {"embedding": get("model.embed_tokens.weight", transpose=False)},
            "lm_head": {"kernel": get("lm_head.weight")}, "blocks": blocks}


def _check_shapes(tensors: dict, cfg: ModelConfig, what: str) -> None:
    want = _expected_shapes(cfg)
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want))
    if missing or unexpected:
        raise HFFormatError(f"{what} do not match a NanoChat model: missing {missing[:6] or 'none'}, "
                            f"unexpected (not representable) {unexpected[:6] or 'none'}")
    for key, shape in want.items():
        if tuple(tensors[key].shape) != shape:
            raise HFFormatError(f"{what}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}")


# ---------------------------------------------------------------------------------------------
# Tokenizer: our tiktoken ranks <-> a `tokenizers` byte-level BPE tokenizer.json


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table used by byte-level BPE."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_UNICODE = _byte_to_unicode()


def _bytes_to_str(token: bytes) -> str:
    return "".join(BYTE_TO_UNICODE[b] for b in token)


def tokenizer_json(tokenizer: Tokenizer) -> dict:
    """tokenizer.json for our tokenizer. Merges: every split (left, right) of a token into two tokens, ordered
    by the rank of the merged token, so that `tokenizers`' BPE picks the same merge as tiktoken at every step."""
    n = tokenizer.vocab_size - len(SPECIAL_TOKENS)
    ranks = {tokenizer.enc.decode_single_token_bytes(i): i for i in range(n)}
    vocab, merges = {}, []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        vocab[_bytes_to_str(token)] = rank
        splits = [(token[:j], token[j:]) for j in range(1, len(token)) if token[:j] in ranks and token[j:] in ranks]
        splits.sort(key=lambda s: (ranks[s[0]], ranks[s[1]]))
        merges += [[_bytes_to_str(a), _bytes_to_str(b)] for a, b in splits]
    added = [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for name, i in tokenizer.special.items()]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }


def tokenizer_config(tokenizer: Tokenizer, sequence_len: int) -> dict:
    """tokenizer_config.json: a fast tokenizer with our special tokens and the chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>", "pad_token": "<|assistant_end|>",
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|bos|>", "<|assistant_end|>")],
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": sequence_len,
        "chat_template": CHAT_TEMPLATE,
    }


def _find_split_pattern(pre_tokenizer) -> str | None:
    if not isinstance(pre_tokenizer, dict):
        return None
    if pre_tokenizer.get("type") == "Split":
        pattern = pre_tokenizer.get("pattern", {})
        return pattern.get("Regex") or pattern.get("String")
    for sub in pre_tokenizer.get("pretokenizers", []):
        found = _find_split_pattern(sub)
        if found:
            return found
    return None


def tokenizer_from_hf_json(table: dict, where: str = TOKENIZER_FILE) -> Tokenizer:
    """Our Tokenizer from a byte-level BPE tokenizer.json whose ids are tiktoken ranks followed by SPECIAL_TOKENS
    (true of every tokenizer exported from nanochat). Merges are not needed: tiktoken merges by rank."""
    model = table.get("model") or {}
    if model.get("type") != "BPE":
        raise HFFormatError(f"{where}: model.type={model.get('type')!r} is not supported: expected a byte-level 'BPE'")
    pattern = _find_split_pattern(table.get("pre_tokenizer"))
    if not pattern:
        raise HFFormatError(f"{where}: pre_tokenizer has no Split regex, so the split pattern is unknown")
    decode = {c: b for b, c in BYTE_TO_UNICODE.items()}
    ranks = {}
    for text, token_id in model["vocab"].items():
        try:
            ranks[bytes(decode[c] for c in text)] = token_id
        except KeyError:
            raise HFFormatError(f"{where}: vocab entry {text!r} is not byte-level BPE") from None
    specials = {t["content"]: t["id"] for t in table.get("added_tokens", [])}
    ranks = {b: i for b, i in ranks.items() if i not in specials.values()}
    n = len(ranks)
    want = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
    if specials != want:
        raise HFFormatError(f"{where}: added_tokens {specials} are not nanochat's special tokens at ids {n}..: {want}")
    if sorted(ranks.values()) != list(range(n)):
        raise HFFormatError(f"{where}: vocab ids are not 0..{n - 1} followed by the special tokens")
    return Tokenizer(ranks, pattern)


# ---------------------------------------------------------------------------------------------
# Folders


def export_hf(params: dict, cfg: ModelConfig, tokenizer: Tokenizer, directory, dtype: str = "float32") -> Path:
    """Write a transformers NanoChat folder for our params (a pure dict of arrays) and tokenizer."""
    from safetensors.numpy import save_file

    if tokenizer.vocab_size > cfg.vocab_size:
        raise HFFormatError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={cfg.vocab_size}")
    config = hf_config(cfg, tokenizer, dtype)
    tensors = params_to_hf(params, cfg, dtype)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    _write_json(directory / CONFIG_FILE, config)
    (directory / WEIGHTS_FILE).chmod((directory / CONFIG_FILE).stat().st_mode & 0o777)  # safetensors writes 0600
    _write_json(directory / GENERATION_CONFIG_FILE, {"bos_token_id": config["bos_token_id"],
                                                     "eos_token_id": config["eos_token_id"],
                                                     "pad_token_id": config["pad_token_id"]})
    save_hf_tokenizer(tokenizer, directory, cfg.sequence_len)
    return directory


def save_hf_tokenizer(tokenizer: Tokenizer, directory, sequence_len: int) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_json(directory / TOKENIZER_FILE, tokenizer_json(tokenizer))
    _write_json(directory / TOKENIZER_CONFIG_FILE, tokenizer_config(tokenizer, sequence_len))


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFFormatError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise HFFormatError(f"{path} should hold a JSON object, not a {type(obj).__name__}")
    return obj


def _reading(path: Path, parse, *args):
    """parse(*args), with a missing field or a value of the wrong kind reported as an HFFormatError naming path."""
    try:
        return parse(*args)
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise HFFormatError(f"{path}: missing or malformed field ({type(e).__name__}: {e})") from None


def load_hf_tokenizer(directory) -> Tokenizer:
    path = Path(directory) / TOKENIZER_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {TOKENIZER_FILE} in {directory}")
    return _reading(path, tokenizer_from_hf_json, _read_json(path), str(path))


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}")
    try:
        return load_file(path)
    except Exception as e:  # safetensors' own error type: a truncated or foreign file
        raise HFFormatError(f"{path} is not a readable safetensors file: {e}") from None


def load_hf_weights(directory) -> dict[str, np.ndarray]:
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    directory = Path(directory)
    if (directory / WEIGHTS_FILE).exists():
        return _load_safetensors(directory / WEIGHTS_FILE)
    index = directory / WEIGHTS_INDEX_FILE
    if not index.exists():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} in {directory} "
                                "(only safetensors weights are read, never pickles)")
    shards = _reading(index, lambda table: sorted(set(table["weight_map"].values())), _read_json(index))
    tensors = {}
    for shard in shards:
        tensors.update(_load_safetensors(directory / shard))
    return tensors


def import_hf(directory, compute_dtype: str = "bfloat16") -> tuple[ModelConfig, dict, Tokenizer]:
    """(model config, pure param dict of numpy arrays, tokenizer) from a transformers NanoChat folder."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}")
    config = _read_json(path)
    cfg = _reading(path, model_config_from_hf, config, compute_dtype)
    tokenizer = load_hf_tokenizer(directory)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise HFFormatError(f"{TOKENIZER_FILE} has {tokenizer.vocab_size} tokens but vocab_size={cfg.vocab_size}")
    params = params_from_hf(load_hf_weights(directory), cfg, bool(config.get("tie_word_embeddings", False)))
    return cfg, params, tokenizer


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
