"""A heuristic substitute for the Dialogue-NLI training set, built from Synthetic-Persona-Chat.

The DNLI training set is not on this machine, so the reward classifier can be trained on pairs
made by rules from the SPC **test** split (the project's training split; never SPC valid, the
DNLI eval files or PersonaChat valid). Premise = a persona sentence of speaker X; hypothesis:

- entailment: the (at most two) sentences of X's own turns that cover the persona sentence
  best, if they cover ≥ 60% of its content words (stopwords out, crude stemming; a one-word
  persona fact must sit in the opening of an "I …" sentence), are statements (no "?"), speak
  in the first person and have the same polarity (negation, love/hate) — X repeating or
  paraphrasing the fact;
- contradiction: each entailing sentence rewritten by `contradict` when it opens with the
  same construction as the persona sentence and its first clause (up to a comma, "and", "but")
  alone covers the persona sentence, so the edit negates the matching clause ("utterance:"
  rules); and the persona sentence
  rewritten ("persona:" rules; "My favorite K is V" takes another persona's V for the same K
  that shares no content word with V);
- neutral: a first-person statement sharing no content word with the premise, drawn (seeded)
  from X's own turns that match none of X's persona sentences, from another conversation,
  another conversation's persona sentence, or such a persona sentence rewritten by
  `contradict` ("neutral:edited_other_persona"): negations and love → hate then occur in
  neutral hypotheses too, so they alone do not give a contradiction away.

Conversations are split into train/dev by a seeded permutation; the neutral partners come from
the same split. Pairs whose premise or hypothesis appears (letters and digits compared,
lowercased) anywhere in the DNLI eval files are dropped, as are repeats and dev pairs also in
train; each split is then balanced by seeded down-sampling to its rarest label. The labels are
heuristic: data/README.md gives the sizes and an estimate of the label noise.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import random
import re
from collections import Counter
from collections.abc import Sequence

from pdpo_jax.config.schema import NLI_LABELS
from pdpo_jax.data.dnli import read_dnli_files
from pdpo_jax.data.synthetic import SpcConversation, read_spc_conversations
from pdpo_jax.fileio import write_json_atomic
from pdpo_jax.reward.contradict import contradict, favorite_slot
from pdpo_jax.reward.nli_data import NliPair, write_nli_jsonl

TRAIN_FILE, DEV_FILE, STATS_FILE = "nli_substitute_train.jsonl", "nli_substitute_dev.jsonl", "stats.json"
COVERAGE = 0.6
ENTAILMENTS_PER_PREMISE = 2
STOPWORDS = frozenset("""a an the and or but if so to of in on at by for with about from into as is
am are was were be been being have has had do does did i me my mine myself we us our you your he
him his she her it its they them their this that these those there here what which who whom
whose when where why how all any both each few more most other some such no nor not only own
same than too very can will just don't should now also really lot lots love like enjoy hate
dislike i'm i've i'd i'll it's that's im ive get got go going went make made much many one
well yes yeah oh hi hello hey thing things something anything would could might must shall
may up out over again then once still even ever never always""".split())
_NEGATION = frozenset("not no never don't doesn't didn't can't cannot won't isn't aren't wasn't "
                      "weren't haven't hasn't nothing nobody n't dont cant".split())
_DISLIKE = frozenset("hate hates hated dislike dislikes despise detest".split())
_FIRST_PERSON = frozenset("i i'm i've i'd i'll my me mine myself".split())
_WORD = re.compile(r"[a-z0-9']+")
_FIRST_CLAUSE = re.compile(r",|;| and | but | so ")


def normalized(text: str) -> str:
    """Letters and digits only, lowercased: how sentences are compared with the DNLI files."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("’", "'"))


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s", "e"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[:-len(suffix)]
    return word


@functools.lru_cache(maxsize=1 << 16)  # the builder asks for the same sentences ~10 times each
def content(text: str) -> frozenset[str]:
    """Stemmed content words (stopwords out)."""
    return frozenset(_stem(w.removesuffix("'s")) for w in _words(text) if w not in STOPWORDS)


@functools.lru_cache(maxsize=1 << 16)
def _polarity(text: str) -> tuple[bool, bool]:
    words = set(_words(text))
    return bool(words & _NEGATION), bool(words & _DISLIKE)


