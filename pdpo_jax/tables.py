"""Markdown tables, the one way reports and benchmarks write them."""
from __future__ import annotations

import math
from collections.abc import Sequence


def cell(x: object, float_format: str = "{:.1f}") -> str:
    """A table cell: floats in `float_format`, NaN as '–', anything else as str."""
    if isinstance(x, float):
        return "–" if math.isnan(x) else float_format.format(x)
    return str(x)


def table_head(columns: Sequence[str]) -> list[str]:
    """A table's header line and its separator, one cell per column."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def table_row(cells: Sequence[object], width: int | None = None, float_format: str = "{:.1f}") -> str:
    """One row; padded with empty cells up to `width` columns (a FAILED row, say)."""
    cells = [cell(x, float_format) for x in cells]
    if width is not None:
        if len(cells) > width:
            raise ValueError(f"{len(cells)} cells do not fit a {width}-column table")
        cells += [""] * (width - len(cells))
    return "| " + " | ".join(cells) + " |"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
                   float_format: str = "{:.1f}") -> str:
    """A GitHub markdown table; floats in `float_format` (one decimal), NaN as '–'."""
    return "\n".join([*table_head(headers),
                      *(table_row(row, len(headers), float_format) for row in rows)])
