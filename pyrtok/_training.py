"""Run plumbing shared by the training commands: YAML configs, LR schedule, atomic checkpoints, the CLI.

Both ``pyrtok pretrain`` and ``pyrtok train-vlm`` are seeded, resumable runs driven by one YAML file; this
module holds what they have in common so that each training script is only its model and its step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "latest_checkpoint", "load_config", "merge_config", "optimizer_step", "run_cli", "save_checkpoint",
    "set_override", "trim_log", "warmup_cosine",
]


def merge_config(base: dict[str, Any], override: dict[str, Any], path: str = "") -> dict[str, Any]:
    """``base`` updated by ``override``: nested dicts merged, anything else replaced; unknown keys raise."""
    out = dict(base)
    for key, value in override.items():
        if key not in base:
            raise ValueError(f"unknown config key {path + key!r}; known: {sorted(base)}")
        nested = isinstance(base[key], dict) and isinstance(value, dict)
        out[key] = merge_config(base[key], value, f"{path}{key}.") if nested else value
    return out


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then a cosine down to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The checkpoint folder ``checkpoints/latest`` names, if it exists."""
    pointer = checkpoints / "latest"
    if not pointer.is_file():
        return None
    target = checkpoints / pointer.read_text().strip()
    return target if target.is_dir() else None


def trim_log(path: Path, step: int) -> None:
    """Drop the JSONL rows of ``path`` logged after ``step``, the step a run (re)starts from, so that a resumed
    run logs each step once. Rewritten atomically; a missing file is left missing."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) == len(lines):
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def save_checkpoint(accelerator: Any, checkpoints: Path, step: int, keep: int) -> None:
    """Save the accelerator state as ``checkpoints/step-XXXXXXX`` (temporary folder, then a rename), point
    ``checkpoints/latest`` at it, and keep the newest ``keep`` checkpoints."""
    name = f"step-{step:07d}"
    tmp = checkpoints / f"{name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank writes its own random state into tmp
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "step.json").write_text(json.dumps({"step": step}))
        shutil.rmtree(checkpoints / name, ignore_errors=True)
        os.replace(tmp, checkpoints / name)
        pointer = checkpoints / "latest.tmp"
        pointer.write_text(name)
        os.replace(pointer, checkpoints / "latest")
        for old in sorted(p for p in checkpoints.glob("step-*") if p.is_dir() and not p.suffix)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def optimizer_step(accelerator: Any, model: Any, optimizer: Any, scheduler: Any, loss: Any, grad_clip: float) -> None:
    """Backward, optional gradient-norm clipping, one optimizer and one scheduler step, gradients cleared."""
    accelerator.backward(loss)
    if grad_clip:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def load_config(
    defaults: dict[str, Any], path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``defaults``, updated by the YAML file at ``path`` and then by ``overrides`` (nested dicts)."""
    config = defaults
    if path is not None:
        config = merge_config(config, yaml.safe_load(Path(path).read_text()) or {})
    return merge_config(config, overrides) if overrides else config


def set_override(overrides: dict[str, Any], item: str) -> dict[str, Any]:
    """Add one ``dotted.key=value`` to the nested ``overrides`` (value parsed as YAML); returns ``overrides``.

    ``"train.restart.steps=2000"`` sets ``overrides["train"]["restart"]["steps"] = 2000``; whether the key
    exists is checked when the overrides are merged into the config.
    """
    key, sep, value = item.partition("=")
    path = key.strip().split(".")
    if not sep or not all(path):
        raise ValueError(f"--set expects KEY=VALUE with a dotted KEY (e.g. train.steps=100), got {item!r}")
    node = overrides
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {item!r}: {part!r} was already set to a value, not a section")
    node[path[-1]] = yaml.safe_load(value)
    return overrides


def run_cli(
    prog: str,
    description: str,
    train: Callable[..., Path],
    load: Callable[[str | Path | None, dict[str, Any] | None], dict[str, Any]],
    argv: list[str] | None = None,
) -> None:
    """The common command line: --config (required), --set, --steps, --output, --no-resume, --stop-after."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help="the run's YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                        help="override one config entry, e.g. --set init.vision_tower=runs/pretrain/x/encoder "
                             "(VALUE is read as YAML; repeatable)")
    parser.add_argument("--steps", type=int, help="override train.steps")
    parser.add_argument("--output", help="override train.output")
    parser.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    parser.add_argument("--stop-after", type=int, help="end this invocation after N steps (resume later)")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {"train": {}}
    for item in args.sets:
        try:
            set_override(overrides, item)
        except ValueError as error:
            parser.error(str(error))
    if args.steps is not None:
        overrides["train"]["steps"] = args.steps
    if args.output is not None:
        overrides["train"]["output"] = args.output
    output = train(load(args.config, overrides), resume=not args.no_resume, stop_after=args.stop_after)
    print(f"{prog}: finished, outputs in {output}")
