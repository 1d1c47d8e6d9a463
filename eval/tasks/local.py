"""Tasks stored in the local format (JSONL + image files), and the embedded shapes benchmark.

The format is :mod:`pyrtok.data.local`'s: ``<root>/<split>.jsonl``, one record per line with ``id``,
``image`` (a path relative to ``<root>``), ``question``, ``answers`` (list), ``category`` and any
task-specific fields. The shapes benchmark is generated into that format on first use (it is a pure
function of its seed, so every machine gets the same files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pyrtok.data.local import read_split

__all__ = ["load_local", "load_shapes"]


def load_local(root: str | Path, split: str) -> list[dict[str, Any]]:
    """The records of ``<root>/<split>.jsonl``, image paths made absolute."""
    return list(read_split(root, split))


def load_shapes(root: str | Path, split: str = "test", questions: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """The shapes VQA ``split`` under ``root``, written there first if it is missing or too small.

    Args:
        root: folder of the local-format copy (created on demand).
        split: ``"validation"`` or ``"test"`` (``"train"`` works too).
        questions: how many questions the split should hold (5 per scene, one per family).
        seed: the benchmark seed; the shipped model and its reported figures use 0.
    """
    from pyrtok.data.make import write_shapes

    path = Path(root) / f"{split}.jsonl"
    if path.is_file():
        records = load_local(root, split)
        if len(records) >= questions and records[0].get("seed") == seed:
            return records[: -(-questions // 5) * 5]
    write_shapes(root, split, questions, seed=seed, progress=False)
    return load_local(root, split)
