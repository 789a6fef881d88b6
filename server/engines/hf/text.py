"""Token ids -> text, assembled on the event loop (in `HFEngine.generate`) so the model thread
does nothing but tensors: whole characters only, stop strings held back until they can no
longer match, special tokens left out as vLLM's detokenizers decide them."""

from __future__ import annotations

import codecs

from server.engines.base import SamplingSpec
from server.tokenizer import Tokenizer


class Text:
    """Token ids -> text for one answer, the way vLLM's detokenizer makes it: whole characters only;
    special tokens left out (unless `skip_special_tokens` is off); the EOS or stop token that ended
    the answer left out (unless `include_stop_str_in_output`); a stop string cut off with what
    follows it (kept, with `include_stop_str_in_output`), and the tail that could still begin one
    held back until it cannot."""

    def __init__(self, tokenizer: Tokenizer, spec: SamplingSpec, skip_ids: frozenset[int],
                 spaced_ids: frozenset[int] = frozenset()) -> None:
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = spec.stop
        self.include_stop = spec.include_stop_str_in_output
        self.skip = skip_ids if spec.skip_special_tokens else frozenset()
        # slow tokenizers only (empty otherwise): vLLM's slow detokenizer sets added tokens apart
        # from their neighbours with spaces; its fast one (DecodeStream) gives their bare text
        self.spaced = spaced_ids if spec.spaces_between_special_tokens else frozenset()
        self.last_spaced: bool | None = None  # whether the last token with text was an added one
        self.hold = max(len(s) for s in self.stop) - 1 if self.stop and not self.include_stop else 0
        self.text = ""  # the answer so far
        self.sent = 0  # characters of it already returned

    def feed(self, token_id: int, check_stop: bool, ends: bool = False) -> tuple[str, bool]:
        """New text to send, and whether a stop string ended the answer. `ends`: this token is the
        EOS or stop token that ended the answer."""
        new = 0
        if not (ends and not self.include_stop) and token_id not in self.skip:
            piece = self.decoder.decode(self.tokenizer.token_bytes(token_id))
            if self.spaced:
                spaced = token_id in self.spaced
                if self.last_spaced is not None and (spaced or self.last_spaced):
                    piece = " " + piece
                self.last_spaced = spaced
            self.text += piece
            new = len(piece)
        if check_stop and self.stop and new:
            hit = find_stop(self.text, new, self.stop)
            if hit is not None:
                start, end = hit
                self.text = self.text[: end if self.include_stop else start]
                return self._take(len(self.text)), True
        return self._take(len(self.text) - self.hold), False

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        text, self.sent = self.text[self.sent : upto], upto
        return text

    def flush(self) -> str:
        """The held-back text at the end. Bytes of a character the answer was cut off in the middle
        of are dropped, not sent as U+FFFD: they never were a character (vLLM does the same)."""
        self.decoder.reset()
        return self._take(len(self.text))


def find_stop(text: str, new: int, stops: tuple[str, ...]) -> tuple[int, int] | None:
    """(start, end) of the stop string that ends within the last `new` characters of `text`,
    the earliest-ending one if several do (then the first listed), as vLLM's check_stop_strings."""
    best: tuple[int, int] | None = None
    for stop in stops:
        i = text.find(stop, max(len(text) - new - len(stop) + 1, 0))
        if i >= 0 and (best is None or i + len(stop) < best[1]):
            best = (i, i + len(stop))
    return best


def special_ids(tokenizer: Tokenizer) -> tuple[frozenset[int], frozenset[int]]:
    """The tokens `skip_special_tokens` leaves out, and those `spaces_between_special_tokens` sets
    apart with spaces, as vLLM decides them. Fast tokenizers (vLLM's DecodeStream): the added
    tokens marked special, and none (DecodeStream gives an added token's bare text, as we always
    do). Slow ones: the tokenizer's special tokens, and every added token."""
    backend = getattr(tokenizer.hf, "backend_tokenizer", None)
    if backend is not None:
        added = backend.get_added_tokens_decoder()
        return frozenset(i for i, tok in added.items() if tok.special), frozenset()
    return frozenset(tokenizer.special_ids), frozenset(int(i) for i in tokenizer.hf.get_added_vocab().values())
