"""Generic persona-dialogue JSONL, e.g. JPersonaChat converted by the user (its licence forbids
shipping it).

One dialogue per line, utterances alternating between two speakers, oldest first:

    {"persona": ["私は..."], "dialogue": ["u0", "u1", "u2", ...], "persona_speaker": 1, "id": "d17"}

`persona` belongs to speaker `persona_speaker` (default 1: utterances 1, 3, 5, ... are the bot's,
so the partner opens); speaker 0 owns utterances 0, 2, 4, .... With `"personas": [p0, p1]` instead,
both speakers become bots, each with their own persona. Each bot utterance is one record whose
history is every earlier utterance. `id` is optional (default `<file name>/<line index>`).
"""
from __future__ import annotations

import os
from typing import Any

from pdpo_jax.data.records import DataFormatError, PersonaTurn
from pdpo_jax.data.textio import dataset_name, json_lines, require_persona, string_list


def read_dialogue_jsonl(path: str | os.PathLike) -> list[PersonaTurn]:
    """Every bot utterance of a generic persona-dialogue JSONL file, in file order."""
    name, records = dataset_name(path), []
    for index, (line, obj) in enumerate(json_lines(path)):
        dialogue_id = str(obj.get("id", f"{name}/{index}"))
        dialogue = string_list(path, line, obj.get("dialogue"), "dialogue")
        if not dialogue:
            raise DataFormatError(path, line, "empty 'dialogue'", "give at least one utterance")
        bots = _bot_personas(path, line, obj)
        # Utterance order, so a both-speaker dialogue stays in conversation order.
        owners = sorted((i, persona) for speaker, persona in bots.items()
                        for i in range(speaker, len(dialogue), 2))
        records += [PersonaTurn(dialogue_id, persona, dialogue[:i], dialogue[i]) for i, persona in owners]
    return records


def _bot_personas(path: Any, line: int, obj: dict[str, Any]) -> dict[int, tuple[str, ...]]:
    """{speaker: persona} for the speakers that become bots."""
    if "personas" in obj:
        personas = obj["personas"]
        if not isinstance(personas, list) or len(personas) != 2:
            raise DataFormatError(path, line, f"'personas' must be two lists, got {str(personas)[:80]!r}",
                                  "write personas as [[speaker-0 sentences], [speaker-1 sentences]]")
        return {s: require_persona(path, line, p, f"personas[{s}]") for s, p in enumerate(personas)}
    speaker = obj.get("persona_speaker", 1)
    if speaker not in (0, 1) or isinstance(speaker, bool):
        raise DataFormatError(path, line, f"persona_speaker {speaker!r} is not 0 or 1",
                              "set persona_speaker to 0 (even utterances) or 1 (odd utterances)")
    return {speaker: require_persona(path, line, obj.get("persona"))}
