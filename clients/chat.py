"""Streaming terminal chat for any OpenAI-compatible server.

    llm-service chat                                  # interactive, against localhost:8000
    llm-service chat --prompt "What is 2+2?"          # one answer, then exit
    echo "Summarise: ..." | llm-service chat          # stdin is not a terminal: same

Interactive commands: /reset, /model NAME, /save FILE, /help, /exit. End a line with a backslash
to continue on the next one, or paste a block between two lines of three double quotes.
Ctrl-C cancels the answer in progress (the stream is closed, so the server stops generating) and
keeps the chat open; Ctrl-D or /exit leaves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import openai
from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

DEFAULT_BASE_URL = "http://localhost:8000/v1"
HELP = "commands: /reset (forget the conversation), /model NAME, /save FILE, /help, /exit"


class ChatError(Exception):
    """A failure to explain to the person in one line."""


@dataclass
class Stats:
    tokens: int = 0
    ttft: float | None = None
    seconds: float = 0.0

    def line(self) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        ttft = f"{self.ttft:.2f} s" if self.ttft is not None else "-"
        return f"{self.tokens} tokens · {rate:.1f} tok/s · TTFT {ttft}"


def retryable(e: BaseException) -> bool:
    if isinstance(e, openai.APIConnectionError | openai.RateLimitError):
        return True
    return isinstance(e, openai.APIStatusError) and e.status_code == 503


def retry_wait(state: RetryCallState) -> float:
    """Retry-After when the server sends one (429/503), else exponential backoff."""
    e = state.outcome.exception() if state.outcome else None
    if isinstance(e, openai.APIStatusError):
        after = e.response.headers.get("retry-after")
        if after:
            try:
                return min(float(after), 60.0)
            except ValueError:
                pass
    return float(min(2 ** (state.attempt_number - 1), 8))


def explain(e: Exception, base_url: str) -> str:
    if isinstance(e, openai.APIConnectionError):
        return f"cannot reach the server at {base_url} ({e.__cause__ or e}). Is it running? Check --base-url."
    if isinstance(e, openai.AuthenticationError | openai.PermissionDeniedError):
        return "the server refused the API key. Pass the right one with --api-key or OPENAI_API_KEY."
    if isinstance(e, openai.NotFoundError):
        return f"not found: {e.message}. /model NAME picks another model."
    if isinstance(e, openai.APIStatusError):
        return f"the server answered {e.status_code}: {e.message}"
    return f"{type(e).__name__}: {e}"


class Chat:
    def __init__(self, client: openai.OpenAI, model: str, args: argparse.Namespace) -> None:
        self.client = client
        self.model = model
        self.args = args
        self.system = args.system
        self.history: list[dict[str, str]] = []
        self.retrying = Retrying(
            retry=retry_if_exception(retryable), wait=retry_wait, stop=stop_after_attempt(args.retries + 1), reraise=True
        )

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def _open(self, messages: list[dict[str, str]]) -> Any:
        kwargs: dict[str, Any] = dict(
            model=self.model, messages=messages, stream=True, stream_options={"include_usage": True},
            temperature=self.args.temperature,
        )
        if self.args.max_tokens:
            kwargs["max_tokens"] = self.args.max_tokens
        # retried only while opening: once tokens flow, a failure is reported, not replayed
        return self.retrying(self.client.chat.completions.create, **kwargs)

    def stream(self, user_text: str, on_piece: Callable[[str], None]) -> tuple[str, Stats]:
        """Send one user turn, call on_piece per streamed piece; the turn joins history when done."""
        messages = [*self.messages(), {"role": "user", "content": user_text}]
        stats = Stats()
        start = time.perf_counter()
        stream = self._open(messages)
        text = ""
        try:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    if stats.ttft is None:
                        stats.ttft = time.perf_counter() - start
                    piece = chunk.choices[0].delta.content
                    text += piece
                    on_piece(piece)
                if chunk.usage:
                    stats.tokens = chunk.usage.completion_tokens
        finally:
            stream.close()  # also on Ctrl-C: closing the connection aborts the request server-side
        stats.seconds = time.perf_counter() - start - (stats.ttft or 0.0)
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": text}]
        return text, stats

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"model": self.model, "messages": self.messages()}, indent=1, ensure_ascii=False))


def read_turn(prompt: Callable[[str], str]) -> str:
    """One user turn: a line, lines joined by trailing backslashes, or a triple-quoted block."""
    line = prompt("you> ")
    if line.strip() == '"""':
        lines = []
        while (more := prompt("... ")).strip() != '"""':
            lines.append(more)
        return "\n".join(lines)
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(prompt("... "))
    return "\n".join(lines)


