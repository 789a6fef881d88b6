"""Shared fixtures: real servers started once per session and reused by every module."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.server_process import ServerProcess

MODEL = "smollm2-135m-instruct"
# engines the conformance suite runs against; each gets one live server for the whole session
ENGINES = ["vllm"]


@pytest.fixture(scope="session", params=ENGINES)
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    # eager: starts in ~25 s instead of ~90 s on CPU; tests assert behaviour, not speed
    proc = ServerProcess("--engine", request.param, "--enforce-eager", "--max-num-seqs", "16",
                         name=f"conformance-{request.param}")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def aclient(server: ServerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c
