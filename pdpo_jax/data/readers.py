"""One entry point for persona-dialogue files, picked by file name (configs name only a path)."""
from __future__ import annotations

import os

from pdpo_jax.data.dialogue_jsonl import read_dialogue_jsonl
from pdpo_jax.data.personachat import read_fbdialog, read_hf_personachat
from pdpo_jax.data.records import PersonaTurn
from pdpo_jax.data.synthetic import read_synthetic_persona_chat
from pdpo_jax.errors import UserError

_READERS = {".txt": read_fbdialog, ".csv": read_synthetic_persona_chat,
            ".json": read_hf_personachat, ".jsonl": read_dialogue_jsonl}


def read_turns(path: str | os.PathLike, **kwargs) -> list[PersonaTurn]:
    """PersonaTurns from .txt (ParlAI FbDialog), .csv (Synthetic-Persona-Chat), .json (HF
    PersonaChat; pass split=) or .jsonl (generic dialogue JSONL), each optionally .gz."""
    name = os.fspath(path).removesuffix(".gz")
    suffix = os.path.splitext(name)[1]
    if suffix not in _READERS:
        raise UserError(f"{path}: unknown persona-dialogue format {suffix!r}; expected one of "
                        f"{sorted(_READERS)} (optionally .gz)")
    return _READERS[suffix](path, **kwargs)
