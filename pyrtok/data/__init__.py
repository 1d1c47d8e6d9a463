"""Procedural data (the shapes VQA benchmark) and the local VQA dataset format."""

from pyrtok.data.local import read_split, write_split
from pyrtok.data.shapes_vqa import ANSWERS, FAMILIES, make_scene, questions_for, samples

__all__ = ["ANSWERS", "FAMILIES", "make_scene", "questions_for", "read_split", "samples", "write_split"]
