"""What a model family tells the adapter core, and the registry that picks a family from a model's config.

A family is a small class bound to one loaded model and its processor. It knows only what differs between
VLMs, as hooks the core calls unconditionally (the core holds no branch on the family):

- :meth:`Family.image_pixels`: an image as the model sees it (through the model's own image processor);
- :meth:`Family.encode`: those pixels -> :class:`Encoded` (multi-scale tokens in the language model's input
  space, or the space its projector maps from, and the vision FLOPs each image cost);
- :meth:`Family.select`: the allocator's choice for a group (the allocator on its tokens, or view by view);
- :meth:`Family.after_selection`: deferred vision work once the kept tokens are known (LLaVA-NeXT's lazy
  tiles); callers time it like encoding (``PyramidVLM.complete``);
- :meth:`Family.kept_features` and :meth:`Family.encoder_outputs`: how kept and merged tokens reach the
  language model (``mm_encoder_outputs``), and :meth:`Family.image_run`: the prompt tokens an image takes;
- :meth:`Family.image_positions` and :meth:`Family.position_ids`: the positions of the prompt (1-D by
  default; M-RoPE in :mod:`pyrtok.vlm.families.qwen`).

Everything else (allocation, budgets, prompt expansion, left padding, forward, generate) is the core's
(:mod:`pyrtok.vlm.adapter`). A new family is one module with one registered class; the family contract test
(``tests/test_family_contract.py``) picks it up from :data:`FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from einops import rearrange, repeat
from PIL import Image
from torch import Tensor, nn

from pyrtok.registry import Registry
from pyrtok.tokens import MultiScaleTokens, TokenSelection, token_layout

__all__ = ["FAMILIES", "Encoded", "Family", "family_for", "register_family", "supported_architectures"]


@dataclass
class Encoded:
    """Images of one pixel size, encoded together.

    Attributes:
        tokens: (G, N, D) multi-scale tokens of the G images.
        pixels: (G, 3, H, W) the pixels the model sees, in [0, 1] (for pixel-based signals).
        flops: (G,) vision-tower forward FLOPs each image cost so far (every level and view it encoded).
        extras: family data that follows the tokens, one row per image (for example Qwen3-VL's DeepStack
            features (G, N, L, D)).
    """

    tokens: MultiScaleTokens
    pixels: Tensor
    flops: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)

    def rows(self, rows: Tensor) -> Encoded:
        """The encoding of images ``rows`` (a (G',) index) of this group."""
        return Encoded(self.tokens.select_images(rows), self.pixels[rows], self.flops[rows.to(self.flops.device)],
                       {k: v[rows.to(v.device)] for k, v in self.extras.items()})


class Family:
    """Base class of a model family bound to ``model`` and its ``processor`` (either may hold the tokenizer).

    Subclasses set ``name``, ``architectures`` (the ``*ForConditionalGeneration`` class names they run) and
    implement :meth:`image_pixels`, :meth:`encode` and :meth:`kept_features`; families whose positions are not
    1-D and consecutive (M-RoPE) implement :meth:`image_positions` and :meth:`position_ids`; families that
    defer vision work until the selection is known implement :meth:`after_selection` and set ``defers``.
    """

    name: ClassVar[str] = ""
    architectures: ClassVar[tuple[str, ...]] = ()
    fixed_resolution: bool = False  # True: every image becomes the same number of tokens (a property may decide)
    bidirectional_images: ClassVar[bool] = False  # True: an image's tokens attend to each other both ways

    def __init__(self, model: nn.Module, processor: Any, mode: str = "feature", levels: int = 1,
                 **options: Any) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.mode = mode
        self.levels = levels
        if options:
            raise TypeError(f"{type(self).__name__} got unexpected options {sorted(options)}")
        if self.tokenizer is None or not callable(self.tokenizer):
            raise TypeError(f"processor must be a tokenizer or a processor with a .tokenizer, got {processor!r}")
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token for batched, left-padded prompts")

    # -- what every family defines --------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        """The placeholder id that the prompt repeats once per image token."""
        return int(self.model.config.image_token_id)

    @property
    def image_token(self) -> str:
        """The image marker a prompt holds once per image (by default the placeholder itself)."""
        return self.tokenizer.convert_ids_to_tokens(self.marker_id)

    @property
    def marker_id(self) -> int:
        """The token id of the image marker in a prompt (by default the placeholder; Gemma 3's is its
        ``<start_of_image>``, which the processor expands around the placeholders)."""
        return self.image_token_id

    def image_text(self, count: int, views: list[int] | None = None) -> str | None:
        """The text one image of ``count`` placeholders becomes in the prompt, for families whose processor
        expands the marker as text (Gemma 3: blank lines around it, which merge with the prompt's own newlines);
        ``views``: :meth:`image_views` of the image. None (default): the marker is expanded token by token
        (:meth:`image_run`)."""
        return None

    def image_views(self, tokens: MultiScaleTokens, index: Tensor, merged: int = 0) -> list[int] | None:
        """How one image's placeholders split over the views the prompt shows it as (Gemma 3's pan-and-scan: the
        original, then each crop, each its own run), for kept tokens ``index`` (K,) and ``merged`` merged
        tokens; None (default) where an image is one run."""
        return None

    def model_inputs(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """Inputs the model's forward and generate need besides ids, mask, positions and vision outputs
        (Gemma 3's ``token_type_ids``); none by default."""
        return {}

    @property
    def image_processor(self) -> Any | None:
        """The model's own image processor, or None when only a tokenizer was saved with it."""
        return getattr(self.processor, "image_processor", None)

    def image_run(self, count: int) -> list[int]:
        """The prompt's token ids for one image of ``count`` placeholders (the image marker ``count`` times by
        default; families whose processor writes text around them, such as InternVL's ``<img>`` ... ``</img>``,
        add it here)."""
        return [self.image_token_id] * count

    def image_pixels(self, image: Image.Image | Tensor) -> Tensor:
        """(3, H, W) in [0, 1]: one image as the model sees it (a PIL image through the model's processor)."""
        raise NotImplementedError

    def encode(self, pixels: Tensor) -> Encoded:
        """(G, 3, H, W) pixels in [0, 1] from :meth:`image_pixels` (one size) -> :class:`Encoded`."""
        raise NotImplementedError

    def query_space(self, encoded: Encoded) -> MultiScaleTokens:
        """The group's tokens as a query encoder aligns them: the tower's features for a CLIP text tower, the
        language model's inputs (``embeddings``) for the language model's own; by default the tokens themselves
        (LLaVA-NeXT's are in the language model's space, so it builds their tower-space twin)."""
        return encoded.tokens

    def select(self, allocator: Any, encoded: Encoded, budgets: Tensor, query: Tensor | None = None,
               generator: torch.Generator | None = None,
               align: Callable[[MultiScaleTokens], MultiScaleTokens] | None = None) -> TokenSelection:
        """The allocator's choice for one group under (G,) ``budgets``: by default the allocator on the group's
        tokens and pixels (LLaVA-NeXT may run it view by view, :mod:`pyrtok.vlm.families.views`, putting the
        views' tokens in the query space with ``align``, as ``PyramidVLM.encode`` puts the group's)."""
        return allocator(encoded.tokens, budgets, image=encoded.pixels, query=query, generator=generator)

    @property
    def defers(self) -> bool:
        """Whether :meth:`after_selection` does work (encodes what the selection needs)."""
        return False

    def after_selection(self, encoded: Encoded, selection: TokenSelection) -> Encoded:
        """Deferred vision work for ``selection`` of ``encoded``: the group as the kept tokens need it, with
        ``flops`` counting what was encoded (by default ``encoded`` itself: nothing was deferred)."""
        return encoded

    def kept_features(self, encoded: Encoded, selection: TokenSelection) -> tuple[list[Tensor], dict[str, list]]:
        """The language-model inputs of the kept tokens: a list of G (P_g, D_lm) tensors (P_g placeholders:
        the kept tokens, merged tokens and any layout tokens the family adds), and family extras (lists of G
        entries) that :meth:`encoder_outputs` consumes."""
        raise NotImplementedError

    def encoder_outputs(self, features: list[Tensor], extras: dict[str, list]) -> dict[str, Any]:
        """``mm_encoder_outputs`` for the language model: one entry per image, in prompt order."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"image": BaseModelOutputWithPooling(pooler_output=tuple(features))}

    def image_positions(self, tokens: MultiScaleTokens, index: Tensor, merged_boxes: Tensor | None = None) -> Any:
        """What :meth:`position_ids` needs of one image's kept tokens ``index`` (K,) and merged tokens with boxes
        ``merged_boxes`` (M, 4); None for 1-D families, which need nothing."""
        return None

    def position_ids(self, input_ids: Tensor, attention_mask: Tensor, images: list[list[Any]]) -> Tensor:
        """(B, T) position ids of a left-padded, expanded batch: consecutive over each sample's tokens, padding 0.

        ``images``: per sample, :meth:`image_positions` of each of its images, in prompt order.
        """
        return (attention_mask.cumsum(-1) - 1).clamp_min(0)

    def encode_needed_tiles(self, tokens: MultiScaleTokens, tiles: Tensor,
                            selection: TokenSelection) -> tuple[Tensor, Tensor]:
        """Lazy tiles, for families with ``needed_tiles(tokens, index) -> (T,) bool`` and ``_tower(pixels)``:
        (G, T, P, D) features of the tiles (G, T, 3, s, s) that the kept tokens read (zeros elsewhere), and the
        (G, T) bool of those tiles."""
        need = torch.stack([self.needed_tiles(tokens, selection.index[g, : int(selection.count[g])])
                            for g in range(tiles.shape[0])])
        features = torch.zeros(*need.shape, self.grid**2, tokens.dim, dtype=tokens.features.dtype,
                               device=tokens.device)
        if bool(need.any()):
            features[need] = self._tower(tiles[need])[0].to(features.dtype)
        return features, need

    @staticmethod
    def with_top_view(pyramid: MultiScaleTokens, top: Tensor, grid: int,
                      top_attention: Tensor | None = None) -> MultiScaleTokens:
        """``pyramid`` (levels pooled from a level-0 grid, in the language model's space) with one more level on
        top: a whole-image view (G, grid * grid, D) (LLaVA-NeXT's base view, InternVL's thumbnail), its cells in
        level-0 pixels; the view's attention (G, grid * grid) joins the pyramid's where both have one."""
        height, width = pyramid.image_size
        h0, w0 = pyramid.level_shapes[0]
        shapes = (*pyramid.level_shapes, (grid, grid))
        cells = tuple((height / h0 * 2**lvl, width / w0 * 2**lvl) for lvl in range(pyramid.num_levels))
        cells = (*cells, (height / grid, width / grid))
        layout = token_layout(shapes, pyramid.image_size, cells, device=top.device)
        features = torch.cat([top, pyramid.features], dim=1)
        row = None
        if top_attention is not None and pyramid.attention is not None:
            row = torch.cat([top_attention, pyramid.attention], dim=1)
        # the features are the language model's inputs (after the projector): their own embeddings
        return MultiScaleTokens(features, **layout, level_shapes=shapes, image_size=pyramid.image_size,
                                attention=row, embeddings=features)

    @staticmethod
    def kept_rows(features: Tensor, selection: TokenSelection,
                  project: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """(G, N, D) features -> (G, K, D') the kept tokens through ``project`` (identity by default), aligned
        with ``selection.index``; the selection's ``kept_embeddings`` where the allocator rewrote them (they
        already are the language model's inputs)."""
        if selection.kept_embeddings is not None:
            return selection.kept_embeddings
        kept = torch.gather(features, 1, repeat(selection.index, "g k -> g k d", d=features.shape[-1]))
        return kept if project is None else project(kept)

    @staticmethod
    def gather_kept(features: Tensor, selection: TokenSelection,
                    project: Callable[[Tensor], Tensor] | None = None, cls: Tensor | None = None) -> list[Tensor]:
        """(G, N, D) features -> G (C_g + K_g + M_g, D') tensors: the [CLS] token where the selection sends it
        (``cls``: (G, D), the images' [CLS] features in the same space), the kept tokens in canonical order
        (:meth:`kept_rows`), then the merged ones, all through ``project`` (identity by default)."""
        if selection.cls is not None and bool(selection.cls.any()) and cls is None:
            raise ValueError("the selection sends the [CLS] token to the language model, but this family's tokens "
                             "carry no [CLS] feature to send (VisionZip: use cls: false)")
        parts = {"kept": Family.kept_rows(features, selection, project)}
        counts = {"kept": selection.count.tolist()}
        more = {}
        if selection.cls is not None:
            more["cls"] = rearrange(cls, "g d -> g 1 d").to(features.dtype)
            counts["cls"] = selection.cls.long().tolist()
        if selection.merged is not None:
            more["merged"] = selection.merged.features.to(features.dtype)
            counts["merged"] = selection.merged.count.tolist()
        parts.update({name: part if project is None else project(part) for name, part in more.items()})
        order = [name for name in ("cls", "kept", "merged") if name in parts]
        rows = [[parts[name][g, : counts[name][g]] for name in order] for g in range(selection.batch_size)]
        return [row[0] if len(row) == 1 else torch.cat(row) for row in rows]

    # -- shared helpers -------------------------------------------------------------------------------
    @staticmethod
    def _pil(image: Image.Image | Tensor) -> Image.Image | None:
        return image.convert("RGB") if isinstance(image, Image.Image) else None

    @staticmethod
    def _check_tensor(image: Tensor) -> Tensor:
        if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be (3, H, W) in [0, 1], got {getattr(image, 'shape', image)}")
        if not image.is_floating_point() or bool(image.isnan().any()):
            raise ValueError("an image tensor must be floating point in [0, 1] without NaN")
        low, high = float(image.min()), float(image.max())
        # A 0-255 or mean/std-normalised tensor would be normalised again by the model's statistics and
        # silently give wrong answers; the small margin admits resampling overshoot.
        if low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(f"an image tensor must be in [0, 1], got values in [{low:.4g}, {high:.4g}] "
                             "(divide 0-255 images by 255)")
        return image.float()


FAMILIES: Registry[Family] = Registry("family", Family)
"""Model families by the architectures (``*ForConditionalGeneration`` class names) they run."""


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: make a family reachable by the architectures it lists."""
    for architecture in cls.architectures:
        FAMILIES.add(architecture, cls)
    return cls


def supported_architectures() -> list[str]:
    """The ``*ForConditionalGeneration`` classes pyrtok runs, sorted."""
    return FAMILIES.available()


def family_for(model_or_config: Any) -> type[Family]:
    """The family of a loaded model, or of a config (by ``config.architectures``).

    Raises:
        TypeError (a model) or ValueError (a config): naming the architecture and listing the supported ones.
    """
    if isinstance(model_or_config, nn.Module):
        names = [type(model_or_config).__name__]
    else:
        names = list(getattr(model_or_config, "architectures", None) or [])
    for name in names:
        if name in FAMILIES:
            return FAMILIES.get(name)  # type: ignore[return-value]
    shown = names[0] if names else f"a config of model_type {getattr(model_or_config, 'model_type', None)!r}"
    error = TypeError if isinstance(model_or_config, nn.Module) else ValueError
    raise error(f"pyrtok does not support {shown}; supported architectures: {supported_architectures()}")


def unnormalise(pixel_values: Tensor, mean: Any, std: Any) -> Tensor:
    """(..., 3, H, W) normalised pixels -> [0, 1] pixels, by the processor's mean and std."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=pixel_values.device).view(3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=pixel_values.device).view(3, 1, 1)
    return (pixel_values.float() * std + mean).clamp(0, 1)

