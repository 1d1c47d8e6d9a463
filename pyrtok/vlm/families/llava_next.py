"""LLaVA-NeXT (1.6) and LLaVA-OneVision: any-resolution tiles plus a base view, as one token pyramid.

Pixels: an image stays at its original size, as a (3, H, W) tensor in [0, 1] (a PIL image's 8-bit values
exactly), and that is what :class:`~pyrtok.vlm.families.Encoded` carries for pixel signals (they accept any
size: token boxes are in these pixels). Encoding runs the model's own image processor on it (the pinpoint
choice, the resize and padding to the chosen canvas, the tiling, the square base view); a tensor is handed to
the processor as 8-bit pixels, as an image file would be, because the processor's padding colour and
resizing assume 8-bit input. Images of one original size share a group (and so a pinpoint grid).

Tokens (in the language model's space, after the model's projector): level 0 is the unpadded tile grid the
model itself builds (tile features joined into one grid, the padding rows or columns cut away as
``unpad_image`` does, and for OneVision shrunk by ``anyres_max_N`` exactly as the model shrinks it); ``levels``
> 1 adds 2x2-pooled levels of that grid; the base view's patch grid is always the last (top) level. Boxes are
in original-image pixels: level-0 and pooled cells split the image uniformly, the base view's cells split it
into (p, p) cells. ``vision_feature_layer`` (an int or a list, concatenated) and
``vision_feature_select_strategy`` ('default' drops the tower's [CLS]; 'full' keeps every token and needs a
tower without one, such as SigLIP) are the model's own.

Attention (``tokens.attention``, for [CLS]-attention allocators such as ``fastervlm`` and ``visionzip``): each
view's [CLS] attention to its patches at the feature layer (the last listed layer for a list), or, for a SigLIP
tower, its pooling probe's attention over the last layer, as VisionZip reads each view of an any-resolution
image. Every view's row sums to about 1; the tile rows are joined, unpadded and shrunk like the features and
divided by the number of tiles, and the base view's row is scaled by its share of the level-0 cells, so every
token carries a density per level-0 cell and the base view and the tiles compete on one scale.

Layout: the kept base-view tokens first in raster order (where the model puts its base view), then the kept
pooled-level tokens (coarsest first), then the kept level-0 tokens row by row, with ``image_newline`` after a
row by ``newlines``:

- ``"kept_rows"`` (default): after each row that keeps at least one token;
- ``"all_rows"``: after every row, kept tokens or not (the row structure of the full image);
- ``"none"``: no newlines.

At full budget with the ``all`` allocator and ``levels=1`` every rule gives the model's own layout (the base
view, then every row ended by ``image_newline``), so this is the unwrapped model. Positions are 1-D,
consecutive over the kept sequence (newlines included). Merged tokens (VisionZip-style) are averaged from the
tokens' features, which are already in the language model's space (after the projector, as kept tokens are),
so they go in as they are, after the image's last row (and its newline); they count against the budget and
take one placeholder each. Several images in one prompt are each tiled, as the
processor tiles a flat list of images.

View by view (``views``, :mod:`pyrtok.vlm.families.views`): the allocator may instead run on every view (the base
view and each full tile, padding included) as its own LLaVA-1.5 image, as FasterVLM's, VisionZip's, VScan's and
CDPruner's authors run their LLaVA-NeXT code; :meth:`encode` then also keeps each view's patches in the tower's
space and through the projector, its [CLS] feature, its [CLS] attention at the feature layer and at the tower's
early layer, and the feature layer's keys (``Encoded.extras["view_*"]``, (G, V, ...)), and the kept tokens go to
the language model by the rule's layout.

Lazy tiles (``lazy_tiles=True``): :meth:`encode` runs the tower on the base views only; every tile token then
carries the feature of the base-view cell under its box centre, so allocators that score features choose
from the base view, and pixel-signal allocators (``laplacian``, ``saliency``) choose exactly as they do
eagerly. :meth:`after_selection` then encodes exactly the tiles the kept tile tokens read (:meth:`needed_tiles`:
the tiles under the level-0 cells they pool; under OneVision's shrinking, the tiles of the source cells the
bilinear downscale gives a weight that is not 0) and builds the kept tokens' features from them, exactly as the
eager path does (tiles no kept token reads enter the grid as zeros, with weight 0). With every tile kept it is
the eager path. The attention of a tile token is likewise the base view's under its box centre, so attention
allocators also choose from the base view; merged tokens are averaged from the features the allocator saw
(base-view cells for tile tokens), since encoding the tiles under every merged group would encode them all. The
tile encoding is the family's deferred step (``PyramidVLM.complete``, which callers time like encoding): it
returns the group with its tile levels built, ``Encoded.flops`` counting the base view and the tiles each image
encoded, and their number in ``Encoded.extras["encoded_tiles"]`` (G,).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import Tensor, nn

from pyrtok._cache import tensor_cache
from pyrtok._checks import check_level_count
from pyrtok.images import image_tensor
from pyrtok.tokens import MultiScaleTokens, TokenSelection, from_feature_grid
from pyrtok.vlm.families.base import Encoded, Family, register_family, unnormalise
from pyrtok.vlm.families.views import VIEWS, ViewSelection, view_budgets, view_tokens

__all__ = ["NEWLINES", "LlavaNextFamily", "bilinear_reads"]

NEWLINES = ("kept_rows", "all_rows", "none")
STRATEGIES = ("default", "full")


@tensor_cache(maxsize=256)
def bilinear_reads(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(n_out, n_in) bool: the source cells each output cell of one axis reads (a weight that is not 0) when
    ``F.interpolate(mode="bilinear", align_corners=False)`` resizes that axis from ``n_in`` to ``n_out`` cells.

    Found by interpolating indicators (source cell a alone set to 1, one channel each) on ``device``, with the
    weights the kernel computes for ``dtype`` (float32 for float32 and lower precisions, float64 for float64), so
    the float rounding of the weights is exactly the model's. An axis's weights do not depend on the other axis.
    """
    probe_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    probe = torch.eye(n_in, dtype=probe_dtype, device=device)[None, :, :, None]  # (1, n_in, n_in, 1)
    out = F.interpolate(probe, [n_out, 1], mode="bilinear", align_corners=False)  # (1, n_in, n_out, 1)
    return out[0, :, :, 0].T != 0


