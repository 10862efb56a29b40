"""The web chat behind scripts/chat_web.py: request limits, prompt rendering, the reply streamed from the
Engine as Markdown, and the Gradio app around it.

The conversation is kept as chat messages for `tokenizer.render_conversation`. An assistant reply that
used the calculator is stored as text / python / python_output parts (`reply_parts`), so the next turn
renders exactly the tokens the model produced; the Chatbot only shows a Markdown view of the messages, with
a calculator call as a python code block followed by "→ `result`", a line starting with "#" (GSM8K's
"#### 42") and a "<" (a<b) kept as text outside code, and a notice under a reply that was stopped or cut by max
tokens or the context (kept with the message as its "notice", which the model never reads, so it stays in the
history).
Special tokens other than the calculator's never show as text.

A base model is not a chat model: each message is continued as plain text and earlier turns are not used.
Gradio is imported only by `build_app`, so the rest (and chat_cli's `reply_parts`) loads without it.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re

# nanochat's limits on one chat request
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_CONVERSATION_CHARS = 32000
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (0, 200)  # 0 disables top-k
MAX_TOKENS_RANGE = (1, 4096)

STOPPED = "\n\n*(stopped)*"
CUT_BY_MAX_TOKENS = "\n\n*(cut at {} tokens: the Max tokens setting)*"
CUT_BY_CONTEXT = "\n\n*(cut: the conversation reached the model's context of {} tokens; press Clear to start anew)*"


class ChatError(ValueError):
    """A request the chat refuses; its message is meant for the user."""


def reply_parts(tokenizer, tokens: list[int]) -> list[dict]:
    """Split a generated reply into render_conversation parts: text, python (the call), python_output. Other
    special tokens (a model that writes <|user_start|> mid-reply) are dropped: they are never text."""
    sp = tokenizer.encode_special
    opening = {sp("<|python_start|>"): "python", sp("<|output_start|>"): "python_output"}
    closing = {sp("<|python_end|>"), sp("<|output_end|>")}
    hidden = {sp(name) for name in tokenizer.get_special_tokens()} - set(opening) - closing
    parts, kind, run = [], "text", []

    def flush():  # an empty tool part stays: the next turn must render exactly the tokens the model produced
        if run or kind != "text":
            parts.append({"type": kind, "text": tokenizer.decode(run)})

    for token in tokens:
        if token in opening:
            flush()
            kind, run = opening[token], []
        elif token in closing:
            flush()
            kind, run = "text", []
        elif token not in hidden:
            run.append(token)
    flush()
    return parts


def reply_content(parts: list[dict]) -> str | list[dict]:
    """An assistant message's content: a plain string unless the reply used the tool."""
    if any(p["type"] != "text" for p in parts):
        return parts
    return "".join(p["text"] for p in parts)


def sendable(text: str) -> str:
    """Text as the chat keeps it: lone surrogates (JSON's escapes allow them, UTF-8 cannot hold them, so Gradio
    could not send the page's update) become U+FFFD."""
    return re.sub("[\ud800-\udfff]", "\ufffd", text)


FENCE = re.compile(r" {0,3}(`{3,}|~{3,})(.*)")
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
# a heading, an HTML tag (or comment) the page would hide; not an autolink (<https://x.org>, <a@b.org>), which it shows
MARKUP = re.compile(r"(?m)^ {0,3}#|<(?=[A-Za-z/!?])(?![A-Za-z][\w+.-]{1,31}:[^\s<>]*>|[\w.+-]+@[\w.-]+>)")
LIST_ITEM = re.compile(r" {0,3}(?:[-*+]|\d{1,9}[.)])(?:\s|$)")


def plain(text: str) -> str:
    """Text that Markdown shows as written: a "#" starting a line is not a heading ("#### 42" stays) and a "<" is
    not an HTML tag ("a<b and c>d" stays), except in code (fenced blocks, `spans`, indented lines), which Markdown
    shows as written already and where an escape would show as a backslash."""
    out, prose, fence = [], [], None
    for line in text.split("\n"):
        m = FENCE.fullmatch(line)
        if fence:  # inside a fenced block: up to a fence of its kind at least as long
            out.append(line)
            if m and m[1][0] == fence[0] and len(m[1]) >= len(fence) and not m[2].strip():
                fence = None
        elif m and not (m[1][0] == "`" and "`" in m[2]):
            out += [_escaped("\n".join(prose)), line] if prose else [line]
            prose, fence = [], m[1]
        else:
            prose.append(line)
    return "\n".join(out + ([_escaped("\n".join(prose))] if prose else []))


