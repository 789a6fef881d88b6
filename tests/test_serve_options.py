"""`serve` flags reach the engine: a local model folder, --served-model-name, --max-model-len."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from server import models
from server.config import Settings
from tests.server_process import ServerProcess


@pytest.fixture(scope="module")
def named_server() -> Iterator[ServerProcess]:
    folder = models.resolve(Settings())  # the default model, as a plain local HF folder
    proc = ServerProcess("--model", str(folder), "--served-model-name", "team-chat", "--max-model-len", "512",
                         "--max-num-seqs", "4", "--kv-cache-space", "1", "--enforce-eager", name="named")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def test_served_model_name_and_context_length(named_server: ServerProcess) -> None:
    c = openai.OpenAI(base_url=named_server.base_url, api_key="none", max_retries=0)
    [card] = c.models.list().data
    assert card.id == "team-chat"
    assert card.model_extra["max_model_len"] == 512
    r = c.chat.completions.create(model="team-chat", messages=[{"role": "user", "content": "What is the capital of France?"}],
                                  temperature=0, max_tokens=12)
    assert "Paris" in r.choices[0].message.content and r.model == "team-chat"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="team-chat", prompt="word " * 600)
    assert e.value.code == "context_length_exceeded" and "512" in e.value.message


def test_sigterm_exits_cleanly(named_server: ServerProcess) -> None:
    named_server.stop()
    assert named_server.proc.returncode == 0
    assert "Traceback" not in named_server.log_text()