def command(chat: Chat, text: str, console: Console) -> bool:
    """Run a /command; False means leave."""
    name, _, arg = text.strip().partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        chat.history.clear()
        console.print("[dim]conversation forgotten[/dim]")
    elif name == "/model":
        if not arg:
            console.print(f"[dim]model: {chat.model}[/dim]")
        else:
            chat.model = arg
            console.print(f"[dim]model: {arg}[/dim]")
    elif name == "/save":
        if not arg:
            console.print("[red]usage: /save FILE[/red]")
        else:
            chat.save(Path(arg).expanduser())
            console.print(f"[dim]saved {len(chat.history)} messages to {arg}[/dim]")
    elif name == "/help":
        console.print(HELP)
    else:
        console.print(f"[red]unknown command {name}[/red]; {HELP}")
    return True


def interactive(chat: Chat, console: Console) -> int:
    console.print(f"[bold]llm-service chat[/bold] · model [cyan]{chat.model}[/cyan] · {HELP}")
    while True:
        try:
            text = read_turn(input)
        except EOFError:
            console.print()
            return 0
        except KeyboardInterrupt:
            console.print()
            continue
        if not text.strip():
            continue
        if text.startswith("/"):
            if not command(chat, text, console):
                return 0
            continue
        shown = Text()
        try:
            with Live(shown, console=console, refresh_per_second=15, transient=True) as live:

                def show(piece: str, shown: Text = shown, live: Live = live) -> None:
                    shown.append(piece)
                    live.refresh()

                answer, stats = chat.stream(text, show)
        except KeyboardInterrupt:
            console.print(Text(str(shown)))
            console.print("[yellow]cancelled[/yellow] (the answer was not added to the conversation)")
            continue
        except openai.APIError as e:
            console.print(f"[red]error:[/red] {explain(e, str(chat.client.base_url))}")
            continue
        console.print(Markdown(answer) if answer.strip() else Text("(empty answer)"))
        console.print(f"[dim]{stats.line()}[/dim]")


def one_shot(chat: Chat, text: str, out: TextIO) -> int:
    def show(piece: str) -> None:
        out.write(piece)
        out.flush()

    answer, _ = chat.stream(text, show)
    if not answer.endswith("\n"):
        out.write("\n")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-service chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", DEFAULT_BASE_URL))
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"))
    p.add_argument("--model", default=None, help="default: the first model the server lists")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--prompt", default=None, help="ask this, print the answer, exit")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--retries", type=int, default=4, help="retries for connection errors, 429 and 503")
    return p


def _first_model(client: openai.OpenAI, retrying: Retrying) -> str:
    models = retrying(client.models.list).data
    if not models:
        raise ChatError("the server lists no models; pass --model")
    return str(models[0].id)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # one session id per chat: behind several replicas, nginx keeps its turns on the replica that
    # holds the history in its prefix cache (deploy/nginx.conf routes on X-Session-Id)
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=600,
                           default_headers={"X-Session-Id": f"chat-{uuid.uuid4().hex}"})
    err = Console(stderr=True)
    try:
        chat = Chat(client, args.model or "", args)
        if not args.model:
            chat.model = _first_model(client, chat.retrying)
        if args.prompt is not None or not sys.stdin.isatty():
            text = args.prompt if args.prompt is not None else sys.stdin.read()
            if not text.strip():
                err.print("[red]error:[/red] nothing to ask: give --prompt or text on stdin")
                return 2
            return one_shot(chat, text, sys.stdout)
        return interactive(chat, Console())
    except openai.APIError as e:
        err.print(f"[red]error:[/red] {explain(e, args.base_url)}")
        return 1
    except ChatError as e:
        err.print(f"[red]error:[/red] {e}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
