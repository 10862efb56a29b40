"""Chat with a trained model in the browser (a Gradio app; the reply streams token by token).

    python scripts/chat_web.py --source sft                       # then open http://127.0.0.1:8000
    python scripts/chat_web.py -i mid -t 0.6 -k 50 -m 256 -p 8080
    python scripts/chat_web.py --host 0.0.0.0                     # reachable from other machines

The model is loaded once; one reply is generated at a time. The UI logic lives in nanochat_jax/web.py.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Chat with a nanochat-jax checkpoint in the browser")
    parser.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"], help="checkpoint stage")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--depth", type=int, default=None, help="model depth (default: most recently written)")
    parser.add_argument("-t", "--temperature", type=float, default=0.8, help="default temperature (0 is greedy)")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="default top-k (0 disables it)")
    parser.add_argument("-m", "--max-tokens", type=int, default=512, help="default max tokens per reply")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first reply (then +1 per reply)")
    parser.add_argument("-p", "--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: this machine only; 0.0.0.0 exposes it to the network)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    from nanochat_jax.checkpoint import CheckpointError, load_model
    from nanochat_jax.engine import Engine
    from nanochat_jax.web import ChatError, build_app, check_request

    try:
        check_request([{"role": "user", "content": "-"}], args.temperature, args.top_k, args.max_tokens)
    except ChatError as e:
        print(f"chat_web: bad default: {e}", file=sys.stderr)
        return 2
    try:
        model, tokenizer, meta = load_model(args.source, step=args.step, depth=args.depth)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"chat_web: cannot load the {args.source} checkpoint: {e}", file=sys.stderr)
        return 1
    depth = meta.get("model", {}).get("depth")
    title = f"nanochat-jax · {args.source} d{depth} step {meta.get('step')}"
    app = build_app(Engine(model, tokenizer), tokenizer, base=args.source == "base", title=title,
                    temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens, seed=args.seed)
    print(f"{title} | http://{args.host}:{args.port}")
    app.launch(server_name=args.host, server_port=args.port, quiet=True)
    return 0


if __name__ == "__main__":
    from nanochat_jax.common import enable_compilation_cache

    enable_compilation_cache()
    sys.exit(main())
