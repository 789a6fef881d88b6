"""`POST /v1/embeddings`: texts (or token ids) in, one vector each out, from an `embed` model.

The server tokenizes and truncates (the same way for every engine, so they cannot disagree),
admits the request like any other (its key's limits, its model's bounded queue), and the
model's embedding engine batches it with whatever else is waiting.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from functools import partial

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server import pipeline
from server.errors import ContextLengthExceeded, InvalidRequest, UnsupportedParameter
from server.gate import access
from server.protocol.embeddings import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage

router = APIRouter()
ROUTE = "/v1/embeddings"


@router.post(ROUTE, response_model=None)
async def create(request: Request) -> Response:
    body = await pipeline.parse(request, EmbeddingRequest)
    target = await pipeline.resolve(request, body.model, body.user, kind="embed")
    embedder = target.served.embedder()
    if body.dimensions is not None and body.dimensions != embedder.dimensions:
        raise UnsupportedParameter("dimensions", f"The model {target.served.name} makes {embedder.dimensions}-"
                                   "dimensional vectors and cannot shorten them (it was not trained to).")
    limit = target.max_model_len
    keep = body.truncate_prompt_tokens
    if keep is not None and keep > limit:
        raise InvalidRequest(f"Invalid value for 'truncate_prompt_tokens': {keep} is more than this model's "
                             f"context of {limit} tokens.", param="truncate_prompt_tokens")
    cut = limit if keep in (None, -1) else keep
    tokenizer, side = target.tokenizer, body.truncation_side or "right"
    inputs: list[list[int]] = []
    for i, item in enumerate(body.inputs()):
        if isinstance(item, str):
            ids, whole = await target.off_loop(partial(tokenizer.encode_cut, item, body.add_special_tokens, cut, side))
        else:
            target.token_prompt(item, param="input")
            ids, whole = (item[:cut] if side == "right" else item[-cut:]), len(item)
        if not ids:  # e.g. whitespace without special tokens: there is nothing to pool
            raise InvalidRequest(f"Invalid 'input[{i}]': it has no tokens to embed.", param="input")
        if whole > limit and keep is None:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, input[{i}] is {whole} tokens. "
                "Shorten it, or send 'truncate_prompt_tokens' to have it cut.", param="input")
        inputs.append(ids)
    tokens = sum(len(ids) for ids in inputs)
    record = access(request)
    held = await pipeline.hold(request, target, tokens, 1, body.priority)
    started = time.monotonic()
    used: int | None = None
    try:
        rid = f"embd-{body.request_id or uuid.uuid4().hex}"
        vectors = await pipeline.unless_disconnected(request, embedder.embed(inputs, rid))
        used = tokens
    finally:
        held.release()
        held.ticket.close(used)
        record.prompt_tokens, record.completion_tokens = tokens, 0
        metrics, name = request.app.state.server.metrics, target.served.name
        metrics.prompt_tokens.labels(name).inc(tokens if used is not None else 0)
        if used is not None:
            metrics.e2e.labels(ROUTE, name).observe(time.monotonic() - started)
    data = [Embedding(index=i, embedding=_encoded(v) if body.encoding_format == "base64" else v)
            for i, v in enumerate(vectors)]
    out = EmbeddingList(data=data, model=target.served.name, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
    return Response(out.model_dump_json(), media_type="application/json")


def _encoded(vector: list[float]) -> str:
    """OpenAI's base64 form: the vector's little-endian float32 bytes."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
