"""The deploy files against a live server: nginx (Debian's) in front of it with deploy/nginx.conf,
Prometheus' promtool on the configs, and every metric the dashboard, alerts and autoscaler use
found in the server's real /metrics."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.servers import Gateway
from tests.conftest import MODEL
from tests.server_process import LOG_DIR, ServerProcess, free_port
from tests.test_deploy import DEPLOY, K8S, tool


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess("--engine", "transformers", "--max-num-seqs", "4", name="deploy")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def gateway(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """deploy/nginx.conf as it is, but for the upstream's address and the listening port."""
    nginx = tool("nginx")
    prefix = tmp_path_factory.mktemp("nginx")
    gateway = Gateway(nginx, [server.port], prefix, LOG_DIR / f"nginx-{server.port}.log")
    try:
        check = subprocess.run([nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-t",
                                "-g", f"pid {prefix}/nginx-t.pid;"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        yield gateway.url
    finally:
        gateway.stop()


def test_nginx_accepts_the_config_as_shipped(gateway: str) -> None:
    """`nginx -t` ran on the file in the fixture (only the upstream's host was replaced): here,
    the probes through it."""
    assert httpx.get(f"{gateway}/health").json()["status"] == "ready"
    assert httpx.get(f"{gateway}/nginx-health").json() == {"status": "ok"}
    # /metrics is not exposed through the gateway; unknown paths answer in OpenAI's shape
    r = httpx.get(f"{gateway}/metrics")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    # the chat page comes through too, with its script
    page = httpx.get(f"{gateway}/", headers={"Accept": "text/html"})
    assert page.status_code == 200 and "content-security-policy" in page.headers
    assert httpx.get(f"{gateway}/chat/assets/app.js").status_code == 200
    assert httpx.get(f"{gateway}/").json()["name"] == "llm-service"


def test_stream_through_nginx_arrives_chunk_by_chunk(gateway: str) -> None:
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="none", max_retries=0, timeout=120)
    start = time.monotonic()
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count from one to fifty in words."}],
        max_tokens=48, temperature=0, stream=True, extra_body={"min_tokens": 48},
        extra_headers={"X-Request-Id": "through-nginx-1"},
    )
    arrivals = [time.monotonic() for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert len(arrivals) >= 40
    total = arrivals[-1] - start
    # unbuffered: the first words arrive long before the last (buffered, all would come at once)
    assert arrivals[0] - start < 0.5 * total, (arrivals[0] - start, total)
    gaps = sum(1 for a, b in zip(arrivals, arrivals[1:], strict=False) if b - a > 0.002)
    assert gaps >= len(arrivals) // 2, f"only {gaps} of {len(arrivals)} chunks came separately"


def test_request_ids_pass_through_and_errors_keep_their_shape(gateway: str) -> None:
    r = httpx.post(f"{gateway}/v1/chat/completions", headers={"X-Request-Id": "req-abc-123"},
                   json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}, timeout=120)
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-abc-123"
    assert re.fullmatch(r"[0-9a-f]{32}", httpx.get(f"{gateway}/v1/models").headers["x-request-id"])
    # the server's own errors pass through untouched
    r = httpx.post(f"{gateway}/v1/chat/completions", json={"model": "nope", "messages": []})
    assert r.status_code in (400, 404) and "error" in r.json()
    # bodies over nginx's limit are refused before they reach the server, in OpenAI's shape
    big = "x" * (5 << 20)
    r = httpx.post(f"{gateway}/v1/completions", content=big, headers={"content-type": "application/json"}, timeout=120)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_nginx_rate_limit_answers_429_the_sdk_understands(gateway: str) -> None:
    """Per client address: bursts of 40 answered, beyond them 429 with Retry-After."""
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="none", max_retries=0)
    with httpx.Client(base_url=gateway, timeout=30) as http:
        codes = [http.get("/v1/models").status_code for _ in range(80)]
        limited = http.get("/v1/models")
        errors = []
        for _ in range(5):  # the bucket refills at 20/s: some of these come back limited
            try:
                client.models.list()
            except openai.RateLimitError as e:
                errors.append(e)
    assert codes.count(200) >= 40 and 429 in codes
    assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert errors and errors[0].code == "rate_limit_exceeded"
    time.sleep(2.5)  # the bucket refills (20/s) before anything else uses this gateway
    assert client.models.list().data[0].id == MODEL


