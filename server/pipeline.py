"""The one generation pipeline under every API surface.

    body   = await parse(request, ChatCompletionRequest)       # bounded read, validated
    target = await resolve(request, body.model, body.user)      # the model (an alias's variant)
    prompt = await target.render_chat(messages, options)        # template + tokens, off the loop
    run    = await start(request, target, Generation(...))      # check, then admit
    return sse.stream(chunks(run), on_close=run.close)  or  await run.finish(request, build)

A surface (api/chat.py, api/completions.py, ...) parses its wire format into a `Generation` and
renders the `(Job, TokenEvent)` pairs of `run.events()` back into its wire format; everything
else happens here, once: context and caps are checked, the key's limits and the model's queue
admit the request, the engine runs one sequence per job, a client that leaves (or an error
anywhere) aborts every engine request, and the run is accounted exactly once (`Run.close`) in
the metrics and the request's `Access` record, which the gate writes to the request log.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar, cast

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from server import tools
from server.config import Kind
from server.engines.base import Engine, FinishReason, SamplingSpec, TokenEvent, TokenLogprobs
from server.errors import (
    ClientClosedRequest,
    ContextLengthExceeded,
    InvalidRequest,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    ServiceUnavailable,
    invalid_request_from,
)
from server.gate import Access, access
from server.limits import Ticket
from server.metrics import Metrics
from server.registry import Entry, Served
from server.tokenizer import Tokenizer

Body = TypeVar("Body", bound=BaseModel)
T = TypeVar("T")
# the largest seed an engine takes (a 64-bit unsigned integer); choice i of a request uses seed + i
MAX_SEED = 2**63 - 1


# --------------------------------------------------------------------------- parse


async def parse(request: Request, model: type[Body]) -> Body:
    """The body as `model`: read up to --max-request-bytes (413 beyond), validated (400 naming
    the field). A client that leaves while sending it is a 499."""
    limit = request.app.state.server.settings.max_request_bytes
    raw = bytearray()
    try:
        async for part in request.stream():  # counted as it arrives: a body without Content-Length too
            raw += part
            if len(raw) > limit:
                raise PayloadTooLarge(f"The request body is larger than this server's limit of {limit} bytes.")
    except ClientDisconnect:
        raise ClientClosedRequest("The client closed the connection while sending the request.") from None
    if not raw:
        raise InvalidRequest("The request body is empty; it must be a JSON object.")
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise invalid_request_from(e.errors()) from None


# --------------------------------------------------------------------------- resolve + render


@dataclass
class Prompt:
    """One prompt as the engine gets it, and as text (completions `echo`, the request log)."""

    ids: list[int]
    text: str


@dataclass
class Target:
    """The ready model a request goes to, and the request it serves."""

    served: Served
    entry: Entry
    request: Request

    @property
    def tokenizer(self) -> Tokenizer:
        return self.served.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.served.engine.info.max_model_len

    @property
    def tool_format(self) -> tools.ToolFormat:
        """How this model writes tool calls: its setting, else what its chat template shows."""
        fmt = self.entry.settings.tool_call_format
        return tools.detect(self.tokenizer.chat_template_text) if fmt == "auto" else cast(tools.ToolFormat, fmt)

    async def render_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                          continue_final_message: bool = False, add_special_tokens: bool = False,
                          documents: list[dict[str, str]] | None = None,
                          template_kwargs: dict[str, Any] | None = None,
                          tool_list: list[dict[str, Any]] | None = None) -> Prompt:
        """The chat template applied and tokenized, off the event loop (see `off_loop`). Tools
        (and tool turns) go through the template when it knows tools, else through the fallback."""
        template_tools = tool_list or None
        if not tools.knows_tools(self.tokenizer.chat_template_text):
            if tool_list or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
                messages = tools.fallback(messages, tool_list or [])
            template_tools = None
        text = await self.off_loop(lambda: self.tokenizer.render_chat(
            messages, add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
            documents=documents, template_kwargs=template_kwargs, tools=template_tools))
        return await self.encode(text, add_special_tokens, param="messages")

    async def encode(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> Prompt:
        """Tokens of `text`. A text that cannot fit the context is refused before it is
        tokenized, from its length alone, and its refusal counts against the key's limits."""
        at_least = self.tokenizer.min_tokens(text)
        if at_least >= self.max_model_len:
            await _charge(self.request, at_least)
            what = "messages" if param == "messages" else "prompt"
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your {what} "
                f"({len(text)} characters) is at least {at_least} tokens. Please reduce the length of the {what}.",
                param=param)
        return Prompt(await self.off_loop(lambda: self.tokenizer.encode(text, add_special_tokens)), text)

    def token_prompt(self, ids: Sequence[int], param: str = "prompt") -> Prompt:
        vocab = self.tokenizer.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise InvalidRequest(f"Invalid value for '{param}': token ids must be in [0, {vocab}).", param=param)
        return Prompt(list(ids), self.tokenizer.decode(list(ids)))

    async def off_loop(self, work: Callable[[], T]) -> T:
        """Templates and tokenizers run in the server's bounded render pool: the event loop keeps
        answering probes and streams while a long prompt is tokenized, and a burst of them waits
        for a thread instead of taking them all."""
        pool = self.request.app.state.server.render_pool
        return await asyncio.get_running_loop().run_in_executor(pool, work)


