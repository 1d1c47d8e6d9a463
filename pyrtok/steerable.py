"""Steerable pyramid in the frequency domain (after Simoncelli and Freeman, 1995).

The image spectrum is split into a high-pass residual, ``levels`` band-pass scales with
``orientations`` oriented sub-bands each, and a low-pass residual. Radial windows are raised cosines
in log2 of the radial frequency, one octave wide, so that high-pass^2 + low-pass^2 = 1 at every
split; angular windows satisfy sum_b A_b(theta)^2 = 1. The windows therefore partition the spectrum's
energy, and :func:`reconstruct_steerable` inverts the transform exactly up to floating-point rounding,
under any ``scaling``.

Three scalings of the sub-sampled coefficients (band-pass scale s and the low-pass residual, on grids of
H_s x W_s points; the high-pass residual, on the full grid, is the same in all three). With
r_s = (H W) / (H_s W_s), which is 4^s when H and W are multiples of 2^s (the low-pass residual, on the
grid of scale ``levels``, takes r_levels):

- ``"amplitude"`` (default): each sub-band is the band-passed image sampled on its coarser grid, so a
  pattern has the same coefficient amplitude at every scale. Squared coefficients summed over scale s
  are 1 / r_s of that band's energy in the image, so this is not a tight frame in the plain sense.
- ``"tight"``: scale s multiplied by sqrt(r_s) (2^s). The sum of all squared coefficients equals the
  image's (Parseval), the transform is a tight frame and :func:`reconstruct_steerable` is its adjoint.
  This is plenoptic's ``SteerablePyramidFreq(..., tight_frame=True)`` scaling (orthonormal FFTs).
- ``"pyrtools"``: scale s multiplied by r_s (4^s), the unnormalised bands of pyrtools'
  ``SteerablePyramidFreq(image, height=levels, order=orientations - 1)``, which inverts the cropped
  spectrum at the smaller size without rescaling (plenoptic's default, ``tight_frame=False``, does the
  same). For images with even sides and the ``"steerable"`` angular profile, the coefficients then
match pyrtools' ``pyr_coeffs``:
  ``bands[s][..., b, :, :]`` is ``pyr_coeffs[(s, b)]``, ``highpass`` is ``"residual_highpass"`` and
  ``lowpass`` is ``"residual_lowpass"``, to about 1e-5 (pyrtools interpolates its raised cosines from a
  lookup table). Odd-sided images differ: pyrtools centres their spectrum differently (and warns that it
  cannot reconstruct them exactly).

Two angular profiles:

- ``"steerable"`` (the classic one): A_b(theta) = alpha * cos(theta - pi b / K)^(K-1). Any orientation's
  response is a linear combination of the K bands (steerability), at the price of broad tuning: a
  grating aligned with band b leaves only 1 / sum_j cos^(2K-2)(pi j / K) of its energy in band b
  (1.0 for K = 2, 0.889 for K = 3, 0.8 for K = 4), the rest in the neighbouring orientations.
- ``"sharp"``: a raised-cosine partition of the half circle into K sectors of width pi / K. Not
  steerable, but a grating aligned with a band puts essentially all its energy into that band, which
  is what orientation-energy token scores want.

Band b responds to spatial frequencies at angle pi b / K from the +column (x) axis towards +row (y):
band 0 responds to vertical stripes. Frequencies are normalised per axis (1 = Nyquist), so
non-square images get anisotropic windows, as in the reference implementation of the method.

Band-pass scale s is sampled on a grid of ceil-halved size (H_s, W_s) with H_0 = H; spectra are
cropped and zero-padded in the unshifted FFT layout, which works for odd and even sizes alike.
Computation is in float32 (float64 for float64 inputs); outputs are in the input's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from pyrtok._cache import tensor_cache
from pyrtok._checks import check_image, check_level_count

__all__ = [
    "ANGULAR_PROFILES",
    "SCALINGS",
    "SteerableBands",
    "SteerablePyramid",
    "max_steerable_levels",
    "orientation_energy",
    "reconstruct_steerable",
    "steerable_pyramid",
]

ANGULAR_PROFILES = ("steerable", "sharp")
SCALINGS = ("amplitude", "tight", "pyrtools")


@dataclass
class SteerableBands:
    """Coefficients of a steerable pyramid.

    Attributes:
        highpass: (..., H, W) residual above the first band-pass scale.
        bands: ``levels`` tensors; scale s has shape (..., K, H_s, W_s), K = orientations.
        lowpass: (..., H_L, W_L) residual below the last scale, on the grid of scale ``levels``.
        angular: the angular profile used ("steerable" or "sharp").
        scaling: how the sub-sampled coefficients are scaled (one of :data:`SCALINGS`, see the module
            notes); :func:`reconstruct_steerable` undoes it.
    """

    highpass: Tensor
    bands: list[Tensor]
    lowpass: Tensor
    angular: str
    scaling: str = "amplitude"

    @property
    def levels(self) -> int:
        return len(self.bands)

    @property
    def orientations(self) -> int:
        return self.bands[0].shape[-3]


def max_steerable_levels(height: int, width: int) -> int:
    """Largest ``levels`` for an image of ``height`` x ``width``: floor(log2(min side)) - 2.

    Example:
        >>> max_steerable_levels(256, 256)
        6
    """
    for arg, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    return max(math.floor(math.log2(min(height, width))) - 2, 0)


def _grid_sizes(n: int, levels: int) -> list[int]:
    sizes = [n]
    for _ in range(levels):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def _scale_factors(height: int, width: int, levels: int, scaling: str) -> list[float]:
    """Multipliers of band-pass scales 0..levels-1 and, last, of the low-pass residual (see the module notes)."""
    power = {"amplitude": 0.0, "tight": 0.5, "pyrtools": 1.0}[scaling]
    hs, ws = _grid_sizes(height, levels), _grid_sizes(width, levels)
    return [(height * width / (hs[s] * ws[s])) ** power for s in range(levels + 1)]


def _check_scaling(scaling: object, argument: str = "scaling") -> None:
    if scaling not in SCALINGS:
        raise ValueError(f"{argument} must be one of {SCALINGS}, got {scaling!r}")


def _int_freqs(n: int, device: torch.device) -> Tensor:
    """Integer frequencies of an n-point DFT in the unshifted layout: 0, 1, ..., -2, -1."""
    return torch.fft.fftfreq(n, d=1.0 / n, device=device).round().long()


def _raised_cosine(log_rad: Tensor, start: float) -> tuple[Tensor, Tensor]:
    """(high, low) windows with a one-octave transition starting at ``start``; high^2 + low^2 = 1."""
    t = (log_rad - start).clamp(0.0, 1.0)
    high = torch.sin(t * (math.pi / 2))
    # cos(pi / 2) is 6e-17, not 0: force exact zeros so that cropped-away frequencies carry nothing.
    low = torch.where(t >= 1.0, torch.zeros_like(t), torch.cos(t * (math.pi / 2)))
    return high, low


def _angular_windows(angle: Tensor, orientations: int, angular: str) -> Tensor:
    """(K, h, w) real angular windows with sum_b A_b^2 = 1; the steerable profile's phase is
    :func:`_phase_order`'s."""
    centres = torch.arange(orientations, device=angle.device, dtype=angle.dtype) * (math.pi / orientations)
    delta = angle.unsqueeze(0) - centres.view(-1, 1, 1)
    if angular == "steerable":
        order = orientations - 1
        alpha = math.sqrt(
            2 ** (2 * order) * math.factorial(order) ** 2 / (orientations * math.factorial(2 * order))
        )
        return alpha * torch.cos(delta).pow(order)
    if orientations == 1:
        return torch.ones_like(delta)
    half = math.pi / (2 * orientations)
    # Distance to the sector centre on the half circle (the window is pi-periodic, hence real bands).
    distance = (torch.remainder(delta + math.pi / 2, math.pi) - math.pi / 2).abs()
    u = ((distance - half) / half).clamp(-1.0, 1.0)
    return torch.where(u >= 1.0, torch.zeros_like(u), torch.cos((math.pi / 4) * (1.0 + u)))


