"""`POST /tokenize` and `POST /detokenize`, as vLLM's server has them at its root (`vllm bench
serve` aligns its prompts with them). Behind the same keys as `/v1/*`; no model runs."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server import pipeline
from server.errors import InvalidRequest
from server.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)

router = APIRouter()


def _model(request: Request, model: str | None) -> str:
    if model is not None:
        return model
    entries = request.app.state.server.registry.entries
    if not entries:
        raise InvalidRequest("This server has no model; name one in 'model'.", param="model")
    return str(next(iter(entries)))


@router.post("/tokenize", response_model=None)
async def tokenize(request: Request) -> Response:
    body = await pipeline.parse(request, TokenizeRequest)
    target = await pipeline.resolve(request, _model(request, body.model), None, kind=None)
    if body.messages is not None:
        continue_final = bool(body.continue_final_message)
        generation = body.add_generation_prompt if body.add_generation_prompt is not None else not continue_final
        prompt = await target.render_chat([m.for_template() for m in body.messages],
                                          add_generation_prompt=generation, continue_final_message=continue_final,
                                          add_special_tokens=bool(body.add_special_tokens),
                                          template_kwargs=body.chat_template_kwargs,
                                          tool_list=[t.model_dump(exclude_none=True) for t in body.tools or []])
    else:
        prompt = await target.encode(body.prompt or "", body.add_special_tokens is not False)
    tok = target.tokenizer
    result = TokenizeResponse(count=len(prompt.ids), max_model_len=target.max_model_len, tokens=prompt.ids,
                              token_strs=[tok.token_text(t) for t in prompt.ids] if body.return_token_strs else None)
    return Response(result.model_dump_json(), media_type="application/json")


@router.post("/detokenize", response_model=None)
async def detokenize(request: Request) -> Response:
    body = await pipeline.parse(request, DetokenizeRequest)
    target = await pipeline.resolve(request, _model(request, body.model), None, kind=None)
    prompt = target.token_prompt(body.tokens, param="tokens")
    return Response(DetokenizeResponse(prompt=prompt.text).model_dump_json(), media_type="application/json")
