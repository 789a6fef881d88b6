"""`/v1/responses`: OpenAI's Responses API over the chat pipeline, with stored responses.

    POST   /v1/responses                      create (stream, background, previous_response_id, conversation)
    GET    /v1/responses/{id}                 a stored response (?stream=true&starting_after=N replays a
                                              background one's events)
    DELETE /v1/responses/{id}
    GET    /v1/responses/{id}/input_items
    POST   /v1/responses/{id}/cancel          a background response

A request becomes chat messages (its `instructions`, the stored chain or conversation before it,
its input items) and runs as a chat generation (`chat.start`: the same checks, limits, queue,
grammar for tools and `text.format`). One builder (`Output`) turns the run's text into output
items and OpenAI's stream events, whether they are streamed, kept for a background response's
replay, or only assembled into the final object.

Stored responses live in the database (`store.Stored`), written when the response starts and
when it ends; a database that cannot take them is a 503 before any token is generated (or an
`error` event at the end of a stream), never a silently lost record. Background responses run
in a task that outlives the request; a restart marks unfinished ones failed (`app.py`).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import sqlalchemy as sa
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import Request as StarletteRequest

from server import gate, pipeline, sse
from server.api import chat
from server.errors import (
    APIError,
    Conflict,
    ContextLengthExceeded,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
)
from server.gate import access
from server.protocol.chat import ChatCompletionRequest
from server.protocol.responses import CreateResponse, ResponseDeleted, new_id
from server.store import ChainTooLong, MissingAncestor, Stored, StoredResponse, Viewer, utcnow

log = logging.getLogger(__name__)
router = APIRouter()
ROUTE = "/v1/responses"
# a stream's last event (a cancelled response's stream just ends: OpenAI has no event for it)
FINAL_EVENTS = ("response.completed", "response.incomplete", "response.failed", "error")
T = TypeVar("T")


# --------------------------------------------------------------------------- the store, seen from a request


def viewer(request: Request) -> Viewer:
    """Whose stored objects a request sees: its key's own; an admin key's or, without keys, all."""
    key = access(request).key
    if key is None:
        return Viewer(None, all=True)
    return Viewer(key.name, all=key.admin)


def check_storage(request: Request, what: str) -> None:
    if not request.app.state.server.settings.store_responses:
        raise InvalidRequest(f"{what} needs stored responses, and this server keeps none (--store-responses off).",
                             code="storage_disabled")


async def stored(request: Request, work: Callable[[], T]) -> T:
    """A call on the store, off the event loop; a database that fails is a 503 that says so."""
    state = request.app.state.server
    try:
        return await asyncio.to_thread(work)
    except (sa.exc.SQLAlchemyError, OSError) as e:
        state.metrics.log_errors.inc()
        log.error("response store: %s: %s", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        raise ServiceUnavailable("The server's database is unavailable, so nothing could be stored or read; "
                                 "retry shortly (a response can be sent with 'store': false).") from None


# --------------------------------------------------------------------------- a response as it is built


@dataclass
class Live:
    """A response being generated: its object (as sent and stored), its input, and its events."""

    obj: dict[str, Any]
    input: list[dict[str, Any]]
    owner: str | None
    runner: str | None
    keep_events: bool  # a background response keeps its events for replay (GET ?stream=true)
    created: Any = field(default_factory=utcnow)
    seq: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    closed: bool = False  # its last event is out (followers stop there)
    versions: int = 0  # of the object, as handed to the store
    written: int = 0  # the newest version the store holds
    writing: threading.Lock = field(default_factory=threading.Lock)

    @property
    def id(self) -> str:
        return str(self.obj["id"])

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        e = {"type": kind, **fields, "sequence_number": self.seq}
        self.seq += 1
        if self.keep_events:
            self.events.append(e)
            self._wake()
        if kind in FINAL_EVENTS:
            self.close()
        return e

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        old, self.changed = self.changed, asyncio.Event()
        old.set()

    def snapshot(self) -> dict[str, Any]:
        return copy.deepcopy(self.obj)

    def put(self, store: Stored | None) -> Callable[[], None]:
        """The store's write of the object as it is now, for a worker thread. A cancel leaves a write
        running in its thread, so a later one can finish first: an older version never lands on a newer."""
        record = self.record()
        self.versions += 1
        version = self.versions

        def write() -> None:
            with self.writing:
                if version > self.written:
                    assert store is not None  # callers check storage first
                    store.put_response(record)
                    self.written = version

        return write

    def record(self) -> StoredResponse:
        conversation = self.obj.get("conversation")
        return StoredResponse(
            id=self.id, owner=self.owner, created=self.created, status=self.obj["status"],
            background=bool(self.obj["background"]), input=self.input, response=self.obj,
            previous_response_id=self.obj.get("previous_response_id"),
            conversation_id=conversation["id"] if conversation else None, runner=self.runner,
            events=self.events if self.keep_events else None)

    async def follow(self, after: int) -> AsyncIterator[dict[str, Any]]:
        """Its events after sequence number `after`, then each new one until it ends."""
        i = after + 1
        while True:
            while i < len(self.events):
                yield self.events[i]
                i += 1
            if self.closed:
                return
            await self.changed.wait()


def response_object(body: CreateResponse, rid: str, status: str, store: bool) -> dict[str, Any]:
    """The response as OpenAI's schema has it, before any output."""
    text_format = body.text.format if body.text is not None and body.text.format is not None else None
    return {
        "id": rid, "object": "response", "created_at": int(time.time()), "status": status,
        "background": bool(body.background), "error": None, "incomplete_details": None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": body.model,
        "output": [], "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "conversation": {"id": body.conversation_id} if body.conversation_id else None,
        "reasoning": {"effort": None, "summary": None},
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p, "top_logprobs": body.top_logprobs or 0,
        "tool_choice": (body.tool_choice.model_dump() if body.tool_choice is not None and
                        not isinstance(body.tool_choice, str) else body.tool_choice or "auto"),
        "tools": [{"type": "function", "name": t.name, "description": t.description,
                   "parameters": t.parameters, "strict": t.strict} for t in body.tools or []],
        "text": {"format": (text_format.model_dump(by_alias=True, exclude_none=True)
                            if text_format is not None else {"type": "text"}),
                 **({"verbosity": body.text.verbosity} if body.text is not None and body.text.verbosity else {})},
        "truncation": body.truncation or "disabled", "usage": None, "user": body.user,
        "safety_identifier": body.safety_identifier, "prompt_cache_key": body.prompt_cache_key,
        "metadata": body.metadata or {}, "store": store, "service_tier": "default", "completed_at": None,
    }


