"""Record types shared by every stage, and the one error type for bad input files.

A record holds text only; token ids are made from it by `encode.encode_pair`, so SFT, negative
sampling, DPO, DNLI scoring and judging all see the same prompt for the same record.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from pdpo_jax.errors import UserError

# DNLI candidate groups (file keys) -> the category names of the paper's Table 4.
DNLI_CATEGORIES = {"label": "hits", "similar": "entail", "rand": "random", "neg": "contradict"}
DNLI_GROUPS = ("attributes", "havenot", "likedislike")


class DataFormatError(UserError):
    """A data file does not match its format. The message names file, line, bad value and fix."""

    def __init__(self, path: Any, line: int | None, problem: str, fix: str):
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}; {fix}")
        self.path, self.line = str(path), line


@dataclasses.dataclass(frozen=True)
class PersonaTurn:
    """One bot turn: the bot's persona, the dialogue so far and what the bot said next.

    history is oldest first and alternates speakers; its last turn (if any) is the partner's.
    """

    dialogue_id: str
    persona: tuple[str, ...]
    history: tuple[str, ...]
    response: str

    @property
    def record_id(self) -> str:
        """Unique within a dataset: a bot turn is identified by its dialogue and position."""
        return f"{self.dialogue_id}#{len(self.history)}"


@dataclasses.dataclass(frozen=True)
class DnliExample:
    """One Dialogue-NLI consistency-ranking example (Welleck et al., 2019).

    candidates: (text, category) pairs, category in 'hits'|'entail'|'random'|'contradict';
    `gold` is the single 'hits' candidate.
    """

    example_id: str
    group: str
    persona: tuple[str, ...]
    history: tuple[str, ...]
    gold: str
    candidates: tuple[tuple[str, str], ...]
    triple: tuple[str, ...]
    relevant_persona_sentence: str

    def as_turn(self, response: str | None = None) -> PersonaTurn:
        """The example as a PersonaTurn whose response is `response` (default: the gold)."""
        return PersonaTurn(self.example_id, self.persona, self.history,
                           self.gold if response is None else response)


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """A DPO example: both responses answer the same (persona, history) prompt.

    metadata: anything else the negatives stage stored (e.g. the swapped persona, sampler
    settings, the trl-style rendered `prompt`); carried through, never read by the pipeline.
    """

    persona: tuple[str, ...]
    history: tuple[str, ...]
    chosen: str
    rejected: str
    pair_id: str = ""
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)
