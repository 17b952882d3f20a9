"""A SQLite connection that times each statement it runs (``python -m gateway.bench.profile sql|phases``)."""
from __future__ import annotations

import time
from typing import Any

__all__ = ["TimedConnection"]


class TimedConnection:
    """A SQLite connection that times each statement it runs (``execute``, ``executemany``), by its text."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.spent: dict[str, list[float]] = {}  # statement -> [calls, seconds, rows]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def _count(self, sql: str, seconds: float, rows: int) -> None:
        entry = self.spent.setdefault(" ".join(sql.split()), [0, 0.0, 0])
        entry[0] += 1
        entry[1] += seconds
        entry[2] += rows

    def execute(self, sql: str, *args: Any) -> Any:
        began = time.perf_counter()
        try:
            return self._conn.execute(sql, *args)
        finally:
            self._count(sql, time.perf_counter() - began, 0)

    def executemany(self, sql: str, rows: Any) -> Any:
        rows = list(rows)
        began = time.perf_counter()
        try:
            return self._conn.executemany(sql, rows)
        finally:
            self._count(sql, time.perf_counter() - began, len(rows))

    def commit_seconds(self) -> float:
        """The time spent in ``COMMIT`` statements (writing their pages to the log)."""
        return sum(spent for sql, (_, spent, _) in self.spent.items() if sql == "COMMIT")