def _phase_order(orientations: int, angular: str) -> int:
    """n such that the complex windows are the real ones times (-i)^n: the steerable profile of order K - 1 is
    antisymmetric in frequency for odd orders, and that phase keeps its bands real; the sharp one is pi-periodic."""
    return orientations - 1 if angular == "steerable" else 0


def _real_of_turned(y: Tensor, order: int, scale: float) -> Tensor:
    """(...) complex -> (...) real: scale * real((-i)^order * y), in one real multiply."""
    part = y.imag if order % 2 else y.real
    return part * (-scale if order % 4 >= 2 else scale)


def _times_real(spectrum: Tensor, window: Tensor) -> Tensor:
    """(..., 1 or K, H, W) complex x (K, H, W, 2) real (one window, stored twice along the last axis)
    -> (..., K, H, W) complex: both parts multiplied by the window in one real multiply of equal inner shapes,
    which vectorises where a complex-by-real product or a broadcast over the last axis does not."""
    return torch.view_as_complex(torch.view_as_real(spectrum.resolve_conj()) * window)


@dataclass(frozen=True)
class _Filters:
    hi0: Tensor  # (H, W)
    lo0: Tensor  # (H, W)
    crops: list[tuple[Tensor, Tensor]]  # index of grid s+1 inside grid s, per axis
    lomasks: list[Tensor]  # (H_s, W_s)
    oriented: list[Tensor]  # (K, H_s, W_s, 2) real: the radial band-pass times each angular window, twice
    phase: int  # the complex windows are ``oriented`` times (-i)^phase


