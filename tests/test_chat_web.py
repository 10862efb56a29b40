"""The web chat: streamed replies equal the Engine's greedy generation, multi-turn and tool-call rendering,
request validation, the Gradio app served over HTTP, and scripts/chat_web.py's start-up."""

import json
import os
import socket
import urllib.request

import pytest
from conftest import load_script

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from nanochat_jax import web  # noqa: E402
from nanochat_jax.common import UserError  # noqa: E402
from nanochat_jax.engine import Engine  # noqa: E402
from test_engine import byte_tokenizer, load_chat_cli, random_model, save_tiny_checkpoint, scripted_engine  # noqa: E402

GREEDY = dict(temperature=0.0, top_k=50, max_tokens=12)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return random_model()


class Recorder:
    """An engine wrapper that records every prompt it is asked to continue."""

    def __init__(self, engine):
        self.engine, self.prompts, self.context_len = engine, [], engine.context_len

    def generate(self, prompt, **kwargs):
        self.prompts.append(list(prompt))
        return self.engine.generate(prompt, **kwargs)


def chat_tokens(tokenizer, turns: list[str]) -> list[int]:
    """Independent rendering of alternating user/assistant plain-text turns, ending in <|assistant_start|>."""
    sp = tokenizer.encode_special
    ids = [tokenizer.bos_token_id]
    for i, text in enumerate(turns):
        role = "user" if i % 2 == 0 else "assistant"
        ids += [sp(f"<|{role}_start|>"), *tokenizer.encode(text), sp(f"<|{role}_end|>")]
    return ids + [sp("<|assistant_start|>")]


def greedy_reply(engine, tokenizer, prompt, max_tokens) -> str:
    results, _ = engine.generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)
    return tokenizer.decode(results[0][len(prompt):])


def test_streamed_reply_equals_greedy_generation(model, tokenizer):
    engine = Recorder(Engine(model, tokenizer))
    steps = list(web.respond(engine, tokenizer, [], "  hi there ", **GREEDY))
    expected = greedy_reply(engine.engine, tokenizer, chat_tokens(tokenizer, ["hi there"]), GREEDY["max_tokens"])
    assert engine.prompts == [chat_tokens(tokenizer, ["hi there"])]
    messages, display, partial = steps[-1]
    texts = [display[-1]["content"] for _, display, _ in steps[:-1]] + [messages[-1]["content"]]
    assert len(expected) > 0 and texts[-1] == expected
    chunks = [b[len(a):] for a, b in zip([""] + texts, texts)]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # each update only appends
    assert "".join(chunks) == expected and len(steps) >= 2
    cut = "\n\n*(cut at 12 tokens: the Max tokens setting)*"  # the random model never ends a reply: it says so
    assert messages == partial == [{"role": "user", "content": "hi there"},
                                   {"role": "assistant", "content": expected, "notice": cut}]
    assert display == [messages[0], {"role": "assistant", "content": expected + cut}]
    assert web.chat_display(messages + messages)[3] == display[1]  # the notice stays in the history
    assert all(m == [] for m, _, _ in steps[:-1])  # the turn is stored only with the complete reply
    assert [p[1]["content"] for _, _, p in steps[:-1]] == texts[:-1]  # ... and kept as partial for Stop


class FailsMidReply:
    """An engine that streams two tokens, then fails (as a device running out of memory would)."""
    context_len = 1 << 20

    def generate(self, prompt, **kwargs):
        yield [ord("o")], [1]
        yield [ord("k")], [1]
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")


def test_a_reply_that_fails_half_way_leaves_a_conversation_that_continues(model, tokenizer):
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    state = history
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        for state, display, _ in web.respond(FailsMidReply(), tokenizer, history, "more", **GREEDY):
            assert display[-1]["role"] == "assistant"  # the partial reply is shown ...
    assert state == history  # ... but the state the app keeps is the conversation before the failed turn
    messages = list(web.respond(Engine(model, tokenizer), tokenizer, state, "again", **GREEDY))[-1][0]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]


def test_long_model_replies_do_not_block_and_the_context_length_is_enforced(model, tokenizer):
    engine = Recorder(Engine(model, tokenizer))
    long_reply = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "z" * 9000}]
    with pytest.raises(web.ChatError, match=r"is \d+ tokens long; this model reads at most 127 before its reply"):
        next(web.respond(engine, tokenizer, long_reply, "and now?", **GREEDY))  # only the context refuses it
    assert engine.context_len == 128 and engine.prompts == []
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    assert list(web.respond(engine, tokenizer, short, "and now?", **GREEDY))[-1][0][-1]["role"] == "assistant"


