"""The shipped embedded models by name: what ``pretrained=`` / ``path:`` / ``from_pretrained`` accept besides a
folder or a hub id.

- ``embedded`` and ``embedded-llava``: the tiny LLaVA-1.5 (``pyrtok/assets/tiny_llava``, the default model);
- ``embedded-qwen``: the tiny Qwen2.5-VL (``pyrtok/assets/tiny_qwen``).

Example:
    >>> sorted(EMBEDDED_MODELS)
    ['embedded', 'embedded-llava', 'embedded-qwen']
    >>> resolve_model("owner/model")  # anything else is left as it is
    'owner/model'
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["EMBEDDED_MODELS", "embedded_model", "resolve_model"]

EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "embedded": ("tiny_llava", "configs/embedded/tiny_llava_fair.yaml"),
    "embedded-llava": ("tiny_llava", "configs/embedded/tiny_llava_fair.yaml"),
    "embedded-qwen": ("tiny_qwen", "configs/embedded/tiny_qwen_open.yaml"),
}
"""Name -> (folder under ``pyrtok/assets``, the training config that reproduces it)."""


def embedded_model(name: str = "embedded") -> Path:
    """The folder of the shipped model ``name`` (one of :data:`EMBEDDED_MODELS`).

    Raises:
        ValueError: an unknown name. FileNotFoundError: the model's folder is missing from this install.
    """
    import pyrtok

    if name not in EMBEDDED_MODELS:
        raise ValueError(f"embedded model must be one of {sorted(EMBEDDED_MODELS)}, got {name!r}")
    folder, config = EMBEDDED_MODELS[name]
    path = Path(pyrtok.__file__).parent / "assets" / folder
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the embedded model {name!r} is missing from {path}; train it with "
                                f"`pyrtok train-vlm --config {config}` and write it there with `pyrtok export-vlm`")
    return path


def resolve_model(path_or_id: str | Path) -> str | Path:
    """An embedded model's name -> its folder; a folder or a hub id unchanged."""
    return str(embedded_model(path_or_id)) if isinstance(path_or_id, str) and path_or_id in EMBEDDED_MODELS \
        else path_or_id
