"""The adapter core and its model families: run a HuggingFace VLM on a :class:`~pyrtok.tokens.TokenSelection`."""

from pyrtok.vlm.adapter import PyramidVLM, VLMOutput
from pyrtok.vlm.families import family_for, supported_architectures
from pyrtok.vlm.tokenizer import word_tokenizer

__all__ = ["PyramidVLM", "VLMOutput", "family_for", "supported_architectures", "word_tokenizer"]
