"""OpenCLIP vision transformers as multi-scale towers, and OpenCLIP models built or loaded by name.

:class:`OpenClipTower` reads an OpenCLIP ``VisionTransformer`` (``model.visual`` of a ``CLIP`` model) the
way :class:`pyrtok.encoders.towers.VisionTower` reads a HF tower: the hidden state after every residual
block for any input size (the learnt position grid is resized bicubically, as OpenCLIP does when it loads
a checkpoint at another resolution) and the [CLS] attention row of a chosen block, recomputed from that
block's input so that the model keeps its fused attention. The pass is the model's own up to its pooling
(patch embedding, [CLS] and positions, ``ln_pre``, the blocks); patch dropout is skipped, since every patch
must keep its place in the grid.

Nothing here imports ``open_clip`` except :func:`create_openclip`: a tower is recognised by what it has.
Timm-backed OpenCLIP towers (``TimmModel``, e.g. OpenCLIP's SigLIP) and ResNets are not ViTs of this
form and are refused with a ``TypeError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from pyrtok._extras import missing
from pyrtok.encoders.towers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TowerView

__all__ = ["OpenClipTower", "create_openclip", "find_openclip_visual", "is_openclip"]

_VIT_PARTS = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer")


def _is_visual(module: Any) -> bool:
    return all(hasattr(module, part) for part in _VIT_PARTS) and hasattr(module.transformer, "resblocks")


def is_openclip(model: Any) -> bool:
    """Whether ``model`` is an OpenCLIP ``VisionTransformer`` or a model whose ``.visual`` is one."""
    return _is_visual(model) or _is_visual(getattr(model, "visual", None))


def find_openclip_visual(model: nn.Module) -> nn.Module:
    """The ``VisionTransformer`` of an OpenCLIP model (``model.visual``), or ``model`` itself if it is one."""
    if _is_visual(model):
        return model
    visual = getattr(model, "visual", None)
    if _is_visual(visual):
        return visual
    found = type(visual).__name__ if visual is not None else type(model).__name__
    raise TypeError(f"model must be an OpenCLIP VisionTransformer or a CLIP model with one as .visual, got {found}")


@dataclass
class OpenClipTower(TowerView):
    """Thin adapter over an OpenCLIP ``VisionTransformer`` (the wrapped module is not modified).

    Example:
        >>> from open_clip.transformer import VisionTransformer
        >>> visual = VisionTransformer(image_size=64, patch_size=16, width=32, layers=2, heads=2, mlp_ratio=2.0)
        >>> tower = OpenClipTower(visual)
        >>> [state.shape for state in tower.hidden_states(torch.rand(1, 3, 32, 48))][-1]
        torch.Size([1, 7, 32])
    """

    module: nn.Module

    def __post_init__(self) -> None:
        self.module = visual = find_openclip_visual(self.module)
        patch, image = tuple(visual.patch_size), tuple(visual.image_size)
        if patch[0] != patch[1]:
            raise ValueError(f"OpenCLIP tower must have square patches, got patch_size={patch}")
        self.kind = "openclip"
        self.patch_size, self.image_size = int(patch[0]), int(max(image))
        self.hidden_size = int(visual.conv1.out_channels)
        self.num_layers = len(visual.transformer.resblocks)
        self.has_cls = True  # OpenCLIP ViTs always prepend a class token, whatever their pooling
        self.image_mean = tuple(getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN)
        self.image_std = tuple(getattr(visual, "image_std", None) or OPENAI_CLIP_STD)
        if not getattr(visual.transformer, "batch_first", False):
            raise TypeError("OpenCLIP tower runs its blocks sequence-first (open_clip_torch < 2.24); upgrade it")

    @property
    def layers(self) -> nn.ModuleList:
        return self.module.transformer.resblocks

    def positions(self, height: int, width: int) -> Tensor:
        """(1 + height * width, D) position embeddings for a ``height`` x ``width`` patch grid."""
        visual = self.module
        table = visual.positional_embedding
        grid_h, grid_w = visual.grid_size
        if (height, width) == (grid_h, grid_w):
            return table
        grid = rearrange(table[1:], "(h w) d -> 1 d h w", h=grid_h, w=grid_w)
        grid = F.interpolate(grid.float(), size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        return torch.cat([table[:1], rearrange(grid, "1 d h w -> (h w) d").to(table.dtype)])

    def hidden_states(self, pixel_values: Tensor) -> tuple[Tensor, ...]:
        """(B, 3, H, W) normalised pixels -> ``num_layers + 1`` states (B, 1 + P, D): ``ln_pre`` output, blocks."""
        visual = self.module
        patches = visual.conv1(pixel_values)
        height, width = patches.shape[-2:]
        x = rearrange(patches, "b d h w -> b (h w) d")
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positions(height, width).to(x.dtype)
        states = [visual.ln_pre(x)]
        for block in self.layers:
            states.append(block(states[-1]))
        return tuple(states)

    def projections(self, states: tuple[Tensor, ...], index: int) -> tuple[Tensor, Tensor, int, float] | None:
        """See :meth:`TowerView.projections`; None for blocks whose attention is not a
        ``torch.nn.MultiheadAttention`` (OpenCLIP's custom blocks with cosine or normalised queries and keys)."""
        block = self.layers[index - 1]
        attn = block.attn
        if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None:
            return None
        x = block.ln_1(states[index - 1])
        dim = x.shape[-1]
        bias = attn.in_proj_bias
        query = F.linear(x[:, :1], attn.in_proj_weight[:dim], None if bias is None else bias[:dim])
        keys = F.linear(x, attn.in_proj_weight[dim : 2 * dim], None if bias is None else bias[dim : 2 * dim])
        return query, keys, attn.num_heads, attn.head_dim**-0.5

    def project(self, features: Tensor) -> Tensor:
        """(..., D) tower features -> (..., P) in the joint image-text space: ``ln_post`` then ``proj``.

        This is exactly how the model turns its pooled [CLS] state into the image embedding.
        """
        visual = self.module
        if getattr(visual, "attn_pool", None) is not None:
            raise TypeError("OpenCLIP towers with attentional pooling (CoCa) have no per-token projection")
        x = visual.ln_post(features)
        return x if visual.proj is None else x @ visual.proj


def create_openclip(name: str, pretrained: str | None = None, **kwargs: Any) -> tuple[nn.Module, Any]:
    """An OpenCLIP model and its tokenizer: ``open_clip.create_model(name, pretrained)`` in eval mode.

    ``name`` is any OpenCLIP architecture (``"ViT-B-16"``, a config added with ``open_clip.add_model_config``,
    or ``"hf-hub:org/repo"`` for users with a network); ``pretrained`` a tag such as ``"openai"``, a local
    checkpoint file, or None for random weights. Extra keyword arguments go to ``create_model``.
    """
    try:
        import open_clip
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise missing("open_clip", "create_openclip") from error
    model = open_clip.create_model(name, pretrained=pretrained, **kwargs)
    return model.eval(), open_clip.get_tokenizer(name)
