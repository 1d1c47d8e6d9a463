"""``pyrtok make-shapes``: write splits of the procedural shapes VQA benchmark in the local format, or its
existence questions as a POPE set for lmms-eval's own ``pope`` task (``--format pope``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm.auto import tqdm

from pyrtok._help import description
from pyrtok.data.local import write_split
from pyrtok.data.shapes_pope import write_pope
from pyrtok.data.shapes_vqa import FAMILIES, SPLITS, samples


def write_shapes(root: str | Path, split: str, questions: int, seed: int = 0, progress: bool = True) -> Path:
    """Write at least ``questions`` questions (one per family per scene) of ``split`` under ``root``."""
    root = Path(root)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    scenes = -(-questions // len(FAMILIES))

    def records():
        for index, scene, items in tqdm(samples(split, scenes, seed), total=scenes, desc=split, disable=not progress):
            image = Path("images") / split / f"{index:06d}.png"
            scene.image.save(root / image)
            for item in items:
                yield {"id": f"{split}-{index:06d}-{item['family']}", "image": str(image),
                       "question": item["question"], "answers": [item["answer"]], "category": item["family"],
                       "family": item["family"], "subcategory": item["category"], "task": "shapes_vqa",
                       "seed": seed}

    return write_split(root, split, records())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pyrtok make-shapes", description=description(__doc__))
    parser.add_argument("--out", default="data/shapes_vqa", help="folder to write into (default: %(default)s)")
    parser.add_argument("--splits", nargs="+", default=["validation", "test"], choices=sorted(SPLITS),
                        help="splits to write (default: validation test; --format pope takes one)")
    parser.add_argument("--questions", type=int, default=1000,
                        help="questions per split (local: 5 per scene; pope: one per scene; default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="benchmark seed: the same seed, split and index give the same scene "
                             "(default: %(default)s)")
    parser.add_argument("--format", choices=["local", "pope"], default="local",
                        help="local: every family as JSONL + PNG; pope: one existence question per scene as "
                             "parquet plus an lmms-eval task (pope_shapes) that includes lmms-eval's pope.yaml, "
                             "which needs the lmms extra and lmms-eval (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.format == "pope" and len(args.splits) != 1:
        parser.error(f"--format pope writes one task (pope_shapes) for one split; got --splits {args.splits}")
    for split in args.splits:
        if args.format == "pope":
            print(write_pope(args.out, split, args.questions, args.seed))
        else:
            print(write_shapes(args.out, split, args.questions, args.seed))
