"""Model sizes the benchmarks build (random weights, :func:`pyrtok.testing.build_vlm`), and their device options.

- ``toy``: seconds on a CPU; what the tests run, to keep every benchmark working.
- ``cpu``: sized for a 2-thread CPU: a CLIP ViT-B tower at 336 px (LLaVA's 576 patch tokens) with an 8-layer,
  1024-wide Llama; a Qwen2.5-VL-shaped 8-layer tower with a 4-layer, 1024-wide Qwen2 at 896 px (1,024 merged
  tokens).
- ``7b``: the real shapes: LLaVA-1.5-7B (CLIP ViT-L/14 at 336 px, a 32-layer, 4096-wide Llama: 7,062,902,784
  parameters), LLaVA-NeXT-7B (the same with 2 x 2 tiles of 336 px), Qwen2.5-VL-7B (a 32-block, 1280-wide tower
  with window attention, a 28-layer, 3584-wide Qwen2). On a GPU, in bfloat16.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pyrtok._extras import hint_for

__all__ = ["IMAGE_SIZES", "PRESETS", "SIZES", "add_device_arguments", "device_and_dtype", "interleaved", "model_kwargs",
           "run_script"]

SIZES = ("toy", "cpu", "7b")

_CLIP_B = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
           "image_size": 336, "patch_size": 14, "projection_dim": 768}
_CLIP_L = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
           "image_size": 336, "patch_size": 14, "projection_dim": 768}
_LLAMA_CPU = {"intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 32000}
_LLAMA_7B = {"intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}
_TILES = [[336, 336], [336, 672], [672, 336], [672, 672]]  # LLaVA-NeXT's pinpoints up to 2 x 2 tiles of 336 px

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "llava": {
        "toy": {"text_layers": 2, "hidden": 64, "vision_config": {"image_size": 112, "patch_size": 14}},
        "cpu": {"text_layers": 8, "hidden": 1024, "vision_config": _CLIP_B, "text_config": _LLAMA_CPU},
        "7b": {"text_layers": 32, "hidden": 4096, "vision_config": _CLIP_L, "text_config": _LLAMA_7B},
    },
    "llava_next": {
        "toy": {"text_layers": 2, "hidden": 64, "vision_config": {"image_size": 56, "patch_size": 14},
                "image_grid_pinpoints": [[56, 56], [56, 112], [112, 56], [112, 112]]},
        "cpu": {"text_layers": 8, "hidden": 1024, "vision_config": _CLIP_B, "text_config": _LLAMA_CPU,
                "image_grid_pinpoints": _TILES},
        "7b": {"text_layers": 32, "hidden": 4096, "vision_config": _CLIP_L, "text_config": _LLAMA_7B,
               "image_grid_pinpoints": _TILES},
    },
    "qwen2_5_vl": {
        "toy": {"text_layers": 2, "hidden": 64},
        "cpu": {"text_layers": 4, "hidden": 1024,
                "vision_config": {"depth": 8, "hidden_size": 640, "intermediate_size": 1728, "num_heads": 10,
                                  "window_size": 112, "fullatt_block_indexes": [3, 7]},
                "text_config": {"intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 2,
                                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                    "mrope_section": [8, 12, 12]}}},  # head_dim 64
        "7b": {"text_layers": 28, "hidden": 3584,
               "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                                 "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
               "text_config": {"intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4,
                               "vocab_size": 152064, "tie_word_embeddings": False,
                               "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                   "mrope_section": [16, 24, 24]}}},  # head_dim 128
    },
}
"""family -> size -> :func:`pyrtok.testing.build_vlm` keyword arguments."""

IMAGE_SIZES: dict[str, dict[str, tuple[int, int]]] = {
    "llava": {"toy": (112, 112), "cpu": (336, 336), "7b": (336, 336)},
    "llava_next": {"toy": (112, 112), "cpu": (672, 672), "7b": (672, 672)},  # 2 x 2 tiles
    "qwen2_5_vl": {"toy": (224, 224), "cpu": (896, 896), "7b": (896, 896)},  # 64 / 1,024 merged tokens
}
"""family -> size -> (height, width) of the benchmark image."""


def model_kwargs(family: str, size: str) -> dict[str, Any]:
    """The :func:`pyrtok.testing.build_vlm` keyword arguments of ``family`` at ``size`` (a copy)."""
    import copy

    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return copy.deepcopy(PRESETS[family][size])


def parse_case(text: str) -> tuple[int, int]:
    """"16x336" -> (16, 336): a batch of 16 RGB images of 336 x 336 (the image benchmarks' ``--cases``)."""
    parts = text.split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"a case is BxS (batch x side in pixels), got {text!r}")
    return int(parts[0]), int(parts[1])


def parse_cases(parser: argparse.ArgumentParser, texts: list[str],
                parse: Callable[[str], tuple[int, ...]] = parse_case) -> list[tuple[str, tuple[int, ...]]]:
    """Every ``--cases`` entry with what ``parse`` reads from it, all checked before any timing: a malformed
    entry ends the script with one argparse line naming ``--cases``."""
    try:
        return [(text, parse(text)) for text in texts]
    except ValueError as error:
        parser.error(f"--cases: {error}")


def add_device_arguments(parser: argparse.ArgumentParser, sizes: bool = True) -> None:
    """``--device`` (default: cuda when there is one), ``--dtype`` (default: bfloat16 on a GPU, float32 on a
    CPU) and, with ``sizes``, ``--size`` (one of :data:`SIZES`, default ``cpu``)."""
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on a GPU, float32 on a CPU")
    if sizes:
        parser.add_argument("--size", default="cpu", choices=SIZES,
                            help="toy (what the tests run), cpu (2 threads) or 7b (the real shapes)")


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """The device and dtype ``args`` asked for (see :func:`add_device_arguments`)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    default = "bfloat16" if device.type == "cuda" else "float32"
    return device, getattr(torch, args.dtype or default)


def interleaved(calls: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                every: dict[str, int] | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """Time every call once per round, the rounds interleaved so that background load reaches all of them alike.

    Returns name -> the minimum ms over the rounds it ran in (after one warm-up round), and name -> the peak
    MiB the device's allocator reached during its last run (a GPU; NaN elsewhere). ``every[name] = k`` runs
    that call only in timed rounds 1, 1 + k, 1 + 2k, ... (slow baselines; always at least once).
    """
    import time

    from pyrtok._timing import sync

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times: dict[str, list[float]] = {name: [] for name in calls}
    peaks: dict[str, float] = dict.fromkeys(calls, float("nan"))
    for round_ in range(repeats + 1):
        for name, fn in calls.items():
            if round_ and (round_ - 1) % max(1, (every or {}).get(name, 1)):
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if round_:
                times[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[name] = torch.cuda.max_memory_allocated(device) / 2**20
    return {name: 1000 * min(values) for name, values in times.items()}, peaks


def run_script(main: Callable[[], None]) -> None:
    """Run a benchmark's ``main``; a missing optional package (OpenCV, kornia, pyrtools, plenoptic: the ``dev``
    extra) ends in one line on stderr that names the extra to install, with exit status 2, not a traceback."""
    try:
        main()
    except ImportError as error:
        hint = hint_for(error)
        if hint is None:
            raise
        print(f"{Path(sys.argv[0]).name}: {hint}", file=sys.stderr)
        raise SystemExit(2) from None
