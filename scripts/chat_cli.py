"""Chat with a trained model in the terminal, streaming the reply token by token.

    python scripts/chat_cli.py --source sft                 # interactive; 'clear' resets, 'quit'/'exit' leaves
    python scripts/chat_cli.py --source mid -p "Why is the sky blue?" -t 0.6 -k 50

The conversation is kept as chat messages and rendered with `tokenizer.render_for_completion`; an
assistant reply that used the calculator is stored as text / python / python_output parts, so the next
turn renders the tool call exactly as the model produced it.
"""

from __future__ import annotations

import argparse
import math
import sys

from nanochat_jax.common import add_checkpoint_flags, load_checkpoint, run_script
from nanochat_jax.web import ChatError, completion_prompt, reply_content, reply_parts, stream_tokens


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Chat with a nanochat-jax checkpoint in the terminal")
    add_checkpoint_flags(parser)
    parser.add_argument("-p", "--prompt", default="", help="answer this one prompt and exit")
    parser.add_argument("-t", "--temperature", type=float, default=0.6)
    parser.add_argument("-k", "--top-k", type=int, default=50, help="0 disables top-k")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.max_tokens < 1 or not 0 <= args.temperature < math.inf or args.top_k < 0
            or (args.top_p is not None and not 0 <= args.top_p <= 1)):
        parser.error("need --max-tokens >= 1, a finite --temperature >= 0, --top-k >= 0 and --top-p within [0, 1]")
    if not -2**62 <= args.seed <= 2**62:  # jax.random.key takes 64-bit seeds (+1 each turn)
        parser.error(f"--seed must be from -2**62 to 2**62, got {args.seed}")
    return args


def stream(engine, tokenizer, prompt: list[int], out=sys.stdout, **generate_kwargs) -> list[int]:
    """Generate from prompt tokens (web.stream_tokens: up to max_tokens or the trained context), writing the text
    to `out` as it comes; returns the generated tokens."""
    tokens, shown = [], ""
    for tokens in stream_tokens(engine, tokenizer, prompt, **generate_kwargs):
        text = tokenizer.decode(tokens)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[len(shown):])
            out.flush()
            shown = text
    out.write(tokenizer.decode(tokens)[len(shown):] + "\n")
    return tokens


def respond(engine, tokenizer, messages: list[dict], user_text: str, out=sys.stdout, **generate_kwargs) -> list[int]:
    """Stream the assistant's reply to the user's turn to `out`, add both to `messages`; return its tokens.
    ChatError (and `messages` unchanged) when the conversation no longer fits the model's context."""
    turn = {"role": "user", "content": user_text}
    prompt = completion_prompt(tokenizer, messages + [turn], context_len=engine.context_len)
    tokens = stream(engine, tokenizer, prompt, out, **generate_kwargs)
    messages += [turn, {"role": "assistant", "content": reply_content(reply_parts(tokenizer, tokens))}]
    return tokens


def answer(engine, tokenizer, messages: list[dict], user_text: str, base: bool, settings: dict) -> None:
    """Stream the reply to one user turn: a chat model answers as the assistant (kept in `messages` only when it
    finishes); a base model, which is not a chat model, continues the plain text."""
    if base:
        prompt = completion_prompt(tokenizer, [{"role": "user", "content": user_text}], base=True,
                                   context_len=engine.context_len)
        print(f"\n{user_text}", end="", flush=True)
        stream(engine, tokenizer, prompt, **settings)
    else:
        print("\nAssistant: ", end="", flush=True)
        respond(engine, tokenizer, messages, user_text, **settings)


def interact(engine, tokenizer, base: bool, settings: dict) -> int:
    """The conversation loop: 'clear' starts a new one, 'quit' / 'exit' / end of input leave."""
    messages: list[dict] = []
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 (a Latin-1 file piped in) shows U+FFFD instead
        sys.stdin.reconfigure(errors="replace")  # of ending the chat with a UnicodeDecodeError traceback
    while True:
        try:
            user_text = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if user_text.lower() in ("quit", "exit"):
            return 0
        if user_text.lower() == "clear":
            messages.clear()
            print("Conversation cleared.")
            continue
        if not user_text:
            continue
        try:
            answer(engine, tokenizer, messages, user_text, base, settings)
        except ChatError as e:
            print(f"({e}" + ("" if base or not messages else " Type 'clear'.") + ")")
        except KeyboardInterrupt:  # Ctrl-C stops this reply only; the conversation goes on without it
            print("\n(stopped: that reply is not kept)")
        settings["seed"] += 1  # a fresh sample each turn


def main(argv=None) -> int:
    args = parse_args(argv)
    from nanochat_jax.engine import Engine

    model, tokenizer, meta = load_checkpoint(args)
    engine, base = Engine(model, tokenizer), args.source == "base"
    settings = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k or None,
                    top_p=args.top_p, seed=args.seed)
    print(f"nanochat-jax chat | source={args.source} step={meta.get('step')} "
          f"depth={meta.get('model', {}).get('depth')} | " + " ".join(f"{k}={v}" for k, v in settings.items()))
    if not args.prompt:
        print("Type 'clear' to start a new conversation, 'quit' or 'exit' to leave."
              + (" The base model continues your text." if base else ""))
        return interact(engine, tokenizer, base, settings)
    if not args.prompt.strip():  # -p: one answer, to the text as given (no commands)
        print("chat_cli: the prompt is empty", file=sys.stderr)
        return 2
    try:
        answer(engine, tokenizer, [], args.prompt.strip(), base, settings)
    except ChatError as e:
        print(f"\nchat_cli: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_script(main)
