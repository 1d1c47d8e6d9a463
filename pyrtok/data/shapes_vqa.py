"""A procedural VQA benchmark where token allocation matters: big shapes, small glyphs, tiny marks.

Each 224 x 224 scene has a textured background, one to four large shapes (coarse content), a small label
with a digit or a letter and one or two tiny coloured dots (fine content). Every scene yields one
question of each family, answered with one word:

- ``coarse``: the colour or the shape of a large object ("what colour is the big circle?");
- ``fine``: the digit or letter on the small label, or the colour of the tiny dot;
- ``counting``: how many large shapes of a kind there are ("0" to "4");
- ``spatial``: whether one large object is left of / above another ("yes" / "no");
- ``existence``: POPE-like, balanced yes/no about a large object, half of them absent; the absent
  ones are ``random`` (a colour and shape not in the scene) or ``adversarial`` (shares its colour or its
  shape with something that is there).

Everything is a pure function of (seed, split, index), so splits are regenerated identically on
demand; :func:`write_split` stores a split in the local JSONL + PNG format.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = [
    "ANSWERS",
    "COLOURS",
    "FAMILIES",
    "SCENE_LABELS",
    "SHAPES",
    "SPLITS",
    "Scene",
    "make_scene",
    "object_name",
    "patch_targets",
    "questions_for",
    "samples",
    "scene_labels",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 210), "yellow": (240, 215, 30),
    "purple": (148, 60, 189), "orange": (255, 127, 14), "white": (245, 245, 245), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond")
DIGITS = "0123456789"
LETTERS = "ABCDEFGHKLMNPRSTUVWXYZ"
FAMILIES = ("coarse", "fine", "counting", "spatial", "existence")
SPLITS = {"train": 0, "validation": 1, "test": 2}
# A 3 x 3 binomial-like blur (about a 0.4 px Gaussian): softens the drawn edges like a camera would.
_SOFTEN = ImageFilter.Kernel((3, 3), (1, 4, 1, 4, 32, 4, 1, 4, 1))
ANSWERS = sorted({*COLOURS, *SHAPES, *DIGITS, *(c.lower() for c in LETTERS), "yes", "no"})


@dataclass
class Thing:
    shape: str
    colour: str
    centre: tuple[float, float]
    size: float


@dataclass
class Scene:
    """A rendered scene and what is in it."""

    image: Image.Image
    objects: list[Thing]
    glyph: str
    label_box: tuple[int, int, int, int]
    dots: list[Thing] = field(default_factory=list)


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], index]))


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    base = (rng.uniform(0.3, 0.7, size=3) * 0.6 + rng.uniform(0.3, 0.7) * 0.4).astype(np.float32)
    coarse = rng.normal(0, 1, size=(6, 6, 3))
    coarse = Image.fromarray(((coarse * 0.5 + 0.5).clip(0, 1) * 255).astype(np.uint8))
    coarse = coarse.resize((size, size), Image.BICUBIC)
    grain = rng.standard_normal((size, size, 1), dtype=np.float32) * np.float32(0.03)
    stripes = 0.04 * np.sin(np.arange(size) * rng.uniform(0.3, 0.9) + rng.uniform(0, 6.3))
    pixels = np.asarray(coarse, dtype=np.float32) * np.float32(0.18 / 255) + (base - 0.09)
    pixels += grain
    pixels += stripes.astype(np.float32)[None, :, None]
    return Image.fromarray((pixels.clip(0, 1) * 255).astype(np.uint8))


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]  # diamond


def _draw(draw: ImageDraw.ImageDraw, thing: Thing, colour: tuple[int, int, int] | int | None = None) -> None:
    cx, cy = thing.centre
    r = thing.size / 2
    colour = COLOURS[thing.colour] if colour is None else colour
    if thing.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon(_polygon(thing.shape, cx, cy, r), fill=colour)


def _free(centre: tuple[float, float], radius: float, taken: list[tuple[float, float, float]]) -> bool:
    return all(math.hypot(centre[0] - x, centre[1] - y) > radius + r + 4 for x, y, r in taken)


def make_scene(seed: int, split: str, index: int, size: int = 224) -> Scene:
    """Render scene ``index`` of ``split``; the same arguments always give the same pixels."""
    rng = _rng(seed, split, index)
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    taken: list[tuple[float, float, float]] = []
    objects: list[Thing] = []
    colours = [str(c) for c in rng.permutation(list(COLOURS))]
    for k in range(int(rng.integers(1, 5))):
        thing_size = float(rng.uniform(0.2, 0.34) * size)
        for _ in range(50):
            centre = (float(rng.uniform(thing_size / 2 + 4, size - thing_size / 2 - 4)),
                      float(rng.uniform(thing_size / 2 + 4, size - thing_size / 2 - 4)))
            if _free(centre, thing_size / 2, taken):
                thing = Thing(str(rng.choice(SHAPES)), colours[k], centre, thing_size)
                objects.append(thing)
                taken.append((*centre, thing_size / 2))
                _draw(draw, thing)
                break
    glyph = str(rng.choice(list(DIGITS + LETTERS)))
    label_side = int(size * 0.1)
    for _ in range(200):
        lx, ly = (int(v) for v in rng.integers(2, size - label_side - 2, size=2))
        if _free((lx + label_side / 2, ly + label_side / 2), label_side * 0.75, taken):
            break
    label_box = (lx, ly, lx + label_side, ly + label_side)
    draw.rectangle(label_box, fill=(250, 250, 250), outline=(40, 40, 40))
    font = ImageFont.load_default(size=int(label_side * 0.8))
    draw.text((lx + label_side / 2, ly + label_side / 2), glyph, fill=(0, 0, 0), font=font, anchor="mm")
    taken.append((lx + label_side / 2, ly + label_side / 2, label_side * 0.75))
    dots: list[Thing] = []
    for _ in range(int(rng.integers(1, 3))):
        radius = float(rng.uniform(0.012, 0.018) * size)
        for _ in range(100):
            centre = tuple(float(v) for v in rng.uniform(radius + 2, size - radius - 2, size=2))
            if _free(centre, radius, taken):
                used = {d.colour for d in dots}
                dot = Thing("circle", str(rng.choice([c for c in COLOURS if c not in used])), centre, 2 * radius)
                dots.append(dot)
                taken.append((*centre, radius))
                _draw(draw, dot)
                break
    image = image.filter(_SOFTEN)
    return Scene(image, objects, glyph, label_box, dots)


TARGETS = {"colour": len(COLOURS) + 1, "shape": len(SHAPES) + 1, "glyph": len(DIGITS + LETTERS) + 1,
           "dot": len(COLOURS) + 1}


def patch_targets(scene: Scene, patch: int = 16, cover: float = 0.3) -> dict[str, np.ndarray]:
    """Dense per-patch labels of a scene, for supervising a vision tower on what each patch shows.

    Args:
        scene: a scene from :func:`make_scene`.
        patch: patch side in pixels; the image side must be a multiple of it.
        cover: fraction of a patch an object or the label must cover to count as its content.

    Returns:
        ``{name: (G, G) int64}`` for the names in :data:`TARGETS`, 0 meaning "none": ``colour`` and ``shape``
        (1 + index in :data:`COLOURS` / :data:`SHAPES`) of the large object covering the patch, ``glyph``
        (1 + index in digits then letters) where the small label covers it, ``dot`` (1 + colour index) at the
        patch holding a tiny dot's centre.
    """
    size = scene.image.size[0]
    if size % patch:
        raise ValueError(f"patch must divide the image side {size}, got {patch}")
    grid = size // patch
    ids = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(ids)
    for k, thing in enumerate(scene.objects):
        _draw(draw, thing, k + 1)
    draw.rectangle(scene.label_box, fill=255)
    pixels = np.asarray(ids).reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid, grid, -1)
    colours, shapes = list(COLOURS), list(SHAPES)
    out = {name: np.zeros((grid, grid), dtype=np.int64) for name in TARGETS}
    for k, thing in enumerate(scene.objects):
        covered = (pixels == k + 1).mean(-1) >= cover
        out["colour"][covered] = colours.index(thing.colour) + 1
        out["shape"][covered] = shapes.index(thing.shape) + 1
    out["glyph"][(pixels == 255).mean(-1) >= cover] = (DIGITS + LETTERS).index(scene.glyph) + 1
    for dot in scene.dots:
        row, col = (min(int(v // patch), grid - 1) for v in dot.centre[::-1])
        out["dot"][row, col] = colours.index(dot.colour) + 1
    return out


SCENE_LABELS: tuple[str, ...] = (
    *(f"colour {c}" for c in COLOURS), *(f"shape {s}" for s in SHAPES),
    *(f"object {c} {s}" for c in COLOURS for s in SHAPES), *(f"dot {c}" for c in COLOURS),
    *(f"glyph {g.lower()}" for g in DIGITS + LETTERS),
)
"""The image-level labels of a scene (:func:`scene_labels`): which colours, shapes and (colour, shape) objects
its large objects show, which colours its tiny dots have, and which glyph its label bears."""


def scene_labels(scene: Scene) -> np.ndarray:
    """(len(SCENE_LABELS),) float32 multi-hot vector of what ``scene`` holds, in :data:`SCENE_LABELS` order.

    A whole-image target (the answer to "what is in this picture?"), for training a tower's [CLS] token.

    Example:
        >>> scene = make_scene(0, "train", 0)
        >>> labels = scene_labels(scene)
        >>> labels.shape == (len(SCENE_LABELS),), labels[SCENE_LABELS.index(f"glyph {scene.glyph.lower()}")]
        (True, np.float32(1.0))
    """
    present = {f"colour {o.colour}" for o in scene.objects} | {f"shape {o.shape}" for o in scene.objects}
    present |= {f"object {o.colour} {o.shape}" for o in scene.objects} | {f"dot {d.colour}" for d in scene.dots}
    present.add(f"glyph {scene.glyph.lower()}")
    return np.array([name in present for name in SCENE_LABELS], dtype=np.float32)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_name(thing: Thing, objects: list[Thing]) -> str:
    """The shortest unambiguous description of a large object among ``objects``, as the questions name it."""
    if sum(o.shape == thing.shape for o in objects) == 1:
        return f"big {thing.shape}"
    return f"{thing.colour} {thing.shape}"


def questions_for(scene: Scene, seed: int, split: str, index: int) -> list[dict[str, str]]:
    """One question per family: dicts with ``question``, ``answer``, ``family``, ``category``."""
    rng = _rng(seed + 7919, split, index)
    objects = scene.objects
    out = []
    thing = objects[int(rng.integers(len(objects)))]
    if rng.random() < 0.5 and sum(o.shape == thing.shape for o in objects) == 1:
        out.append({"question": f"what colour is the big {thing.shape}?", "answer": thing.colour,
                    "category": "colour"})
    else:
        out.append({"question": f"what shape is the big {thing.colour} object?", "answer": thing.shape,
                    "category": "shape"})
    if rng.random() < 0.6:
        kind = "digit" if scene.glyph in DIGITS else "letter"
        out.append({"question": f"what {kind} is on the small label?", "answer": scene.glyph.lower(),
                    "category": f"label {kind}"})
    else:
        dot = scene.dots[int(rng.integers(len(scene.dots)))] if len(scene.dots) == 1 else None
        if dot is None:
            dot = min(scene.dots, key=lambda d: d.centre[0])
            question = "what colour is the leftmost tiny dot?"
        else:
            question = "what colour is the tiny dot?"
        out.append({"question": question, "answer": dot.colour, "category": "dot colour"})
    shape = str(rng.choice(SHAPES))
    count = sum(o.shape == shape for o in objects)
    out.append({"question": f"how many {shape}s are there?", "answer": str(count), "category": "count"})
    if len(objects) >= 2:
        a, b = (objects[int(i)] for i in rng.choice(len(objects), size=2, replace=False))
        dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
        if abs(dx) >= abs(dy):
            question = f"is the {object_name(a, objects)} left of the {object_name(b, objects)}?"
            answer = "yes" if dx < 0 else "no"
        else:
            question = f"is the {object_name(a, objects)} above the {object_name(b, objects)}?"
            answer = "yes" if dy < 0 else "no"
        out.append({"question": question, "answer": answer, "category": "relation"})
    else:
        only = objects[0]
        side = "left" if only.centre[0] < scene.image.size[0] / 2 else "right"
        asked = str(rng.choice(["left", "right"]))
        out.append({"question": f"is the {object_name(only, objects)} on the {asked} side?",
                    "answer": "yes" if asked == side else "no", "category": "side"})
    present = {(o.colour, o.shape) for o in objects}
    if rng.random() < 0.5:
        colour, shape = sorted(present)[int(rng.integers(len(present)))]
        out.append({"question": f"is there {_article(colour)} {colour} {shape}?", "answer": "yes",
                    "category": "present"})
    else:
        adversarial = rng.random() < 0.5
        colours_here = {c for c, _ in present}
        shapes_here = {s for _, s in present}
        candidates = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present
                      and ((c in colours_here or s in shapes_here) == adversarial)]
        if not candidates:
            adversarial = not adversarial
            candidates = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        colour, shape = candidates[int(rng.integers(len(candidates)))]
        category = "absent adversarial" if adversarial else "absent random"
        out.append({"question": f"is there {_article(colour)} {colour} {shape}?", "answer": "no",
                    "category": category})
    for family, item in zip(FAMILIES, out, strict=True):
        item["family"] = family
    return out


def samples(split: str, num_images: int, seed: int = 0, size: int = 224) -> Iterator[tuple[int, Scene, list[dict]]]:
    """Yield ``(index, scene, questions)`` for the first ``num_images`` scenes of ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    for index in range(num_images):
        scene = make_scene(seed, split, index, size)
        yield index, scene, questions_for(scene, seed, split, index)
