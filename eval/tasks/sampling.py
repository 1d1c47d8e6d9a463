"""Seeded subsets of a task: a random ``limit``, stratified by category, optionally whole groups at a time."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

__all__ = ["subset"]


def _field(record: dict, name: str, position: int, argument: str) -> str:
    if name not in record:
        raise ValueError(f"{argument} names the field {name!r}, which record {record.get('id', position)!r} lacks")
    return str(record[name])


def subset(
    records: list[dict],
    limit: int | None = None,
    seed: int = 0,
    stratify: str | None = None,
    group: str | None = None,
) -> list[dict]:
    """At most ``limit`` records (or groups), chosen reproducibly from ``seed``; the original order is kept.

    Without ``stratify`` the choice is a seeded random sample; with ``stratify`` (a field name such as
    ``"category"``) the values of that field get shares of ``limit`` as equal as their sizes allow (a value
    with fewer records than its share passes the rest on to the others). With ``group`` (a field such as
    MME's ``"question_id"``, shared by the two questions of an image) records sharing that field are kept or
    dropped together and ``limit`` counts groups; a group's stratum is that of its first record.

    >>> rows = [{"id": str(i), "category": "ab"[i % 2]} for i in range(10)]
    >>> len(subset(rows, 4, stratify="category"))
    4
    >>> sorted({r["category"] for r in subset(rows, 2, stratify="category")})
    ['a', 'b']
    >>> pairs = [{"id": str(i), "image": str(i // 2), "category": "x"} for i in range(10)]
    >>> sorted({r["image"] for r in subset(pairs, 2, group="image")}).__len__(), len(subset(pairs, 2, group="image"))
    (2, 4)
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    units: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        units.setdefault(_field(record, group, i, "group") if group else str(i), []).append(i)
    members = list(units.values())
    if limit is None or limit >= len(members):
        return list(records)
    rng = np.random.default_rng(seed)
    if stratify is None:
        chosen = rng.choice(len(members), size=limit, replace=False).tolist()
    else:
        strata: dict[str, list[int]] = defaultdict(list)
        for u, indices in enumerate(members):
            strata[_field(records[indices[0]], stratify, indices[0], "stratify")].append(u)
        order = sorted(strata, key=lambda k: len(strata[k]))  # small strata first, so their leftovers pass on
        chosen, left = [], limit
        for n, key in enumerate(order):
            take = min(left // (len(order) - n), len(strata[key]))
            chosen.extend(rng.choice(strata[key], size=take, replace=False).tolist())
            left -= take
    return [records[i] for i in sorted(i for u in chosen for i in members[u])]