async def _charge(request: Request, tokens: int) -> None:
    """A request refused for its size still costs its key: a request, and its tokens."""
    state = request.app.state.server
    await state.key_limits.charge(access(request).key, tokens)


async def resolve(request: Request, model: str, user: str | None, kind: Kind | None = "generate") -> Target:
    """The ready model this request goes to (an alias's variant, sticky per `user`; a lazy model
    loads first, and the request stops waiting if its client leaves); 400 if it is not of the
    `kind` the route serves."""
    state = request.app.state.server
    if state.status in ("stopping", "failed"):
        raise ServiceUnavailable(state.unavailable_reason())
    entry, alias = await state.registry.resolve(model, user, wait=lambda work: unless_disconnected(request, work),
                                                kind=kind)
    served = entry.served
    if served is None:
        raise entry.unavailable()
    record = access(request)
    record.model, record.engine = entry.name, served.engine.info.name
    record.alias = alias.name if alias is not None else None
    return Target(served, entry, request)


# --------------------------------------------------------------------------- check + admit


@dataclass
class Generation:
    """What a surface asks for: `n` sequences for each prompt, all with one sampling spec."""

    route: str
    prompts: list[Prompt]
    spec: SamplingSpec  # its max_tokens and min_tokens are settled by `start`
    n: int = 1
    max_tokens: int | None = None  # as requested (None: as much as fits, within the caps)
    max_tokens_param: str = "max_tokens"
    default_max_tokens: int | None = None  # the route's default when none is requested
    truncate_prompt_tokens: int | None = None  # keep only this many prompt tokens (-1: the context)
    truncation_side: Literal["left", "right"] = "left"
    prompt_param: str = "prompt"  # what a too-long prompt is called in the error
    logprobs_param: str = "logprobs"  # what the number of top logprobs is called on this surface
    log_prompt: Callable[[], str] = lambda: ""  # the prompt for the request log (--log-content)
    metadata: dict[str, str] | None = None  # hints kept in the request log
    safety_identifier: str | None = None


