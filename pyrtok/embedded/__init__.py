"""The embedded default model and everything that trains it (inference lives in :mod:`pyrtok.vlm`).

- :mod:`pyrtok.embedded.tokenizer`: the word-level tokenizer built offline from a word list (also used by
  :mod:`pyrtok.testing`'s tiny models of every family);
- :mod:`pyrtok.embedded.tiny`: the tiny VLMs' construction (LLaVA, Qwen2.5-VL: ``model.architecture``), their
  dense heads, and the two as one module;
- :mod:`pyrtok.embedded.train`: ``pyrtok train-vlm``, staged training on the shapes VQA benchmark;
- :mod:`pyrtok.embedded.export`: ``pyrtok export-vlm``, a checkpoint as a HF model folder;
- :mod:`pyrtok.embedded.models`: the shipped models by name (``embedded``, ``embedded-llava``, ``embedded-qwen``).
"""

from pyrtok.embedded.tokenizer import word_tokenizer

__all__ = ["word_tokenizer"]
