import math

import pytest
import torch

from pyrtok.steerable import (
    ANGULAR_PROFILES,
    SCALINGS,
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


@pytest.mark.parametrize("size", [(64, 64), (96, 128), (65, 47), (33, 40)])
def test_scalings_multiply_each_subsampled_scale_by_its_factor(size):
    """"pyrtools" = amplitude x r_s, "tight" = amplitude x sqrt(r_s), r_s = HW / (H_s W_s) (4^s for even sides)."""
    x = torch.rand(2, *size, dtype=torch.float64)
    levels = max_steerable_levels(*size)
    base = steerable_pyramid(x, levels, 3)
    area = size[0] * size[1]
    for scaling, power in (("pyrtools", 1.0), ("tight", 0.5)):
        scaled = steerable_pyramid(x, levels, 3, scaling=scaling)
        assert scaled.scaling == scaling and base.scaling == "amplitude"
        assert torch.equal(scaled.highpass, base.highpass)
        for s, (band, reference) in enumerate(zip(scaled.bands, base.bands, strict=True)):
            factor = (area / (band.shape[-2] * band.shape[-1])) ** power
            assert torch.allclose(band, reference * factor, rtol=1e-12, atol=1e-12)
            if size[0] % 2**s == 0 and size[1] % 2**s == 0:
                assert factor == pytest.approx(4 ** (s * power))
        factor = (area / (scaled.lowpass.shape[-2] * scaled.lowpass.shape[-1])) ** power
        assert torch.allclose(scaled.lowpass, base.lowpass * factor, rtol=1e-12, atol=1e-12)


def test_pyrtools_scaling_is_four_to_the_scale_on_power_of_two_images():
    x = torch.rand(128, 128, dtype=torch.float64)
    base, pyrtools = steerable_pyramid(x, 4, 4), steerable_pyramid(x, 4, 4, scaling="pyrtools")
    for s in range(4):
        assert torch.allclose(pyrtools.bands[s], 4**s * base.bands[s], rtol=1e-12, atol=1e-12)
    assert torch.allclose(pyrtools.lowpass, 4**4 * base.lowpass, rtol=1e-12, atol=1e-12)
    # A coarse grating has the same amplitude at its scale under "amplitude", 4^s times it under "pyrtools".
    coarse = grating(128, 0.0, 0.5 * 2**-3)
    amplitude = steerable_pyramid(coarse, 3, 2).bands[2][0].abs().max().item()
    assert steerable_pyramid(coarse, 3, 2, scaling="pyrtools").bands[2][0].abs().max().item() == pytest.approx(
        16 * amplitude)


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("angular", ANGULAR_PROFILES)
@pytest.mark.parametrize("size", [(64, 64), (65, 47), (96, 128)])
def test_reconstruction_is_exact_under_every_scaling(scaling, angular, size):
    x = torch.rand(2, *size)
    levels = max_steerable_levels(*size)
    coeffs = steerable_pyramid(x, levels, 4, angular=angular, scaling=scaling)
    assert (reconstruct_steerable(coeffs) - x).abs().max().item() <= 1e-5
    x64 = x.double()
    coeffs64 = SteerablePyramid(levels, 4, angular, scaling)(x64)
    assert coeffs64.scaling == scaling
    assert (reconstruct_steerable(coeffs64) - x64).abs().max() <= 1e-12


def test_reconstruction_reads_the_scaling_from_the_coefficients():
    x = torch.rand(64, 64, dtype=torch.float64)
    coeffs = steerable_pyramid(x, 3, 4, scaling="pyrtools")
    coeffs.scaling = "amplitude"  # the numbers stay 4^s too large for this label
    assert (reconstruct_steerable(coeffs) - x).abs().max() > 0.1


@pytest.mark.parametrize("angular", ANGULAR_PROFILES)
@pytest.mark.parametrize("size", [(64, 64), (65, 47), (33, 40)])
def test_tight_scaling_keeps_the_energy(angular, size):
    """Parseval: the squared coefficients sum to the image's energy under "tight", and only under it."""
    x = torch.rand(*size, dtype=torch.float64)
    levels = max_steerable_levels(*size)

    def energy(coeffs) -> float:
        parts = [coeffs.highpass, *coeffs.bands, coeffs.lowpass]
        return sum(part.pow(2).sum().item() for part in parts)

    total = x.pow(2).sum().item()
    assert energy(steerable_pyramid(x, levels, 3, angular=angular, scaling="tight")) == pytest.approx(total, rel=1e-10)
    assert energy(steerable_pyramid(x, levels, 3, angular=angular)) < 0.9 * total
    assert energy(steerable_pyramid(x, levels, 3, angular=angular, scaling="pyrtools")) > 1.1 * total


def test_bad_scaling_is_named():
    with pytest.raises(ValueError, match=r"scaling must be one of .*'pyrtools'.*got 'matlab'"):
        steerable_pyramid(torch.rand(32, 32), levels=2, scaling="matlab")
    with pytest.raises(ValueError, match=r"scaling must be one of .*got None"):
        SteerablePyramid(levels=2, scaling=None)
    coeffs = steerable_pyramid(torch.rand(32, 32), levels=2)
    coeffs.scaling = "unit"
    with pytest.raises(ValueError, match=r"coeffs\.scaling must be one of .*got 'unit'"):
        reconstruct_steerable(coeffs)
    assert "scaling='pyrtools'" in repr(SteerablePyramid(levels=2, scaling="pyrtools"))


@pytest.mark.parametrize(("size", "levels", "orientations"), [((64, 64), 3, 4), ((96, 128), 4, 2), ((64, 64), 2, 3)])
def test_pyrtools_scaling_gives_the_coefficients_of_pyrtools_and_plenoptic(size, levels, orientations):
    """The libraries themselves as the reference: pyrtools' SteerablePyramidFreq (numpy, float64) and plenoptic's
    (torch, tight_frame=False) give the same sub-bands and residuals to the accuracy of pyrtools' lookup-table
    raised cosines (about 1e-5 of coefficients of order 1)."""
    import warnings

    import numpy as np
    import pyrtools

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import plenoptic

    image = np.random.default_rng(0).random(size)
    theirs = pyrtools.pyramids.SteerablePyramidFreq(image, height=levels, order=orientations - 1).pyr_coeffs
    ours = steerable_pyramid(torch.from_numpy(image), levels, orientations, scaling="pyrtools")
    assert np.abs(ours.highpass.numpy() - theirs["residual_highpass"]).max() < 5e-5
    assert np.abs(ours.lowpass.numpy() - theirs["residual_lowpass"]).max() < 5e-5
    for s in range(levels):
        for b in range(orientations):
            assert np.abs(ours.bands[s][b].numpy() - theirs[(s, b)]).max() < 5e-5, (s, b)
    model = plenoptic.process.SteerablePyramidFreq(size, height=levels, order=orientations - 1, tight_frame=False)
    x = torch.from_numpy(image)[None, None]
    reference = model(x.float())
    mine = steerable_pyramid(x.float(), levels, orientations, scaling="pyrtools")
    for s in range(levels):
        assert (mine.bands[s] - reference[s]).abs().max().item() < 5e-5, s
    assert (mine.highpass - reference["residual_highpass"]).abs().max().item() < 5e-5
    assert (mine.lowpass - reference["residual_lowpass"]).abs().max().item() < 5e-5
    # an unrelated image is far from it: the comparison can fail
    assert np.abs(ours.bands[0][0].numpy() - theirs[(0, 1)]).max() > 1e-2


def test_filters_first_built_in_inference_mode_still_serve_autograd():
    """The cached windows are built with inference mode off, so a first call under torch.inference_mode() does
    not leave inference tensors behind for a later differentiable call."""
    from pyrtok.steerable import _filters

    _filters.cache_clear()
    x = torch.rand(1, 3, 40, 44)
    with torch.inference_mode():
        steerable_pyramid(x, 2, 3)
    leaf = x.clone().requires_grad_(True)
    coeffs = steerable_pyramid(leaf, 2, 3)
    (coeffs.bands[0] ** 2).sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
