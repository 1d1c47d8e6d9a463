"""Multi-scale encoders around HF and OpenCLIP vision towers, and CLIP text embeddings for query relevance."""

from pyrtok.encoders.multiscale import MODES, MultiScaleEncoder, tower_view
from pyrtok.encoders.openclip import OpenClipTower, create_openclip
from pyrtok.encoders.text import ClipQueryEncoder
from pyrtok.encoders.towers import TowerView, VisionTower, find_vision_tower

__all__ = [
    "MODES",
    "ClipQueryEncoder",
    "MultiScaleEncoder",
    "OpenClipTower",
    "TowerView",
    "VisionTower",
    "create_openclip",
    "find_vision_tower",
    "tower_view",
]
