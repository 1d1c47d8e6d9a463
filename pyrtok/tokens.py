"""The two data contracts: multi-scale tokens of a batch, and the tokens an allocator keeps.

Canonical order: tokens of all levels are concatenated coarsest level first, raster order (row-major)
within a level. Level 0 is the finest. Every token carries its level, its row and column in its level's
grid, and its box ``(x0, y0, x1, y1)`` in level-0 pixel coordinates (the encoder's input image).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from pyrtok._checks import check_level_count, check_levels

__all__ = [
    "MergedTokens",
    "MultiScaleTokens",
    "TokenSelection",
    "from_feature_grid",
    "gather",
    "level_densities",
    "pyramid_shapes",
    "pyramid_tokens",
    "selection_boxes",
    "token_layout",
]


def pyramid_shapes(grid: tuple[int, int], levels: int) -> tuple[tuple[int, int], ...]:
    """Patch grids of a token pyramid, finest first: each level halves the one below, rounding up.

    Example:
        >>> pyramid_shapes((14, 14), 3)
        ((14, 14), (7, 7), (4, 4))
    """
    h, w = (int(v) for v in grid)
    if h < 1 or w < 1:
        raise ValueError(f"grid must be a positive (h, w) patch grid, got {grid!r}")
    check_level_count(levels)
    shapes = []
    for _ in range(levels):
        shapes.append((h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    return tuple(shapes)


def pyramid_tokens(grid: tuple[int, int], levels: int) -> int:
    """Tokens in a pyramid of ``levels`` levels over an (h, w) patch grid (see :func:`pyramid_shapes`).

    Example:
        >>> pyramid_tokens((14, 14), 3), pyramid_tokens((24, 24), 3)
        (261, 756)
    """
    return sum(h * w for h, w in pyramid_shapes(grid, levels))


def token_layout(
    level_shapes: tuple[tuple[int, int], ...],
    image_size: tuple[int, int],
    cell_sizes: tuple[tuple[float, float], ...] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """Per-token level, row, col and box for grids ``level_shapes`` in canonical order.

    Args:
        level_shapes: (h_l, w_l) of each level, level 0 (finest) first.
        image_size: (H, W) of the level-0 image in pixels.
        cell_sizes: (height, width) in level-0 pixels of one token at each level; default: level l tokens
            cover 2^l level-0 cells of size (H / h_0, W / w_0) (a 2x2-pooled feature pyramid).

    Returns:
        dict with ``level``, ``row``, ``col`` (N,) long tensors and ``box`` (N, 4) float32, boxes
        clipped to the image.
    """
    height, width = image_size
    if cell_sizes is None:
        base_h, base_w = height / level_shapes[0][0], width / level_shapes[0][1]
        cell_sizes = tuple((base_h * 2**lvl, base_w * 2**lvl) for lvl in range(len(level_shapes)))
    levels, rows, cols, boxes = [], [], [], []
    for lvl in reversed(range(len(level_shapes))):
        h, w = level_shapes[lvl]
        r, c = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        r, c = r.reshape(-1), c.reshape(-1)
        cell_h, cell_w = cell_sizes[lvl]
        box = torch.stack([c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h], dim=-1).float()
        box[:, 0::2] = box[:, 0::2].clamp(0, width)
        box[:, 1::2] = box[:, 1::2].clamp(0, height)
        levels.append(torch.full_like(r, lvl))
        rows.append(r)
        cols.append(c)
        boxes.append(box)
    return {"level": torch.cat(levels), "row": torch.cat(rows), "col": torch.cat(cols), "box": torch.cat(boxes)}


PER_IMAGE = ("features", "cls", "attention", "embeddings", "keys", "early_attention", "aligned")
"""The per-image tensors of :class:`MultiScaleTokens` (batch first); the layout tensors are shared."""


@dataclass(frozen=True, eq=False)
class MultiScaleTokens:
    """Tokens of all pyramid levels of one batch.

    Attributes:
        features: (B, N, D) token features in canonical order.
        level: (N,) level of each token, 0 = finest.
        row, col: (N,) position in the token's level grid.
        box: (N, 4) float ``(x0, y0, x1, y1)`` in level-0 pixels.
        level_shapes: (h_l, w_l) per level, level 0 first.
        image_size: (H, W) of the level-0 image.
        cls: optional (B, L, D) [CLS] features, one per level (or per encoder pass).
        attention: optional (B, N) [CLS]-to-token attention, when the encoder exposes it; on towers without
            [CLS] (Qwen-VL) the attention each token receives (:mod:`pyrtok.vlm.families.qwen`).
        embeddings: optional (B, N, D_lm) every token as the language model's input embedding (after the VLM's
            projector), filled by the model families so that allocators that compare tokens in that space (as
            DivPrune's authors do) need no family knowledge; it may be the ``features`` tensor itself where those
            already are in the language model's space (Qwen, LLaVA-NeXT). None outside a VLM.
        keys: optional (B, N, D_k) the feature layer's attention keys of every token, heads averaged (coarser
            levels pooled like the features), for methods that compare tokens there (VisionZip groups its
            contextual tokens by them); filled by towers that expose them.
        early_attention: optional (B, N) [CLS]-to-token attention of an early tower layer (a quarter of the
            depth by default, see :class:`~pyrtok.encoders.MultiScaleEncoder`), like ``attention`` otherwise, for
            methods that scan it (VScan's local scan).
        aligned: optional (B, N, D_q) every token in the space of the text queries (CLIP's joint image-text
            space, or the language model's input embeddings), set where a query encoder is attached
            (:mod:`pyrtok.vlm.query`); query relevance compares the query with these, else with ``features``.
        received: True where ``attention`` and ``early_attention`` are the attention each token receives (towers
            without [CLS]: Qwen-VL), False where they are [CLS]'s; methods whose authors scan the two differently
            (VScan) read it.
        views: the rows come in runs of ``views`` rows that are the views of one image (LLaVA-NeXT's base view
            and tiles, allocated view by view: :mod:`pyrtok.vlm.families.views`); 1 where every row is an image.
            Methods whose authors normalise a score over an image's views read it (CDPruner's relevance).
    """

    features: Tensor
    level: Tensor
    row: Tensor
    col: Tensor
    box: Tensor
    level_shapes: tuple[tuple[int, int], ...]
    image_size: tuple[int, int]
    cls: Tensor | None = None
    attention: Tensor | None = None
    embeddings: Tensor | None = None
    keys: Tensor | None = None
    early_attention: Tensor | None = None
    aligned: Tensor | None = None
    received: bool = False
    views: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.features, Tensor) or self.features.dim() != 3:
            shape = tuple(self.features.shape) if isinstance(self.features, Tensor) else type(self.features).__name__
            raise ValueError(f"features must be a (B, N, D) tensor, got {shape}")
        if isinstance(self.views, bool) or not isinstance(self.views, int) or self.views < 1 \
                or self.features.shape[0] % self.views:
            raise ValueError(f"views must be a positive int that divides the batch ({self.features.shape[0]}), "
                             f"got {self.views!r}")
        n = sum(h * w for h, w in self.level_shapes)
        if self.features.shape[1] != n:
            raise ValueError(
                f"features has {self.features.shape[1]} tokens but level_shapes {self.level_shapes} give {n}"
            )
        for name in ("level", "row", "col"):
            value = getattr(self, name)
            if value.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {tuple(value.shape)}")
        if self.box.shape != (n, 4):
            raise ValueError(f"box must have shape ({n}, 4), got {tuple(self.box.shape)}")
        for name in ("attention", "early_attention"):
            value = getattr(self, name)
            if value is not None and value.shape != self.features.shape[:2]:
                raise ValueError(f"{name} must have shape {tuple(self.features.shape[:2])}, got {tuple(value.shape)}")
        if self.cls is not None and (self.cls.dim() != 3 or self.cls.shape[0] != self.features.shape[0]):
            batch = self.features.shape[0]
            raise ValueError(f"cls must have shape (B, L, D) with B={batch}, got {tuple(self.cls.shape)}")
        if self.embeddings is not None:
            if not isinstance(self.embeddings, Tensor):
                kind = type(self.embeddings).__name__
                raise TypeError(f"embeddings must be a (B, N, D_lm) tensor or None, got {kind}")
            if self.embeddings.dim() != 3 or self.embeddings.shape[:2] != self.features.shape[:2]:
                raise ValueError(f"embeddings must have shape (B, N, D_lm) with (B, N) = "
                                 f"{tuple(self.features.shape[:2])}, got {tuple(self.embeddings.shape)}")
        for name in ("keys", "aligned"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, Tensor) or value.dim() != 3
                                      or value.shape[:2] != self.features.shape[:2]):
                raise ValueError(f"{name} must have shape (B, N, D') with (B, N) = {tuple(self.features.shape[:2])}, "
                                 f"got {getattr(value, 'shape', type(value).__name__)}")

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.features.shape[1]

    @property
    def dim(self) -> int:
        return self.features.shape[2]

    @property
    def num_levels(self) -> int:
        return len(self.level_shapes)

    @property
    def device(self) -> torch.device:
        return self.features.device

    @cached_property
    def level_slices(self) -> tuple[slice, ...]:
        """Slice of each level (indexed by level, 0 = finest) in the canonical order."""
        slices: list[slice] = [slice(0)] * self.num_levels
        start = 0
        for lvl in reversed(range(self.num_levels)):
            h, w = self.level_shapes[lvl]
            slices[lvl] = slice(start, start + h * w)
            start += h * w
        return tuple(slices)

    @cached_property
    def level_sizes(self) -> Tensor:
        """(L,) number of tokens per level, level 0 first."""
        return torch.tensor([h * w for h, w in self.level_shapes], device=self.device)

    @cached_property
    def parent(self) -> Tensor:
        """(N,) index of the token one level coarser whose grid cell holds this token's box centre; -1 at the top."""
        parent = torch.full((self.num_tokens,), -1, dtype=torch.long, device=self.device)
        centre_x = (self.box[:, 0] + self.box[:, 2]) / 2
        centre_y = (self.box[:, 1] + self.box[:, 3]) / 2
        for lvl in range(self.num_levels - 1):
            fine, coarse = self.level_slices[lvl], self.level_slices[lvl + 1]
            h, w = self.level_shapes[lvl + 1]
            coarse_box = self.box[coarse]
            cell_w = (coarse_box[0, 2] - coarse_box[0, 0]).clamp_min(1e-6)
            cell_h = (coarse_box[0, 3] - coarse_box[0, 1]).clamp_min(1e-6)
            col = (centre_x[fine] / cell_w).floor().long().clamp(0, w - 1)
            row = (centre_y[fine] / cell_h).floor().long().clamp(0, h - 1)
            parent[fine] = coarse.start + row * w + col
        return parent

    def with_features(self, features: Tensor) -> MultiScaleTokens:
        """A copy with new (B, N, D') features and the same layout (``embeddings`` kept: the language model's
        inputs do not change with the space the features are viewed in)."""
        return replace(self, features=features)

    def with_embeddings(self, embeddings: Tensor | None) -> MultiScaleTokens:
        """A copy with ``embeddings`` (B, N, D_lm), or None: see the attribute."""
        return replace(self, embeddings=embeddings)

    def with_aligned(self, aligned: Tensor | None) -> MultiScaleTokens:
        """A copy with ``aligned`` (B, N, D_q), or None: see the attribute."""
        return replace(self, aligned=aligned)

    def _apply(self, names: Sequence[str], fn: Callable[[Tensor], Tensor]) -> MultiScaleTokens:
        """A copy with ``fn`` applied to the named tensors that are set; embeddings that are the features tensor
        stay that tensor (one copy, not two)."""
        shared = self.embeddings is self.features
        out = {k: fn(getattr(self, k)) for k in names if getattr(self, k) is not None}
        if shared and "features" in out:
            out["embeddings"] = out["features"]
        return replace(self, **out)

    def select_images(self, index: Tensor | slice | Sequence[int]) -> MultiScaleTokens:
        """The tokens of some of the images: ``features[index]`` (and every other per-image tensor), same
        layout (rows taken one by one are images of their own: ``views`` is 1)."""
        return replace(self._apply(PER_IMAGE, lambda t: t[index]), views=1)

    def to(self, device: torch.device | str) -> MultiScaleTokens:
        """A copy with every tensor on ``device``."""
        return self._apply(("level", "row", "col", "box", *PER_IMAGE), lambda t: t.to(device))


@dataclass(frozen=True, eq=False)
class MergedTokens:
    """New tokens an allocator made from tokens it dropped (VisionZip's contextual tokens).

    Attributes:
        features: (B, M, D) features, in the space of ``MultiScaleTokens.features``; zeros at padded entries.
        mask: (B, M) bool, True for valid entries; the valid entries of a row come first.
        boxes: (B, M, 4) float ``(x0, y0, x1, y1)`` in level-0 pixels: the union of the boxes of the tokens
            merged into each one; zeros at padded entries.
    """

    features: Tensor
    mask: Tensor
    boxes: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.features, Tensor) or self.features.dim() != 3:
            raise ValueError(f"merged features must be a (B, M, D) tensor, got {getattr(self.features, 'shape', None)}")
        batch, m = self.features.shape[:2]
        if not isinstance(self.mask, Tensor) or self.mask.shape != (batch, m) or self.mask.dtype != torch.bool:
            shape = getattr(self.mask, "shape", None)
            raise ValueError(f"merged mask must be a ({batch}, {m}) bool tensor, got {shape}")
        if not isinstance(self.boxes, Tensor) or self.boxes.shape != (batch, m, 4):
            shape = getattr(self.boxes, "shape", None)
            raise ValueError(f"merged boxes must have shape ({batch}, {m}, 4), got {shape}")

    @property
    def count(self) -> Tensor:
        """(B,) number of valid merged tokens per row."""
        return self.mask.sum(1)