@tensor_cache(maxsize=32)
def _filters(
    height: int, width: int, levels: int, orientations: int, angular: str, device: torch.device, dtype: torch.dtype
) -> _Filters:
    hs, ws = _grid_sizes(height, levels), _grid_sizes(width, levels)
    ky, kx = _int_freqs(height, device), _int_freqs(width, device)
    crops, lomasks, oriented = [], [], []
    hi0 = lo0 = None
    for s in range(levels + 1):
        # Frequencies in units of the original Nyquist, per axis; grid s keeps the integer frequencies.
        fy = ky.to(dtype) / (height / 2)
        fx = kx.to(dtype) / (width / 2)
        radius = torch.sqrt(fy.view(-1, 1) ** 2 + fx.view(1, -1) ** 2)
        log_rad = torch.log2(radius)  # -inf at DC, which the clamps below map to the low-pass side
        angle = torch.atan2(fy.view(-1, 1).expand_as(radius), fx.view(1, -1).expand_as(radius))
        if s == 0:
            hi0, lo0 = _raised_cosine(log_rad, -1.0)
        if s == levels:
            break
        high, low = _raised_cosine(log_rad + s, -2.0)
        lomasks.append(low)
        window = high * _angular_windows(angle, orientations, angular)
        oriented.append(torch.stack([window, window], dim=-1))
        index_y = _int_freqs(hs[s + 1], device).remainder(hs[s])
        index_x = _int_freqs(ws[s + 1], device).remainder(ws[s])
        crops.append((index_y, index_x))
        ky, kx = ky[index_y], kx[index_x]
    return _Filters(hi0, lo0, crops, lomasks, oriented, _phase_order(orientations, angular))


def _fft(x: Tensor) -> Tensor:
    return torch.fft.fft2(x, norm="forward")


def _ifft_real(x: Tensor) -> Tensor:
    return torch.fft.ifft2(x, norm="forward").real


def _crop(spectrum: Tensor, index: tuple[Tensor, Tensor]) -> Tensor:
    return spectrum[..., index[0][:, None], index[1][None, :]]


def _uncrop(spectrum: Tensor, index: tuple[Tensor, Tensor], size: tuple[int, int]) -> Tensor:
    out = spectrum.new_zeros(*spectrum.shape[:-2], *size)
    out[..., index[0][:, None], index[1][None, :]] = spectrum
    return out


