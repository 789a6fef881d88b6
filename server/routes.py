"""/v1/chat/completions, /v1/completions, /v1/models, and the health probes.

The request path: parse + validate the body -> template and tokenize -> `engine.generate` for
each choice -> `sse.stream` or one aggregated response. A client that goes away, or an error
anywhere, aborts every engine request of that HTTP request (`_generate_all`'s `finally`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from server import __version__, sse
from server.auth import Key
from server.engines.base import Engine, SamplingSpec, TokenEvent, TokenLogprobs
from server.errors import (
    ClientClosedRequest,
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    ServiceUnavailable,
    invalid_request_from,
)
from server.limits import Ticket
from server.metrics import Metrics
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
    _SamplingFields,
)
from server.registry import Entry, Served
from server.store import utcnow
from server.tokenizer import Tokenizer

router = APIRouter()
Body = TypeVar("Body", bound=BaseModel)
T = TypeVar("T")
# OpenAI's default for the legacy completions route
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


# --------------------------------------------------------------------------- plumbing


async def _resolve(request: Request, model: str, user: str | None) -> tuple[Served, Entry]:
    """The ready model this request goes to (an alias's variant; a lazy model loads first),
    named on the request for the response header, metrics and the request log."""
    state = request.app.state.server
    if state.status in ("stopping", "failed"):
        raise ServiceUnavailable(state.unavailable_reason())
    # a lazy model may keep it waiting for its load: stop waiting if the client leaves
    entry, alias = await state.registry.resolve(model, user, wait=lambda work: _unless_disconnected(request, work))
    served: Served | None = entry.served
    if served is None:
        raise entry.unavailable()
    request.state.model = entry.name
    request.state.engine = served.engine.info.name
    if alias is not None:
        request.state.alias = alias.name
    return served, entry


async def _parse(request: Request, model: type[Body]) -> Body:
    limit = request.app.state.server.settings.max_request_bytes
    raw = bytearray()
    async for part in request.stream():  # counted as it arrives: a body without Content-Length too
        raw += part
        if len(raw) > limit:
            raise PayloadTooLarge(f"The request body is larger than this server's limit of {limit} bytes.")
    if not raw:
        raise InvalidRequest("The request body is empty; it must be a JSON object.")
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise invalid_request_from(e.errors()) from None


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; if the client goes away first, cancel it (which aborts its engine requests)
    and answer 499, what proxies log for "client closed request", to nobody."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
    if task.cancelled() or not task.done():
        await asyncio.gather(task, return_exceptions=True)
        raise ClientClosedRequest("The client closed the request.")
    return task.result()


@dataclass
class _Job:
    """One sequence to generate: a choice of the response."""

    index: int
    prompt_ids: list[int]
    spec: SamplingSpec
    request_id: str
    prompt_text: str = ""
    tokens: int = 0  # completion tokens produced so far
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    echoed: bool = False  # completions `echo`: the prompt went out with the first event
    cached_tokens: int | None = None  # prompt tokens the engine's prefix cache supplied
    last_event: float | None = None  # when its previous event came (inter-token latency)
    pieces: list[str] = field(default_factory=list)  # the answer, kept only with --log-content


@dataclass
class _Run:
    """One generation request's hold on the server (admission slots, its key's limits) and its
    measurements. `close` runs exactly once, whether the request finished, failed or was left."""

    engine: Engine
    jobs: list[_Job]
    metrics: Metrics
    model: str
    route: str
    ticket: Ticket
    release: Callable[[], None]
    note: dict[str, Any]  # what the request log row gets (request.state.log)
    prompt_text: str | None = None  # kept only with --log-content
    started: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    closed: bool = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.release()
        usage = _usage(self.jobs)
        self.ticket.close(usage.total_tokens if self.first_token is not None else None)
        reasons = sorted({j.finish_reason for j in self.jobs if j.finish_reason})
        self.note.update(
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            ttft_ms=(self.first_token - self.started) * 1000 if self.first_token is not None else None,
            finish_reason=",".join(reasons) or None,
        )
        if self.prompt_text is not None:
            texts = ["".join(j.pieces) for j in self.jobs]
            self.note.update(prompt=self.prompt_text, answer=texts[0] if len(texts) == 1 else json.dumps(texts))
        self.metrics.prompt_tokens.labels(self.model).inc(usage.prompt_tokens)
        self.metrics.generation_tokens.labels(self.model).inc(usage.completion_tokens)
        if self.first_token is not None:
            self.metrics.e2e.labels(self.route, self.model).observe(time.monotonic() - self.started)


async def _admit(request: Request, served: Served, entry: Entry, jobs: list[_Job], route: str, max_tokens: int,
                 prompt_text: Callable[[], str]) -> _Run:
    """The key's limits (429 at once), then a place in the model's engine (waits in its bounded
    queue, or 429 when it is full). Cancelled if the client leaves while waiting."""
    state = request.app.state.server
    key: Key | None = getattr(request.state, "key", None)
    try:
        ticket = state.key_limits.admit(key, _usage(jobs).prompt_tokens + max_tokens * len(jobs))
    except RateLimited as e:
        state.metrics.rejections.labels(e.reason).inc()
        raise
    admission = entry.admission
    if admission is None:
        ticket.close(0)
        raise entry.unavailable()
    try:
        await _unless_disconnected(request, admission.acquire(len(jobs)))
    except BaseException as e:
        ticket.close(0)
        if isinstance(e, Overloaded):
            state.metrics.rejections.labels("queue_full").inc()
        raise
    if entry.state != "ready":  # an unload began while it waited: it takes no new work
        admission.release(len(jobs))
        ticket.close(0)
        raise entry.unavailable()
    entry.requests += 1
    entry.touch()

    def release() -> None:
        admission.release(len(jobs))
        entry.touch()  # idle time counts from the end of its last request

    note: dict[str, Any] = {}
    request.state.log = note
    return _Run(served.engine, jobs, state.metrics, served.name, route, ticket, release=release, note=note,
                prompt_text=prompt_text() if state.settings.log_content else None)


async def _generate_all(run: _Run) -> AsyncIterator[tuple[_Job, TokenEvent]]:
    """Events of all jobs as they come; aborts whatever has not finished when closed early."""
    try:
        async for job, event in _events(run.engine, run.jobs):
            now = time.monotonic()
            if run.first_token is None:
                run.first_token = now
                run.metrics.ttft.labels(run.model).observe(now - run.started)
            elif job.last_event is not None and event.token_ids:
                gap = (now - job.last_event) / len(event.token_ids)
                for _ in event.token_ids:
                    run.metrics.itl.labels(run.model).observe(gap)
            job.last_event = now
            if run.prompt_text is not None:
                job.pieces.append(event.text)
            yield job, event
    finally:
        run.close()


async def _events(engine: Engine, jobs: Sequence[_Job]) -> AsyncIterator[tuple[_Job, TokenEvent]]:
    try:
        if len(jobs) == 1:  # the common case: no tasks, no queue
            job = jobs[0]
            async for event in engine.generate(job.prompt_ids, job.spec, job.request_id):
                yield job, event
            return
        queue: asyncio.Queue[tuple[_Job, TokenEvent | BaseException | None]] = asyncio.Queue()

        async def pump(job: _Job) -> None:
            try:
                async for event in engine.generate(job.prompt_ids, job.spec, job.request_id):
                    queue.put_nowait((job, event))
                queue.put_nowait((job, None))
            except Exception as e:  # handed to the consumer, which re-raises it
                queue.put_nowait((job, e))

        tasks = [asyncio.create_task(pump(job)) for job in jobs]
        try:
            running = len(jobs)
            while running:
                job, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield job, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        unfinished = [job.request_id for job in jobs if job.finish_reason is None]
        for request_id in unfinished:
            await engine.abort(request_id)


def _track(job: _Job, event: TokenEvent) -> None:
    job.tokens += len(event.token_ids)
    if event.cached_tokens is not None and job.cached_tokens is None:
        job.cached_tokens = event.cached_tokens
    if event.logprobs:
        job.logprobs.extend(event.logprobs)
    if event.finish_reason is not None:
        job.finish_reason = event.finish_reason


def _max_tokens(prompt_len: int, requested: int | None, limit: int, default: int | None, what: str) -> int:
    if prompt_len >= limit:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {limit} tokens. However, your {what} "
            f"resulted in {prompt_len} tokens. Please reduce the length of the {what}.",
            param="messages" if what == "messages" else "prompt",
        )
    room = limit - prompt_len
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the {what}, {requested} in the "
            f"completion). Please reduce the length of the {what} or completion.",
            param="max_tokens",
        )
    return requested


def _check_max_tokens(request: Request, requested: int | None, param: str) -> int | None:
    cap = request.app.state.server.settings.max_tokens_limit
    if requested is not None and cap is not None and requested > cap:
        raise InvalidRequest(f"Invalid value for '{param}': this server generates at most {cap} tokens "
                             "per request.", param=param)
    return requested


def _default_max_tokens(request: Request, default: int | None) -> int | None:
    """A request that names no max_tokens gets the route's default, within --max-tokens-limit."""
    cap = request.app.state.server.settings.max_tokens_limit
    if cap is None:
        return default
    return cap if default is None else min(default, cap)


