"""A uniform view of ViT vision towers: HF CLIP, SigLIP and the tower inside LLaVA-family VLMs.

:class:`TowerView` is what multi-scale encoding needs of any tower: pixel normalisation constants, patch
size, whether a [CLS] token leads the sequence, the hidden states of every layer for any input size, and
the attention row of the [CLS] token (or of SigLIP's pooling probe) at a chosen layer, recomputed from that
layer's input so that the model keeps its fast attention kernel (no switch to eager attention, no hooks).
:class:`VisionTower` is the HF implementation; :class:`pyrtok.encoders.openclip.OpenClipTower` is OpenCLIP's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange, reduce
from torch import Tensor, nn

__all__ = ["TowerView", "VisionTower", "cls_attention", "find_vision_tower"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def find_vision_tower(model: nn.Module) -> nn.Module:
    """The ViT inside ``model``: a CLIP/SigLIP vision model or a plain HF ViT itself, a CLIPModel's, or a
    LLaVA-family VLM's."""
    name = type(model).__name__
    if name in ("CLIPVisionModel", "CLIPVisionModelWithProjection", "SiglipVisionModel", "ViTModel"):
        return model
    for path in ("model.vision_tower", "vision_tower", "vision_model"):
        tower = model
        for part in path.split("."):
            tower = getattr(tower, part, None)
            if tower is None:
                break
        if tower is not None:
            return find_vision_tower(tower) if type(tower).__name__ != type(model).__name__ else tower
    raise TypeError(
        f"no supported vision tower in {name}: expected a CLIP or SigLIP vision model, a HF ViTModel, a "
        f"CLIPModel, or a LLaVA-family model with .model.vision_tower"
    )


def cls_attention(query: Tensor, keys: Tensor, heads: int, scale: float) -> Tensor:
    """Head-averaged softmax attention of one query over the patches: (B, 1, D), (B, T, D) -> (B, T - 1).

    ``query`` and ``keys`` are already projected; the first key (the [CLS] token itself) is left out of
    the returned row but not of the softmax, as in the model's own attention.
    """
    query = rearrange(query, "b t (h d) -> b h t d", h=heads)
    keys = rearrange(keys, "b t (h d) -> b h t d", h=heads)
    weights = torch.softmax((query @ keys.transpose(-1, -2)) * scale, dim=-1)  # (B, H, 1, T)
    return weights.mean(1)[:, 0, 1:]


