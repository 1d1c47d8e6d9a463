"""What the kept tokens cover of shapes scenes: the small label, the tiny dots, the large objects, per budget.

``pyrtok coverage --model embedded-qwen --allocators energy_diversity divprune --budgets 5 10`` keeps tokens
of the first ``--scenes`` scenes of a shapes split with each allocator at each budget, through the model's own
pixel path and the allocator exactly as the ablation harness runs them (:meth:`PyramidVLM.select`), and prints
one row per (allocator, budget):

- ``label`` and ``dots``: the share of labels and of tiny dots that a kept token of the finest level overlaps.
  Reading a glyph or a dot's colour needs that level; a coarser token averages a 3-8 px dot away.
- ``objects``: the share of large objects with a kept token of any level whose box centre lies on them.
- ``per level``: how the kept tokens split over the pyramid's levels, finest first.

It says where an allocator's fine-detail answers go before any question is asked: an allocator that never
keeps the dots cannot answer "what colour is the tiny dot?" from what it kept.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pyrtok.data.shapes_vqa import SPLITS, Scene, make_scene
from pyrtok.images import image_tensor
from pyrtok.tokens import MultiScaleTokens, TokenSelection

__all__ = ["KINDS", "Coverage", "content_boxes", "coverage", "main"]

KINDS = ("label", "dots", "objects")


@dataclass(frozen=True)
class Coverage:
    """Shares over a set of scenes: ``kinds`` maps each of :data:`KINDS` to the share of its items covered,
    ``levels`` holds the share of the kept tokens on each level (finest first), ``kept`` the mean kept count."""

    kinds: dict[str, float]
    levels: tuple[float, ...]
    kept: float


def content_boxes(scene: Scene, size: tuple[int, int] | None = None) -> dict[str, Tensor]:
    """``{kind: (K, 4) boxes (x0, y0, x1, y1)}`` of the scene's label, dots and large objects, in the pixels of
    an image of ``size`` (height, width; default: the scene's own)."""
    width, height = scene.image.size
    sy, sx = (1.0, 1.0) if size is None else (size[0] / height, size[1] / width)

    def around(things: Sequence) -> Tensor:
        boxes = [(t.centre[0] - t.size / 2, t.centre[1] - t.size / 2, t.centre[0] + t.size / 2,
                  t.centre[1] + t.size / 2) for t in things]
        return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)

    boxes = {"label": torch.tensor([scene.label_box], dtype=torch.float32), "dots": around(scene.dots),
             "objects": around(scene.objects)}
    return {kind: b * torch.tensor([sx, sy, sx, sy]) for kind, b in boxes.items()}


def _overlaps(items: Tensor, tokens: Tensor) -> Tensor:
    """(K,) whether each of (K, 4) ``items`` shares a positive area with any of (M, 4) ``tokens``."""
    x0 = torch.maximum(items[:, None, 0], tokens[None, :, 0])
    y0 = torch.maximum(items[:, None, 1], tokens[None, :, 1])
    x1 = torch.minimum(items[:, None, 2], tokens[None, :, 2])
    y1 = torch.minimum(items[:, None, 3], tokens[None, :, 3])
    return ((x1 > x0) & (y1 > y0)).any(1)


def _centred_on(items: Tensor, tokens: Tensor) -> Tensor:
    """(K,) whether the centre of any of (M, 4) ``tokens`` lies in each of (K, 4) ``items``."""
    cx, cy = (tokens[:, 0] + tokens[:, 2]) / 2, (tokens[:, 1] + tokens[:, 3]) / 2
    inside = (cx[None] >= items[:, None, 0]) & (cx[None] < items[:, None, 2]) & \
        (cy[None] >= items[:, None, 1]) & (cy[None] < items[:, None, 3])
    return inside.any(1)


def coverage(tokens: MultiScaleTokens, selection: TokenSelection, scenes: Sequence[Scene]) -> Coverage:
    """What ``selection`` (over ``tokens``, one image per scene) covers of ``scenes``."""
    if selection.index.shape[0] != len(scenes):
        raise ValueError(f"selection holds {selection.index.shape[0]} images, scenes {len(scenes)}")
    covered = {kind: [] for kind in KINDS}
    per_level = torch.zeros(tokens.num_levels)
    for b, scene in enumerate(scenes):
        kept = selection.index[b][selection.mask[b]].to(tokens.box.device)
        boxes, level = tokens.box[kept].float().cpu(), tokens.level[kept].cpu()
        per_level += torch.bincount(level, minlength=tokens.num_levels).float()
        items = content_boxes(scene, tokens.image_size)
        covered["label"].append(_overlaps(items["label"], boxes[level == 0]))
        covered["dots"].append(_overlaps(items["dots"], boxes[level == 0]))
        covered["objects"].append(_centred_on(items["objects"], boxes))
    shares = {kind: float(torch.cat(v).float().mean()) if v else float("nan") for kind, v in covered.items()}
    total = float(per_level.sum())
    return Coverage(shares, tuple((per_level / max(total, 1.0)).tolist()), total / max(len(scenes), 1))


def budget(text: str) -> int | float:
    """A token count (``"10"``) or a fraction of the tokens in (0, 1] (``"0.11"``)."""
    if text.strip().lstrip("+").isdigit():
        if int(text) < 1:
            raise argparse.ArgumentTypeError(f"a token count must be >= 1, got {text!r}")
        return int(text)
    value = float(text)  # argparse reports a ValueError as an invalid --budgets value
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a budget is a token count or a fraction in (0, 1], got {text!r}")
    return value


def main(argv: list[str] | None = None) -> list[dict]:
    """``pyrtok coverage`` with ``argv`` (default: the command line); prints the table and returns its rows."""
    parser = argparse.ArgumentParser(prog="pyrtok coverage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded", help="embedded, embedded-qwen, a folder or a hub id")
    parser.add_argument("--allocators", nargs="+", required=True, help="registered allocator names")
    parser.add_argument("--budgets", nargs="+", type=budget, required=True,
                        help="token counts, or fractions in (0, 1]")
    parser.add_argument("--levels", type=int, default=3, help="pyramid levels (default 3)")
    parser.add_argument("--split", default="validation", choices=sorted(SPLITS))
    parser.add_argument("--seed", type=int, default=0, help="the benchmark seed (the split's scenes)")
    parser.add_argument("--scenes", type=int, default=200, help="the first N scenes of the split (default 200)")
    args = parser.parse_args(argv)
    if args.scenes < 1:
        parser.error(f"--scenes must be >= 1, got {args.scenes}")
    from pyrtok.vlm import PyramidVLM

    scenes = [make_scene(args.seed, args.split, i) for i in range(args.scenes)]
    images = torch.stack([image_tensor(scene.image) for scene in scenes])
    rows = []
    print("| allocator | budget | kept | label | dots | objects | per level (finest first) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.allocators:
        vlm = PyramidVLM.from_pretrained(args.model, allocator=name, levels=args.levels)
        with torch.no_grad():
            encoded = vlm.encode(images)
            for amount in args.budgets:
                result = coverage(encoded.tokens, vlm.select(encoded, amount)[0], scenes)
                rows.append({"allocator": name, "budget": amount, "kept": result.kept, **result.kinds,
                             "levels": result.levels})
                levels = " / ".join(f"{share:.0%}" for share in result.levels)
                print(f"| {name} | {amount} | {result.kept:.1f} | {result.kinds['label']:.0%} | "
                      f"{result.kinds['dots']:.0%} | {result.kinds['objects']:.0%} | {levels} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
