"""The adapter core and its model families: run a HuggingFace VLM on a :class:`~pyrtok.tokens.TokenSelection`.

    >>> from pyrtok.vlm import FAMILIES, SCHEDULES
    >>> SCHEDULES.available(), len(FAMILIES.available())
    (['dart', 'fastv', 'pdrop', 'vscan'], 8)
"""

from pyrtok.vlm.adapter import Prepared, PyramidVLM, VLMOutput
from pyrtok.vlm.batch import EncodedBatch
from pyrtok.vlm.families import FAMILIES, family_for, supported_architectures
from pyrtok.vlm.schedules import (
    SCHEDULES,
    Schedule,
    available_schedules,
    create_schedule,
    register_schedule,
    resolve_schedule,
    schedule_label,
)

__all__ = ["FAMILIES", "SCHEDULES", "EncodedBatch", "Prepared", "PyramidVLM", "Schedule", "VLMOutput",
           "available_schedules", "create_schedule", "family_for", "register_schedule", "resolve_schedule",
           "schedule_label", "supported_architectures"]
