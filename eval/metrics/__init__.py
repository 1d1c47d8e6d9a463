"""The VQA metrics, registered by name: per-sample scores and the aggregates reported for a task.

A :class:`Metric` scores one prediction against its sample record (a number in [0, 1]) and summarises the
scored rows of a run into named numbers; ``main`` names the headline one. Accuracy-like outputs are in
percent. Built in (name: per-sample score; headline key):

- ``vqav2``: the official VQA accuracy (:mod:`pyrtok.eval.metrics.vqa`); ``accuracy``.
- ``textvqa``: the same accuracy with answers always processed; ``accuracy``.
- ``gqa``: exact match, case and punctuation ignored (:mod:`pyrtok.eval.metrics.exact`); ``accuracy``.
- ``exact``: the first word of the prediction against the answers; ``accuracy``.
- ``pope``: yes/no read by the POPE rule (:mod:`pyrtok.eval.metrics.pope`); ``f1``.
- ``mme``: yes/no read by MME's rule, acc + acc+ per category (:mod:`pyrtok.eval.metrics.mme`); ``perception``.
- ``scienceqa``: the option letter read from the text (:mod:`pyrtok.eval.metrics.choice`); ``accuracy``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pyrtok.eval.metrics._records import row_scores
from pyrtok.eval.metrics.choice import choice_score
from pyrtok.eval.metrics.exact import exact_score, gqa_score
from pyrtok.eval.metrics.mme import mme_score, mme_summary
from pyrtok.eval.metrics.pope import pope_score, pope_summary
from pyrtok.eval.metrics.vqa import textvqa_score, vqav2_score

__all__ = ["Metric", "available_metrics", "get_metric", "mean_accuracy", "register_metric"]


@dataclass(frozen=True)
class Metric:
    """A named metric.

    Attributes:
        name: the registry key.
        score: (prediction text, sample record) -> per-sample score in [0, 1].
        summarize: scored rows (``prediction``, ``score``, ``category``, ``answers`` and the record's own
            fields) -> aggregate numbers by name.
        main: the key of ``summarize``'s output that is the task's headline number.
    """

    name: str
    score: Callable[[str, dict], float]
    summarize: Callable[[list[dict]], dict[str, float]]
    main: str

    def __post_init__(self) -> None:
        for field in ("name", "main"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise ValueError(f"Metric.{field} must be a non-empty str, got {value!r}")
        for field in ("score", "summarize"):
            if not callable(getattr(self, field)):
                raise TypeError(f"Metric.{field} must be callable, got {type(getattr(self, field)).__name__}")


_REGISTRY: dict[str, Metric] = {}


def mean_accuracy(rows: list[dict]) -> dict[str, float]:
    """``{"accuracy": 100 * mean score}`` of scored ``rows``."""
    scores = row_scores(rows)
    return {"accuracy": 100 * sum(scores) / len(scores)}


def register_metric(metric: Metric) -> Metric:
    """Add ``metric`` to the registry under ``metric.name`` and return it; a taken name is a ``ValueError``."""
    if not isinstance(metric, Metric):
        raise TypeError(f"metric must be a Metric, got {type(metric).__name__}")
    if metric.name in _REGISTRY:
        raise ValueError(f"metric: a metric named {metric.name!r} is already registered")
    _REGISTRY[metric.name] = metric
    return metric


def get_metric(name: str) -> Metric:
    """The registered metric called ``name``; a ``ValueError`` listing the known names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str (a metric name), got {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(f"name: unknown metric {name!r}; available: {', '.join(available_metrics())}")
    return _REGISTRY[name]


def available_metrics() -> list[str]:
    """Names of the registered metrics, sorted."""
    return sorted(_REGISTRY)


for _metric in (
    Metric("vqav2", vqav2_score, mean_accuracy, "accuracy"),
    Metric("textvqa", textvqa_score, mean_accuracy, "accuracy"),
    Metric("gqa", gqa_score, mean_accuracy, "accuracy"),
    Metric("exact", exact_score, mean_accuracy, "accuracy"),
    Metric("pope", pope_score, pope_summary, "f1"),
    Metric("mme", mme_score, mme_summary, "perception"),
    Metric("scienceqa", choice_score, mean_accuracy, "accuracy"),
):
    register_metric(_metric)