@dataclass(frozen=True, eq=False)
class TokenSelection:
    """Indices of the kept tokens, and optionally new tokens merged from dropped ones.

    Attributes:
        index: (B, K) long indices into N, ascending (canonical order) in the valid part; padding is 0.
        mask: (B, K) bool, True for valid entries; the valid entries of a row come first.
        count: (B,) number of valid entries per row (kept tokens only).
        merged: optional :class:`MergedTokens` (B, M); they count against the budget (see :attr:`total`), and
            consumers place them after the kept tokens.
        cls: optional (B,) bool: the image's [CLS] token (``MultiScaleTokens.cls``, level 0's) goes to the
            language model before the kept tokens (VisionZip, as released); it counts against the budget.
        kept_embeddings: optional (B, K, D_lm) the kept tokens' language-model inputs, aligned with ``index``,
            where the allocator rewrote them (VScan averages each kept token with the dropped tokens that joined
            it, after the projector); None: the family maps the kept tokens' features as usual.
    """

    index: Tensor
    mask: Tensor
    count: Tensor
    merged: MergedTokens | None = None
    cls: Tensor | None = None
    kept_embeddings: Tensor | None = None

    def __post_init__(self) -> None:
        if self.merged is not None:
            if not isinstance(self.merged, MergedTokens):
                raise TypeError(f"merged must be MergedTokens or None, got {type(self.merged).__name__}")
            if self.merged.features.shape[0] != self.index.shape[0]:
                raise ValueError(f"merged tokens have batch size {self.merged.features.shape[0]}, "
                                 f"the index has {self.index.shape[0]}")
        if self.cls is not None and (not isinstance(self.cls, Tensor) or self.cls.dtype != torch.bool
                                     or self.cls.shape != self.index.shape[:1]):
            raise ValueError(f"cls must be a ({self.index.shape[0]},) bool tensor or None, "
                             f"got {getattr(self.cls, 'shape', type(self.cls).__name__)}")
        if self.kept_embeddings is not None and (not isinstance(self.kept_embeddings, Tensor)
                                                 or self.kept_embeddings.dim() != 3
                                                 or self.kept_embeddings.shape[:2] != self.index.shape):
            raise ValueError(f"kept_embeddings must be a (B, K, D_lm) tensor with (B, K) = {tuple(self.index.shape)}, "
                             f"got {getattr(self.kept_embeddings, 'shape', type(self.kept_embeddings).__name__)}")

    @property
    def merged_count(self) -> Tensor:
        """(B,) merged tokens per row (zeros without merged tokens)."""
        return torch.zeros_like(self.count) if self.merged is None else self.merged.count.to(self.count.dtype)

    @property
    def cls_count(self) -> Tensor:
        """(B,) 1 where the row's [CLS] token goes to the language model, else 0."""
        return torch.zeros_like(self.count) if self.cls is None else self.cls.to(self.count.dtype)

    @property
    def total(self) -> Tensor:
        """(B,) tokens per row that count against the budget: [CLS] + kept + merged."""
        return self.count + self.merged_count + self.cls_count

    @classmethod
    def from_keep_mask(cls, keep: Tensor, merged: MergedTokens | None = None,
                       lead: Tensor | None = None) -> TokenSelection:
        """Build a selection from a (B, N) boolean mask of kept tokens (vectorised, order-preserving), with
        optional ``merged`` tokens and a (B,) bool ``lead`` ([CLS] first, see :attr:`cls`)."""
        if keep.dim() != 2 or keep.dtype != torch.bool:
            raise ValueError(f"keep must be a (B, N) bool tensor, got {keep.dtype} {tuple(keep.shape)}")
        count = keep.sum(dim=1)
        k = int(count.max().item()) if keep.numel() else 0
        # Stable sort of "dropped" flags puts kept tokens first, in ascending index order.
        order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :k]
        mask = torch.arange(k, device=keep.device).unsqueeze(0) < count.unsqueeze(1)
        return cls(torch.where(mask, order, torch.zeros_like(order)), mask, count, merged, lead)

    @property
    def batch_size(self) -> int:
        return self.index.shape[0]

    @property
    def max_count(self) -> int:
        return self.index.shape[1]

    def keep_mask(self, num_tokens: int) -> Tensor:
        """(B, N) boolean mask of the kept tokens."""
        # Padded entries write into a dummy column N, so they never clobber a real index.
        target = torch.where(self.mask, self.index, torch.full_like(self.index, num_tokens))
        keep = torch.zeros(self.batch_size, num_tokens + 1, dtype=torch.bool, device=self.index.device)
        return keep.scatter_(1, target, True)[:, :num_tokens]


