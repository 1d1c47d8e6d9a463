"""Multi-scale encoders around HuggingFace vision towers, and CLIP text embeddings for query relevance."""

from pyrtok.encoders.multiscale import MODES, MultiScaleEncoder
from pyrtok.encoders.text import ClipQueryEncoder
from pyrtok.encoders.towers import VisionTower, find_vision_tower

__all__ = ["MODES", "ClipQueryEncoder", "MultiScaleEncoder", "VisionTower", "find_vision_tower"]
