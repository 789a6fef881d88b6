"""Start llm-service as a subprocess on a free port and wait until it is ready (vLLM's
RemoteOpenAIServer pattern). Tests then talk to it the way users do: the openai SDK, httpx."""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks import servers
from benchmarks.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
LOG_DIR = ROOT / ".pytest_cache" / "server-logs"

__all__ = ["LOG_DIR", "ROOT", "ServerProcess", "free_port"]


class ServerProcess(servers.ServerProcess):
    """`llm-service serve ARGS` on a free port, its output and request log in LOG_DIR."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, name: str = "server",
                 port: int | None = None) -> None:
        port = port or free_port()  # a restart takes its predecessor's port
        if "--embedding-model" not in args:  # an embedding model only where a test asks for one
            args = (*args, "--embedding-model", "none")
        if "--database-url" not in args:  # each test server logs requests into its own file
            args = (*args, "--database-url", f"sqlite:///{LOG_DIR / f'{name}-{port}.requests.db'}")
        cmd = [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
        super().__init__(cmd, port, LOG_DIR / f"{name}-{port}.log", name=name, env=env, cwd=ROOT)