def _in_box(y: Tensor, x: Tensor, box: tuple[int, int, int, int]) -> Tensor:
    """Bool mask of the joined tile-grid cells (y, x) inside ``box``, (top, bottom, left, right) as
    :meth:`LlavaNextFamily._unpad_box` gives it."""
    top, bottom, left, right = box
    return (y >= top) & (y < bottom) & (x >= left) & (x < right)


@register_family
class LlavaNextFamily(Family):
    """LLaVA-NeXT and LLaVA-OneVision models.

    Args:
        model, processor: the model and the processor saved with it (needed: its image processor).
        mode: ``"feature"`` (the only mode: the tiles are the finer scale).
        levels: levels built from the unpadded tile grid (1: the grid alone); the base view comes on top.
        newlines: the newline rule under a budget (see the module notes).
        lazy_tiles: encode only the tiles that hold kept tokens (see the module notes).
        views: ``"auto"`` (default), ``"joint"``, ``"each"``, ``"stacked"`` or ``"sequence"``: whether the
            allocator chooses over the whole pyramid, view by view, or over the model's own image sequence
            (:mod:`pyrtok.vlm.families.views`). ``"auto"`` follows the allocator's authors on LLaVA-NeXT
            (FasterVLM, VisionZip, VScan and CDPruner run each view on its own, DivPrune the sequence) and is
            ``"joint"`` for every other allocator, for OneVision (its authors' code is LLaVA-NeXT's), with lazy
            tiles (a view-by-view choice reads every tile) and, for the sequence, with pooled levels.
    """

    name = "llava_next"
    architectures = ("LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration")
    views_key = "views"
    count_key = "encoded_tiles"

    def __init__(self, model: nn.Module, processor: Any, mode: str = "feature", levels: int = 1,
                 newlines: str = "kept_rows", lazy_tiles: bool = False, views: str = "auto") -> None:
        super().__init__(model, processor, mode, levels)
        if mode != "feature":
            raise ValueError(f"mode must be 'feature' for LLaVA-NeXT/OneVision (the tiles are the finer scale), "
                             f"got {mode!r}")
        check_level_count(levels)
        if newlines not in NEWLINES:
            raise ValueError(f"newlines must be one of {NEWLINES}, got {newlines!r}")
        if not isinstance(lazy_tiles, bool):
            raise TypeError(f"lazy_tiles must be a bool, got {lazy_tiles!r}")
        if self.image_processor is None:
            raise ValueError("LLaVA-NeXT/OneVision models need their image processor: pass the AutoProcessor "
                             "saved with the model (or load with PyramidVLM.from_pretrained)")
        if views not in VIEWS:
            raise ValueError(f"views must be one of {VIEWS}, got {views!r}")
        if lazy_tiles and views in ("each", "stacked", "sequence"):
            raise ValueError(f"views={views!r} chooses in every tile, so every tile is encoded: it does not go with "
                             "lazy_tiles=True")
        self.newlines, self.lazy_tiles, self.views = newlines, lazy_tiles, views
        config = model.config
        vision = config.vision_config
        self.tile = int(vision.image_size)
        self.grid = self.tile // int(vision.patch_size)
        self.pinpoints = [list(p) for p in config.image_grid_pinpoints]
        self.feature_layer = config.vision_feature_layer
        if not isinstance(self.feature_layer, (int, list, tuple)) or isinstance(self.feature_layer, bool):
            raise ValueError(f"vision_feature_layer must be an int or a list of ints, got {self.feature_layer!r}")
        self.strategy = config.vision_feature_select_strategy
        self._view: Any = None  # the tower's attention reader, made on first use
        tower = model.model.vision_tower
        embeddings = getattr(getattr(tower, "vision_model", tower), "embeddings", None)
        self.has_cls = getattr(embeddings, "class_embedding", None) is not None
        if self.strategy not in STRATEGIES:
            raise ValueError(f"vision_feature_select_strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.strategy == "full" and self.has_cls:
            raise ValueError("vision_feature_select_strategy='full' keeps the [CLS] token, which does not fit the "
                             "tile grid; this tower has one: use 'default'")
        if self.strategy == "default" and not self.has_cls:
            raise ValueError("vision_feature_select_strategy='default' drops a [CLS] token, but this tower has "
                             "none: use 'full'")
        ratio = getattr(config, "vision_aspect_ratio", None)
        self.max_tiles: int | None = None
        if ratio is not None:
            if not isinstance(ratio, str) or not ratio.startswith("anyres_max_") or \
                    not ratio.removeprefix("anyres_max_").isdigit():
                raise ValueError(f"vision_aspect_ratio must be 'anyres_max_<int>', got {ratio!r}")
            self.max_tiles = int(ratio.removeprefix("anyres_max_"))

    # -- pixels ---------------------------------------------------------------------------------------
    def image_pixels(self, image: Image.Image | Tensor) -> Tensor:
        pil = self._pil(image)
        return image_tensor(pil) if pil is not None else self._check_tensor(image)

    def _processed(self, pixels: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(G, 3, H, W) in [0, 1] -> the processor's normalised (G, 1 + T, 3, s, s) base view and tiles."""
        eight_bit = (pixels.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8)
        out = self.image_processor(images=list(eight_bit), return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        return out["pixel_values"].to(pixels.device, dtype), tuple(pixels.shape[-2:])

    def tile_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of tiles the model's pinpoints give an image of (H, W) pixels."""
        from transformers.image_processing_utils import select_best_resolution

        height, width = select_best_resolution([int(size[0]), int(size[1])], self.pinpoints)
        return height // self.tile, width // self.tile

    # -- tokens ---------------------------------------------------------------------------------------
    def _tower(self, pixel_values: Tensor, attention: bool = False) -> tuple[Tensor, Tensor | None]:
        """(n, 3, s, s) normalised tiles -> (n, p * p, D_lm) projected patch features, as the model computes
        them (its feature layer or layers, its select strategy, its projector), and with ``attention`` the
        (n, p * p) attention row of each view (see :meth:`_attention`)."""
        hidden, states = self._hidden(pixel_values)
        row = self._attention(states) if attention else None
        return self.model.model.multi_modal_projector(self._patches(hidden)), row

    def _hidden(self, pixel_values: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """(n, 3, s, s) normalised views -> the (n, T, D) tower output the model reads (its feature layer, or its
        layers concatenated; [CLS] included where the tower has one) and every hidden state."""
        out = self.model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        if isinstance(self.feature_layer, int):
            return out.hidden_states[self.feature_layer], out.hidden_states
        return torch.cat([out.hidden_states[k] for k in self.feature_layer], dim=-1), out.hidden_states

    def _patches(self, hidden: Tensor) -> Tensor:
        """The patch tokens of a tower output, by the model's select strategy."""
        return hidden[:, 1:] if self.strategy == "default" else hidden

    def _view_signals(self, hidden: Tensor, states: tuple[Tensor, ...], projected: Tensor, row: Tensor | None,
                      images: int) -> dict[str, Tensor]:
        """What a view-by-view choice reads of the (G * V) views, as ``Encoded.extras`` (G, V, ...): the patches
        in the tower's space and through the projector, the [CLS] features, the [CLS] attention at the feature
        layer (``row``) and at the tower's early layer, and the feature layer's keys (heads averaged)."""
        layer = self.feature_layer if isinstance(self.feature_layer, int) else self.feature_layer[-1]
        signals = {"view_features": self._patches(hidden), "view_embeddings": projected, "view_attention": row,
                   "view_cls": hidden[:, 0] if self.has_cls else None,
                   "view_early_attention": self._attention(states, self._view.early_layer),
                   "view_keys": self._view.mean_keys(states, int(layer))}
        return {k: rearrange(v, "(g v) ... -> g v ...", g=images) for k, v in signals.items() if v is not None}

    def _attention(self, states: tuple[Tensor, ...], layer: int | None = None) -> Tensor | None:
        """(n, p * p) attention of each view's [CLS] to its patches at hidden state ``layer`` (default the feature
        layer, the last listed one for a list), or of SigLIP's pooling probe over the last layer; None for a
        tower with neither."""
        from pyrtok.encoders.towers import VisionTower

        if self._view is None:
            self._view = VisionTower(self.model.model.vision_tower)
        if layer is None:
            layer = self.feature_layer if isinstance(self.feature_layer, int) else self.feature_layer[-1]
        row = self._view.attention_row(states, int(layer))
        return None if row is None else row.float()

    def _unpad_box(self, size: tuple[int, int], rows: int, cols: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) of the unpadded region in the (rows * p, cols * p) joined tile grid,
        by the model's ``unpad_image`` rule."""
        height, width = size
        current_h, current_w = rows * self.grid, cols * self.grid
        if width / height > current_w / current_h:
            new_h = int(round(height * (current_w / width), 7))
            pad = (current_h - new_h) // 2
            return pad, current_h - pad, 0, current_w
        new_w = int(round(width * (current_h / height), 7))
        pad = (current_w - new_w) // 2
        return 0, current_h, pad, current_w - pad

    def _shrunk(self, unpadded: tuple[int, int]) -> tuple[int, int] | None:
        """OneVision's ``anyres_max_N`` target for an unpadded grid, or None where the model keeps it."""
        if self.max_tiles is None:
            return None
        h, w = unpadded
        ratio = math.sqrt(h * w / (self.max_tiles * self.grid**2))
        return (int(h // ratio), int(w // ratio)) if ratio > 1.1 else None

    def _fine_grid(self, tiles: Tensor, size: tuple[int, int], rows: int, cols: int) -> Tensor:
        """(G, rows * cols, p * p, D) tile features -> (G, h0, w0, D) level-0 grid, as the model packs it."""
        grid = rearrange(tiles, "g (nh nw) (ph pw) d -> g d (nh ph) (nw pw)", nh=rows, nw=cols, ph=self.grid)
        top, bottom, left, right = self._unpad_box(size, rows, cols)
        grid = grid[:, :, top:bottom, left:right]
        target = self._shrunk((bottom - top, right - left))
        if target is not None:
            grid = F.interpolate(grid, list(target), mode="bilinear")
        return rearrange(grid, "g d h w -> g h w d")

    def encode(self, pixels: Tensor) -> Encoded:
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (G, 3, H, W) in [0, 1] from image_pixels(), got {tuple(pixels.shape)}")
        values, size = self._processed(pixels)
        rows, cols = self.tile_grid(size)
        count = values.shape[1] - 1
        if count != rows * cols:
            raise ValueError(f"the image processor gave {count} tiles, but the model's pinpoints give {rows}x{cols}")
        g = values.shape[0]
        h0, w0 = self._fine_shape(size, rows, cols)
        attention = None
        if self.lazy_tiles:
            base, base_row = self._tower(values[:, 0], attention=True)
            fine = self._provisional(base, size, rows, cols)
            encoded = torch.zeros(g, dtype=torch.long, device=pixels.device)
            if base_row is not None:
                # a density per level-0 cell: the base view's share spread over the cells under it
                base_row = base_row * self.grid**2 / (h0 * w0)
                attention = (base_row, self._provisional(base_row[..., None], size, rows, cols)[..., 0])
        else:
            hidden, states = self._hidden(rearrange(values, "g t c h w -> (g t) c h w"))
            flat = self.model.model.multi_modal_projector(self._patches(hidden))
            row = self._attention(states)
            if self._by_view:
                signals = self._view_signals(hidden, states, flat, row, g)
            features = rearrange(flat, "(g t) n d -> g t n d", g=g)
            base, fine = features[:, 0], self._fine_grid(features[:, 1:], size, rows, cols)
            encoded = torch.full((g,), count, dtype=torch.long, device=pixels.device)
            if row is not None:
                # each view's row sums to ~1; scaled so that every level's tokens carry a density per level-0
                # cell (levels sum to ~1 over the image), comparable across the base view and the tiles
                row = rearrange(row, "(g t) n -> g t n 1", g=g)
                attention = (row[:, 0, :, 0] * self.grid**2 / (h0 * w0),
                             self._fine_grid(row[:, 1:] / count, size, rows, cols)[..., 0])
        tokens = self._tokens(base, fine, size, attention)
        extras = {self.views_key: values, self.count_key: encoded}
        if self._by_view:
            extras.update(signals)
        return Encoded(tokens, pixels, self._flops(encoded), extras)

    def _flops(self, tiles: Tensor) -> Tensor:
        """(G,) vision FLOPs of images that encoded their base view and ``tiles`` (G,) tiles each."""
        from pyrtok.vlm.flops import vit_flops

        per_view = vit_flops(self.model.config.vision_config, self.grid**2, has_cls=self.has_cls)
        return (1 + tiles.double().cpu()) * per_view

    def _fine_shape(self, size: tuple[int, int], rows: int, cols: int) -> tuple[int, int]:
        top, bottom, left, right = self._unpad_box(size, rows, cols)
        unpadded = (bottom - top, right - left)
        return self._shrunk(unpadded) or unpadded

    def _provisional(self, base: Tensor, size: tuple[int, int], rows: int, cols: int) -> Tensor:
        """(G, p * p, D) base-view features -> (G, h0, w0, D): each level-0 cell takes the base-view cell
        under its centre (what feature-scoring allocators see before any tile is encoded)."""
        h0, w0 = self._fine_shape(size, rows, cols)
        r = ((torch.arange(h0, device=base.device) + 0.5) * self.grid / h0).floor().long().clamp(0, self.grid - 1)
        c = ((torch.arange(w0, device=base.device) + 0.5) * self.grid / w0).floor().long().clamp(0, self.grid - 1)
        cells = rearrange(r[:, None] * self.grid + c[None, :], "h w -> (h w)")
        return rearrange(base[:, cells], "g (h w) d -> g h w d", h=h0)

    def _tokens(self, base: Tensor, fine: Tensor, size: tuple[int, int],
                attention: tuple[Tensor, Tensor] | None = None) -> MultiScaleTokens:
        """Base view (G, p * p, D) and level-0 grid (G, h0, w0, D) -> the pyramid (base view on top);
        ``attention``: the base view's (G, p * p) and the level-0 grid's (G, h0, w0) attention densities."""
        pyramid = from_feature_grid(fine, self.levels, image_size=size,
                                    attention=None if attention is None else attention[1])
        return self.with_top_view(pyramid, base, self.grid, None if attention is None else attention[0])

    # -- lazy tiles -----------------------------------------------------------------------------------
    def tile_reads(self, size: tuple[int, int], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """Which tiles each level-0 row and column of an image of (H, W) pixels reads: (h0, rows) and (w0, cols)
        bool, so that level-0 cell (r, c) reads tile (i, j) exactly when both ``[r, i]`` and ``[c, j]`` hold.

        Without shrinking, a level-0 cell is one cell of the unpadded tile grid, in one tile. OneVision's
        ``anyres_max_N`` shrink (``F.interpolate(mode="bilinear", align_corners=False)``, a downscale by more than
        1.1) makes output cell i of an axis read the source cells ``floor(s)`` and ``floor(s) + 1`` (where that
        exists and its weight ``s - floor(s)`` is not 0), with ``s = max((i + 0.5) * in / out - 0.5, 0)``: only
        cells under the output cell's span, never a margin around it. Those weights are taken from the
        interpolation itself (see :func:`bilinear_reads`), so the float rounding is the model's own.
        """
        rows, cols = self.tile_grid(size)
        top, bottom, left, right = self._unpad_box(size, rows, cols)
        unpadded = (bottom - top, right - left)
        target = self._shrunk(unpadded) or unpadded
        out = []
        for n_in, n_out, offset, n_tiles in ((unpadded[0], target[0], top, rows), (unpadded[1], target[1], left, cols)):
            if n_out == n_in:
                reads = torch.eye(n_in, dtype=torch.bool, device=device)
            else:
                reads = bilinear_reads(n_in, n_out, torch.device(device), next(self.model.parameters()).dtype)
            tile = (torch.arange(n_in, device=device) + offset) // self.grid  # the tile of each source cell
            in_tile = tile[:, None] == torch.arange(n_tiles, device=device)[None]  # (n_in, n_tiles)
            out.append((reads.float() @ in_tile.float()) > 0)  # (n_out, n_tiles)
        return out[0], out[1]

    def needed_tiles(self, tokens: MultiScaleTokens, index: Tensor) -> Tensor:
        """(rows * cols,) bool: exactly the tiles whose features the kept tokens ``index`` (K,) of one image read
        (a level-l tile-pyramid token reads the level-0 cells it pools, each of which reads the tiles of
        :meth:`tile_reads`; base-view tokens read none). Computed from the tokens' integer grid positions, so no
        pixel-box rounding can pull in a neighbouring tile."""
        size = tokens.image_size
        rows, cols = self.tile_grid(size)
        index = index[tokens.level[index] < tokens.num_levels - 1]
        if index.numel() == 0:
            return torch.zeros(rows * cols, dtype=torch.bool, device=tokens.device)
        row_reads, col_reads = self.tile_reads(size, tokens.device)
        h0, w0 = tokens.level_shapes[0]
        span = 2 ** tokens.level[index]  # level-0 cells a token pools along each axis
        r0, c0 = tokens.row[index] * span, tokens.col[index] * span
        i, j = torch.arange(h0, device=tokens.device), torch.arange(w0, device=tokens.device)
        own_rows = (i[None] >= r0[:, None]) & (i[None] < (r0 + span)[:, None])  # (K, h0)
        own_cols = (j[None] >= c0[:, None]) & (j[None] < (c0 + span)[:, None])  # (K, w0)
        tile_rows = (own_rows.float() @ row_reads.float()) > 0  # (K, rows)
        tile_cols = (own_cols.float() @ col_reads.float()) > 0  # (K, cols)
        return (tile_rows[:, :, None] & tile_cols[:, None, :]).any(0).flatten()

    @property
    def defers(self) -> bool:
        """With lazy tiles, the tiles are encoded once the kept tokens are known."""
        return self.lazy_tiles

    def after_selection(self, encoded: Encoded, selection: TokenSelection) -> Encoded:
        """With lazy tiles: the group with its tile levels built from only the tiles the selection needs, and
        ``flops`` counting them; without, the group as it is."""
        if not self.lazy_tiles:
            return encoded
        tokens = encoded.tokens
        size = tokens.image_size
        rows, cols = self.tile_grid(size)
        tiles = encoded.extras[self.views_key][:, 1:]  # (G, T, 3, s, s)
        features, need = self.encode_needed_tiles(tokens, tiles, selection)
        base = tokens.features[:, : self.grid**2]
        built = self._tokens(base, self._fine_grid(features, size, rows, cols), size)
        count = need.sum(-1)
        return Encoded(built, encoded.pixels, self._flops(count), {**encoded.extras, self.count_key: count})

    # -- view by view ---------------------------------------------------------------------------------
    def view_rule(self, allocator: Any) -> str:
        """``"joint"``, ``"each"``, ``"stacked"`` or ``"sequence"``: how ``allocator`` chooses here (the ``views``
        option, or under ``"auto"`` the rule its authors use on LLaVA-NeXT, see the class notes; joint where the
        pyramid has pooled levels or the allocator reads every level, which the authors' rules have no place
        for)."""
        if self.views != "auto":
            return self.views
        every_level = getattr(allocator, "scales", "finest") != "finest"
        if self.lazy_tiles or self.max_tiles is not None or self.levels > 1 or every_level:
            return "joint"
        return getattr(allocator, "views", "joint")

    def query_space(self, encoded: Encoded) -> MultiScaleTokens:
        """The pyramid built from the tower's features (as the model's tokens are from the projector's), with the
        language model's inputs as ``embeddings``, where :meth:`encode` kept the views' tower features; else the
        tokens themselves (lazy tiles, or ``views="joint"``: a CLIP text tower cannot read them)."""
        if "view_features" not in encoded.extras:
            return encoded.tokens
        views = encoded.extras["view_features"]
        size = encoded.tokens.image_size
        tower = self._tokens(views[:, 0], self._fine_grid(views[:, 1:], size, *self.tile_grid(size)), size)
        return replace(tower, embeddings=encoded.tokens.features)

    @property
    def _by_view(self) -> bool:
        """Whether some allocator may choose view by view here (so :meth:`encode` keeps what views need)."""
        return not self.lazy_tiles and self.views in ("auto", "each", "stacked") and \
            not (self.views == "auto" and (self.max_tiles or self.levels > 1))

    def select(self, allocator: Any, encoded: Encoded, budgets: Tensor, query: Tensor | None = None,
               generator: torch.Generator | None = None,
               align: Callable[[MultiScaleTokens], MultiScaleTokens] | None = None) -> TokenSelection:
        """The allocator's choice for one group: over the whole pyramid, or (:meth:`view_rule`) on every view as
        its own image, each view with ``budgets // V`` tokens, or over the model's image sequence with ``budgets``
        (:class:`~pyrtok.vlm.families.views.ViewSelection`). A budget of every token (the pyramid's N, what
        ``budget=None`` gives) keeps every view's or sequence token."""
        rule = self.view_rule(allocator)
        if rule == "joint":
            return super().select(allocator, encoded, budgets, query, generator, align)
        everything = budgets >= encoded.tokens.num_tokens
        if rule == "sequence":
            tokens = self._sequence_tokens(encoded)
            budgets = torch.where(everything, tokens.num_tokens, budgets)
            chosen = allocator(tokens, budgets, image=encoded.pixels, query=query, generator=generator)
            return ViewSelection(chosen.index, chosen.mask, chosen.count, views=chosen, num_views=1, rule=rule)
        extras = encoded.extras
        values = extras[self.views_key]  # (G, V, 3, s, s)
        num_views, patches = values.shape[1], self.grid**2
        size = encoded.tokens.image_size
        top, bottom, left, right = self._unpad_box(size, *self.tile_grid(size))
        if rule == "each" and self._shrunk((bottom - top, right - left)) is not None:
            raise ValueError("views='each' lays the tiles out as LLaVA-NeXT does, without OneVision's anyres_max "
                             "shrink, which this image's tile grid needs: use views='joint' or 'stacked'")
        tokens = view_tokens(extras["view_features"], self.tile, cls=extras.get("view_cls"),
                             attention=extras.get("view_attention"),
                             early_attention=extras.get("view_early_attention"), keys=extras.get("view_keys"),
                             embeddings=extras["view_embeddings"])
        if align is not None:
            tokens = align(tokens)
        stats = self.image_processor
        pixels = unnormalise(rearrange(values, "g v c h w -> (g v) c h w"), stats.image_mean, stats.image_std)
        if bool((budgets < num_views).any()):
            raise ValueError(f"views={rule!r} gives each of an image's {num_views} views budget // {num_views} "
                             f"tokens: budgets must be at least {num_views}, got {budgets.tolist()}")
        budgets = torch.where(everything, num_views * patches, budgets)
        rows = None if query is None else torch.repeat_interleave(query, num_views, dim=0)
        chosen = allocator(tokens, view_budgets(budgets, num_views), image=pixels, query=rows, generator=generator)
        reaches = self._reaches(size, rule).to(budgets.device)
        return ViewSelection.from_views(chosen, num_views, patches, reaches.expand(values.shape[0], -1), rule)

    def _sequence_tokens(self, encoded: Encoded) -> MultiScaleTokens:
        """(G, L, D_lm): the image as the model's sequence holds it (the base view, then each row of the unpadded
        grid ended by the newline token), as one level of one row, so that canonical order is the sequence's and
        every token is a candidate of the finest level (the boxes split the image into L columns: they are not
        where the tokens look)."""
        tokens = encoded.tokens
        if tokens.num_levels != 2:
            raise ValueError(f"views='sequence' is the model's own sequence, which has no pooled levels: use levels=1, "
                             f"got {tokens.num_levels - 1} tile levels")
        h0, top = tokens.level_shapes[0][0], self.grid**2
        fine = rearrange(tokens.features[:, top:], "g (h w) d -> g h w d", h=h0)
        newline = self.model.model.image_newline.to(fine).expand(fine.shape[0], h0, 1, -1)
        rows = rearrange(torch.cat([fine, newline], dim=2), "g h w d -> g (h w) d")
        sequence = torch.cat([tokens.features[:, :top], rows], dim=1)
        return from_feature_grid(sequence[:, None], 1, image_size=tokens.image_size, embeddings=sequence[:, None])

    def _joined_cells(self, rows: int, cols: int) -> tuple[Tensor, Tensor]:
        """(T * P,) row and column of each tile patch (tiles in raster order, patches in raster order within a
        tile) in the joined (rows * p, cols * p) tile grid."""
        y, x = torch.meshgrid(torch.arange(rows * self.grid), torch.arange(cols * self.grid), indexing="ij")
        per_tile = "(tr i) (tc j) -> (tr tc i j)"
        return (rearrange(y, per_tile, i=self.grid, j=self.grid), rearrange(x, per_tile, i=self.grid, j=self.grid))

    def _reaches(self, size: tuple[int, int], rule: str) -> Tensor:
        """(V * P,) bool: the view patches a rule's layout sends on (``"each"`` drops the tiles' padding)."""
        rows, cols = self.tile_grid(size)
        reach = torch.ones((1 + rows * cols) * self.grid**2, dtype=torch.bool)
        if rule == "each":
            y, x = self._joined_cells(rows, cols)
            reach[self.grid**2:] = _in_box(y, x, self._unpad_box(size, rows, cols))
        return reach

    def _view_inputs(self, encoded: Encoded, selection: ViewSelection) -> list[Tensor]:
        """(P_g, D_lm) per image of a view-by-view selection, laid out by its rule (see
        :mod:`pyrtok.vlm.families.views`)."""
        if selection.rule == "sequence":
            return self.gather_kept(self._sequence_tokens(encoded).features, selection.views)
        extras, views, num_views = encoded.extras, selection.views, selection.num_views
        projector = self.model.model.multi_modal_projector
        kept = self.kept_rows(rearrange(extras["view_features"], "g v p d -> (g v) p d"), views, projector)
        cls = merged = None
        if views.cls is not None and bool(views.cls.any()):
            cls = projector(rearrange(extras["view_cls"], "g v d -> (g v) d"))
        if views.merged is not None:
            merged = projector(views.merged.features)
        rows, cols = self.tile_grid(encoded.tokens.image_size)
        y, x = (c.to(kept.device) for c in self._joined_cells(rows, cols))
        box = self._unpad_box(encoded.tokens.image_size, rows, cols)
        top, bottom = box[:2]
        newline = self.model.model.image_newline[None].to(kept)
        empty = kept.new_zeros(0, kept.shape[-1])

        def extra(r: int) -> tuple[Tensor, Tensor]:  # a view's [CLS] (0 or 1 rows) and merged tokens
            lead = cls[r: r + 1] if cls is not None and bool(views.cls[r]) else empty
            tail = merged[r, : int(views.merged.count[r])] if merged is not None else empty
            return lead, tail

        out = []
        for g in range(selection.batch_size):
            base = g * num_views
            lead, tail = extra(base)
            pieces = [lead, kept[base, : int(views.count[base])], tail]
            tile_rows = range(base + 1, base + num_views)
            cells = torch.cat([(r - base - 1) * self.grid**2 + views.index[r, : int(views.count[r])]
                               for r in tile_rows])
            features = torch.cat([kept[r, : int(views.count[r])] for r in tile_rows])
            ys, xs = y[cells], x[cells]
            order = torch.argsort(ys * cols * self.grid + xs, stable=True)
            features, ys, xs = features[order], ys[order], xs[order]
            if selection.rule == "stacked":
                pieces.append(features)
            else:
                inside = _in_box(ys, xs, box)
                features, ys = features[inside], ys[inside]
                per_row = torch.bincount(ys - top, minlength=bottom - top).tolist()
                for part in features.split(per_row):
                    pieces += [part, newline]
            pieces += [extra(r)[0] for r in tile_rows] + [extra(r)[1] for r in tile_rows]
            out.append(torch.cat(pieces))
        return out

    # -- language-model inputs ------------------------------------------------------------------------
    def kept_features(self, encoded: Encoded, selection: TokenSelection) -> tuple[list[Tensor], dict[str, list]]:
        if isinstance(selection, ViewSelection):
            return self._view_inputs(encoded, selection), {}
        tokens = encoded.tokens
        newline = self.model.model.image_newline
        h0 = tokens.level_shapes[0][0]
        merged = getattr(selection, "merged", None)
        rows = self.kept_rows(tokens.features, selection)
        out = []
        for g in range(tokens.batch_size):
            index = selection.index[g, : int(selection.count[g])]
            kept = rows[g, : index.shape[0]]
            fine = tokens.level[index] == 0
            head = kept[~fine]  # base view, then pooled levels: canonical order puts them first
            pieces = [head]
            if self.newlines == "none":
                pieces.append(kept[fine])
            else:
                per_row = torch.bincount(tokens.row[index[fine]], minlength=h0).tolist()
                for part, n in zip(kept[fine].split(per_row), per_row, strict=True):
                    if n or self.newlines == "all_rows":
                        pieces += [part, newline[None].to(kept)]
            if merged is not None:  # merged tokens are made from these features (the LM's space): they follow
                pieces.append(merged.features[g, : int(merged.count[g])].to(kept))
            out.append(torch.cat(pieces))
        return out, {}
