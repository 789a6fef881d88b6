"""The openai SDK against llm-service: sync, async and streaming, in a few lines each.

    python -m clients.examples --base-url http://localhost:8000/v1
"""

from __future__ import annotations

import argparse
import asyncio

from openai import AsyncOpenAI, OpenAI


def sync_chat(client: OpenAI, model: str) -> str:
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=32,
        temperature=0,
    )
    return r.choices[0].message.content or ""


def stream_chat(client: OpenAI, model: str) -> str:
    text = ""
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Write one sentence about the sea."}],
        max_tokens=40,
        stream=True,
        seed=1,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
            text += chunk.choices[0].delta.content
    print()
    return text


async def async_many(client: AsyncOpenAI, model: str) -> list[str]:
    questions = ["Name a fruit.", "Name a planet.", "Name a colour."]
    results = await asyncio.gather(
        *(
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": q}], max_tokens=16, temperature=0
            )
            for q in questions
        )
    )
    return [r.choices[0].message.content or "" for r in results]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://localhost:8000/v1")
    p.add_argument("--api-key", default="none")
    p.add_argument("--model", default=None, help="default: the first model the server lists")
    args = p.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    print("sync:  ", sync_chat(client, model))
    print("stream:", end=" ")
    stream_chat(client, model)
    answers = asyncio.run(async_many(AsyncOpenAI(base_url=args.base_url, api_key=args.api_key), model))
    print("async: ", answers)


if __name__ == "__main__":
    main()
