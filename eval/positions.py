"""Where a model's answers get the image tokens' positions from: their features, or the language model's positions.

``pyrtok positions --model embedded-qwen`` measures three things on a shapes split:

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
- **Which object a relation fetches.** For the relation questions ("is the A left of / above the B?") of the first
  ``--relations`` scenes, the share of the last prompt token's attention, per language-model layer and head, that
  falls on the level-0 tokens showing A (the subject) and on those showing B, and their asymmetry
  (A - B) / (A + B). A head that tells the subject from the other object has an asymmetry away from 0; a model
  whose every head fetches both alike cannot answer which way the relation goes.

Example (the tiny LLaVA's spatial family survives both: it reads where things are from the features)::

    pyrtok positions --model embedded --questions 1000 --modes none shuffle same
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pyrtok.data.shapes_vqa import COLOURS, FAMILIES, SPLITS, make_scene, object_name, patch_targets, questions_for
from pyrtok.images import image_tensor
from pyrtok.metrics import first_word_match
from pyrtok.tokens import MultiScaleTokens

__all__ = ["MODES", "eager_attention", "lm_positions", "main", "object_cells", "position_signal", "relation_attention",
           "scramble"]

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


RELATION = re.compile(r"is the (?P<subject>.+?) (?:left of|above) the (?P<other>.+)\?")
"""A relation question of the benchmark's spatial family, with the names of its two objects."""


@contextmanager
def eager_attention(vlm: Any) -> Iterator[None]:
    """``vlm``'s language model on the eager attention (the one that returns its weights), restored on exit;
    the vision tower is left as it is."""
    config = vlm.model.config
    text = getattr(config, "text_config", config)
    previous = text._attn_implementation
    vlm.model.set_attn_implementation({"text_config": "eager"})
    try:
        yield
    finally:
        vlm.model.set_attn_implementation({"text_config": previous})


