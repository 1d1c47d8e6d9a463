"""Multi-scale encoding: a ViT tower (HF or OpenCLIP) turns an image into tokens at several scales.

Two modes:

- ``"feature"``: encode the image once at the tower's resolution and build a feature pyramid from the
  patch grid by 2x2 average pooling (:func:`pyrtok.tokens.from_feature_grid`). Level 0 is exactly the
  patch grid a VLM normally gets.
- ``"image"``: encode every level of the image's Gaussian pyramid separately (level l has ~1/2^l the
  side, rounded to a multiple of the patch size; position embeddings are interpolated), so coarse tokens
  see a genuinely blurred, downsampled image.

Features come from ``feature_layer`` (a hidden-state index: -1 the last layer, -2 the one before, as
LLaVA uses). The [CLS] attention of that same layer is recomputed from the layer's input (see
:mod:`pyrtok.encoders.towers`) and expressed as a density per level-0 patch, so that levels compare.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from pyrtok._checks import check_image, check_level_count
from pyrtok.encoders.openclip import OpenClipTower, is_openclip
from pyrtok.encoders.towers import TowerView, VisionTower
from pyrtok.pyramid import gaussian_pyramid
from pyrtok.tokens import MultiScaleTokens, from_feature_grid, level_densities, token_layout

__all__ = ["MODES", "MultiScaleEncoder", "tower_view"]

MODES = ("feature", "image")


def tower_view(model: nn.Module | TowerView) -> TowerView:
    """The :class:`TowerView` of ``model``: OpenCLIP ViTs get :class:`OpenClipTower`, HF models :class:`VisionTower`."""
    if isinstance(model, TowerView):
        return model
    return OpenClipTower(model) if is_openclip(model) else VisionTower(model)


class MultiScaleEncoder(nn.Module):
    """Encode (B, 3, H, W) images in [0, 1] into :class:`MultiScaleTokens`.

    Args:
        tower: a HF ``CLIPVisionModel``, ``SiglipVisionModel``, ``CLIPModel`` or LLaVA-family model, or an
            OpenCLIP ``CLIP`` model or ``VisionTransformer`` (its vision tower is used; nothing is copied or
            modified).
        mode: ``"feature"`` or ``"image"`` (see the module notes).
        levels: number of pyramid levels.
        feature_layer: hidden-state index the features are taken from (LLaVA uses -2).
        image_size: side the input is resized to before encoding; default the tower's own resolution.
            ``None`` keeps the config's; pass 0 to keep the input size (rounded to the patch size).
        image_mean, image_std: pixel normalisation; default the tower's (OpenAI CLIP or SigLIP for HF, the
            ``image_mean`` / ``image_std`` OpenCLIP sets on its towers).
        attention: capture [CLS] attention (``tokens.attention``), the feature layer's keys (``tokens.keys``)
            and the [CLS] attention of an early layer (``tokens.early_attention``).
        early_layer: the hidden-state index of that early layer; default the tower's
            (:attr:`~pyrtok.encoders.towers.TowerView.early_layer`, a quarter of the depth).

    Example:
        >>> from transformers import CLIPVisionConfig, CLIPVisionModel
        >>> tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                          num_attention_heads=2, image_size=64, patch_size=16))
        >>> tokens = MultiScaleEncoder(tower, mode="image", levels=2)(torch.rand(1, 3, 64, 64))
        >>> tokens.level_shapes, tokens.features.shape
        (((4, 4), (2, 2)), torch.Size([1, 20, 32]))
    """

    def __init__(
        self,
        tower: nn.Module | TowerView,
        mode: str = "feature",
        levels: int = 3,
        feature_layer: int = -2,
        image_size: int | None = None,
        image_mean: tuple[float, float, float] | None = None,
        image_std: tuple[float, float, float] | None = None,
        attention: bool = True,
        early_layer: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_level_count(levels)
        self.tower = tower_view(tower)
        self.tower.layer_index(feature_layer)  # validates
        self.mode, self.levels, self.feature_layer, self.attention = mode, levels, feature_layer, attention
        self.early_layer = self.tower.early_layer if early_layer is None else early_layer
        self.tower.layer_index(self.early_layer)  # validates
        self.image_size = self.tower.image_size if image_size is None else int(image_size)
        mean = image_mean or self.tower.image_mean
        std = image_std or self.tower.image_std
        self.register_buffer("image_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        # Registered so that .to(device) and .eval() reach the tower; it stays the caller's module.
        self.module = self.tower.module

    @property
    def patch_size(self) -> int:
        return self.tower.patch_size

    def _round(self, side: int) -> int:
        return max(self.patch_size, round(side / self.patch_size) * self.patch_size)

    def prepare(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> resized (B, 3, S, S') in [0, 1], sides multiples of the patch size."""
        check_image(images, "images")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        if self.image_size:
            size = (self.image_size, self.image_size)
        else:
            size = (self._round(images.shape[-2]), self._round(images.shape[-1]))
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        return images

    def normalise(self, images: Tensor) -> Tensor:
        dtype = next(self.module.parameters()).dtype
        return ((images - self.image_mean) / self.image_std).to(dtype)

    def _encode(self, pixels: Tensor) -> dict[str, Tensor | None]:
        """One tower pass -> ``grid`` (B, h, w, D), ``attention`` (B, h, w) or None, ``cls`` (B, D) or None, the
        feature layer's head-averaged ``keys`` (B, h, w, D_k) or None and ``early_attention`` (B, h, w) or None."""
        states = self.tower.hidden_states(self.normalise(pixels))
        index = self.tower.layer_index(self.feature_layer)
        state = states[index]
        h, w = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        grid = rearrange(self.tower.patch_states(state), "b (h w) d -> b h w d", h=h, w=w)
        out = {"grid": grid, "cls": self.tower.cls_state(state), "attention": None, "keys": None,
               "early_attention": None}
        if self.attention:
            out["attention"] = self.tower.attention_row(states, index)
            out["early_attention"] = self.tower.attention_row(states, self.early_layer)
            out["keys"] = self.tower.mean_keys(states, index)
        for name in ("attention", "early_attention"):
            if out[name] is not None:
                out[name] = rearrange(out[name], "b (h w) -> b h w", h=h, w=w)
        if out["keys"] is not None:
            out["keys"] = rearrange(out["keys"], "b (h w) d -> b h w d", h=h, w=w)
        return out

    def forward(self, images: Tensor) -> MultiScaleTokens:
        """(B, 3, H, W) images in [0, 1] -> tokens of all levels (features in the tower's dtype)."""
        images = self.prepare(images)
        if self.mode == "feature":
            out = self._encode(images)
            return from_feature_grid(out.pop("grid"), self.levels, image_size=tuple(images.shape[-2:]), **out)
        return self._encode_levels(images)

    def _encode_levels(self, images: Tensor) -> MultiScaleTokens:
        height, width = images.shape[-2:]
        grids, attentions, classes, cells, keys, early = [], [], [], [], [], []
        for level, image in enumerate(gaussian_pyramid(images, self.levels)):
            size = (self._round(image.shape[-2]), self._round(image.shape[-1]))
            if tuple(image.shape[-2:]) != size:
                image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
            out = self._encode(image)
            grid, attention = out["grid"], out["attention"]
            grids.append(grid)
            classes.append(out["cls"])
            keys.append(out["keys"])
            cells.append((self.patch_size * height / size[0], self.patch_size * width / size[1]))
            if attention is not None:
                attentions.append(attention)
                if out["early_attention"] is not None:
                    early.append(out["early_attention"])
            if level + 1 < self.levels and min(size) <= self.patch_size:
                raise ValueError(
                    f"levels={self.levels} is too deep for {height}x{width} input with patch {self.patch_size}: "
                    f"level {level} is already one patch"
                )
        level_shapes = tuple((g.shape[1], g.shape[2]) for g in grids)
        layout = token_layout(level_shapes, (height, width), tuple(cells), device=images.device)
        features = torch.cat([rearrange(g, "b h w d -> b (h w) d") for g in reversed(grids)], dim=1)
        # per-level attention sums to ~1 over that level: rescaled to a density per level-0 patch
        attention = level_densities(attentions) if len(attentions) == len(grids) else None
        cls = torch.stack(classes, 1) if all(c is not None for c in classes) else None
        flat_keys = flat_early = None
        if all(k is not None for k in keys):
            flat_keys = torch.cat([rearrange(k, "b h w d -> b (h w) d") for k in reversed(keys)], dim=1)
        if len(early) == len(grids):
            flat_early = level_densities(early)
        return MultiScaleTokens(features, **layout, level_shapes=level_shapes, image_size=(height, width),
                                cls=cls, attention=attention, keys=flat_keys, early_attention=flat_early)
