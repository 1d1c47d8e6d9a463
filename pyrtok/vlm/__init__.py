"""The adapter core and its model families: run a HuggingFace VLM on a :class:`~pyrtok.tokens.TokenSelection`."""

from pyrtok.vlm.adapter import PyramidVLM, VLMOutput
from pyrtok.vlm.families import family_for, supported_architectures
from pyrtok.vlm.schedule import (
                                 Schedule,
                                 available_schedules,
                                 create_schedule,
                                 register_schedule,
                                 resolve_schedule,
                                 schedule_label,
)
from pyrtok.vlm.tokenizer import word_tokenizer

__all__ = ["PyramidVLM", "Schedule", "VLMOutput", "available_schedules", "create_schedule", "family_for",
           "register_schedule", "resolve_schedule", "schedule_label", "supported_architectures", "word_tokenizer"]
