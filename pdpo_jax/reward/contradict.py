"""Rule-based contradictions of first-person sentences, for the substitute NLI set.

`contradict("I have a dog.")` → `Edit("I do not have a dog.", "have_negated", "have")`. Each
rule rewrites the sentence's opening ("I am", "I have", "I love", "My X is", …) so that the
result states the opposite of the original *about the speaker*: a negation inserted or
removed, love ↔ hate, an adjective swapped for its antonym. Only the opening is rewritten;
the rest of the sentence is kept, so a later clause ("I love dogs and hate cats") can make the
edit a weaker contradiction than intended: that is part of the set's label noise
(data/README.md). A sentence no rule fits gives None.

`family` groups rules by the construction they edit ("be", "have", "like", "can", "verb",
"favorite", "my_be"); the builder edits an utterance only where it opens with the same
construction as the persona sentence it matched, so the edited clause is the matching one.
"""
from __future__ import annotations

import dataclasses
import re

# Adverbs dropped between "I" and the verb before a rule applies ("I only drink water").
_ADVERBS = ("also", "just", "only", "really", "currently", "recently", "usually", "still",
            "often", "actually", "truly", "mostly", "always")
ANTONYMS = {"tall": "short", "short": "tall", "old": "young", "young": "old", "happy": "sad",
            "sad": "unhappy", "rich": "poor", "poor": "rich", "married": "single",
            "single": "married", "introverted": "extroverted", "extroverted": "introverted",
            "introvert": "extrovert", "extrovert": "introvert", "big": "small", "small": "big",
            "healthy": "unhealthy", "shy": "outgoing", "outgoing": "shy", "lazy": "active",
            "active": "lazy", "quiet": "loud", "loud": "quiet", "religious": "atheist"}
# Verbs (present tense) that `I <verb> …` negates as `I do not <verb> …`.
_VERBS = frozenset("""work live drive eat spend go run collect write play read listen try teach
speak study restore keep lift own hope attend cook rent share get know use watch care find want
need make sing volunteer travel take wear prefer paint bake draw dance swim ride fish hunt grow
build fix sell buy visit wish plan believe think feel love like enjoy hate smoke drink shop
walk sleep bike hike knit sew climb surf ski skate golf jog box lead manage raise own""".split())
_IRREGULAR_PAST = frozenset("""grew went ran met got had made took lost won left broke fell saw
came wrote drove ate spent taught sold bought built became began""".split())
_LIKE = ("love", "like", "enjoy", "adore")
_DISLIKE = ("hate", "dislike", "despise", "detest")
_PARTICIPLES = frozenset("been had done seen gone won lost met made traveled travelled lived "
                         "worked visited always ever".split())


@dataclasses.dataclass(frozen=True)
class Edit:
    text: str
    rule: str
    family: str


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _words(sentence: str) -> list[str]:
    return sentence.strip().split()


def _be(rest: list[str], be: str) -> Edit | None:
    """`I am …` / `I'm …` / `I was …`: remove a negation, swap an antonym, or insert `not`."""
    while rest and rest[0].lower() in _ADVERBS:
        rest = rest[1:]
    if not rest:
        return None
    if rest[0].lower() == "not":
        return Edit(f"I {be} " + " ".join(rest[1:]), "be_not_removed", "be")
    has_article = rest[0].lower() in ("a", "an") and len(rest) > 1
    adjective = rest[1 if has_article else 0].lower().strip(".,!")
    if adjective in ANTONYMS:
        swapped = ANTONYMS[adjective]
        head = [_article(swapped), swapped] if has_article else [swapped]
        tail = rest[2 if has_article else 1:]
        end = rest[1 if has_article else 0][len(adjective):]  # keep trailing punctuation
        return Edit(f"I {be} " + " ".join(head) + end + (" " + " ".join(tail) if tail else ""),
                    "be_antonym", "be")
    return Edit(f"I {be} not " + " ".join(rest), "be_negated", "be")


def _have(rest: list[str]) -> Edit | None:
    if not rest or rest[0].lower() in ("to", "got"):
        return None  # "I have to …" is an obligation, "I have got …" rare: no rule
    if rest[0].lower() in ("never", "not"):
        return Edit("I have " + " ".join(rest[1:]), "have_negation_removed", "have")
    if rest[0].lower() in _PARTICIPLES or rest[0].lower().endswith("ed"):
        return Edit("I have never " + " ".join(rest), "have_never", "have")
    return Edit("I do not have " + " ".join(rest), "have_negated", "have")


