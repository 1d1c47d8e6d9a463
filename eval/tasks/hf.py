"""The HuggingFace ``datasets`` versions of the VQA benchmarks that lmms-eval uses, mapped to records.

A record is the harness's common currency (the local format of :mod:`pyrtok.data.local`): ``id`` (unique
within the split), ``image`` (a :class:`DatasetImage` here: a reference to the dataset's row, decoded only
when read, so that loading a large split and drawing a subset of it decode no image), ``question``,
``answers`` (list of str),
``category`` and task-specific fields. :data:`HF_TASKS` holds, per task, the hub id, config and split of
lmms-eval's task YAML, the columns a dataset must have and the function that maps one row to a record:

============== ==================== ============================== ========== ===========================
task           hub id               config                         split      ``category``
============== ==================== ============================== ========== ===========================
vqav2          lmms-lab/VQAv2       (default)                      validation ``answer_type``
gqa            lmms-lab/GQA         testdev_balanced_instructions  testdev    ``types.structural``
                                    + testdev_balanced_images
textvqa        lmms-lab/textvqa     (default)                      validation ``"all"`` (none in the data)
pope           lmms-lab/POPE        (default)                      test       ``category`` (adversarial,
                                                                              popular, random)
mme            lmms-lab/MME         (default)                      test       ``category``
scienceqa_img  lmms-lab/ScienceQA   ScienceQA-IMG                  test       ``subject``
============== ==================== ============================== ========== ===========================

``path`` is either a hub id (read with ``datasets.load_dataset(path, name, split=split)``, which needs a
network) or a local folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with
``datasets.load_from_disk``). GQA keeps questions and images in two datasets joined on the image id, so it
takes a second source, ``images_path`` (and ``images_name`` for its hub config).

``datasets`` is imported only when a task is loaded; the module itself needs nothing beyond the standard
library.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["HF_TASKS", "DatasetImage", "HFTask", "iter_hf_task", "load_hf_task"]

Record = dict[str, Any]


@dataclass(frozen=True, eq=False)
class DatasetImage:
    """The image in row ``row`` of a ``datasets.Dataset``, decoded when :meth:`open` is called (the dataset
    stays memory-mapped, so a record costs a few bytes until its image is needed)."""

    dataset: Any
    row: int
    column: str = "image"

    def open(self) -> Any:
        """The decoded ``PIL.Image.Image``."""
        return self.dataset[self.row][self.column]

    def __repr__(self) -> str:
        return f"DatasetImage(row={self.row}, column={self.column!r})"


@dataclass(frozen=True)
class HFTask:
    """Where a task lives on the hub and how its rows become records.

    ``to_record(row, index)`` maps one row (``index``: its position in the split) to a record; GQA's
    records get their ``image`` from the images dataset afterwards.
    """

    hub_id: str
    config: str | None
    split: str
    required: tuple[str, ...]
    to_record: Callable[[dict[str, Any], int], Record]
    images_config: str | None = None
    images_required: tuple[str, ...] = ()


def _answer_strings(answers: Any) -> list[str]:
    """Answer texts from VQAv2's ``answers`` (a list of dicts, or a dict of lists) or a list of str.

    >>> _answer_strings([{"answer": "red", "answer_id": 1}, {"answer": "dark red", "answer_id": 2}])
    ['red', 'dark red']
    >>> _answer_strings({"answer": ["2", "two"], "answer_id": [1, 2]}), _answer_strings(None)
    (['2', 'two'], [])
    """
    if answers is None:
        return []
    if isinstance(answers, dict):  # a Sequence of structs comes back as columns
        answers = answers.get("answer", [])
        return [str(a) for a in answers]
    return [str(a["answer"]) if isinstance(a, dict) else str(a) for a in answers]


def _optional(row: dict[str, Any], record: Record, fields: dict[str, str]) -> Record:
    """Copy the columns in ``fields`` (column -> record key) that the row has."""
    for column, key in fields.items():
        if column in row:
            record[key] = row[column]
    return record


def _vqav2(row: dict[str, Any], index: int) -> Record:
    record = {
        "id": str(row["question_id"]),
        "image": row["image"],
        "question": row["question"],
        "answers": _answer_strings(row["answers"]),
        "category": row["answer_type"],
        "question_id": row["question_id"],
        "answer_type": row["answer_type"],
        "question_type": row["question_type"],
    }
    return _optional(row, record, {"image_id": "image_id", "multiple_choice_answer": "multiple_choice_answer"})


def _textvqa(row: dict[str, Any], index: int) -> Record:
    record = {
        "id": str(row["question_id"]),
        "image": row["image"],
        "question": row["question"],
        "answers": [str(a) for a in row["answers"] or []],
        # TextVQA has no question categories; one constant keeps per-category reports well defined.
        "category": "all",
        "question_id": row["question_id"],
        "ocr_tokens": list(row["ocr_tokens"] or []),
    }
    return _optional(row, record, {"image_id": "image_id", "image_classes": "image_classes"})


def _gqa(row: dict[str, Any], index: int) -> Record:
    types = row.get("types") or {}
    structural, semantic = types.get("structural") or "", types.get("semantic") or ""
    record = {
        "id": str(row["id"]),
        "image": None,
        "question": row["question"],
        "answers": [str(row["answer"])],
        # The structural type (verify, query, choose, logical, compare) is GQA's own breakdown.
        "category": structural or "all",
        "question_id": str(row["id"]),
        "image_id": str(row["imageId"]),
        "structural": structural,
        "semantic": semantic,
        "detailed": types.get("detailed") or "",
    }
    return _optional(row, record, {"fullAnswer": "full_answer"})


def _pope(row: dict[str, Any], index: int) -> Record:
    category = str(row["category"])
    record = {
        # question_id need not be unique across POPE's three categories; the category prefix makes it so.
        "id": f"{category}/{row['question_id']}",
        "image": row["image"],
        "question": row["question"],
        "answers": [str(row["answer"]).strip().lower()],
        "category": category,
        "question_id": row["question_id"],
    }
    return _optional(row, record, {"image_source": "image_source"})


def _mme(row: dict[str, Any], index: int) -> Record:
    category = str(row["category"])
    question_id = str(row["question_id"])
    base = question_id if question_id.startswith(f"{category}/") else f"{category}/{question_id}"
    return {
        # Both questions of an image share question_id; the loader suffixes the second with "#1".
        "id": base,
        "image": row["image"],
        "question": row["question"],
        "answers": [str(row["answer"]).strip().lower().replace(".", "")],
        "category": category,
        "question_id": question_id,
    }


def _scienceqa(row: dict[str, Any], index: int) -> Record:
    options = [str(c) for c in row["choices"]]
    answer = int(row["answer"])
    if not 0 <= answer < len(options):
        raise ValueError(f"scienceqa_img row {index}: answer index {answer} is outside its {len(options)} choices")
    return {
        "id": str(index),
        "image": row["image"],
        "question": row["question"],
        "answers": [chr(ord("A") + answer)],
        # subject (natural / social / language science) is the paper's breakdown; the dataset's own
        # 'category' has dozens of values, too many for a subset, so it is kept as sqa_category.
        "category": str(row["subject"]),
        "options": options,
        "hint": row["hint"] or "",
        **{key: row[key] for key in ("topic", "grade", "skill") if key in row},
        **({"sqa_category": row["category"]} if "category" in row else {}),
    }


HF_TASKS: dict[str, HFTask] = {
    "vqav2": HFTask(
        "lmms-lab/VQAv2", None, "validation",
        ("question_id", "question", "answers", "answer_type", "question_type", "image"), _vqav2,
    ),
    "gqa": HFTask(
        "lmms-lab/GQA", "testdev_balanced_instructions", "testdev", ("id", "imageId", "question", "answer"), _gqa,
        images_config="testdev_balanced_images", images_required=("id", "image"),
    ),
    "textvqa": HFTask(
        "lmms-lab/textvqa", None, "validation", ("question_id", "question", "answers", "ocr_tokens", "image"), _textvqa,
    ),
    "pope": HFTask("lmms-lab/POPE", None, "test", ("question_id", "question", "answer", "category", "image"), _pope),
    "mme": HFTask("lmms-lab/MME", None, "test", ("question_id", "question", "answer", "category", "image"), _mme),
    "scienceqa_img": HFTask(
        "lmms-lab/ScienceQA", "ScienceQA-IMG", "test", ("question", "choices", "answer", "hint", "subject", "image"),
        _scienceqa,
    ),
}


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as error:
        raise ImportError("loading HuggingFace tasks needs the 'datasets' package: pip install datasets") from error
    return datasets


def _is_local(path: str) -> bool:
    """Whether ``path`` names a folder rather than a hub id (``owner/name``)."""
    if Path(path).expanduser().exists():
        return True
    # A hub id has exactly one '/' and no leading '/', '.' or '~'; anything else is meant as a folder.
    return path.startswith(("/", ".", "~")) or path.count("/") != 1


def _open(task: str, path: str, name: str | None, split: str | None, default_split: str, role: str) -> Any:
    """The ``datasets.Dataset`` behind ``path`` (hub id or ``save_to_disk`` folder) for ``split``."""
    datasets = _import_datasets()
    chosen = split or default_split
    if not _is_local(path):
        return datasets.load_dataset(path, name, split=chosen)
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"task {task!r}: {role} {str(folder)!r} is not a folder written by save_to_disk")
    data = datasets.load_from_disk(str(folder))
    if not isinstance(data, datasets.DatasetDict):
        return data
    if chosen in data:
        return data[chosen]
    if split is None and len(data) == 1:
        return next(iter(data.values()))
    raise ValueError(f"task {task!r}: split {chosen!r} is not in {str(folder)!r}; it holds {sorted(data)}")


def _check_columns(task: str, dataset: Any, required: tuple[str, ...], role: str) -> None:
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"task {task!r}: the {role} dataset lacks the column(s) {missing} (it has {dataset.column_names})"
        )


def _rows_without_images(dataset: Any) -> Iterator[dict[str, Any]]:
    """The rows of ``dataset`` with every image column read as True (an image is stored) or None, so that
    iterating a large split neither decodes nor reads a single image (the bytes stay memory-mapped)."""
    import pyarrow.compute as pc

    datasets = _import_datasets()
    columns = [c for c, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
    if not columns:
        yield from dataset
        return
    stored = {c: pc.is_valid(dataset.with_format("arrow")[c]).to_pylist() for c in columns}
    for n, row in enumerate(dataset.remove_columns(columns)):
        yield {**row, **{c: True if stored[c][n] else None for c in columns}}


def _with_image_reference(record: Record, dataset: Any, row: int) -> Record:
    """``record`` with its image (taken from the row's ``image`` column) replaced by a reference to it."""
    if record.get("image") is not None:
        record["image"] = DatasetImage(dataset, row)
    return record


def _unique_ids(records: Iterator[Record]) -> Iterator[Record]:
    """Records with repeated ids suffixed ``#1``, ``#2``... in order of appearance (MME's image pairs)."""
    seen: Counter[str] = Counter()
    for record in records:
        base = record["id"]
        if seen[base]:
            record["id"] = f"{base}#{seen[base]}"
        seen[base] += 1
        yield record


def _gqa_join(records: Iterator[Record], images: Any, images_source: str) -> Iterator[Record]:
    """GQA records with ``image`` looked up by ``image_id`` in the images dataset (one :class:`DatasetImage`
    per image, shared by its questions)."""
    row_of = {str(image_id): n for n, image_id in enumerate(images["id"])}
    cache: dict[str, Any] = {}
    for record in records:
        image_id = record["image_id"]
        if image_id not in cache:
            if image_id not in row_of:
                raise ValueError(
                    f"task 'gqa': question {record['id']!r} refers to image {image_id!r}, which the images "
                    f"dataset {images_source!r} lacks (do the questions and images configs match?)"
                )
            cache[image_id] = DatasetImage(images, row_of[image_id])
        record["image"] = cache[image_id]
        yield record


def iter_hf_task(
    task: str,
    path: str | None = None,
    split: str | None = None,
    name: str | None = None,
    *,
    images_path: str | None = None,
    images_name: str | None = None,
    limit: int | None = None,
) -> Iterator[Record]:
    """Records of ``task`` one at a time; images stay in the dataset as :class:`DatasetImage` references.

    Args:
        task: a key of :data:`HF_TASKS`.
        path: a hub id or a ``save_to_disk`` folder; None means the task's hub id.
        split: the split to read; None means the task's default (a folder holding a single split also
            accepts None). A folder saved from a single ``Dataset`` is read whole.
        name: the hub config; None means the task's default (ignored for folders).
        images_path: GQA only: the images dataset (hub id or folder). Defaults to ``path`` when that is a
            hub id; a questions folder needs it.
        images_name: GQA only: the images hub config; defaults to ``name`` with ``_instructions`` replaced
            by ``_images``.
        limit: stop after this many records (the first ones of the split).

    Raises ValueError for an unknown task, a missing column or split, and ImportError without ``datasets``.
    """
    if task not in HF_TASKS:
        raise ValueError(f"task must be one of {sorted(HF_TASKS)}, got {task!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    spec = HF_TASKS[task]
    path = path or spec.hub_id
    name = name or spec.config
    dataset = _open(task, path, name, split, spec.split, "path")
    _check_columns(task, dataset, spec.required, "questions" if spec.images_config else task)
    records: Iterator[Record] = (_with_image_reference(spec.to_record(row, n), dataset, n)
                                 for n, row in enumerate(_rows_without_images(dataset)))
    if spec.images_config:
        if images_path is None:
            if _is_local(path):
                raise ValueError(
                    f"task {task!r} read from the folder {path!r} needs images_path: the images dataset "
                    f"(a hub id or a save_to_disk folder of the {spec.images_config} config)"
                )
            images_path = path
        if images_name is None:
            images_name = name.replace("_instructions", "_images") if name else spec.images_config
        images = _open(task, images_path, images_name, split, spec.split, "images_path")
        _check_columns(task, images, spec.images_required, "images")
        records = _gqa_join(records, images, images_path)
    records = _unique_ids(records)
    return itertools.islice(records, limit) if limit is not None else records


def load_hf_task(
    task: str,
    path: str | None = None,
    split: str | None = None,
    name: str | None = None,
    *,
    images_path: str | None = None,
    images_name: str | None = None,
    limit: int | None = None,
) -> list[Record]:
    """All records of ``task`` (at most ``limit``) as a list; see :func:`iter_hf_task` for the arguments.

    >>> HF_TASKS["gqa"].config, HF_TASKS["gqa"].images_config, HF_TASKS["gqa"].split
    ('testdev_balanced_instructions', 'testdev_balanced_images', 'testdev')
    >>> load_hf_task("okvqa")
    Traceback (most recent call last):
    ...
    ValueError: task must be one of ['gqa', 'mme', 'pope', 'scienceqa_img', 'textvqa', 'vqav2'], got 'okvqa'
    """
    return list(iter_hf_task(task, path, split, name, images_path=images_path, images_name=images_name, limit=limit))
