"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one CLIP or SigLIP tower, a projector, a decoder-only LM.

Pixels: a PIL image goes through the model's own image processor (resize, centre crop) when one was saved with
the model, and the [0, 1] pixels it produced are what the tower and every signal see; without one (a folder
with only a tokenizer, such as the embedded model) it is resized to the tower's square with PIL's bicubic
filter; a tensor is resized to that square with antialiased bicubic interpolation. Tokens: the tower's patch
grid at ``vision_feature_layer`` (feature mode: pooled into coarser levels; image mode: every Gaussian level
encoded at its own size), mapped by the model's projector after selection; ``tokens.embeddings`` holds every
token through the projector (the language model's input embeddings), for allocators that compare tokens there.
Layout: the prompt's ``<image>`` becomes K placeholders; positions are 1-D, consecutive over the kept sequence,
as LLaVA's own are. Merged tokens (VisionZip's contextual tokens) are projected like kept ones and follow them;
a selection that sends the [CLS] token (VisionZip as released) puts it, projected, first: C + K + M placeholders.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from pyrtok.encoders import MultiScaleEncoder
from pyrtok.images import load_image
from pyrtok.tokens import MultiScaleTokens, TokenSelection
from pyrtok.vlm.families.base import Encoded, Family, register_family, unnormalise

__all__ = ["LlavaFamily"]


@register_family
class LlavaFamily(Family):
    """LLaVA-1.5-style models. ``encoder`` replaces the default :class:`MultiScaleEncoder` on the model's tower."""

    name = "llava"
    architectures = ("LlavaForConditionalGeneration",)
    fixed_resolution = True

    def __init__(self, model: nn.Module, processor: Any, mode: str = "feature", levels: int = 1,
                 encoder: MultiScaleEncoder | None = None) -> None:
        super().__init__(model, processor, mode, levels)
        config = model.config
        if encoder is None:
            layer = config.vision_feature_layer
            if not isinstance(layer, int):
                raise ValueError(f"vision_feature_layer lists several layers ({layer}); pass an encoder explicitly")
            stats = {}
            if self.image_processor is not None:
                stats = {"image_mean": tuple(self.image_processor.image_mean),
                         "image_std": tuple(self.image_processor.image_std)}
            encoder = MultiScaleEncoder(model, mode=mode, levels=levels, feature_layer=layer, **stats)
        self.encoder = encoder
        self.mode, self.levels = encoder.mode, encoder.levels
        if getattr(config, "vision_feature_select_strategy", "default") != "default" and encoder.tower.has_cls:
            raise ValueError("only vision_feature_select_strategy='default' (patch tokens, no [CLS]) is supported")

    def image_pixels(self, image: Image.Image | Tensor) -> Tensor:
        pil = self._pil(image)
        if pil is None:
            return self.encoder.prepare(self._check_tensor(image).unsqueeze(0))[0]
        if self.image_processor is None:
            return load_image(pil, self.encoder.image_size or None)
        processed = self.image_processor(images=[pil], return_tensors="pt")["pixel_values"][0]
        return unnormalise(processed, self.image_processor.image_mean, self.image_processor.image_std)

    def encode(self, pixels: Tensor) -> Encoded:
        pixels = self.encoder.prepare(pixels)
        tokens = self.encoder(pixels)
        # Every token as the language model would take it (``tokens.embeddings``): what allocators that compare
        # tokens in the language model's space read (DivPrune, as its authors run it on the projector outputs).
        tokens = tokens.with_embeddings(self.model.model.multi_modal_projector(tokens.features))
        flops = torch.full((pixels.shape[0],), self._vision_flops(tokens), dtype=torch.float64)
        return Encoded(tokens, pixels, flops)

    def _vision_flops(self, tokens: MultiScaleTokens) -> float:
        """Forward FLOPs of the tower for one image: one pass (feature mode) or one per level (image mode)."""
        from pyrtok.vlm.flops import vit_flops

        vision = self.model.config.vision_config
        has_cls = self.encoder.tower.has_cls
        shapes = tokens.level_shapes[:1] if self.encoder.mode == "feature" else tokens.level_shapes
        return sum(vit_flops(vision, h * w, has_cls=has_cls) for h, w in shapes)

    def kept_features(self, encoded: Encoded, selection: TokenSelection) -> tuple[list[Tensor], dict[str, list]]:
        """(C_g + K_g + M_g, D_lm) per image: the [CLS] token where the selection sends it (level 0's), the kept
        tokens, then the merged ones, all through the projector (they all live in the tower's feature space)."""
        tokens = encoded.tokens
        cls = None if tokens.cls is None else tokens.cls[:, 0]
        return self.gather_kept(tokens.features, selection, self.model.model.multi_modal_projector, cls), {}