def test_multi_turn_renders_the_history(model, tokenizer):
    engine = Recorder(Engine(model, tokenizer))
    messages = list(web.respond(engine, tokenizer, [], "hello", **GREEDY))[-1][0]
    first = messages[1]["content"]
    messages = list(web.respond(engine, tokenizer, messages, "and again?", **GREEDY))[-1][0]
    assert engine.prompts[1] == chat_tokens(tokenizer, ["hello", first, "and again?"])
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[3]["content"] == greedy_reply(engine.engine, tokenizer, engine.prompts[1], GREEDY["max_tokens"])


def test_tool_call_is_shown_as_code_and_kept_as_parts(tokenizer):
    engine = Recorder(scripted_engine(tokenizer, chunk=4))
    steps = list(web.respond(engine, tokenizer, [], "what is 1/7", temperature=0.0, top_k=0, max_tokens=40))
    messages, display, _ = steps[-1]
    assert messages[1]["content"] == [{"type": "text", "text": "?"}, {"type": "python", "text": "1/7"},
                                      {"type": "python_output", "text": "0.142857142857"},
                                      {"type": "text", "text": "!"}]
    assert display[1]["content"] == "?\n```python\n1/7\n```\n→ `0.142857142857`\n\n!"
    texts = [d[-1]["content"] for _, d, _ in steps]
    assert "?\n```python\n1/\n```\n" in texts  # the call shows while it is being written
    # the next turn renders the tool call exactly as the model produced it
    list(web.respond(engine, tokenizer, messages, "thanks", temperature=0.0, top_k=0, max_tokens=4))
    sp = tokenizer.encode_special
    reply = [ord("?"), sp("<|python_start|>"), *b"1/7", sp("<|python_end|>"), sp("<|output_start|>"),
             *b"0.142857142857", sp("<|output_end|>"), ord("!"), sp("<|assistant_end|>")]
    assert engine.prompts[1] == (chat_tokens(tokenizer, ["what is 1/7"]) + reply
                                 + chat_tokens(tokenizer, ["thanks"])[1:])


def test_base_model_continues_the_last_message_only(model, tokenizer):
    engine = Recorder(Engine(model, tokenizer))
    history = [{"role": "user", "content": "x" * 7000}] * 6  # over the conversation limit, but unused
    messages = list(web.respond(engine, tokenizer, history, "once upon", base=True, **GREEDY))[-1][0]
    prompt = tokenizer.encode("once upon", prepend=tokenizer.bos_token_id)
    assert engine.prompts == [prompt]
    assert messages[-1]["content"] == greedy_reply(engine.engine, tokenizer, prompt, GREEDY["max_tokens"])


class NoEngine:
    context_len = 1 << 20

    def generate(self, *args, **kwargs):
        raise AssertionError("a refused request must not reach the engine")


@pytest.mark.parametrize("history, text, settings, message", [
    ([], "", {}, "Please type a message"),
    ([], " \n ", {}, "Please type a message"),
    ([], "x" * 8001, {}, "Your message is 8001 characters long; the limit is 8000"),
    ([{"role": "user", "content": "y" * 8001}, {"role": "assistant", "content": "ok"}], "hi", {},
     "Message 1 is 8001 characters long"),
    ([{"role": "user", "content": "y" * 7000}] * 5, "hi", {}, "The conversation is 35002 characters long"),
    ([{"role": "user", "content": "y"}] * 500, "hi", {}, "501 messages; the limit is 500"),
    ([], "hi", {"temperature": 2.5}, "Temperature must be between 0.0 and 2.0, got 2.5"),
    ([], "hi", {"temperature": float("nan")}, "Temperature must be a number"),
    ([], "hi", {"temperature": None}, "Temperature must be a number"),
    ([], "hi", {"top_k": 201}, "Top-k must be between 0 and 200"),
    ([], "hi", {"top_k": 1.5}, "Top-k must be a whole number"),
    ([], "hi", {"max_tokens": 0}, "Max tokens must be between 1 and 4096"),
    ([], "hi", {"max_tokens": 5000}, "Max tokens must be between 1 and 4096"),
])
def test_validation_errors(tokenizer, history, text, settings, message):
    with pytest.raises(web.ChatError, match=message):
        next(web.respond(NoEngine(), tokenizer, history, text, **{**GREEDY, **settings}))


