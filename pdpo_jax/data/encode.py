"""encode_pair: the ONE way (persona, history, response) becomes token ids, for every stage.

Prompt and response are tokenized separately and concatenated, so `prompt_ids + response_ids` is
exactly what SFT/DPO train on and what a sampler continues from `prompt_ids`.

- BOS: the prompt starts with `bos_token_id` iff the tokenizer itself adds it (`tokenizer("a")`
  starts with BOS: Llama/Mistral with add_bos_token, not GPT-2, Qwen2 or SmolLM2). Chat templates
  write their own special tokens, so chat prompts are tokenized with add_special_tokens=False.
- Response: text mode tokenizes `self_tag + response_prefix + response` and drops the ids of
  `self_tag`, so the first response token is the one that follows the tag in the joined text (e.g.
  GPT-2 ` hello`, SentencePiece `▁hello`); then EOS is appended. Chat mode takes the ids that the
  chat template appends for the assistant message, up to and including its end-of-turn token, and
  checks that prompt_ids + response_ids == tokenize(full conversation).
- Budgets: max_response_tokens (incl. EOS), max_prompt_tokens, max_total_tokens (prompt +
  response). Oldest history turns are dropped first; persona lines, the latest partner turn and the
  response are never cut. A record that cannot fit is not cut either: `DoesNotFit` says why, and
  `encode_records` counts it (reasons: response_too_long, prompt_too_long, eos_in_text,
  no_partner_turn). With truncate=False (data.truncation=drop) no history turn is cut: a prompt
  over budget is `history_too_long`.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from pdpo_jax.data.records import PersonaTurn, PreferencePair
from pdpo_jax.data.templates import PromptTemplate, chat_messages, get_template, render_prompt

log = logging.getLogger(__name__)
_EMPTY = np.zeros((0,), np.int32)


class DoesNotFit(ValueError):
    """The record cannot be encoded within the budget (or at all); `reason` is a short key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclasses.dataclass(frozen=True, eq=False)
class Encoded:
    """prompt_ids int32[P] (BOS first when used), response_ids int32[R] (ends with EOS /
    end-of-turn; empty when encoded without a response)."""

    prompt_ids: np.ndarray
    response_ids: np.ndarray
    history_dropped: int = 0  # oldest history turns cut to fit the budget
    source_index: int = -1    # index in the list given to encode_records

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    @property
    def tokens(self) -> np.ndarray:
        """int32[P + R]: what training sees."""
        return np.concatenate([self.prompt_ids, self.response_ids])


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedPair:
    """One shared prompt int32[P] and two responses int32[C], int32[R] (both end with EOS)."""

    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray
    history_dropped: int = 0
    source_index: int = -1

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclasses.dataclass(frozen=True)
class EncodeStats:
    """total = kept + sum(dropped.values()); truncated = kept records that lost history turns."""

    total: int
    kept: int
    truncated: int
    history_turns_dropped: int
    dropped: dict[str, int]

    @classmethod
    def count(cls, history_dropped: Sequence[int], dropped: Counter) -> "EncodeStats":
        """From each kept record's dropped history turns and the dropped records' reasons."""
        return cls(total=len(history_dropped) + sum(dropped.values()), kept=len(history_dropped),
                   truncated=sum(h > 0 for h in history_dropped),
                   history_turns_dropped=int(sum(history_dropped)),
                   dropped=dict(sorted(dropped.items())))


def encode_pair(tokenizer: Any, template: str | PromptTemplate, persona: Sequence[str],
                history: Sequence[str], response: str | None = None, *,
                max_prompt_tokens: int | None = None, max_response_tokens: int | None = None,
                max_total_tokens: int | None = None, truncate: bool = True) -> Encoded:
    """Token ids of one (persona, history[, response]); raises DoesNotFit when over budget
    (truncate=False: also when the prompt fits only without its oldest turns)."""
    template = get_template(template)
    history = tuple(history)
    response_ids = _EMPTY if response is None else _response_ids(
        tokenizer, template, persona, history, response, max_response_tokens)
    budget = _prompt_budget(max_prompt_tokens, max_total_tokens, len(response_ids))
    prompt_ids, dropped = _fit_prompt(tokenizer, template, persona, history, budget, truncate)
    return Encoded(prompt_ids, response_ids, dropped)


