"""The chat page in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright) on the server of
test_serve.start_server, over a model paced to one token per DELAY. Stop at the first token keeps the half reply,
marked, and the next Send keeps it in the history; a reply streams in (after "Thinking…") and equals the Engine's
greedy reply; Stop after a finished reply changes nothing; Clear forgets the conversation; (slow) two pages
chatting at once stream together. Without a chromium on PATH the set-up installs Debian's (as root, with apt-get,
bounded in time); where that is impossible the tests are skipped with the reason."""

import os
import shutil
import subprocess
import time

import jax.numpy as jnp
import numpy as np
import pytest

from nanochat_jax import web
from nanochat_jax.engine import Engine
from test_engine import byte_tokenizer, random_model
from test_serve import start_server

MAX_TOKENS = 10  # with prompts under 22 tokens every program the tests compile is for 16 or 32 positions
DELAY = 0.1  # seconds per decode chunk of one token: a reply takes about 1 s, slow enough to watch and to stop
CUT = f"\n\n(cut at {MAX_TOKENS} tokens: the Max tokens setting)"  # the notice as the browser shows it
APT_TIMEOUT = 600


def install_chromium() -> str | None:
    """Debian's chromium through apt-get (root only, non-interactive, bounded in time); None, or why not."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "no chromium on PATH, and installing one needs apt-get as root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=120", "chromium"]
    for commands in ([install], [["apt-get", "update", "-q"], install]):  # the package lists may be missing
        try:
            done = [subprocess.run(c, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                   timeout=APT_TIMEOUT) for c in commands]
        except subprocess.TimeoutExpired as e:
            return f"'{' '.join(e.cmd)}' took over {APT_TIMEOUT} s"
        if done[-1].returncode == 0:
            return None
    return f"'apt-get install chromium' failed: {(done[-1].stderr.strip().splitlines() or ['?'])[-1]}"


@pytest.fixture(scope="session")
def chromium() -> str:
    """The path of a Chromium, installed here if need be; skips the tests when there is none."""
    if shutil.which("chromium") is None:
        reason = install_chromium()
        if reason:
            pytest.skip(f"no browser: {reason}")
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:  # never `playwright install`: Debian's chromium is used as it is
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])  # root in a container
        yield browser
        browser.close()


class Paced(Engine):
    """An Engine whose every decode chunk takes DELAY seconds longer: the page's stream can be watched."""

    def _decode(self, *args):
        time.sleep(DELAY)
        return super()._decode(*args)


def letters_model():
    """random_model whose greedy tokens are lower-case letters only (the other lm_head columns are zero): the page
    shows a reply exactly as it was generated."""
    model = random_model()
    letters = np.zeros(model.lm_head.kernel.shape[1], bool)
    letters[ord("a"):ord("z") + 1] = True
    model.lm_head.kernel[...] = jnp.where(letters, model.lm_head.kernel[...], 0.0)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def server(tokenizer):
    """(url, scheduler, greedy): the page at temperature 0 over a Scheduler of 4 slots, and greedy(messages) -> the
    Engine's reply to a conversation."""
    model = letters_model()
    url, scheduler, close = start_server(Paced(model, tokenizer, chunk=1), tokenizer, max_tokens=MAX_TOKENS)
    engine = Engine(model, tokenizer, chunk=MAX_TOKENS)  # one decode chunk per reply: few programs to compile

    def greedy(messages):
        prompt = web.completion_prompt(tokenizer, messages)
        results, _ = engine.generate_batch(prompt, max_tokens=MAX_TOKENS, temperature=0.0)
        return tokenizer.decode(results[0][len(prompt):])

    yield url, scheduler, greedy
    close()


