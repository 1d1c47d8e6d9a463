"""Adapters that run a HuggingFace VLM on a :class:`~pyrtok.tokens.TokenSelection`."""

from pyrtok.vlm.adapter import PyramidVLM, VLMOutput
from pyrtok.vlm.tokenizer import word_tokenizer

__all__ = ["PyramidVLM", "VLMOutput", "word_tokenizer"]
