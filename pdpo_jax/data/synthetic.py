"""Synthetic-Persona-Chat reader (Jandaghi et al., 2023; CC-BY 4.0).

CSV columns `user 1 personas`, `user 2 personas` (newline-separated sentences) and
`Best Generated Conversation` (newline-separated `User 1: ...` / `User 2: ...` lines). Both speakers
become bots: each turn of user X is a record with user X's persona and every earlier turn as history.

The conversations are LLM-generated and a few are untidy, so cleaning is explicit and counted:
- speaker tags may carry markdown (`* * User 1: * *`, `*User 2:*`); the decoration is removed;
- untagged lines (stage directions like `[Later]`, `* * *`, recipe lists, narration) are dropped;
- consecutive lines of one speaker are joined with a space, so turns alternate;
- conversations with no speaker tag at all are skipped (their speakers are unknown).
Counts go to the `SpcCleaning` returned by `read_spc_conversations` and to a logged warning.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

from pdpo_jax.data.records import DataFormatError, PersonaTurn
from pdpo_jax.data.textio import dataset_name, read_text, require_persona

log = logging.getLogger(__name__)

PERSONA_COLUMNS = ("user 1 personas", "user 2 personas")
CONVERSATION_COLUMN = "Best Generated Conversation"
_TAG = re.compile(r"[\s*_#>-]*user\s*([12])\s*[:：][\s*_]*(.*)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class SpcConversation:
    """personas[s - 1] is user s's persona; turns are (speaker 1|2, text), alternating."""

    dialogue_id: str
    personas: tuple[tuple[str, ...], tuple[str, ...]]
    turns: tuple[tuple[int, str], ...]


@dataclasses.dataclass
class SpcCleaning:
    """What cleaning did to a file (see the module docstring)."""

    conversations: int = 0
    skipped_untagged_conversations: list[int] = dataclasses.field(default_factory=list)  # CSV lines
    tagged_lines: int = 0
    dropped_lines: int = 0
    merged_same_speaker_lines: int = 0


def read_synthetic_persona_chat(path: str | os.PathLike,
                                speakers: Sequence[int] = (1, 2)) -> list[PersonaTurn]:
    """Every turn of the given speakers as a PersonaTurn, conversation by conversation."""
    conversations, _ = read_spc_conversations(path)
    records = []
    for conv in conversations:
        texts = tuple(text for _, text in conv.turns)
        for i, (speaker, text) in enumerate(conv.turns):
            if speaker in speakers:
                records.append(PersonaTurn(conv.dialogue_id, conv.personas[speaker - 1],
                                           texts[:i], text))
    return records


def read_spc_conversations(path: str | os.PathLike) -> tuple[list[SpcConversation], SpcCleaning]:
    """The cleaned conversations of a Synthetic-Persona-Chat CSV and what cleaning did."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""), restval=None)
    missing = [c for c in (*PERSONA_COLUMNS, CONVERSATION_COLUMN) if c not in (reader.fieldnames or ())]
    if missing:
        raise DataFormatError(path, 1, f"header {reader.fieldnames} lacks columns {missing}",
                              "use the Synthetic-Persona-Chat CSV with its original header")
    name, cleaning, conversations = dataset_name(path), SpcCleaning(), []
    start = reader.line_num + 1
    for index, row in enumerate(reader):
        conv = _conversation(path, start, f"{name}/{index}", row, cleaning)
        if conv is not None:
            conversations.append(conv)
        start = reader.line_num + 1
    cleaning.conversations = len(conversations)
    if cleaning.skipped_untagged_conversations or cleaning.dropped_lines:
        log.warning("%s: skipped %d conversations without speaker tags (CSV lines %s), dropped %d "
                    "untagged lines, joined %d same-speaker lines", path,
                    len(cleaning.skipped_untagged_conversations),
                    cleaning.skipped_untagged_conversations, cleaning.dropped_lines,
                    cleaning.merged_same_speaker_lines)
    return conversations, cleaning


def _conversation(path: Any, line: int, dialogue_id: str, row: dict[str, Any],
                  cleaning: SpcCleaning) -> SpcConversation | None:
    columns = (*PERSONA_COLUMNS, CONVERSATION_COLUMN)
    absent = [c for c in columns if row.get(c) is None]
    if absent:
        raise DataFormatError(path, line, f"row has no value for columns {absent}",
                              "every row needs both personas and the conversation; fix the quoting")
    personas = tuple(require_persona(path, line, row[c].split("\n"), repr(c)) for c in PERSONA_COLUMNS)
    turns = _turns(row[CONVERSATION_COLUMN], cleaning)
    if not turns:
        cleaning.skipped_untagged_conversations.append(line)
        return None
    return SpcConversation(dialogue_id, personas, turns)


def _turns(conversation: str, cleaning: SpcCleaning) -> tuple[tuple[int, str], ...]:
    turns: list[list[Any]] = []
    for raw in conversation.split("\n"):
        match = _TAG.fullmatch(raw.strip())
        if match is None or not match.group(2).strip():
            cleaning.dropped_lines += bool(raw.strip())  # untagged, or a tag with no text
            continue
        cleaning.tagged_lines += 1
        speaker, text = int(match.group(1)), match.group(2).strip()
        if turns and turns[-1][0] == speaker:
            cleaning.merged_same_speaker_lines += 1
            turns[-1][1] += " " + text
        else:
            turns.append([speaker, text])
    return tuple((s, t) for s, t in turns)
