"""The one-step-ahead batch worker: the same batches as building them in place, in order or not."""

import pytest
import torch

from pyrtok._prefetch import Prefetcher
from pyrtok.data.conversations import scene_batch


def _requests(n):
    return [{"split": "train", "first": 4 * k, "count": 4, "size": 64, "seed": 0, "patch": 16, "turns": 2}
            for k in range(n)]


def _same(a, b):
    (ia, qa, ta), (ib, qb, tb) = a, b
    return torch.equal(ia, ib) and qa == qb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("workers", [0, 1])
def test_batches_are_the_requests_results_and_the_worker_answers_every_announced_one(workers):
    requests = _requests(4)
    with Prefetcher(scene_batch, workers=workers) as batches:
        got = [batches(r, requests[k + 1] if k + 1 < len(requests) else None) for k, r in enumerate(requests)]
    assert all(_same(g, scene_batch(**r)) for g, r in zip(got, requests, strict=True))
    assert batches.ahead == (3 if workers else 0)


def test_a_request_other_than_the_announced_one_is_built_in_place():
    first, second, third = _requests(3)
    with Prefetcher(scene_batch, workers=1) as batches:
        batches(first, upcoming=second)
        out = batches(third, upcoming=None)  # the plan changed: the worker's batch for `second` is dropped
        assert _same(out, scene_batch(**third)) and batches.ahead == 0
        batches(first, upcoming=second)
        assert _same(batches(second), scene_batch(**second)) and batches.ahead == 1


@pytest.mark.parametrize("workers", [2, -1, True, "1"])
def test_workers_is_zero_or_one(workers):
    with pytest.raises(ValueError, match=r"workers must be 0 .* or 1"):
        Prefetcher(scene_batch, workers=workers)


def test_a_worker_that_dies_is_replaced_by_building_in_place():
    first, second, third = _requests(3)
    with Prefetcher(scene_batch, workers=1) as batches:
        batches(first, upcoming=second)
        for process in list(batches._pool._processes.values()):  # still starting: it has not built `second`
            process.kill()
        assert _same(batches(second, upcoming=third), scene_batch(**second))
        assert batches._pool is None and batches.ahead == 0
        assert _same(batches(third), scene_batch(**third))
