"""The chat page in a real headless Chromium (Debian's, driven by Playwright; no browser download)
against live servers: the shared one (the first engine's, no keys) and a keyed one with an alias
and a tight per-key limit. Screenshots go to .pytest_cache/server-logs/screenshots.

CI installs Chromium and sets LLM_SERVICE_TEST_BROWSER=1, so a missing browser fails there;
elsewhere these tests skip without one."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import MODEL
from tests.server_process import LOG_DIR, ServerProcess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if os.environ.get("LLM_SERVICE_TEST_BROWSER") == "1":  # CI: a missing browser or driver is a failure
    if CHROMIUM is None:
        raise RuntimeError("LLM_SERVICE_TEST_BROWSER=1 but no chromium on PATH (apt-get install chromium)")
    import playwright.sync_api as sync_api
else:
    sync_api = pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH", allow_module_level=True)

SHOTS = LOG_DIR / "screenshots"
KEY, TIGHT = "sk-web-team-123456", "sk-web-tight-12345"
WIDE, NARROW = {"width": 1280, "height": 800}, {"width": 390, "height": 780}
ANSWER = ".message.assistant .body"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def site(embedding_server: ServerProcess) -> ServerProcess:
    """The shared server (no keys): its conversations are everyone's, so tests name theirs uniquely."""
    return embedding_server


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("web")
    (folder / "keys.yaml").write_text(f"keys:\n  - {{name: team, key: {KEY}}}\n"
                                      f"  - {{name: tight, key: {TIGHT}, requests_per_minute: 1}}\n")
    (folder / "models.yaml").write_text(f"models:\n  - {{name: {MODEL}, source: default}}\n"
                                        f"aliases:\n  helper: {MODEL}\n")
    proc = ServerProcess("--engine", "transformers", "--models-file", str(folder / "models.yaml"),
                         "--api-keys-file", str(folder / "keys.yaml"), name="web-keyed")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


class Page:
    """A browser tab on the page, with the errors its scripts raised (a test fails on any)."""

    def __init__(self, browser: Any, server: ServerProcess, viewport: dict[str, int] = WIDE,
                 scheme: str = "light") -> None:
        self.context = browser.new_context(viewport=viewport, color_scheme=scheme)
        self.tab = self.context.new_page()
        self.errors: list[str] = []
        self.tab.on("pageerror", lambda e: self.errors.append(str(e)))
        self.tab.set_default_timeout(60_000)
        self.server = server

    def open(self, path: str = "/") -> Page:
        self.tab.goto(self.server.url + path)
        self.tab.wait_for_selector("#model option", state="attached")
        return self

    def settings(self, **values: str) -> None:
        if self.tab.is_hidden("#settings"):
            self.tab.click("#settings-button")
        for name, value in values.items():
            self.tab.fill(f"#{name}", value)
            self.tab.dispatch_event(f"#{name}", "change")

    def send(self, text: str, wait: bool = True) -> None:
        before = self.sent()
        self.tab.fill("#input", text)
        self.tab.press("#input", "Enter")
        if wait:
            self.done(after=before)

    def sent(self) -> int:
        """How many sends have ended (the page counts them in body's data-sent)."""
        return int(self.tab.get_attribute("body", "data-sent") or 0)

    def done(self, after: int) -> None:
        """Wait until the send that follows `after` ended sends has ended (and the page has read the
        conversation back)."""
        self.tab.wait_for_function(f"() => Number(document.body.dataset.sent || 0) > {after}")

    def conversation_id(self) -> str:
        return str(self.tab.evaluate("location.hash.slice(1)"))

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.tab.screenshot(path=str(SHOTS / f"{name}.png"))

    def close(self) -> None:
        self.context.close()
        assert not self.errors, self.errors


def items(server: ServerProcess, conversation: str, key: str = "none") -> list[dict[str, Any]]:
    r = httpx.get(f"{server.base_url}/conversations/{conversation}/items", params={"order": "asc", "limit": 100},
                  headers={"Authorization": f"Bearer {key}"})
    r.raise_for_status()
    return list(r.json()["data"])


def running(server: ServerProcess) -> float:
    lines = [x for x in httpx.get(f"{server.url}/metrics").text.splitlines() if x.startswith("llm_requests_running{")]
    return sum(float(x.rsplit(" ", 1)[1]) for x in lines)


