"""`POST /v1/chat/completions`: messages in, an assistant message (or its SSE chunks) out.

Chat completions are not stored (`store` is a hint), so the SDK's `retrieve`, `list`, `update`
and `delete` of stored chat completions get a 404 that says so.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server import pipeline, sse
from server.api import envelope
from server.engines.base import TokenLogprobs
from server.errors import InvalidRequest, NotFound
from server.protocol.chat import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Delta,
    TokenLogprob,
    TopLogprob,
)
from server.tokenizer import Tokenizer

router = APIRouter()
ROUTE = "/v1/chat/completions"


@router.post(ROUTE, response_model=None)
async def create(request: Request) -> Response:
    body = await pipeline.parse(request, ChatCompletionRequest)
    cap = request.app.state.server.settings.max_messages
    if len(body.messages) > cap:
        raise InvalidRequest(f"Too many messages: {len(body.messages)}; this server takes at most {cap}.",
                             param="messages")
    target = await pipeline.resolve(request, body.model, body.user)
    messages = [m.for_template() for m in body.messages]
    prompt = await target.render_chat(
        messages, add_generation_prompt=body.generation_prompt, continue_final_message=bool(body.continue_final_message),
        add_special_tokens=bool(body.add_special_tokens), documents=body.documents,
        template_kwargs=body.chat_template_kwargs)
    max_tokens, param = body.requested_max_tokens()
    top = (body.top_logprobs or 0) if body.logprobs else None
    gen = pipeline.Generation(
        route=ROUTE, prompts=[prompt], spec=body.sampling(top, body.prompt_logprobs), n=body.n or 1,
        max_tokens=max_tokens, max_tokens_param=param, truncate_prompt_tokens=body.truncate_prompt_tokens,
        truncation_side=body.truncation_side or "left", prompt_param="messages", logprobs_param="top_logprobs",
        log_prompt=lambda: json.dumps(messages), metadata=body.metadata, safety_identifier=body.safety_identifier)
    rid = f"chatcmpl-{body.request_id or uuid.uuid4().hex}"
    run = await pipeline.start(request, target, gen, rid)
    head = envelope.head(target, rid)
    if body.stream:
        return sse.stream(_chunks(target, body, head, run), on_close=run.close)
    return await run.finish(request, lambda: _whole(target, body, head, run))


async def _whole(target: pipeline.Target, body: ChatCompletionRequest, head: dict[str, Any],
                 run: pipeline.Run) -> Response:
    echo = body.echoed()
    texts = [echo] * len(run.jobs)
    async for job, event in run.events():
        texts[job.index] += event.text
    tok, as_ids = target.tokenizer, bool(body.return_tokens_as_token_ids)
    choices = [
        ChatChoice(
            index=job.index,
            message=AssistantMessage(content=texts[job.index]),
            logprobs=_logprobs(tok, job.logprobs, as_ids) if body.logprobs else None,
            finish_reason=job.finish_reason or "stop",
            token_ids=job.token_ids if body.return_token_ids else None,
        )
        for job in run.jobs
    ]
    first = run.jobs[0]
    result = ChatCompletion(
        **head, choices=choices, usage=envelope.usage(run.usage()),
        prompt_logprobs=envelope.prompt_logprobs(tok, first.prompt_logprobs, as_ids),
        prompt_token_ids=first.prompt.ids if body.return_token_ids else None,
        prompt_text=first.prompt.text if body.return_prompt_text else None)
    return Response(envelope.dump(result), media_type="application/json")


async def _chunks(target: pipeline.Target, body: ChatCompletionRequest, head: dict[str, Any],
                  run: pipeline.Run) -> AsyncIterator[str]:
    tok, as_ids = target.tokenizer, bool(body.return_tokens_as_token_ids)
    continuous = body.continuous_usage

    def chunk(choices: list[ChatChunkChoice], usage: bool = False, **extra: Any) -> str:
        return envelope.dump(ChatCompletionChunk(**head, choices=choices, **extra,
                                                 usage=envelope.usage(run.usage()) if usage else None))

    first = run.jobs[0]
    echo = body.echoed()
    for job in run.jobs:
        yield chunk([ChatChunkChoice(index=job.index, delta=Delta(role="assistant", content=""))], continuous,
                    prompt_token_ids=first.prompt.ids if body.return_token_ids and job is first else None,
                    prompt_text=first.prompt.text if body.return_prompt_text and job is first else None)
        if echo:
            yield chunk([ChatChunkChoice(index=job.index, delta=Delta(content=echo))], continuous)
    async for job, event in run.events():
        logprobs = _logprobs(tok, event.logprobs, as_ids) if body.logprobs and event.logprobs else None
        token_ids = list(event.token_ids) if body.return_token_ids else None
        if event.text or logprobs is not None or token_ids:
            yield chunk([ChatChunkChoice(index=job.index, delta=Delta(content=event.text), logprobs=logprobs,
                                         token_ids=token_ids)], continuous)
        if event.finish_reason is not None:
            yield chunk([ChatChunkChoice(index=job.index, delta=Delta(), finish_reason=event.finish_reason)],
                        continuous)
    if body.include_usage:
        yield chunk([], usage=True)


def _logprobs(tok: Tokenizer, items: Sequence[TokenLogprobs], as_ids: bool) -> ChoiceLogprobs:
    content = []
    for lp in items:
        if lp.token_id in tok.special_ids:  # e.g. end-of-turn: generated, but not in the text
            continue
        top = [TopLogprob(token=tok.token_text(t, as_ids), logprob=v, bytes=list(tok.token_bytes(t)))
               for t, v in lp.top.items()]
        content.append(TokenLogprob(token=tok.token_text(lp.token_id, as_ids), logprob=lp.logprob,
                                    bytes=list(tok.token_bytes(lp.token_id)), top_logprobs=top))
    return ChoiceLogprobs(content=content)


@router.api_route(ROUTE, methods=["GET"], include_in_schema=False)
@router.api_route(ROUTE + "/{completion_id:path}", methods=["GET", "POST", "DELETE"], include_in_schema=False)
async def stored(completion_id: str = "") -> Response:
    """OpenAI's stored chat completions (`store: true`): this server keeps none."""
    raise NotFound("This server does not store chat completions: 'store' is accepted as a hint and changes "
                   "nothing, so there is nothing to retrieve, list, update or delete. Keep the response you "
                   "received, or use the request log (--log-content) for an audit trail.")
