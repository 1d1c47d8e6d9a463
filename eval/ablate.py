"""Run a token-budget ablation (models x allocators x budgets x tasks) and write its report.

``pyrtok ablate --config configs/ablation/<name>.yaml`` (or ``python -m pyrtok.eval.ablate ...``). Rows go to
``<output>/rows/`` as they finish; ``--resume`` continues a killed run, ``--fresh`` moves the earlier run aside
(to ``<output>.previous-<UTC time>``; nothing is ever deleted) and starts anew, and ``--resume --retry-errors``
also recomputes the rows that recorded errors (an unreadable image, a failed batch) once their cause is fixed.
Tasks and allocators are checked before any model loads, so a run that fails on a bad config leaves nothing that
blocks its corrected rerun. One run at a time holds an output folder: a second one is refused (exit status 2)
instead of appending duplicate rows. When rows record errors, the command writes everything, says how many and how
to retry, and exits with status 1. Several processes (``accelerate launch --num_processes N -m
pyrtok.eval.ablate ...``, or ``torchrun``) share the batches and give the same rows as one process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from pyrtok.eval.config import load_config
from pyrtok.eval.outputs import keep_held
from pyrtok.eval.report import write_report
from pyrtok.eval.rows import failed
from pyrtok.eval.runner import run

__all__ = ["main"]


def main(argv: list[str] | None = None) -> dict[str, Path] | None:
    """``pyrtok ablate`` with ``argv`` (default: the command line); returns the written report's paths on the
    main process, ``{}`` when the grid produced no rows, ``None`` on the other processes.

    Raises:
        SystemExit: with status 1 when rows of the grid record failures (unreadable images, failed batches),
            after the report is written and a line on stderr has said how many and how to retry them.
    """
    parser = argparse.ArgumentParser(prog="pyrtok ablate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="an ablation YAML (see configs/ablation/)")
    parser.add_argument("--resume", action="store_true", help="keep finished rows and run only what is missing")
    parser.add_argument("--fresh", action="store_true",
                        help="set the output folder's earlier run aside (moved to <output>.previous-<UTC time>, never "
                             "deleted) and start anew")
    parser.add_argument("--retry-errors", action="store_true",
                        help="with --resume: recompute rows that recorded errors (unreadable images, failed batches)")
    parser.add_argument("--output", help="override the config's output folder")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=YAML",
                        help="override top-level config keys, e.g. --set batch_size=8 'budgets=[0.5, 0.1]'")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if args.resume and args.fresh:
        parser.error("--resume continues the earlier rows and --fresh sets them aside; pass one of them")
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

    with keep_held():  # the output folder stays this run's until its report is written
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
    errors = [r for r in rows if failed(r)]
    if errors:
        samples = len({(r["task"], r["id"]) for r in errors})
        example = " ".join(str(errors[0]["error"]).split())  # one line, whatever the exception's message held
        example = example if len(example) <= 300 else example[:297] + "..."
        print(f"pyrtok ablate: {len(errors)} of {len(rows)} rows are errors ({samples} samples without an answer, "
              f"e.g. {errors[0]['task']}/{errors[0]['id']}: {example}); fix the cause, then rerun with --resume "
              f"--retry-errors", file=sys.stderr)
        raise SystemExit(1)
    return paths


if __name__ == "__main__":
    from pyrtok.cli import run_command

    run_command("ablate", main, sys.argv[1:])