def _verb(verb: str, rest: list[str]) -> Edit | None:
    low = verb.lower()
    if low in _LIKE:
        return Edit("I hate " + " ".join(rest), "love_to_hate", "like")
    if low in _DISLIKE:
        return Edit("I love " + " ".join(rest), "hate_to_love", "like")
    if low in ("cannot", "can't"):
        return Edit("I can " + " ".join(rest), "can_negation_removed", "can")
    if low == "can":
        return Edit("I cannot " + " ".join(rest), "can_negated", "can")
    if low == "will":
        return Edit("I will not " + " ".join(rest), "will_negated", "verb")
    if low in ("never",):
        return Edit("I " + " ".join(rest), "never_removed", "verb")
    if low in _VERBS:
        return Edit(f"I do not {verb} " + " ".join(rest), "verb_negated", "verb")
    if low in _IRREGULAR_PAST or (low.endswith("ed") and len(low) > 4):
        return Edit(f"I never {verb} " + " ".join(rest), "past_never", "verb")
    return None


def _first_person(words: list[str]) -> Edit | None:
    """Sentences opening with I / I'm / I've."""
    head, rest = words[0].lower(), words[1:]
    if head in ("i'm", "i’m"):
        return _be(rest, "am")
    if head in ("i've", "i’ve"):
        return _have(rest)
    if head != "i" or not rest:
        return None
    while rest and rest[0].lower() in _ADVERBS:
        rest = rest[1:]
    if len(rest) < 2:
        return None
    verb, tail = rest[0], rest[1:]
    if verb.lower() in ("am", "was"):
        return _be(tail, verb.lower())
    if verb.lower() in ("do", "don't", "don’t") and (verb.lower() != "do" or tail[0].lower() == "not"):
        tail = tail[1:] if verb.lower() == "do" else tail
        return Edit("I " + " ".join(tail), "do_not_removed", "verb") if tail else None
    if verb.lower() == "have":
        return _have(tail)
    return _verb(verb, tail)


_FAVORITE = re.compile(r"^my (favou?rite) ([\w ]+?) (is|are) (.+)$", re.IGNORECASE)
_MY_BE = re.compile(r"^my ([\w ]+?) (is|are|was|were) (not )?(.+)$", re.IGNORECASE)
_IS_MY_FAVORITE = re.compile(r"^(.+?) (is|are) my (favou?rite .+)$", re.IGNORECASE)


def favorite_slot(sentence: str) -> tuple[str, str] | None:
    """("color", "blue") for "My favorite color is blue." (the builder swaps values)."""
    m = _FAVORITE.match(sentence.strip())
    return (m.group(2).lower(), m.group(4).rstrip(".!").strip()) if m else None


def _my_verb(sentence: str) -> Edit | None:
    """`My parents live in X` → `My parents do not live in X`; `My mom works …` → `does not work`
    (a subject of one or two words after "My")."""
    words = sentence.split()
    for k in (1, 2):
        if len(words) < k + 3:
            break
        subject, verb, rest = " ".join(words[1:1 + k]), words[1 + k].lower(), " ".join(words[2 + k:])
        for suffix in ("es", "s"):
            if verb.endswith(suffix) and verb[:-len(suffix)] in _VERBS:
                return Edit(f"My {subject} does not {verb[:-len(suffix)]} {rest}", "my_verb_negated",
                            "my_be")
        if verb in _VERBS:
            return Edit(f"My {subject} do not {verb} {rest}", "my_verb_negated", "my_be")
    return None


def _possessive(sentence: str) -> Edit | None:
    m = _IS_MY_FAVORITE.match(sentence)
    if m and len(m.group(1).split()) <= 4:
        return Edit(f"{_cap(m.group(1))} {m.group(2)} not my {m.group(3)}", "favorite_negated",
                    "favorite")
    m = _MY_BE.match(sentence)
    if not m:
        return _my_verb(sentence)
    family = "favorite" if _FAVORITE.match(sentence) else "my_be"
    if m.group(3):  # "My X is not Y" -> "My X is Y"
        return Edit(f"My {m.group(1)} {m.group(2)} {m.group(4)}", "my_be_not_removed", family)
    return Edit(f"My {m.group(1)} {m.group(2)} not {m.group(4)}", "my_be_negated", family)


def contradict(sentence: str) -> Edit | None:
    """A sentence contradicting `sentence` (an Edit with the rule and its family), or None."""
    sentence = " ".join(sentence.split())
    words = _words(sentence)
    if len(words) < 2 or sentence.endswith("?"):
        return None
    edit = _possessive(sentence) if words[0].lower() == "my" or " my favo" in sentence.lower() \
        else _first_person(words)
    if edit is None or edit.text.strip(" .!").lower() == sentence.strip(" .!").lower():
        return None
    return dataclasses.replace(edit, text=_cap(edit.text.strip()))