def test_limits_match_nanochat():
    assert (web.MAX_MESSAGES, web.MAX_MESSAGE_CHARS, web.MAX_CONVERSATION_CHARS) == (500, 8000, 32000)
    assert (web.TEMPERATURE_RANGE, web.TOP_K_RANGE, web.MAX_TOKENS_RANGE) == ((0.0, 2.0), (0, 200), (1, 4096))
    assert web.check_request([{"role": "user", "content": "a"}], 0, 200.0, 4096) == (0.0, 200, 4096)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_app_serves_its_page_and_chats_over_http(model, tokenizer):
    from gradio_client import Client

    from nanochat_jax.scheduler import Scheduler

    engine = Engine(model, tokenizer)
    scheduler = Scheduler(engine, slots=2)  # the page goes through the scheduler, as in chat_web
    app = web.build_app(scheduler, tokenizer, title="nanochat-jax test", temperature=0.0, max_tokens=8)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200 and "text/html" in response.headers["Content-Type"]
        with urllib.request.urlopen(url + "config", timeout=30) as response:
            config = json.loads(response.read())
        assert config["title"] == "nanochat-jax test"
        assert {"chatbot", "slider", "textbox", "button"} <= {c["type"] for c in config["components"]}

        client = Client(url, verbose=False, download_files=False)
        text, display, status = client.predict("hi", 0.0, 50, 8, api_name="/submit")  # state stays server-side
        expected = greedy_reply(engine, tokenizer, chat_tokens(tokenizer, ["hi"]), 8)
        expected += "\n\n*(cut at 8 tokens: the Max tokens setting)*"
        assert status == "" and [(m["role"], m["content"]) for m in display] == \
            [("user", [{"type": "text", "text": "hi"}]), ("assistant", [{"type": "text", "text": expected}])]
        *_, status = client.predict(" ", 0.0, 50, 8, api_name="/submit")
        assert status == "⚠️ Please type a message first."
        _, display, _ = client.predict("more", 0.0, 50, 8, api_name="/submit")  # the session's history goes on
        assert [m["role"] for m in display] == ["user", "assistant", "user", "assistant"]
        client.predict(api_name="/clear")
        _, display, _ = client.predict("hi", 0.0, 50, 8, api_name="/submit")
        assert display[-1]["content"] == [{"type": "text", "text": expected}] and len(display) == 2
    finally:
        app.close()
        scheduler.close()


def load_chat_web():
    return load_script("chat_web")


def test_script_loads_once_and_launches_on_localhost(home, model, tokenizer, capsys, monkeypatch):
    import gradio as gr

    chat_web = load_chat_web()
    with pytest.raises(UserError, match="^cannot load the rl checkpoint: ") as missing:
        chat_web.main(["--source", "rl"])
    assert "\n" not in str(missing.value)  # run_script prints it as one line
    assert chat_web.main(["-t", "3"]) == 2 and "Temperature must be between" in capsys.readouterr().err

    launched = []
    monkeypatch.setattr(chat_web, "launch", lambda app, router, args: launched.append((app, router, args)))
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda self: None)
    save_tiny_checkpoint(home, model, tokenizer, stage="sft", step=3)
    assert chat_web.main(["-i", "sft", "-k", "7"]) == 0
    app, router, args = launched[0]
    assert (args.host, args.port, args.share, args.api_key) == ("127.0.0.1", 8000, False, None)
    assert {route.path for route in router.routes} == {"/v1/chat/completions", "/v1/models", "/v1/models/{name:path}",
                                                      "/health"}
    assert app.title == "nanochat-jax · sft d2 step 3" and "http://127.0.0.1:8000" in capsys.readouterr().out
    assert {(fn.concurrency_id, fn.concurrency_limit) for fn in app.fns.values() if fn.name == "submit"} == \
        {("engine", None)}  # every request goes to the scheduler's queue, which bounds them
    sliders = {b.label: b.value for b in app.blocks.values() if isinstance(b, gr.Slider)}
    assert sliders == {"Temperature": 0.8, "Top-k": 7, "Max tokens": 512}


def test_cli_prompt_mode_answers_the_text_as_given(home, model, tokenizer, capsys):
    """-p 'clear' or 'quit' is a question like any other in prompt mode (it used to loop on 'clear' forever);
    an empty prompt is refused."""
    chat_cli = load_chat_cli()
    save_tiny_checkpoint(home, model, tokenizer, stage="sft", step=3)
    for text in ("clear", "quit"):
        assert chat_cli.main(["-p", text, "-t", "0", "--max-tokens", "4"]) == 0
        out = capsys.readouterr().out
        assert out.count("Assistant: ") == 1 and "Conversation cleared" not in out
    assert chat_cli.main(["-p", "   "]) == 2 and "the prompt is empty" in capsys.readouterr().err


