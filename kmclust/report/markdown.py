"""Markdown pieces of the report: a "mean ± s.d." cell and a table of strings.

Shared by the report's sections (kmclust.report.document, kmclust.report.choosing_k).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def pm(mean: float, std: float, dec: int) -> str:
    """``mean ± std`` with ``dec`` decimals; the mean alone without a std, "—" without a mean."""
    if not np.isfinite(mean):
        return "—"
    return f"{mean:.{dec}f}" if not np.isfinite(std) else f"{mean:.{dec}f} ± {std:.{dec}f}"


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame of strings as a GitHub Markdown table (no tabulate needed)."""
    head = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += [
        "| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)
    ]
    return "\n".join(lines)
