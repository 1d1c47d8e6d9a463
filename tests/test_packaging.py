"""The package list in pyproject.toml covers every package folder, so a wheel install holds all of pyrtok."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "pyrtok").rglob("__init__.py")}
    found |= {"pyrtok.eval." + ".".join(p.parent.relative_to(ROOT / "eval").parts) if p.parent != ROOT / "eval"
              else "pyrtok.eval" for p in (ROOT / "eval").rglob("__init__.py")}
    found = {name.rstrip(".") for name in found}
    assert found == listed, f"missing: {sorted(found - listed)}; listed but absent: {sorted(listed - found)}"