def _statements(text: str) -> list[str]:
    """The first-person statements (no questions, ≥ 3 words, no name placeholders) of a turn."""
    out = []
    for sentence in re.split(r"(?<=[.!?])\s+", text.strip()):
        words = _words(sentence)
        if len(words) >= 3 and not sentence.endswith("?") and "[" not in sentence \
                and _FIRST_PERSON & set(words):
            out.append(sentence.strip())
    return out


def _covers(premise: str, sentence: str) -> float:
    """Share of the premise's content words in `sentence` (0 when it cannot count)."""
    need = content(premise)
    if not need or _polarity(premise) != _polarity(sentence):
        return 0.0
    if len(need) == 1:  # a one-word fact ("I am a carpenter") must open an "I ..." sentence
        opening = _words(sentence)[:6]
        ok = opening[:1] in (["i"], ["i'm"]) and need <= content(" ".join(opening))
        return 1.0 if ok else 0.0
    return len(need & content(sentence)) / len(need)


@dataclasses.dataclass(frozen=True)
class _Speaker:
    dialogue_id: str
    persona: tuple[str, ...]
    statements: tuple[str, ...]


def _speakers(conversations: Sequence[SpcConversation]) -> list[_Speaker]:
    out = []
    for conv in conversations:
        for who in (1, 2):
            said = [s for speaker, text in conv.turns if speaker == who for s in _statements(text)]
            out.append(_Speaker(f"{conv.dialogue_id}/user{who}", conv.personas[who - 1], tuple(said)))
    return out


@dataclasses.dataclass(frozen=True)
class SubstituteSet:
    train: list[NliPair]
    dev: list[NliPair]
    stats: dict


def build_substitute(spc_path: str | os.PathLike, dnli_paths: Sequence[str | os.PathLike], *,
                     seed: int = 0, dev_fraction: float = 0.15) -> SubstituteSet:
    """The substitute NLI set (module doc) of an SPC CSV, nothing of it in the DNLI files."""
    conversations, _ = read_spc_conversations(spc_path)
    excluded = _dnli_sentences(dnli_paths)
    order = sorted(conversations, key=lambda c: c.dialogue_id)
    random.Random(seed).shuffle(order)
    n_dev = round(dev_fraction * len(order))
    splits = {"dev": order[:n_dev], "train": order[n_dev:]}
    stats: dict = {"seed": seed, "dev_fraction": dev_fraction, "conversations": {}}
    pairs = {}
    for name in ("train", "dev"):
        rng = random.Random(f"{seed}/{name}")
        candidates = _candidates(_speakers(splits[name]), rng)
        seen = set() if name == "train" else {_key(p) for p in pairs["train"]}
        kept, dropped = _filter(candidates, excluded, seen)
        pairs[name] = _balance(kept, rng)
        stats["conversations"][name] = len(splits[name])
        stats[name] = {"candidates": dict(Counter(p.label for p in candidates)), "dropped": dropped,
                       "labels": dict(Counter(p.label for p in pairs[name])),
                       "rules": dict(sorted(Counter(p.extra["rule"] for p in pairs[name]).items()))}
    return SubstituteSet(pairs["train"], pairs["dev"], stats)


def write_substitute(out_dir: str | os.PathLike, subset: SubstituteSet) -> tuple[pathlib.Path, pathlib.Path]:
    """train and dev JSONL (premise, hypothesis, label, rule, dialogue_id) and stats.json."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / STATS_FILE, subset.stats, indent=2)
    return write_nli_jsonl(out / TRAIN_FILE, subset.train), write_nli_jsonl(out / DEV_FILE, subset.dev)


def _dnli_sentences(paths: Sequence[str | os.PathLike]) -> set[str]:
    out = set()
    for ex in read_dnli_files(paths):
        texts = (*ex.persona, *ex.history, *(t for t, _ in ex.candidates), ex.gold,
                 ex.relevant_persona_sentence)
        out.update(normalized(t) for t in texts)
    return out


def _key(pair: NliPair) -> tuple[str, str]:
    return normalized(pair.premise), normalized(pair.hypothesis)


def _filter(candidates: list[NliPair], excluded: set[str], seen: set) -> tuple[list[NliPair], dict]:
    kept, dropped = [], Counter()
    for pair in candidates:
        key = _key(pair)
        if key[0] in excluded or key[1] in excluded:
            dropped["in_dnli_eval"] += 1
        elif key in seen:
            dropped["repeat"] += 1
        else:
            seen.add(key)
            kept.append(pair)
    return kept, dict(dropped)


def _balance(pairs: list[NliPair], rng: random.Random) -> list[NliPair]:
    """Seeded down-sampling of every label to the rarest one's count, then a seeded shuffle."""
    by_label = {label: [p for p in pairs if p.label == label] for label in NLI_LABELS}
    n = min(len(v) for v in by_label.values())
    out = [p for label in NLI_LABELS for p in rng.sample(by_label[label], n)]
    rng.shuffle(out)
    return out


