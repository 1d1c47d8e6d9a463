"""The ``pyrtok`` console script: ``pyrtok <command> [options]``."""

from __future__ import annotations

import sys

COMMANDS = {
    "demo": ("pyrtok.demo", "decompose a bundled photograph, reconstruct it, draw the levels"),
    "fit-difficulty": ("pyrtok.signals.difficulty", "refit the shipped difficulty calibration"),
    "make-shapes": ("pyrtok.data.make", "write splits of the procedural shapes VQA benchmark (JSONL + PNG)"),
    "train-vlm": ("pyrtok.vlm.train", "train a tiny LLaVA on the shapes VQA benchmark with random allocations"),
    "pretrain": ("pyrtok.pretrain.train", "MAE pretraining with pixel and/or Laplacian loss (YAML config)"),
    "pretrain-eval": ("pyrtok.pretrain.evaluate", "PSNR, SSIM and per-band errors of pretrained MAEs"),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: pyrtok <command> [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"pyrtok: unknown command {argv[0]!r}")
        return
    module = __import__(COMMANDS[argv[0]][0], fromlist=["main"])
    module.main(argv[1:])
