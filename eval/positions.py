"""Where a model's answers get the image tokens' positions from: their features, or the language model's positions.

``pyrtok positions --model embedded-qwen`` measures two things on a shapes split:

- **In the features.** A ridge probe fitted on the level-0 tokens of the first share of ``--scenes`` images reads
  each token's row and column (as fractions of the grid) on the rest; it prints the held-out R^2 of each, and the
  share of the tokens' variance that their grid cell alone explains (the variance of the per-cell mean over the
  images, against the whole). The tokens are those the language model receives (``embeddings``: LLaVA's after
  its projector, Qwen's merged tokens), or the tower's features where a family gives no such projection.
- **Through the language model.** The per-family accuracy on ``--questions`` questions at full tokens, as the
  model answers them, and again with the language-model positions of each image's tokens permuted among
  themselves (``shuffle``) or all set to the first one's (``same``); the features stay as they are. A family
  whose accuracy survives both reads the positions it needs from the features; one that falls to chance reads
  them from the positions (1-D RoPE, or M-RoPE's (t, h, w) for the Qwen family).

Example (the tiny LLaVA's spatial family survives both: it reads where things are from the features)::

    pyrtok positions --model embedded --questions 1000 --modes none shuffle same
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pyrtok.data.shapes_vqa import SPLITS
from pyrtok.metrics import first_word_match
from pyrtok.tokens import MultiScaleTokens

__all__ = ["MODES", "lm_positions", "main", "position_signal", "scramble"]

MODES = ("none", "shuffle", "same")
"""What :func:`scramble` does to the positions of the image tokens: nothing, a permutation, or all the first's."""


def scramble(positions: Tensor, image: Tensor, mode: str, generator: torch.Generator | None = None) -> Tensor:
    """A copy of ``positions`` with those of each sample's image tokens changed as ``mode`` says.

    Args:
        positions: (B, T) position ids, or (3, B, T) M-RoPE ones (every axis moves together).
        image: (B, T) bool, the image tokens.
        mode: one of :data:`MODES`: ``none`` (unchanged), ``shuffle`` (a random permutation among each sample's
            image tokens, from ``generator``), ``same`` (every image token at its sample's first one's position).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if image.shape != positions.shape[-2:]:
        raise ValueError(f"image must be (B, T) = {tuple(positions.shape[-2:])}, got {tuple(image.shape)}")
    out = positions.clone()
    if mode == "none":
        return out
    for b in range(image.shape[0]):
        index = image[b].nonzero().squeeze(1)
        if index.numel() == 0:
            continue
        source = index[torch.randperm(index.numel(), generator=generator)] if mode == "shuffle" \
            else index[:1].expand_as(index)
        out[..., b, index] = positions[..., b, source.to(positions.device)]
    return out


@contextmanager
def lm_positions(vlm: Any, mode: str, seed: int = 0) -> Iterator[None]:
    """Within the block, ``vlm`` (a :class:`~pyrtok.vlm.PyramidVLM`) gives its language model the image tokens'
    positions changed by :func:`scramble` (``mode``, permutations from ``seed``); this ``vlm`` alone, restored on
    exit."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    family = vlm.family
    own = vars(family).get("position_ids")
    original = family.position_ids
    generator = torch.Generator().manual_seed(seed)

    def changed(input_ids: Tensor, attention_mask: Tensor, images: list[list[Any]]) -> Tensor:
        return scramble(original(input_ids, attention_mask, images), input_ids == family.image_token_id, mode,
                        generator)

    family.position_ids = changed
    try:
        yield
    finally:
        if own is None:
            del family.position_ids
        else:
            family.position_ids = own