class Scripted:
    """An engine that streams fixed tokens (one row) and records the max_tokens it was given."""

    def __init__(self, tokens, context_len=128):
        self.tokens, self.context_len, self.max_tokens = tokens, context_len, []

    def generate(self, prompt, max_tokens, **kwargs):
        self.max_tokens.append(max_tokens)
        for token in self.tokens[:max_tokens]:
            yield [token], [1]


def test_empty_tool_parts_and_split_characters_in_a_tool_call(tokenizer):
    """An empty calculator call or result is kept as a part (the next turn renders exactly the produced tokens),
    and half a UTF-8 character inside a tool call is not shown as U+FFFD while the rest is coming."""
    sp = tokenizer.encode_special
    py, py_end, out, out_end = (sp(f"<|{t}|>") for t in ("python_start", "python_end", "output_start", "output_end"))
    assert web.reply_parts(tokenizer, [py, py_end, out, out_end, *b"ok"]) == [
        {"type": "python", "text": ""}, {"type": "python_output", "text": ""}, {"type": "text", "text": "ok"}]
    e_acute = list("é".encode())
    engine = Scripted([py, *b"'", *e_acute, *b"'", py_end, sp("<|assistant_end|>")])
    steps = list(web.respond(engine, tokenizer, [], "hi", temperature=0.0, top_k=0, max_tokens=50))
    shown = [display[-1]["content"] for _, display, _ in steps]
    assert not [s for s in shown if "\ufffd" in s], shown
    assert steps[-1][0][-1]["content"] == [{"type": "python", "text": "'é'"}]


def test_the_reply_stops_at_the_trained_context(tokenizer):
    engine = Scripted([ord("z")] * 200, context_len=40)
    prompt = web.completion_prompt(tokenizer, [{"role": "user", "content": "hello"}], context_len=40)
    messages, display, _ = list(web.respond(engine, tokenizer, [], "hello", temperature=0.0, top_k=0,
                                            max_tokens=500))[-1]
    assert engine.max_tokens == [40 - len(prompt)] and messages[-1]["content"] == "z" * (40 - len(prompt))
    assert display[-1]["content"].endswith("*(cut: the conversation reached the model's context of 40 tokens; "
                                           "press Clear to start anew)*")


def test_enter_and_send_are_one_event_that_stop_and_clear_end_through_the_session(tokenizer):
    """Enter and Send are one event; Stop, Clear and the Chatbot's trash icon cancel no event (Gradio's cancellation
    raced with the reply's last updates and showed "Error"): they read the session's run state, as Send does."""
    import gradio as gr

    app = web.build_app(Scripted([]), tokenizer)
    deps = app.get_config_file()["dependencies"]
    submit = next(d for d in deps if d["api_name"] == "submit")
    assert len(submit["targets"]) == 2  # one event: pressing Enter then Send cannot queue the message twice
    names = {b._id: b.value if isinstance(b, gr.Button) else type(b).__name__ for b in app.blocks.values()}
    run = submit["inputs"][-1]
    assert names[run] == "State" and not any(d.get("cancels") for d in deps)
    assert {names[t[0]] for d in deps if d["inputs"] == [run] for t in d["targets"]} == {"Stop", "Clear", "Chatbot"}


