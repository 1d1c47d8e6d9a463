"""The local VQA dataset format: one JSONL file per split, images as files beside it.

A split ``<root>/<split>.jsonl`` holds one JSON object per line:

- ``id`` (str): unique within the split;
- ``image`` (str): image path relative to ``<root>`` (PNG or JPEG);
- ``question`` (str);
- ``answers`` (list of str): the ground-truth answers (one for single-answer tasks, ten for VQAv2-style);
- ``category`` (str): the subset a sample belongs to, for per-category reports and stratified sampling;
- any task-specific fields (for example ``family`` here, ``options`` for multiple choice).

Writing appends one line per sample and renames the finished file into place, so a reader never sees a
half-written split.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["REQUIRED_FIELDS", "read_split", "write_split"]

REQUIRED_FIELDS = ("id", "image", "question", "answers", "category")


def write_split(root: str | Path, split: str, records: Iterable[dict[str, Any]]) -> Path:
    """Write ``records`` (each with :data:`REQUIRED_FIELDS`) to ``<root>/<split>.jsonl``; returns the path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{split}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w") as f:
        for n, record in enumerate(records):
            missing = [k for k in REQUIRED_FIELDS if k not in record]
            if missing:
                raise ValueError(f"record {n} of split {split!r} lacks the fields {missing}")
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)
    return path


def read_split(root: str | Path, split: str) -> Iterator[dict[str, Any]]:
    """Records of ``<root>/<split>.jsonl`` with ``image`` resolved to an absolute path."""
    root = Path(root)
    path = root / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no split {split!r} under {str(root)!r} (expected {path.name})")
    with path.open() as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number} is not valid JSON: {error}") from None
            missing = [k for k in REQUIRED_FIELDS if k not in record]
            if missing:
                raise ValueError(f"{path}:{line_number} lacks the fields {missing}")
            record["image"] = str(root / record["image"])
            yield record
