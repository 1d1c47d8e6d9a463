"""pyrtok: multi-scale visual-token allocation for vision-language models."""

from pyrtok.losses import LapLoss, lap_loss, laplacian_band_errors
from pyrtok.pyramid import (
    GaussianPyramid,
    LaplacianPyramid,
    gaussian_pyramid,
    laplacian_pyramid,
    max_levels,
    pyr_down,
    pyr_up,
    reconstruct_laplacian,
)
from pyrtok.steerable import SteerableBands, SteerablePyramid, reconstruct_steerable, steerable_pyramid

__version__ = "0.1.0"

__all__ = [
    "GaussianPyramid",
    "LapLoss",
    "LaplacianPyramid",
    "SteerableBands",
    "SteerablePyramid",
    "gaussian_pyramid",
    "lap_loss",
    "laplacian_band_errors",
    "laplacian_pyramid",
    "max_levels",
    "pyr_down",
    "pyr_up",
    "reconstruct_laplacian",
    "reconstruct_steerable",
    "steerable_pyramid",
]
