"""MAE-style pretraining of a CLIP vision tower with pixel and Laplacian-pyramid losses.

``pyrtok pretrain --config configs/pretrain/<name>.yaml`` trains; ``pyrtok pretrain-eval RUN ...`` compares.
"""

from pyrtok.pretrain.data import ImagePool
from pyrtok.pretrain.mae import MAEOutput, MaskedAutoencoder, patchify, unpatchify
from pyrtok.pretrain.objectives import Objective

__all__ = ["ImagePool", "MAEOutput", "MaskedAutoencoder", "Objective", "patchify", "unpatchify"]
