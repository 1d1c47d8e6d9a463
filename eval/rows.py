"""Per-sample result rows: append-only JSONL shards that survive being killed at any moment.

Each process appends to its own shard ``<output>/rows/rows-<rank>-of-<world>.jsonl``, created with its first
row, and flushes after every batch. Reading takes every shard, skips a torn last line (a write cut short by a
kill), and keeps the latest row per key: the one with the highest ``attempt`` (a retried error row's
replacement carries its predecessor's attempt + 1), and of equal attempts the last one read. Rows of equal
attempt are recomputations of the same batch with the same seed, so runs resumed with a different number of
processes still agree.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from pyrtok.eval.config import COARSE

__all__ = ["EMPTY_ANSWER", "KEY_FIELDS", "RowWriter", "failed", "read_rows", "reported_allocator", "row_key"]

KEY_FIELDS = ("model", "allocator", "budget", "task", "id", "fingerprint")
# the error of a row whose answer is empty: the model's own result (a wrong answer), which a rerun repeats
EMPTY_ANSWER = "empty answer"


def failed(row: dict[str, Any]) -> bool:
    """Whether ``row`` records a failure instead of an answer (an unreadable image, a failed batch, a record the
    metric could not score): what ``--resume --retry-errors`` recomputes. An empty answer is an answer."""
    return bool(row.get("error")) and row["error"] != EMPTY_ANSWER


def reported_allocator(row: dict[str, Any]) -> str:
    """The allocator label reports give ``row``: ``coarse`` for the ``all`` allocator below the full budget (the
    coarsest tokens first; older runs wrote such rows as ``all``), the row's own label otherwise."""
    return COARSE if row["allocator"] == "all" and row.get("fraction", 1.0) < 1.0 else row["allocator"]


def row_key(row: dict[str, Any]) -> tuple:
    """The identity of a row: (model, allocator, budget, task, sample id, config fingerprint)."""
    return tuple(row.get(k) for k in KEY_FIELDS)


def read_rows(output: str | Path) -> list[dict[str, Any]]:
    """All complete rows under ``<output>/rows``, the latest one per key (see the module docstring), sorted by
    key."""
    rows: dict[tuple, dict[str, Any]] = {}
    for shard in sorted((Path(output) / "rows").glob("rows-*.jsonl")):
        with shard.open() as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the torn tail of an interrupted write; its batch is redone on resume
                key = row_key(row)
                if key not in rows or row.get("attempt", 0) >= rows[key].get("attempt", 0):
                    rows[key] = row
    return [rows[k] for k in sorted(rows, key=lambda k: tuple(map(str, k)))]


class RowWriter:
    """Appends rows to this process's shard, flushed and synced per call.

    The shard is opened (and created) by the first call that has rows, so a run that fails before its first
    row leaves no file that a rerun would take for earlier results.
    """

    def __init__(self, output: str | Path, rank: int = 0, world: int = 1) -> None:
        self.path = Path(output) / "rows" / f"rows-{rank}-of-{world}.jsonl"
        self._file: IO[str] | None = None

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append ``rows`` (JSON-serialisable mappings), one line each."""
        text = "".join(json.dumps(row) + "\n" for row in rows)
        if not text:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = self.path.is_file() and self.path.stat().st_size > 0 and not self.path.read_bytes().endswith(b"\n")
            self._file = self.path.open("a")
            if torn:  # end the fragment a kill left behind, so the next row starts on a line of its own
                self._file.write("\n")
        self._file.write(text)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the shard, if a row was ever written."""
        if self._file is not None:
            self._file.close()
            self._file = None