def _check_logprobs(request: Request, wanted: int | None, param: str) -> None:
    # checked before a stream starts: the engine would refuse it only after the 200 went out
    limit = request.app.state.server.settings.max_logprobs
    if wanted is not None and wanted > limit:
        raise InvalidRequest(f"Invalid value for '{param}': this server allows at most {limit}.", param=param)


def _spec(body: _SamplingFields, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None) -> SamplingSpec:
    return SamplingSpec(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        seed=body.seed,
        min_tokens=min(body.min_tokens or 0, max_tokens),
        stop=tuple(body.stop_list()),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


def _jobs(prompts: list[tuple[list[int], str]], n: int, spec: SamplingSpec, base_id: str) -> list[_Job]:
    """One job per prompt x n; with a seed, choice i uses seed + i so choices differ yet repeat."""
    jobs: list[_Job] = []
    for p, (ids, text) in enumerate(prompts):
        for i in range(n):
            index = p * n + i
            s = spec if spec.seed is None or index == 0 else replace(spec, seed=spec.seed + index)
            jobs.append(_Job(index, ids, s, f"{base_id}-{index}", prompt_text=text))
    return jobs


def _usage(jobs: Sequence[_Job]) -> Usage:
    # a prompt is counted once however many choices it has, as OpenAI bills it: by its first choice
    firsts: dict[int, _Job] = {}
    for j in jobs:
        firsts.setdefault(id(j.prompt_ids), j)
    prompt = sum(len(j.prompt_ids) for j in firsts.values())
    completion = sum(j.tokens for j in jobs)
    cached = [j.cached_tokens for j in firsts.values()]
    details = None if None in cached else PromptTokensDetails(cached_tokens=sum(c or 0 for c in cached))
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
        prompt_tokens_details=details,
    )


