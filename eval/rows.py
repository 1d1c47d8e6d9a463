"""Per-sample result rows: append-only JSONL shards that survive being killed at any moment.

Each process appends to its own shard ``<output>/rows/rows-<rank>-of-<world>.jsonl`` and flushes after
every batch. Reading takes every shard, skips a torn last line (a write cut short by a kill), and keeps
the first row per key, so runs resumed with a different number of processes still agree.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["KEY_FIELDS", "RowWriter", "read_rows", "row_key"]

KEY_FIELDS = ("model", "allocator", "budget", "task", "id", "fingerprint")


def row_key(row: dict[str, Any]) -> tuple:
    """The identity of a row: (model, allocator, budget, task, sample id, config fingerprint)."""
    return tuple(row.get(k) for k in KEY_FIELDS)


def read_rows(output: str | Path) -> list[dict[str, Any]]:
    """All complete rows under ``<output>/rows``, one per key, sorted by key."""
    rows: dict[tuple, dict[str, Any]] = {}
    for shard in sorted((Path(output) / "rows").glob("rows-*.jsonl")):
        with shard.open() as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the torn tail of an interrupted write; its batch is redone on resume
                rows.setdefault(row_key(row), row)
    return [rows[k] for k in sorted(rows, key=lambda k: tuple(map(str, k)))]


class RowWriter:
    """Appends rows to this process's shard, flushed and synced per call."""

    def __init__(self, output: str | Path, rank: int = 0, world: int = 1) -> None:
        folder = Path(output) / "rows"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"rows-{rank}-of-{world}.jsonl"
        torn = self.path.is_file() and self.path.stat().st_size > 0 and not self.path.read_bytes().endswith(b"\n")
        self._file = self.path.open("a")
        if torn:  # end the fragment a kill left behind, so the next row starts on a line of its own
            self._file.write("\n")

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        text = "".join(json.dumps(row) + "\n" for row in rows)
        self._file.write(text)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
