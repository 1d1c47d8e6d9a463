"""Model families: one small module per VLM family on the adapter core (see :mod:`pyrtok.vlm.families.base`).

    >>> from pyrtok.vlm.families import supported_architectures
    >>> supported_architectures()  # doctest: +NORMALIZE_WHITESPACE
    ['Gemma3ForConditionalGeneration', 'InternVLForConditionalGeneration', 'LlavaForConditionalGeneration',
     'LlavaNextForConditionalGeneration', 'LlavaOnevisionForConditionalGeneration',
     'Qwen2VLForConditionalGeneration', 'Qwen2_5_VLForConditionalGeneration', 'Qwen3VLForConditionalGeneration']
"""

from pyrtok.vlm.families import gemma3, internvl, llava, llava_next, qwen  # noqa: F401  (registration)
from pyrtok.vlm.families.base import FAMILIES, Encoded, Family, family_for, register_family, supported_architectures

__all__ = ["FAMILIES", "Encoded", "Family", "family_for", "register_family", "supported_architectures"]
