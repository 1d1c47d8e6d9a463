"""Which extra of ``pyproject.toml`` brings each optional import, and the one line that says so.

The main install (``pip install -e ".[eval]"``) leaves out what only some commands need. A command that
reaches for a missing package ends with :func:`install_hint`'s line instead of a traceback (``pyrtok.cli``
turns the ``ModuleNotFoundError`` into it); a library function that checks first can raise
:func:`missing` with the same text. ``tests/test_cli.py`` checks this table against ``pyproject.toml``.
"""

from __future__ import annotations

import importlib.util

__all__ = ["LMMS_EVAL", "OPTIONAL", "hint_for", "install_command", "install_hint", "missing"]

LMMS_EVAL = "lmms-eval==0.7.3"
"""The lmms-eval release the plugin is tested with; installed with ``--no-deps`` (its torchvision pin would
replace the torch build), after the ``lmms`` extra that lists the dependencies the plugin needs."""

# top-level module -> (distribution, the smallest extra that installs it)
OPTIONAL: dict[str, tuple[str, str]] = {
    "transformers": ("transformers", "hf"),
    "tokenizers": ("transformers", "hf"),
    "safetensors": ("transformers", "hf"),
    "accelerate": ("accelerate", "train"),
    "skimage": ("scikit-image", "train"),
    "sklearn": ("scikit-learn", "train"),
    "pywt": ("PyWavelets", "train"),
    "matplotlib": ("matplotlib", "eval"),
    "datasets": ("datasets", "eval"),
    "open_clip": ("open_clip_torch", "openclip"),
    "lmms_eval": ("lmms-eval", "lmms"),
    "evaluate": ("evaluate", "lmms"),
    "loguru": ("loguru", "lmms"),
    "sacrebleu": ("sacrebleu", "lmms"),
    "tenacity": ("tenacity", "lmms"),
    "numexpr": ("numexpr", "lmms"),
    "dotenv": ("python-dotenv", "lmms"),
    "zstandard": ("zstandard", "lmms"),
    "jinja2": ("jinja2", "lmms"),
    "sympy": ("sympy", "lmms"),
    "aiohttp": ("aiohttp", "lmms"),
    "sentencepiece": ("sentencepiece", "lmms"),
    "pytz": ("pytz", "lmms"),
    "pytablewriter": ("pytablewriter", "lmms"),
    "cv2": ("opencv-python-headless", "dev"),
    "kornia": ("kornia", "dev"),
    "pyrtools": ("pyrtools", "dev"),
    "plenoptic": ("plenoptic", "dev"),
}


def install_command(extra: str) -> str:
    """The shell line that installs ``extra`` into this checkout's environment (lmms-eval included for
    ``lmms``)."""
    line = f'pip install -e ".[{extra}]"'
    return f"{line} && pip install --no-deps {LMMS_EVAL}" if extra == "lmms" else line


def install_hint(module: str | None) -> str | None:
    """``needs <distribution>; <install line>`` for an optional top-level module (or any of its submodules),
    None for a module no extra provides.

    Example:
        >>> install_hint("skimage.data")
        'needs scikit-image; pip install -e ".[train]"'
        >>> install_hint("os") is None
        True
    """
    if not module:
        return None
    known = OPTIONAL.get(module.split(".")[0])
    if known is None:
        return None
    distribution, extra = known
    return f"needs {distribution}; {install_command(extra)}"


def missing(module: str, purpose: str) -> ModuleNotFoundError:
    """The error to raise when ``purpose`` (e.g. ``"write_pope"``) finds the optional ``module`` missing: its
    message says which extra to install, and its ``name`` lets ``pyrtok.cli`` print that as one line."""
    return ModuleNotFoundError(f"{purpose} {install_hint(module) or f'needs the module {module}'}", name=module)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: in sys.modules without a spec
        return True


def hint_for(error: BaseException) -> str | None:
    """:func:`install_hint` for the optional module whose absence caused ``error`` (an ``ImportError`` or
    one raised from it), None when that is not a missing optional package (a module missing inside an
    installed package is a version mismatch, not a missing extra, and keeps its traceback)."""
    seen: set[int] = set()
    while isinstance(error, ImportError) and id(error) not in seen:
        seen.add(id(error))
        name = error.name
        if name and install_hint(name) and not _installed(name.split(".")[0]):
            return install_hint(name)
        error = error.__cause__ or error.__context__
    return None
