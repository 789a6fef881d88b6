"""`POST /v1/chat/completions`: messages in, an assistant message (or its SSE chunks) out.

Chat completions are not stored (`store` is a hint), so the SDK's `retrieve`, `list`, `update`
and `delete` of stored chat completions get a 404 that says so.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server import pipeline, sse, structured, tools
from server.api import envelope
from server.engines.base import FinishReason, TokenLogprobs
from server.errors import InvalidRequest, NotFound
from server.gate import access
from server.protocol.chat import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatFinishReason,
    ChoiceLogprobs,
    Delta,
    FunctionCall,
    FunctionCallDelta,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
)
from server.tokenizer import Tokenizer

router = APIRouter()
ROUTE = "/v1/chat/completions"


@router.post(ROUTE, response_model=None)
async def create(request: Request) -> Response:
    body = await pipeline.parse(request, ChatCompletionRequest)
    rid = f"chatcmpl-{body.request_id or uuid.uuid4().hex}"
    started = await start(request, body, ROUTE, rid)
    target, run = started.target, started.run
    head = envelope.head(target, rid)
    if body.stream:
        return sse.stream(_chunks(request, target, body, head, run), on_close=run.close)
    return await run.finish(request, lambda: _whole(request, target, body, head, run))


@dataclass
class Started:
    """A chat generation admitted and ready to run: the Responses API renders the same runs."""

    target: pipeline.Target
    run: pipeline.Run
    tool_names: list[str] | None  # the tools the answer may call (None: it calls none)

    def parser(self) -> tools.Parser:
        return tools.Parser(self.target.tool_format, self.tool_names or [])


async def start(request: Request, body: ChatCompletionRequest, route: str, rid: str,
                prompt_param: str = "messages") -> Started:
    """Resolve, render, check and admit a chat request (every refusal happens here, before any
    token is generated or streamed)."""
    cap = request.app.state.server.settings.max_messages
    if len(body.messages) > cap:
        raise InvalidRequest(f"Too many messages: {len(body.messages)}; this server takes at most {cap}.",
                             param=prompt_param)
    constraint = body.constraint(body.response_format)
    target = await pipeline.resolve(request, body.model, body.user)
    tool_list = [{"type": "function", "function": t.function.model_dump(exclude_none=True)}
                 for t in body.tools or []]
    if body.calls_tools:  # the answer: calls, or (auto) text, or the structured reply when one is asked for
        if constraint is not None and constraint.kind != "json":
            raise InvalidRequest("Only a JSON response format (json_object, json_schema, or structured_outputs' "
                                 "json) can be combined with tools.", param="tools")
        constraint = tools.grammar(target.tool_format, _for_grammar(tool_list), body.tool_choice_for_grammar(),
                                   body.parallel_tool_calls is not False,
                                   response_schema=json.loads(constraint.value) if constraint is not None else None)
    if constraint is not None:
        body.check_constrained("tool calls" if body.calls_tools else "a structured 'response_format'")
        if body.echoed():  # the echoed text is not the grammar's
            raise InvalidRequest("'echo' cannot be used with structured outputs or tool calls: the answer alone "
                                 "matches the grammar.", param="echo")
        access(request).constrained = constraint.kind if not body.calls_tools else "tools"
    messages = [m.for_template() for m in body.messages]
    prompt = await target.render_chat(
        messages, add_generation_prompt=body.generation_prompt, continue_final_message=bool(body.continue_final_message),
        add_special_tokens=bool(body.add_special_tokens), documents=body.documents,
        template_kwargs=body.chat_template_kwargs, tool_list=tool_list)
    max_tokens, param = body.requested_max_tokens()
    top = (body.top_logprobs or 0) if body.logprobs else None
    gen = pipeline.Generation(
        route=route, prompts=[prompt], spec=body.sampling(top, body.prompt_logprobs, constraint), n=body.n or 1,
        max_tokens=max_tokens, max_tokens_param=param, truncate_prompt_tokens=body.truncate_prompt_tokens,
        truncation_side=body.truncation_side or "left", prompt_param=prompt_param, logprobs_param="top_logprobs",
        log_prompt=lambda: json.dumps(messages), metadata=body.metadata, safety_identifier=body.safety_identifier)
    run = await pipeline.start(request, target, gen, rid)
    return Started(target, run, [t.function.name for t in body.tools or []] if body.calls_tools else None)


async def _whole(request: Request, target: pipeline.Target, body: ChatCompletionRequest, head: dict[str, Any],
                 run: pipeline.Run) -> Response:
    echo = body.echoed()
    texts = [echo] * len(run.jobs)
    async for job, event in run.events():
        texts[job.index] += event.text
    tok, as_ids = target.tokenizer, bool(body.return_tokens_as_token_ids)
    choices = []
    for job in run.jobs:
        message = AssistantMessage(content=texts[job.index])
        ended: FinishReason = job.finish_reason or "stop"
        finish: ChatFinishReason = ended
        if body.calls_tools:
            parser = _parser(target, body)
            parser.feed(texts[job.index])
            parser.end()
            finish = _answered(request, parser, ended)
            if parser.calls:  # cut by max_tokens, the last call is as far as it got (as streamed)
                message = AssistantMessage(content=parser.content.strip() or None, tool_calls=[
                    ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in parser.calls])
        choices.append(ChatChoice(
            index=job.index, message=message,
            logprobs=_logprobs(tok, job.logprobs, as_ids) if body.logprobs else None,
            finish_reason=finish, token_ids=job.token_ids if body.return_token_ids else None))
    first = run.jobs[0]
    result = ChatCompletion(
        **head, choices=choices, usage=envelope.usage(run.usage()),
        prompt_logprobs=envelope.prompt_logprobs(tok, first.prompt_logprobs, as_ids),
        prompt_token_ids=first.prompt.ids if body.return_token_ids else None,
        prompt_text=first.prompt.text if body.return_prompt_text else None)
    return Response(envelope.dump(result), media_type="application/json")


async def _chunks(request: Request, target: pipeline.Target, body: ChatCompletionRequest, head: dict[str, Any],
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
    parsers = {job.index: _parser(target, body) for job in run.jobs} if body.calls_tools else {}
    async for job, event in run.events():
        logprobs = _logprobs(tok, event.logprobs, as_ids) if body.logprobs and event.logprobs else None
        token_ids = list(event.token_ids) if body.return_token_ids else None
        parser = parsers.get(job.index)
        if parser is None:
            deltas = [Delta(content=event.text)] if event.text or logprobs is not None or token_ids else []
        else:  # content as it comes; each call's start, then its arguments as they come
            got = parser.feed(event.text) + (parser.end() if event.finish_reason is not None else [])
            deltas = [_delta(e) for e in got]
            if not deltas and (logprobs is not None or token_ids):
                deltas = [Delta(content="")]
        for i, delta in enumerate(deltas):
            yield chunk([ChatChunkChoice(index=job.index, delta=delta, logprobs=logprobs if i == 0 else None,
                                         token_ids=token_ids if i == 0 else None)], continuous)
        if event.finish_reason is not None:
            finish = _answered(request, parser, event.finish_reason) if parser is not None else event.finish_reason
            yield chunk([ChatChunkChoice(index=job.index, delta=Delta(), finish_reason=finish)], continuous)
    if body.include_usage:
        yield chunk([], usage=True)


def _parser(target: pipeline.Target, body: ChatCompletionRequest) -> tools.Parser:
    return tools.Parser(target.tool_format, [t.function.name for t in body.tools or []])


def _answered(request: Request, parser: tools.Parser, finish: FinishReason) -> ChatFinishReason:
    """The choice's finish_reason: "tool_calls" when it ended where its grammar ends, with calls;
    its calls are counted for the metrics and the request log."""
    record = access(request)
    record.tool_calls = (record.tool_calls or 0) + len(parser.calls)
    return "tool_calls" if finish == "stop" and parser.complete_calls else finish


def _delta(event: tools.Event) -> Delta:
    """OpenAI's stream of calls: a call's first delta carries index, id, type and name (arguments
    ""); then only index and arguments fragments. Clients join calls by index."""
    if event.kind == "content":
        return Delta(content=event.text)
    call = event.call
    assert call is not None
    if event.kind == "call":
        return Delta(tool_calls=[ToolCallDelta(index=call.index, id=call.id, type="function",
                                               function=FunctionCallDelta(name=call.name, arguments=""))])
    return Delta(tool_calls=[ToolCallDelta(index=call.index, function=FunctionCallDelta(arguments=event.text))])


def _for_grammar(tool_list: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tools as the grammar sees them: arguments are always an object matching `parameters`
    (xgrammar would leave a non-strict tool's, or one without parameters, unconstrained), each
    checked here so that a 400 names the tool's own keyword."""
    out = []
    for t in tool_list:
        parameters = t["function"].get("parameters") or {"type": "object"}
        structured.check_schema(parameters, "tools.function.parameters")
        out.append({"type": "function", "function": {"name": t["function"]["name"], "parameters": parameters}})
    return out


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
