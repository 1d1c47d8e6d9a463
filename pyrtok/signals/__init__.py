"""Per-token scores (B, N) and per-image difficulty, one small module per signal family."""

from pyrtok.signals.attention import cls_attention
from pyrtok.signals.difficulty import DifficultyCalibrator, difficulty, raw_difficulty
from pyrtok.signals.laplacian import band_energy_maps, laplacian_energy
from pyrtok.signals.query import query_relevance
from pyrtok.signals.redundancy import redundancy
from pyrtok.signals.saliency import center_surround, saliency, saliency_map, spectral_residual

__all__ = [
    "DifficultyCalibrator",
    "band_energy_maps",
    "center_surround",
    "cls_attention",
    "difficulty",
    "laplacian_energy",
    "query_relevance",
    "raw_difficulty",
    "redundancy",
    "saliency",
    "saliency_map",
    "spectral_residual",
]
