"""The BPE tokenizer: trained with our Rust trainer `rust_bpe`, run with `tiktoken`, saved as plain JSON.

Owns the special tokens, the split pattern, the on-disk format (`tokenizer.json`: pattern, the merge
ranks as base64 strings in rank order, special tokens),
and the chat layout: `render_conversation` turns a conversation into token ids plus a training mask
(1 on the tokens the assistant must learn to produce), `render_for_completion` primes a reply.
Ordinary text is always encoded with `encode_ordinary`, so text that spells a special token never
becomes one.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np
import tiktoken

from nanochat_jax.common import UserError, artifacts_dir, write_atomically

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool's output, fed back to the assistant
]

# GPT-4's split regex, with numbers split into runs of at most two digits (nanochat's choice).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1


class Tokenizer:
    """A tiktoken Encoding whose last ids are SPECIAL_TOKENS, plus nanochat's chat rendering."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN):
        """From BPE merge ranks (token bytes -> rank 0..n-1); the special tokens get ids n, n+1, ..."""
        n = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n)):
            raise ValueError("mergeable ranks must be exactly 0..n-1")
        self.pattern = pattern
        self.special = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name="nanochat_jax", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special)
        self.bos = self.special["<|bos|>"]

    # ----- training, saving, loading

    @classmethod
    def train_from_iterator(cls, texts, vocab_size: int, buffer_size: int = 8192) -> "Tokenizer":
        """Train BPE on an iterator of strings; vocab_size includes the special tokens.

        The result has fewer tokens than asked for when the text runs out of pairs to merge.
        """
        n_merged = vocab_size - len(SPECIAL_TOKENS)
        if n_merged < 256:
            raise ValueError(f"vocab_size={vocab_size} must be >= {256 + len(SPECIAL_TOKENS)} "
                             f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
        import rust_bpe  # (only training needs the Rust trainer: a machine that only loads tokenizers may lack it)

        trainer = rust_bpe.Tokenizer()
        trainer.train_from_iterator(texts, n_merged, buffer_size=buffer_size, pattern=SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        return cls(ranks, trainer.get_pattern())

    def save(self, directory) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        n = self.enc.n_vocab - len(SPECIAL_TOKENS)
        table = {
            "format_version": FORMAT_VERSION,
            "pattern": self.pattern,
            "mergeable_ranks": [base64.b64encode(self.enc.decode_single_token_bytes(i)).decode("ascii")
                                for i in range(n)],
            "special_tokens": self.special,
        }
        path = directory / TOKENIZER_FILE
        write_atomically(path, json.dumps(table, ensure_ascii=False))  # a kill mid-write leaves the old one whole
        return path

    @classmethod
    def load(cls, directory) -> "Tokenizer":
        """TokenizerCorrupt (one line) when tokenizer.json is not a tokenizer saved by `save`."""
        path = Path(directory) / TOKENIZER_FILE
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
            if table.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {table.get('format_version')!r}, expected {FORMAT_VERSION}")
            ranks = {base64.b64decode(token, validate=True): rank for rank, token in enumerate(table["mergeable_ranks"])}
            tok = cls(ranks, table["pattern"])
            stored = table["special_tokens"]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            why = f"no {e} entry" if isinstance(e, KeyError) else e
            raise TokenizerCorrupt(f"{path} is not a readable tokenizer ({why}); run scripts/tok_train.py again") from None
        if stored != tok.special:
            raise TokenizerCorrupt(f"{path}: special tokens {stored} do not match SPECIAL_TOKENS after the ranks")
        return tok

    # ----- basic encoding

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    @property
    def bos_token_id(self) -> int:
        return self.bos

    def get_special_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS)

    def encode_special(self, name: str) -> int:
        try:
            return self.special[name]
        except KeyError:
            raise ValueError(f"unknown special token {name!r}; special tokens are: {', '.join(SPECIAL_TOKENS)}") from None

    def _special_id(self, token: int | str) -> int:
        return token if isinstance(token, int) else self.encode_special(token)

    def encode(self, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None,
               num_threads: int = 8):
        """Token ids of a string (list[int]) or of a list of strings (list[list[int]]), specials never matched."""
        head = [] if prepend is None else [self._special_id(prepend)]
        tail = [] if append is None else [self._special_id(append)]
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text) + tail
        if isinstance(text, list):
            return [head + ids + tail for ids in self.enc.encode_ordinary_batch(text, num_threads=num_threads)]
        raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")

    def decode(self, ids) -> str:
        return self.enc.decode(ids if isinstance(ids, list) else np.asarray(ids).tolist())

    # ----- conversations

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """(ids, mask) of a chat; mask is 1 exactly on the tokens the assistant is trained to produce.

        Layout: <|bos|>, then per turn <|user_start|> text <|user_end|> or <|assistant_start|> reply
        <|assistant_end|>. A leading system message is prepended to the first user message. An assistant
        reply is a string or a list of parts: "text", "python" (inside <|python_start|>..<|python_end|>,
        trained) and "python_output" (inside <|output_start|>..<|output_end|>, not trained: the tool
        writes it). Masked out: bos, user turns, <|assistant_start|>, tool outputs. Truncated to max_tokens.
        """
        messages = _checked_messages(conversation)
        ids, mask = [], []

        def add(tokens, trained: int):
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([trained] * len(tokens))

        sp = self.encode_special
        add(self.bos, 0)
        for message in messages:
            content = message["content"]
            if message["role"] == "user":
                add(sp("<|user_start|>"), 0)
                add(self.encode(content), 0)
                add(sp("<|user_end|>"), 0)
                continue
            add(sp("<|assistant_start|>"), 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                text_ids = self.encode(part["text"])
                if part["type"] == "text":
                    add(text_ids, 1)
                elif part["type"] == "python":
                    add(sp("<|python_start|>"), 1)
                    add(text_ids, 1)
                    add(sp("<|python_end|>"), 1)
                else:  # python_output
                    add(sp("<|output_start|>"), 0)
                    add(text_ids, 0)
                    add(sp("<|output_end|>"), 0)
            add(sp("<|assistant_end|>"), 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict, max_tokens: int = 2048) -> list[int]:
        """Ids of a chat without its final assistant message, ending in <|assistant_start|> (for sampling)."""
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
            raise ValueError("render_for_completion: the last message must be from the assistant")
        ids, _ = self.render_conversation({"messages": messages[:-1]}, max_tokens=max_tokens)
        return ids + [self.encode_special("<|assistant_start|>")]


PART_TYPES = ("text", "python", "python_output")


def check_conversation(conversation) -> None:
    """ValueError (saying which message) unless render_conversation can render the conversation."""
    _checked_messages(conversation)


def _checked_messages(conversation) -> list[dict]:
    """The messages with a leading system message merged into the first user message; ValueError if malformed."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError("conversation must be a dict with a non-empty 'messages' list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i}: must be a dict with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: unknown role {m['role']!r} (expected system, user or assistant)")
    offset = 0
    if messages[0]["role"] == "system":
        if not isinstance(messages[0]["content"], str):
            raise ValueError("message 0: system content must be a string")
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("message 1: a system message must be followed by a user message")
        merged = dict(messages[1])
        if isinstance(merged["content"], str):
            merged["content"] = messages[0]["content"] + "\n\n" + merged["content"]
        messages, offset = [merged] + messages[2:], 1
    for j, m in enumerate(messages):
        i = j + offset
        expected = "user" if j % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(f"message {i}: role is {m['role']!r} but should be {expected!r} "
                             "(after an optional system message, turns alternate user, assistant, ...)")
        content = m["content"]
        if expected == "user":
            if not isinstance(content, str):
                raise ValueError(f"message {i}: user content must be a string, got {type(content).__name__}")
        elif isinstance(content, list):
            for k, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"message {i}, part {k}: unknown part type {kind!r} "
                                     f"(expected one of {', '.join(PART_TYPES)})")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"message {i}, part {k}: 'text' must be a string")
        elif not isinstance(content, str):
            raise ValueError(f"message {i}: assistant content must be a string or a list of parts, "
                             f"got {type(content).__name__}")
    return messages


# ---------------------------------------------------------------------------------------------
# Bits-per-byte support and the standard location


def token_bytes(tokenizer: Tokenizer) -> np.ndarray:
    """int32 (vocab_size,): UTF-8 byte length of each token, 0 for special tokens."""
    specials = set(tokenizer.special.values())
    return np.array([0 if i in specials else len(tokenizer.enc.decode_single_token_bytes(i))
                     for i in range(tokenizer.vocab_size)], dtype=np.int32)


def default_tokenizer_dir() -> Path:
    return artifacts_dir("tokenizer")


def tokenizer_dir(recorded=None) -> Path:
    """The tokenizer directory a checkpoint's metadata names: None is the trained one; a relative path lies under
    the artifacts home (so a home copied to another machine or user still finds its tokenizers)."""
    if recorded is None:
        return default_tokenizer_dir()
    path = Path(recorded)
    return path if path.is_absolute() else artifacts_dir(create=False) / path


def tokenizer_record(directory) -> str:
    """How checkpoint metadata names a tokenizer directory: relative to the artifacts home when inside it."""
    path, home = Path(directory).absolute(), artifacts_dir(create=False).absolute()
    return str(path.relative_to(home)) if path.is_relative_to(home) else str(path)


class TokenizerMissing(UserError, FileNotFoundError):
    """No trained tokenizer where one is needed."""


class TokenizerCorrupt(UserError, ValueError):
    """A tokenizer.json that cannot be read back (cut short, edited, another format)."""


def _require(path: Path) -> Path:
    if not path.exists():
        raise TokenizerMissing(f"no tokenizer at {path}; run scripts/tok_train.py first")
    return path


def tokenizer_fingerprint(directory=None) -> str:
    """A short hash of a saved tokenizer: checkpoints record it, so that loading one with a retrained
    tokenizer (other token ids for the same text) is an error instead of a model reading garbage."""
    directory = tokenizer_dir(directory)
    return hashlib.sha256(_require(directory / TOKENIZER_FILE).read_bytes()).hexdigest()[:16]


def load_tokenizer(directory=None) -> Tokenizer:
    directory = tokenizer_dir(directory)
    _require(directory / TOKENIZER_FILE)
    return Tokenizer.load(directory)
