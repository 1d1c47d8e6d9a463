"""The ``pyrtok`` console script: ``pyrtok [--debug] <command> [options]`` (and ``pyrtok --version``).

Packages add commands through the ``pyrtok.commands`` entry-point group (name -> ``module:function``
taking ``argv``); the evaluation harness adds ``ablate`` that way, so the library never imports it. A plugin
command's one-line description in ``pyrtok --help`` is the first line of its module's docstring.

A command that fails on a user error (:data:`USER_ERRORS`: a bad config, a missing file) ends with one line on
stderr, ``pyrtok <command>: <message>``, and exit status 2; so does one that needs a package of an extra that
is not installed (the line names the extra, :mod:`pyrtok._extras`). ``--debug``, before or after the command,
lets the exception through with its traceback; other exceptions (bugs) always keep theirs. ``pyrtok`` alone
prints the usage and exits with status 2; a misspelled command gets the closest names.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import sys
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import yaml

from pyrtok._extras import hint_for
from pyrtok._help import plain

__all__ = ["COMMANDS", "USER_ERRORS", "main", "run_command"]

COMMANDS = {
    "demo": ("pyrtok.demo", "decompose a bundled photograph, reconstruct it, draw the levels"),
    "fit-difficulty": ("pyrtok.signals.difficulty", "refit the shipped difficulty calibration"),
    "make-shapes": ("pyrtok.data.make", "write splits of the procedural shapes VQA benchmark (JSONL + PNG)"),
    "train-vlm": ("pyrtok.embedded.train", "train a tiny VLM (LLaVA or Qwen2.5-VL) on the shapes VQA benchmark"),
    "export-vlm": ("pyrtok.embedded.export", "write a train-vlm checkpoint as a HF model folder"),
    "match-flops": ("pyrtok.vlm.schedules.matched", "the keep of in-LLM schedules at vision-side budgets' FLOPs"),
    "pretrain": ("pyrtok.pretrain.train", "MAE pretraining with pixel and/or Laplacian loss (YAML config)"),
    "pretrain-eval": ("pyrtok.pretrain.evaluate", "PSNR, SSIM and per-band errors of pretrained MAEs"),
}
# what bad input raises (the project's convention: ValueError / TypeError naming the argument; OSError covers
# missing files and models; KeyError a missing config key): one line, no traceback
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError, KeyError, yaml.YAMLError)
DEBUG = "--debug"
VERSION = "--version"


def _plugins() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group="pyrtok.commands") if ep.name not in COMMANDS}


def _summary(entry: EntryPoint) -> str:
    """The first line of the plugin module's docstring, read without importing the module."""
    module = entry.value.split(":")[0]
    try:
        spec = importlib.util.find_spec(module)
        with open(spec.origin, encoding="utf-8") as f:  # type: ignore[union-attr]
            doc = ast.get_docstring(ast.parse(f.read())) or ""
    except (ImportError, AttributeError, TypeError, OSError, SyntaxError, ValueError):
        doc = ""
    line = plain(doc.strip().split("\n")[0]).strip().rstrip(".")
    if not line:
        return f"(from {module})"
    first = line.split()[0]
    return line[0].lower() + line[1:] if first[1:] == first[1:].lower() else line  # keeps "MAE ..." as it is


def _usage(plugins: dict[str, EntryPoint]) -> str:
    lines = [f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += [f"  {name:<16} {_summary(ep)}" for name, ep in sorted(plugins.items())]
    return ("usage: pyrtok [--debug] <command> [options]\n\ncommands:\n" + "\n".join(lines) + "\n\n"
            "pyrtok <command> --help lists a command's options; --debug (before or after the command) shows the\n"
            "traceback of an error instead of its one-line message; pyrtok --version prints the version.")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pyrtok")
    except PackageNotFoundError:  # run from a checkout that was never installed
        from pyrtok import __version__

        return __version__


def _message(error: BaseException) -> str:
    """One line that says what went wrong."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem:
        mark = error.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        text = f"invalid YAML: {error.context + ', ' if error.context else ''}{error.problem}{where}"
    elif isinstance(error, OSError) and error.strerror and error.filename is not None:
        text = f"{error.strerror}: {str(error.filename)!r}"
    elif isinstance(error, KeyError) and len(error.args) == 1:
        text = f"missing key {error.args[0]!r}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` (anywhere before a ``--`` separator), and whether it was there."""
    end = argv.index("--") if "--" in argv else len(argv)
    kept = [a for a in argv[:end] if a != DEBUG] + argv[end:]
    return kept, len(kept) != len(argv)


def run_command(name: str, function: Callable[[list[str]], Any], argv: list[str], debug: bool = False) -> None:
    """Run a command's ``function(argv)``; a user error becomes ``pyrtok <name>: <message>`` on stderr and exit
    status 2, unless ``debug`` (or ``--debug`` in ``argv``) asks for the traceback.

    Example:
        >>> def fails(argv):
        ...     raise ValueError(f"budgets[0] must be positive, got {argv[0]}")
        >>> try:
        ...     run_command("ablate", fails, ["-1"])
        ... except SystemExit as exit:
        ...     exit.code
        2
    """
    argv, flagged = _split_debug(list(argv))
    try:
        function(argv)
    except ImportError as error:
        # a package of an extra that is not installed: one line that names the extra
        hint = hint_for(error)
        if hint is None or debug or flagged:
            raise
        print(f"pyrtok {name}: {hint}", file=sys.stderr)
        raise SystemExit(2) from None
    except USER_ERRORS as error:
        if debug or flagged:
            raise
        print(f"pyrtok {name}: {_message(error)}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    """``pyrtok [--debug] <command> [options]``: dispatch to the command's ``main(argv)`` (see the module
    docstring for errors and ``--debug``)."""
    argv, debug = _split_debug(list(sys.argv[1:] if argv is None else argv))
    plugins = _plugins()
    if not argv:
        print(_usage(plugins), file=sys.stderr)
        raise SystemExit(2)
    if argv[0] in ("-h", "--help"):
        print(_usage(plugins))
        return
    if argv[0] == VERSION:
        print(f"pyrtok {_version()}")
        return
    name, rest = argv[0], argv[1:]
    if name not in plugins and name not in COMMANDS:
        close = difflib.get_close_matches(name, [*COMMANDS, *plugins], n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        print(_usage(plugins), file=sys.stderr)
        raise SystemExit(f"pyrtok: unknown command {name!r}{hint}")

    def command(args: list[str]) -> Any:
        # imported here, inside run_command, so that a missing package of an extra reads as one line too
        if name in plugins:
            return plugins[name].load()(args)
        return __import__(COMMANDS[name][0], fromlist=["main"]).main(args)

    run_command(name, command, rest, debug)


if __name__ == "__main__":
    main()
