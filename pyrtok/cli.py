"""The ``pyrtok`` console script: ``pyrtok <command> [options]``.

Packages add commands through the ``pyrtok.commands`` entry-point group (name -> ``module:function``
taking ``argv``); the evaluation harness adds ``ablate`` that way, so the library never imports it.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

COMMANDS = {
    "demo": ("pyrtok.demo", "decompose a bundled photograph, reconstruct it, draw the levels"),
    "fit-difficulty": ("pyrtok.signals.difficulty", "refit the shipped difficulty calibration"),
    "make-shapes": ("pyrtok.data.make", "write splits of the procedural shapes VQA benchmark (JSONL + PNG)"),
    "train-vlm": ("pyrtok.vlm.train", "train a tiny LLaVA on the shapes VQA benchmark with random allocations"),
    "export-vlm": ("pyrtok.vlm.export", "write a train-vlm checkpoint as a HF model folder"),
    "pretrain": ("pyrtok.pretrain.train", "MAE pretraining with pixel and/or Laplacian loss (YAML config)"),
    "pretrain-eval": ("pyrtok.pretrain.evaluate", "PSNR, SSIM and per-band errors of pretrained MAEs"),
}


def _plugins() -> dict:
    return {ep.name: ep for ep in entry_points(group="pyrtok.commands") if ep.name not in COMMANDS}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    plugins = _plugins()
    if argv and argv[0] in plugins:
        plugins[argv[0]].load()(argv[1:])
        return
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items()]
        lines += [f"  {name:<16} (from {ep.value.split(':')[0]})" for name, ep in sorted(plugins.items())]
        print("usage: pyrtok <command> [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"pyrtok: unknown command {argv[0]!r}")
        return
    module = __import__(COMMANDS[argv[0]][0], fromlist=["main"])
    module.main(argv[1:])
