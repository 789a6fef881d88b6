"""Shared fixtures: real servers started once per session and reused by every module."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest
import sqlalchemy as sa

from tests.server_process import ServerProcess

MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"  # the default embedding model, served beside MODEL by `server`


def _engines() -> list[str]:
    """Engines the conformance suite runs against, each with one live server per session.

    `LLM_SERVICE_TEST_ENGINES=vllm,transformers` (what CI sets) requires exactly those; without
    it, vLLM is tested where it is installed (a `make install ENGINE=transformers` machine has
    only the transformers engine)."""
    if wanted := os.environ.get("LLM_SERVICE_TEST_ENGINES"):
        return [e.strip() for e in wanted.split(",") if e.strip()]
    return (["vllm"] if importlib.util.find_spec("vllm") else []) + ["transformers"]


ENGINES = _engines()
# vLLM eager: starts in ~25 s instead of ~90 s on CPU; tests assert behaviour, not speed
ENGINE_ARGS = {"vllm": ["--enforce-eager"], "transformers": []}


@pytest.fixture(scope="session", params=ENGINES)
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    # the chat model and the default embedding model, as `make serve` serves them
    proc = ServerProcess("--engine", request.param, *ENGINE_ARGS[request.param], "--max-num-seqs", "16",
                         "--embedding-model", "default",
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


# a PostgreSQL server where tests may create databases (`.ci/run` starts one: .ci/postgres.sh)
POSTGRES = os.environ.get("LLM_SERVICE_TEST_POSTGRES")


@contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database on `POSTGRES`, dropped afterwards."""
    assert POSTGRES is not None
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    server = sa.create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    with server.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    try:
        yield sa.engine.make_url(POSTGRES).set(database=name).render_as_string(hide_password=False)
    finally:
        with server.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        server.dispose()


@pytest.fixture(scope="session")
def embedding_server(server: ServerProcess) -> ServerProcess:
    """A live server with the chat model and the embedding model, for the clients' tests (which
    are engine-independent: they run against the first engine's server only)."""
    if server.name != f"conformance-{ENGINES[0]}":
        pytest.skip("engine-independent: runs against the first engine's server only")
    return server


class RedisProcess:
    """Debian's redis-server on a free loopback port, in memory only; `stop` and `start` again on
    the same port (a Redis outage mid-test)."""

    def __init__(self, name: str = "redis") -> None:
        from tests.server_process import LOG_DIR, free_port
        from tests.test_deploy import tool

        self.binary = tool("redis-server")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = LOG_DIR / f"{name}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                          "--appendonly", "no", "--enable-debug-command", "local"], stdout=out, stderr=out)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    """A Redis for tests that only read and write it (tests that stop it start their own)."""
    redis = RedisProcess().start()
    try:
        yield redis
    finally:
        redis.stop()
