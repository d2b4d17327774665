"""Generators, release dates and the chronological windows built from them.

The benchmark's notion of time is the release date of each generator, kept as data
(``resources/aigenbench_v1_generators.csv``). Generator *ids* are alphabetical with
real = 0 (``""`` sorts first) and say nothing about time, so every time question goes
through :class:`Timeline`, never through an id.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from genattr.utils.errors import DataError

#: The AI-GenBench v1.0.0 table shipped with genattr.
V1_TABLE = "aigenbench_v1_generators.csv"
REAL = ""


def _table_text(path: str | Path | None) -> tuple[str, str]:
    if path is None:
        ref = resources.files("genattr.data.resources") / V1_TABLE
        return ref.read_text(encoding="utf-8"), f"genattr/data/resources/{V1_TABLE}"
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"data.generators={path} does not exist; expected a CSV with columns generator,release_date")
    return file.read_text(encoding="utf-8"), str(file)


def read_generator_table(path: str | Path | None = None) -> list[tuple[str, dt.date]]:
    """``(name, release date)`` rows in file order; ``None`` reads the shipped v1.0.0 table."""
    text, where = _table_text(path)
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    reader = csv.DictReader(lines)
    if reader.fieldnames is None or not {"generator", "release_date"} <= set(reader.fieldnames):
        raise DataError(f"{where}: expected the header 'generator,release_date', found {reader.fieldnames}")
    rows: list[tuple[str, dt.date]] = []
    for line_no, row in enumerate(reader, start=2):
        name = (row["generator"] or "").strip()
        try:
            date = dt.date.fromisoformat((row["release_date"] or "").strip())
        except ValueError as err:
            raise DataError(f"{where} row {line_no}: release_date {row['release_date']!r} is not YYYY-MM-DD") from err
        if not name:
            raise DataError(f"{where} row {line_no}: empty generator name (real images are not listed)")
        rows.append((name, date))
    names = [n for n, _ in rows]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{where}: generators listed twice: {dupes}")
    return rows


def chunk_windows(rows: Sequence[tuple[str, dt.date]], per_window: int) -> list[tuple[str, ...]]:
    """Sort by date (stable) and pop ``per_window`` at a time; same-date ties join the window.

    A window can therefore hold more than ``per_window`` generators, never fewer (except
    the last). The v1.0.0 table has no ties, giving 9 windows of exactly 4.
    """
    if per_window < 1:
        raise ValueError(f"generators_per_window must be >= 1, got {per_window}")
    ordered = sorted(rows, key=lambda r: r[1])
    windows: list[tuple[str, ...]] = []
    i = 0
    while i < len(ordered):
        j = min(i + per_window, len(ordered))
        while j < len(ordered) and ordered[j][1] == ordered[j - 1][1]:
            j += 1
        windows.append(tuple(name for name, _ in ordered[i:j]))
        i = j
    return windows


@dataclass(frozen=True)
class Timeline:
    """The benchmark's generators in time order and the windows they form."""

    windows: tuple[tuple[str, ...], ...]
    dates: dict[str, dt.date]

    @classmethod
    def from_table(cls, path: str | Path | None = None, per_window: int = 4) -> Timeline:
        rows = read_generator_table(path)
        return cls(tuple(chunk_windows(rows, per_window)), dict(rows))

    @property
    def generators(self) -> tuple[str, ...]:
        """All generators, chronologically."""
        return tuple(g for w in self.windows for g in w)

    @property
    def id_to_name(self) -> tuple[str, ...]:
        """Generator id -> name: ``""`` (real) is 0, the fakes follow in Python string order."""
        return tuple(sorted({REAL, *self.generators}))

    def generator_id(self, name: str) -> int:
        return self.id_to_name.index(name)

    def window_of(self, name: str) -> int:
        for k, window in enumerate(self.windows):
            if name in window:
                return k
        raise KeyError(f"{name!r} is not a benchmark generator")

    def generators_in(self, windows: Iterable[int]) -> tuple[str, ...]:
        return tuple(g for k in windows for g in self.windows[k])

    def as_table(self) -> list[dict[str, object]]:
        """Rows for results.json / MLflow: window, generator, release date, generator id."""
        return [
            {"window": k, "generator": g, "release_date": self.dates[g].isoformat(), "id": self.generator_id(g)}
            for k, w in enumerate(self.windows)
            for g in w
        ]