@dataclass
class Job:
    """One sequence to generate: a choice of the response."""

    index: int
    prompt: Prompt
    spec: SamplingSpec
    request_id: str
    tokens: int = 0  # completion tokens produced so far
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None
    cached_tokens: int | None = None  # prompt tokens the engine's prefix cache supplied
    last_event: float | None = None  # when its previous event came (inter-token latency)
    text: list[str] = field(default_factory=list)  # the answer (kept for the request log)

    def track(self, event: TokenEvent) -> None:
        self.tokens += len(event.token_ids)
        self.token_ids.extend(event.token_ids)
        if event.cached_tokens is not None and self.cached_tokens is None:
            self.cached_tokens = event.cached_tokens
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        if event.logprobs:
            self.logprobs.extend(event.logprobs)
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None  # None: the engine does not report prefix-cache hits

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage(jobs: Sequence[Job]) -> Usage:
    # a prompt is counted once however many choices it has, as OpenAI bills it: by its first choice
    firsts: dict[int, Job] = {}
    for j in jobs:
        firsts.setdefault(id(j.prompt), j)
    cached = [j.cached_tokens for j in firsts.values()]
    return Usage(
        prompt_tokens=sum(len(j.prompt.ids) for j in firsts.values()),
        completion_tokens=sum(j.tokens for j in jobs),
        cached_tokens=None if None in cached else sum(c or 0 for c in cached),
    )


@dataclass
class Run:
    """One generation request's hold on the server (admission slots, its key's limits) and its
    measurements. `close` runs exactly once, whether the request finished, failed or was left."""

    engine: Engine
    jobs: list[Job]
    metrics: Metrics
    model: str
    route: str
    ticket: Ticket
    release: Callable[[], None]
    record: Access
    prompt_text: str | None = None  # kept only with --log-content
    started: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    closed: bool = False

    def usage(self) -> Usage:
        return usage(self.jobs)

    async def events(self) -> AsyncIterator[tuple[Job, TokenEvent]]:
        """Events of all jobs as they come (each already tracked on its job); aborts whatever
        has not finished and closes the run when the consumer stops early or fails."""
        try:
            async for job, event in _events(self.engine, self.jobs):
                now = time.monotonic()
                if self.first_token is None:
                    self.first_token = now
                    self.metrics.ttft.labels(self.model).observe(now - self.started)
                elif job.last_event is not None and event.token_ids:
                    gap = (now - job.last_event) / len(event.token_ids)
                    for _ in event.token_ids:
                        self.metrics.itl.labels(self.model).observe(gap)
                job.last_event = now
                job.track(event)
                if self.prompt_text is not None:
                    job.text.append(event.text)
                yield job, event
        finally:
            self.close()

    async def finish(self, request: Request, build: Callable[[], Awaitable[Response]]) -> Response:
        """Run `build` (which consumes `events()`) to the end; a client that leaves first aborts it."""
        try:
            return await unless_disconnected(request, build())
        finally:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.release()
        used = self.usage()
        self.ticket.close(used.total_tokens if self.first_token is not None else None)
        reasons = sorted({j.finish_reason for j in self.jobs if j.finish_reason})
        record = self.record
        record.prompt_tokens, record.completion_tokens = used.prompt_tokens, used.completion_tokens
        record.ttft_ms = (self.first_token - self.started) * 1000 if self.first_token is not None else None
        record.finish_reason = ",".join(reasons) or None
        if self.prompt_text is not None:
            texts = ["".join(j.text) for j in self.jobs]
            record.prompt, record.answer = self.prompt_text, texts[0] if len(texts) == 1 else json.dumps(texts)
        self.metrics.prompt_tokens.labels(self.model).inc(used.prompt_tokens)
        self.metrics.generation_tokens.labels(self.model).inc(used.completion_tokens)
        if self.first_token is not None:
            self.metrics.e2e.labels(self.route, self.model).observe(time.monotonic() - self.started)