def test_served_to_browsers_with_a_strict_policy(site: ServerProcess) -> None:
    page = httpx.get(site.url + "/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert httpx.get(site.url + "/chat").text == page.text
    assert httpx.get(site.url + "/").json()["chat"] == "/chat"  # API clients and curl keep the JSON
    # every asset is this server's: nothing from a CDN
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)
    for asset in re.findall(r"""(?:src|href)="(/chat/assets/[^"]+)""", page.text):
        r = httpx.get(site.url + asset)
        assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff", asset
        assert httpx.get(site.url + asset, headers={"If-None-Match": r.headers["etag"]}).status_code == 304


def test_chat_streams_and_is_kept_on_the_server(browser: Any, site: ServerProcess) -> None:
    page = Page(browser, site).open()
    # the chat models only: the shared server's embedding model cannot chat
    assert page.tab.locator("#model option").all_inner_texts() == [MODEL]
    page.settings(max_tokens="48", temperature="0")
    # the answer's length, sampled as it streams in
    page.tab.evaluate("""() => { window.__lengths = []; new MutationObserver(() => {
        const a = document.querySelector('.message.assistant.streaming .body');
        if (a) window.__lengths.push(a.textContent.length); })
        .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }""")
    with page.tab.expect_request("**/v1/responses") as sent:
        page.send("What is the capital of France?")
    lengths = page.tab.evaluate("window.__lengths")
    assert len({n for n in lengths if n > 0}) >= 3, lengths  # token by token, not one block
    answer = page.tab.inner_text(ANSWER)
    assert answer.strip()
    stats = page.tab.inner_text(".message.assistant .stats")
    assert re.search(r"TTFT \d+ ms · [\d.]+ tok/s · \d+ in( \(\d+ cached\))? · \d+ out", stats), stats
    conversation = page.conversation_id()
    # behind several replicas nginx keeps the conversation on one (deploy/nginx.conf routes on it)
    assert sent.value.headers["x-session-id"] == conversation
    kept = items(site, conversation)
    assert [(i["role"], i["content"][0]["text"]) for i in kept] == [
        ("user", "What is the capital of France?"), ("assistant", kept[1]["content"][0]["text"])]
    page.shot("chat-wide")
    page.close()
    # another browser (a new context: no shared storage) finds it after a reload
    other = Page(browser, site).open()
    other.tab.click(f"#conversations li[data-id='{conversation}'] .open")
    other.tab.wait_for_selector(ANSWER)
    assert other.tab.inner_text(ANSWER).strip() == answer.strip()
    assert other.tab.input_value("#max_tokens") == "48"  # its settings came with it
    other.tab.reload()
    other.tab.wait_for_selector(ANSWER)  # the URL's #id opens it again
    assert other.tab.inner_text(".message.user .body") == "What is the capital of France?"
    other.close()


def test_stop_aborts_the_generation_on_the_server(browser: Any, site: ServerProcess) -> None:
    page = Page(browser, site).open()
    page.settings(max_tokens="1500", temperature="0.8")
    sent = page.sent()
    page.send("Write a very long story about a dragon, with many chapters.", wait=False)
    page.tab.wait_for_function(
        "() => document.querySelector('.message.assistant.streaming .body')?.textContent.length > 20")
    page.tab.keyboard.press("Escape")  # Esc stops, as the Stop button does
    page.done(after=sent)
    deadline = time.monotonic() + 15
    while running(site) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running(site) == 0
    assert page.tab.inner_text(".message.assistant .incomplete") == "incomplete"
    # what was said so far is kept in the conversation, marked incomplete
    kept = items(site, page.conversation_id())
    assert [(i["role"], i["status"]) for i in kept] == [("user", "completed"), ("assistant", "incomplete")]
    assert kept[1]["content"][0]["text"].strip()
    assert page.tab.get_attribute(".message.assistant", "data-id") == kept[1]["id"]  # the page shows the kept one
    page.close()


