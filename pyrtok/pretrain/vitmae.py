"""LapLoss for HF ``ViTMAEForPreTraining``, and that model as ``pyrtok pretrain``'s MAE (``model.type: vitmae``).

:func:`vitmae_lap_loss` scores one forward of a ``ViTMAEForPreTraining`` with LapLoss: its ``logits`` (B, L,
p*p*C), patch predictions in the image's raster order, are unpatchified (HF's pixel order: row, column,
channel), and compared with the input on the hidden patches (HF's ``mask``, 1 = hidden), as a prediction alone or
as the composite (the input with its hidden patches replaced). With ``norm_pix_loss`` HF's targets are per-patch
normalised pixels (each target patch minus its mean, over the square root of its variance + 1e-6), so the
prediction is brought back to the input's units with each target patch's mean and that scale first, and the
pyramid sees one image.

:class:`HFMaskedAutoencoder` wraps the model for the trainer: [0, 1] images normalised with ``image_mean`` /
``image_std`` before the encoder, the random mask drawn through HF's ``noise`` from the step's generator (so a
resumed run hides the same patches), and the loss pyrtok's :class:`~pyrtok.pretrain.objectives.Objective` on the
[0, 1] images, as for the CLIP MAE. Its ``encoder`` is the model's ``ViTMAEModel``, saved at the end of a run;
:func:`vit_encoder` loads it into a plain HF ``ViTModel`` (no masking), a tower
:class:`~pyrtok.encoders.MultiScaleEncoder` takes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pyrtok.losses import LapLoss, lap_loss
from pyrtok.pretrain.mae import MAEOutput
from pyrtok.pretrain.objectives import Objective, mask_image, patchify, unpatchify

__all__ = ["HFMaskedAutoencoder", "vit_encoder", "vitmae_lap_loss"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vitmae_lap_loss(
    model: nn.Module,
    pixel_values: Tensor,
    outputs: object,
    *,
    composite: bool = False,
    levels: int | None = 4,
    weights: Sequence[float] | None = None,
    distance: str = "l1",
    preset: str | None = None,
) -> Tensor:
    """LapLoss of a ``ViTMAEForPreTraining`` forward on its hidden patches (see the module notes).

    Args:
        model: the ``ViTMAEForPreTraining`` (its config gives the patch size, channels and ``norm_pix_loss``).
        pixel_values: (B, C, H, W) what the model was given.
        outputs: its output (``logits`` (B, L, p*p*C), ``mask`` (B, L)).
        composite: compare the input with its hidden patches replaced by the prediction (the seams count).
        levels, weights, distance: :func:`pyrtok.losses.lap_loss`'s; ``preset`` (a
            :meth:`~pyrtok.losses.LapLoss.from_preset` name) replaces them with a snippet's pyramid.

    Returns:
        The scalar loss (float32).
    """
    config = model.config
    patch, channels = int(config.patch_size), int(config.num_channels)
    height, width = pixel_values.shape[-2:]
    target = pixel_values.float()
    pred = outputs.logits.float()
    if config.norm_pix_loss:
        patches = patchify(target, patch)
        mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    image = unpatchify(pred, patch, height, width, channels)
    hidden = mask_image(outputs.mask.bool(), patch, height, width)
    if composite:
        image = hidden * image + (1 - hidden) * target
    if preset is not None:
        return LapLoss.from_preset(preset, distance=distance)(image, target, hidden)
    return lap_loss(image, target, levels=levels, weights=weights, distance=distance, mask=hidden)


class HFMaskedAutoencoder(nn.Module):
    """``ViTMAEForPreTraining`` as pyrtok's MAE: ``forward(images, mask=None, generator=None) -> MAEOutput``.

    Args:
        model: the ``ViTMAEForPreTraining`` to train.
        objective: the loss on the hidden patches (default MAE's normalised-pixel MSE).
        image_mean, image_std: normalisation of [0, 1] images before the encoder (default ImageNet's, as
            ``facebook/vit-mae-*`` processors use).
    """

    def __init__(self, model: nn.Module, objective: Objective | None = None,
                 image_mean: tuple[float, float, float] = IMAGENET_MEAN,
                 image_std: tuple[float, float, float] = IMAGENET_STD) -> None:
        super().__init__()
        if type(model).__name__ != "ViTMAEForPreTraining":
            raise TypeError(f"model must be a HF ViTMAEForPreTraining, got {type(model).__name__}")
        self.model = model
        self.objective = objective if objective is not None else Objective()
        config = model.config
        self.patch_size = int(config.patch_size)
        self.grid = int(config.image_size) // self.patch_size
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)

    @property
    def encoder(self) -> nn.Module:
        """The ``ViTMAEModel`` being pretrained."""
        return self.model.vit

    def forward(self, images: Tensor, mask: Tensor | None = None,
                generator: torch.Generator | None = None) -> MAEOutput:
        """Reconstruct (B, 3, H, W) images in [0, 1] from their visible patches, and score the hidden ones.

        ``mask`` (B, P) bool (True = hidden, the model's ratio of patches) fixes the hidden patches; by default
        they are drawn from ``generator``.
        """
        batch, patches = images.shape[0], self.grid**2
        if mask is None:
            source = generator.device if generator is not None else images.device
            noise = torch.rand(batch, patches, generator=generator, device=source).to(images.device)
        else:
            # HF keeps the lowest-noise patches: visible ones get the lowest noise, in raster order
            noise = mask.float() + torch.arange(patches, device=images.device) / (2.0 * patches)
        pixels = (images - self.image_mean) / self.image_std
        out = self.model(pixel_values=pixels.to(next(self.model.parameters()).dtype), noise=noise)
        hidden = out.mask.bool()
        if mask is not None and not torch.equal(hidden, mask.bool()):
            raise ValueError(f"mask must hide {int(hidden[0].sum())} of {patches} patches per sample (the "
                             f"model's mask_ratio), got {mask.sum(1).tolist()}")
        with torch.autocast(images.device.type, enabled=False):
            losses = self.objective(out.logits, hidden, images, self.patch_size)
        return MAEOutput(losses["loss"], out.logits, hidden, losses)


def vit_encoder(path: str | object) -> nn.Module:
    """A saved ``ViTMAEModel`` (a run's ``encoder/``, or a ``facebook/vit-mae-*`` id with a network) as a plain HF
    ``ViTModel`` with the same weights and no random masking, ready for
    :class:`~pyrtok.encoders.MultiScaleEncoder`.

    Example::

        tower = vit_encoder("runs/pretrain/vitmae_lap/encoder")
        tokens = MultiScaleEncoder(tower, levels=3)(images)
    """
    from transformers import ViTConfig, ViTMAEModel, ViTModel

    mae = path if isinstance(path, nn.Module) else ViTMAEModel.from_pretrained(path)
    if type(mae).__name__ != "ViTMAEModel":
        raise TypeError(f"path must hold a ViTMAEModel, got {type(mae).__name__}")
    source = mae.config
    config = ViTConfig(hidden_size=source.hidden_size, num_hidden_layers=source.num_hidden_layers,
                       num_attention_heads=source.num_attention_heads, intermediate_size=source.intermediate_size,
                       hidden_act=source.hidden_act, layer_norm_eps=source.layer_norm_eps,
                       image_size=source.image_size, patch_size=source.patch_size, num_channels=source.num_channels,
                       qkv_bias=source.qkv_bias)
    vit = ViTModel(config, add_pooling_layer=False)
    missing, unexpected = vit.load_state_dict(mae.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"the ViTMAEModel's weights do not map onto a ViTModel: missing {missing}, "
                         f"unexpected {unexpected}")
    return vit.eval()