def check_indexes_tokens(selection: TokenSelection) -> None:
    """Raise a TypeError for a selection whose index is not into the tokens it came with: LLaVA-NeXT's
    view-by-view selections (:class:`~pyrtok.vlm.families.views.ViewSelection`) index the image's views."""
    if getattr(selection, "views", None) is not None:
        raise TypeError("this selection was made view by view (a ViewSelection): its index is into the image's views, "
                        "not into these tokens; read selection.views with the views' tokens, or use views='joint'")


def gather(tokens: MultiScaleTokens, selection: TokenSelection) -> tuple[Tensor, Tensor]:
    """Features of the kept tokens.

    Args:
        tokens: features (B, N, D).
        selection: index (B, K).

    Returns:
        ``(features, mask)``: (B, K, D) kept features (zeros at padded entries) and the (B, K) mask.
    """
    check_indexes_tokens(selection)
    if selection.batch_size != tokens.batch_size:
        raise ValueError(f"selection has batch size {selection.batch_size}, tokens have {tokens.batch_size}")
    index = rearrange(selection.index, "b k -> b k 1").expand(-1, -1, tokens.dim)
    features = torch.gather(tokens.features, 1, index)
    return features * rearrange(selection.mask, "b k -> b k 1").to(features.dtype), selection.mask