def _code_lines(text: str) -> set[int]:
    """Where the lines of indented code blocks start: indented lines after a blank line (or at the start), outside a
    list, and the indented lines that follow them; other indented lines (a nested list item, a paragraph's next
    line) are text."""
    starts, at, blank, code, listed = set(), 0, True, False, False
    for line in text.split("\n"):
        indented = line.startswith(("    ", "\t"))
        if line.strip():
            code = indented and (code or (blank and not listed))
            if code:
                starts.add(at)
            elif LIST_ITEM.match(line):
                listed = True
            elif not indented and blank:  # a paragraph after a blank line ends a list
                listed = False
        blank = not line.strip()
        at += len(line) + 1
    return starts


def _escaped(text: str) -> str:
    spans = [m.span() for m in CODE_SPAN.finditer(text)]  # (in order, apart)
    code_lines = _code_lines(text)

    def escape(m):
        i = bisect.bisect(spans, (m.start(), math.inf)) - 1
        if (i >= 0 and m.start() < spans[i][1]) or (m[0] == "<" and text.rfind("\n", 0, m.start()) + 1 in code_lines):
            return m[0]
        return m[0][:-1] + "\\" + m[0][-1]

    return MARKUP.sub(escape, text)


def code(kind: str, text: str) -> str:
    """A tool part as Markdown: a call as a python code block, a result as "→ `result`" (the chat page's and the
    API's). The fence or the backticks around it outnumber any run of backticks inside, so a result such as a`b
    cannot end them early, and a result of several lines is a block (a line of it starting with "#" would be a
    heading)."""
    ticks = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    if kind == "python" or "\n" in text:
        fence = max(ticks, "```", key=len)
        lang, before, after = ("python", "\n", "\n") if kind == "python" else ("", "→\n", "\n\n")
        return f"{before}{fence}{lang}\n{text}\n{fence}{after}"
    pad = " " if text.startswith("`") or text.endswith("`") else ""  # (CommonMark strips one space each side)
    return f"→ {ticks}{pad}{text}{pad}{ticks}\n\n"


def to_markdown(content: str | list[dict]) -> str:
    """How a message's content shows in the chat."""
    if isinstance(content, str):
        return plain(content)
    return "".join(plain(p["text"]) if p["type"] == "text" else code(p["type"], p["text"]) for p in content)


def chat_display(messages: list[dict]) -> list[dict]:
    """The Chatbot's value for a conversation."""
    return [{"role": m["role"], "content": to_markdown(m["content"]) + m.get("notice", "")} for m in messages]


def _chars(content: str | list[dict]) -> int:
    return len(content) if isinstance(content, str) else sum(len(p["text"]) for p in content)


def _number(name: str, value, bounds: tuple, integer: bool = False):
    lo, hi = bounds
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ChatError(f"{name} must be a number between {lo} and {hi}, got {value!r}")
    if integer and value != int(value):
        raise ChatError(f"{name} must be a whole number, got {value}")
    if not lo <= value <= hi:
        raise ChatError(f"{name} must be between {lo} and {hi}, got {value}")
    return int(value) if integer else float(value)


def check_request(messages: list[dict], temperature, top_k, max_tokens) -> tuple[float, int, int]:
    """Apply nanochat's limits to a conversation (ending with the new user message) and the sampling
    settings; returns (temperature, top_k, max_tokens) as numbers, or raises ChatError saying what is wrong."""
    if not messages or not str(messages[-1]["content"]).strip():
        raise ChatError("Please type a message first.")
    if len(messages) > MAX_MESSAGES:
        raise ChatError(f"The conversation has {len(messages)} messages; the limit is {MAX_MESSAGES}. "
                        "Press Clear to start a new one.")
    for i, m in enumerate(messages):  # the user's turns: a long reply of the model's own must not block the chat
        if m["role"] == "user" and _chars(m["content"]) > MAX_MESSAGE_CHARS:
            who = "Your message" if i == len(messages) - 1 else f"Message {i + 1}"
            raise ChatError(f"{who} is {_chars(m['content'])} characters long; the limit is "
                            f"{MAX_MESSAGE_CHARS} per message.")
    total = sum(_chars(m["content"]) for m in messages)
    if total > MAX_CONVERSATION_CHARS:
        raise ChatError(f"The conversation is {total} characters long; the limit is {MAX_CONVERSATION_CHARS}. "
                        "Press Clear to start a new one.")
    return (_number("Temperature", temperature, TEMPERATURE_RANGE),
            _number("Top-k", top_k, TOP_K_RANGE, integer=True),
            _number("Max tokens", max_tokens, MAX_TOKENS_RANGE, integer=True))


