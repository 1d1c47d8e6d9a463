"""Gemma 3 (``Gemma3ForConditionalGeneration``): a SigLIP tower at a fixed square (896 px), its patch grid average-
pooled to 16 x 16 = 256 soft tokens, an RMS norm and a linear projection into the language model.

Pixels: a PIL image goes through the model's own image processor (a resize to the square, no crop), and the
[0, 1] pixels it produced are what the tower and every signal see; a tensor is resized to the square with
antialiased bicubic interpolation. Tokens: the pooled grid (the model's own soft tokens) is level 0; each
coarser level pools the grid before the norm and the projection 2 x 2 further, then applies them, as the model's
projector would with a larger pooling kernel. Every level is in the language model's space (``tokens.embeddings``
is the features). SigLIP has no [CLS] token and Gemma 3's tower no pooling head, so the tokens carry no
attention: the [CLS]-attention methods do not run on it.

Layout: the prompt's ``<start_of_image>`` marker becomes, as the processor writes it, a blank line, the marker,
the K kept (then merged) tokens as ``<image_soft_token>`` placeholders, ``<end_of_image>`` and a blank line, as
text, so that the blank lines merge with the prompt's own newlines as the tokenizer merges them. Positions are
1-D and consecutive over the kept sequence. ``token_type_ids`` (1 on the placeholders) go to the forward and the
first generation step: the language model attends bidirectionally within one image's run of placeholders, which
holds exactly the kept tokens; in-LLM schedules build the same mask (``bidirectional_images``). Its
sliding-window layers count sequence positions, so pruning changes what falls inside a window, in the model's
own forward and in the scheduled loop alike.

Pan-and-scan (``pan_and_scan=True``; the processor's ``do_pan_and_scan``, off by default): an image whose aspect
ratio reaches the processor's threshold is shown as the original view and a strip of 2-4 crops, each resized to
the square, as the processor makes them (its own crop sizes and minimums). The crops are one pyramid with the
original: the crops' soft-token grids side by side (or stacked, for a portrait image) are level 0, with pooled
levels that never straddle two crops, and the original view is the top level; boxes are in the pixels of the
crops' canvas (the crops side by side at the square's size), so pixel signals read what the crops show. Every
allocator chooses across all of them under one budget. In the prompt each view is its own run, as the
processor writes them ("Here is the original image ... and here are some crops to help you see better ..."),
each run holding that view's kept tokens (merged tokens join the original's run), with its own bidirectional
block. An image below the threshold is one view, as without pan-and-scan.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import Tensor, nn

from pyrtok.tokens import MultiScaleTokens, TokenSelection, pyramid_shapes, token_layout
from pyrtok.vlm.families.base import Encoded, Family, register_family, unnormalise

__all__ = ["Gemma3Family"]


def _depth(grid: int) -> int:
    """Levels whose 2 x 2 poolings stay inside a ``grid`` x ``grid`` crop."""
    depth = 1
    while grid % 2 == 0:
        grid, depth = grid // 2, depth + 1
    return depth


@register_family
class Gemma3Family(Family):
    """Gemma 3 models: SigLIP soft tokens, a pyramid of their pooled levels, bidirectional image attention."""

    name = "gemma3"
    architectures = ("Gemma3ForConditionalGeneration",)
    bidirectional_images = True

    def __init__(self, model: nn.Module, processor: Any, mode: str = "feature", levels: int = 1,
                 pan_and_scan: bool = False) -> None:
        super().__init__(model, processor, mode, levels)
        if not isinstance(pan_and_scan, bool):
            raise ValueError(f"pan_and_scan must be True or False, got {pan_and_scan!r}")
        self.pan_and_scan = pan_and_scan
        if mode != "feature":
            raise ValueError("the Gemma 3 family builds its pyramid from the pooled soft-token grid: mode must be "
                             f"'feature', got {mode!r}")
        config = model.config
        vision = config.vision_config
        self.side = int(vision.image_size)
        self.patches = self.side // int(vision.patch_size)
        self.grid = round(config.mm_tokens_per_image**0.5)
        if self.grid**2 != config.mm_tokens_per_image or self.patches % self.grid:
            raise ValueError(f"mm_tokens_per_image {config.mm_tokens_per_image} must be a square whose side divides "
                             f"the {self.patches}-patch grid")
        pyramid_shapes((self.grid, self.grid), levels)  # validates the depth
        if pan_and_scan and levels > _depth(self.grid):
            raise ValueError(f"with pan_and_scan, pooled levels must not straddle two crops: the {self.grid} x "
                             f"{self.grid} soft-token grid allows at most {_depth(self.grid)} levels, got {levels}")
        processor_stats = getattr(self.image_processor, "image_mean", None), getattr(self.image_processor,
                                                                                      "image_std", None)
        mean, std = processor_stats if processor_stats[0] is not None else ([0.5] * 3, [0.5] * 3)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @property
    def fixed_resolution(self) -> bool:  # type: ignore[override]
        """One token count per image, except with pan-and-scan (the crops an image gets vary with its shape)."""
        return not self.pan_and_scan

    # -- prompt layout --------------------------------------------------------------------------------
    @property
    def marker_id(self) -> int:
        return int(self.model.config.boi_token_index)

    def image_text(self, count: int, views: list[int] | None = None) -> str:
        tokenizer = self.tokenizer
        soft = tokenizer.convert_ids_to_tokens(self.image_token_id)
        eoi = tokenizer.convert_ids_to_tokens(int(self.model.config.eoi_token_index))

        def run(n: int) -> str:
            return f"\n\n{self.image_token}{soft * n}{eoi}\n\n"

        if views is None:
            return run(count)
        return (f"Here is the original image {run(views[0])} and here are some crops to help you see better "
                + " ".join(run(n) for n in views[1:]))

    def image_views(self, tokens: MultiScaleTokens, index: Tensor, merged: int = 0) -> list[int] | None:
        crops = self._crops(tokens)
        if crops is None:
            return None
        counts = torch.bincount(self._view_of(tokens)[index], minlength=crops + 1)
        counts[0] += merged
        return counts.tolist()

    def model_inputs(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        return {"token_type_ids": (input_ids == self.image_token_id).long()}

    # -- pixels and tokens ----------------------------------------------------------------------------
    def image_pixels(self, image: Image.Image | Tensor) -> Tensor:
        """(3, S, S) in [0, 1]; with pan-and-scan and crops, the original view and the crops side by side,
        (3, S, S * (1 + n)) for a landscape image and (3, S * (1 + n), S) for a portrait one."""
        pil = self._pil(image)
        if pil is None:
            tensor = self._check_tensor(image).unsqueeze(0)
            crops = []
            if self.pan_and_scan:
                if not hasattr(self.image_processor, "pan_and_scan_batched"):
                    raise ValueError("pan_and_scan on a tensor image needs the processor's torchvision backend "
                                     "(Gemma3ImageProcessor); pass a PIL image, which the processor crops itself")
                crops = self.image_processor.pan_and_scan_batched(tensor, **self._pan_and_scan_options())
            views = [tensor, *crops]
            resized = [F.interpolate(view, size=(self.side, self.side), mode="bicubic", align_corners=False,
                                     antialias=True).clamp(0, 1)[0] for view in views]
            wide = tensor.shape[-1] >= tensor.shape[-2]
        else:
            options = {"do_pan_and_scan": True, **self._pan_and_scan_options()} if self.pan_and_scan else {}
            processed = self.image_processor(images=[pil], return_tensors="pt", **options)["pixel_values"]
            resized = list(unnormalise(processed, self.image_processor.image_mean, self.image_processor.image_std))
            wide = pil.width >= pil.height
        return torch.cat(resized, dim=-1 if wide else -2)

    def _pan_and_scan_options(self) -> dict[str, Any]:
        """The processor's crop settings: its image processor's where set, else the processor's defaults."""
        defaults = dict(getattr(type(self.processor), "images_kwargs", None) or {})
        names = ("pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops", "pan_and_scan_min_ratio_to_activate")
        options = {}
        for name in names:
            value = getattr(self.image_processor, name, None)
            options[name] = value if value is not None else defaults.get(name)
            if not isinstance(options[name], numbers.Real):
                raise ValueError(f"pan_and_scan needs the processor's {name}; it has none")
        if options["pan_and_scan_max_num_crops"] < 2:
            raise ValueError("pan_and_scan needs the processor's pan_and_scan_max_num_crops >= 2 (a lone crop is "
                             f"the original again), got {options['pan_and_scan_max_num_crops']}")
        return options

    def encode(self, pixels: Tensor) -> Encoded:
        side = self.side
        height, width = pixels.shape[-2:] if pixels.dim() == 4 else (0, 0)
        if pixels.dim() != 4 or pixels.shape[1] != 3 or min(height, width) != side or max(height, width) % side \
                or (max(height, width) > side and (not self.pan_and_scan or max(height, width) < 3 * side)):
            raise ValueError(f"pixels must be (G, 3, {side}, {side}) in [0, 1] from image_pixels() (with "
                             f"pan_and_scan, an original and 2 or more crops side by side), got {tuple(pixels.shape)}")
        if height == width:
            levels = self._levels(self._pooled(pixels))
            return self._encoded(levels, None, pixels, 1)
        wide = width > height
        views = rearrange(pixels, "g c h (v w) -> (g v) c h w" if wide else "g c (v h) w -> (g v) c h w", w=side,
                          h=side)
        count = views.shape[0] // pixels.shape[0]  # 1 + crops
        pooled = rearrange(self._pooled(views), "(g v) d h w -> g v d h w", v=count)
        joined = "g v d h w -> g d h (v w)" if wide else "g v d h w -> g d (v h) w"
        canvas = pixels[..., side:] if wide else pixels[..., side:, :]
        return self._encoded(self._levels(rearrange(pooled[:, 1:], joined)), pooled[:, 0], canvas, count)

    def _pooled(self, views: Tensor) -> Tensor:
        """(V, 3, S, S) views -> (V, D_v, g, g): the model's own soft tokens before its norm and projection."""
        inner = self.model.model
        dtype = next(inner.vision_tower.parameters()).dtype
        values = ((views - self.mean.to(views.device)) / self.std.to(views.device)).to(dtype)
        states = inner.vision_tower(pixel_values=values).last_hidden_state  # (V, P, D_v)
        grid = rearrange(states, "v (h w) d -> v d h w", h=self.patches)
        return inner.multi_modal_projector.avg_pool(grid)

    def _levels(self, grid: Tensor) -> list[Tensor]:
        """A (G, D_v, h, w) soft-token grid and its 2 x 2 poolings, finest first."""
        levels = [grid]
        for _ in range(self.levels - 1):
            levels.append(F.avg_pool2d(levels[-1], 2, 2, ceil_mode=True))
        return levels

    def _encoded(self, levels: list[Tensor], top: Tensor | None, canvas: Tensor, views: int) -> Encoded:
        """Tokens of ``levels`` (finest first) and, with pan-and-scan, the original view ``top`` (G, D_v, g, g)
        as the top level (:meth:`Family.with_top_view`), each through the model's norm and projection; boxes in
        ``canvas`` pixels."""
        shapes = tuple((grid.shape[-2], grid.shape[-1]) for grid in levels)
        flat = torch.cat([rearrange(grid, "g d h w -> g (h w) d") for grid in reversed(levels)], dim=1)
        features = self._project(flat)
        size = tuple(canvas.shape[-2:])
        layout = token_layout(shapes, size, tuple((size[0] / h, size[1] / w) for h, w in shapes),
                              device=canvas.device)
        tokens = MultiScaleTokens(features, **layout, level_shapes=shapes, image_size=size, embeddings=features)
        if top is not None:
            tokens = self.with_top_view(tokens, self._project(rearrange(top, "g d h w -> g (h w) d")), self.grid)
        flops = torch.full((canvas.shape[0],), views * self._vision_flops(), dtype=torch.float64)
        return Encoded(tokens, canvas, flops)

    def _project(self, flat: Tensor) -> Tensor:
        """(G, N, D_v) pooled tower features -> (G, N, D_lm): the projector's norm and projection."""
        projector = self.model.model.multi_modal_projector
        return torch.matmul(projector.mm_soft_emb_norm(flat), projector.mm_input_projection_weight).to(flat.dtype)

    def _crops(self, tokens: MultiScaleTokens) -> int | None:
        """The crops these tokens were encoded from (None: one view, no pan-and-scan)."""
        h, w = tokens.level_shapes[0]
        return None if h == w else max(h, w) // self.grid

    def _view_of(self, tokens: MultiScaleTokens) -> Tensor:
        """(N,) the view of every token: 0 for the original (the top level), 1 + c for crop c."""
        h, w = tokens.level_shapes[0]
        side = (self.grid >> tokens.level).clamp_min(1)  # a crop's side in tokens at each token's level
        along = tokens.col if w > h else tokens.row
        crop_view = 1 + torch.div(along, side, rounding_mode="floor")
        return torch.where(tokens.level == tokens.num_levels - 1, torch.zeros_like(crop_view), crop_view)

    def _vision_flops(self) -> float:
        from pyrtok.vlm.flops import vit_flops

        return vit_flops(self.model.config.vision_config, self.patches**2, has_cls=False)

    def kept_features(self, encoded: Encoded, selection: TokenSelection) -> tuple[list[Tensor], dict[str, list]]:
        """(K_g + M_g, D_lm) per image: the kept soft tokens in canonical order, then any merged ones (all in the
        language model's space); with pan-and-scan crops, view by view (the original's kept tokens and the
        merged ones, then each crop's), as the prompt's runs hold them."""
        rows = self.gather_kept(encoded.tokens.features, selection)
        if self._crops(encoded.tokens) is None:
            return rows, {}
        view = self._view_of(encoded.tokens)
        out = []
        for g, row in enumerate(rows):
            count = int(selection.count[g])
            order = torch.cat([view[selection.index[g, :count]], row.new_zeros(len(row) - count, dtype=torch.long)])
            out.append(row[order.argsort(stable=True)])
        return out, {}

    def encoder_outputs(self, features: list[Tensor], extras: dict[str, list]) -> dict[str, Any]:
        """Gemma 3 scatters one (N, D) tensor of every image's tokens, in prompt order, into its placeholders."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"image": BaseModelOutputWithPooling(pooler_output=torch.cat(features))}