def selection_boxes(tokens: MultiScaleTokens, selection: TokenSelection) -> Tensor:
    """(B, K, 4) level-0 pixel boxes of the kept tokens; padded entries are zeros."""
    check_indexes_tokens(selection)
    boxes = tokens.box[selection.index]
    return boxes * rearrange(selection.mask, "b k -> b k 1").to(boxes.dtype)


def level_densities(maps: Sequence[Tensor]) -> Tensor:
    """Per-level attention maps of separate encoder passes, finest first (each (B, h_l, w_l), summing to about the
    same total over its level) -> (B, N) in canonical order (coarsest level first), each scaled by its level's
    token count over level 0's, so that every token carries a density per level-0 token and levels compare.

    Example:
        >>> level_densities([torch.full((1, 2, 2), 0.25), torch.ones(1, 1, 1)]).tolist()
        [[0.25, 0.25, 0.25, 0.25, 0.25]]
    """
    base = maps[0].shape[-2] * maps[0].shape[-1]
    return torch.cat([rearrange(m * (m.shape[-2] * m.shape[-1] / base), "b h w -> b (h w)") for m in reversed(maps)],
                     dim=1)


def _pool_grid(grid: Tensor) -> Tensor:
    """(B, h, w, D) -> (B, ceil(h/2), ceil(w/2), D) by 2x2 means; edge cells average what they cover."""
    pooled = F.avg_pool2d(rearrange(grid, "b h w d -> b d h w"), 2, 2, ceil_mode=True)
    return rearrange(pooled, "b d h w -> b h w d")


