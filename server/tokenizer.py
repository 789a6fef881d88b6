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
        self.has_chat_template = bool(getattr(self.hf, "chat_template", None))

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Render messages with the model's own chat template, ready for the assistant's turn."""
        if not self.has_chat_template:
            raise InvalidRequest(
                "This model has no chat template, so it cannot serve /v1/chat/completions. "
                "Use /v1/completions with a plain prompt instead.",
                param="messages",
            )
        text = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # the template already wrote the special tokens it wants
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=True))

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

    def token_text(self, token_id: int) -> str:
        """A display string for one token; undecodable partial bytes show as U+FFFD."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")