async def start(request: Request, target: Target, gen: Generation, request_id: str) -> Run:
    """Check the request against the model and the server's caps (400s, all before anything
    runs or streams), then admit it: the key's limits (429 at once) and a place in the model's
    engine (waits in its bounded queue, ordered by `priority`, or 429 when the queue is full)."""
    state = request.app.state.server
    settings = state.settings
    record = access(request)
    record.metadata = json.dumps(gen.metadata, ensure_ascii=False) if gen.metadata else None
    record.safety_identifier = gen.safety_identifier
    limit = target.max_model_len
    if any(not p.ids for p in gen.prompts):
        raise InvalidRequest(f"Invalid value for '{gen.prompt_param}': the prompt is empty (it has no tokens); "
                             "give at least one token to continue from.", param=gen.prompt_param)
    prompts = [_truncate(p, gen, limit, target.tokenizer) for p in gen.prompts]
    too_long = [len(p.ids) for p in prompts if len(p.ids) >= limit]
    if too_long:
        await _charge(request, sum(too_long))
    requested = gen.max_tokens
    cap = settings.max_tokens_limit
    if requested is not None and cap is not None and requested > cap:
        raise InvalidRequest(f"Invalid value for '{gen.max_tokens_param}': this server generates at most "
                             f"{cap} tokens per request.", param=gen.max_tokens_param)
    default = gen.default_max_tokens
    if cap is not None:
        default = cap if default is None else min(default, cap)
    max_tokens = min(_max_tokens(len(p.ids), requested, limit, default, gen) for p in prompts)
    for wanted, param in ((gen.spec.logprobs, gen.logprobs_param), (gen.spec.prompt_logprobs, "prompt_logprobs")):
        # checked before a stream starts: the engine would refuse it only after the 200 went out
        if wanted is not None and wanted > settings.max_logprobs:
            raise InvalidRequest(f"Invalid value for '{param}': this server allows at most "
                                 f"{settings.max_logprobs}.", param=param)
    vocab = target.tokenizer.vocab_size
    for param, ids in (("stop_token_ids", gen.spec.stop_token_ids), ("allowed_token_ids", gen.spec.allowed_token_ids or ()),
                       ("logit_bias", [t for t, _ in gen.spec.logit_bias])):
        if any(t >= vocab for t in ids):
            raise InvalidRequest(f"Invalid value for '{param}': token ids must be in [0, {vocab}).", param=param)
    spec = replace(gen.spec, max_tokens=max_tokens, min_tokens=min(gen.spec.min_tokens, max_tokens),
                   cache_salt=_cache_salt(record, gen.spec.cache_salt))
    if spec.seed is not None and spec.seed + len(prompts) * gen.n - 1 > MAX_SEED:
        raise InvalidRequest(f"Invalid value for 'seed': with n={gen.n} it must be at most "
                             f"{MAX_SEED - len(prompts) * gen.n + 1}.", param="seed")
    jobs = _jobs(prompts, gen.n, spec, request_id)
    return await _admit(request, target, jobs, gen, max_tokens)


def _cache_salt(record: Access, salt: str | None) -> str | None:
    """With keys configured, every key has its own prefix cache: a request can only hit blocks
    that requests of its own key computed (else the time to first token would tell one tenant
    which prompts another sent). A client's own `cache_salt` divides its key's share further."""
    if record.key is None:
        return salt
    return hashlib.sha256(record.key.digest + (salt or "").encode()).hexdigest()


def _truncate(prompt: Prompt, gen: Generation, limit: int, tok: Tokenizer) -> Prompt:
    keep = gen.truncate_prompt_tokens
    if keep is None or len(prompt.ids) <= keep:
        return prompt
    if keep == -1:
        keep = limit
    if keep > limit:
        raise InvalidRequest(f"Invalid value for 'truncate_prompt_tokens': {keep} is more than the model's "
                             f"context of {limit} tokens.", param="truncate_prompt_tokens")
    if len(prompt.ids) <= keep:
        return prompt
    ids = prompt.ids[-keep:] if gen.truncation_side == "left" else prompt.ids[:keep]
    return Prompt(ids, tok.decode(ids))