def _dump(model: BaseModel) -> str:
    return model.model_dump_json()


def _envelope(served: Served, request_id: str) -> dict[str, Any]:
    """The fields every response object and chunk of one request shares."""
    return {"id": request_id, "created": int(time.time()), "model": served.name, "system_fingerprint": served.fingerprint}


# --------------------------------------------------------------------------- chat


def _chat_logprobs(tok: Tokenizer, items: Sequence[TokenLogprobs]) -> ChoiceLogprobs:
    content = []
    for lp in items:
        if lp.token_id in tok.special_ids:  # e.g. end-of-turn: generated, but not in the text
            continue
        top = [
            TopLogprob(token=tok.token_text(t), logprob=v, bytes=list(tok.token_bytes(t)))
            for t, v in lp.top.items()
        ]
        content.append(
            TokenLogprob(
                token=tok.token_text(lp.token_id),
                logprob=lp.logprob,
                bytes=list(tok.token_bytes(lp.token_id)),
                top_logprobs=top,
            )
        )
    return ChoiceLogprobs(content=content)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request) -> Response:
    body = await _parse(request, ChatCompletionRequest)
    served, entry = await _resolve(request, body.model, body.user)
    messages = []
    for m in body.messages:
        # "developer" is OpenAI's newer name for the system role; templates know "system"
        msg = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name is not None:
            msg["name"] = m.name
        messages.append(msg)
    cap = request.app.state.server.settings.max_messages
    if len(messages) > cap:
        raise InvalidRequest(f"Too many messages: {len(messages)}; this server takes at most {cap}.", param="messages")
    prompt_ids = served.tokenizer.chat_prompt(messages)
    limit = served.engine.info.max_model_len
    requested = _check_max_tokens(request, body.requested_max_tokens(), "max_completion_tokens"
                                  if body.max_completion_tokens is not None else "max_tokens")
    max_tokens = _max_tokens(len(prompt_ids), requested, limit, _default_max_tokens(request, None), "messages")
    top = (body.top_logprobs or 0) if body.logprobs else None
    _check_logprobs(request, top, "top_logprobs")
    spec = _spec(body, max_tokens, top, None)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    jobs = _jobs([(prompt_ids, "")], body.n or 1, spec, rid)
    head = _envelope(served, rid)
    run = await _admit(request, served, entry, jobs, "/v1/chat/completions", max_tokens, lambda: json.dumps(messages))
    if body.stream:
        return sse.stream(_chat_stream(served, body, head, run), on_close=run.close)
    try:
        return await _unless_disconnected(request, _chat_full(served, body, head, run))
    finally:
        run.close()


