"""Is one allocator ahead of another? Paired differences over the same questions, with standard errors.

Two allocators of one ablation answer the same questions, so their difference is measured per question: the
mean of ``score_a - score_b`` over the questions both answered, in points, and its standard error
``100 * std(d, ddof=1) / sqrt(n)``. Pairing removes the spread between questions, which both cells share, so it
tells a lead from noise with far fewer questions than two independent standard errors would. Only metrics whose
headline is the mean per-question score (accuracy-like: ``exact``, ``gqa``, ``vqav2``, ...) are compared; POPE's
F1 and MME's sums are not means of a score per question.

:func:`leaders` gives, per (model, task, budget below full, in-LLM schedule), the most accurate allocator, its
lead over the runner-up and the allocators it does not lead by two standard errors; ``report.md`` prints them.
Rows under an in-LLM schedule (``<allocator>+<schedule>``) are compared only with rows under the same schedule:
two schedules at one vision-side budget spend different FLOPs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pyrtok.eval.metrics import get_metric, mean_accuracy
from pyrtok.eval.rows import reported_allocator

__all__ = ["leaders", "paired_difference"]


def paired_difference(a: Sequence[dict], b: Sequence[dict]) -> dict[str, float]:
    """The paired difference of the scored rows ``a`` minus ``b``, matched by sample ``id``.

    Returns ``{"difference": mean of score_a - score_b (points), "se": its standard error (points), "n": paired
    questions}``; ``se`` is NaN below two questions. A row without a score (a failure) counts 0, as in the headline.

    Raises:
        ValueError: the two share no question.
    """
    scores = {r["id"]: float(r.get("score") or 0.0) for r in b}
    deltas = [float(r.get("score") or 0.0) - scores[r["id"]] for r in a if r["id"] in scores]
    if not deltas:
        raise ValueError("a and b share no sample id: they are not answers to the same questions")
    n = len(deltas)
    mean = sum(deltas) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (n - 1) / n) if n > 1 else float("nan")
    return {"difference": 100 * mean, "se": 100 * se, "n": n}


def leaders(rows: Sequence[dict], metrics: dict[str, str]) -> list[dict[str, Any]]:
    """Per (model, task, budget below full) of ``rows``: the leader and how far ahead it is.

    ``rows`` are an ablation's latest rows: full-token ``all`` rows are left out (``all`` below full is
    ``coarse``), and so are tasks whose metric is not a mean per-question score; ``metrics`` maps task names to
    metric names. A cell is a (model, task, budget, schedule) with at least two allocators. Each entry:
    ``model``, ``task``, ``budget``, ``schedule`` (None on the vision side), ``leader`` and its ``value``,
    ``runner_up`` with the paired ``lead`` over it and that lead's ``se`` (points), and ``ties``: the other
    allocators whose paired difference to the leader is not above two standard errors (an allocator that
    answers exactly as the leader ties), best first.
    """
    cells: dict[tuple, dict[str, list[dict]]] = {}
    for row in rows:
        allocator = reported_allocator(row)
        if allocator == "all":
            continue  # the full-token reference
        if get_metric(metrics[row["task"]]).summarize is not mean_accuracy:
            continue
        schedule = allocator.partition("+")[2] or None
        key = (row["model"], row["task"], row["budget"], schedule)
        cells.setdefault(key, {}).setdefault(allocator, []).append(row)
    out = []
    for (model, task, budget, schedule), by_allocator in sorted(
            cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3] or "", -kv[0][2])):
        if len(by_allocator) < 2:
            continue  # nothing to compare with
        ranked = sorted(by_allocator, key=lambda name: (-mean_accuracy(by_allocator[name])["accuracy"], name))
        leader = ranked[0]
        entry = {"model": model, "task": task, "budget": budget, "schedule": schedule, "leader": leader,
                 "value": mean_accuracy(by_allocator[leader])["accuracy"], "runner_up": ranked[1],
                 "lead": float("nan"), "se": float("nan"), "ties": []}
        for name in ranked[1:]:
            paired = paired_difference(by_allocator[leader], by_allocator[name])
            if name == entry["runner_up"]:
                entry.update(lead=paired["difference"], se=paired["se"])
            if not paired["difference"] > 2 * paired["se"]:  # equal answers (SE 0) and a NaN SE tie too
                entry["ties"].append(name)
        out.append(entry)
    return out