class Output:
    """Text and tool calls in, output items and their stream events out, in OpenAI's order:
    an item is added, its part added, deltas, then text/arguments done, part done, item done."""

    def __init__(self, live: Live) -> None:
        self.live = live
        self.items: list[dict[str, Any]] = live.obj["output"]
        self.message: dict[str, Any] | None = None  # the open message item
        self.calls: dict[int, dict[str, Any]] = {}  # parser call index -> its open item
        self.held = ""  # whitespace before a message opens: content only if text follows

    def text(self, delta: str, logprobs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.message is None:
            if not delta.strip() and not logprobs:
                self.held += delta
                return out
            delta, self.held = self.held + delta, ""
            out += self._close_calls()
            item: dict[str, Any] = {"id": new_id("msg"), "type": "message", "role": "assistant",
                                    "status": "in_progress", "content": []}
            self.items.append(item)
            self.message = item
            out.append(self._event("response.output_item.added", item=copy.deepcopy(item)))
            first: dict[str, Any] = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            item["content"].append(first)
            out.append(self._event("response.content_part.added", item_id=item["id"], content_index=0,
                                   part=copy.deepcopy(first)))
        part: dict[str, Any] = self.message["content"][0]
        part["text"] += delta
        part["logprobs"] += logprobs or []
        out.append(self._event("response.output_text.delta", item_id=self.message["id"], content_index=0,
                               delta=delta, logprobs=logprobs or []))
        return out

    def call(self, index: int, call_id: str, name: str) -> list[dict[str, Any]]:
        out = self._close_message("completed")
        self.held = ""
        item = {"id": new_id("fc"), "type": "function_call", "call_id": call_id, "name": name, "arguments": "",
                "status": "in_progress"}
        self.items.append(item)
        self.calls[index] = item
        out.append(self._event("response.output_item.added", item=copy.deepcopy(item)))
        return out

    def arguments(self, index: int, delta: str) -> list[dict[str, Any]]:
        item = self.calls[index]
        item["arguments"] += delta
        return [self._event("response.function_call_arguments.delta", item_id=item["id"], delta=delta)]

    def end(self, complete: set[int], status: str) -> list[dict[str, Any]]:
        """Close what is open: calls the grammar finished are completed, others incomplete."""
        return self._close_message(status) + self._close_calls(complete)

    def _close_message(self, status: str) -> list[dict[str, Any]]:
        item, self.message = self.message, None
        if item is None:
            return []
        part = item["content"][0]
        item["status"] = status
        return [self._event("response.output_text.done", item_id=item["id"], content_index=0, text=part["text"],
                            logprobs=part["logprobs"]),
                self._event("response.content_part.done", item_id=item["id"], content_index=0,
                            part=copy.deepcopy(part)),
                self._event("response.output_item.done", item=copy.deepcopy(item))]

    def _close_calls(self, complete: set[int] | None = None) -> list[dict[str, Any]]:
        out = []
        for index, item in self.calls.items():
            item["status"] = "completed" if complete is None or index in complete else "incomplete"
            out += [self._event("response.function_call_arguments.done", item_id=item["id"], name=item["name"],
                                arguments=item["arguments"]),
                    self._event("response.output_item.done", item=copy.deepcopy(item))]
        self.calls = {}
        return out

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        item = fields.get("item")
        target = item["id"] if item is not None else fields["item_id"]
        index = next(i for i, it in enumerate(self.items) if it["id"] == target)
        return self.live.event(kind, output_index=index, **fields)


# --------------------------------------------------------------------------- input -> chat


def to_messages(instructions: str | None, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored items as chat messages: a function_call joins the assistant turn before it (or
    opens one), a function_call_output is a tool message."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    for item in items:
        kind = item["type"]
        if kind == "message":
            text = "".join(p.get("text") or p.get("refusal") or "" for p in item["content"])
            messages.append({"role": item["role"], "content": text})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return messages


def check_outputs(items: list[dict[str, Any]]) -> None:
    """As OpenAI: a function_call_output answers a function_call made before it."""
    called: set[str] = set()
    for item in items:
        if item["type"] == "function_call":
            called.add(item["call_id"])
        elif item["type"] == "function_call_output" and item["call_id"] not in called:
            raise InvalidRequest(f"No tool call found for function call output with call_id "
                                 f"{str(item['call_id'])[:64]!r}.", param="input")


def chat_request(body: CreateResponse, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
    text_format = body.text.format if body.text is not None else None
    response_format = None
    if text_format is not None and text_format.type != "text":
        response_format = ({"type": "json_object"} if text_format.type == "json_object" else
                           {"type": "json_schema", "json_schema": {"name": text_format.name,
                                                                   "schema": text_format.schema_}})
    fields: dict[str, Any] = {
        "model": body.model, "messages": messages, "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature, "top_p": body.top_p, "user": body.user, "metadata": body.metadata,
        "safety_identifier": body.safety_identifier, "response_format": response_format,
        "tools": [t.chat().model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
        "tool_choice": ({"type": "function", "function": {"name": body.tool_choice.name}}
                        if body.tool_choice is not None and not isinstance(body.tool_choice, str) else body.tool_choice),
        "parallel_tool_calls": body.parallel_tool_calls,
        "logprobs": True if body.logprobs else None, "top_logprobs": body.top_logprobs if body.logprobs else None,
        **{name: getattr(body, name) for name in body.SAMPLING},
    }
    if body.structured_outputs is not None:
        fields["structured_outputs"] = body.structured_outputs.model_dump(by_alias=True, exclude_none=True)
    return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})


async def begin(request: Request, body: CreateResponse, history: list[dict[str, Any]],
                items: list[dict[str, Any]], rid: str) -> chat.Started:
    """Admit the generation; with `truncation: auto`, the oldest items go until the rest fits."""
    context = history + items
    while True:
        try:
            return await chat.start(request, chat_request(body, to_messages(body.instructions, context)), ROUTE, rid,
                                    prompt_param="input")
        except ContextLengthExceeded:
            if body.truncation != "auto" or len(context) <= 1:
                raise
            context = context[1:]
            while len(context) > 1 and context[0]["type"] == "function_call_output":  # its call is gone
                context = context[1:]


async def generate(request: Request, live: Live, started: chat.Started, logprobs: bool) -> AsyncIterator[dict[str, Any]]:
    """Run the admitted generation into `live`, yielding its events; the final object is stored
    (when it is to be) before the final event."""
    obj, run = live.obj, started.run
    obj["model"] = started.target.served.name
    obj["status"] = "in_progress"
    yield live.event("response.in_progress", response=live.snapshot())
    parser = started.parser() if started.tool_names is not None else None
    output = Output(live)
    tok = started.target.tokenizer
    status = "failed"
    try:
        async for _, event in run.events():
            if parser is None:
                lps = ([lp.model_dump() for lp in chat._logprobs(tok, event.logprobs, False).content or []]
                       if logprobs and event.logprobs else None)
                for e in output.text(event.text, lps) if event.text or lps else []:
                    yield e
                continue
            for piece in parser.feed(event.text) + (parser.end() if event.finish_reason is not None else []):
                call = piece.call
                if piece.kind == "content":
                    events = output.text(piece.text)
                elif call is not None and piece.kind == "call":
                    events = output.call(call.index, call.id, call.name)
                else:
                    assert call is not None
                    events = output.arguments(call.index, piece.text)
                for e in events:
                    yield e
        finish = run.jobs[0].finish_reason
        status = "incomplete" if finish == "length" else "completed"
        complete = {c.index for c in parser.complete_calls} if parser is not None else set()
        if parser is not None:
            access(request).tool_calls = (access(request).tool_calls or 0) + len(parser.calls)
        for e in output.end(complete, "incomplete" if status == "incomplete" else "completed"):
            yield e
        obj["incomplete_details"] = {"reason": "max_output_tokens"} if status == "incomplete" else None
    except (asyncio.CancelledError, GeneratorExit):  # the client left, or a background response was cancelled
        status = "cancelled"
        output.end(set(), "incomplete")
        raise
    except Exception as e:
        message = e.message if isinstance(e, APIError) else f"{type(e).__name__}: {e}"
        log.error("response %s failed: %s", live.id, message)
        obj["error"] = {"code": "server_error", "message": message}
        output.end(set(), "incomplete")
    finally:
        used = run.usage()
        obj["usage"] = {"input_tokens": used.prompt_tokens,
                        "input_tokens_details": {"cached_tokens": used.cached_tokens or 0, "cache_write_tokens": 0},
                        "output_tokens": used.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                        "total_tokens": used.total_tokens}
        obj["status"] = status
        obj["completed_at"] = int(time.time()) if status == "completed" else None
        if status == "cancelled":  # the client left, or a background response was cancelled
            live.close()
            await asyncio.shield(persist(request, live, quiet=True))
    final = f"response.{status}"
    if live.keep_events:  # a background response is stored with its events, the last one too
        last = live.event(final, response=live.snapshot())
        await persist(request, live, quiet=True)
        yield last
        return
    try:
        await persist(request, live)
    except APIError as e:
        yield live.event("error", code="server_error", message=e.message, param=None)
        return
    yield live.event(final, response=live.snapshot())


async def persist(request: Request, live: Live, quiet: bool = False) -> None:
    """Store the final object, and append its items to its conversation (a completed or cut answer)."""
    state = request.app.state.server
    conversation = live.obj.get("conversation")
    try:
        if live.obj["store"]:
            await stored(request, live.put(state.stored))
        if conversation is not None and live.obj["status"] in ("completed", "incomplete"):
            items = [(item["id"], item) for item in live.input + live.obj["output"]]
            # the request could read the conversation when it began (so its key may write it)
            added = await stored(request, lambda: state.stored.add_items(conversation["id"], Viewer(live.owner, all=True),
                                                                          items))
            if not added:
                log.warning("response %s: conversation %s was deleted while it ran; its items are not kept",
                            live.id, conversation["id"])
    except APIError:
        if not quiet:
            raise
        log.error("response %s: its final state could not be stored", live.id)


# --------------------------------------------------------------------------- routes


@router.post(ROUTE, response_model=None)
async def create(request: Request) -> Response:
    body = await pipeline.parse(request, CreateResponse)
    state = request.app.state.server
    settings = state.settings
    who = viewer(request)
    if body.background:
        check_storage(request, "A background response")
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        check_storage(request, "'previous_response_id'")
        history = await _chain(request, body.previous_response_id, who)
    conversation_id = body.conversation_id
    if conversation_id is not None:
        check_storage(request, "'conversation'")
        page = await stored(request, lambda: state.stored.list_items(conversation_id, who, None, None, "asc"))
        if page is None:
            raise NotFound(f"Conversation with id '{conversation_id[:128]}' not found.", param="conversation")
        history = page[0]
    items = body.items()
    if not history and not items:
        raise InvalidRequest("Missing required parameter: 'input'.", param="input")
    check_outputs(history + items)
    keep = body.store is not False and settings.store_responses
    rid = new_id("resp")
    engine_id = f"resp_{body.request_id}" if body.request_id else rid  # vLLM's: names the engine request
    key = access(request).key
    live = Live(response_object(body, rid, "queued" if body.background else "in_progress", keep), items,
                owner=key.name if key is not None else None, runner=state.runner, keep_events=bool(body.background))
    if body.background:
        return await _background(request, body, history, live)
    started = await begin(request, body, history, items, engine_id)
    if keep:  # the database takes it before any token is generated, or the client hears why not
        try:
            await stored(request, live.put(state.stored))
        except BaseException:  # refused, or the client left while it was written: the run's slot is freed
            started.run.close()
            raise
    if body.stream:
        return sse.stream(_named(_streamed(request, body, live, started)), on_close=started.run.close, done=False)

    async def whole() -> Response:
        async for _ in generate(request, live, started, body.logprobs):
            pass
        return send(live.obj)

    return await started.run.finish(request, whole)


async def _streamed(request: Request, body: CreateResponse, live: Live,
                    started: chat.Started) -> AsyncIterator[dict[str, Any]]:
    yield live.event("response.created", response=live.snapshot())
    async for e in generate(request, live, started, body.logprobs):
        yield e


async def _named(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[tuple[str, str]]:
    async for e in events:
        yield e["type"], json.dumps(e, ensure_ascii=False, separators=(",", ":"))


async def _chain(request: Request, previous: str, who: Viewer) -> list[dict[str, Any]]:
    """The items before a response: every earlier response's input and output, oldest first."""
    state = request.app.state.server
    try:
        chain = await stored(request, lambda: state.stored.chain(previous, who))
    except MissingAncestor as e:
        raise NotFound(f"Response '{e.id}', an earlier link of the chain before '{previous[:128]}', no longer exists "
                       "(deleted, or past this server's retention).", param="previous_response_id") from None
    except ChainTooLong as e:
        raise InvalidRequest(f"The chain before '{previous[:128]}' is too long: {e}", param="previous_response_id") from None
    if chain is None:
        raise NotFound(f"Previous response with id '{previous[:128]}' not found.", param="previous_response_id")
    items: list[dict[str, Any]] = []
    for r in chain:
        if r.status not in ("completed", "incomplete"):
            raise InvalidRequest(f"Response '{r.id}' is {r.status}: only a finished response can be continued.",
                                 param="previous_response_id")
        items += r.input + r.response["output"]
    return items


# --------------------------------------------------------------------------- background


def _detached(request: Request) -> Request:
    """The request as the background work sees it: the same app and access record, and a client
    that never leaves (the HTTP request is over; only `cancel` stops the work)."""

    async def never() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    scope = {"type": "http", "app": request.app, "state": {"access": access(request)}, "path": ROUTE,
             "method": "POST", "headers": [], "query_string": b""}
    return StarletteRequest(scope, receive=never)


async def _background(request: Request, body: CreateResponse, history: list[dict[str, Any]], live: Live) -> Response:
    state = request.app.state.server
    await stored(request, live.put(state.stored))
    record = access(request)
    record.deferred = True  # accounted when the work ends
    work = _detached(request)
    state.background[live.id] = live
    live.event("response.created", response=live.snapshot())
    live.event("response.queued", response=live.snapshot())
    live.task = asyncio.create_task(_run_background(work, body, history, live, time.monotonic()))
    if body.stream:
        return sse.stream(_named(live.follow(-1)), done=False)
    return send(live.obj)


async def _run_background(request: Request, body: CreateResponse, history: list[dict[str, Any]], live: Live,
                          began: float) -> None:
    state = request.app.state.server
    status = 200
    started: chat.Started | None = None
    try:
        try:
            started = await begin(request, body, history, live.input,
                                  f"resp_{body.request_id}" if body.request_id else live.id)
        except APIError as e:  # refused once it ran (its model, its limits): the response failed
            status = e.status_code
            live.obj["status"] = "failed"
            live.obj["error"] = {"code": "rate_limit_exceeded" if e.status_code == 429 else "server_error",
                                 "message": e.message}
            live.event("response.failed", response=live.snapshot())
            await persist(request, live, quiet=True)
            return
        live.obj["status"] = "in_progress"  # other instances (and a restart) read it from the store
        await persist(request, live, quiet=True)
        async for _ in generate(request, live, started, body.logprobs):
            pass
    except asyncio.CancelledError:
        status = 499
        if live.obj["status"] in ("queued", "in_progress"):  # cancelled before generate ran (it stores its own end)
            if started is not None:
                started.run.close()  # its admission slot and key limits, held since `begin`
            live.obj["status"] = "cancelled"
            live.close()
            await asyncio.shield(persist(request, live, quiet=True))
        raise
    finally:
        if started is not None:  # cancelled anywhere (even before its events began): its slot and limits go back
            started.run.close()
        state.background.pop(live.id, None)
        live.close()
        gate.account(state, access(request), ROUTE, status, time.monotonic() - began)


# --------------------------------------------------------------------------- stored responses


async def _visible(request: Request, response_id: str) -> StoredResponse:
    state = request.app.state.server
    check_storage(request, "Retrieving a response")
    found = await stored(request, lambda: state.stored.get_response(response_id, viewer(request)))
    if found is None:
        raise NotFound(f"Response with id '{response_id[:128]}' not found.", param="response_id")
    return found


@router.get(ROUTE + "/{response_id}", response_model=None)
async def retrieve(request: Request, response_id: str, stream: bool = False, starting_after: int = -1) -> Response:
    found = await _visible(request, response_id)
    live = request.app.state.server.background.get(response_id)
    if not stream:
        return send(live.obj if live is not None else found.response)
    if not found.background:
        raise InvalidRequest("Only a response created with 'background': true can be streamed on retrieval.",
                             param="stream")
    if live is not None:
        return sse.stream(_named(live.follow(starting_after)), done=False)

    async def replay() -> AsyncIterator[dict[str, Any]]:
        for e in found.events or []:
            if e["sequence_number"] > starting_after:
                yield e

    return sse.stream(_named(replay()), done=False)


@router.delete(ROUTE + "/{response_id}", response_model=None)
async def delete(request: Request, response_id: str) -> Response:
    state = request.app.state.server
    await _visible(request, response_id)
    live = state.background.get(response_id)
    if live is not None and live.task is not None:  # its work stops first, so it cannot write it back
        live.task.cancel()
        await asyncio.gather(live.task, return_exceptions=True)
    await stored(request, lambda: state.stored.delete_response(response_id, viewer(request)))
    return send(ResponseDeleted(id=response_id, deleted=True).model_dump())


@router.post(ROUTE + "/{response_id}/cancel", response_model=None)
async def cancel(request: Request, response_id: str) -> Response:
    state = request.app.state.server
    found = await _visible(request, response_id)
    if not found.background:
        raise InvalidRequest("Only a response created with 'background': true can be cancelled.", param="response_id")
    live = state.background.get(response_id)
    if live is not None and live.task is not None:
        live.task.cancel()
        await asyncio.gather(live.task, return_exceptions=True)
        return send(live.obj)
    if found.status in ("queued", "in_progress"):
        raise Conflict(f"Response '{response_id[:128]}' runs on another server instance ({found.runner}); cancel it "
                       "there.")
    if found.status != "cancelled":
        raise InvalidRequest(f"Response '{response_id[:128]}' is already {found.status}; it cannot be cancelled.",
                             param="response_id")
    return send(found.response)


@router.get(ROUTE + "/{response_id}/input_items", response_model=None)
async def input_items(request: Request, response_id: str, limit: int = 20, after: str | None = None,
                      order: Literal["asc", "desc"] = "desc") -> Response:
    found = await _visible(request, response_id)
    return send(page(found.input, limit, after, order))


def page(items: list[dict[str, Any]], limit: int, after: str | None, order: Literal["asc", "desc"]) -> dict[str, Any]:
    """OpenAI's list page over items in order (`after`: the id the previous page ended with)."""
    if not 1 <= limit <= 100:
        raise InvalidRequest("Invalid value for 'limit': between 1 and 100.", param="limit")
    ordered = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [it["id"] for it in ordered]
        if after not in ids:
            raise InvalidRequest(f"Invalid value for 'after': no item {after[:128]!r} here.", param="after")
        ordered = ordered[ids.index(after) + 1:]
    data = ordered[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(ordered) > limit}


def send(obj: dict[str, Any]) -> Response:
    return JSONResponse(obj)