async def _chat_full(served: Served, body: ChatCompletionRequest, head: dict[str, Any], run: _Run) -> Response:
    jobs = run.jobs
    texts = [""] * len(jobs)
    async for job, event in _generate_all(run):
        texts[job.index] += event.text
        _track(job, event)
    choices = [
        ChatChoice(
            index=job.index,
            message=AssistantMessage(content=texts[job.index]),
            logprobs=_chat_logprobs(served.tokenizer, job.logprobs) if body.logprobs else None,
            finish_reason=job.finish_reason,  # type: ignore[arg-type]
        )
        for job in jobs
    ]
    result = ChatCompletion(**head, choices=choices, usage=_usage(jobs))
    return Response(_dump(result), media_type="application/json")


async def _chat_stream(
    served: Served, body: ChatCompletionRequest, head: dict[str, Any], run: _Run
) -> AsyncIterator[str]:
    jobs = run.jobs

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return _dump(ChatCompletionChunk(**head, choices=choices, usage=usage))

    for job in jobs:
        yield chunk([ChatChunkChoice(index=job.index, delta=Delta(role="assistant", content=""))])
    async for job, event in _generate_all(run):
        _track(job, event)
        logprobs = _chat_logprobs(served.tokenizer, event.logprobs) if body.logprobs and event.logprobs else None
        if event.text or logprobs is not None:
            yield chunk([ChatChunkChoice(index=job.index, delta=Delta(content=event.text), logprobs=logprobs)])
        if event.finish_reason is not None:
            yield chunk([ChatChunkChoice(index=job.index, delta=Delta(), finish_reason=event.finish_reason)])  # type: ignore[arg-type]
    if body.include_usage:
        yield chunk([], _usage(jobs))


# --------------------------------------------------------------------------- completions


def _completion_logprobs(
    tok: Tokenizer, items: Sequence[TokenLogprobs | None], offset: int
) -> CompletionLogprobs:
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for lp in items:
        if lp is None or lp.token_id in tok.special_ids:  # not part of the text
            continue
        text = tok.token_text(lp.token_id)
        tokens.append(text)
        token_lps.append(lp.logprob)
        tops.append({tok.token_text(t): v for t, v in lp.top.items()})
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_lps, top_logprobs=tops, text_offset=offsets)


def _echo_logprobs(tok: Tokenizer, job: _Job, prompt_lps: Sequence[TokenLogprobs | None]) -> CompletionLogprobs:
    """Prompt tokens' logprobs for `echo`; the first token has none, so OpenAI sends null."""
    out = _completion_logprobs(tok, prompt_lps, 0)
    if prompt_lps and prompt_lps[0] is None and job.prompt_ids:
        first = tok.token_text(job.prompt_ids[0])
        out.tokens.insert(0, first)
        out.token_logprobs.insert(0, None)
        out.top_logprobs.insert(0, None)
        out.text_offset = [0] + [o + len(first) for o in out.text_offset]
    return out


def _merge_logprobs(a: CompletionLogprobs | None, b: CompletionLogprobs) -> CompletionLogprobs:
    if a is None:
        return b
    return CompletionLogprobs(
        tokens=a.tokens + b.tokens,
        token_logprobs=a.token_logprobs + b.token_logprobs,
        top_logprobs=a.top_logprobs + b.top_logprobs,
        text_offset=a.text_offset + b.text_offset,
    )


