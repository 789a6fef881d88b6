"""Run an HTTP inference server as a subprocess: on a free port, ready when /health says 200,
stopped with its whole process group. compare.py runs peers with it; the tests run ours."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    def __init__(self, cmd: list[str], port: int, log_path: Path, *, name: str = "server",
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 600) -> ServerProcess:
        """Poll /health until 200; if the server exits or the time runs out, raise with its log's tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_text()[-5000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"{self.name} not ready in {timeout:.0f}s:\n{self.log_text()[-5000:]}")

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after a minute."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


class Gateway:
    """nginx (Debian's) running deploy/nginx.conf as shipped, but for the replicas' addresses and
    its own port, with its prefix in `folder` and its JSON access log there or at `log_path`."""

    def __init__(self, nginx: str, replicas: list[int], folder: Path, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = (DEPLOY / "nginx.conf").read_text()
        servers = "\n        ".join(f"server 127.0.0.1:{p} max_fails=3 fail_timeout=10s;" for p in replicas)
        conf, pools = re.subn(r"server llm:8000 max_fails=3 fail_timeout=10s;", servers, conf)
        conf, listens = re.subn(r"listen 8080;", f"listen 127.0.0.1:{self.port};", conf)
        if pools != 2 or listens != 1:
            raise RuntimeError("deploy/nginx.conf no longer has the two `llm` upstreams and one listen this expects")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "nginx.conf").write_text(conf)
        self.log_path = log_path or folder / "nginx.log"
        self._log = open(self.log_path, "ab")  # append: nginx reopens /dev/stdout for its access log
        self.proc = subprocess.Popen([nginx, "-p", str(folder), "-c", str(folder / "nginx.conf"),
                                      "-g", f"daemon off; pid {folder}/nginx.pid;"], stdout=self._log, stderr=self._log)
        for _ in range(100):
            try:
                if httpx.get(f"{self.url}/nginx-health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"nginx did not start: {self.log_path.read_text()[-3000:]}")

    def upstreams(self, request_ids: list[str]) -> list[str]:
        """The replica (address) that answered each request, from nginx's access log (where nginx
        tried several, `upstream` lists each: the last one answered)."""
        seen: dict[str, str] = {}
        deadline = time.monotonic() + 5  # nginx logs a request just after its last byte went out
        while True:
            for line in self.log_path.read_text().splitlines():
                if line.startswith("{"):
                    entry = json.loads(line)
                    seen[entry["request_id"]] = entry["upstream"].split(", ")[-1]
            if all(r in seen for r in request_ids) or time.monotonic() > deadline:
                return [seen[r] for r in request_ids]
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self._log.close()