def position_signal(tokens: MultiScaleTokens, fit: float = 2 / 3, ridge: float = 1e-3) -> dict[str, float]:
    """How strongly the level-0 tokens of same-size images carry their grid cell.

    Returns ``{"row_r2", "col_r2"}``, the held-out R^2 of a ridge probe (fitted on the first ``fit`` share of the
    images, tested on the rest) that reads the row and the column as fractions of the grid, and ``"cell_share"``,
    the share of the tokens' variance that the per-cell mean over all images explains.

    Args:
        tokens: B >= 3 images' tokens, all on one grid (``embeddings`` when present, else ``features``).
    """
    level0 = tokens.level_slices[0]
    features = tokens.embeddings if tokens.embeddings is not None else tokens.features
    x = features[:, level0].double()
    b, _, d = x.shape
    fitted = round(b * fit)
    if b < 3 or not 0 < fitted < b:
        raise ValueError(f"position_signal needs >= 3 images and fit in (0, 1) leaving some on each side, got {b} "
                         f"images and fit={fit}")
    h, w = tokens.level_shapes[0]
    where = torch.stack([tokens.row[level0] / max(h - 1, 1), tokens.col[level0] / max(w - 1, 1)], 1).double()
    x = x - x[:fitted].reshape(-1, d).mean(0)
    train, test = x[:fitted].reshape(-1, d), x[fitted:].reshape(-1, d)
    y_train, y_test = where.repeat(fitted, 1), where.repeat(b - fitted, 1)
    centre = y_train.mean(0)
    weights = torch.linalg.solve(train.T @ train + ridge * len(train) * torch.eye(d, dtype=x.dtype),
                                 train.T @ (y_train - centre))
    error = ((test @ weights + centre - y_test) ** 2).sum(0)
    r2 = 1 - error / ((y_test - y_test.mean(0)) ** 2).sum(0)
    centred = x - x.mean((0, 1))
    share = (centred.mean(0) ** 2).sum() / (centred ** 2).sum((1, 2)).mean()
    return {"row_r2": float(r2[0]), "col_r2": float(r2[1]), "cell_share": float(share)}


def _accuracy(vlm: Any, images: Tensor, items: list[dict], prompt: str | None, batch: int) -> dict[str, float]:
    """Per-family first-word exact match at full tokens, and ``overall``."""
    correct: dict[str, list[float]] = defaultdict(list)
    with torch.no_grad():
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            prompts = [vlm.chat_prompt(i["question"]) if prompt is None else prompt.format(question=i["question"])
                       for i in chunk]
            out = vlm.generate(images[start : start + batch], prompts, max_new_tokens=2)
            for item, text in zip(chunk, out.texts, strict=True):
                correct[item["family"]].append(first_word_match(text, [item["answer"]]))
    scores = {family: float(np.mean(v)) for family, v in sorted(correct.items())}
    return {"overall": float(np.mean([v for vs in correct.values() for v in vs])), **scores}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``pyrtok positions`` with ``argv`` (default: the command line); prints both tables and returns
    ``{"signal": position_signal(...), "accuracy": {mode: per-family accuracy}}``."""
    parser = argparse.ArgumentParser(prog="pyrtok positions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded", help="embedded, embedded-qwen, a folder or a hub id")
    parser.add_argument("--levels", type=int, default=3, help="pyramid levels (default 3)")
    parser.add_argument("--split", default="validation", choices=sorted(SPLITS))
    parser.add_argument("--seed", type=int, default=0, help="the benchmark seed (the split's scenes)")
    parser.add_argument("--scenes", type=int, default=96, help="images for the feature probe (default 96)")
    parser.add_argument("--questions", type=int, default=500, help="questions per mode (default 500; 0: none)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="position changes")
    parser.add_argument("--prompt", default=None,
                        help="a prompt with {question} (default: the model's chat template)")
    args = parser.parse_args(argv)
    if args.scenes < 3:
        parser.error(f"--scenes must be >= 3, got {args.scenes}")
    if args.questions < 0:
        parser.error(f"--questions must be >= 0, got {args.questions}")
    if args.prompt is not None and "{question}" not in args.prompt:
        parser.error(f"--prompt must contain {{question}}, got {args.prompt!r}")
    from pyrtok.data.conversations import scene_batch
    from pyrtok.vlm import PyramidVLM

    vlm = PyramidVLM.from_pretrained(args.model, levels=args.levels)
    images, _ = scene_batch(args.split, 0, args.scenes, 224, args.seed)
    with torch.no_grad():
        signal = position_signal(vlm.encode(images).tokens)
    print(f"features: row R^2 {signal['row_r2']:.3f}, column R^2 {signal['col_r2']:.3f}, "
          f"variance explained by the cell {signal['cell_share']:.1%} ({args.scenes} scenes)", flush=True)
    accuracy: dict[str, dict[str, float]] = {}
    if args.questions:
        images, items = scene_batch(args.split, 0, args.questions, 224, args.seed)
        families = sorted({i["family"] for i in items})
        print("| image positions | overall | " + " | ".join(families) + " |")
        print("| --- " * (len(families) + 2) + "|")
        for mode in args.modes:
            with lm_positions(vlm, mode, args.seed):
                scores = accuracy[mode] = _accuracy(vlm, images, items, args.prompt, 50)
            print(f"| {mode} | {100 * scores['overall']:.1f} | "
                  + " | ".join(f"{100 * scores.get(f, float('nan')):.1f}" for f in families) + " |", flush=True)
    return {"signal": signal, "accuracy": accuracy}


if __name__ == "__main__":
    main()
