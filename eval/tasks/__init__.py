"""Evaluation tasks: where the records come from (local files, the shapes benchmark, HF datasets), seeded
subsets of them, and the LLaVA-1.5 prompt conventions per task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pyrtok.eval.tasks.local import load_local, load_shapes
from pyrtok.eval.tasks.sampling import subset

__all__ = ["load_local", "load_shapes", "load_task", "subset"]


def load_task(spec: Any) -> list[dict[str, Any]]:
    """The records of an :class:`pyrtok.eval.config.TaskSpec`, subset by its ``limit`` / ``stratify`` / ``seed``.

    Raises:
        FileNotFoundError: a ``local`` task's ``root`` or split file does not exist.
        ValueError: a record is malformed, or two records share an id.
    """
    if spec.source == "shapes":
        root = spec.root or f"data/shapes_vqa/seed{spec.seed}"
        records = load_shapes(root, spec.split or "test", spec.questions, seed=spec.seed)
    elif spec.source == "local":
        root = Path(spec.root)
        if not root.is_dir():
            raise FileNotFoundError(f"tasks[{spec.name}].root {str(root)!r} is not a folder")
        try:
            records = load_local(root, spec.split or "test")
        except FileNotFoundError as error:
            raise FileNotFoundError(f"tasks[{spec.name}]: {error}") from None
    else:
        from pyrtok.eval.tasks.hf import load_hf_task

        records = load_hf_task(spec.hf_task, spec.path, split=spec.split, **spec.options)
    seen: set[str] = set()
    for record in records:
        if str(record["id"]) in seen:
            raise ValueError(f"task {spec.name!r}: the id {record['id']!r} appears twice; ids must be unique")
        seen.add(str(record["id"]))
    return subset(records, spec.limit, spec.seed, spec.stratify, spec.group)
