"""Seeded subsets of a task: the first-come ``limit`` or a stratified sample per category."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

__all__ = ["subset"]


def subset(records: list[dict], limit: int | None = None, seed: int = 0, stratify: str | None = None) -> list[dict]:
    """At most ``limit`` records, chosen reproducibly from ``seed``.

    Without ``stratify`` the records are a seeded random sample; with ``stratify`` (a field name such as
    ``"category"``) the values of that field get shares of ``limit`` as equal as their sizes allow (a value
    with fewer records than its share passes the rest on to the others).
    The result keeps the original order, so batches are the same whatever ``limit`` picked.

    >>> rows = [{"id": str(i), "category": "ab"[i % 2]} for i in range(10)]
    >>> [r["id"] for r in subset(rows, 4, stratify="category")].__len__()
    4
    >>> sorted({r["category"] for r in subset(rows, 2, stratify="category")})
    ['a', 'b']
    """
    if limit is None or limit >= len(records):
        return list(records)
    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    rng = np.random.default_rng(seed)
    if stratify is None:
        chosen = rng.choice(len(records), size=limit, replace=False)
        return [records[i] for i in sorted(chosen)]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        if stratify not in record:
            raise ValueError(f"stratify names the field {stratify!r}, which record {record.get('id', i)!r} lacks")
        groups[str(record[stratify])].append(i)
    order = sorted(groups, key=lambda k: len(groups[k]))  # small groups first, so their leftovers pass on
    chosen, left = [], limit
    for n, key in enumerate(order):
        share = left // (len(order) - n)
        take = min(share, len(groups[key]))
        chosen.extend(rng.choice(groups[key], size=take, replace=False).tolist())
        left -= take
    return [records[i] for i in sorted(chosen)]
