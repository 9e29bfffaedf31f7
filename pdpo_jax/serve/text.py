"""From new token ids to the text a client sees: detokenising as tokens arrive, stop strings.

A `TextStream` holds one choice's tokens. Each batch of new tokens re-decodes the reply (special
tokens skipped, as `sample_texts` does) and releases the text that can no longer change: it
holds back a trailing U+FFFD (a character whose bytes are still arriving) and any tail that
could be the start of a stop string. The first stop string found ends the choice: the text is
cut before it and the tokens after the one that completed it are dropped. The released pieces
concatenate to the text a non-streamed reply gets, whatever the batches were.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"  # what a decoder shows for an incomplete UTF-8 sequence


@dataclasses.dataclass(frozen=True)
class Piece:
    """Text released by one update, and the tokens it releases for log-probs (EOS left out)."""
    text: str = ""
    tokens: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()


class TextStream:
    """One choice's reply as it grows. `add` each batch of new tokens (and their log-probs),
    `finish` when the engine ends the row; both return the newly released `Piece`.
    `finish_reason` is set once the choice ended ('stop': an EOS or a stop string; 'length')."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), eos_ids: Sequence[int] = ()):
        self.tokenizer, self.stop, self.eos_ids = tokenizer, tuple(stop), frozenset(eos_ids)
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.text = ""               # released so far
        self.finish_reason: str | None = None
        self._released = 0           # tokens released for log-probs

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def add(self, tokens: Sequence[int], logprobs: Sequence[float] | None = None) -> Piece:
        if self.finish_reason is not None:  # ended by a stop string: later tokens are dropped
            return Piece()
        before = len(self.tokens)
        self.tokens += tokens
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(tokens)
        full = self.decode(self.tokens)
        found = self._find_stop(full)
        if found is not None:
            cut, end = found
            keep = self._tokens_through(end, before)
            del self.tokens[keep:], self.logprobs[keep:]
            self.finish_reason = "stop"
            return self._release(full[:cut], complete=True)
        end = self._safe_end(full)
        return self._release(full[:end], complete=end == len(full))

    def finish(self, reason: str) -> Piece:
        """The rest of the text once the engine ended the row ('stop' at an EOS, or 'length')."""
        if self.finish_reason is not None:
            return Piece()
        self.finish_reason = reason
        return self._release(self.decode(self.tokens), complete=True)

    def _find_stop(self, full: str) -> tuple[int, int] | None:
        """(start, end) of the earliest stop string in `full`, or None."""
        hits = [(i, i + len(s)) for s in self.stop if (i := full.find(s)) >= 0]
        return min(hits) if hits else None

    def _safe_end(self, full: str) -> int:
        """Where the text that cannot change any more ends: before a trailing U+FFFD and before
        the longest tail that starts a stop string."""
        end = len(full.rstrip(REPLACEMENT))
        hold = 0
        for s in self.stop:
            hold = max(hold, next((k for k in range(min(len(s) - 1, end), hold, -1)
                                   if full.endswith(s[:k], 0, end)), 0))
        return end - hold

    def _tokens_through(self, end: int, before: int) -> int:
        """The fewest tokens whose text reaches `end` (the stop string completes among the
        tokens added after `before`)."""
        for k in range(before + 1, len(self.tokens)):
            if len(self.decode(self.tokens[:k])) >= end:
                return k
        return len(self.tokens)

    def _release(self, text: str, complete: bool) -> Piece:
        """The part of `text` not released yet; the tokens' log-probs too when `text` is all of
        their text (`complete`), so an entry never comes before the text it belongs to."""
        # Text only grows at its end; should a tokenizer rewrite released text (it never does
        # with byte-level BPE or SentencePiece decoded from the start), nothing is re-sent.
        delta = text[len(self.text):] if text.startswith(self.text) else ""
        self.text += delta
        upto = len(self.tokens) if complete else self._released
        ids = [i for i in range(self._released, upto) if self.tokens[i] not in self.eos_ids]
        self._released = upto
        return Piece(delta, tuple(self.tokens[i] for i in ids), tuple(self.logprobs[i] for i in ids))


def token_texts(tokenizer: Any, tokens: Sequence[int]) -> list[str]:
    """Each token's own text, special tokens included (the `token` of a log-prob entry)."""
    return [tokenizer.decode([t]) for t in tokens]
