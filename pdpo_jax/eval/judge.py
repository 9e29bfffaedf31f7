"""Pairwise judge prompts: templates, rendering a comparison, and reading the verdict.

The protocol follows the paper's Appendix C (instructions here are our own wording): the judge
sees the persona, the dialogue so far and two replies, is asked which reply better plays the
persona and is preferable, is told to ignore order, length and names, explains briefly, and
ends with [[1]] (reply 1 better), [[2]] (reply 2 better) or [[3]] (tie).

A template is plain text with four placeholders, each filled exactly once:
{persona}, {history}, {response_1}, {response_2}. Other braces are left alone, so a template
file may contain JSON or code examples.
"""
from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import re
import unicodedata
from collections.abc import Sequence

from pdpo_jax.errors import UserError

PLACEHOLDERS = ("persona", "history", "response_1", "response_2")

ENGLISH = """\
Two assistants received the same conversation and were each asked to write the next reply while \
staying in character as the persona described below. You are given the persona, the conversation \
so far, and the reply of each assistant. Judge which reply portrays the persona more faithfully \
and is the better reply overall.

First compare the two replies and explain briefly which aspects make one of them better. Be \
impartial: the order in which the replies are shown must not influence you, a reply is not better \
because it is longer or shorter, and the assistant numbers mean nothing. Be as objective as you can.

After your explanation, state your final decision in exactly this format: [[1]] if Assistant 1's \
reply is better, [[2]] if Assistant 2's reply is better, or [[3]] if they are equally good.

[Persona]
{persona}

[Conversation]
{history}

[Assistant 1's reply]
{response_1}

[Assistant 2's reply]
{response_2}
"""

JAPANESE = """\
2つのアシスタントに同じ会話を渡し、下記のペルソナになりきって次の発話を返すよう依頼しました。\
ペルソナ、これまでの会話、各アシスタントの応答を示します。どちらの応答がペルソナをより忠実に\
表現しており、応答として全体的に優れているかを判定してください。

まず2つの応答を比べ、どのような点でどちらが優れているかを簡潔に説明してください。公平に判断し、\
応答が示された順番に左右されないでください。応答が長い・短いことだけで優劣を決めず、\
アシスタントの番号にも意味はありません。できる限り客観的に評価してください。

説明の後、最終的な判定を必ず次の形式で書いてください:アシスタント1の応答が優れていれば[[1]]、\
アシスタント2の応答が優れていれば[[2]]、同程度であれば[[3]]。

[ペルソナ]
{persona}

[会話]
{history}

[アシスタント1の応答]
{response_1}

[アシスタント2の応答]
{response_2}
"""

_BUILTIN = {"english": ENGLISH, "japanese": JAPANESE}
# Speaker labels for the history: the persona holder is the "assistant" being judged.
_SPEAKERS = {"english": ("User", "Assistant"), "japanese": ("ユーザー", "アシスタント")}
_PLACEHOLDER_RE = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")
_VERDICT_RE = re.compile(r"\[\[\s*([123])\s*\]\]")


@dataclasses.dataclass(frozen=True)
class JudgeTemplate:
    """Judge instructions with the four placeholders; `speakers` label the history turns."""

    name: str
    text: str
    speakers: tuple[str, str] = _SPEAKERS["english"]

    def __post_init__(self):
        found = _PLACEHOLDER_RE.findall(self.text)
        missing = [p for p in PLACEHOLDERS if p not in found]
        repeated = sorted({p for p in found if found.count(p) > 1})
        problems = ([f"{_braced(missing)} missing"] if missing else []) + \
                   ([f"{_braced(repeated)} repeated"] if repeated else [])
        if problems:
            raise ValueError(f"judge template {self.name!r}: placeholder(s) {' and '.join(problems)}; "
                             f"a template needs each of {_braced(PLACEHOLDERS)} exactly once "
                             "(set judge.template to 'english', 'japanese' or a fixed file)")

    @property
    def hash(self) -> str:
        """Identifies the instructions in the judgment cache (16 hex digits of sha256)."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:16]

    def render(self, persona: Sequence[str], history: Sequence[str], response_1: str,
               response_2: str) -> str:
        """The judge's user message for one ordered pair of replies."""
        values = {"persona": "\n".join(f"- {p}" for p in persona),
                  "history": self._history(history),
                  "response_1": response_1.strip() or "(empty reply)",
                  "response_2": response_2.strip() or "(empty reply)"}
        # One pass: a reply that itself contains "{response_2}" is not substituted again.
        return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], self.text)

    def _history(self, history: Sequence[str]) -> str:
        """Oldest first; the last turn is the partner's and speakers alternate backwards."""
        partner, persona_holder = self.speakers
        n = len(history)
        return "\n".join(f"{partner if (n - 1 - j) % 2 == 0 else persona_holder}: {turn}"
                         for j, turn in enumerate(history)) or "(no earlier turns)"


def _braced(names: Sequence[str]) -> str:
    return ", ".join("{" + n + "}" for n in names)


def load_template(spec: str) -> JudgeTemplate:
    """'english', 'japanese', or the path of a UTF-8 template file (history speakers are labelled
    in Japanese when the file contains kana, else in English)."""
    if spec in _BUILTIN:
        return JudgeTemplate(spec, _BUILTIN[spec], _SPEAKERS[spec])
    path = pathlib.Path(spec)
    if not path.is_file():
        raise UserError(f"judge template {spec!r} is neither a built-in "
                        f"({sorted(_BUILTIN)}) nor a file; set judge.template")
    text = path.read_text(encoding="utf-8")
    japanese = re.search(r"[\u3040-\u30ff]", text) is not None
    return JudgeTemplate(str(path), text, _SPEAKERS["japanese" if japanese else "english"])


def parse_verdict(answer: str | None) -> int | None:
    """1, 2 or 3 from the LAST [[n]] in the answer (the judge may quote the format while
    explaining); full-width brackets and digits count. None when there is no verdict."""
    if not answer:
        return None
    matches = _VERDICT_RE.findall(unicodedata.normalize("NFKC", answer))
    return int(matches[-1]) if matches else None