# ---------------------------------------------------------------- Prometheus and Grafana


def test_promtool_accepts_the_config_and_the_alerts() -> None:
    promtool = tool("promtool")
    r = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout and "rule files found" in r.stdout


def _used_metrics() -> dict[str, set[str]]:
    """Metric names in the dashboard's, alerts', adapter's and HPA's queries, by where they are used."""
    used: dict[str, set[str]] = {}
    dashboard = json.loads((DEPLOY / "grafana/dashboards/llm-service.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append(dashboard["templating"]["list"][0]["query"]["query"])
    used["dashboard"] = {m for e in exprs for m in re.findall(r"\bllm_\w+", e)}
    alerts = yaml.safe_load((DEPLOY / "prometheus-alerts.yml").read_text())
    used["alerts"] = {m for g in alerts["groups"] for r in g["rules"] for m in re.findall(r"\bllm_\w+", r["expr"])}
    hpa = yaml.safe_load((K8S / "hpa.yaml").read_text())
    used["hpa"] = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    adapter = yaml.safe_load((K8S / "prometheus-adapter.values.yaml").read_text())
    used["adapter"] = {m for r in adapter["rules"]["custom"] for m in re.findall(r"\bllm_\w+", r["seriesQuery"])}
    return used


def test_every_metric_the_dashboard_alerts_and_autoscaler_use_is_served(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)  # every labelled series exists
    text = httpx.get(f"{server.url}/metrics").text
    served = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    used = _used_metrics()
    assert len(used["dashboard"]) >= 10
    # exists once aliases are configured (each arm from 0: test_many_models.py reads them)
    served.add("llm_alias_requests_total")
    for where, names in used.items():
        assert names and names <= served, f"{where} uses metrics the server does not have: {names - served}"
    labels = {s.name: set(s.labels) for f in text_string_to_metric_families(text) for s in f.samples}
    labels.setdefault("llm_alias_requests_total", {"alias", "model"})  # as test_many_models.py reads them
    dashboard = (DEPLOY / "grafana/dashboards/llm-service.json").read_text()
    for label, metric in re.findall(r"by \(([\w, ]+)\) \((?:rate|increase)?\(?(llm_\w+)", dashboard):
        for name in (n.strip() for n in label.split(",")):
            if name not in ("le", "instance"):  # le: histograms; instance: added by Prometheus
                assert name in labels[metric], f"{metric} has no label {name}"


def test_healthcheck_command_of_the_images(server: ServerProcess) -> None:
    """The images' HEALTHCHECK, run as Docker would: passes against a ready server, fails without one."""
    command = json.loads(re.search(r"^\s+CMD (\[.*\])$", (DEPLOY / "Dockerfile.cpu").read_text(), re.M).group(1))
    assert command[0] == "python"
    command[0] = sys.executable  # the image's python has the same standard library
    env = {"LLM_SERVICE_PORT": str(server.port), "PATH": "/usr/bin:/bin"}
    assert subprocess.run(command, env=env, capture_output=True, timeout=30).returncode == 0
    env["LLM_SERVICE_PORT"] = str(free_port())
    assert subprocess.run(command, env=env, capture_output=True, timeout=30).returncode != 0


def test_nginx_log_is_json_with_request_ids() -> None:
    logs = sorted(Path(LOG_DIR).glob("nginx-*.log"), key=lambda p: p.stat().st_mtime)
    lines = [json.loads(line) for line in logs[-1].read_text().splitlines() if line.startswith("{")]
    assert any(e["request_id"] == "through-nginx-1" and e["status"] == 200 for e in lines)
