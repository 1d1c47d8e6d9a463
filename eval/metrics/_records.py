"""Checks on what the metrics read: prediction text, a record's answers, scored rows.

Every check raises a ``TypeError`` or ``ValueError`` that names the argument and what was expected, so a
malformed record fails at the sample that carries it rather than as a wrong number in a report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pyrtok.metrics import check_answers

__all__ = ["check_answers", "check_prediction", "record_answers", "record_field", "row_scores"]


def check_prediction(prediction: object, name: str = "prediction") -> str:
    """``prediction`` itself if it is a ``str``; a ``TypeError`` otherwise."""
    if not isinstance(prediction, str):
        raise TypeError(f"{name} must be a str (the generated text), got {type(prediction).__name__}")
    return prediction


def record_field(record: object, field: str, name: str = "record") -> Any:
    """``record[field]``; a ``TypeError`` if ``record`` is not a mapping, a ``ValueError`` if it lacks ``field``."""
    if not isinstance(record, Mapping):
        raise TypeError(f"{name} must be a dict (a sample record), got {type(record).__name__}")
    if field not in record:
        raise ValueError(f"{name} must have the field {field!r}, got the fields {sorted(map(str, record))}")
    return record[field]


def record_answers(record: object, name: str = "record") -> list[str]:
    """The checked ``answers`` of a sample record."""
    return check_answers(record_field(record, "answers", name), f"{name}['answers']")


def row_scores(rows: object, name: str = "rows") -> list[float]:
    """The ``score`` of every row, each checked to be a number in [0, 1]; ``rows`` must be a non-empty list."""
    if isinstance(rows, str | bytes) or not isinstance(rows, Sequence):
        raise TypeError(f"{name} must be a non-empty list of scored rows (dicts), got {type(rows).__name__}")
    if not rows:
        raise ValueError(f"{name} must be a non-empty list of scored rows, got an empty list")
    scores = []
    for i, row in enumerate(rows):
        score = record_field(row, "score", f"{name}[{i}]")
        if isinstance(score, bool) or not isinstance(score, int | float) or not 0.0 <= score <= 1.0:
            raise ValueError(f"{name}[{i}]['score'] must be a number in [0, 1], got {score!r}")
        scores.append(float(score))
    return scores
