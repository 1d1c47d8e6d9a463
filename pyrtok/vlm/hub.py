"""Loading a supported VLM and its processor from a local folder or a hub id.

The family is checked from the config before any weights load, so an unsupported architecture fails at once;
the hub's keyword arguments (:data:`HUB_KWARGS`) reach the config, the weights and the processor alike, so
all three come from the same files. A local path that does not exist is named as a missing folder rather
than passed to the hub as a repository id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from pyrtok.vlm.families import family_for

__all__ = ["HUB_KWARGS", "load_model", "load_processor"]

HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "trust_remote_code",
              "force_download", "proxies")
"""``from_pretrained`` keyword arguments that say where files come from."""

_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _looks_local(path_or_id: str | Path) -> bool:
    """Whether a name can only mean a local folder (a hub id is ``name`` or ``owner/name``)."""
    text = str(path_or_id)
    return isinstance(path_or_id, Path) or text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text


def load_model(path_or_id: str | Path, **model_kwargs: Any) -> tuple[nn.Module, Any]:
    """The model (in eval mode) and its processor from a folder, a hub id or a shipped model's name
    (:data:`~pyrtok.embedded.models.EMBEDDED_MODELS`); ``model_kwargs`` go to the model's
    ``from_pretrained`` (e.g. ``dtype``), the hub's among them to the config and processor too.

    Raises:
        FileNotFoundError: a local path that is not a folder.
        ValueError: an architecture pyrtok does not support (listing those it does).
    """
    import transformers

    from pyrtok.embedded.models import resolve_model

    path_or_id = resolve_model(path_or_id)
    if _looks_local(path_or_id) and not Path(path_or_id).expanduser().is_dir():
        raise FileNotFoundError(f"no model folder {str(path_or_id)!r} (a local path; a hub id looks like "
                                "'owner/name')")
    hub = {k: v for k, v in model_kwargs.items() if k in HUB_KWARGS}
    config = transformers.AutoConfig.from_pretrained(path_or_id, **hub)
    family_for(config)
    model_class = getattr(transformers, config.architectures[0])
    model = model_class.from_pretrained(path_or_id, **model_kwargs)
    return model.eval(), load_processor(path_or_id, **hub)


def load_processor(path_or_id: str | Path, **hub: Any) -> Any:
    """The model's ``AutoProcessor``; its tokenizer alone when no processor was saved with it (a local folder
    without processor files, or a hub repository whose processor files are missing). A processor that was
    saved but fails to load raises: falling back would silently replace the model's own image processing."""
    from transformers import AutoProcessor, AutoTokenizer

    folder = Path(path_or_id) / (hub.get("subfolder") or "")
    if folder.is_dir():
        if not any((folder / name).is_file() for name in _PROCESSOR_FILES):
            return AutoTokenizer.from_pretrained(path_or_id, **hub)
        return AutoProcessor.from_pretrained(path_or_id, **hub)
    try:
        return AutoProcessor.from_pretrained(path_or_id, **hub)
    except OSError:  # transformers' error for a missing file: the repository has no processor
        return AutoTokenizer.from_pretrained(path_or_id, **hub)