@router.post("/v1/completions", response_model=None)
async def completions(request: Request) -> Response:
    body = await _parse(request, CompletionRequest)
    served, entry = await _resolve(request, body.model, body.user)
    tok = served.tokenizer
    prompts: list[tuple[list[int], str]] = []
    vocab = len(tok.hf)
    for p in body.prompts():
        if isinstance(p, str):
            prompts.append((tok.encode(p), p))
        else:
            if any(t < 0 or t >= vocab for t in p):
                raise InvalidRequest(f"Invalid value for 'prompt': token ids must be in [0, {vocab}).", param="prompt")
            prompts.append((list(p), tok.decode(p)))
    limit = served.engine.info.max_model_len
    requested = _check_max_tokens(request, body.max_tokens, "max_tokens")
    default = _default_max_tokens(request, COMPLETIONS_DEFAULT_MAX_TOKENS)
    max_tokens = min(_max_tokens(len(ids), requested, limit, default, "prompt") for ids, _ in prompts)
    _check_logprobs(request, body.logprobs, "logprobs")
    echo_lps = body.logprobs if body.echo and body.logprobs is not None else None
    spec = _spec(body, max_tokens, body.logprobs, echo_lps)
    rid = f"cmpl-{uuid.uuid4().hex}"
    jobs = _jobs(prompts, body.n or 1, spec, rid)
    head = _envelope(served, rid)
    run = await _admit(request, served, entry, jobs, "/v1/completions", max_tokens,
                       lambda: prompts[0][1] if len(prompts) == 1 else json.dumps([text for _, text in prompts]))
    if body.stream:
        return sse.stream(_completion_stream(served, body, head, run), on_close=run.close)
    try:
        return await _unless_disconnected(request, _completion_full(served, body, head, run))
    finally:
        run.close()


def _completion_piece(
    served: Served, body: CompletionRequest, job: _Job, event: TokenEvent, offset: int
) -> tuple[str, CompletionLogprobs | None]:
    """Text and logprobs one event adds to a choice, echoing the prompt on its first event."""
    text = event.text
    logprobs: CompletionLogprobs | None = None
    if body.echo and not job.echoed:
        job.echoed = True
        text = job.prompt_text + text
        if body.logprobs is not None and event.prompt_logprobs is not None:
            logprobs = _echo_logprobs(served.tokenizer, job, event.prompt_logprobs)
        offset += len(job.prompt_text)
    if body.logprobs is not None and event.logprobs:
        logprobs = _merge_logprobs(logprobs, _completion_logprobs(served.tokenizer, event.logprobs, offset))
    return text, logprobs


async def _completion_full(served: Served, body: CompletionRequest, head: dict[str, Any], run: _Run) -> Response:
    jobs = run.jobs
    texts = [""] * len(jobs)
    lps: list[CompletionLogprobs | None] = [None] * len(jobs)
    async for job, event in _generate_all(run):
        _track(job, event)
        text, logprobs = _completion_piece(served, body, job, event, len(texts[job.index]))
        texts[job.index] += text
        if logprobs is not None:
            lps[job.index] = _merge_logprobs(lps[job.index], logprobs)
    choices = [
        CompletionChoice(
            index=job.index,
            text=texts[job.index],
            logprobs=lps[job.index] if body.logprobs is not None else None,
            finish_reason=job.finish_reason,  # type: ignore[arg-type]
        )
        for job in jobs
    ]
    result = Completion(**head, choices=choices, usage=_usage(jobs))
    return Response(_dump(result), media_type="application/json")


async def _completion_stream(
    served: Served, body: CompletionRequest, head: dict[str, Any], run: _Run
) -> AsyncIterator[str]:
    jobs = run.jobs

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return _dump(Completion(**head, choices=choices, usage=usage))

    sent = [0] * len(jobs)  # characters sent per choice, for text_offset
    async for job, event in _generate_all(run):
        _track(job, event)
        text, logprobs = _completion_piece(served, body, job, event, sent[job.index])
        sent[job.index] += len(text)
        if text or logprobs is not None:
            yield chunk([CompletionChoice(index=job.index, text=text, logprobs=logprobs, finish_reason=None)])
        if event.finish_reason is not None:
            yield chunk([CompletionChoice(index=job.index, text="", finish_reason=event.finish_reason)])  # type: ignore[arg-type]
    if body.include_usage:
        yield chunk([], _usage(jobs))


# --------------------------------------------------------------------------- models, probes


def _card(entry: Entry) -> ModelCard:
    served = entry.served
    return ModelCard(
        id=entry.name,
        created=served.created if served else int(entry.since),
        owned_by="llm-service",
        engine=entry.engine,
        max_model_len=served.engine.info.max_model_len if served else None,
        root=served.path if served else None,
        state=entry.state,
    )


def _cards(request: Request) -> list[ModelCard]:
    """Every name a request may use now: models that are ready, loading, or lazy (their first
    request loads them), and the aliases with a usable variant. Failed and unloading models are
    left out: a request for them would fail."""
    state = request.app.state.server
    registry = state.registry
    cards = [_card(e) for e in registry.entries.values() if e.usable]
    for alias in registry.aliases.values():
        if registry.usable_variants(alias):
            cards.append(ModelCard(id=alias.name, created=state.started, owned_by="llm-service", variants=alias.describe()))
    return cards