def test_thinking_then_the_reply_and_what_stop_and_clear_keep(tokenizer):
    """A reply that so far holds no part (a lone <|python_end|>) streams as empty text. Send empties the box and
    says "Thinking…" before the first token. Stop ends the reply at its next token, keeping what was shown marked
    "(stopped)" (even before the first token) and leaving the box alone; Clear ends it with an empty conversation;
    after a finished reply Stop changes nothing."""
    import gradio as gr

    sp = tokenizer.encode_special
    steps = list(web.respond(Scripted([sp("<|python_end|>"), sp("<|assistant_end|>")]), tokenizer, [], "hi",
                             temperature=0.0, top_k=0, max_tokens=5))
    assert steps[-1][0][-1] == {"role": "assistant", "content": ""}
    app = web.build_app(Scripted([*b"ok", sp("<|assistant_end|>")]), tokenizer)
    fns = {fn.name: fn.fn for fn in app.fns.values()}
    run = {"end": "done"}
    skip = type(gr.skip())
    outputs = list(fns["submit"]("hi", [], 0.0, 0, 10, run))
    box, status = [o[0] for o in outputs], [o[3] for o in outputs]
    assert box[0] == "" and all(isinstance(b, skip) for b in box[1:])  # emptied once, then left alone
    user = {"role": "user", "content": "hi"}
    assert status[0] == "⏳ Thinking…" and outputs[0][1:3] == ([], [user])
    assert status[1:] == [""] * (len(outputs) - 1)
    assert [o[2][-1]["content"] for o in outputs[1:3]] == ["o", "ok"]
    assert outputs[-1][1:4] == outputs[-2][1:4]  # the last update repeats the finished turn (API callers read it)
    assert outputs[-1][1] == [user, {"role": "assistant", "content": "ok"}] and run == {"end": "done"}
    fns["stop"](run)
    assert run == {"end": "done"}  # after a finished reply: nothing

    def ended_by(press, shown_tokens):
        replies = fns["submit"]("hi", [], 0.0, 0, 10, run)
        for _ in range(1 + shown_tokens):  # "Thinking…", then the tokens shown
            next(replies)
        press(run)
        return list(replies)

    stopped = "\n\n*(stopped)*"
    (last,) = ended_by(fns["stop"], 0)  # before the first token: the turn stays, marked
    assert isinstance(last[0], skip) and last[1:] == ([user, {"role": "assistant", "content": "", "notice": stopped}],
                                                      [user, {"role": "assistant", "content": stopped}], "")
    (last,) = ended_by(fns["stop"], 1)
    assert last[1:] == ([user, {"role": "assistant", "content": "o", "notice": stopped}],
                        [user, {"role": "assistant", "content": "o" + stopped}], "")
    assert fns["clear"]({"end": "done"}) == ("", [], [], "")
    (last,) = ended_by(fns["clear"], 1)
    assert last[1:] == ([], [], "") and run == {"end": "done"}


class FullScheduler(Scripted):
    """A scheduler whose slots are all busy, with three requests waiting."""
    slots, waiting = 2, [None] * 3

    def submit(self, *args, **kwargs):
        raise AssertionError("the page streams through generate")

    def busy_slots(self):
        return 2


def test_a_request_behind_full_slots_says_it_waits(tokenizer):
    app = web.build_app(FullScheduler([*b"ok"]), tokenizer)
    submit = next(fn.fn for fn in app.fns.values() if fn.name == "submit")
    assert next(submit("hi", [], 0.0, 0, 10, {"end": "done"}))[3] == "⏳ Waiting for a free slot (3 ahead in the queue)…"


def test_markdown_headings_and_special_tokens_are_shown_as_text(tokenizer):
    """"#### 21" (GSM8K's answer line) is escaped, not a heading; a special token the model writes mid-reply is
    not shown (nor kept), while the calculator's still make parts."""
    assert web.to_markdown("so:\n#### 21\n  # x") == "so:\n\\#### 21\n  \\# x"
    assert web.to_markdown([{"type": "python", "text": "# c"}, {"type": "text", "text": "# t"}]) == \
        "\n```python\n# c\n```\n\\# t"
    sp = tokenizer.encode_special
    engine = Scripted([*b"a", sp("<|user_start|>"), *b"b", sp("<|bos|>")])
    messages, display, _ = list(web.respond(engine, tokenizer, [], "hi", temperature=0.0, top_k=0, max_tokens=9))[-1]
    assert messages[-1]["content"] == "ab" and display[-1]["content"] == "ab"


def test_a_taken_port_or_a_bad_one_is_one_line(capsys):
    """A port already in use (a second chat_web) or an address that is not this machine's was Gradio's OSError
    traceback, telling to set GRADIO_SERVER_PORT; a port past 65535 an OverflowError from bind()."""
    import argparse

    import gradio as gr
    from fastapi import APIRouter

    chat_web = load_chat_web()
    with pytest.raises(SystemExit):
        chat_web.parse_args(["-p", "70000"])
    assert "--port must be from 1 to 65535, got 70000" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = argparse.Namespace(host="127.0.0.1", port=port, share=False, share_server=None)
        with gr.Blocks() as app:
            gr.Markdown("x")
        with pytest.raises(UserError, match=f"^cannot listen on 127.0.0.1:{port}: the port is in use or the address "
                                            r"is not this machine's \(see --port and --host\)$"):
            chat_web.launch(app, APIRouter(), args)


