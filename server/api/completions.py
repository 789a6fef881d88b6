"""`POST /v1/completions` (the legacy text route): prompts in, texts (or SSE chunks) out."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server import pipeline, sse
from server.api import envelope
from server.engines.base import TokenEvent, TokenLogprobs
from server.errors import InvalidRequest
from server.gate import access
from server.protocol.completions import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
)
from server.tokenizer import Tokenizer

router = APIRouter()
ROUTE = "/v1/completions"
# OpenAI's default for this route
DEFAULT_MAX_TOKENS = 16


@router.post(ROUTE, response_model=None)
async def create(request: Request) -> Response:
    body = await pipeline.parse(request, CompletionRequest)
    constraint = body.constraint(body.response_format)
    if constraint is not None:
        body.check_constrained("structured outputs")
        if body.echo:  # the echoed prompt is not the grammar's
            raise InvalidRequest("'echo' cannot be used with structured outputs: the answer alone matches the "
                                 "grammar.", param="echo")
        access(request).constrained = constraint.kind
    target = await pipeline.resolve(request, body.model, body.user)
    add_special = body.add_special_tokens is not False
    prompts = [await target.encode(p, add_special) if isinstance(p, str) else target.token_prompt(p)
               for p in body.prompts()]
    # echo + logprobs: the prompt's own logprobs too, as many alternatives as for the answer
    prompt_lps = body.logprobs if body.echo and body.logprobs is not None else body.prompt_logprobs
    gen = pipeline.Generation(
        route=ROUTE, prompts=prompts, spec=body.sampling(body.logprobs, prompt_lps, constraint), n=body.n or 1,
        max_tokens=body.max_tokens, default_max_tokens=DEFAULT_MAX_TOKENS,
        truncate_prompt_tokens=body.truncate_prompt_tokens, truncation_side=body.truncation_side or "left",
        log_prompt=lambda: prompts[0].text if len(prompts) == 1 else json.dumps([p.text for p in prompts]),
        metadata=body.metadata, safety_identifier=body.safety_identifier)
    rid = f"cmpl-{body.request_id or uuid.uuid4().hex}"
    run = await pipeline.start(request, target, gen, rid)
    head = envelope.head(target, rid)
    if body.stream:
        return sse.stream(_chunks(target, body, head, run), on_close=run.close)
    return await run.finish(request, lambda: _whole(target, body, head, run))


async def _whole(target: pipeline.Target, body: CompletionRequest, head: dict[str, Any],
                 run: pipeline.Run) -> Response:
    texts = [""] * len(run.jobs)
    lps: list[CompletionLogprobs | None] = [None] * len(run.jobs)
    echoed: set[int] = set()
    async for job, event in run.events():
        text, logprobs = _piece(target.tokenizer, body, job, event, len(texts[job.index]), echoed)
        texts[job.index] += text
        if logprobs is not None:
            lps[job.index] = _merge(lps[job.index], logprobs)
    as_ids = bool(body.return_tokens_as_token_ids)
    choices = [
        CompletionChoice(
            index=job.index,
            text=texts[job.index],
            logprobs=lps[job.index] if body.logprobs is not None else None,
            finish_reason=job.finish_reason or "stop",
            prompt_logprobs=(envelope.prompt_logprobs(target.tokenizer, job.prompt_logprobs, as_ids)
                             if body.prompt_logprobs is not None else None),
            prompt_token_ids=job.prompt.ids if body.return_token_ids else None,
            token_ids=job.token_ids if body.return_token_ids else None,
        )
        for job in run.jobs
    ]
    result = Completion(**head, choices=choices, usage=envelope.usage(run.usage()))
    return Response(envelope.dump(result), media_type="application/json")


async def _chunks(target: pipeline.Target, body: CompletionRequest, head: dict[str, Any],
                  run: pipeline.Run) -> AsyncIterator[str]:
    continuous = body.continuous_usage

    def chunk(choices: list[CompletionChoice], usage: bool = False) -> str:
        return envelope.dump(Completion(**head, choices=choices, usage=envelope.usage(run.usage()) if usage else None))

    sent = [0] * len(run.jobs)  # characters sent per choice, for text_offset
    echoed: set[int] = set()
    async for job, event in run.events():
        first = job.index not in echoed
        text, logprobs = _piece(target.tokenizer, body, job, event, sent[job.index], echoed)
        sent[job.index] += len(text)
        ids = body.return_token_ids
        if text or logprobs is not None or (ids and event.token_ids):
            yield chunk([CompletionChoice(
                index=job.index, text=text, logprobs=logprobs, finish_reason=None,
                prompt_token_ids=job.prompt.ids if ids and first else None,
                token_ids=list(event.token_ids) if ids else None)], continuous)
        if event.finish_reason is not None:
            yield chunk([CompletionChoice(index=job.index, text="", finish_reason=event.finish_reason)], continuous)
    if body.include_usage:
        yield chunk([], usage=True)


def _piece(tok: Tokenizer, body: CompletionRequest, job: pipeline.Job, event: TokenEvent, offset: int,
           echoed: set[int]) -> tuple[str, CompletionLogprobs | None]:
    """Text and logprobs one event adds to a choice, echoing the prompt on its first event."""
    text = event.text
    logprobs: CompletionLogprobs | None = None
    as_ids = bool(body.return_tokens_as_token_ids)
    if job.index not in echoed:
        echoed.add(job.index)
        if body.echo:
            text = job.prompt.text + text
            if body.logprobs is not None and event.prompt_logprobs is not None:
                logprobs = _echo_logprobs(tok, job, event.prompt_logprobs, as_ids)
            offset += len(job.prompt.text)
    if body.logprobs is not None and event.logprobs:
        logprobs = _merge(logprobs, _logprobs(tok, event.logprobs, offset, as_ids))
    return text, logprobs


def _logprobs(tok: Tokenizer, items: Sequence[TokenLogprobs | None], offset: int, as_ids: bool) -> CompletionLogprobs:
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for lp in items:
        if lp is None or lp.token_id in tok.special_ids:  # not part of the text
            continue
        text = tok.token_text(lp.token_id, as_ids)
        tokens.append(text)
        token_lps.append(lp.logprob)
        tops.append({tok.token_text(t, as_ids): v for t, v in lp.top.items()})
        offsets.append(offset)
        offset += len(tok.token_text(lp.token_id))
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_lps, top_logprobs=tops, text_offset=offsets)


def _echo_logprobs(tok: Tokenizer, job: pipeline.Job, prompt_lps: Sequence[TokenLogprobs | None],
                   as_ids: bool) -> CompletionLogprobs:
    """Prompt tokens' logprobs for `echo`; the first token has none, so OpenAI sends null."""
    out = _logprobs(tok, prompt_lps, 0, as_ids)
    if prompt_lps and prompt_lps[0] is None and job.prompt.ids:
        first = tok.token_text(job.prompt.ids[0], as_ids)
        out.tokens.insert(0, first)
        out.token_logprobs.insert(0, None)
        out.top_logprobs.insert(0, None)
        width = len(tok.token_text(job.prompt.ids[0]))
        out.text_offset = [0] + [o + width for o in out.text_offset]
    return out


def _merge(a: CompletionLogprobs | None, b: CompletionLogprobs) -> CompletionLogprobs:
    if a is None:
        return b
    return CompletionLogprobs(
        tokens=a.tokens + b.tokens,
        token_logprobs=a.token_logprobs + b.token_logprobs,
        top_logprobs=a.top_logprobs + b.top_logprobs,
        text_offset=a.text_offset + b.text_offset,
    )
