"""What the annotator reads: the judge's instructions (paper App. D) and the page's words.

The instructions are the LLM judge's own prompt (`pdpo_jax.eval.judge`, English or Japanese)
without its output-format part, as in the paper: the paragraphs before the placeholders, less
the paragraph that prescribes [[1]]/[[2]]/[[3]] and the sentence that asks for a written
explanation (annotators answer with a button). Section headings ("[Persona]", "[Assistant 1's
reply]") and history speaker labels come from the same template, so humans and judge see the
same words.
"""
from __future__ import annotations

import dataclasses
import re

from pdpo_jax.eval.judge import PLACEHOLDERS, JudgeTemplate, load_template

LANGS = {"en": "english", "ja": "japanese"}
_WRITTEN_EXPLANATION = re.compile(r"explain|説明")
_SENTENCE = re.compile(r"[^.。]+[.。]?\s*")  # a sentence with its end and the space after

UI = {
    "en": {
        "title": "Human evaluation",
        "sign_in": "Sign in", "name": "Your name", "token": "Your personal token",
        "signed_in_as": "Annotator: {name}", "sign_out": "Sign out",
        "instructions": "Instructions",
        "how": "Choose the better reply with the buttons or the keys 1 (reply 1 is better), "
               "2 (reply 2 is better) and 3 (tie). Back (Backspace) reopens your last answer.",
        "progress": "{done} of {quota} judged",
        "better_1": "1 is better", "better_2": "2 is better", "tie": "Tie",
        "back": "← Back (undo last answer)",
        "done": "You have judged {done} of {quota} pairs. Thank you!",
        "none_left": "No pair is waiting for you at the moment (all have their judgments). "
                     "You judged {done}. Thank you!",
        "saving": "Saving…", "error": "Error",
    },
    "ja": {
        "title": "人手評価",
        "sign_in": "サインイン", "name": "お名前", "token": "個人用トークン",
        "signed_in_as": "評価者: {name}", "sign_out": "サインアウト",
        "instructions": "評価の手順",
        "how": "ボタンまたはキーで、より良い応答を選んでください:1(応答1が良い)、2(応答2が良い)、"
               "3(同程度)。「戻る」(Backspace)で直前の判定を取り消してやり直せます。",
        "progress": "{quota}件中{done}件 評価済み",
        "better_1": "1の方が良い", "better_2": "2の方が良い", "tie": "同程度",
        "back": "← 戻る(直前の判定を取り消す)",
        "done": "{quota}件中{done}件の評価が終わりました。ご協力ありがとうございました。",
        "none_left": "現在、割り当てられる組はありません(すべて必要な評価数に達しました)。"
                     "{done}件を評価していただきました。ありがとうございました。",
        "saving": "保存中…", "error": "エラー",
    },
}


@dataclasses.dataclass(frozen=True)
class Texts:
    """One language's page text. headings: placeholder -> section title (from the template)."""

    lang: str
    instructions: tuple[str, ...]
    headings: dict[str, str]
    speakers: tuple[str, str]
    ui: dict[str, str]


def texts(lang: str) -> Texts:
    """The page text for 'en' or 'ja' (the judge's 'english' or 'japanese' template)."""
    if lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}; use --lang {' or '.join(LANGS)}")
    template = load_template(LANGS[lang])
    return Texts(lang, instructions(template), headings(template), template.speakers, UI[lang])


def _paragraphs(template: JudgeTemplate) -> list[str]:
    return [p.strip() for p in template.text.split("\n\n") if p.strip()]


def instructions(template: JudgeTemplate) -> tuple[str, ...]:
    """The instruction paragraphs: before the first placeholder, without the output format."""
    out = []
    for paragraph in _paragraphs(template):
        if any("{" + p + "}" in paragraph for p in PLACEHOLDERS):
            break
        if "[[" in paragraph:  # "[[1]] if Assistant 1's reply is better, ..."
            continue
        kept = "".join(s for s in _SENTENCE.findall(paragraph)
                       if not _WRITTEN_EXPLANATION.search(s)).strip()
        if kept:
            out.append(kept)
    return tuple(out)


def headings(template: JudgeTemplate) -> dict[str, str]:
    """{placeholder: title} from the '[Title]' line above each placeholder."""
    out = {}
    for paragraph in _paragraphs(template):
        for name in PLACEHOLDERS:
            if "{" + name + "}" in paragraph:
                title = paragraph.splitlines()[0].strip()
                out[name] = title[1:-1] if title.startswith("[") and title.endswith("]") else title
    missing = [p for p in PLACEHOLDERS if p not in out]
    if missing:
        raise ValueError(f"judge template {template.name!r}: no '[Title]' line above {missing}")
    return out