def object_cells(scene: Any, thing: Any, grid: tuple[int, int]) -> Tensor:
    """(h * w,) bool, row-major: the cells of an ``h x w`` grid over ``scene`` that ``thing`` (one of its large
    objects) covers, as the tower's training targets mark them (:func:`~pyrtok.data.shapes_vqa.patch_targets`:
    at least 30% of the cell)."""
    size = scene.image.size[0]
    if grid[0] != grid[1] or size % grid[0]:
        raise ValueError(f"grid must be square and divide the scene's side {size}, got {grid}")
    colours = patch_targets(scene, size // grid[0])["colour"]
    return torch.from_numpy(colours == list(COLOURS).index(thing.colour) + 1).reshape(-1)


def relation_attention(
    vlm: Any, split: str = "validation", seed: int = 0, scenes: int = 200, prompt: str | None = None
) -> dict[str, Any]:
    """Where the last prompt token of a relation question looks: the subject, or the other named object.

    For every relation question among the spatial questions of the first ``scenes`` scenes of ``split``, asked at
    full tokens (``prompt`` with ``{question}``, default the model's chat template), the attention weights of the
    prompt's last token in every layer and head, summed over the level-0 image tokens that show each object
    (:func:`object_cells`).

    Returns ``{"questions": n, "subject": (L, H), "other": (L, H), "asymmetry": (L, H)}``: the mean shares, and
    the mean of (subject - other) / (subject + other) over the questions.
    """
    shares: dict[str, list[Tensor]] = {"subject": [], "other": []}
    family = vlm.family
    with eager_attention(vlm), torch.no_grad():
        for index in range(scenes):
            scene = make_scene(seed, split, index)
            spatial = questions_for(scene, seed, split, index)[FAMILIES.index("spatial")]
            match = RELATION.fullmatch(spatial["question"])
            if match is None:
                continue
            named = {object_name(o, scene.objects): o for o in scene.objects}
            prepared = vlm.prepare(image_tensor(scene.image)[None], [_ask(vlm, prompt, match.string)])
            tokens = prepared.encoded.tokens
            level0 = tokens.level_slices[0]
            kept = prepared.selections[0].index[0, : int(prepared.selections[0].count[0])]
            placeholders = (prepared.input_ids[0] == family.image_token_id).nonzero().squeeze(1)
            at_level0 = (kept >= level0.start) & (kept < level0.stop)
            out = vlm.model(**prepared.model_inputs(), output_attentions=True)
            last = torch.stack([a[0, :, -1] for a in out.attentions])  # (L, H, T)
            for key in shares:
                cells = object_cells(scene, named[match[key]], tokens.level_shapes[0])
                on = placeholders[at_level0][cells[kept[at_level0] - level0.start]]
                shares[key].append(last[..., on].sum(-1))
    if not shares["subject"]:
        raise ValueError(f"the first {scenes} scenes of {split!r} ask no relation question; give more scenes")
    subject, other = torch.stack(shares["subject"]), torch.stack(shares["other"])
    asymmetry = (subject - other) / (subject + other).clamp_min(1e-12)
    return {"questions": len(subject), "subject": subject.mean(0), "other": other.mean(0),
            "asymmetry": asymmetry.mean(0)}


def _ask(vlm: Any, prompt: str | None, question: str) -> str:
    """``question`` in ``prompt`` (with ``{question}``), or in the model's chat template when ``prompt`` is None."""
    return vlm.chat_prompt(question) if prompt is None else prompt.format(question=question)


def _heads(values: Tensor, sign: bool = False) -> str:
    return " ".join(f"{v:+.2f}" if sign else f"{v:.2f}" for v in values.tolist())


def _accuracy(vlm: Any, images: Tensor, items: list[dict], prompt: str | None, batch: int) -> dict[str, float]:
    """Per-family first-word exact match at full tokens, and ``overall``."""
    correct: dict[str, list[float]] = defaultdict(list)
    with torch.no_grad():
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            prompts = [_ask(vlm, prompt, i["question"]) for i in chunk]
            out = vlm.generate(images[start : start + batch], prompts, max_new_tokens=2)
            for item, text in zip(chunk, out.texts, strict=True):
                correct[item["family"]].append(first_word_match(text, [item["answer"]]))
    scores = {family: float(np.mean(v)) for family, v in sorted(correct.items())}
    return {"overall": float(np.mean([v for vs in correct.values() for v in vs])), **scores}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``pyrtok positions`` with ``argv`` (default: the command line); prints its tables and returns
    ``{"signal": position_signal(...), "accuracy": {mode: per-family accuracy}, "relations":
    relation_attention(...)}`` (empty where ``--questions`` or ``--relations`` is 0)."""
    parser = argparse.ArgumentParser(prog="pyrtok positions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded", help="embedded, embedded-qwen, a folder or a hub id")
    parser.add_argument("--levels", type=int, default=3, help="pyramid levels (default 3)")
    parser.add_argument("--split", default="validation", choices=sorted(SPLITS))
    parser.add_argument("--seed", type=int, default=0, help="the benchmark seed (the split's scenes)")
    parser.add_argument("--scenes", type=int, default=96, help="images for the feature probe (default 96)")
    parser.add_argument("--questions", type=int, default=500, help="questions per mode (default 500; 0: none)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="position changes")
    parser.add_argument("--relations", type=int, default=200,
                        help="scenes whose relation questions measure the attention (default 200; 0: none)")
    parser.add_argument("--prompt", default=None,
                        help="a prompt with {question} (default: the model's chat template)")
    args = parser.parse_args(argv)
    if args.scenes < 3:
        parser.error(f"--scenes must be >= 3, got {args.scenes}")
    if args.questions < 0:
        parser.error(f"--questions must be >= 0, got {args.questions}")
    if args.relations < 0:
        parser.error(f"--relations must be >= 0, got {args.relations}")
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
    relations: dict[str, Any] = {}
    if args.relations:
        try:
            relations = relation_attention(vlm, args.split, args.seed, args.relations, args.prompt)
        except ValueError as error:  # too few scenes to hold a relation question
            parser.error(f"--relations: {error}")
        print(f"attention of the last prompt token on a relation's two objects ({relations['questions']} questions; "
              "level-0 tokens, per head)")
        print("| layer | subject | other object | (subject - other) / (subject + other) |")
        print("| --- | --- | --- | --- |")
        for layer, (a, b, d) in enumerate(zip(relations["subject"], relations["other"], relations["asymmetry"],
                                               strict=True)):
            print(f"| {layer} | {_heads(a)} | {_heads(b)} | {_heads(d, sign=True)} |", flush=True)
    return {"signal": signal, "accuracy": accuracy, "relations": relations}


if __name__ == "__main__":
    main()
