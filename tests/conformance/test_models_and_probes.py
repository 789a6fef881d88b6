"""/v1/models, the health probes and the root page."""

from __future__ import annotations

import httpx
import openai
from openai.types import Model

from tests.conftest import EMBED_MODEL, MODEL


def test_list_models(client: openai.OpenAI, http: httpx.Client) -> None:
    models = client.models.list()
    # the chat model first, then the embedding model `make serve` loads beside it
    assert [m.id for m in models.data] == [MODEL, EMBED_MODEL]
    raw = http.get("/v1/models").json()
    assert raw["object"] == "list"
    card, embed = raw["data"]
    for c in (card, embed):
        Model.model_validate(c)
        assert c["object"] == "model" and c["owned_by"] and isinstance(c["created"], int)
    assert card["engine"] in ("vllm", "transformers")
    assert card["max_model_len"] == 8192
    assert (card["kind"], embed["kind"]) == ("generate", "embed")


def test_retrieve_model(client: openai.OpenAI) -> None:
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL and m.object == "model"


def test_probes(http: httpx.Client) -> None:
    health = http.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ready"
    assert http.get("/ready").status_code == 200
    assert http.get("/live").json() == {"status": "alive"}


def test_root_says_what_it_is(http: httpx.Client) -> None:
    r = http.get("/").json()
    assert r["name"] == "llm-service" and r["model"] == MODEL
    # every surface is listed, read off the app's routes
    for route in ("POST /v1/chat/completions", "POST /v1/responses", "POST /v1/embeddings",
                  "GET /v1/conversations/{conversation_id}/items", "GET /metrics", "GET /v1/admin/models (admin)"):
        assert route in r["routes"]
    assert http.get(r["docs"]).status_code == 200
    assert http.get(r["openapi"]).json()["info"]["title"] == "llm-service"


def _kv_usage(http: httpx.Client) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "llm_kv_cache_usage_ratio" and sample.labels.get("model") == MODEL:
                return sample.value
    raise AssertionError("llm_kv_cache_usage_ratio is missing from /metrics")


def test_metrics_report_kv_cache_use_while_answering(client: openai.OpenAI, http: httpx.Client) -> None:
    """Both engines: the dashboard's and autoscaler's KV-cache gauge moves with load."""
    stream = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=64,
                                       temperature=0, stream=True, extra_body={"min_tokens": 64})
    seen = []
    for i, _ in enumerate(stream):
        if i in (8, 32):
            seen.append(_kv_usage(http))
    assert all(0 < u <= 1 for u in seen), seen
