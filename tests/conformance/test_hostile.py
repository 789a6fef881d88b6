"""Hostile input never costs a 500 or a stall: a client that leaves while sending its body is a
499 (metrics and request log, no traceback), and probes are answered while the largest prompts
the caps allow are being refused. Engine-independent: run against one engine's server."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import time

import httpx
import pytest

from tests.conftest import MODEL
from tests.server_process import LOG_DIR, ServerProcess


@pytest.fixture()
def once(server: ServerProcess, http: httpx.Client) -> ServerProcess:
    if http.get(f"/v1/models/{MODEL}").json()["engine"] != "transformers":
        pytest.skip("engine-independent: runs against the Transformers engine's server only")
    return server


def _counter(http: httpx.Client, route: str, status: str) -> float:
    prefix = f'llm_requests_total{{model="",route="{route}",status="{status}"}}'
    lines = [x for x in http.get("/metrics").text.splitlines() if x.startswith(prefix)]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


def test_a_client_that_leaves_while_sending_its_body_is_a_499(once: ServerProcess, http: httpx.Client) -> None:
    before = _counter(http, "/v1/chat/completions", "499")
    log_before = len(once.log_text())
    with socket.create_connection(("127.0.0.1", once.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"X-Request-Id: left-midway\r\nContent-Length: 5100\r\n\r\n" + b'{"model": "' + b"x" * 89)
        time.sleep(0.2)
    for _ in range(100):
        if _counter(http, "/v1/chat/completions", "499") > before:
            break
        time.sleep(0.05)
    assert _counter(http, "/v1/chat/completions", "499") == before + 1
    assert _counter(http, "/v1/chat/completions", "500") == 0
    http.get("/v1/usage")  # waits until the request log has written what it holds
    db = next(LOG_DIR.glob(f"conformance-transformers-{once.port}.requests.db"))
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT status FROM llm_requests WHERE request_id = 'left-midway'").fetchall()
    assert rows == [(499,)]
    added = once.log_text()[log_before:]
    assert "Traceback" not in added and "ERROR" not in added


async def test_live_is_answered_while_the_largest_prompts_are_refused(once: ServerProcess) -> None:
    """Three prompts of 1.2 MB (under the 4 MiB body cap, and short enough in characters that
    they must be tokenized to be found too long): tokenizing runs off the event loop, so a /live
    sent meanwhile is answered before any of them."""
    done: list[str] = []
    prompt = "hello " * 200_000
    async with httpx.AsyncClient(base_url=once.url, timeout=120) as c:

        async def big(i: int) -> None:
            r = await c.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1})
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
            done.append(f"big{i}")

        async def live() -> None:
            await asyncio.sleep(0.3)  # the three are uploaded and being tokenized by now
            r = await c.get("/live")
            assert r.status_code == 200
            done.append("live")

        await asyncio.gather(*(big(i) for i in range(3)), live())
    assert done[0] == "live", done


def test_a_prompt_longer_than_any_context_is_refused_without_tokenizing(once: ServerProcess, http: httpx.Client) -> None:
    # one 3.9 MB word: far more characters than the context could hold, refused from its length
    # alone (the message gives the characters and the least number of tokens they can be)
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "a" * 3_900_000, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "(3900000 characters) is at least" in r.json()["error"]["message"]
