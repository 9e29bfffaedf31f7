"""PersonaChat / ConvAI2 readers: ParlAI FbDialog text files and the HF JSON layout.

FbDialog (`valid_self_original_no_cands.txt`, `*_revised*`, `both_*`, with or without candidates):
each line is `N text`, N restarting at 1 for each dialogue. `N your persona: ...` lines give the
bot's persona (`partner's persona: ...` lines, in `both_*` files, are skipped), and every other line is
`N partner utterance<TAB>bot response[<TAB><TAB>cand1|cand2|...]`. The partner speaks first, so the
history of turn k is every earlier partner and bot utterance plus the current partner utterance.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

from pdpo_jax.data.records import DataFormatError, PersonaTurn
from pdpo_jax.data.textio import dataset_name, numbered_lines, read_text, require_persona

# ParlAI marks "the bot speaks first" with a silent partner turn; it is not history.
SILENCE = frozenset({"__SILENCE__", "__ SILENCE __"})
_LINE = re.compile(r"(\d+) (.*)")
_SELF_PERSONA = "your persona:"
_PARTNER_PERSONA = "partner's persona:"


@dataclasses.dataclass
class _Dialogue:
    first_line: int
    persona: list[str] = dataclasses.field(default_factory=list)
    turns: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def read_fbdialog(path: str | os.PathLike) -> list[PersonaTurn]:
    """Every bot turn of a ParlAI FbDialog PersonaChat file, in file order."""
    name = dataset_name(path)
    records = []
    for index, dialogue in enumerate(_fbdialog_dialogues(path)):
        persona = require_persona(path, dialogue.first_line, dialogue.persona)
        history: list[str] = []
        for partner, response in dialogue.turns:
            if partner not in SILENCE:
                history.append(partner)
            records.append(PersonaTurn(f"{name}/{index}", persona, tuple(history), response))
            history.append(response)
    return records


def _fbdialog_dialogues(path: str | os.PathLike) -> list[_Dialogue]:
    dialogues: list[_Dialogue] = []
    previous = 0
    for number, line in numbered_lines(read_text(path)):
        if not line.strip():
            continue
        match = _LINE.fullmatch(line)
        if match is None:
            raise DataFormatError(path, number, f"line {line[:80]!r} does not start with a turn "
                                  "number and a space", "FbDialog lines are `N text`; fix the line")
        n, text = int(match.group(1)), match.group(2)
        if n == 1:
            dialogues.append(_Dialogue(first_line=number))
        elif n != previous + 1 or not dialogues:
            raise DataFormatError(path, number, f"turn number {n} follows {previous}",
                                  "numbers count 1, 2, ... within a dialogue; a new dialogue starts at 1")
        previous = n
        _add_line(path, number, dialogues[-1], text)
    for dialogue in dialogues:
        if not dialogue.turns:
            raise DataFormatError(path, dialogue.first_line, "dialogue has persona lines but no turns",
                                  "the file looks truncated; restore the dialogue or remove it")
    return dialogues


def _add_line(path: Any, number: int, dialogue: _Dialogue, text: str) -> None:
    if text.startswith(_SELF_PERSONA) or text.startswith(_PARTNER_PERSONA):
        if dialogue.turns:
            raise DataFormatError(path, number, f"persona line {text[:80]!r} after dialogue turns",
                                  "persona lines come first in each dialogue")
        if text.startswith(_SELF_PERSONA):
            dialogue.persona.append(text[len(_SELF_PERSONA):].strip())
        return
    fields = text.split("\t")
    if len(fields) < 2:
        raise DataFormatError(path, number, f"dialogue line {text[:80]!r} has no tab",
                              "write `N partner utterance<TAB>bot response`")
    # ParlAI allows several |-separated labels; PersonaChat has one.
    partner, response = fields[0].strip(), fields[1].split("|")[0].strip()
    if not response:
        raise DataFormatError(path, number, f"empty bot response in {text[:80]!r}",
                              "every dialogue line needs a response after the tab")
    dialogue.turns.append((partner, response))


def read_hf_personachat(path: str | os.PathLike, split: str | None = None) -> list[PersonaTurn]:
    """PersonaChat in the HF / transfer-learning-conv-ai JSON layout.

    The file is `{"train": [dialogue, ...], "valid": [...]}` (pass `split`) or a list of dialogues;
    a dialogue is `{"personality": [...], "utterances": [{"history": [...], "candidates": [...]}]}`
    and the reference response of an utterance is its LAST candidate.
    """
    data = _json_file(path)
    name = dataset_name(path)
    if isinstance(data, dict):
        if split not in data:
            raise DataFormatError(path, None, f"split {split!r} not in the file's splits "
                                  f"{sorted(data)}", "pass split= one of those names")
        data, name = data[split], f"{name}/{split}"
    if not isinstance(data, list):
        raise DataFormatError(path, None, f"expected a list of dialogues, got {type(data).__name__}",
                              "use the HF PersonaChat JSON layout")
    return [turn for i, d in enumerate(data) for turn in _hf_dialogue(path, f"{name}/{i}", d)]


def _hf_dialogue(path: Any, dialogue_id: str, dialogue: Any) -> list[PersonaTurn]:
    where = f"dialogue {dialogue_id}"
    if not isinstance(dialogue, dict) or not isinstance(dialogue.get("utterances"), list):
        raise DataFormatError(path, None, f"{where} has no 'utterances' list",
                              "each dialogue is {'personality': [...], 'utterances': [...]}")
    persona = require_persona(path, None, dialogue.get("personality"), f"{where} 'personality'")
    turns = []
    for j, utterance in enumerate(dialogue["utterances"]):
        history, candidates = utterance.get("history"), utterance.get("candidates")
        if not isinstance(history, list) or not candidates or not isinstance(candidates, list):
            raise DataFormatError(path, None, f"{where} utterance {j} lacks 'history' or "
                                  "'candidates'", "each utterance is {'history': [...], 'candidates': [...]}")
        history = tuple(h for h in history if h not in SILENCE)
        turns.append(PersonaTurn(dialogue_id, persona, history, candidates[-1]))
    return turns


def _json_file(path: str | os.PathLike) -> Any:
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(path, e.lineno, f"not JSON ({e.msg} at column {e.colno})",
                              "fix the JSON syntax at that position") from None
