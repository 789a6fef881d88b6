"""What every generation response shares, whatever its surface: the head of each object and
chunk (id, created, model, fingerprint), usage, and vLLM's prompt logprobs."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from server import pipeline
from server.engines.base import TokenLogprobs
from server.protocol.common import PromptLogprob, PromptLogprobs, PromptTokensDetails, Usage
from server.tokenizer import Tokenizer


def head(target: pipeline.Target, request_id: str) -> dict[str, Any]:
    """The fields every response object and chunk of one request shares."""
    served = target.served
    return {"id": request_id, "created": int(time.time()), "model": served.name,
            "system_fingerprint": served.fingerprint}


def usage(used: pipeline.Usage) -> Usage:
    details = None if used.cached_tokens is None else PromptTokensDetails(cached_tokens=used.cached_tokens)
    return Usage(prompt_tokens=used.prompt_tokens, completion_tokens=used.completion_tokens,
                 total_tokens=used.total_tokens, prompt_tokens_details=details)


def prompt_logprobs(tok: Tokenizer, items: Sequence[TokenLogprobs | None] | None, as_ids: bool) -> PromptLogprobs | None:
    """vLLM's shape: per prompt token (the first has none) its own logprob and the top ones,
    keyed by token id, ranked by the order the engine gave them."""
    if items is None:
        return None
    out: PromptLogprobs = []
    for lp in items:
        if lp is None:
            out.append(None)
            continue
        ranked = list(lp.top.items())
        position: dict[int, PromptLogprob] = {}
        for rank, (tid, value) in enumerate(ranked, start=1):
            position[tid] = PromptLogprob(logprob=value, rank=rank, decoded_token=tok.token_text(tid, as_ids))
        if lp.token_id not in position:
            position = {lp.token_id: PromptLogprob(logprob=lp.logprob, rank=lp.rank,
                                                   decoded_token=tok.token_text(lp.token_id, as_ids)), **position}
        out.append(position)
    return out


def dump(model: BaseModel) -> str:
    return model.model_dump_json()