def _check_params(levels: object, orientations: object, angular: object, height: int, width: int) -> None:
    check_level_count(levels, maximum=max_steerable_levels(height, width), size=(height, width),
                      rule="floor(log2(min side)) - 2")
    if isinstance(orientations, bool) or not isinstance(orientations, int) or orientations < 1:
        raise ValueError(f"orientations must be an int >= 1, got {orientations!r}")
    if angular not in ANGULAR_PROFILES:
        raise ValueError(f"angular must be one of {ANGULAR_PROFILES}, got {angular!r}")


def _real_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def steerable_pyramid(
    x: Tensor,
    levels: int = 4,
    orientations: int = 4,
    *,
    angular: str = "steerable",
    scaling: str = "amplitude",
    check_finite: bool = True,
) -> SteerableBands:
    """Decompose ``x`` into oriented band-pass sub-bands.

    Args:
        x: (..., H, W) floating image.
        levels: number of band-pass scales, 1 <= levels <= ``max_steerable_levels(H, W)``.
        orientations: number of orientations K per scale.
        angular: ``"steerable"`` (classic cos^(K-1) tuning) or ``"sharp"`` (see the module notes).
        scaling: ``"amplitude"`` (default), ``"tight"`` (x 2^s at scale s) or ``"pyrtools"`` (x 4^s at
            scale s, pyrtools' and plenoptic's numbers); see the module notes.
        check_finite: reject NaN/inf inputs; an FFT spreads one bad value over the whole image.

    Returns:
        :class:`SteerableBands` with ``highpass`` (..., H, W), ``bands[s]`` (..., K, H_s, W_s) and
        ``lowpass`` (..., H_L, W_L).

    Example:
        >>> coeffs = steerable_pyramid(torch.rand(2, 3, 64, 64), levels=3, orientations=4)
        >>> [tuple(b.shape) for b in coeffs.bands]
        [(2, 3, 4, 64, 64), (2, 3, 4, 32, 32), (2, 3, 4, 16, 16)]
        >>> x = torch.rand(64, 64)
        >>> ours, theirs = steerable_pyramid(x, 3), steerable_pyramid(x, 3, scaling="pyrtools")
        >>> bool(torch.allclose(theirs.bands[2], 16 * ours.bands[2], atol=1e-5))
        True
    """
    check_image(x, "x", check_finite=check_finite)
    height, width = x.shape[-2:]
    _check_params(levels, orientations, angular, height, width)
    _check_scaling(scaling)
    dtype = _real_dtype(x)
    filters = _filters(height, width, levels, orientations, angular, x.device, dtype)
    factors = _scale_factors(height, width, levels, scaling)
    spectrum = _fft(x.to(dtype))
    highpass = _ifft_real(spectrum * filters.hi0)
    low = spectrum * filters.lo0
    bands = []
    for s in range(levels):
        oriented = torch.fft.ifft2(_times_real(low.unsqueeze(-3), filters.oriented[s]), norm="forward")
        bands.append(_real_of_turned(oriented, filters.phase, factors[s]).to(x.dtype))
        low = _crop(low * filters.lomasks[s], filters.crops[s])
    lowpass = (_ifft_real(low) * factors[levels]).to(x.dtype)
    return SteerableBands(highpass.to(x.dtype), bands, lowpass, angular, scaling)