def encode_preference(tokenizer: Any, template: str | PromptTemplate, persona: Sequence[str],
                      history: Sequence[str], chosen: str, rejected: str, *,
                      max_prompt_tokens: int | None = None, max_response_tokens: int | None = None,
                      max_total_tokens: int | None = None, truncate: bool = True) -> EncodedPair:
    """encode_pair for a DPO pair: one prompt, truncated so that the longer response fits."""
    template = get_template(template)
    history = tuple(history)
    chosen_ids, rejected_ids = (
        _response_ids(tokenizer, template, persona, history, r, max_response_tokens)
        for r in (chosen, rejected))
    longer = max(len(chosen_ids), len(rejected_ids))
    budget = _prompt_budget(max_prompt_tokens, max_total_tokens, longer)
    prompt_ids, dropped = _fit_prompt(tokenizer, template, persona, history, budget, truncate)
    return EncodedPair(prompt_ids, chosen_ids, rejected_ids, dropped)


def encode_records(tokenizer: Any, template: str | PromptTemplate,
                   records: Sequence[PersonaTurn | PreferencePair],
                   **budgets: int | bool | None) -> tuple[list[Any], EncodeStats]:
    """encode_pair (PersonaTurn) or encode_preference (PreferencePair) over many records.

    Returns the encodings that fit (each with `source_index` set) and the counts; records that do
    not fit are dropped, counted by reason, and a warning is logged.
    """
    encoded, dropped = [], Counter()
    for i, rec in enumerate(records):
        try:
            if isinstance(rec, PreferencePair):
                enc = encode_preference(tokenizer, template, rec.persona, rec.history, rec.chosen,
                                        rec.rejected, **budgets)
            else:
                enc = encode_pair(tokenizer, template, rec.persona, rec.history, rec.response, **budgets)
        except DoesNotFit as e:
            dropped[e.reason] += 1
            continue
        encoded.append(dataclasses.replace(enc, source_index=i))
    stats = EncodeStats.count([e.history_dropped for e in encoded], dropped)
    if dropped:
        log.warning("encode_records: dropped %d of %d records %s", sum(dropped.values()),
                    len(records), stats.dropped)
    return encoded, stats


def special_ids(tokenizer: Any) -> tuple[int | None, int]:
    """(BOS id if the tokenizer adds one, EOS id).

    Cached per tokenizer object: set add_bos_token / eos_token before the first encode_pair.
    """
    return _special_ids(tokenizer)


