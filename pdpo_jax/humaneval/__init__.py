"""Human evaluation of pairwise comparisons (paper §4.3, Table 3; annotation tool of App. D).

    python -m pdpo_jax.humaneval serve --pairs runs/x/eval/judge --db annotations.sqlite --lang ja
    python -m pdpo_jax.humaneval report --db annotations.sqlite --judge runs/x/eval/judge

The judge stage's comparisons.jsonl holds the pairs (`load_pairs`); `Store` keeps annotators,
assignments and judgments in SQLite; `create_app` serves the annotation pages (FastAPI, run by
`pdpo_jax.asgi`); `write_report` compares the human majority with the LLM judge. Serving needs
no model and imports no jax: the report's modules load on first use.
"""
from pdpo_jax._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".pairs": ("Pair", "PairsError", "load_pairs"),
    ".store": ("Store", "StoreError", "read_judgments"),
    ".texts": ("texts",),
    ".app": ("Study", "create_app"),
    ".analysis": ("analyse", "collect", "cohen_kappa", "fleiss_kappa", "majority"),
    ".report": ("write_report",),
})
