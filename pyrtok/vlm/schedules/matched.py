"""In-LLM schedules at the prefill FLOPs of a vision-side budget.

A vision-side allocator that keeps ``K`` image tokens costs ``llm_prefill_flops(text + K)`` in the language
model's prefill; an in-LLM schedule lets all ``N`` image tokens into the first layers and fewer into the later
ones, and costs the sum of its layers (:func:`pyrtok.vlm.decode.scheduled_flops`). Comparing the two at equal
token counts favours the schedule; comparing them at equal FLOPs is fair. :func:`matched_keep` finds the
``keep`` at which a schedule costs what a vision-side budget costs, or says that none can: the layers before
the first drop see every token, so below some budget no keep is cheap enough.

Example:
    >>> from types import SimpleNamespace
    >>> from pyrtok.vlm.schedules import create_schedule
    >>> cfg = SimpleNamespace(hidden_size=64, intermediate_size=256, num_hidden_layers=8,
    ...                       num_attention_heads=2, num_key_value_heads=1, vocab_size=100)
    >>> layer_tokens(create_schedule("fastv", layer=2, keep=0.25), 8, 84)
    [84, 84, 21, 21, 21, 21, 21, 21]
    >>> match = matched_keep(cfg, "fastv", {"layer": 2}, image_tokens=84, text_tokens=20, budget=28)
    >>> round(match.keep, 4), match.layer_tokens[:3], round(match.ratio, 3)  # 6 of 84 after layer 1
    (0.0714, [84, 84, 6], 0.988)
    >>> matched_keep(cfg, "fastv", {"layer": 2}, image_tokens=84, text_tokens=20, budget=4) is None
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pyrtok.vlm.decode import scheduled_flops
from pyrtok.vlm.flops import llm_prefill_flops
from pyrtok.vlm.schedules.base import SCHEDULES, Schedule

__all__ = ["MatchedSchedule", "layer_tokens", "matched_keep", "schedule_prefill_flops"]


@dataclass(frozen=True)
class MatchedSchedule:
    """A schedule whose prefill costs about what ``budget`` vision-side tokens cost.

    ``keep``: the schedule's option; ``layer_tokens``: image tokens each decoder layer sees; ``flops`` and
    ``budget_flops``: its prefill FLOPs and the vision-side budget's (one sample, ``text_tokens`` of text).
    """

    schedule: Schedule
    keep: float
    budget: int
    layer_tokens: list[int]
    flops: float
    budget_flops: float

    @property
    def ratio(self) -> float:
        """The schedule's FLOPs over the budget's (1.0: matched exactly)."""
        return self.flops / self.budget_flops


def layer_tokens(schedule: Schedule, num_layers: int, image_tokens: int) -> list[int]:
    """(num_layers,) the image tokens each decoder layer runs on when ``image_tokens`` enter the language model
    (a stage's ``layer`` is the first layer that runs on its kept tokens)."""
    counts = schedule.stage_counts(image_tokens)
    return [counts[sum(stage.layer <= layer for stage in schedule.stages)] for layer in range(num_layers)]


def schedule_prefill_flops(config: Any, schedule: Schedule | None, image_tokens: int, text_tokens: int) -> float:
    """Prefill FLOPs of one sample with ``text_tokens`` of text and ``image_tokens`` entering (no schedule: the
    plain prefill), by :func:`pyrtok.vlm.flops.llm_prefill_flops`'s convention."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if schedule is None:
        return llm_prefill_flops(text, text_tokens + image_tokens)
    per_layer = [text_tokens + n for n in layer_tokens(schedule, text.num_hidden_layers, image_tokens)]
    return float(scheduled_flops(text, torch.tensor([per_layer]))[0])


def matched_keep(config: Any, name: str, options: dict[str, Any], image_tokens: int, text_tokens: int,
                 budget: int) -> MatchedSchedule | None:
    """The schedule ``name`` (with ``options``, all but ``keep``) whose prefill FLOPs come closest to those of
    ``budget`` vision-side tokens, or None when even its smallest keep costs more than the budget.

    Every keep ``c / image_tokens`` (c = 1 .. image_tokens) is tried; of those costing at most the budget's
    FLOPs, the most expensive wins (ties: the smaller keep), so a matched schedule never gets more compute
    than the vision-side method it is compared with. The counts are the schedule's own rounding of that keep
    (:meth:`Schedule.stage_counts`), so pass ``keep`` on exactly as returned: a rounded copy may keep one
    token more or less.

    Raises:
        ValueError: ``options`` set ``keep``, ``budget`` is outside [0, image_tokens], or a stage sits deeper
        than the language model's layers.

    Args:
        config: the VLM's (or its language model's) config.
        name, options: a registered schedule and its options other than ``keep``.
        image_tokens: ``N``, the image tokens entering the language model (all of them, for the schedule).
        text_tokens: the prompt's text tokens.
        budget: ``K``, the vision-side budget in tokens (0 <= K <= N).
    """
    if "keep" in options:
        raise ValueError(f"options must not set keep (matched_keep chooses it), got {options!r}")
    if not 0 <= budget <= image_tokens:
        raise ValueError(f"budget must be between 0 and image_tokens ({image_tokens}) tokens, got {budget!r}")
    target = schedule_prefill_flops(config, None, budget, text_tokens)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    SCHEDULES.create(name, **options, keep=1.0).check_layers(text.num_hidden_layers)
    best: MatchedSchedule | None = None
    for count in range(1, image_tokens + 1):
        keep = count / image_tokens
        schedule = SCHEDULES.create(name, **options, keep=keep)
        flops = schedule_prefill_flops(config, schedule, image_tokens, text_tokens)
        if flops <= target and (best is None or flops > best.flops):
            best = MatchedSchedule(schedule, keep, budget, layer_tokens(schedule, text.num_hidden_layers,
                                                                        image_tokens), flops, target)
    return best


def _budget_tokens(text: str, image_tokens: int) -> int:
    """"0.11" -> 11% of the image tokens (rounded up, as allocators count); "9" -> 9 tokens."""
    from pyrtok.budget import budget_tokens

    value = float(text)
    if value <= 0 or (value > 1 and not value.is_integer()):
        raise ValueError(f"--budgets must be fractions in (0, 1] or whole token counts, got {text!r}")
    return int(value) if value > 1 else int(budget_tokens(value, image_tokens))


def main(argv: list[str] | None = None) -> None:
    """``pyrtok match-flops``: the keep of each in-LLM schedule at the prefill FLOPs of each vision-side budget."""
    import argparse

    import yaml
    from transformers import AutoConfig

    from pyrtok.embedded.models import resolve_model

    parser = argparse.ArgumentParser(
        prog="pyrtok match-flops",
        description="For each in-LLM schedule and vision-side budget, the keep whose prefill FLOPs come closest to "
                    "the budget's without exceeding them (pyrtok.vlm.schedules.matched).")
    parser.add_argument("--model", required=True, help="a model folder, hub id or embedded name (its config only)")
    parser.add_argument("--image-tokens", type=int, required=True, help="image tokens entering the language model")
    parser.add_argument("--text-tokens", type=int, required=True, help="text tokens of the prompt")
    parser.add_argument("--budgets", nargs="+", required=True,
                        help="fractions of the image tokens in (0, 1] (1: all of them) or token counts above 1")
    parser.add_argument("--schedule", action="append", required=True,
                        help="a schedule mapping without keep, YAML, e.g. '{name: fastv, layer: 1}' (repeatable)")
    args = parser.parse_args(argv)
    if args.image_tokens < 1 or args.text_tokens < 0:
        raise ValueError("--image-tokens must be >= 1 and --text-tokens >= 0")
    config = AutoConfig.from_pretrained(resolve_model(args.model))
    header = f"{'schedule':<36}{'budget':>8}{'keep (pass on as printed)':>28}{'FLOPs / budget':>16}"
    print(header + "   image tokens per layer")
    for spec in args.schedule:
        options = yaml.safe_load(spec)
        if not isinstance(options, dict) or "name" not in options:
            raise ValueError(f"--schedule must be a mapping with a name, got {spec!r}")
        name = options.pop("name")
        for text in args.budgets:
            budget = _budget_tokens(text, args.image_tokens)
            match = matched_keep(config, name, options, args.image_tokens, args.text_tokens, budget)
            label = f"{name} {options}"
            if match is None:
                print(f"{label:<36}{budget:>8}{'-':>28}{'-':>16}   none: the layers before the first drop cost more")
            else:
                print(f"{label:<36}{budget:>8}{match.keep!r:>28}{match.ratio:>16.3f}   {match.layer_tokens}")
