"""A batch of samples as the adapter core holds it: images as users pass them, and the batch encoded once.

Images enter as users have them: a (B, 3, H, W) tensor in [0, 1], or B entries, each one image (a PIL image,
a file path, a (3, H, W) tensor), a list of images (one per image marker of the sample's prompt), or None /
an empty list for a sample without an image. :func:`per_sample` turns every form into one list per sample.

:class:`EncodedBatch` holds the encoding: images grouped by the size the model sees them at (each group
encoded in one pass), which sample each image belongs to, and the per-sample accounting (tokens, vision
FLOPs, kept counts) that tables report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from pyrtok.images import open_image
from pyrtok.tokens import MultiScaleTokens, TokenSelection
from pyrtok.vlm.families import Encoded

__all__ = ["EncodedBatch", "ImageInput", "Images", "per_sample"]

ImageInput = Image.Image | str | Path | Tensor
"""One image: a PIL image, an image file, or a (3, H, W) tensor in [0, 1]."""

Images = Tensor | Sequence[ImageInput | Sequence[ImageInput] | None]
"""A batch's images: a (B, 3, H, W) tensor, or one entry per sample (an image, a list of images, or None)."""


@dataclass
class EncodedBatch:
    """A batch encoded once, to be allocated and answered under several allocators or budgets.

    Attributes:
        owner: (I,) the sample each image belongs to, images in prompt order.
        groups: (image indices, :class:`~pyrtok.vlm.families.Encoded`) per pixel size, in order of first
            appearance.
        num_samples: B, samples without an image included.
        after: the selections whose deferred vision work this encoding holds (``PyramidVLM.complete``), or
            None for an encoding straight from ``PyramidVLM.encode``.
    """

    owner: list[int]
    groups: list[tuple[list[int], Encoded]]
    num_samples: int
    after: tuple[TokenSelection, ...] | None = None

    def completed_for(self, selections: Sequence[TokenSelection]) -> bool:
        """Whether this encoding already holds the deferred work of exactly these selections."""
        return self.after is not None and len(self.after) == len(selections) and \
            all(a is b for a, b in zip(self.after, selections, strict=True))

    @property
    def tokens(self) -> MultiScaleTokens:
        """(I, N, D) the tokens of a batch whose images all have one size (a single group)."""
        if len(self.groups) != 1:
            raise ValueError(f"this batch has {len(self.groups)} groups of image sizes; read .groups[k][1].tokens")
        return self.groups[0][1].tokens

    def subset(self, samples: Sequence[int]) -> EncodedBatch:
        """The encoding of some of the samples (renumbered in the given order)."""
        new_sample = {b: k for k, b in enumerate(samples)}
        keep = [i for i, b in enumerate(self.owner) if b in new_sample]
        new_index = {i: k for k, i in enumerate(sorted(keep, key=lambda i: (new_sample[self.owner[i]], i)))}
        owner = [0] * len(keep)
        for i, k in new_index.items():
            owner[k] = new_sample[self.owner[i]]
        groups = []
        for members, group in self.groups:
            chosen = [g for g, i in enumerate(members) if i in new_index]
            if chosen:
                rows = torch.tensor(chosen, device=group.pixels.device)
                groups.append(([new_index[members[g]] for g in chosen], group.rows(rows)))
        return EncodedBatch(owner, groups, len(samples))

    def num_tokens(self) -> list[int]:
        """(I,) tokens of each image."""
        counts = [0] * len(self.owner)
        for members, encoded in self.groups:
            for i in members:
                counts[i] = encoded.tokens.num_tokens
        return counts

    def sample_tokens(self) -> list[int]:
        """(B,) tokens of each sample's images together (0 for a sample without an image)."""
        return self._per_sample(self.num_tokens())

    def vision_flops(self) -> list[float]:
        """(B,) vision-tower FLOPs each sample's images cost (after :meth:`PyramidVLM.complete
        <pyrtok.vlm.PyramidVLM.complete>`, the deferred work included)."""
        flops = [0.0] * len(self.owner)
        for members, encoded in self.groups:
            for i, value in zip(members, encoded.flops.tolist(), strict=True):
                flops[i] = float(value)
        return self._per_sample(flops)

    def kept(self, selections: Sequence[TokenSelection]) -> list[int]:
        """(B,) visual tokens each sample keeps under ``selections`` (one per group; merged tokens included,
        layout tokens a family adds, such as LLaVA-NeXT's row newlines, not): what a budget fraction counts."""
        self.check(selections)
        kept = [0] * len(self.owner)
        for (members, _), chosen in zip(self.groups, selections, strict=True):
            for g, i in enumerate(members):
                kept[i] = int(chosen.total[g])
        return self._per_sample(kept)

    def check(self, selections: Sequence[TokenSelection]) -> None:
        """Raise a ValueError unless ``selections`` holds one selection per group, one row per image."""
        if len(selections) != len(self.groups):
            raise ValueError(f"selections holds {len(selections)} groups but the batch has {len(self.groups)}")
        for k, ((members, _), chosen) in enumerate(zip(self.groups, selections, strict=True)):
            if chosen.batch_size != len(members):
                raise ValueError(f"selections[{k}] holds {chosen.batch_size} images but its group has {len(members)}")

    def _per_sample(self, values: list[Any]) -> list[Any]:
        out = [type(values[0])(0) if values else 0] * self.num_samples
        for i, value in enumerate(values):
            out[self.owner[i]] += value
        return out


def per_sample(images: Images, argument: str = "images") -> list[list[Image.Image | Tensor]]:
    """Images as users pass them -> one list of images per sample (empty for a sample without an image);
    files are opened here, so an unreadable one is named with its entry."""
    if isinstance(images, Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{argument} must be a (B, 3, H, W) tensor in [0, 1], got {tuple(images.shape)}")
        return [[image] for image in images]
    if isinstance(images, (Image.Image, str, Path)) or not isinstance(images, Sequence) or not len(images):
        raise TypeError(f"{argument} must be a (B, 3, H, W) tensor or a non-empty list with one entry per sample "
                        f"(an image, a list of images, or None), got {type(images).__name__}")
    samples = []
    for b, entry in enumerate(images):
        group = [] if entry is None else list(entry) if isinstance(entry, (list, tuple)) else [entry]
        samples.append([_load(image, f"{argument}[{b}]") for image in group])
    return samples


def _load(image: Any, name: str) -> Image.Image | Tensor:
    if isinstance(image, Tensor):
        return image
    if isinstance(image, (Image.Image, str, Path)):
        try:
            return open_image(image)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{name}: {error}") from None
    raise TypeError(f"{name} must be a PIL image, a file path or a (3, H, W) tensor, got {type(image).__name__}")
