"""Command-line help from docstrings: the reST markup that reads well in Sphinx and IDEs, removed for a terminal."""

from __future__ import annotations

import re

__all__ = ["description", "plain"]

_ROLE = re.compile(r":(?:[a-z]+:)?[a-z]+:`~?([^`]+)`")  # :func:`pyrtok.x` / :py:mod:`~pyrtok.x` -> pyrtok.x
_LITERAL = re.compile(r"``(.+?)``|`([^`]+)`")


def plain(text: str) -> str:
    """``text`` without reST roles (a ``~`` keeps the last name, as Sphinx shows it) and backticks.

    Example:
        >>> plain("``pyrtok demo``: see :func:`pyrtok.demo.run`, :class:`~pyrtok.vlm.PyramidVLM` and `levels`")
        'pyrtok demo: see pyrtok.demo.run, PyramidVLM and levels'
    """
    text = _ROLE.sub(lambda m: m.group(1).split(".")[-1] if "`~" in m.group(0) else m.group(1), text)
    return _LITERAL.sub(lambda m: m.group(1) or m.group(2), text)


def description(doc: str | None) -> str:
    """The first paragraph of a module docstring as plain text, for ``argparse``'s ``description``."""
    first = (doc or "").strip().split("\n\n")[0]
    return " ".join(plain(first).split())
