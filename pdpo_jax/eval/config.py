"""Evaluation settings: the `eval:` section of a run config (frozen dataclasses, like the rest).

    eval:
      checkpoints: [sft, dpo]          # stage names of this run, HF folders, or label=folder
      max_examples: 200                # DNLI subset (round-robin over relation groups)
      judge:
        backend: openai                # or local (an HF checkpoint through our sampler)
        model: gpt-4o-2024-08-06       # key read from $OPENAI_API_KEY, URL from $OPENAI_BASE_URL
        comparisons: 600
      responses:
        num_histories: 200
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Literal


@dataclasses.dataclass(frozen=True)
class ResponseSection:
    """How the compared checkpoints answer the test histories (the judge sees these)."""
    num_histories: int = 200       # test histories drawn (seeded) from the dev/test records
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    greedy: bool = False
    seed: int = 0
    batch_size: int = 16
    max_prompt_tokens: int = 448   # oldest history turns are dropped beyond this


@dataclasses.dataclass(frozen=True)
class JudgeSection:
    """The pairwise LLM judge and its tournament (paper Section 4.2, Appendix C)."""
    backend: Literal["openai", "local"] = "openai"
    model: str = "gpt-4o-2024-08-06"
    base_url_env: str = "OPENAI_BASE_URL"  # unset: https://api.openai.com/v1
    api_key_env: str = "OPENAI_API_KEY"
    template: str = "english"              # english | japanese | path to a template file
    comparisons: int = 100
    concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 5                   # per request, on 429 / 5xx / timeouts / bad bodies
    parse_retries: int = 2                 # re-asks when the answer holds no [[1]]/[[2]]/[[3]]
    seed: int = 0
    local_checkpoint: str = ""             # backend=local: HF folder with its tokenizer
    max_new_tokens: int = 512
    cache: str = ""                        # SQLite file; empty: <out_dir>/judge/judgments.sqlite
    bootstrap: int = 1000                  # Bradley–Terry bootstrap resamples

    @property
    def base_url(self) -> str:
        return os.environ.get(self.base_url_env) or "https://api.openai.com/v1"


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """Which checkpoints to evaluate and how (DNLI ranking and the judge tournament)."""
    checkpoints: tuple[str, ...] = ("sft", "dpo")
    dnli_files: tuple[str, ...] = ()       # empty: the embedded DNLI eval files
    max_examples: int | None = None        # None: all 542
    batch_size: int = 32
    normalise: Literal["sum", "mean", "both"] = "both"
    max_prompt_tokens: int | None = None   # DNLI prompts are cut (oldest turns first) beyond this
    judge: JudgeSection = JudgeSection()
    responses: ResponseSection = ResponseSection()

    @property
    def normalisations(self) -> tuple[str, ...]:
        return ("sum", "mean") if self.normalise == "both" else (self.normalise,)


def resolve_checkpoints(entries: tuple[str, ...] | list[str],
                        run_dir: str | os.PathLike | None = None) -> dict[str, pathlib.Path]:
    """{label: HF folder} from `eval.checkpoints` entries.

    An entry is `label=folder`, a bare folder (label = its name, or its parent's name for a
    stage's `best` folder), or a stage name of this run (`sft` → <run_dir>/sft/best).
    """
    out: dict[str, pathlib.Path] = {}
    for entry in entries:
        label, _, path = entry.rpartition("=") if "=" in entry else ("", "", entry)
        folder = pathlib.Path(path)
        if run_dir is not None and not folder.is_dir() and (pathlib.Path(run_dir) / path / "best").is_dir():
            folder = pathlib.Path(run_dir) / path / "best"
            label = label or path
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"eval.checkpoints entry {entry!r}: {folder} is not an HF "
                                    "checkpoint folder (no config.json); give a folder, "
                                    "label=folder, or a finished stage name")
        label = label or (folder.parent.name if folder.name == "best" else folder.name)
        if label in out:
            raise ValueError(f"eval.checkpoints: two entries are labelled {label!r}; "
                             "name them with label=folder")
        out[label] = folder
    return out