def test_regenerate_and_edit_continue_from_there(browser: Any, site: ServerProcess) -> None:
    page = Page(browser, site).open()
    page.settings(max_tokens="12", temperature="1")
    page.send("Name a colour.")
    page.send("Name a fruit.")
    conversation = page.conversation_id()
    before = items(site, conversation)
    assert len(before) == 4
    sent = page.sent()
    page.tab.click(".message.assistant .regenerate")
    page.done(after=sent)
    after = items(site, conversation)
    assert len(after) == 4 and after[:2] == before[:2] and after[3]["id"] != before[3]["id"]
    assert after[2]["content"][0]["text"] == "Name a fruit."
    # editing the first message drops everything after it, on the server too
    page.tab.click(".message.user .edit")
    page.tab.fill(".edit-input", "Name an animal.")
    sent = page.sent()
    page.tab.press(".edit-input", "Enter")
    page.done(after=sent)
    edited = items(site, conversation)
    assert [(i["role"], i["content"][0]["text"]) for i in edited][:1] == [("user", "Name an animal.")]
    assert [i["role"] for i in edited] == ["user", "assistant"]
    assert page.tab.locator(".message").count() == 2
    page.close()


def test_conversation_list_rename_search_delete(browser: Any, site: ServerProcess) -> None:
    client = openai.OpenAI(base_url=site.base_url, api_key="none")
    mine = client.conversations.create(metadata={"title": "web-list aardvark"})
    other = client.conversations.create(metadata={"title": "web-list zebra"})
    page = Page(browser, site).open()
    page.tab.fill("#search", "aardvark")
    titles = page.tab.locator("#conversations li[data-id] .open").all_inner_texts()
    assert titles == ["web-list aardvark"]
    row = f"#conversations li[data-id='{mine.id}']"
    page.tab.click(f"{row} .rename")
    page.tab.fill(".rename-input", "web-list aardvark renamed")
    page.tab.press(".rename-input", "Enter")
    page.tab.wait_for_selector(f"{row} .open:text('web-list aardvark renamed')")
    assert client.conversations.retrieve(mine.id).metadata == {"title": "web-list aardvark renamed"}
    page.tab.once("dialog", lambda d: d.accept())
    page.tab.click(f"{row} .delete")
    page.tab.wait_for_selector(row, state="detached")
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(mine.id)
    page.tab.fill("#search", "")
    assert page.tab.is_visible(f"#conversations li[data-id='{other.id}']")
    page.close()


def test_markdown_renders_and_model_html_never_runs(browser: Any, site: ServerProcess) -> None:
    """Stored answers render as a streamed one does (the same renderer): the model's words, with
    code, a table, and HTML meant to run."""
    client = openai.OpenAI(base_url=site.base_url, api_key="none")
    hostile = ("Here:\n\n```python\nprint('hi')\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
               "<script>window.__pwned = 'script'</script>\n\n<img src=x onerror=\"window.__pwned = 'img'\">\n\n"
               "[click](javascript:window.__pwned='link') <a href=\"#\" onclick=\"window.__pwned='a'\">a</a>\n\n"
               "<iframe srcdoc=\"<script>parent.__pwned='iframe'</script>\"></iframe>\n\n"
               "<p id=\"input\">an answer that names itself like the page's own message box</p>")
    c = client.conversations.create(metadata={"title": "web-markdown"}, items=[
        {"type": "message", "role": "user", "content": "Show me."},
        {"type": "message", "role": "assistant", "content": hostile}])
    page = Page(browser, site).open(f"/#{c.id}")
    body = page.tab.locator(ANSWER)
    body.locator("pre code.hljs").wait_for()
    assert body.locator("pre code.hljs").inner_text().strip() == "print('hi')"
    assert body.locator("pre code .hljs-built_in, pre code .hljs-string").count() >= 1  # highlighted
    assert body.locator("pre button.copy").count() == 1
    assert body.locator("table td").all_inner_texts() == ["1", "2"]
    page.tab.click(ANSWER + " a:text('click')", no_wait_after=True)
    page.tab.click(ANSWER + " a:text('a')", no_wait_after=True)
    page.tab.wait_for_timeout(300)
    assert page.tab.evaluate("window.__pwned") is None
    assert body.locator("script, iframe, [onerror], [onclick]").count() == 0
    assert page.tab.locator(ANSWER + " img").get_attribute("onerror") is None
    assert page.tab.evaluate("() => document.getElementById('input').tagName") == "TEXTAREA"
    page.tab.click(ANSWER + " pre button.copy")
    page.close()