def _candidates(speakers: list[_Speaker], rng: random.Random) -> list[NliPair]:
    favorites: dict[str, set[str]] = {}
    for sp in speakers:
        for sentence in sp.persona:
            slot = favorite_slot(sentence)
            if slot:
                favorites.setdefault(slot[0], set()).add(slot[1])
    favorites_sorted = {k: sorted(v) for k, v in favorites.items()}
    pool = [(i, s) for i, sp in enumerate(speakers) for s in sp.statements]
    personas = [(i, s) for i, sp in enumerate(speakers) for s in sp.persona]
    out = []
    for i, sp in enumerate(speakers):
        unrelated = [s for s in sp.statements
                     if not any(content(p) & content(s) for p in sp.persona)]
        for premise in sp.persona:
            tag = {"dialogue_id": sp.dialogue_id}
            entail = _entailments(premise, sp.statements)
            out += [NliPair(premise, e, "entailment", {"rule": "overlap", **tag}) for e in entail]
            out += [NliPair(premise, text, "contradiction", {"rule": rule, **tag})
                    for text, rule in _contradictions(premise, entail, favorites_sorted, rng)]
            neutral = _neutral(premise, i, unrelated, pool, personas, rng)
            if neutral:
                out.append(NliPair(premise, neutral[0], "neutral", {"rule": neutral[1], **tag}))
    return out


def _entailments(premise: str, statements: Sequence[str]) -> list[str]:
    """The statements covering the premise best (≥ COVERAGE), best first, distinct."""
    scored = sorted(((-_covers(premise, s), i, s) for i, s in enumerate(dict.fromkeys(statements))))
    return [s for cover, _, s in scored[:ENTAILMENTS_PER_PREMISE] if -cover >= COVERAGE]


def _contradictions(premise: str, entail: list[str], favorites: dict[str, list[str]],
                    rng: random.Random) -> list[tuple[str, str]]:
    """(text, rule) of the entailing statements edited in the premise's construction, then of
    the premise edited (a favourite swapped for another persona's, else a `contradict` rule)."""
    own, out = contradict(premise), []
    for statement in entail if own is not None else ():
        said = contradict(statement)
        if said is not None and said.family == own.family and \
                _covers(premise, _FIRST_CLAUSE.split(statement, maxsplit=1)[0]) >= COVERAGE:
            out.append((said.text, f"utterance:{said.rule}"))
    slot = favorite_slot(premise)
    others = [v for v in favorites.get(slot[0], ()) if not content(v) & content(slot[1])] if slot else []
    if others:
        out.append((f"My favorite {slot[0]} is {rng.choice(others)}.", "persona:favorite_swap"))
    elif own is not None:
        out.append((own.text, f"persona:{own.rule}"))
    return out


def _neutral(premise: str, speaker: int, unrelated: list[str], pool: list[tuple[int, str]],
             personas: list[tuple[int, str]], rng: random.Random) -> tuple[str, str] | None:
    need = content(premise)
    kind = rng.choice(("same_speaker", "other_dialogue", "other_persona", "edited_other_persona"))
    if kind == "same_speaker":
        return (rng.choice(unrelated), "neutral:same_speaker") if unrelated else None
    source = pool if kind == "other_dialogue" else personas
    for _ in range(20):  # rejection sampling: another conversation, no shared content word
        who, text = source[rng.randrange(len(source))]
        if kind == "edited_other_persona":
            edit = contradict(text)
            text = edit.text if edit is not None else ""
        if text and who // 2 != speaker // 2 and not need & content(text):
            return text, f"neutral:{kind}"
    return None


def read_stats(out_dir: str | os.PathLike) -> dict:
    return json.loads((pathlib.Path(out_dir) / STATS_FILE).read_text())
