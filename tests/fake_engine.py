"""A fake Engine for route-level unit tests: scripted output, optional failures, recorded aborts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from server.config import Settings
from server.engines.base import EngineInfo, FinishReason, SamplingSpec, TokenEvent
from server.errors import EngineError
from server.tokenizer import Tokenizer


class FakeEngine:
    def __init__(self, token_ids: list[int], texts: list[str], fail_after: int | None = None) -> None:
        self.info = EngineInfo(name="fake", max_model_len=512)
        self.token_ids = token_ids
        self.texts = texts
        self.fail_after = fail_after
        self.aborted: list[str] = []
        self.active: set[str] = set()
        self.dead = False
        self.attached = False

    @classmethod
    def start(cls, model_path: Path, settings: Settings, tokenizer: Tokenizer) -> FakeEngine:
        """Three tokens, "a", "b", "c"; no model is read."""
        return cls([1, 2, 3], ["a", "b", "c"])

    @staticmethod
    def footprint(weights: int, settings: Settings, device: str, total: int) -> int:
        return weights

    def attach_to_loop(self) -> None:
        self.attached = True

    def kv_cache_usage(self) -> float:
        return 0.0

    async def generate(self, prompt_token_ids: list[int], spec: SamplingSpec, request_id: str) -> AsyncIterator[TokenEvent]:
        self.active.add(request_id)
        try:
            n = min(spec.max_tokens, len(self.token_ids))
            for i in range(n):
                if self.fail_after is not None and i == self.fail_after:
                    raise EngineError("the fake engine failed on purpose")
                await asyncio.sleep(0)
                last = i == n - 1
                reason: FinishReason | None = ("length" if n == spec.max_tokens else "stop") if last else None
                yield TokenEvent(text=self.texts[i], token_ids=(self.token_ids[i],), finish_reason=reason)
        finally:
            self.active.discard(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def check_health(self) -> None:
        if self.dead:
            raise RuntimeError("fake engine died")

    async def num_active_requests(self) -> int:
        return len(self.active)

    async def shutdown(self) -> None:
        self.dead = True