@pytest.mark.parametrize("script", ["chat_web", "chat_cli"])
def test_a_seed_past_64_bits_is_refused_at_start(script, capsys):
    """--seed 10**20 started the page, then every message failed (the Scheduler refuses it); chat_cli answered -p
    with jax's OverflowError traceback."""
    module = load_chat_web() if script == "chat_web" else load_chat_cli()
    for seed in (10**20, -(2**62) - 1):
        with pytest.raises(SystemExit):
            module.parse_args(["--seed", str(seed)])
        assert f"--seed must be from -2**62 to 2**62, got {seed}" in capsys.readouterr().err
    assert module.parse_args(["--seed", str(2**62)]).seed == 2**62


def test_backticks_and_lines_in_a_calculator_call_or_result_stay_inside_its_code():
    """A result with a backtick ('a`b'.upper() is A`B) ended its `span` early ("→ `A`B`" shows code A, then B`);
    one of several lines became a heading ("→ `x\n# big`"); the fence or backticks now outnumber any run inside."""
    assert web.to_markdown([{"type": "python", "text": "1/7"}, {"type": "python_output", "text": "0.142857142857"}]) \
        == "\n```python\n1/7\n```\n→ `0.142857142857`\n\n"  # the usual case unchanged
    assert web.to_markdown([{"type": "python_output", "text": "A`B"}]) == "→ ``A`B``\n\n"
    assert web.to_markdown([{"type": "python_output", "text": "```"}]) == "→ ```` ``` ````\n\n"
    assert web.to_markdown([{"type": "python_output", "text": "x\n# big"}]) == "→\n```\nx\n# big\n```\n\n"
    assert web.to_markdown([{"type": "python", "text": "'```'\n```"}, {"type": "text", "text": "ok"}]) == \
        "\n````python\n'```'\n```\n````\nok"


def test_html_tags_are_text_and_code_is_shown_as_written():
    """"is a<b and c>d here" showed as "is ad here" (<b ...> an HTML tag: "d here" in bold), and a "# comment" line in
    a code block the model wrote showed as "\\# comment" (Markdown shows an escape in code as written)."""
    assert web.plain("is a<b and c>d here, x < y") == "is a\\<b and c>d here, x < y"
    assert web.plain("<br> or <!-- x --> </div>") == "\\<br> or \\<!-- x --> \\</div>"
    block = "```python\n# comment\nif a<b and c>d: pass\n```"
    assert web.plain(f"code:\n{block}\n# 42 <b>") == f"code:\n{block}\n\\# 42 \\<b>"
    assert web.plain("see `a<b and c>d` and ``x`<b>`` <i>") == "see `a<b and c>d` and ``x`<b>`` \\<i>"
    assert web.plain("~~~\n# open to the end <b>") == "~~~\n# open to the end <b>"
    assert web.plain("    if a<b:\n        # c") == "    if a<b:\n        # c"  # indented code


def test_autolinks_stay_links_and_indented_text_that_is_not_code_is_escaped():
    """'<https://example.com>' (a link before the escaping of '<') showed as text with its brackets; and an indented
    line that Markdown reads as text (a nested list item, a paragraph's next line) kept its tags hidden."""
    assert web.plain("see <https://example.com/a?b=1> or <me@example.org>, not <b>") == \
        "see <https://example.com/a?b=1> or <me@example.org>, not \\<b>"
    assert web.plain("1. Step\n    - use the <div> element") == "1. Step\n    - use the \\<div> element"
    assert web.plain("a line\n    then a<b>c") == "a line\n    then a\\<b>c"
    assert web.plain("- a\n\nText\n\n    x<b>y") == "- a\n\nText\n\n    x<b>y"  # code again after the list


def test_a_message_over_the_context_on_its_own_is_told_to_be_shortened(tokenizer):
    """A first message (or, for a base model, any message: it never reads earlier turns) over the context said "Start
    a new conversation", which refuses the same message again."""
    engine = Scripted([*b"ok"], context_len=128)
    chat = {**GREEDY, "max_tokens": 2}
    earlier = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    for history, base in (([], False), (earlier, True)):
        with pytest.raises(web.ChatError, match=r"^Your message is 30[14] tokens long; this model reads at most 127 "
                                                r"before its reply\. Shorten it\.$"):
            web.respond(engine, tokenizer, history, "x" * 300, base=base, **chat)
    with pytest.raises(web.ChatError, match=r"^The conversation is \d+ tokens long; .* Start a new conversation\.$"):
        web.respond(engine, tokenizer, earlier, "x" * 120, **chat)
