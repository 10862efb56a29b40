"""The OpenAI-compatible HTTP API of the chat server: a FastAPI router over the Scheduler.

    POST /v1/chat/completions   messages, temperature, top_p, top_k (ours), max_tokens, n, stop, seed, stream,
                                stream_options.include_usage
    GET  /v1/models             the one model served (and /v1/models/{id}, its card)
    GET  /health                status and slot use (no key needed)

Requests get the web chat's limits (web.check_request, the model's context); a refused request is HTTP 400 with
OpenAI's {"error": {"message", "type", "param", "code"}}, and so is a parameter it cannot honour (UNSUPPORTED:
logprobs, tools, response_format, logit_bias, the penalties...) unless it asks for nothing; a full queue is 429, a
missing or wrong key 401 (with --api-key). A reply's text is the page's Markdown view without the escaping: a
calculator call shows as a python block and "→ `result`"; other special tokens the model emits are not shown.
`stream: true` sends OpenAI's chat.completion.chunk events (server-sent events) ending with `data: [DONE]`; a client
that goes away cancels its requests.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import secrets
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from nanochat_jax import web
from nanochat_jax.scheduler import Busy

N_RANGE = (1, 8)
SEED_RANGE = (-2**63, 2**63 - N_RANGE[1])  # the n replies take seed, seed + 1, ...: all are 64-bit integers
MAX_STOPS = 4
MAX_STOP_CHARS = 256
DISCONNECT_POLL_S = 0.5  # how often a reply that is not streamed checks that its client is still there
DEFAULT_MAX_TOKENS = 512
# OpenAI parameters this server cannot honour, with the values that ask for nothing (null always does): any other
# value is refused, since a reply without the logprobs, tool call, JSON or penalties asked for would look like one
UNSUPPORTED = {"logprobs": (False,), "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none", "auto"),
               "functions": ([],), "function_call": ("none", "auto"), "response_format": ({"type": "text"},),
               "logit_bias": ({},), "presence_penalty": (0,), "frequency_penalty": (0,), "modalities": (["text"],),
               "audio": ()}


class Unsupported(web.ChatError):
    """A parameter the server cannot honour (its name is the error's param)."""

    def __init__(self, param: str):
        super().__init__(f"'{param}' is not supported by this server; leave it out.")
        self.param = param


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


def reply_text(tokenizer, tokens: list[int], final: bool) -> str:
    """The text of a reply so far, with tool parts as the chat page shows them (web.code); append-only while it
    grows: a tool part shows once complete (its backticks depend on its whole text), half a UTF-8 character
    once the rest has come."""
    parts = web.reply_parts(tokenizer, tokens)
    if not final and parts and parts[-1]["type"] != "text":
        parts = parts[:-1]
    text = "".join(p["text"] if p["type"] == "text" else web.code(p["type"], p["text"]) for p in parts)
    return text if final else text.rstrip("\ufffd")


def apply_stops(text: str, stops: list[str], final: bool) -> tuple[str, bool]:
    """(the text that may be shown, whether a stop string ended it). Unfinished text holds back an ending that
    could be the start of a stop string."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], True
    if not final:
        held = max((k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
                   default=0)
        text = text[:len(text) - held]
    return text, False


def tokens_to_stop(tokenizer, tokens: list[int], stops: list[str], final: bool) -> int:
    """How many of a reply's tokens it took to show a stop string: the reply's completion tokens (the decode chunk
    that showed it ran on past it)."""
    def shows(k):
        return any(s in reply_text(tokenizer, tokens[:k], final and k == len(tokens)) for s in stops)

    return bisect.bisect_left(range(len(tokens) + 1), True, key=shows)


async def cancel_when_gone(request: Request, requests: list) -> None:
    """Cancel the requests once the client has gone (a stream notices that itself, when it writes to it)."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    for r in requests:
        r.cancel()


def _parse(body, defaults: dict) -> dict:
    """The request's settings, or web.ChatError saying what is wrong."""
    if not isinstance(body, dict):
        raise web.ChatError("The request body must be a JSON object.")
    for name, neutral in UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in neutral:
            raise Unsupported(name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise web.ChatError("'messages' must be a non-empty list of {role, content} objects.")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise web.ChatError(f"messages[{i}] must be an object with role system, user or assistant.")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: only text
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise web.ChatError(f"messages[{i}].content: only text parts are supported.")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise web.ChatError(f"messages[{i}].content must be a string.")
        clean.append({"role": m["role"], "content": content})
    if clean[-1]["role"] != "user":
        raise web.ChatError("The last message must be from the user.")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise web.ChatError(f"'stop' must be a string of 1 to {MAX_STOP_CHARS} characters or a list of up to "
                            f"{MAX_STOPS} of them.")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise web.ChatError("'stream_options' must be an object such as {\"include_usage\": true}.")
    stream = False if body.get("stream") is None else body["stream"]  # (OpenAI's null: not streamed)
    if not isinstance(stream, bool):
        raise web.ChatError(f"'stream' must be true or false, got {stream!r}.")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise web.ChatError(f"'seed' must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}, got {seed!r}.")
    get = lambda name: body.get(name) if body.get(name) is not None else defaults[name]  # noqa: E731
    max_tokens = body.get("max_completion_tokens")  # (a null one is not given: max_tokens, else the default)
    max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
    temperature, top_k, max_tokens = web.check_request(
        clean, get("temperature"), get("top_k"),
        defaults["max_tokens"] if max_tokens is None else max_tokens)
    return {"messages": clean, "temperature": temperature, "top_k": top_k, "max_tokens": max_tokens,
            "top_p": web._number("top_p", get("top_p"), (0.0, 1.0)),
            "n": web._number("n", get("n"), N_RANGE, integer=True), "stops": stops,
            "seed": secrets.randbits(31) if seed is None else seed, "stream": stream,
            "include_usage": options.get("include_usage", False)}


def api_router(scheduler, tokenizer, *, model: str, api_key: str | None = None, temperature: float = 0.8,
               top_k: int = 50, max_tokens: int = DEFAULT_MAX_TOKENS, base: bool = False) -> APIRouter:
    """The API's routes. A base model continues the last message as plain text (web.completion_prompt)."""
    router = APIRouter()
    defaults = {"temperature": temperature, "top_k": top_k, "max_tokens": max_tokens, "top_p": 1.0, "n": 1}
    created = int(time.time())

    def refused(request: Request) -> JSONResponse | None:
        if api_key is None:
            return None
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            return error(401, "Missing or wrong API key: send the header 'Authorization: Bearer <key>'.",
                         "authentication_error")
        return None

    @router.get("/health")
    def health():
        return {"status": "ok" if scheduler.error is None else f"error: {scheduler.error}", "model": model,
                "slots": scheduler.slots, "busy_slots": scheduler.busy_slots(), "queued": len(scheduler.waiting)}

    card = {"id": model, "object": "model", "created": created, "owned_by": "nanochat-jax"}

    @router.get("/v1/models")
    def models(request: Request):
        return refused(request) or {"object": "list", "data": [card]}

    @router.get("/v1/models/{name:path}")
    def model_card(name: str, request: Request):
        if (no := refused(request)) is not None:
            return no
        return card if name == model else error(404, f"The model '{name}' does not exist; this server has '{model}'.",
                                                param="model")

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if (no := refused(request)) is not None:
            return no
        try:
            body = json.loads(await request.body())
        except ValueError as e:  # (invalid UTF-8 included)
            return error(400, f"The request body is not valid JSON: {e}")
        except RecursionError:
            return error(400, "The request body is not valid JSON: it is nested too deeply.")
        try:
            settings = _parse(body, defaults)
            prompt = web.completion_prompt(tokenizer, settings["messages"], base, scheduler.context_len)
        except ValueError as e:  # web.ChatError, or the renderer's complaint about the order of the roles
            return error(400, str(e), param=getattr(e, "param", None))

        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        requests = []
        try:
            for i in range(settings["n"]):
                sink = lambda *event, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, *event))  # noqa: E731
                requests.append(scheduler.submit(
                    prompt, settings["max_tokens"], sink, temperature=settings["temperature"],
                    top_k=settings["top_k"], top_p=settings["top_p"], seed=settings["seed"] + i))
        except Busy as e:
            for r in requests:
                r.cancel()
            return error(429, str(e), "rate_limit_error")
        except (ValueError, RuntimeError) as e:
            for r in requests:
                r.cancel()
            return error(503 if isinstance(e, RuntimeError) else 400, str(e))

        completion_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": completion_id, "created": now, "model": model}

        async def choices():
            """Yield (index, text so far, finish_reason or None) as the replies grow; cancels what is left."""
            tokens = [[] for _ in requests]
            open_ = set(range(len(requests)))
            try:
                while open_:
                    i, new, _, finish = await events.get()
                    if i not in open_:
                        continue
                    tokens[i] += new
                    if finish in ("error", "cancelled"):
                        raise RuntimeError(f"generation failed: {scheduler.error or finish}")
                    text, stopped = apply_stops(reply_text(tokenizer, tokens[i], finish is not None),
                                                settings["stops"], finish is not None)
                    count = len(tokens[i])
                    if stopped:
                        requests[i].cancel()
                        count = tokens_to_stop(tokenizer, tokens[i], settings["stops"], finish is not None)
                        finish = "stop"
                    if finish is not None:
                        open_.discard(i)
                    yield i, text, finish, count
            finally:
                for r in requests:
                    r.cancel()

        usage = lambda completion: {"prompt_tokens": len(prompt), "completion_tokens": completion,  # noqa: E731
                                    "total_tokens": len(prompt) + completion}  # (the n replies share the prompt)
        if not settings["stream"]:
            final, counts = {}, {}
            watcher = asyncio.create_task(cancel_when_gone(request, requests))
            try:
                async for i, text, finish, count in choices():
                    counts[i] = count
                    if finish is not None:
                        final[i] = (text, finish)
            except RuntimeError as e:
                return error(500, str(e), "server_error")
            finally:
                watcher.cancel()
            return {**head, "object": "chat.completion", "usage": usage(sum(counts.values())), "choices": [
                {"index": i, "message": {"role": "assistant", "content": final[i][0]}, "finish_reason": final[i][1]}
                for i in range(len(requests))]}

        def chunk(i, delta, finish=None):
            event = {**head, "object": "chat.completion.chunk",
                     "choices": [{"index": i, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(event)}\n\n"

        async def stream():
            shown, counts = [""] * len(requests), {}
            for i in range(len(requests)):
                yield chunk(i, {"role": "assistant", "content": ""})
            try:
                async for i, text, finish, count in choices():
                    if len(text) > len(shown[i]):
                        yield chunk(i, {"content": text[len(shown[i]):]})
                        shown[i] = text
                    if finish is not None:
                        yield chunk(i, {}, finish)
                        counts[i] = count
            except RuntimeError as e:
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
            if settings["include_usage"]:  # OpenAI's stream_options: a last chunk with the usage and no choices
                event = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(sum(counts.values()))}
                yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return router
