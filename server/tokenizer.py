"""The model's tokenizer: chat template, prompt tokens, and the exact bytes of every token.

The server templates and tokenizes prompts itself (the same way for every engine) so that it
knows the prompt length before admitting a request, and reports logprob tokens with their true
bytes even when a token is only part of a multi-byte character.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from server.errors import InvalidRequest

_HEX_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte <-> printable-character table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


class Tokenizer:
    def __init__(self, path: str | Path, *, trust_remote_code: bool = False) -> None:
        from transformers import AutoTokenizer  # heavy import: only when a model is loaded

        self.hf: Any = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        self.special_ids: frozenset[int] = frozenset(self.hf.all_special_ids)
        backend = getattr(self.hf, "backend_tokenizer", None)
        decoder = type(backend.decoder).__name__ if backend is not None and backend.decoder else ""
        self._byte_level = decoder == "ByteLevel"
        template = getattr(self.hf, "chat_template", None)
        self.has_chat_template = bool(template)
        # all of a tokenizer's named templates, as text (what tool support is detected from)
        self.chat_template_text = "\n".join(template.values()) if isinstance(template, dict) else str(template or "")
        # the most characters one token stands for (a special token's name included): a text of N
        # characters is at least N / this many tokens, known without tokenizing it
        self.max_token_chars = self._max_token_chars()

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def _max_token_chars(self) -> int:
        longest = max((len(self.token_bytes(t)) for t in range(self.vocab_size)), default=1)
        # special tokens written in the text are matched by their name
        return max([longest, 1, *(len(str(t)) for t in self.hf.all_special_tokens)])

    def min_tokens(self, text: str) -> int:
        """A lower bound on the tokens `text` encodes to (each token covers at most
        `max_token_chars` characters, since a character is at least one byte)."""
        # halved: a normalizer that composes characters could make a token cover more of them
        return -(-len(text) // (2 * self.max_token_chars))

    def render_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                    continue_final_message: bool = False, documents: list[dict[str, str]] | None = None,
                    template_kwargs: dict[str, Any] | None = None, tools: list[dict[str, Any]] | None = None) -> str:
        """Messages rendered with the model's own chat template: ready for the assistant's turn,
        or (`continue_final_message`) ending inside the final assistant message, left open."""
        if not self.has_chat_template:
            raise InvalidRequest(
                "This model has no chat template, so it cannot serve /v1/chat/completions. "
                "Use /v1/completions with a plain prompt instead.",
                param="messages",
            )
        kwargs = dict(template_kwargs or {})
        for reserved in ("conversation", "messages", "tokenize", "add_generation_prompt", "continue_final_message",
                         "documents", "chat_template", "tools", "return_dict", "return_tensors"):
            if reserved in kwargs:
                raise InvalidRequest(f"Invalid value for 'chat_template_kwargs': '{reserved}' cannot be set "
                                     "there; use the request field of that name.", param="chat_template_kwargs")
        try:
            text = self.hf.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                documents=documents, tools=tools, tokenize=False, **kwargs)
        except (ValueError, TypeError, KeyError) as e:
            raise InvalidRequest(f"The chat template could not render these messages: {e}", param="messages") from None
        except Exception as e:  # jinja2's TemplateError (e.g. raise_exception in the template)
            if type(e).__module__.startswith("jinja2"):
                raise InvalidRequest(f"The chat template refused these messages: {e}", param="messages") from None
            raise
        return str(text)

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """Messages rendered for the assistant's turn, as token ids."""
        return self.encode(self.render_chat(messages), add_special_tokens=False)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # a chat template already wrote the special tokens it wants: callers pass False for it
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def encode_cut(self, text: str, add_special_tokens: bool, keep: int, side: str = "right") -> tuple[list[int], int]:
        """The tokens of `text`, at most `keep` of them: the text is cut on `side` ("right": its end
        goes, as sentence-transformers truncates) and the special tokens stay. Also: how many
        tokens it had uncut."""
        full = list(self.hf.encode(text, add_special_tokens=add_special_tokens))
        if len(full) <= keep:  # the usual case: nothing to cut, one pass
            return full, len(full)
        body = list(self.hf.encode(text, add_special_tokens=False)) if add_special_tokens else full
        # the special tokens around the text ([CLS] ... [SEP]): where the text's own tokens sit in `full`
        at = next((i for i in range(len(full) - len(body) + 1) if full[i:i + len(body)] == body), 0)
        head, tail = (full[:at], full[at + len(body):]) if add_special_tokens else ([], [])
        room = max(keep - len(head) - len(tail), 0)
        if len(body) > room:
            body = body[:room] if side == "right" else body[len(body) - room:]
        return head + body + tail, len(full)

    def decode(self, token_ids: list[int] | tuple[int, ...]) -> str:
        return str(self.hf.decode(list(token_ids), skip_special_tokens=True))

    @lru_cache(maxsize=1 << 17)  # noqa: B019 -- one Tokenizer per served model, lives as long
    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (a partial UTF-8 sequence is possible)."""
        piece = self.hf.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if token_id in self.special_ids:
            return str(piece).encode()
        if self._byte_level and all(ch in _BYTE_DECODER for ch in piece):
            return bytes(_BYTE_DECODER[ch] for ch in piece)
        if m := _HEX_BYTE.fullmatch(piece):  # sentencepiece byte fallback
            return bytes([int(m.group(1), 16)])
        return str(piece).replace("▁", " ").encode()

    def token_text(self, token_id: int, as_id: bool = False) -> str:
        """A display string for one token; undecodable partial bytes show as U+FFFD. `as_id`:
        vLLM's `return_tokens_as_token_ids` form, "token_id:N", which is never ambiguous."""
        if as_id:
            return f"token_id:{token_id}"
        return self.token_bytes(token_id).decode("utf-8", errors="replace")
