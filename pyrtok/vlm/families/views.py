"""Any-resolution images view by view: each view (the base view, each full tile) allocated as its own image.

LLaVA-NeXT shows an image as views: a base view of the whole image and tiles of a padded canvas, each a square the
tower encodes on its own. pyrtok's default chooses across the views under one budget (``"joint"``), but the authors
of FasterVLM, VisionZip, VScan and CDPruner run their released LLaVA-NeXT code view by view: every view is a
LLaVA-1.5 image that keeps its own share of the budget, over the tile's full patch grid (padding included), and the
views' kept tokens are then laid out by the method's own rule. The rules (``views`` of the LLaVA-NeXT family):

- ``"joint"``: one budget over the whole pyramid (the family's own layout);
- ``"each"``: every view keeps the same share; the base view's tokens first, then the tiles' kept tokens in the
  joined tile grid, unpadded as the model unpads it (kept tokens in the padding are dropped), with the model's
  newline after every row (VScan's ``prepare_inputs_labels_for_multimodal``);
- ``"stacked"``: every view keeps the same share; the base view's tokens, then the tiles' kept patches in raster
  order of the joined tile grid (padding kept, no newlines), then the tiles' [CLS] tokens, then their merged
  tokens (VisionZip's ``restore_image_features_sorted``; without [CLS] or merged tokens, FasterVLM's and CDPruner's
  forced ``spatial`` layout);
- ``"sequence"``: one choice over the image's tokens as the model's own sequence holds them (the base view, then
  every row of the unpadded tile grid ended by its newline token), newlines among the candidates, kept in that
  order (DivPrune's LLaVA-1.6 code, which prunes the language model's input sequence);
- ``"auto"``: the rule the allocator's authors use (:attr:`pyrtok.allocators.Allocator.views`).

Within a view, [CLS], kept and merged tokens come as on LLaVA-1.5 ([CLS] first, merged last). The image's budget
is split evenly over its V views (``budget // V`` each, as the authors give every view the same count).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from einops import rearrange
from torch import Tensor

from pyrtok.tokens import MultiScaleTokens, TokenSelection, from_feature_grid

__all__ = ["VIEWS", "ViewSelection", "view_budgets", "view_tokens"]

VIEWS = ("auto", "joint", "each", "stacked", "sequence")


@dataclass(frozen=True, eq=False)
class ViewSelection(TokenSelection):
    """A selection made view by view, for G images of V views of P patches each.

    The :class:`TokenSelection` fields describe the image's kept patches that reach the language model, view-major
    (index ``v * P + j`` is patch j of view v; patches a layout drops, such as those in LLaVA-NeXT's padding under
    ``"each"``, are left out); ``merged`` and ``cls`` stay None, and :attr:`merged_count` and :attr:`cls_count` add
    up the views'. Under ``"sequence"`` there is one view, the model's image sequence, and the index is into it
    (kept newline tokens included).

    Attributes:
        views: the allocator's selection over the (G * V) views, row ``g * V + v`` for view v of image g (view 0
            the base view, then the tiles in raster order of the tile grid); its indices are into the view's P
            patches.
        num_views: V.
        rule: the layout rule (``"each"``, ``"stacked"`` or ``"sequence"``, see the module notes).
    """

    views: TokenSelection | None = None
    num_views: int = 1
    rule: str = "each"

    def _per_image(self, values: Tensor) -> Tensor:
        return rearrange(values, "(g v) -> g v", v=self.num_views).sum(-1).to(self.count.dtype)

    @property
    def merged_count(self) -> Tensor:
        return self._per_image(self.views.merged_count)

    @property
    def cls_count(self) -> Tensor:
        return self._per_image(self.views.cls_count)

    @classmethod
    def from_views(cls, views: TokenSelection, num_views: int, patches: int, reaches: Tensor,
                   rule: str) -> ViewSelection:
        """Join the (G * V) per-view ``views``: ``reaches`` (G, V * P) bool marks the patches a layout sends on."""
        keep = views.keep_mask(patches)  # (G * V, P)
        keep = rearrange(keep, "(g v) p -> g (v p)", v=num_views) & reaches
        flat = TokenSelection.from_keep_mask(keep)
        return cls(flat.index, flat.mask, flat.count, views=views, num_views=num_views, rule=rule)


def view_tokens(features: Tensor, side: int, *, cls: Tensor | None = None, attention: Tensor | None = None,
                early_attention: Tensor | None = None, keys: Tensor | None = None,
                embeddings: Tensor | None = None) -> MultiScaleTokens:
    """Every view as its own one-level image of ``side`` x ``side`` pixels, as LLaVA-1.5 tokens are.

    Args:
        features: (G, V, P, D) the views' patch features in the tower's space (P a square grid).
        cls: (G, V, D) the views' [CLS] features; attention, early_attention: (G, V, P) their [CLS] attention at
            the feature layer and at the early layer; keys: (G, V, P, D_k) the feature layer's keys, heads
            averaged; embeddings: (G, V, P, D_lm) the patches through the projector.

    Returns:
        (G * V, P, D) tokens, row ``g * V + v`` for view v of image g (``tokens.views`` = V).
    """
    grid = round(features.shape[2] ** 0.5)
    if grid * grid != features.shape[2]:
        raise ValueError(f"a view's patches must form a square grid, got {features.shape[2]}")

    def flat(x: Tensor | None, pattern: str) -> Tensor | None:
        return None if x is None else rearrange(x, pattern, h=grid) if "h" in pattern else rearrange(x, pattern)

    tokens = from_feature_grid(flat(features, "g v (h w) d -> (g v) h w d"), 1, image_size=(side, side),
                               cls=flat(cls, "g v d -> (g v) d"),
                               attention=flat(attention, "g v (h w) -> (g v) h w"),
                               early_attention=flat(early_attention, "g v (h w) -> (g v) h w"),
                               keys=flat(keys, "g v (h w) d -> (g v) h w d"))
    if embeddings is not None:
        tokens = tokens.with_embeddings(rearrange(embeddings, "g v p d -> (g v) p d"))
    return replace(tokens, views=features.shape[1])


def view_budgets(budgets: Tensor, num_views: int) -> Tensor:
    """(G,) image budgets -> (G * V,) view budgets: each image's split evenly over its V views."""
    return torch.repeat_interleave(torch.div(budgets, num_views, rounding_mode="floor"), num_views)