class TowerView:
    """What multi-scale encoding reads from a ViT; subclasses set the attributes and the two passes.

    Attributes: ``module`` (the wrapped tower, never modified), ``kind``, ``patch_size``, ``image_size``,
    ``hidden_size``, ``num_layers``, ``has_cls``, ``image_mean`` and ``image_std`` (pixel normalisation).
    """

    module: nn.Module
    kind: str
    patch_size: int
    image_size: int
    hidden_size: int
    num_layers: int
    has_cls: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @property
    def early_layer(self) -> int:
        """The hidden-state index of the tower's early layer: a quarter of the depth, rounded down (at least 1);
        6 of CLIP ViT-L's 24 layers, VScan's shallow layer."""
        return max(1, self.num_layers // 4)

    def layer_index(self, layer: int) -> int:
        """Normalise a hidden-state index (negative counts from the end; 0 = embeddings) to [0, num_layers]."""
        count = self.num_layers + 1
        if not -count <= layer < count:
            raise ValueError(f"feature layer must be in [{-count}, {count - 1}] for this tower, got {layer}")
        return layer % count

    def hidden_states(self, pixel_values: Tensor) -> tuple[Tensor, ...]:
        """(B, 3, H, W) normalised pixels, H and W multiples of the patch size -> num_layers + 1 states (B, T, D)."""
        raise NotImplementedError

    def projections(self, states: tuple[Tensor, ...], index: int) -> tuple[Tensor, Tensor, int, float] | None:
        """Inside layer ``index`` (a hidden-state index >= 1): the first token's query (B, 1, D) and every token's
        key (B, T, D), projected from the layer's normalised input, with the head count and the score scale; None
        where the layer's attention cannot be recomputed that way."""
        raise NotImplementedError

    def attention_row(self, states: tuple[Tensor, ...], layer: int) -> Tensor | None:
        """(B, P) attention of [CLS] to the patches inside layer ``layer``, or None where there is none."""
        index = self.layer_index(layer)
        projected = None if index == 0 or not self.has_cls else self.projections(states, index)
        return None if projected is None else cls_attention(*projected)

    def mean_keys(self, states: tuple[Tensor, ...], layer: int) -> Tensor | None:
        """(B, P, D / heads) the patches' keys inside layer ``layer``, heads averaged; None where there are none."""
        index = self.layer_index(layer)
        projected = None if index == 0 else self.projections(states, index)
        if projected is None:
            return None
        _, keys, heads, _ = projected
        return self.patch_states(reduce(keys, "b t (h d) -> b t d", "mean", h=heads))

    def patch_states(self, state: Tensor) -> Tensor:
        """Drop the [CLS] token if the tower has one: (B, T, D) -> (B, P, D)."""
        return state[:, 1:] if self.has_cls else state

    def cls_state(self, state: Tensor) -> Tensor | None:
        return state[:, 0] if self.has_cls else None


@dataclass
class VisionTower(TowerView):
    """Thin adapter over a HF CLIP/SigLIP vision transformer or a plain HF ViT (the wrapped module is not
    modified). A ViT (for example an MAE-pretrained encoder, :func:`pyrtok.pretrain.vitmae.vit_encoder`) has a
    [CLS] token and is normalised with ImageNet's statistics by default, as MAE trains it."""

    module: nn.Module

    def __post_init__(self) -> None:
        self.module = find_vision_tower(self.module)
        config = self.module.config
        name = type(self.module).__name__
        self.kind = "siglip" if "Siglip" in name else "vit" if name == "ViTModel" else "clip"
        self.patch_size = int(config.patch_size)
        self.image_size = int(config.image_size)
        self.hidden_size = int(config.hidden_size)
        self.num_layers = int(config.num_hidden_layers)
        self.has_cls = self.kind in ("clip", "vit")
        stats = {"clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), "siglip": (SIGLIP_MEAN, SIGLIP_STD),
                 "vit": (IMAGENET_MEAN, IMAGENET_STD)}
        self.image_mean, self.image_std = stats[self.kind]

    @property
    def layers(self) -> nn.ModuleList:
        return self.module.layers if self.kind == "vit" else self.module.encoder.layers

    def hidden_states(self, pixel_values: Tensor) -> tuple[Tensor, ...]:
        """The HF forward with interpolated position embeddings; its hidden states, embeddings first."""
        out = self.module(pixel_values, output_hidden_states=True, interpolate_pos_encoding=True)
        return out.hidden_states

    def attention_row(self, states: tuple[Tensor, ...], layer: int) -> Tensor | None:
        """(B, P) attention of [CLS] to the patches inside layer ``layer`` (a hidden-state index >= 1).

        For SigLIP (no [CLS]) the attention of the pooling head's probe over the last layer's output is
        returned instead, when the tower has that head; otherwise None.
        """
        if not self.has_cls:
            # The pooling head reads the normalised last layer, as in the model's own forward.
            return self._probe_attention(self.module.post_layernorm(states[-1]))
        return super().attention_row(states, layer)

    def projections(self, states: tuple[Tensor, ...], index: int) -> tuple[Tensor, Tensor, int, float]:
        block = self.layers[index - 1]
        if self.kind == "vit":
            x = block.layernorm_before(states[index - 1])
            attn = block.attention
            return attn.q_proj(x[:, :1]), attn.k_proj(x), attn.num_attention_heads, attn.scaling
        x = block.layer_norm1(states[index - 1])
        attn = block.self_attn
        return attn.q_proj(x[:, :1]), attn.k_proj(x), attn.num_heads, attn.scale

    def _probe_attention(self, last: Tensor) -> Tensor | None:
        head = getattr(self.module, "head", None)
        if head is None or not hasattr(head, "probe"):
            return None
        mha: nn.MultiheadAttention = head.attention
        probe = head.probe.expand(last.shape[0], -1, -1)
        _, weights = mha(probe, last, last, need_weights=True, average_attn_weights=True)
        return weights[:, 0]
