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
own forward and in the scheduled loop alike. Pan-and-scan crops are not taken (the processor's default).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import Tensor, nn

from pyrtok.tokens import MultiScaleTokens, TokenSelection, pyramid_shapes, token_layout
from pyrtok.vlm.families.base import Encoded, Family, register_family, unnormalise

__all__ = ["Gemma3Family"]


@register_family
class Gemma3Family(Family):
    """Gemma 3 models: SigLIP soft tokens, a pyramid of their pooled levels, bidirectional image attention."""

    name = "gemma3"
    architectures = ("Gemma3ForConditionalGeneration",)
    fixed_resolution = True
    bidirectional_images = True

    def __init__(self, model: nn.Module, processor: Any, mode: str = "feature", levels: int = 1) -> None:
        super().__init__(model, processor, mode, levels)
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
        processor_stats = getattr(self.image_processor, "image_mean", None), getattr(self.image_processor,
                                                                                      "image_std", None)
        mean, std = processor_stats if processor_stats[0] is not None else ([0.5] * 3, [0.5] * 3)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    # -- prompt layout --------------------------------------------------------------------------------
    @property
    def marker_id(self) -> int:
        return int(self.model.config.boi_token_index)

    def image_text(self, count: int) -> str:
        tokenizer = self.tokenizer
        soft = tokenizer.convert_ids_to_tokens(self.image_token_id)
        eoi = tokenizer.convert_ids_to_tokens(int(self.model.config.eoi_token_index))
        return f"\n\n{self.image_token}{soft * count}{eoi}\n\n"

    def model_inputs(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        return {"token_type_ids": (input_ids == self.image_token_id).long()}

    # -- pixels and tokens ----------------------------------------------------------------------------
    def image_pixels(self, image: Image.Image | Tensor) -> Tensor:
        pil = self._pil(image)
        if pil is None:
            tensor = self._check_tensor(image).unsqueeze(0)
            resized = F.interpolate(tensor, size=(self.side, self.side), mode="bicubic", align_corners=False,
                                    antialias=True)
            return resized.clamp(0, 1)[0]
        processed = self.image_processor(images=[pil], return_tensors="pt")["pixel_values"][0]
        return unnormalise(processed, self.image_processor.image_mean, self.image_processor.image_std)

    def encode(self, pixels: Tensor) -> Encoded:
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, self.side, self.side):
            raise ValueError(f"pixels must be (G, 3, {self.side}, {self.side}) in [0, 1] from image_pixels(), got "
                             f"{tuple(pixels.shape)}")
        inner = self.model.model
        projector = inner.multi_modal_projector
        dtype = next(inner.vision_tower.parameters()).dtype
        values = ((pixels - self.mean.to(pixels.device)) / self.std.to(pixels.device)).to(dtype)
        states = inner.vision_tower(pixel_values=values).last_hidden_state  # (G, P, D_v)
        grid = rearrange(states, "g (h w) d -> g d h w", h=self.patches)
        pooled = projector.avg_pool(grid)  # (G, D_v, 16, 16): the model's own soft tokens, before norm and projection
        levels = [pooled]
        for _ in range(self.levels - 1):
            levels.append(F.avg_pool2d(levels[-1], 2, 2, ceil_mode=True))
        shapes = tuple((level.shape[-2], level.shape[-1]) for level in levels)
        flat = torch.cat([rearrange(level, "g d h w -> g (h w) d") for level in reversed(levels)], dim=1)
        features = torch.matmul(projector.mm_soft_emb_norm(flat), projector.mm_input_projection_weight).type_as(states)
        layout = token_layout(shapes, (self.side, self.side), device=pixels.device)
        tokens = MultiScaleTokens(features, **layout, level_shapes=shapes, image_size=(self.side, self.side),
                                  embeddings=features)
        flops = torch.full((pixels.shape[0],), self._vision_flops(), dtype=torch.float64)
        return Encoded(tokens, pixels, flops)

    def _vision_flops(self) -> float:
        from pyrtok.vlm.flops import vit_flops

        return vit_flops(self.model.config.vision_config, self.patches**2, has_cls=False)

    def kept_features(self, encoded: Encoded, selection: TokenSelection) -> tuple[list[Tensor], dict[str, list]]:
        """(K_g + M_g, D_lm) per image: the kept soft tokens in canonical order, then any merged ones (all in the
        language model's space)."""
        return self.gather_kept(encoded.tokens.features, selection), {}

    def encoder_outputs(self, features: list[Tensor], extras: dict[str, list]) -> dict[str, Any]:
        """Gemma 3 scatters one (N, D) tensor of every image's tokens, in prompt order, into its placeholders."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"image": BaseModelOutputWithPooling(pooler_output=torch.cat(features))}
