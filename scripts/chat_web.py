"""Chat with a trained model in the browser, and over an OpenAI-compatible API on the same port.

    python scripts/chat_web.py --source sft                       # then open http://127.0.0.1:8000
    python scripts/chat_web.py -i mid -t 0.6 -k 50 -m 256 -p 8080
    python scripts/chat_web.py --host 0.0.0.0 --api-key SECRET    # reachable from other machines
    python scripts/chat_web.py --share                            # a public Gradio link too

The model is loaded once; the page and the API (POST /v1/chat/completions, GET /v1/models, GET /health) share
one Scheduler: up to --slots replies are generated together and --max-queue more wait for a slot. The page is
nanochat_jax/web.py, the API nanochat_jax/api.py; the API's routes are part of the Gradio app's own FastAPI
app from its creation, so they answer from the first connection and --share publishes both.
"""

from __future__ import annotations

import argparse
import os
import sys

from nanochat_jax.common import UserError, add_checkpoint_flags, load_checkpoint, run_script


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Chat with a nanochat-jax checkpoint in the browser")
    add_checkpoint_flags(parser)
    parser.add_argument("-t", "--temperature", type=float, default=0.8, help="default temperature (0 is greedy)")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="default top-k (0 disables it)")
    parser.add_argument("-m", "--max-tokens", type=int, default=512, help="default max tokens per reply")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first reply (then +1 per reply)")
    parser.add_argument("-p", "--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: this machine only; 0.0.0.0 exposes it to the network)")
    parser.add_argument("--slots", type=int, default=8, help="replies generated together (rows of the KV cache)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot (then: busy)")
    parser.add_argument("--cpu-devices", type=int, default=2,
                        help="on a CPU: split it into this many devices that share the slots (1: one device)")
    parser.add_argument("--api-key", default=os.environ.get("NANOCHAT_JAX_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $NANOCHAT_JAX_API_KEY, else none)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--share-server", default=None, help="a self-hosted Gradio share server (host:port)")
    args = parser.parse_args(argv)
    if args.slots < 1 or args.max_queue < 0 or args.cpu_devices < 1:
        parser.error("--slots and --cpu-devices must be >= 1 and --max-queue >= 0")
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be from 1 to 65535, got {args.port}")
    if not -2**62 <= args.seed <= 2**62:  # a 64-bit seed for every reply (the Scheduler refuses others), +1 each
        parser.error(f"--seed must be from -2**62 to 2**62, got {args.seed}")
    return args


def refuse_invalid(request, exc):
    """A request that fails the routes' own validation (Gradio's among them): 422 with what was wrong, never the
    request's values echoed back (FastAPI's default does, and fails with a 500 on text UTF-8 cannot hold, such as
    a lone surrogate escaped in the JSON)."""
    from fastapi.responses import JSONResponse

    errors = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in exc.errors())
    return JSONResponse({"detail": errors.encode("utf-8", "replace").decode()}, status_code=422)


class ContainErrors:
    """ASGI middleware around the routes: a route that raises (Gradio's do, on requests its page never sends: an
    unknown fn_index, endpoint or argument, or the stream of a session it does not know) answers 400 with one line
    instead of a 500, or, when its answer has begun, ends that answer properly; either way the connection stays
    open (uvicorn drops it after an exception) and the error is logged, not sent."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = {"start": False, "end": False}

        async def watch(message):
            sent["start"] = sent["start"] or message["type"] == "http.response.start"
            sent["end"] = sent["end"] or (message["type"] == "http.response.body" and not message.get("more_body"))
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as e:
            print(f"chat_web: {scope['method']} {scope['path']}: {type(e).__name__}: {e}", file=sys.stderr)
            if not sent["start"]:
                from fastapi.responses import JSONResponse

                await JSONResponse({"detail": "The server could not handle this request."}, 400)(scope, receive, send)
            elif not sent["end"]:
                await send({"type": "http.response.body", "body": b"", "more_body": False})


def launch(app, router, args) -> str | None:
    """Start the Gradio app with the API's routes on its FastAPI app (given to the app as it is made, so they
    answer from the first connection); returns the share link, if one opened. Without a network the share link
    fails: Gradio's own long explanation is replaced by one line of ours. UserError when it cannot listen on
    --host:--port (the port is taken, or the address is not this machine's)."""
    import contextlib
    import io

    from fastapi.exceptions import RequestValidationError
    from starlette.middleware import Middleware

    share = args.share or args.share_server is not None
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet) if share else contextlib.nullcontext():
            app.launch(server_name=args.host, server_port=args.port, quiet=True, prevent_thread_lock=True, share=share,
                       share_server_address=args.share_server,
                       app_kwargs={"routes": list(router.routes), "middleware": [Middleware(ContainErrors)],
                                   "exception_handlers": {RequestValidationError: refuse_invalid}})
    except OSError:  # Gradio's message names a range of ports and an environment variable, not the flags
        raise UserError(f"cannot listen on {args.host}:{args.port}: the port is in use or the address is not this "
                        "machine's (see --port and --host)") from None
    if share and not app.share_url:
        where = f"share server {args.share_server}" if args.share_server else "Gradio's share server"
        print(f"chat_web: could not open a public link through {where}; serving locally only", file=sys.stderr)
    return app.share_url


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    from nanochat_jax.api import api_router
    from nanochat_jax.scheduler import Scheduler, serving_engine, split_cpu
    from nanochat_jax.web import ChatError, build_app, check_request

    try:
        check_request([{"role": "user", "content": "-"}], args.temperature, args.top_k, args.max_tokens)
    except ChatError as e:
        print(f"chat_web: bad default: {e}", file=sys.stderr)
        return 2
    split_cpu(args.cpu_devices)
    model, tokenizer, meta = load_checkpoint(args)
    depth = meta.get("model", {}).get("depth")
    title = f"nanochat-jax · {args.source} d{depth} step {meta.get('step')}"
    engine = serving_engine(model, tokenizer, args.slots, args.cpu_devices)
    scheduler = Scheduler(engine, slots=args.slots, max_queue=args.max_queue)
    base = args.source == "base"
    app = build_app(scheduler, tokenizer, base=base, title=title, temperature=args.temperature, top_k=args.top_k,
                    max_tokens=args.max_tokens, seed=args.seed)
    router = api_router(scheduler, tokenizer, model=f"nanochat-jax-{args.source}-d{depth}", api_key=args.api_key,
                        temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens, base=base)
    share_url = launch(app, router, args)
    key = ", key required" if args.api_key else ""
    split = f" over {engine.mesh.size} CPU devices" if engine.mesh is not None else ""
    print(f"{title} | {args.slots} slots{split} | http://{args.host}:{args.port} (API: /v1/chat/completions{key})"
          + (f" | public: {share_url}" if share_url else ""))
    try:
        app.block_thread()
    finally:
        scheduler.close()
    return 0


if __name__ == "__main__":
    run_script(main)
