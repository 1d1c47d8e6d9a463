"""Image difficulty: one calibrated scalar in [0, 1] per image (optionally per image and query).

Raw difficulty is the mean of scale-free features, each in [0, 1]:

- ``fine_fraction``: share of the band-pass energy (the first four Laplacian bands, energy averaged over
  channels) that lies in the two finest bands (small detail everywhere needs fine tokens);
- ``saliency_entropy``: entropy of the spectral-residual saliency map (at 32 pixels wide), as a
  distribution over its pixels, over its maximum (clutter everywhere, no single place to look);
- ``query_spread`` (with tokens and a query): entropy of softmax(relevance / 0.05) over tokens, over
  log N (the query does not point anywhere in particular).

Calibration maps raw values through the empirical CDF of a reference set (piecewise-linear between
stored quantiles), so that over images like the reference, difficulty is spread uniformly over [0, 1].
The shipped reference (``difficulty_reference.json``) was fitted on random crops of the photographs
bundled with scikit-image, matplotlib and scikit-learn; refit it on your own data with
:meth:`DifficultyCalibrator.fit`, or rebuild the shipped one with
``pyrtok fit-difficulty --fit-default``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from pyrtok._cache import tensor_cache
from pyrtok._checks import check_image
from pyrtok.signals.laplacian import band_energy_maps
from pyrtok.signals.query import query_relevance
from pyrtok.signals.saliency import spectral_residual
from pyrtok.tokens import MultiScaleTokens

REFERENCE_PATH = Path(__file__).with_name("difficulty_reference.json")


def _entropy_fraction(weights: Tensor) -> Tensor:
    """Normalised entropy of each row of non-negative (B, M) weights, in [0, 1]."""
    p = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
    return entropy / math.log(weights.shape[-1]) if weights.shape[-1] > 1 else torch.zeros_like(entropy)


BANDS = 4


def raw_difficulty(
    image: Tensor,
    tokens: MultiScaleTokens | None = None,
    query: Tensor | None = None,
    band_maps: list[Tensor] | None = None,
    *,
    check_finite: bool = True,
) -> Tensor:
    """Uncalibrated difficulty (B,) in [0, 1]: the mean of the features in the module notes.

    ``band_maps``: optional precomputed ``band_energy_maps(image, k)`` with k >= 4, shared with other signals.
    ``check_finite``: reject NaN/inf images (skip it when the caller has already checked them).
    """
    check_image(image, "image", check_finite=check_finite)
    if image.dim() != 4:
        raise ValueError(f"image must have shape (B, C, H, W), got {tuple(image.shape)}")
    if band_maps is None:
        band_maps = band_energy_maps(image.float(), BANDS, check_finite=False)
    elif len(band_maps) < BANDS:
        raise ValueError(f"band_maps must hold at least {BANDS} band energy maps, got {len(band_maps)}")
    energy = torch.stack([m.flatten(1).sum(1) for m in band_maps[:BANDS]], 1)  # (B, bands)
    fine = energy[:, :2].sum(1) / energy.sum(1).clamp_min(1e-12)
    # The entropy is a coarse statistic: a 32-pixel-wide saliency map measures it as well as a larger one.
    saliency = spectral_residual(image, width=32, sigma=1.25, full_size=False, check_finite=False)
    features = [fine, _entropy_fraction(saliency.flatten(1))]
    if query is not None:
        if tokens is None:
            raise ValueError("query needs tokens: pass the tokens whose relevance the query should spread over")
        features.append(_entropy_fraction(torch.softmax(query_relevance(tokens, query) / 0.05, dim=-1)))
    return torch.stack(features, 1).mean(1)


class DifficultyCalibrator:
    """Monotone map from raw difficulty to [0, 1] through stored reference quantiles.

    Example:
        >>> calibrator = DifficultyCalibrator.fit(torch.linspace(0.2, 0.4, 101))
        >>> [round(v, 2) for v in calibrator(torch.tensor([0.1, 0.3, 0.5])).tolist()]
        [0.0, 0.5, 1.0]
    """

    def __init__(self, quantiles: Tensor) -> None:
        quantiles = torch.as_tensor(quantiles, dtype=torch.float32).flatten()
        if quantiles.numel() < 2 or bool((quantiles[1:] < quantiles[:-1]).any()):
            raise ValueError("quantiles must be a non-decreasing sequence of at least 2 values")
        self.quantiles = quantiles

    @classmethod
    def fit(cls, raw: Tensor, num_quantiles: int = 101) -> DifficultyCalibrator:
        """Fit on (M,) raw difficulties of a reference set."""
        raw = torch.as_tensor(raw, dtype=torch.float32).flatten()
        if raw.numel() < 2:
            raise ValueError(f"raw must hold at least 2 reference values, got {raw.numel()}")
        return cls(torch.quantile(raw, torch.linspace(0, 1, num_quantiles)))

    @classmethod
    def default(cls) -> DifficultyCalibrator:
        return _default_calibrator()

    def __call__(self, raw: Tensor) -> Tensor:
        q = self.quantiles.to(raw.device)
        x = raw.float().clamp(q[0], q[-1])
        hi = torch.searchsorted(q, x, right=True).clamp(1, q.numel() - 1)
        lo = hi - 1
        span = (q[hi] - q[lo]).clamp_min(1e-12)
        position = lo.float() + ((x - q[lo]) / span).clamp(0, 1)
        return position / (q.numel() - 1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"quantiles": self.quantiles.tolist()}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> DifficultyCalibrator:
        return cls(torch.tensor(json.loads(Path(path).read_text())["quantiles"]))


@tensor_cache(maxsize=1)
def _default_calibrator() -> DifficultyCalibrator:
    return DifficultyCalibrator.load(REFERENCE_PATH)


def difficulty(
    image: Tensor,
    tokens: MultiScaleTokens | None = None,
    query: Tensor | None = None,
    calibrator: DifficultyCalibrator | None = None,
    band_maps: list[Tensor] | None = None,
    *,
    check_finite: bool = True,
) -> Tensor:
    """Calibrated difficulty in [0, 1], one value per image.

    Args:
        image: (B, C, H, W) images in [0, 1].
        tokens: needed only with ``query``.
        query: optional (B, D) or (D,) text embedding in the tokens' space.
        calibrator: reference calibration; default the shipped one.
        band_maps: optional precomputed ``band_energy_maps(image, k)``, k >= 4.
        check_finite: reject NaN/inf images (skip it when the caller has already checked them).

    Returns:
        (B,) difficulties in [0, 1].
    """
    calibrator = calibrator or DifficultyCalibrator.default()
    return calibrator(raw_difficulty(image, tokens, query, band_maps, check_finite=check_finite))


def reference_images(count: int = 256, size: int = 224, seed: int = 0) -> Tensor:
    """Random square crops (10% to 100% of the short side) of the bundled photographs, resized to ``size``."""
    from pyrtok.samples import available_samples, sample_image

    generator = torch.Generator().manual_seed(seed)
    photos = [sample_image(name) for name in available_samples()]
    crops = []
    for _ in range(count):
        photo = photos[int(torch.randint(len(photos), (1,), generator=generator))]
        h, w = photo.shape[-2:]
        side = max(16, int(min(h, w) * (0.1 + 0.9 * torch.rand(1, generator=generator).item())))
        top = int(torch.randint(h - side + 1, (1,), generator=generator))
        left = int(torch.randint(w - side + 1, (1,), generator=generator))
        crop = photo[:, top : top + side, left : left + side].unsqueeze(0)
        crops.append(F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return torch.cat(crops).clamp(0, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="pyrtok fit-difficulty",
        description=f"Refit the difficulty calibration that ships as {REFERENCE_PATH.name} on random crops of the "
                    f"bundled photographs (all of them: the train extra).")
    parser.add_argument("--fit-default", action="store_true",
                        help=f"rewrite the shipped {REFERENCE_PATH.name} (required: the command does nothing else)")
    parser.add_argument("--count", type=int, default=256,
                        help="random crops the calibration is fitted on (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.fit_default:
        parser.error("nothing to do: pass --fit-default")
    from pyrtok.samples import missing_sample_packages

    missing, line = missing_sample_packages()
    if missing:  # the shipped reference is fitted on every photograph, so that a refit reproduces it
        raise ValueError(f"--fit-default needs every bundled photograph; {', '.join(missing)} not installed: {line}")
    raw = torch.cat([raw_difficulty(batch) for batch in reference_images(args.count).split(32)])
    DifficultyCalibrator.fit(raw).save(REFERENCE_PATH)
    print(f"raw difficulty over {args.count} crops: min {raw.min():.4f} median {raw.median():.4f} "
          f"max {raw.max():.4f} -> {REFERENCE_PATH}")

