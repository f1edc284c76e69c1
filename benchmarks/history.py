"""A benchmark's outcome, and its record: a dated section at the end of BENCHMARKS.md's History.

BENCHMARKS.md opens with a hand-kept summary of the current figures; the
dated records below it are the evidence. History is the file's last
section, so a record appended at the end lands in it, never above the
summary; a file without one gets the heading first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from benchmarks.common import code_state

log = logging.getLogger(__name__)

HISTORY = "## History"
NEW_FILE = "# Benchmarks\n\nRecords appended by `jobs/bench.py`.\n"
HISTORY_HEAD = f"{HISTORY}\n\nDated records, oldest first; `jobs/bench.py` appends at the end.\n"


@dataclass
class Outcome:
    """One benchmark's figures, its markdown table and notes."""

    mode: str
    title: str
    figures: dict
    table: str
    notes: list[str] = field(default_factory=list)
    machine: dict = field(default_factory=dict)

    def text(self) -> str:
        return "\n".join([self.table, "", *self.notes])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats keep 3 significant digits (4 above 1000)."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return "–" if np.isnan(v) else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _has_history(path: Path) -> bool:
    with path.open(encoding="utf-8") as f:
        return any(line.rstrip() == HISTORY for line in f)


def record(path: str | Path, outcome: Outcome, command: str) -> None:
    """Append a dated section (machine, load, command, table, notes) to the History of ``path``."""
    m = outcome.machine
    path = Path(path)
    la0, la1 = m.get("loadavg", (0, 0, 0)), os.getloadavg()
    if not path.exists():
        head = [NEW_FILE, HISTORY_HEAD]
    else:
        head = [] if _has_history(path) else ["\n" + HISTORY_HEAD]
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    end_code = code_state()
    warn = []
    if m.get("code") and end_code != m["code"]:
        warn = [
            f"- WARNING: the engine's code changed during this run (at the end: {end_code}); "
            "driver and workers may have run different versions"
        ]
    versions = ", ".join(f"{k} {val}" for k, val in m.get("versions", {}).items())
    lines = [
        *head,
        f"### {stamp} — {outcome.title}",
        "",
        f"- command: `{command}`",
        f"- machine: {m.get('nproc')} cores, {m.get('cpu')}; "
        f"BLAS (driver): {'; '.join(m.get('blas', []))}; "
        f"OPENBLAS_* env: {m.get('openblas_env')}",
        f"- load average (1/5/15 min) before: {la0[0]:.2f} / {la0[1]:.2f} / {la0[2]:.2f}, "
        f"after: {la1[0]:.2f} / {la1[1]:.2f} / {la1[2]:.2f} (shared machine: other jobs ran too)",
        f"- versions: {versions}; code: {m.get('code')}",
        *warn,
        "",
        outcome.table,
        "",
        *[f"- {n}" for n in outcome.notes],
        "",
    ]
    with path.open("a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    log.debug("recorded %s in %s", outcome.title, path)