def completion_prompt(tokenizer, messages: list[dict], base: bool = False, context_len: int | None = None) -> list[int]:
    """Prompt tokens: the chat rendered up to <|assistant_start|>, or for a base model <|bos|> + the last
    message as plain text. ChatError when that is context_len tokens or more (the model was trained on
    shorter texts; cutting the conversation instead would drop the newest turn)."""
    if base:
        prompt = tokenizer.encode(messages[-1]["content"], prepend=tokenizer.bos_token_id)
    else:
        prompt = tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]},
                                                 max_tokens=1 << 30)
    if context_len is not None and len(prompt) >= context_len:  # a new conversation helps only with earlier turns
        alone = base or not any(m["role"] == "assistant" for m in messages)
        what, remedy = ("Your message", "Shorten it.") if alone else ("The conversation", "Start a new conversation.")
        raise ChatError(f"{what} is {len(prompt)} tokens long; this model reads at most {context_len - 1} "
                        f"before its reply. {remedy}")
    return prompt


def stream_tokens(engine, tokenizer, prompt: list[int], max_tokens: int, **generate_kwargs):
    """Yield the reply's tokens so far (a growing list, without the terminal token) after every token. The reply
    ends after max_tokens or at the model's trained context, whichever comes first."""
    stop = (tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id)
    max_tokens = min(max_tokens, engine.context_len - len(prompt))
    tokens = []
    for column, _ in engine.generate(prompt, num_samples=1, max_tokens=max_tokens, **generate_kwargs):
        if column[0] in stop:
            return
        tokens.append(column[0])
        yield tokens


def respond(engine, tokenizer, messages: list[dict], user_text: str, *, temperature, top_k, max_tokens,
            seed: int = 0, base: bool = False):
    """One chat turn: returns a generator of (messages, display, partial) as the reply grows. Only the last
    triple's messages hold the new turn and its reply; until then they are the conversation as it was, so a
    reply that fails half way leaves a conversation that still continues. `partial` is the conversation with
    the turn and the reply so far (what Stop keeps). A reply cut by max_tokens or the context gets a notice (its
    message's "notice").

    Raises ChatError (right away) for a request outside the limits; `messages` is not modified."""
    turn = [{"role": "user", "content": (user_text or "").strip()}]
    temperature, top_k, max_tokens = check_request(turn if base else messages + turn, temperature, top_k,
                                                   max_tokens)
    prompt = completion_prompt(tokenizer, messages + turn, base, engine.context_len)
    budget = min(max_tokens, engine.context_len - len(prompt))  # as stream_tokens

    def steps(messages):
        shown = chat_display(messages + turn)
        tokens = []
        for tokens in stream_tokens(engine, tokenizer, prompt, max_tokens=max_tokens, temperature=temperature,
                                    top_k=top_k or None, seed=seed):
            parts = reply_parts(tokenizer, tokens)
            if not (parts and parts[-1]["text"].endswith("\ufffd")):  # wait for the rest of a multi-byte character
                content = reply_content(parts)
                yield (messages, shown + [{"role": "assistant", "content": to_markdown(content)}],
                       messages + turn + [{"role": "assistant", "content": content}])
        reply = {"role": "assistant", "content": reply_content(reply_parts(tokenizer, tokens))}
        if len(tokens) == budget and budget < max_tokens:
            reply["notice"] = CUT_BY_CONTEXT.format(engine.context_len)
        elif len(tokens) == budget:
            reply["notice"] = CUT_BY_MAX_TOKENS.format(budget)
        messages = messages + turn + [reply]
        yield messages, chat_display(messages), messages

    return steps(messages)


