"""Run a token-budget ablation (models x allocators x budgets x tasks) and write its report.

``pyrtok ablate --config configs/ablation/<name>.yaml`` (or ``python -m pyrtok.eval.ablate ...``). Rows go to
``<output>/rows/`` as they finish; ``--resume`` continues a killed run, ``--fresh`` deletes earlier rows first,
and ``--resume --retry-errors`` also recomputes the rows that recorded errors (an unreadable image, a failed
batch) once their cause is fixed. Tasks and allocators are checked before any model loads, so a run that fails
on a bad config leaves nothing that blocks its corrected rerun. Several processes
(``accelerate launch --num_processes N -m pyrtok.eval.ablate ...``, or ``torchrun``) share the batches and give
the same rows as one process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from pyrtok.eval.config import load_config
from pyrtok.eval.report import write_report
from pyrtok.eval.runner import run

__all__ = ["main"]


def main(argv: list[str] | None = None) -> dict[str, Path] | None:
    """``pyrtok ablate`` with ``argv`` (default: the command line); returns the written report's paths on the
    main process, ``{}`` when the grid produced no rows, ``None`` on the other processes."""
    parser = argparse.ArgumentParser(prog="pyrtok ablate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="an ablation YAML (see configs/ablation/)")
    parser.add_argument("--resume", action="store_true", help="keep finished rows and run only what is missing")
    parser.add_argument("--fresh", action="store_true", help="delete earlier rows of this config's output first")
    parser.add_argument("--retry-errors", action="store_true",
                        help="with --resume: recompute rows that recorded errors (unreadable images, failed batches)")
    parser.add_argument("--output", help="override the config's output folder")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=YAML",
                        help="override top-level config keys, e.g. --set batch_size=8 'budgets=[0.5, 0.1]'")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.resume and args.fresh:
        parser.error("--resume keeps earlier rows and --fresh deletes them; pass one of them")
    if args.retry_errors and not args.resume:
        parser.error("--retry-errors recomputes error rows of an earlier run; pass it with --resume")
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            parser.error(f"--set {item!r}: the value is not valid YAML ({' '.join(str(error).split())})")
    if args.output:
        overrides["output"] = args.output
    config = load_config(args.config, overrides)
    from accelerate import PartialState

    output, rows = run(config, resume=args.resume, fresh=args.fresh, progress=not args.no_progress,
                       retry_errors=args.retry_errors)
    if not PartialState().is_main_process:
        return None
    if not rows:
        print(f"pyrtok ablate: the grid produced no rows (are the tasks empty?); nothing written to {output}")
        return {}
    paths = write_report(rows, {t.name: t.metric for t in config.tasks}, output)
    print((output / "report.md").read_text().split("\n## ")[0])
    for name, path in paths.items():
        print(f"{name}: {path}")
    return paths


if __name__ == "__main__":
    from pyrtok.cli import run_command

    run_command("ablate", main, sys.argv[1:])