def pad_id(tokenizer: Any) -> int:
    """Padding id for batches: pad, else EOS. Masks come from lengths, so its value is inert."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _special_ids(tokenizer)[1]


@functools.lru_cache(maxsize=16)
def _special_ids(tokenizer: Any) -> tuple[int | None, int]:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no eos_token; set tokenizer.eos_token "
                         "(responses must end with it)")
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    return (bos if adds_bos else None), tokenizer.eos_token_id


@functools.lru_cache(maxsize=512)
def _ids(tokenizer: Any, text: str) -> tuple[int, ...]:
    # Cached: the anchor and the untruncated chat prompt are asked for again right away.
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prompt_budget(max_prompt: int | None, max_total: int | None, response_len: int) -> float:
    budget = float("inf") if max_prompt is None else max_prompt
    if max_total is not None:
        budget = min(budget, max_total - response_len)
    return budget


def _response_ids(tokenizer: Any, template: PromptTemplate, persona: Sequence[str],
                  history: tuple[str, ...], response: str, max_tokens: int | None) -> np.ndarray:
    if not response.strip():
        raise ValueError("empty response; every record needs response text")
    if template.chat:
        ids = _chat_response_ids(tokenizer, template, persona, history, response)
    else:
        ids = _text_response_ids(tokenizer, template, response)
    if max_tokens is not None and len(ids) > max_tokens:
        raise DoesNotFit("response_too_long", f"{len(ids)} response tokens > {max_tokens}")
    return np.asarray(ids, np.int32)


def _text_response_ids(tokenizer: Any, template: PromptTemplate, response: str) -> list[int]:
    eos = _special_ids(tokenizer)[1]
    anchor = _ids(tokenizer, template.self_tag)
    joined = _ids(tokenizer, template.self_tag + template.response_prefix + response)
    if joined[:len(anchor)] != anchor:
        raise ValueError(f"{type(tokenizer).__name__} merges {template.self_tag!r} with the "
                         f"response {response[:40]!r} into one token; change the template's "
                         "response_prefix or self_tag")
    body = list(joined[len(anchor):])
    if eos in body:
        raise DoesNotFit("eos_in_text", f"text {response[:40]!r} tokenizes to the EOS id {eos}")
    return body + [eos]


def _chat_response_ids(tokenizer: Any, template: PromptTemplate, persona: Sequence[str],
                       history: tuple[str, ...], response: str) -> list[int]:
    """What the chat template appends for the assistant message, through its end-of-turn token."""
    history = _chat_history(history)
    prompt_text = _chat_text(tokenizer, chat_messages(template, persona, history), True)
    full_text = _chat_text(tokenizer, chat_messages(template, persona, history, response), False)
    eot = template.end_of_turn or tokenizer.eos_token
    start = full_text.find(response, len(prompt_text))
    end = full_text.find(eot, start + len(response)) if start >= 0 else -1
    if not full_text.startswith(prompt_text) or end < 0:
        raise ValueError(f"chat template of {type(tokenizer).__name__} does not write the assistant "
                         f"message after the generation prompt, closed by {eot!r}; set the "
                         "template's end_of_turn or use a text template")
    prompt_ids = _ids(tokenizer, prompt_text)
    full_ids = _ids(tokenizer, full_text[:end + len(eot)])
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    if full_ids[:len(prompt_ids)] != prompt_ids or full_ids[-1] != eot_id:
        raise ValueError(f"{type(tokenizer).__name__}: the chat prompt's last token merges with the "
                         f"assistant message, or {eot!r} is not one token; use a text template")
    ids = list(full_ids[len(prompt_ids):])
    if eot_id in ids[:-1]:
        raise DoesNotFit("eos_in_text", f"text {response[:40]!r} contains the end-of-turn {eot!r}")
    return ids


def _chat_history(history: tuple[str, ...]) -> tuple[str, ...]:
    """An odd number of turns, so the messages start with a user turn as most chat templates
    require (the oldest turn goes when the count is even)."""
    if not history:
        raise DoesNotFit("no_partner_turn", "chat templates need at least one user message")
    return history[len(history) % 2 == 0:]


def _chat_text(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _fit_prompt(tokenizer: Any, template: PromptTemplate, persona: Sequence[str],
                history: tuple[str, ...], budget: float,
                truncate: bool = True) -> tuple[np.ndarray, int]:
    """Prompt ids with the fewest oldest turns dropped that fit `budget`, and how many were dropped.

    The latest turn is always kept (a response with no context teaches nothing); chat mode drops
    turns in pairs so the messages keep starting with a user turn.
    """
    if template.chat:
        history = _chat_history(history)
    drops = list(range(0, max(len(history), 1), 2 if template.chat else 1))  # allowed cut counts
    ids = _prompt_ids(tokenizer, template, persona, history)
    if len(ids) <= budget:
        return ids, 0
    if not truncate:
        raise DoesNotFit("history_too_long", f"{len(ids)} prompt tokens > {budget} and "
                         "data.truncation=drop")

    def attempt(j: int) -> np.ndarray | None:
        candidate = _prompt_ids(tokenizer, template, persona, history[drops[j]:])
        return candidate if len(candidate) <= budget else None

    # Start where the turns' own token counts say the excess is covered, then walk to the exact
    # answer: usually one or two tokenizations instead of a search over long prompts.
    j = _estimated_cut(tokenizer, history, drops, len(ids) - budget)
    best = attempt(j)
    while best is None and j + 1 < len(drops):
        j += 1
        best = attempt(j)
    if best is None:
        raise DoesNotFit("prompt_too_long", f"persona + latest turn need more than {budget} tokens")
    while j > 1 and (shorter_cut := attempt(j - 1)) is not None:
        j, best = j - 1, shorter_cut
    return best, drops[j]


def _estimated_cut(tokenizer: Any, history: tuple[str, ...], drops: list[int], excess: float) -> int:
    """Index into `drops` of the first cut whose turns hold at least `excess` tokens (estimate)."""
    if len(drops) < 2:
        return 0
    turns = tokenizer(list(history[:drops[-1]]), add_special_tokens=False)["input_ids"]
    counts = [len(x) for x in turns]
    cumulative = np.concatenate([[0], np.cumsum(counts)])
    reached = [j for j in range(1, len(drops)) if cumulative[drops[j]] >= excess]
    return reached[0] if reached else len(drops) - 1


def _prompt_ids(tokenizer: Any, template: PromptTemplate, persona: Sequence[str],
                history: tuple[str, ...]) -> np.ndarray:
    if template.chat:
        return np.asarray(_ids(tokenizer, _chat_text(
            tokenizer, chat_messages(template, persona, history), True)), np.int32)
    bos, eos = _special_ids(tokenizer)
    ids = _ids(tokenizer, render_prompt(template, persona, history))
    if eos in ids:
        raise DoesNotFit("eos_in_text", f"persona or history tokenizes to the EOS id {eos}")
    return np.asarray(((bos,) if bos is not None else ()) + ids, np.int32)