def _max_tokens(prompt_len: int, requested: int | None, limit: int, default: int | None, gen: Generation) -> int:
    what = "messages" if gen.prompt_param == "messages" else "prompt"
    if prompt_len >= limit:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {limit} tokens. However, your {what} "
            f"resulted in {prompt_len} tokens. Please reduce the length of the {what}.",
            param=gen.prompt_param,
        )
    room = limit - prompt_len
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the {what}, {requested} in the "
            f"completion). Please reduce the length of the {what} or completion.",
            param=gen.max_tokens_param,
        )
    return requested


def _jobs(prompts: list[Prompt], n: int, spec: SamplingSpec, base_id: str) -> list[Job]:
    """One job per prompt x n; with a seed, choice i uses seed + i so choices differ yet repeat."""
    jobs: list[Job] = []
    for p, prompt in enumerate(prompts):
        for i in range(n):
            index = p * n + i
            s = spec if spec.seed is None or index == 0 else replace(spec, seed=spec.seed + index)
            jobs.append(Job(index, prompt, s, f"{base_id}-{index}"))
    return jobs


@dataclass
class Hold:
    """An admitted request's place: its key's limits (`ticket`) and its model's slots (`release`)."""

    ticket: Ticket
    release: Callable[[], None]


async def hold(request: Request, target: Target, tokens: int, slots: int, priority: int) -> Hold:
    """Admit a request to `target` (every surface's): its key's limits for `tokens` (429 at once),
    then `slots` of its model's engine, waiting in the bounded queue by `priority` (429 when full;
    a batch's line waits behind every interactive request)."""
    state = request.app.state.server
    entry = target.entry
    record = access(request)
    try:
        ticket = await state.key_limits.admit(record.key, tokens)
    except RateLimited as e:
        state.metrics.rejections.labels(e.reason).inc()
        raise
    admission = entry.admission
    if admission is None:
        ticket.close(0)
        raise entry.unavailable()
    queued = time.monotonic()
    granted = False

    async def acquire() -> None:
        nonlocal granted
        await admission.acquire(slots, priority, background=record.batch_id is not None)
        granted = True

    try:
        await unless_disconnected(request, acquire())
        record.queued_ms = (time.monotonic() - queued) * 1000
    except BaseException as e:
        if granted:  # the slots came just as this request was cancelled (a background response's cancel)
            admission.release(slots)
        ticket.close(0)
        if isinstance(e, Overloaded):
            state.metrics.rejections.labels("queue_full").inc()
        raise
    if entry.state != "ready":  # an unload began while it waited: it takes no new work
        admission.release(slots)
        ticket.close(0)
        raise entry.unavailable()
    entry.admitted()

    def release() -> None:
        admission.release(slots)
        entry.touch()  # idle time counts from the end of its last request

    return Hold(ticket, release)


async def _admit(request: Request, target: Target, jobs: list[Job], gen: Generation, max_tokens: int) -> Run:
    state = request.app.state.server
    record = access(request)
    held = await hold(request, target, usage(jobs).prompt_tokens + max_tokens * len(jobs), len(jobs), gen.spec.priority)
    ticket, release = held.ticket, held.release
    served = target.served
    return Run(served.generator(), jobs, state.metrics, served.name, gen.route, ticket, release=release, record=record,
               prompt_text=gen.log_prompt() if state.settings.log_content else None)


# --------------------------------------------------------------------------- run


async def _events(engine: Engine, jobs: Sequence[Job]) -> AsyncIterator[tuple[Job, TokenEvent]]:
    try:
        if len(jobs) == 1:  # the common case: no tasks, no queue
            job = jobs[0]
            async for event in engine.generate(job.prompt.ids, job.spec, job.request_id):
                yield job, event
            return
        queue: asyncio.Queue[tuple[Job, TokenEvent | BaseException | None]] = asyncio.Queue()

        async def pump(job: Job) -> None:
            try:
                async for event in engine.generate(job.prompt.ids, job.spec, job.request_id):
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


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
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
