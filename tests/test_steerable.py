import math

import pytest
import torch

from pyrtok.steerable import (
    ANGULAR_PROFILES,
    SteerablePyramid,
    max_steerable_levels,
    orientation_energy,
    reconstruct_steerable,
    steerable_pyramid,
)


def grating(size: int, angle: float, cycles_per_pixel: float) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                          indexing="ij")
    return torch.cos(2 * math.pi * cycles_per_pixel * (x * math.cos(angle) + y * math.sin(angle)))


@pytest.mark.parametrize("angular", ANGULAR_PROFILES)
@pytest.mark.parametrize("orientations", [1, 2, 4, 6])
@pytest.mark.parametrize("size", [(64, 64), (65, 47), (96, 128), (33, 40)])
def test_reconstruction_is_exact(angular, orientations, size, device):
    x = torch.rand(2, *size, device=device)
    levels = max_steerable_levels(*size)
    coeffs = steerable_pyramid(x, levels, orientations, angular=angular)
    assert (reconstruct_steerable(coeffs) - x).abs().max().item() <= 1e-5
    x64 = x.double()
    coeffs64 = steerable_pyramid(x64, levels, orientations, angular=angular)
    assert (reconstruct_steerable(coeffs64) - x64).abs().max() <= 1e-12


def test_shapes_and_leading_dims():
    video = torch.rand(2, 3, 3, 64, 48)
    coeffs = steerable_pyramid(video, levels=3, orientations=4)
    assert coeffs.highpass.shape == (2, 3, 3, 64, 48)
    assert [tuple(b.shape) for b in coeffs.bands] == [(2, 3, 3, 4, 64, 48), (2, 3, 3, 4, 32, 24), (2, 3, 3, 4, 16, 12)]
    assert coeffs.lowpass.shape == (2, 3, 3, 8, 6)
    single = steerable_pyramid(video[1, 2, 0], levels=3, orientations=4)
    assert torch.allclose(coeffs.bands[1][1, 2, 0], single.bands[1], atol=1e-6)
    assert coeffs.levels == 3 and coeffs.orientations == 4


@pytest.mark.parametrize("orientations", [2, 3, 4, 6, 8])
def test_sharp_profile_puts_a_grating_into_its_orientation_band(orientations):
    """An aligned grating leaves >= 90% of its scale's band energy in the band of its orientation."""
    scale = 1
    for band in range(orientations):
        # Radial frequency 2^-(scale+1) of Nyquist is the centre of band-pass scale `scale`.
        image = grating(128, math.pi * band / orientations, 0.5 * 2 ** -(scale + 1))
        energy = orientation_energy(steerable_pyramid(image, 3, orientations, angular="sharp"))[scale]
        assert (energy[band] / energy.sum()).item() >= 0.9


@pytest.mark.parametrize("orientations", [2, 3, 4, 6])
def test_steerable_profile_has_its_theoretical_selectivity(orientations):
    """cos^(K-1) tuning: an aligned grating keeps 1 / sum_j cos^(2K-2)(pi j / K) of the energy in its band."""
    order = orientations - 1
    theory = 2 ** (2 * order) * math.factorial(order) ** 2 / (orientations * math.factorial(2 * order))
    image = grating(128, 0.0, 0.125)
    energy = orientation_energy(steerable_pyramid(image, 3, orientations))[1]
    assert energy.argmax().item() == 0
    assert (energy[0] / energy.sum()).item() == pytest.approx(theory, abs=0.02)


def test_classic_k2_splits_a_rotated_grating_by_cos_squared():
    """K = 2 bands are first derivatives: a grating at angle a gives them cos^2(a) and sin^2(a)."""
    energy = orientation_energy(steerable_pyramid(grating(64, 0.3, 0.125), 2, 2))[1]
    assert (energy[0] / energy.sum()).item() == pytest.approx(math.cos(0.3) ** 2, abs=0.02)
    assert energy.dtype == torch.float64


def test_scale_selectivity():
    coarse = grating(128, 0.0, 0.5 * 2**-3)  # centre of scale 2
    energy = [e.sum().item() for e in orientation_energy(steerable_pyramid(coarse, 3, 4))]
    assert max(range(3), key=lambda s: energy[s]) == 2


def test_dtypes_and_module():
    x = torch.rand(1, 3, 32, 32).to(torch.bfloat16)
    pyr = SteerablePyramid(levels=2, orientations=3, angular="sharp")
    coeffs = pyr(x)
    assert coeffs.bands[0].dtype == torch.bfloat16
    assert "angular='sharp'" in repr(pyr)
    assert (pyr.reconstruct(coeffs).float() - x.float()).abs().max() <= 0.02


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="the maximum is 3"):
        steerable_pyramid(torch.rand(32, 32), levels=4)
    with pytest.raises(ValueError, match="levels must be >= 1"):
        steerable_pyramid(torch.rand(32, 32), levels=0)
    with pytest.raises(ValueError, match="orientations"):
        steerable_pyramid(torch.rand(32, 32), levels=1, orientations=0)
    with pytest.raises(ValueError, match="angular"):
        steerable_pyramid(torch.rand(32, 32), levels=1, angular="gabor")
    with pytest.raises(TypeError, match="floating dtype"):
        steerable_pyramid(torch.zeros(32, 32, dtype=torch.int64), levels=1)
    with pytest.raises(ValueError, match="NaN"):
        steerable_pyramid(torch.full((32, 32), float("nan")), levels=1)
    coeffs = steerable_pyramid(torch.rand(32, 32), levels=2)
    coeffs.bands[1] = coeffs.bands[1][..., :-1]
    with pytest.raises(ValueError, match=r"bands\[1\] has shape"):
        reconstruct_steerable(coeffs)
    with pytest.raises(TypeError, match="SteerableBands"):
        reconstruct_steerable([torch.rand(4, 4)])
