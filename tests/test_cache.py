"""Cached constant tensors are ordinary tensors wherever they are first built (``pyrtok._cache.tensor_cache``)."""

import pytest
import torch

from pyrtok.signals.difficulty import _default_calibrator
from pyrtok.signals.redundancy import _neighbour_table
from pyrtok.signals.saliency import _gaussian_kernel
from pyrtok.steerable import _filters
from pyrtok.vlm.families.llava_next import bilinear_reads

CPU = torch.device("cpu")
BUILDERS = {
    "steerable windows": (_filters, (16, 20, 2, 3, "steerable", CPU, torch.float32), lambda f: f.oriented[0]),
    "saliency blur": (_gaussian_kernel, (1.5, torch.float32, CPU), lambda k: k),
    "redundancy neighbours": (_neighbour_table, (((4, 4), (2, 2)),), lambda t: t),
    "difficulty calibration": (_default_calibrator, (), lambda c: c.quantiles),
    "LLaVA-NeXT bilinear reads": (bilinear_reads, (3, 5, CPU, torch.float32), lambda r: r),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_a_first_build_under_inference_mode_caches_an_ordinary_tensor(name):
    builder, args, tensor_of = BUILDERS[name]
    builder.cache_clear()
    with torch.inference_mode():
        first = tensor_of(builder(*args))
    assert not first.is_inference()
    assert tensor_of(builder(*args)) is first  # cached
    builder.cache_clear()


def test_keywords_reach_the_builder():
    assert torch.equal(bilinear_reads(3, 5, device=CPU, dtype=torch.float32), bilinear_reads(3, 5, CPU, torch.float32))
