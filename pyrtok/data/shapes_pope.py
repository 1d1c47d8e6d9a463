"""The shapes benchmark's existence questions as a POPE-format set, for lmms-eval's own ``pope`` task offline.

:func:`write_pope` writes, under one folder:

- ``<split>.parquet``: one row per scene with POPE's columns ``question_id``, ``question`` (POPE's wording,
  "Is there a red circle in the image?"), ``answer`` (``yes``/``no``, half each in expectation),
  ``image_source``, ``image`` (PNG bytes, a ``datasets`` Image column) and ``category`` (the shapes
  benchmark's ``present``, ``absent random`` or ``absent adversarial``);
- ``pope_shapes.yaml``: an lmms-eval task that includes the installed lmms-eval's ``pope.yaml`` (its prompt
  with the short-answer suffix, its answer parsing, its accuracy/precision/recall/F1/yes-ratio metrics) and only
  swaps the hub dataset for the local parquet file.

Run it with ``lmms-eval --model pyrtok --model_args pretrained=embedded --tasks pope_shapes --include_path
<folder>`` (no network). The scenes are those of the shapes benchmark with the same (seed, split, index), so a
split drawn with another seed is a fresh set of images.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from pyrtok._extras import missing
from pyrtok.data.conversations import pope_question
from pyrtok.data.shapes_vqa import SPLITS, samples

__all__ = ["POPE_COLUMNS", "TASK_NAME", "pope_rows", "write_pope"]

POPE_COLUMNS = ("question_id", "question", "answer", "image_source", "image", "category")
"""The columns of lmms-lab/POPE that lmms-eval's ``pope`` task reads."""

TASK_NAME = "pope_shapes"


def pope_rows(split: str = "test", questions: int = 500, seed: int = 0) -> list[dict]:
    """One POPE row per scene (its existence question) for the first ``questions`` scenes of ``split``.

    ``image`` is ``{"bytes": <PNG>, "path": None}``, the storage form of a ``datasets.Image`` column.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if isinstance(questions, bool) or not isinstance(questions, int) or questions < 1:
        raise ValueError(f"questions must be an int >= 1, got {questions!r}")
    rows = []
    for index, scene, items in samples(split, questions, seed):
        item = next(i for i in items if i["family"] == "existence")
        png = io.BytesIO()
        scene.image.save(png, format="PNG")
        question = pope_question(item["question"])
        rows.append({"question_id": f"{split}-{seed}-{index:06d}", "question": question[0].upper() + question[1:],
                     "answer": item["answer"], "image_source": f"shapes-{split}-{seed}-{index:06d}",
                     "image": {"bytes": png.getvalue(), "path": None}, "category": item["category"]})
    return rows


def _pope_yaml() -> Path:
    try:
        import lmms_eval
    except ImportError as error:  # its pope task is what the folder runs
        raise missing("lmms_eval", "write_pope") from error
    path = Path(lmms_eval.__file__).parent / "tasks" / "pope" / "pope.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"the installed lmms-eval has no pope task at {path}")
    return path


def write_pope(root: str | Path, split: str = "test", questions: int = 500, seed: int = 0) -> Path:
    """Write ``<root>/<split>.parquet`` and the task ``<root>/pope_shapes.yaml``; returns the YAML's path."""
    try:
        import datasets
    except ImportError as error:
        raise missing("datasets", "write_pope") from error

    included = _pope_yaml()  # before any work: without lmms-eval the folder could not run
    rows = pope_rows(split, questions, seed)
    features = datasets.Features({"question_id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "image_source": datasets.Value("string"),
                                  "image": datasets.Image(), "category": datasets.Value("string")})
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    table = datasets.Dataset.from_list(rows, features=features)
    tmp = root / f".{split}.parquet.tmp"
    table.to_parquet(str(tmp))
    tmp.replace(root / f"{split}.parquet")
    task = root / f"{TASK_NAME}.yaml"
    task.write_text(
        f"# lmms-eval's own POPE task on {questions} shapes scenes ({split}, seed {seed}); written by "
        f"pyrtok.data.shapes_pope\n"
        f"include: {json.dumps(str(included))}\n"
        f"task: {TASK_NAME}\n"
        f"dataset_path: parquet\n"
        f"dataset_kwargs:\n  data_files:\n    test: {split}.parquet\n"
        f"test_split: test\n")
    return task
