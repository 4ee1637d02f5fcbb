"""Results of a conformance run: one row per check, printed as a table and written as JSON."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO


@dataclass(frozen=True)
class Result:
    """One check's outcome: ``status`` is ``pass``, ``fail`` or ``skip``; errors are the worst over its outputs.

    ``device`` is where it ran and ``strategy`` the backend's code path forced around it ("-": none).
    """

    backend: str
    algorithm: str
    function: str
    case: str
    dtype: str
    against: str
    status: str
    device: str = "-"
    strategy: str = "-"
    max_abs: float | None = None
    max_rel: float | None = None
    detail: str = ""


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def print_table(results: list[Result], stream: TextIO) -> None:
    """One table per backend, then the counts line ``N passed, N failed, N skipped``."""
    for backend in dict.fromkeys(result.backend for result in results):
        rows = [result for result in results if result.backend == backend]
        print(f"\nbackend {backend}", file=stream)
        header = (f"  {'function':<34} {'dtype':<9} {'device':<7} {'strategy':<9} {'case':<42} {'against':<19} "
                  f"{'result':<6} {'max abs':>8} {'max rel':>8}")
        print(header, file=stream)
        print("  " + "-" * (len(header) - 2), file=stream)
        for row in rows:
            name = f"{row.algorithm}.{row.function}" if row.algorithm else row.function
            line = (
                f"  {name:<34} {row.dtype:<9} {row.device:<7} {row.strategy:<9} {row.case:<42} {row.against:<19} "
                f"{row.status:<6} "
                f"{_number(row.max_abs):>8} {_number(row.max_rel):>8}"
            )
            print(line + (f"  {row.detail}" if row.detail else ""), file=stream)
    counts = Counter(result.status for result in results)
    print(f"\n{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped", file=stream)


def write_json(results: list[Result], path: str | Path) -> None:
    """The same rows as the table, as a JSON list of objects (missing folders of ``path`` are made)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps([asdict(result) for result in results], indent=1) + "\n")