def build_app(engine, tokenizer, *, base: bool = False, title: str = "nanochat-jax", temperature: float = 0.8,
              top_k: int = 50, max_tokens: int = 512, seed: int = 0):
    """The Gradio Blocks app over an Engine (one reply at a time) or a Scheduler (replies of all users together,
    in its queue; a full queue shows as busy). Enter and Send are one event; a refused request shows its reason
    in a status line under the message box, which also says "Thinking…" (with every slot busy: "Waiting for a free
    slot" and the queue ahead) until the first token. Stop keeps the reply so far, marked "(stopped)"; Stop with no reply under way does nothing. Clear
    forgets the conversation.

    Stop and Clear do not cancel the reply's event (Gradio's cancellation races with the reply's last updates and
    marks the chat "Error"): they set the session's `run["end"]`, and the reply's own generator, the only writer of
    the conversation while it runs, ends at its next token with the stopped or the cleared conversation."""
    import gradio as gr

    from nanochat_jax.scheduler import Busy

    seeds = itertools.count(seed)  # a fresh sample every turn
    scheduled = hasattr(engine, "submit")

    def thinking() -> str:  # (the scheduler's counts, read without its lock: for display only)
        if scheduled and engine.busy_slots() + len(engine.waiting) >= engine.slots:
            return f"⏳ Waiting for a free slot ({len(engine.waiting)} ahead in the queue)…"
        return "⏳ Thinking…"

    def submit(user_text, messages, temperature, top_k, max_tokens, run):
        """Stream (textbox, messages, chatbot, status); a refused request only sets the status line. The box is
        emptied once, when the request is accepted, so what the user types meanwhile stays."""
        user_text = sendable(user_text or "")
        try:
            steps = respond(engine, tokenizer, messages, user_text, temperature=temperature, top_k=top_k,
                            max_tokens=max_tokens, seed=next(seeds), base=base)
        except ChatError as e:
            yield gr.skip(), gr.skip(), gr.skip(), f"⚠️ {e}"
            return
        run["end"] = None  # a reply is under way
        shown = messages + [{"role": "user", "content": user_text.strip()}, {"role": "assistant", "content": ""}]
        yield "", messages, chat_display(shown[:-1]), thinking()
        end = None
        try:
            for messages, display, partial in steps:
                if run["end"]:  # Stop or Clear was pressed
                    end = run["end"]
                    break
                yield gr.skip(), messages, display, ""
                shown = partial
        except Busy as e:  # the turn is dropped and the message goes back in the box
            yield user_text, messages, chat_display(messages), f"⚠️ {e}"
            return
        finally:
            steps.close()  # the scheduler frees the reply's slot now
            run["end"] = "done"
        if end == "stop":  # the reply as shown, marked
            shown[-1] = {**shown[-1], "notice": STOPPED}
            yield gr.skip(), shown, chat_display(shown), ""
        elif end == "clear":
            yield gr.skip(), [], [], ""
        else:
            yield gr.skip(), messages, display, ""  # finished (API callers read this last update)

    def stop(run):
        if run["end"] is None:  # else no reply is under way: nothing changes
            run["end"] = "stop"

    def clear(run):
        if run["end"] is None:
            run["end"] = "clear"
        return "", [], [], ""

    note = ("A base model continues your text; earlier turns are not used." if base
            else "Calculator calls show as a python block followed by → `result`.")
    with gr.Blocks(title=title) as app:
        gr.Markdown(f"## {title}\n{note}")
        messages = gr.State([])
        run = gr.State(lambda: {"end": "done"})  # this session's reply: "end" is None while it runs
        chatbot = gr.Chatbot(label="Chat", height=480, feedback_options=None, buttons=["copy"])
        textbox = gr.Textbox(placeholder=f"Type a message (up to {MAX_MESSAGE_CHARS} characters) and press Enter",
                             show_label=False, autofocus=True, max_length=MAX_MESSAGE_CHARS)
        status = gr.Markdown("", elem_id="status")
        with gr.Row():
            send = gr.Button("Send", variant="primary")
            stop_button = gr.Button("Stop")
            clear_button = gr.Button("Clear")
        with gr.Accordion("Sampling", open=False):
            temperature_slider = gr.Slider(*TEMPERATURE_RANGE, value=temperature, step=0.05, label="Temperature",
                                           info="0 is greedy")
            top_k_slider = gr.Slider(*TOP_K_RANGE, value=top_k, step=1, label="Top-k", info="0 disables top-k")
            max_tokens_slider = gr.Slider(*MAX_TOKENS_RANGE, value=max_tokens, step=1, label="Max tokens",
                                          info=f"a reply also ends at the model's context ({engine.context_len} tokens "
                                               "with the conversation)")
        outputs = [textbox, messages, chatbot, status]
        # with a Scheduler every user's request goes straight to its queue (which bounds them); an Engine is one
        # reply at a time
        gr.on([textbox.submit, send.click], submit,
              [textbox, messages, temperature_slider, top_k_slider, max_tokens_slider, run], outputs,
              concurrency_limit=None if scheduled else 1, concurrency_id="engine", show_progress="hidden")
        stop_button.click(stop, [run], None, show_progress="hidden")
        clear_button.click(clear, [run], outputs, show_progress="hidden")
        chatbot.clear(clear, [run], outputs, show_progress="hidden")  # the Chatbot's trash icon too
    app.queue(api_open=False)  # every event goes through the queue (/run would skip it and its limits)
    guard_queue(app._queue)
    return app


def guard_queue(queue) -> None:
    """Close two holes in Gradio's queue (6.31) through which one request stops its event loop, after which the page
    answers 503 to every user: a join with an empty session_hash files its event's messages under a session that
    does not exist, and so does an event whose session was evicted from the queue's 2000-session message cache
    while it waited. Such joins are refused (400); a message for a session no longer held is dropped."""
    # read here, so that a Gradio release that renames them fails at start-up rather than in its queue loop
    push, send_message, held = queue.push, queue.send_message, queue.pending_messages_per_session

    async def push_with_session(body, request, username):
        if body.session_hash == "":
            return False, "The request has an empty session_hash.", "error"
        return await push(body, request, username)

    def send_if_held(event, message):
        if event.session_hash in held:
            send_message(event, message)

    queue.push, queue.send_message = push_with_session, send_if_held
