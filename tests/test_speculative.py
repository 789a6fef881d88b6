"""Speculative decoding (`--speculative ngram`, vLLM's prompt lookup): its settings are checked at
construction, vLLM gets them, the Transformers engine refuses them, and a live vLLM server with it
answers an echo greedily, and refuses what vLLM cannot combine with it (min_p, logit_bias)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import openai
import pytest

from server.config import Settings, SettingsError
from server.engines.hf.engine import HFEngine
from tests.conftest import MODEL
from tests.server_process import ServerProcess

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed here")


def test_bad_speculative_settings_name_their_flag() -> None:
    with pytest.raises(SettingsError, match="--speculative: must be one of ngram"):
        Settings(speculative="eagle")
    with pytest.raises(SettingsError, match="--num-speculative-tokens: must be at least 1"):
        Settings(speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(SettingsError, match="--prompt-lookup-min: must be at most --prompt-lookup-max"):
        Settings(speculative="ngram", prompt_lookup_min=5, prompt_lookup_max=3)


def test_the_transformers_engine_refuses_it_before_loading() -> None:
    with pytest.raises(ValueError, match="--speculative needs the vLLM engine"):
        HFEngine.start(Path("/nonexistent"), Settings(speculative="ngram"), None)  # type: ignore[arg-type]


@needs_vllm
def test_vllm_gets_the_ngram_config() -> None:
    from server.engines.vllm_engine import engine_args

    args = engine_args(Path("/model"), Settings(speculative="ngram", num_speculative_tokens=3, prompt_lookup_max=5))
    assert args.speculative_config == {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5,
                                       "prompt_lookup_min": 2}
    assert engine_args(Path("/model"), Settings()).speculative_config is None


@needs_vllm
def test_a_server_with_prompt_lookup_answers_and_refuses_min_p() -> None:
    proc = ServerProcess("--engine", "vllm", "--enforce-eager", "--kv-cache-space", "0.25", "--max-model-len", "1024",
                         "--speculative", "ngram", name="speculative-ngram")
    try:
        proc.wait_ready()
        client = openai.OpenAI(base_url=proc.base_url, api_key="none", max_retries=0, timeout=120)
        text = "The quick brown fox jumps over the lazy dog near the river bank."
        answer = client.chat.completions.create(
            model=MODEL, temperature=0, max_tokens=40,
            messages=[{"role": "user", "content": f"Repeat this text exactly, word for word:\n\n{text}"}])
        assert "quick brown fox jumps over the lazy dog" in (answer.choices[0].message.content or "")
        with pytest.raises(openai.BadRequestError, match="speculative decoding"):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                           extra_body={"min_p": 0.1})
        assert "speculative_config" in proc.log_text() or "ngram" in proc.log_text()
    finally:
        proc.stop()