RECORD = """stopAtFirstToken => {
  const last = () => { const bots = document.querySelectorAll('[data-testid=bot]');
                       return bots.length ? bots[bots.length - 1].innerText : null; };
  const status = () => document.querySelector('#status [data-testid=markdown]').innerText.trim();
  const record = [];
  window.record = record;
  if (window.recorder) window.recorder.disconnect();
  window.recorder = new MutationObserver(() => {
    const [bot, line] = [last(), status()], previous = record[record.length - 1];
    if (previous && previous[1] === bot && previous[2] === line) return;
    record.push([Date.now(), bot, line]);
    if (stopAtFirstToken && bot) {
      stopAtFirstToken = false;
      [...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Stop').click();
    }
  });
  window.recorder.observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


class Chat:
    """One browser page (its own context: its own Gradio session) on the chat."""

    def __init__(self, browser, url):
        self.context = browser.new_context(viewport={"width": 1000, "height": 1000})
        self.page = self.context.new_page()
        self.page.goto(url)
        self.box = self.page.locator("textarea")
        self.box.wait_for()

    def send(self, text, stop_at_first_token=False):
        """Type text and press Enter, recording from then on (ms timestamp, last reply's text, status line) at every
        change of the page; with stop_at_first_token the page clicks Stop as soon as the reply shows a token."""
        self.box.fill(text)
        self.page.evaluate(RECORD, stop_at_first_token)
        self.sent = time.time() * 1000
        self.box.press("Enter")

    def wait_for_reply(self, ending, timeout=120):
        self.page.wait_for_function("""ending => { const bots = document.querySelectorAll('[data-testid=bot]');
            return bots.length && bots[bots.length - 1].innerText.endsWith(ending); }""", arg=ending,
                                    timeout=timeout * 1000)
        return self.page.evaluate("window.record")

    def messages(self) -> list[tuple[str, str]]:
        return [tuple(m) for m in self.page.evaluate("""() => [...document.querySelectorAll(
            '[data-testid=user], [data-testid=bot]')].map(e => [e.dataset.testid, e.innerText])""")]

    def status(self) -> str:
        return self.page.locator("#status [data-testid=markdown]").inner_text().strip()  # (not its hidden timer)

    def click(self, name):
        self.page.locator(f"button:text-is('{name}')").click()  # (not the Chatbot's trash icon, also "Clear")

    def close(self):
        self.context.close()


def first_token_ms(record, before=None) -> float:
    """When the last reply first showed text (other than `before`, the reply before it)."""
    return next(t for t, bot, _ in record if bot and bot != before)


def test_a_conversation_with_stop_at_the_first_token_then_a_streamed_reply_then_clear(browser, server):
    url, scheduler, greedy = server
    chat = Chat(browser, url)
    try:
        assert "8000 characters" in chat.box.get_attribute("placeholder")  # the limit shows before it bites
        assert chat.box.get_attribute("maxlength") == "8000"

        chat.send("hi", stop_at_first_token=True)
        chat.wait_for_reply("\n\n(stopped)")
        time.sleep(5 * DELAY)  # five more tokens' time: the reply stays as it was
        (user, (role, stopped)) = chat.messages()
        half = stopped.removesuffix("\n\n(stopped)")
        alone = greedy([{"role": "user", "content": "hi"}])
        assert len(alone) == MAX_TOKENS and alone.isalpha()
        assert user == ("user", "hi") and role == "bot" and 0 < len(half) < len(alone) and alone.startswith(half)
        assert chat.box.input_value() == "" and chat.status() == ""  # the message does not go back in the box
        assert chat.page.get_by_text("Error", exact=True).count() == 0  # (Gradio's badge on a cancelled event)
        assert scheduler.busy_slots() == 0  # its slot is free

        question = "#### 21"  # GSM8K's answer line: text, not a heading
        chat.send(question)
        record = chat.wait_for_reply(CUT)
        expected = greedy([{"role": "user", "content": "hi"}, {"role": "assistant", "content": half},
                           {"role": "user", "content": question}])
        assert chat.messages() == [("user", "hi"), ("bot", stopped), ("user", question),
                                   ("bot", expected + CUT)]  # the half reply stays, marked; the new one is cut
        assert chat.page.locator("[role=log] :is(h1, h2, h3, h4, h5, h6)").count() == 0
        first = first_token_ms(record, before=stopped)
        assert any(line == "⏳ Thinking…" and bot == stopped for t, bot, line in record if t < first)
        assert {line for _, _, line in record} <= {"", "⏳ Thinking…"}  # no progress timers in the status line
        partial = [bot for _, bot, _ in record if bot and bot not in (stopped, expected + CUT)]
        assert len(set(partial)) >= 2 and all(expected.startswith(p) for p in partial)  # it grew in steps
        assert [len(p) for p in partial] == sorted(len(p) for p in partial)
        assert chat.status() == "" and chat.box.input_value() == ""
        print(f"\nfirst token {first - chat.sent:.0f} ms after Enter, reply done {record[-1][0] - chat.sent:.0f} ms")

        done = chat.messages()
        chat.click("Stop")  # after the reply: nothing changes, no "(stopped)"
        time.sleep(5 * DELAY)
        assert chat.messages() == done and chat.status() == ""
        chat.click("Clear")
        chat.page.wait_for_function("() => !document.querySelector('[data-testid=user]')")
        assert chat.messages() == [] and chat.box.input_value() == ""
        chat.send("hi")  # a new conversation: the reply to "hi" alone
        chat.wait_for_reply(CUT)
        assert chat.messages() == [("user", "hi"), ("bot", alone + CUT)]
    finally:
        chat.close()


@pytest.mark.slow
def test_two_pages_chatting_at_once_stream_together(browser, server):
    url, _, greedy = server
    chats = [Chat(browser, url), Chat(browser, url)]
    texts = ["hi", "hello"]
    try:
        for chat, text in zip(chats, texts):
            chat.box.fill(text)
        for chat, text in zip(chats, texts):
            chat.send(text)
        records = [chat.wait_for_reply(CUT) for chat in chats]
        for chat, text in zip(chats, texts):
            assert chat.messages()[-1] == ("bot", greedy([{"role": "user", "content": text}]) + CUT)
        first = [first_token_ms(r) for r in records]
        done = [r[-1][0] for r in records]
        assert first[0] < done[1] and first[1] < done[0]  # both show text before either finishes: interleaved
        sent = chats[0].sent
        print(f"\nfirst tokens at {first[0] - sent:.0f} and {first[1] - sent:.0f} ms, replies done at "
              f"{done[0] - sent:.0f} and {done[1] - sent:.0f} ms (after the first Enter)")
    finally:
        for chat in chats:
            chat.close()
