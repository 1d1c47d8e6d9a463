"""InternVL (``InternVLForConditionalGeneration``): dynamic tiles plus a thumbnail, as one token pyramid.

Pixels: an image stays at its original size, as a (3, H, W) tensor in [0, 1] (a PIL image's 8-bit values
exactly), and that is what :class:`~pyrtok.vlm.families.Encoded` carries for pixel signals (token boxes are in
these pixels). Encoding runs the model's own image processor on it with the processor's image defaults
(``crop_to_patches=True``): the choice of a (cols x rows) tile grid whose aspect ratio is closest to the image's
within ``min_patches..max_patches`` tiles, the resize of the whole image to that canvas, the cut into tiles of
the tower's size, and, only when there is more than one tile, a thumbnail (the whole image resized to one
tile). Images of one original size share a group (and so a tile grid).

Tokens (in the language model's space): each view goes through the model's own ``get_image_features`` (its
feature layer and select strategy, the pixel shuffle that concatenates each 2x2 block of patches, the
projector's LayerNorm and MLP), so a tile of p x p patches gives a (p/2 x p/2) grid of q x q tokens
(16 x 16 = 256 for 448 px tiles of 14 px patches). Level 0 is the joined tile grid (rows * q, cols * q); since
the tiles cut a resize of the whole image, unpadded, its cells split the image uniformly. ``levels`` > 1 adds
2x2-pooled levels of that grid; pooling happens on the projected tokens (after the MLP, in the language model's
space): pooling patches before the shuffle would not be the shuffle. The thumbnail's q x q grid is the top
level when the image has several tiles; a single-tile image has no thumbnail (as in the model). Boxes are in
original-image pixels: a level-0 cell is (H / (rows * q), W / (cols * q)), a thumbnail cell (H / q, W / q).

Attention (``tokens.attention``, for ``fastervlm`` and ``visionzip``): InternViT has a [CLS] token; each view's
[CLS] attention to its patches inside the feature layer (recomputed from that layer's input, so the tower keeps
its attention kernel), summed over the 2x2 patches each token concatenates. Every view's row sums to about 1;
tile rows are joined and divided by the number of tiles, and the thumbnail's row is scaled by its share of the
level-0 cells, so every token carries a density per level-0 cell and tiles and thumbnail compete on one scale
(the rule of :mod:`pyrtok.vlm.families.llava_next` for its base view).

Layout (the model's own order at full budget): InternVL writes each image as one run of image tokens between
``<img>`` and ``</img>``: tile after tile in row-major tile order, each tile's tokens in raster order, the
thumbnail last. Kept tokens follow that order: the kept level-0 tokens tile by tile (row-major tiles, raster
within a tile, so not the raster order of the joined grid), then the kept pooled-level tokens (finer levels
first, raster order), then the kept thumbnail tokens (raster order). Merged tokens (VisionZip-style) are
averaged from the tokens' features, already in the language model's space, and follow the kept tokens,
before ``</img>``. Positions are 1-D, consecutive, as InternVL's own are.

The run's ``<img>`` and ``</img>`` are text tokens the processor writes around each image marker
(``<IMG_CONTEXT>`` in the chat template); :meth:`InternVLFamily.image_run` gives the core that run.

Lazy tiles (``lazy_tiles=True``): :meth:`encode` runs the tower on the thumbnail only; every level-0 token then
carries the thumbnail token under its box centre (features and attention), so allocators that score features
choose from the thumbnail and pixel-signal allocators choose exactly as they do eagerly. :meth:`after_selection`
encodes only the tiles under the kept tile and pooled-level tokens and builds their features exactly as the
eager path does; with every tile kept it is the eager path. Merged tokens are averaged from what the allocator
saw. The count of tiles each image encoded is ``Encoded.extras["encoded_tiles"]`` (G,), and ``Encoded.flops``
counts the thumbnail and those tiles. A single-tile image has no thumbnail to choose from: it is encoded at once.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from einops import rearrange, reduce, repeat
from PIL import Image
from torch import Tensor, nn

from pyrtok._checks import check_level_count
from pyrtok.images import image_tensor
from pyrtok.tokens import MultiScaleTokens, TokenSelection, from_feature_grid
from pyrtok.vlm.families.base import Encoded, Family, register_family

__all__ = ["InternVLFamily"]


@register_family
class InternVLFamily(Family):
    """InternVL models (InternVL 2.5 / 3 in transformers' ``-hf`` format).

    Args:
        model, processor: the model and the processor saved with it (needed: its image processor and the
            ``<img>`` / ``</img>`` tokens its tokenizer names).
        mode: ``"feature"`` (the only mode: the tiles are the finer scale).
        levels: levels built from the joined tile grid (1: the grid alone); the thumbnail comes on top.
        lazy_tiles: encode only the tiles that hold kept tokens (see the module notes).
    """

    name = "internvl"
    architectures = ("InternVLForConditionalGeneration",)
    tiles_key = "tiles"
    count_key = "encoded_tiles"

    def __init__(self, model: nn.Module, processor: Any, mode: str = "feature", levels: int = 1,
                 lazy_tiles: bool = False) -> None:
        super().__init__(model, processor, mode, levels)
        if mode != "feature":
            raise ValueError(f"mode must be 'feature' for InternVL (the tiles are the finer scale), got {mode!r}")
        check_level_count(levels)
        if not isinstance(lazy_tiles, bool):
            raise TypeError(f"lazy_tiles must be a bool, got {lazy_tiles!r}")
        if self.image_processor is None:
            raise ValueError("InternVL models need their image processor: pass the AutoProcessor saved with the "
                             "model (or load with PyramidVLM.from_pretrained)")
        self.lazy_tiles = lazy_tiles
        config = model.config
        vision = config.vision_config
        size, patch = _pair(vision.image_size, "image_size"), _pair(vision.patch_size, "patch_size")
        if size[0] != size[1] or patch[0] != patch[1]:
            raise ValueError(f"square tiles and patches are expected, got image_size {size}, patch_size {patch}")
        self.tile, self.patch = size[0], patch[0]
        shuffle = 1 / float(config.downsample_ratio)
        if abs(shuffle - round(shuffle)) > 1e-6 or (self.tile // self.patch) % round(shuffle):
            raise ValueError(f"downsample_ratio must be 1/k with k dividing the {self.tile // self.patch}-patch tile "
                             f"side, got {config.downsample_ratio}")
        self.shuffle = round(shuffle)
        self.grid = self.tile // self.patch // self.shuffle  # tokens per tile side (q)
        if config.vision_feature_select_strategy != "default":
            raise ValueError("only vision_feature_select_strategy='default' (the [CLS] token dropped) is supported, "
                             f"got {config.vision_feature_select_strategy!r}")
        self.feature_layer = config.vision_feature_layer
        if not isinstance(self.feature_layer, int) or isinstance(self.feature_layer, bool):
            raise ValueError(f"vision_feature_layer must be an int, got {self.feature_layer!r}")
        seq = getattr(processor, "image_seq_length", self.grid**2)
        if seq != self.grid**2:
            raise ValueError(f"the processor writes {seq} tokens per tile, but the model gives {self.grid**2}")
        ip_size = self.image_processor.size
        side = (ip_size.get("height"), ip_size.get("width")) if hasattr(ip_size, "get") else \
            (ip_size.height, ip_size.width)
        if tuple(side) != (self.tile, self.tile):
            raise ValueError(f"the image processor cuts {side} tiles, but the tower takes {self.tile}")
        # The processor's own image defaults (InternVL's: crop_to_patches=True), as its __call__ passes them.
        self.image_kwargs = dict(getattr(processor, "images_kwargs", None) or {})
        start = getattr(processor, "start_image_token", None) or getattr(self.tokenizer, "start_image_token", None)
        end = getattr(processor, "end_image_token", None) or getattr(self.tokenizer, "end_image_token", None)
        if not start or not end:
            raise ValueError("the processor's tokenizer must name InternVL's start_image_token and end_image_token "
                             "(<img>, </img>)")
        self.run_ids = (self.tokenizer.convert_tokens_to_ids(start), self.tokenizer.convert_tokens_to_ids(end))

    def image_run(self, count: int) -> list[int]:
        """``<img>``, ``count`` image markers, ``</img>``: the run InternVL's processor writes for one image."""
        start, end = self.run_ids
        return [start, *([self.image_token_id] * count), end]

    # -- pixels ---------------------------------------------------------------------------------------
    def image_pixels(self, image: Image.Image | Tensor) -> Tensor:
        pil = self._pil(image)
        return image_tensor(pil) if pil is not None else self._check_tensor(image)

    def _option(self, name: str) -> Any:
        return self.image_kwargs.get(name, getattr(self.image_processor, name))

    def tile_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of tiles the model's processor cuts an image of (H, W) pixels into."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        if not self._option("crop_to_patches"):
            return 1, 1
        cols, rows = get_optimal_tiled_canvas((int(size[0]), int(size[1])), (self.tile, self.tile),
                                              int(self._option("min_patches")), int(self._option("max_patches")))
        return rows, cols

    def _processed(self, pixels: Tensor) -> Tensor:
        """(G, 3, H, W) in [0, 1] -> the processor's normalised (G, V, 3, s, s) views: tiles, then the thumbnail."""
        # 8-bit pixels, as an image file gives them: the processor's resizing assumes them
        eight_bit = (pixels.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8)
        out = self.image_processor(images=list(eight_bit), return_tensors="pt", **self.image_kwargs)
        counts = [int(n) for n in out["num_patches"]]
        dtype = next(self.model.parameters()).dtype
        values = rearrange(out["pixel_values"], "(g v) c h w -> g v c h w", g=pixels.shape[0])
        if len(set(counts)) != 1 or counts[0] != values.shape[1]:
            raise ValueError(f"the image processor gave {counts} views to images of one size")
        return values.to(pixels.device, dtype)

    # -- tokens ---------------------------------------------------------------------------------------
    def _tower(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """(n, 3, s, s) normalised views -> (n, q * q, D_lm) tokens through the model's own
        ``get_image_features`` and the (n, q * q) attention of each view's [CLS] (see the module notes)."""
        inner = self.model.model
        out = inner.get_image_features(pixel_values=values, output_hidden_states=True, return_dict=True)
        return out.pooler_output, self._attention(out.hidden_states)

    def _attention(self, states: tuple[Tensor, ...]) -> Tensor:
        """(n, q * q): the [CLS] attention row inside the feature layer, summed over the patches of each token."""
        from pyrtok.encoders.towers import cls_attention

        layers = self.model.model.vision_tower.encoder.layer
        index = self.feature_layer % (len(layers) + 1)
        if index == 0:  # the embeddings: no attention layer read them
            row = torch.full((states[0].shape[0], states[0].shape[1] - 1), 1.0 / (states[0].shape[1] - 1),
                             device=states[0].device)
        else:
            block = layers[index - 1]
            x = block.layernorm_before(states[index - 1])
            attn = block.attention
            query, keys = attn.q_norm(attn.q_proj(x[:, :1])), attn.k_norm(attn.k_proj(x))
            row = cls_attention(query, keys, attn.num_heads, attn.scale)
        side = self.tile // self.patch
        return reduce(row.float(), "n (h s1 w s2) -> n (h w)", "sum", h=side // self.shuffle, s1=self.shuffle,
                      s2=self.shuffle)

    def _fine_grid(self, tiles: Tensor, rows: int, cols: int) -> Tensor:
        """(G, rows * cols, q * q, ...) per-tile tokens -> (G, rows * q, cols * q, ...) the joined grid."""
        return rearrange(tiles, "g (nh nw) (ph pw) ... -> g (nh ph) (nw pw) ...", nh=rows, nw=cols, ph=self.grid)

    def encode(self, pixels: Tensor) -> Encoded:
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (G, 3, H, W) in [0, 1] from image_pixels(), got {tuple(pixels.shape)}")
        size = tuple(int(s) for s in pixels.shape[-2:])
        values = self._processed(pixels)
        rows, cols = self.tile_grid(size)
        count = rows * cols
        if values.shape[1] != count + (count > 1):
            raise ValueError(f"the image processor gave {values.shape[1]} views, but {rows}x{cols} tiles "
                             f"{'and a thumbnail ' if count > 1 else ''}were expected")
        g = values.shape[0]
        h0, w0 = rows * self.grid, cols * self.grid
        if self.lazy_tiles and count > 1:
            thumb, thumb_row = self._tower(values[:, -1])
            thumb_row = thumb_row * self.grid**2 / (h0 * w0)
            fine = self._provisional(thumb, rows, cols)
            fine_row = self._provisional(thumb_row[..., None], rows, cols)[..., 0]
            encoded = torch.zeros(g, dtype=torch.long, device=pixels.device)
        else:
            features, row = self._tower(rearrange(values, "g v c h w -> (g v) c h w"))
            features = rearrange(features, "(g v) n d -> g v n d", g=g)
            row = rearrange(row, "(g v) n -> g v n", g=g)
            fine, fine_row = self._fine_grid(features[:, :count], rows, cols), \
                self._fine_grid(row[:, :count] / count, rows, cols)
            thumb = features[:, count] if count > 1 else None
            thumb_row = row[:, count] * self.grid**2 / (h0 * w0) if count > 1 else None
            encoded = torch.full((g,), count, dtype=torch.long, device=pixels.device)
        tokens = self._tokens(fine, thumb, size, fine_row, thumb_row)
        extras = {self.count_key: encoded}
        if self.lazy_tiles:
            extras[self.tiles_key] = values[:, :count]
        return Encoded(tokens, pixels, self._flops(encoded, count > 1), extras)

    def _flops(self, tiles: Tensor, thumbnail: bool) -> Tensor:
        """(G,) vision FLOPs of images that encoded ``tiles`` (G,) tiles and, if ``thumbnail``, the thumbnail."""
        from pyrtok.vlm.flops import vit_flops

        vision = self.model.config.vision_config
        shape = SimpleNamespace(num_hidden_layers=vision.num_hidden_layers, hidden_size=vision.hidden_size,
                                intermediate_size=vision.intermediate_size,
                                num_attention_heads=vision.num_attention_heads, patch_size=self.patch)
        per_view = vit_flops(shape, (self.tile // self.patch) ** 2, has_cls=True)
        return (int(thumbnail) + tiles.double().cpu()) * per_view

    def _provisional(self, thumb: Tensor, rows: int, cols: int) -> Tensor:
        """(G, q * q, D) thumbnail tokens -> (G, rows * q, cols * q, D): each level-0 cell takes the thumbnail
        token under its centre (what feature-scoring allocators see before any tile is encoded)."""
        h0, w0 = rows * self.grid, cols * self.grid
        q = self.grid
        r = ((torch.arange(h0, device=thumb.device) + 0.5) * q / h0).floor().long().clamp(0, q - 1)
        c = ((torch.arange(w0, device=thumb.device) + 0.5) * q / w0).floor().long().clamp(0, q - 1)
        cells = rearrange(r[:, None] * q + c[None, :], "h w -> (h w)")
        return rearrange(thumb[:, cells], "g (h w) d -> g h w d", h=h0)

    def _tokens(self, fine: Tensor, thumb: Tensor | None, size: tuple[int, int], fine_row: Tensor | None = None,
                thumb_row: Tensor | None = None) -> MultiScaleTokens:
        """Joined tile grid (G, h0, w0, D) and thumbnail (G, q * q, D) or None -> the pyramid (thumbnail on top);
        ``fine_row`` (G, h0, w0) and ``thumb_row`` (G, q * q): their attention densities."""
        # the features are the language model's inputs (after the projector): their own embeddings
        pyramid = from_feature_grid(fine, self.levels, image_size=size, attention=fine_row, embeddings=fine)
        return pyramid if thumb is None else self.with_top_view(pyramid, thumb, self.grid, thumb_row)

    # -- lazy tiles -----------------------------------------------------------------------------------
    def needed_tiles(self, tokens: MultiScaleTokens, index: Tensor) -> Tensor:
        """(rows * cols,) bool: the tiles under the kept tokens ``index`` (K,) of one image (the thumbnail's
        tokens need none; a pooled token needs every tile its cells lie in)."""
        rows, cols = self.tile_grid(tokens.image_size)
        need = torch.zeros(rows, cols, dtype=torch.bool, device=tokens.device)
        if rows * cols == 1:
            return need.flatten() | (index.numel() > 0)
        index = index[tokens.level[index] < tokens.num_levels - 1]
        if index.numel() == 0:
            return need.flatten()
        h0, w0 = tokens.level_shapes[0]
        span = 2 ** tokens.level[index]
        r0, c0 = tokens.row[index] * span, tokens.col[index] * span
        r1, c1 = ((tokens.row[index] + 1) * span).clamp(max=h0) - 1, ((tokens.col[index] + 1) * span).clamp(max=w0) - 1
        t = torch.arange(rows, device=tokens.device)
        u = torch.arange(cols, device=tokens.device)
        inside_r = (t[None] >= (r0 // self.grid)[:, None]) & (t[None] <= (r1 // self.grid)[:, None])  # (K, rows)
        inside_c = (u[None] >= (c0 // self.grid)[:, None]) & (u[None] <= (c1 // self.grid)[:, None])  # (K, cols)
        return (inside_r[:, :, None] & inside_c[:, None, :]).any(0).flatten()

    @property
    def defers(self) -> bool:
        """With lazy tiles, the tiles are encoded once the kept tokens are known."""
        return self.lazy_tiles

    def after_selection(self, encoded: Encoded, selection: TokenSelection) -> Encoded:
        """With lazy tiles: the group with its tile levels built from only the tiles the selection needs, and
        ``flops`` counting them; without (or for single-tile images, encoded at once), the group as it is."""
        tokens = encoded.tokens
        rows, cols = self.tile_grid(tokens.image_size)
        if not self.lazy_tiles or rows * cols == 1:
            return encoded
        tiles = encoded.extras[self.tiles_key]  # (G, T, 3, s, s)
        features, need = self.encode_needed_tiles(tokens, tiles, selection)
        thumb = tokens.features[:, : self.grid**2]
        built = self._tokens(self._fine_grid(features, rows, cols), thumb, tokens.image_size)
        count = need.sum(-1)
        return Encoded(built, encoded.pixels, self._flops(count, True), {**encoded.extras, self.count_key: count})

    # -- language-model inputs ------------------------------------------------------------------------
    def prompt_order(self, tokens: MultiScaleTokens) -> Tensor:
        """(N,) each token's rank in the model's own order: level-0 tokens tile by tile (row-major tiles, raster
        within a tile), then the pooled levels (finer first, raster), then the thumbnail (raster)."""
        q = self.grid
        _, w0 = tokens.level_shapes[0]
        sizes = tokens.level_sizes
        offset = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])[tokens.level]
        raster = tokens.row * torch.tensor([w for _, w in tokens.level_shapes], device=tokens.device)[tokens.level] \
            + tokens.col
        tile = (tokens.row // q) * (w0 // q) + tokens.col // q
        tiled = tile * q * q + (tokens.row % q) * q + tokens.col % q
        return offset + torch.where(tokens.level == 0, tiled, raster)

    def kept_features(self, encoded: Encoded, selection: TokenSelection) -> tuple[list[Tensor], dict[str, list]]:
        """(K_g + M_g, D_lm) per image: the kept tokens in the model's order (:meth:`prompt_order`), then the
        merged ones (already in the language model's space)."""
        tokens = encoded.tokens
        rank = self.prompt_order(tokens)[selection.index].masked_fill(~selection.mask, tokens.num_tokens)  # (G, K)
        rows = self.kept_rows(tokens.features, selection)
        kept = torch.gather(rows, 1, repeat(rank.argsort(dim=1), "g k -> g k d", d=rows.shape[-1]))
        merged = selection.merged
        out = []
        for g, count in enumerate(selection.count.tolist()):
            parts = [kept[g, :count]]
            if merged is not None:  # merged tokens are made from these features (the LM's space): they follow
                parts.append(merged.features[g, : int(merged.count[g])].to(kept))
            out.append(torch.cat(parts))
        return out, {}

    def encoder_outputs(self, features: list[Tensor], extras: dict[str, list]) -> dict[str, Any]:
        """InternVL scatters one (1, P, D) tensor of every image's tokens, in prompt order, into its placeholders."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"image": BaseModelOutputWithPooling(pooler_output=torch.cat(features)[None])}


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    if isinstance(value, int):
        return value, value
    raise ValueError(f"vision_config.{name} must be an int or a pair, got {value!r}")