def from_feature_grid(
    features: Tensor,
    levels: int,
    *,
    patch_size: int | None = None,
    image_size: tuple[int, int] | None = None,
    attention: Tensor | None = None,
    cls: Tensor | None = None,
    embeddings: Tensor | None = None,
    keys: Tensor | None = None,
    early_attention: Tensor | None = None,
    received: bool = False,
) -> MultiScaleTokens:
    """Build a token pyramid from one patch grid by repeated 2x2 average pooling.

    Args:
        features: (B, h, w, D) patch features (level 0).
        levels: number of levels, 1 <= levels <= 1 + ceil(log2(max(h, w))).
        patch_size: pixels per patch side; sets ``image_size`` to (h * p, w * p) when that is not given.
        image_size: (H, W) of the image the grid came from; default (h, w) * patch_size (or 1).
        attention: optional (B, h, w) [CLS] attention of the patches; coarse tokens get the mean over
            their cells (a density, so that levels stay comparable).
        cls: optional (B, D) or (B, L, D) [CLS] features.
        embeddings: optional (B, h, w, D_lm) language-model input embeddings of the patches, pooled into the
            coarser levels like the features (what a language model that takes pooled tokens as they are sees);
            ``features`` itself gives tokens whose embeddings are their features (no second copy).
        keys: optional (B, h, w, D_k) attention keys of the patches (heads averaged), pooled like the features.
        early_attention: optional (B, h, w) [CLS] attention of an early tower layer, pooled like ``attention``.
        received: whether the two attentions are the attention each patch receives (see the attribute).

    Returns:
        :class:`MultiScaleTokens` with N = sum of the level grid sizes.

    Example:
        >>> tokens = from_feature_grid(torch.rand(2, 14, 14, 8), levels=3, patch_size=16)
        >>> tokens.level_shapes, tokens.num_tokens, tokens.image_size
        (((14, 14), (7, 7), (4, 4)), 261, (224, 224))
    """
    if not isinstance(features, Tensor) or features.dim() != 4:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a (B, h, w, D) patch grid, got {shape}")
    if not features.is_floating_point():
        raise TypeError(f"features must be floating point, got {features.dtype}")
    batch, h, w, _ = features.shape
    check_levels(levels, h, w, what="grid")
    if image_size is None:
        p = 1 if patch_size is None else patch_size
        image_size = (h * p, w * p)
    for name, value in (("attention", attention), ("early_attention", early_attention)):
        if value is not None and (not isinstance(value, Tensor) or value.shape != (batch, h, w)):
            raise ValueError(f"{name} must have shape {(batch, h, w)}, got {getattr(value, 'shape', value)}")
    shared = embeddings is features
    if embeddings is not None and not shared and (not isinstance(embeddings, Tensor) or embeddings.dim() != 4
                                                  or embeddings.shape[:3] != features.shape[:3]):
        raise ValueError(f"embeddings must have shape {(batch, h, w)} + (D_lm,), "
                         f"got {getattr(embeddings, 'shape', embeddings)}")
    if keys is not None and (not isinstance(keys, Tensor) or keys.dim() != 4 or keys.shape[:3] != features.shape[:3]):
        raise ValueError(f"keys must have shape {(batch, h, w)} + (D_k,), got {getattr(keys, 'shape', keys)}")
    grids = [features]
    maps = None if attention is None else [rearrange(attention, "b h w -> b h w 1")]
    lm = None if embeddings is None or shared else [embeddings]
    key_grids = None if keys is None else [keys]
    early = None if early_attention is None else [rearrange(early_attention, "b h w -> b h w 1")]
    for _ in range(levels - 1):
        grids.append(_pool_grid(grids[-1]))
        for pooled in (maps, lm, key_grids, early):
            if pooled is not None:
                pooled.append(_pool_grid(pooled[-1]))
    level_shapes = tuple((g.shape[1], g.shape[2]) for g in grids)
    layout = token_layout(level_shapes, tuple(image_size), device=features.device)
    flat = torch.cat([rearrange(g, "b h w d -> b (h w) d") for g in reversed(grids)], dim=1)
    flat_attention = None
    if maps is not None:
        flat_attention = torch.cat([rearrange(m, "b h w 1 -> b (h w)") for m in reversed(maps)], dim=1)
    flat_embeddings = flat if shared else None
    if lm is not None:
        flat_embeddings = torch.cat([rearrange(g, "b h w d -> b (h w) d") for g in reversed(lm)], dim=1)
    flat_early = None
    if early is not None:
        flat_early = torch.cat([rearrange(m, "b h w 1 -> b (h w)") for m in reversed(early)], dim=1)
    flat_keys = None
    if key_grids is not None:
        flat_keys = torch.cat([rearrange(g, "b h w d -> b (h w) d") for g in reversed(key_grids)], dim=1)
    if cls is not None and cls.dim() == 2:
        cls = rearrange(cls, "b d -> b 1 d")
    return MultiScaleTokens(flat, **layout, level_shapes=level_shapes, image_size=tuple(image_size),
                            cls=cls, attention=flat_attention, embeddings=flat_embeddings, keys=flat_keys,
                            early_attention=flat_early, received=received)