def test_keyed_server_asks_for_a_key_and_switches_model(browser: Any, keyed: ServerProcess) -> None:
    page = Page(browser, keyed)
    page.tab.goto(keyed.url + "/")
    page.tab.wait_for_selector("#key-dialog[open]")
    assert "API key" in page.tab.inner_text("#key-reason")
    page.tab.fill("#key-input", KEY)
    page.tab.press("#key-input", "Enter")
    page.tab.wait_for_selector("#model option[value='helper']", state="attached")
    options = page.tab.locator("#model option").all_inner_texts()
    assert options == [MODEL, "helper (alias)"]
    page.tab.select_option("#model", "helper")
    page.settings(max_tokens="8")
    with page.tab.expect_request("**/v1/responses") as sent:
        page.send("Hello!")
    body = sent.value.post_data_json
    assert body["model"] == "helper" and body["max_output_tokens"] == 8 and body["stream"] is True
    assert sent.value.headers["authorization"] == f"Bearer {KEY}"
    assert KEY not in page.tab.url
    conversation = page.conversation_id()
    meta = httpx.get(f"{keyed.base_url}/conversations/{conversation}",
                     headers={"Authorization": f"Bearer {KEY}"}).json()["metadata"]
    assert meta["model"] == "helper"
    page.tab.reload()  # the key is kept in this browser; the conversation keeps its model
    page.tab.wait_for_selector(ANSWER)
    assert page.tab.input_value("#model") == "helper"
    assert not page.tab.is_visible("#key-dialog")
    page.shot("keyed-wide")
    page.close()


def test_errors_in_plain_words(browser: Any, keyed: ServerProcess) -> None:
    page = Page(browser, keyed)
    page.tab.add_init_script(f"localStorage.setItem('llm-service.api-key', '{TIGHT}')")
    page.open()
    page.settings(max_tokens="8")
    page.send("Hi")  # the key's one generation a minute
    page.send("Hi again", wait=False)
    page.tab.wait_for_selector("#banner:not([hidden])")
    assert re.fullmatch(r"Too many requests: .+ Try again in \d+ s\.", page.tab.inner_text("#banner-text"))
    page.tab.wait_for_selector("#send:not([hidden])")
    assert page.tab.input_value("#input") == "Hi again"  # given back, to send again
    page.close()
    # the server dies mid-answer: said so, the message is given back, and the page stays usable
    page = Page(browser, keyed, viewport=NARROW, scheme="dark")
    page.tab.add_init_script(f"localStorage.setItem('llm-service.api-key', '{KEY}')")
    page.open()
    page.settings(max_tokens="1500", temperature="0.8")
    page.send("Write a very long story about a dragon.", wait=False)
    page.tab.wait_for_function(
        "() => document.querySelector('.message.assistant.streaming .body')?.textContent.length > 20")
    os.killpg(keyed.proc.pid, signal.SIGKILL)
    page.tab.wait_for_selector("#banner:not([hidden])")
    assert page.tab.inner_text("#banner-text") == "The connection to the server dropped before the answer ended."
    assert page.tab.input_value("#input") == "Write a very long story about a dragon."
    page.shot("error-narrow-dark")
    sent = page.sent()
    page.tab.press("#input", "Enter")
    page.done(after=sent)
    assert page.tab.inner_text("#banner-text") == "The server cannot be reached."
    page.close()


def test_phone_layout(browser: Any, site: ServerProcess) -> None:
    page = Page(browser, site, viewport=NARROW, scheme="dark").open()
    assert page.tab.locator("#sidebar").bounding_box()["x"] < 0  # the list waits behind its button
    page.tab.click("#toggle-sidebar")
    page.tab.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().x >= 0")
    page.shot("sidebar-narrow-dark")
    page.tab.click("#new-chat")
    page.settings(max_tokens="16")
    page.send("Say hello.")
    width = page.tab.evaluate("document.documentElement.scrollWidth")
    assert width <= NARROW["width"]  # nothing wider than the phone
    page.shot("chat-narrow-dark")
    page.close()
