"""The Qwen2-VL family: Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

Pixels: a PIL image goes through the model's own image processor (its resize to multiples of patch x merge
pixels within the processor's pixel range); the [0, 1] pixels are read back from the processor's
``pixel_values`` (patches un-flattened, normalisation undone), so the pyramid and every signal see exactly what
the model sees. A tensor in [0, 1] is resized to the processor's size for it (antialiased bicubic).

Tokens: the language model sees merged tokens (the 2x2 PatchMerger), so selection happens at that granularity.
``feature`` mode encodes the image once with the model's own vision tower (window attention for Qwen2.5-VL,
DeepStack for Qwen3-VL, all inside the tower) and pools the merged grid into coarser levels; ``image`` mode
encodes every Gaussian level natively at its own grid (the tower takes any grid). Qwen3-VL's DeepStack
features are pooled and selected exactly like the tokens they belong to.

Positions (M-RoPE, (t, h, w)): a kept finest-level token keeps the position it has in the unpruned model
(start + (0, row, col)), and the text after the image continues where it would without pruning
(start + max(h, w) of the merged grid). A coarser token gets the position of one finest-grid cell under its
box, by ``coarse_positions``:

- ``"centre"`` (default): the cell under the centre of its box;
- ``"corner"``: the top-left cell of its box.

Attention (no [CLS] in these towers): ``tokens.attention`` is the attention each merged token receives in the
tower's last block and ``tokens.early_attention`` in its first full-attention block (a quarter of the depth where
the tower has no window attention), heads summed, averaged over the queries and over the 2 x 2 patches of the
merge unit: the scores of VScan's own Qwen2.5-VL code (:mod:`pyrtok.vlm.families.qwen_attention`). Allocators
that read [CLS] attention elsewhere read these here.

Merged tokens (VisionZip's contextual tokens, made from several dropped tokens) follow the kept tokens in the
prompt and take the position of the finest-grid cell under the centre of their union box.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from PIL import Image
from torch import Tensor, nn

from pyrtok._checks import check_level_count
from pyrtok.pyramid import gaussian_pyramid
from pyrtok.tokens import MultiScaleTokens, TokenSelection, from_feature_grid, level_densities, token_layout
from pyrtok.vlm.families.base import Encoded, Family, register_family, unnormalise
from pyrtok.vlm.families.qwen_attention import tower_with_attention

__all__ = ["COARSE_POSITIONS", "QwenVLFamily"]

COARSE_POSITIONS = ("centre", "corner")


@register_family
class QwenVLFamily(Family):
    """Qwen2-VL, Qwen2.5-VL and Qwen3-VL models.

    Args:
        model, processor: the model and the processor saved with it (needed: its image processor).
        mode: ``"feature"`` or ``"image"``.
        levels: pyramid levels.
        coarse_positions: the M-RoPE rule for coarser-level tokens (see the module notes).
    """

    name = "qwen2_vl"
    architectures = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                     "Qwen3VLForConditionalGeneration")
    deepstack_key: ClassVar[str] = "deepstack"

    def __init__(self, model: nn.Module, processor: Any, mode: str = "feature", levels: int = 1,
                 coarse_positions: str = "centre") -> None:
        super().__init__(model, processor, mode, levels)
        if mode not in ("feature", "image"):
            raise ValueError(f"mode must be 'feature' or 'image', got {mode!r}")
        check_level_count(levels)
        if coarse_positions not in COARSE_POSITIONS:
            raise ValueError(f"coarse_positions must be one of {COARSE_POSITIONS}, got {coarse_positions!r}")
        if self.image_processor is None:
            raise ValueError("Qwen-family models need their image processor: pass the AutoProcessor saved with "
                             "the model (or load with PyramidVLM.from_pretrained)")
        self.coarse_positions = coarse_positions
        vision = model.config.vision_config
        self.patch = int(vision.patch_size)
        self.merge = int(vision.spatial_merge_size)
        self.temporal = int(vision.temporal_patch_size)
        self.factor = self.patch * self.merge
        ip = self.image_processor
        self.mean = tuple(float(v) for v in ip.image_mean)
        self.std = tuple(float(v) for v in ip.image_std)

    # -- pixels ---------------------------------------------------------------------------------------
    def image_pixels(self, image: Image.Image | Tensor) -> Tensor:
        pil = self._pil(image)
        if pil is None:
            image = self._check_tensor(image)
            height, width = self._target_size(*image.shape[-2:])
            if tuple(image.shape[-2:]) == (height, width):
                return image
            return F.interpolate(image[None], size=(height, width), mode="bicubic", align_corners=False,
                                 antialias=True)[0].clamp(0, 1)
        out = self.image_processor(images=[pil], return_tensors="pt")
        _, gh, gw = (int(v) for v in out["image_grid_thw"][0])
        normalised = rearrange(out["pixel_values"], "(h w mh mw) (c t ph pw) -> t c (h mh ph) (w mw pw)",
                               h=gh // self.merge, w=gw // self.merge, mh=self.merge, mw=self.merge, c=3,
                               t=self.temporal, ph=self.patch, pw=self.patch)[0]
        return unnormalise(normalised, self.mean, self.std)

    def _target_size(self, height: int, width: int) -> tuple[int, int]:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        size = self.image_processor.size
        low = size.get("shortest_edge") if hasattr(size, "get") else size.shortest_edge
        high = size.get("longest_edge") if hasattr(size, "get") else size.longest_edge
        return smart_resize(int(height), int(width), factor=self.factor, min_pixels=low, max_pixels=high)

    def _patches(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """(G, 3, H, W) in [0, 1] -> flat normalised patches (G * h * w, 3 * T * P * P) and grids (G, 3), laid
        out as the model's processor lays them (merge windows together)."""
        mean = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1)
        normalised = (pixels.float() - mean) / std
        g, _, height, width = pixels.shape
        gh, gw = height // self.patch, width // self.patch
        flat = repeat(normalised, "g c (h mh ph) (w mw pw) -> (g h w mh mw) (c t ph pw)", mh=self.merge,
                      mw=self.merge, ph=self.patch, pw=self.patch, t=self.temporal)
        grid = torch.tensor([[1, gh, gw]] * g, device=pixels.device)
        return flat, grid

    # -- tokens ---------------------------------------------------------------------------------------
    def _tower(self, pixels: Tensor) -> tuple[Tensor, list[Tensor], dict[str, Tensor]]:
        """(G, 3, H, W) -> merged grid (G, h, w, D), DeepStack grids (each (G, h, w, D)) and the attention each
        merged token receives in two tower blocks (``{"attention": the last block's, "early_attention": the
        first full-attention block's}``, each (G, h, w); :mod:`pyrtok.vlm.families.qwen_attention`), through the
        model's own ``get_image_features``."""
        flat, grid = self._patches(pixels)
        dtype = next(self.model.parameters()).dtype
        out, local, late = tower_with_attention(
            self.model.model.visual, lambda: self.model.model.get_image_features(
                pixel_values=flat.to(dtype), image_grid_thw=grid, return_dict=True), grid, self.merge)
        h, w = pixels.shape[-2] // self.factor, pixels.shape[-1] // self.factor
        merged = rearrange(torch.stack(list(out.pooler_output)), "g (h w) d -> g h w d", h=h, w=w)
        deep = [rearrange(torch.stack(list(layer)), "g (h w) d -> g h w d", h=h, w=w)
                for layer in (getattr(out, "deepstack_features", None) or [])]
        received = {name: rearrange(torch.stack(scores), "g (h w) -> g h w", h=h, w=w)
                    for name, scores in (("attention", late), ("early_attention", local))}
        return merged, deep, received

    def encode(self, pixels: Tensor) -> Encoded:
        height, width = pixels.shape[-2:]
        if height % self.factor or width % self.factor:
            raise ValueError(f"pixels must have sides that are multiples of {self.factor}, got {height}x{width}; "
                             "use image_pixels() first")
        if self.mode == "feature":
            merged, deep, received = self._tower(pixels)
            # the merged tokens are the language model's inputs: they are their own embeddings
            tokens = from_feature_grid(merged, self.levels, image_size=(height, width), embeddings=merged,
                                       received=True, **received)
            extras = {}
            if deep:
                pooled = [from_feature_grid(d, self.levels, image_size=(height, width)).features for d in deep]
                extras[self.deepstack_key] = torch.stack(pooled, dim=2)
            return Encoded(tokens, pixels, self._flops(tokens), extras)
        return self._encode_levels(pixels)

    def _encode_levels(self, pixels: Tensor) -> Encoded:
        height, width = pixels.shape[-2:]
        grids, deeps, cells, received = [], [], [], []
        for level, image in enumerate(gaussian_pyramid(pixels, self.levels)):
            size = (max(self.factor, round(image.shape[-2] / self.factor) * self.factor),
                    max(self.factor, round(image.shape[-1] / self.factor) * self.factor))
            if tuple(image.shape[-2:]) != size:
                image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
            merged, deep, scores = self._tower(image.clamp(0, 1) if level else image)
            grids.append(merged)
            received.append(scores)
            deeps.append(deep)
            cells.append((self.factor * height / size[0], self.factor * width / size[1]))
        level_shapes = tuple((g.shape[1], g.shape[2]) for g in grids)
        layout = token_layout(level_shapes, (height, width), tuple(cells), device=pixels.device)
        features = torch.cat([rearrange(g, "b h w d -> b (h w) d") for g in reversed(grids)], dim=1)
        attention = {name: level_densities([r[name] for r in received]) for name in ("attention", "early_attention")}
        tokens = MultiScaleTokens(features, **layout, level_shapes=level_shapes, image_size=(height, width),
                                  embeddings=features, received=True, **attention)
        extras = {}
        if deeps[0]:
            per_layer = [torch.cat([rearrange(d[k], "b h w d -> b (h w) d") for d in reversed(deeps)], dim=1)
                         for k in range(len(deeps[0]))]
            extras[self.deepstack_key] = torch.stack(per_layer, dim=2)
        return Encoded(tokens, pixels, self._flops(tokens), extras)

    def _flops(self, tokens: MultiScaleTokens) -> Tensor:
        """(G,) vision FLOPs of each image: one pass (feature mode) or one per level (image mode)."""
        from pyrtok.vlm.flops import qwen_vision_flops

        vision = self.model.config.vision_config
        shapes = tokens.level_shapes[:1] if self.mode == "feature" else tokens.level_shapes
        per_image = sum(qwen_vision_flops(vision, h * w * self.merge**2) for h, w in shapes)
        return torch.full((tokens.batch_size,), per_image, dtype=torch.float64)

    def kept_features(self, encoded: Encoded, selection: TokenSelection) -> tuple[list[Tensor], dict[str, list]]:
        """(K_g + M_g, D) per image: the kept merged-grid tokens, then any merged tokens an allocator made (they
        are in the same space, after the 2x2 merger)."""
        if selection.merged is not None and self.deepstack_key in encoded.extras:
            raise ValueError("merged tokens (e.g. visionzip's) have no DeepStack features; Qwen3-VL needs an "
                             "allocator that only keeps tokens")
        kept = self.gather_kept(encoded.tokens.features, selection)
        counts, index = selection.count.tolist(), selection.index
        extras: dict[str, list] = {}
        if self.deepstack_key in encoded.extras:
            deep = encoded.extras[self.deepstack_key]  # (G, N, L, D)
            chosen = torch.gather(deep, 1, repeat(index, "g k -> g k l d", l=deep.shape[2], d=deep.shape[3]))
            extras[self.deepstack_key] = [chosen[g, : counts[g]] for g in range(len(counts))]
        return kept, extras

    def encoder_outputs(self, features: list[Tensor], extras: dict[str, list]) -> dict[str, Any]:
        outputs = super().encoder_outputs(features, extras)
        if self.deepstack_key in extras:
            per_image = extras[self.deepstack_key]  # each (K, L, D)
            layers = per_image[0].shape[1] if per_image else 0
            outputs["image"].deepstack_features = [tuple(d[:, k] for d in per_image) for k in range(layers)]
        return outputs

    # -- positions ------------------------------------------------------------------------------------
    def image_positions(self, tokens: MultiScaleTokens, index: Tensor,
                        merged_boxes: Tensor | None = None) -> tuple[Tensor, int]:
        """(3, K + M) (t, h, w) offsets of the kept tokens ``index`` (K,), then of the merged tokens with boxes
        ``merged_boxes`` (M, 4), from the image's start position, and how far the text after the image advances
        (as in the unpruned model)."""
        h0, w0 = tokens.level_shapes[0]
        height, width = tokens.image_size
        cell_h, cell_w = height / h0, width / w0
        box = tokens.box[index]
        if merged_boxes is not None and merged_boxes.shape[0]:
            # A merged token sits at the finest cell under the centre of its union box, whatever the rule for
            # coarse tokens: its box is not a grid cell, so only its centre is meaningful.
            y, x = (merged_boxes[:, 1] + merged_boxes[:, 3]) / 2, (merged_boxes[:, 0] + merged_boxes[:, 2]) / 2
            row = (y / cell_h).floor().long().clamp(0, h0 - 1)
            col = (x / cell_w).floor().long().clamp(0, w0 - 1)
            kept, span = self.image_positions(tokens, index)
            return torch.cat([kept, torch.stack([torch.zeros_like(row), row, col]).to(kept.device)], dim=1), span
        if self.coarse_positions == "centre":
            y, x = (box[:, 1] + box[:, 3]) / 2, (box[:, 0] + box[:, 2]) / 2
        else:
            y, x = box[:, 1] + cell_h / 2, box[:, 0] + cell_w / 2
        row = (y / cell_h).floor().long().clamp(0, h0 - 1)
        col = (x / cell_w).floor().long().clamp(0, w0 - 1)
        fine = tokens.level[index] == 0  # finest tokens keep their exact grid position
        row = torch.where(fine, tokens.row[index], row)
        col = torch.where(fine, tokens.col[index], col)
        positions = torch.stack([torch.zeros_like(row), row, col])
        return positions, max(h0, w0)

    def position_ids(self, input_ids: Tensor, attention_mask: Tensor, images: list[list[Any]]) -> Tensor:
        """(3, B, T) M-RoPE positions: text consecutive, each image's kept tokens at their offsets from the
        image's start, the text after an image where the unpruned model puts it; padding 0."""
        batch, length = input_ids.shape
        positions = torch.zeros(3, batch, length, dtype=torch.long, device=input_ids.device)
        marker = self.image_token_id
        for b in range(batch):
            per_image = iter(images[b])
            ids = input_ids[b].tolist()
            k, current = int((attention_mask[b] == 0).sum()), 0
            while k < length:
                if ids[k] == marker:
                    offsets, span = next(per_image)
                    count = offsets.shape[1]
                    positions[:, b, k : k + count] = current + offsets.to(positions.device)
                    current += span
                    k += count
                    continue
                end = k
                while end < length and ids[end] != marker:
                    end += 1
                positions[:, b, k:end] = torch.arange(current, current + end - k, device=positions.device)
                current += end - k
                k = end
        return positions