@router.get("/v1/models", response_model=None)
async def list_models(request: Request) -> Response:
    return Response(_dump(ModelList(data=_cards(request))), media_type="application/json")


@router.get("/v1/models/{model_id:path}", response_model=None)
async def get_model(model_id: str, request: Request) -> Response:
    for card in _cards(request):
        if card.id == model_id:
            return Response(_dump(card), media_type="application/json")
    raise ModelNotFound(model_id)


async def _readiness(request: Request) -> JSONResponse:
    """Ready when every preloaded model is; a lazy model's state is reported, not required. An
    engine found dead marks its model failed (and, for a preloaded one, the server not ready)."""
    state = request.app.state.server
    registry = state.registry
    for entry in registry.ready():
        try:
            await entry.served.engine.check_health()
        except Exception as e:  # the engine died: report it, the process stays up for probes
            entry.set("failed", f"the inference engine died: {e!r}")
            entry.served = None
            if entry.spec.preload:
                state.fail(f"the inference engine of {entry.name} died: {e!r}")
    entries = list(registry.entries.values())
    first = entries[0] if entries else None
    body: dict[str, Any] = {
        "status": state.status,
        "model": first.name if first else None,
        "engine": first.engine if first else None,
        "models": {e.name: e.state for e in entries},
    }
    if state.status == "ready":
        body["running_requests"] = sum([await e.served.engine.num_active_requests() for e in registry.ready()])
        return JSONResponse(body, status_code=200)
    body["detail"] = state.unavailable_reason()
    return JSONResponse(body, status_code=503)


def _when(value: str | None, default: datetime, param: str) -> datetime:
    """Unix seconds or ISO 8601 (UTC when no zone is given), as naive UTC."""
    if value is None:
        return default
    try:
        when = datetime.fromtimestamp(float(value), tz=timezone.utc)
    except ValueError:
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidRequest(f"Invalid value for '{param}': give unix seconds or an ISO 8601 time.",
                                 param=param) from None
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc).replace(tzinfo=None)
    return when


@router.get("/v1/usage")
async def usage(request: Request, start: str | None = None, end: str | None = None) -> dict[str, Any]:
    """Requests and tokens per key and model over [start, end) (default: the last 24 hours).
    Needs an admin key when keys are configured."""
    state = request.app.state.server
    state.keys.require_admin(getattr(request.state, "key", None), "GET /v1/usage")
    now = utcnow()
    t0, t1 = _when(start, now - timedelta(days=1), "start"), _when(end, now + timedelta(seconds=1), "end")
    if t1 <= t0:
        raise InvalidRequest("'end' must be after 'start'.", param="end")
    log = state.request_log
    await asyncio.to_thread(log.wait_written, 2.0)  # include the requests that just ended
    data = await asyncio.to_thread(log.usage, t0, t1)
    return {"object": "usage", "start": t0.isoformat() + "Z", "end": t1.isoformat() + "Z", "data": data}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text format; the gauges that are not event-driven are read now."""
    from prometheus_client import CONTENT_TYPE_LATEST

    state = request.app.state.server
    m = state.metrics
    state.registry.refresh_gauges()
    if state.request_log is not None:
        m.log_backlog.set(state.request_log.backlog())
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 when the model is loaded and the engine is alive; 503 while loading, after failure."""
    return await _readiness(request)


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Kubernetes readiness: same answer as /health."""
    return await _readiness(request)


@router.get("/live")
async def live() -> dict[str, str]:
    """Kubernetes liveness: the process answers HTTP (a loading model is still alive)."""
    return {"status": "alive"}


@router.get("/")
async def root(request: Request) -> dict[str, Any]:
    state = request.app.state.server
    return {
        "name": "llm-service",
        "version": __version__,
        "description": "OpenAI-compatible LLM inference server. Point the openai SDK at base_url=<this server>/v1.",
        "model": next(iter(state.registry.entries), None),
        "models": list(state.registry.entries),
        "status": state.status,
        "docs": "/docs",
        "openapi": "/openapi.json",
        "routes": [
            "POST /v1/chat/completions",
            "POST /v1/completions",
            "GET /v1/models",
            "GET /v1/models/{model}",
            "GET /v1/usage (admin)",
            "GET|POST /v1/admin/models (admin)",
            "GET|DELETE /v1/admin/models/{model} (admin)",
            "GET /v1/admin/system (admin)",
            "GET /health",
            "GET /ready",
            "GET /live",
        ],
    }

