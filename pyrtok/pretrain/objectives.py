"""Pretraining objectives: pixel MSE on masked patches (MAE's), LapLoss on masked regions, or a weighted sum.

Both see the same prediction. The pixel loss compares patches in [0, 1] pixel space, or per-patch
normalised pixels with ``norm_pix=True`` (MAE's better-performing variant). LapLoss compares the
reconstructed image with the input in [0, 1], restricted to the hidden patches with a (B, 1, H, W) mask;
with ``norm_pix=True`` the prediction is brought back to pixels with each target patch's mean and std.

LapLoss sees either the prediction alone, or (``lap_composite=True``) the composite: the input with its
hidden patches replaced by the prediction. A band-pass coefficient near a patch border mixes pixels from
both sides, so only the composite charges the seams between a predicted patch and its visible neighbours,
which is how a reconstruction is looked at and how ``pyrtok pretrain-eval`` measures it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from torch import Tensor

from pyrtok.losses import lap_loss

__all__ = ["Objective", "composite", "mask_image", "patchify", "predicted_image", "unpatchify"]


def patchify(images: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), p*p*C), patches in raster order, pixels (row, col, channel)."""
    return rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch, p2=patch)


def unpatchify(patches: Tensor, patch: int, height: int, width: int, channels: int = 3) -> Tensor:
    """Inverse of :func:`patchify`: (B, P, p*p*C) -> (B, C, H, W)."""
    return rearrange(patches, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=height // patch, w=width // patch,
                     p1=patch, p2=patch, c=channels)


def _patch_stats(target: Tensor) -> tuple[Tensor, Tensor]:
    mean = target.mean(-1, keepdim=True)
    std = (target.var(-1, keepdim=True) + 1e-6).sqrt()
    return mean, std


def predicted_image(pred: Tensor, images: Tensor, patch: int, norm_pix: bool) -> Tensor:
    """(B, P, p*p*3) predictions -> (B, 3, H, W) image in pixel space (denormalised if ``norm_pix``)."""
    if norm_pix:
        mean, std = _patch_stats(patchify(images, patch))
        pred = pred * std + mean
    return unpatchify(pred, patch, images.shape[-2], images.shape[-1])


def mask_image(mask: Tensor, patch: int, height: int, width: int) -> Tensor:
    """(B, P) bool -> (B, 1, H, W) float, 1 on hidden patches."""
    per_pixel = repeat(mask.float(), "b n -> b n (p c)", p=patch * patch, c=1)
    return unpatchify(per_pixel, patch, height, width, channels=1)


@dataclass
class Objective:
    """``pixel * pixel_loss + lap * lap_loss`` on the hidden patches.

    Args:
        pixel: weight of the MAE pixel MSE.
        lap: weight of LapLoss.
        norm_pix: per-patch normalised pixel targets.
        lap_levels, lap_distance, lap_weights: LapLoss settings (weights: one per level, finest first).
        lap_composite: LapLoss on the composite (visible patches from the input) instead of the prediction.
    """

    pixel: float = 1.0
    lap: float = 0.0
    norm_pix: bool = True
    lap_levels: int = 4
    lap_distance: str = "l1"
    lap_weights: list[float] | None = None
    lap_composite: bool = False

    def __post_init__(self) -> None:
        if self.pixel < 0 or self.lap < 0 or self.pixel + self.lap == 0:
            raise ValueError(f"loss weights must be non-negative and not both zero, got pixel={self.pixel}, "
                             f"lap={self.lap}")
        if self.lap_weights is not None and len(self.lap_weights) != self.lap_levels:
            raise ValueError(f"lap_weights must have one entry per level (lap_levels={self.lap_levels}), "
                             f"got {list(self.lap_weights)}")

    def __call__(self, pred: Tensor, mask: Tensor, images: Tensor, patch: int) -> dict[str, Tensor]:
        """Returns ``loss`` and its parts (``pixel``, ``lap``), all scalars."""
        pred = pred.float()
        hidden = mask.float()
        target = patchify(images, patch)
        parts: dict[str, Tensor] = {}
        if self.pixel > 0:
            goal = target
            if self.norm_pix:
                mean, std = _patch_stats(target)
                goal = (target - mean) / std
            per_patch = (pred - goal).square().mean(-1)
            parts["pixel"] = (per_patch * hidden).sum() / hidden.sum().clamp_min(1)
        if self.lap > 0:
            reconstruction = predicted_image(pred, images, patch, self.norm_pix)
            weights = mask_image(mask, patch, images.shape[-2], images.shape[-1])
            if self.lap_composite:
                reconstruction = weights * reconstruction + (1 - weights) * images.float()
            parts["lap"] = lap_loss(reconstruction, images.float(), levels=self.lap_levels,
                                    weights=self.lap_weights, distance=self.lap_distance, mask=weights)
        loss = sum(getattr(self, name) * value for name, value in parts.items())
        return {"loss": loss, **parts}


def composite(pred: Tensor, mask: Tensor, images: Tensor, patch: int, norm_pix: bool) -> Tensor:
    """The input with its hidden patches replaced by the prediction: (B, 3, H, W) in [0, 1]."""
    reconstruction = predicted_image(pred.float(), images, patch, norm_pix).clamp(0, 1)
    weights = mask_image(mask, patch, images.shape[-2], images.shape[-1])
    return torch.where(weights.bool(), reconstruction, images)