def reconstruct_steerable(coeffs: SteerableBands) -> Tensor:
    """Invert :func:`steerable_pyramid`, whatever its ``scaling`` (read from ``coeffs.scaling``).

    Args:
        coeffs: what :func:`steerable_pyramid` returned (tensors may have been edited, not reshaped).

    Returns:
        (..., H, W) image in the dtype of ``coeffs.highpass``.

    Example:
        >>> x = torch.rand(1, 64, 48)
        >>> bool((reconstruct_steerable(steerable_pyramid(x, 3)) - x).abs().max() < 1e-5)
        True
    """
    if not isinstance(coeffs, SteerableBands):
        raise TypeError(f"coeffs must be a SteerableBands from steerable_pyramid, got {type(coeffs).__name__}")
    height, width = coeffs.highpass.shape[-2:]
    levels, orientations = coeffs.levels, coeffs.orientations
    _check_params(levels, orientations, coeffs.angular, height, width)
    _check_scaling(coeffs.scaling, "coeffs.scaling")
    hs, ws = _grid_sizes(height, levels), _grid_sizes(width, levels)
    expected = [(*coeffs.highpass.shape[:-2], orientations, hs[s], ws[s]) for s in range(levels)]
    for s, band in enumerate(coeffs.bands):
        if tuple(band.shape) != expected[s]:
            raise ValueError(f"coeffs.bands[{s}] has shape {tuple(band.shape)}, expected {expected[s]}")
    if tuple(coeffs.lowpass.shape[-2:]) != (hs[-1], ws[-1]):
        raise ValueError(
            f"coeffs.lowpass has spatial shape {tuple(coeffs.lowpass.shape[-2:])}, expected {(hs[-1], ws[-1])}"
        )
    dtype = _real_dtype(coeffs.highpass)
    filters = _filters(height, width, levels, orientations, coeffs.angular, coeffs.highpass.device, dtype)
    factors = _scale_factors(height, width, levels, coeffs.scaling)
    low = _fft(coeffs.lowpass.to(dtype)) / factors[levels]
    for s in reversed(range(levels)):
        low = _uncrop(low, filters.crops[s], (hs[s], ws[s])) * filters.lomasks[s]
        oriented = _times_real(_fft(coeffs.bands[s].to(dtype)), filters.oriented[s]).sum(dim=-3)
        # the adjoint of the phase (-i)^n is i^n, exact for integer n
        low = low + oriented * ((1j) ** filters.phase / factors[s])
    spectrum = low * filters.lo0 + _fft(coeffs.highpass.to(dtype)) * filters.hi0
    return _ifft_real(spectrum).to(coeffs.highpass.dtype)


def orientation_energy(coeffs: SteerableBands) -> list[Tensor]:
    """Mean squared coefficient per scale and orientation: ``levels`` tensors of shape (..., K).

    Scale s carries the square of its ``scaling`` factor (see the module notes), so energies compare
    across scales as the chosen scaling defines them.
    """
    return [rearrange(band, "... k h w -> ... k (h w)").pow(2).mean(-1) for band in coeffs.bands]


class SteerablePyramid(nn.Module):
    """Module form of :func:`steerable_pyramid` with its inverse as :meth:`reconstruct`.

    Example:
        >>> pyr = SteerablePyramid(levels=2, orientations=4, angular="sharp")
        >>> x = torch.rand(1, 1, 32, 32)
        >>> bool((pyr.reconstruct(pyr(x)) - x).abs().max() < 1e-5)
        True
    """

    def __init__(
        self, levels: int = 4, orientations: int = 4, angular: str = "steerable", scaling: str = "amplitude"
    ) -> None:
        super().__init__()
        check_level_count(levels)
        if isinstance(orientations, bool) or not isinstance(orientations, int) or orientations < 1:
            raise ValueError(f"orientations must be an int >= 1, got {orientations!r}")
        if angular not in ANGULAR_PROFILES:
            raise ValueError(f"angular must be one of {ANGULAR_PROFILES}, got {angular!r}")
        _check_scaling(scaling)
        self.levels, self.orientations, self.angular, self.scaling = levels, orientations, angular, scaling

    def forward(self, x: Tensor) -> SteerableBands:
        """(..., H, W) image -> :class:`SteerableBands` (shapes as in :func:`steerable_pyramid`)."""
        return steerable_pyramid(x, self.levels, self.orientations, angular=self.angular, scaling=self.scaling)

    def reconstruct(self, coeffs: SteerableBands) -> Tensor:
        return reconstruct_steerable(coeffs)

    def extra_repr(self) -> str:
        return (f"levels={self.levels}, orientations={self.orientations}, angular={self.angular!r}, "
                f"scaling={self.scaling!r}")
