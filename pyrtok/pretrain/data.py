"""Offline image data for pretraining: bundled photographs, scenes of the shapes VQA benchmark and user folders,
with random resized crops and flips.

Batches are a pure function of (seed, step, process index): no data-loader state, so a resumed run sees
exactly the batches an uninterrupted run would have seen, and processes of a multi-process run draw
disjoint streams without a sampler.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from pyrtok._training import step_generator
from pyrtok.images import image_tensor, open_image
from pyrtok.samples import available_samples, sample_image

__all__ = ["HELD_OUT_SAMPLES", "ImagePool", "random_resized_crop", "step_generator"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# Kept out of the default training pool, for evaluation on images the model has not seen.
HELD_OUT_SAMPLES = ("rocket", "grace_hopper", "coffee")


def random_resized_crop(
    image: Tensor,
    size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = True,
) -> Tensor:
    """A crop of random area fraction and aspect ratio, resized to ``size`` x ``size``, maybe flipped.

    Args:
        image: (3, H, W) in [0, 1].
        scale: range of the crop's area as a fraction of the image.
        ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.

    Returns:
        (3, size, size) in [0, 1].
    """
    _, height, width = image.shape
    area = height * width
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(1, generator=generator).item())
        log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(
            1, generator=generator
        ).item()
        aspect = math.exp(log_ratio)
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            break
    else:  # fall back to the largest square, at a random position
        w = h = min(height, width)
    top = int(torch.randint(height - h + 1, (1,), generator=generator))
    left = int(torch.randint(width - w + 1, (1,), generator=generator))
    crop = image[:, top : top + h, left : left + w].unsqueeze(0)
    crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    if hflip and bool(torch.rand(1, generator=generator) < 0.5):
        crop = crop.flip(-1)
    return crop.clamp(0, 1)


def _scene(seed: int, index: int) -> Tensor:
    from pyrtok.data.shapes_vqa import make_scene

    return image_tensor(make_scene(seed, "train", index).image)


def _load(path: Path) -> Tensor:
    return image_tensor(open_image(path))  # an unreadable file is named in the error


class ImagePool:
    """The images a run draws crops from.

    Args:
        samples: names of bundled photographs (``pyrtok.samples``); "all" for every available one except
            :data:`HELD_OUT_SAMPLES`.
        shapes: number of train-split scenes of the shapes VQA benchmark (:mod:`pyrtok.data.shapes_vqa`,
            224 px) to add, so that a tower pretrained here has seen the embedded benchmark's images.
        folders: folders of the user's own images (searched recursively for png/jpg/jpeg/bmp/webp).
        images: extra (3, H, W) tensors in [0, 1].
        max_side: images are shrunk so their longer side is at most this (keeps memory and crops sane).
        seed: the benchmark seed the shapes scenes are rendered with.
    """

    def __init__(
        self,
        samples: Sequence[str] | str = "all",
        folders: Sequence[str | Path] = (),
        images: Sequence[Tensor] = (),
        max_side: int = 512,
        shapes: int = 0,
        seed: int = 0,
    ) -> None:
        if isinstance(shapes, bool) or not isinstance(shapes, int) or shapes < 0:
            raise ValueError(f"shapes must be an int >= 0 (a number of scenes), got {shapes!r}")
        names = [n for n in available_samples() if n not in HELD_OUT_SAMPLES] if samples == "all" else list(samples)
        self.images: list[Tensor] = [self._shrink(sample_image(name), max_side) for name in names]
        self.images += [_scene(seed, index) for index in range(shapes)]
        for folder in folders:
            root = Path(folder)
            if not root.is_dir():
                raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
            paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not paths:
                raise ValueError(f"image folder {str(root)!r} holds no {'/'.join(IMAGE_SUFFIXES)} files")
            self.images += [self._shrink(_load(p), max_side) for p in paths]
        self.images += [self._shrink(im, max_side) for im in images]
        if not self.images:
            raise ValueError("the image pool is empty: name samples, shapes, folders or images")

    @staticmethod
    def _shrink(image: Tensor, max_side: int) -> Tensor:
        side = max(image.shape[-2:])
        if side <= max_side:
            return image
        size = (round(image.shape[-2] * max_side / side), round(image.shape[-1] * max_side / side))
        return F.interpolate(image.unsqueeze(0), size=size, mode="bilinear", antialias=True, align_corners=False)[0]

    def __len__(self) -> int:
        return len(self.images)

    def batch(
        self,
        batch_size: int,
        size: int,
        seed: int,
        step: int,
        rank: int = 0,
        scale: tuple[float, float] = (0.2, 1.0),
        hflip: bool = True,
    ) -> Tensor:
        """(batch_size, 3, size, size) crops, a deterministic function of (seed, step, rank)."""
        generator = step_generator(seed, step, rank, stream=0)
        picks = torch.randint(len(self.images), (batch_size,), generator=generator)
        return torch.stack(
            [random_resized_crop(self.images[int(i)], size, generator, scale=scale, hflip=hflip) for i in picks]
        )
