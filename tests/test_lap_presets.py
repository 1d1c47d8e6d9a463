"""LapLoss presets against ports of the snippets they name: the same loss and gradients within 1e-6."""

from __future__ import annotations

import pytest
import torch
from snippet_ports import PORTS

from pyrtok.lap_presets import PRESETS, snippet_pyramid
from pyrtok.losses import LapLoss, laplacian_band_errors

SIZES = {"rife": [(64, 96), (128, 64)], "glo": [(45, 67), (64, 64)], "mtyka": [(37, 50), (48, 32)]}


@pytest.mark.parametrize("name", sorted(PORTS))
@pytest.mark.parametrize("which", [0, 1])
def test_each_preset_is_its_snippet_in_value_and_gradient(name, which):
    height, width = SIZES[name][which]
    g = torch.Generator().manual_seed(which)
    pred = torch.rand(3, 3, height, width, generator=g, requires_grad=True)
    target = torch.rand(3, 3, height, width, generator=g)
    ours = LapLoss.from_preset(name)(pred, target)
    (ours_grad,) = torch.autograd.grad(ours, pred)
    reference = PORTS[name](pred, target)
    (reference_grad,) = torch.autograd.grad(reference, pred)
    assert abs(ours.item() - reference.item()) <= 1e-6
    assert (ours_grad - reference_grad).abs().max().item() <= 1e-6


def test_the_snippets_disagree_and_the_structure_is_theirs():
    g = torch.Generator().manual_seed(5)
    pred, target = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    values = {name: float(LapLoss.from_preset(name)(pred, target)) for name in PORTS}
    assert len({round(v, 3) for v in values.values()}) == 3  # three different losses on the same input
    assert [tuple(level.shape[-2:]) for level in snippet_pyramid(pred, PRESETS["glo"])] == \
        [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    assert len(snippet_pyramid(pred, PRESETS["mtyka"])) == 4  # 3 bands and the residual


def test_rife_sides_need_a_multiple_of_32_unless_cropped():
    g = torch.Generator().manual_seed(6)
    odd = torch.rand(1, 3, 101, 150, generator=g), torch.rand(1, 3, 101, 150, generator=g)
    with pytest.raises(ValueError, match=r"divisible by 2\*\*bands = 32.*any_size=True"):
        LapLoss.from_preset("rife")(*odd)
    cropped = LapLoss.from_preset("rife", any_size=True)
    assert torch.isfinite(cropped(*odd))
    even = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    assert float(cropped(*even)) == float(LapLoss.from_preset("rife")(*even))  # the same where the snippet runs
    with pytest.raises(ValueError, match="sides >= 48, so that reflect padding fits"):
        LapLoss.from_preset("rife")(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))


def test_switches_residual_and_mask():
    g = torch.Generator().manual_seed(7)
    pred, target = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    plain = LapLoss.from_preset("rife")
    with_residual = LapLoss.from_preset("rife", residual=True)
    residual = (snippet_pyramid(pred - target, with_residual.snippet)[-1]).abs().mean()
    assert abs(float(with_residual(pred, target)) - float(plain(pred, target)) - float(residual)) <= 1e-6
    ones = torch.ones(2, 1, 64, 64)
    for name in PORTS:
        loss = LapLoss.from_preset(name)
        # the same loss; float32 sums in another order (a norm unmasked, weighted sums masked)
        assert float(loss(pred, target, ones)) == pytest.approx(float(loss(pred, target)), rel=1e-5)
    half = ones.clone()
    half[..., 32:] = 0
    # a change where the mask is zero (beyond the blur's reach) leaves the finest level's error as it was
    far = pred.clone()
    far[..., 40:] += 5.0
    snippet = LapLoss.from_preset("glo").snippet
    near = laplacian_band_errors(pred, target, mask=half, snippet=snippet)
    moved = laplacian_band_errors(far, target, mask=half, snippet=snippet)
    assert near.shape == (2, 6) and torch.equal(near[:, 0], moved[:, 0]) and not torch.equal(near, moved)
    unmasked = laplacian_band_errors(far, target, snippet=snippet)
    assert bool((unmasked[:, 0] > near[:, 0]).all())
    with pytest.raises(ValueError, match="preset must be one of"):
        LapLoss.from_preset("kornia")
    assert "preset='mtyka'" in repr(LapLoss.from_preset("mtyka"))
