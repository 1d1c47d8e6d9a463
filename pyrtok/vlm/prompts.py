"""Prompts: the model's chat template around a question, and prompts expanded to the kept tokens.

Each image marker of a prompt (``<image>``, ``<|image_pad|>``, ...) stands for one image; :func:`expand`
tokenises a batch of prompts, replaces marker j of prompt b with that image's run (the marker once per
placeholder the image takes: its kept tokens, merged tokens and layout tokens, with any text its family writes
around them), and left-pads the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["chat_prompt", "check_prompt", "count_markers", "expand"]


def chat_prompt(processor: Any, image_token: str, question: str, images: int = 1) -> str:
    """A prompt asking ``question`` about ``images`` images (0 for a text-only prompt) in the processor's own
    chat template; a processor without one gets LLaVA-1.5's ``USER: <image>\\n{question} ASSISTANT:``."""
    if isinstance(images, bool) or not isinstance(images, int) or images < 0:
        raise ValueError(f"images must be an int >= 0, got {images!r}")
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    template = getattr(processor, "chat_template", None)
    if template:
        content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return "USER: " + f"{image_token}\n" * images + f"{question} ASSISTANT:"


def count_markers(tokenizer: Any, marker: int, prompt: str) -> int:
    """How many image markers (token id ``marker``) ``prompt`` holds."""
    return tokenizer(prompt, add_special_tokens=True)["input_ids"].count(marker)


def check_prompt(tokenizer: Any, marker: int, marker_text: str, prompt: str, images: int = 1,
                 argument: str = "prompt") -> None:
    """Raise a ValueError naming ``argument`` unless ``prompt`` holds the image marker once per image."""
    if not isinstance(prompt, str):
        raise TypeError(f"{argument} must be a str, got {type(prompt).__name__}")
    found = count_markers(tokenizer, marker, prompt)
    if found != images:
        raise ValueError(f"{argument} must hold the image marker {marker_text!r} {images} time(s), found {found}: "
                         f"{prompt!r}")


def expand(tokenizer: Any, marker: int, marker_text: str, prompts: Sequence[str], placeholders: list[list[int]],
           device: torch.device, run: Callable[[int], list[int]] | None = None,
           text: Callable[[int, Any], str | None] | None = None,
           views: list[list[Any]] | None = None) -> tuple[Tensor, Tensor]:
    """Tokenise ``prompts``, expanding image marker j of prompt b to ``run(placeholders[b][j])`` (by default
    ``placeholders[b][j]`` copies of the marker), or, where ``text`` gives one, replacing the marker's text with
    ``text(placeholders[b][j], views[b][j])`` before tokenising (as processors that expand it as text do;
    ``views``: per image, how its placeholders split over the views it is shown as, or None); left-pad.

    Returns:
        input_ids, attention_mask: (B, T).
    """
    rows = []
    for b, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{b}] must be a str, got {type(prompt).__name__}")
        split = views[b] if views is not None else [None] * len(placeholders[b])
        runs = [None if text is None else text(count) if parts is None else text(count, parts)
                for count, parts in zip(placeholders[b], split, strict=True)]
        if runs and all(r is not None for r in runs):
            pieces = prompt.split(marker_text)
            if len(pieces) != len(runs) + 1:
                raise ValueError(f"prompts[{b}] must hold the image marker {marker_text!r} once per image "
                                 f"({len(runs)}), found {len(pieces) - 1}: {prompt!r}")
            expanded = pieces[0] + "".join(r + piece for r, piece in zip(runs, pieces[1:], strict=True))
            rows.append(tokenizer(expanded, add_special_tokens=True)["input_ids"])
            continue
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        at = [k for k, token in enumerate(ids) if token == marker]
        if len(at) != len(placeholders[b]):
            raise ValueError(f"prompts[{b}] must hold the image marker {marker_text!r} once per image "
                             f"({len(placeholders[b])}), found {len(at)}: {prompt!r}")
        row, last = [], 0
        for k, count in zip(at, placeholders[b], strict=True):
            row += ids[last:k] + (run(count) if run is not None else [marker] * count)
            last = k + 1
        rows.append(row + ids[last:])
    length = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows], device=device)
    attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], device=device)
    return input_ids, attention_mask
