"""Wall-clock timing that covers device work."""

from __future__ import annotations

import torch

__all__ = ["sync"]


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on CPU), so that a clock read next covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
