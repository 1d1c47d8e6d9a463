"""Real photographs that installed packages ship, loaded without any download.

scikit-image, matplotlib, scikit-learn and PyWavelets each bundle a few images inside their wheels. The
files are read directly from the installed package folder (the packages are located, not imported), so
asking for a sample never triggers a dataset fetcher. PyWavelets keeps its images as grey uint8 arrays in
``.npz`` files; they come back as three equal channels like every other sample.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from pyrtok._extras import OPTIONAL, install_command
from pyrtok.images import image_tensor

__all__ = ["SAMPLES", "available_samples", "missing_sample_packages", "sample_image", "sample_path"]

PHOTOS_EXTRA = "train"
"""The extra of pyproject.toml that installs every package below."""

# name -> (package, path inside the package)
_SOURCES: dict[str, tuple[str, str]] = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "camera": ("skimage", "data/camera.png"),
    "coins": ("skimage", "data/coins.png"),
    "hubble": ("skimage", "data/hubble_deep_field.jpg"),
    "retina": ("skimage", "data/retina.jpg"),
    "ihc": ("skimage", "data/ihc.png"),
    "page": ("skimage", "data/page.png"),
    "text": ("skimage", "data/text.png"),
    "brick": ("skimage", "data/brick.png"),
    "grass": ("skimage", "data/grass.png"),
    "gravel": ("skimage", "data/gravel.png"),
    "motorcycle_right": ("skimage", "data/motorcycle_right.png"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    "aero": ("pywt", "data/aero.npz"),
    "ascent": ("pywt", "data/ascent.npz"),
}

SAMPLES: tuple[str, ...] = tuple(_SOURCES)
"""The names of every bundled photograph, installed here or not."""


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _found(name: str) -> Path | None:
    package, relative = _SOURCES[name]
    root = _package_dir(package)
    return root / relative if root is not None and (root / relative).is_file() else None


def sample_path(name: str) -> Path:
    """Path of the bundled image ``name``; raises if its package is not installed."""
    if name not in _SOURCES:
        raise ValueError(f"name must be one of {sorted(_SOURCES)}, got {name!r}")
    path = _found(name)
    if path is None:
        installed = ", ".join(available_samples()) or "none"
        raise FileNotFoundError(f"sample {name!r} needs {OPTIONAL[_SOURCES[name][0]][0]}; "
                                f"{install_command(PHOTOS_EXTRA)} (samples installed here: {installed})")
    return path


def available_samples() -> list[str]:
    """Names of the bundled images whose package is installed here."""
    return [name for name in _SOURCES if _found(name)]


def missing_sample_packages() -> tuple[list[str], str | None]:
    """The distributions whose photographs are missing here, and the install line that brings them all
    (None when nothing is missing).

    Example:
        >>> missing, line = missing_sample_packages()
        >>> line is None or line.startswith("pip install")
        True
    """
    missing = sorted({OPTIONAL[_SOURCES[name][0]][0] for name in _SOURCES if not _found(name)}, key=str.lower)
    return missing, install_command(PHOTOS_EXTRA) if missing else None


def sample_image(name: str = "astronaut", size: int | tuple[int, int] | None = None) -> Tensor:
    """Load a bundled photograph as a (3, H, W) float32 tensor in [0, 1].

    Args:
        name: one of :func:`available_samples`.
        size: optional output (H, W) (or one int for a square), resized with bicubic filtering.

    Example:
        >>> sample_image("astronaut").shape
        torch.Size([3, 512, 512])
    """
    path = sample_path(name)
    image = Image.fromarray(np.load(path)["data"]) if path.suffix == ".npz" else Image.open(path)
    image = image.convert("RGB")
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else size
        image = image.resize((width, height), Image.BICUBIC)
    return image_tensor(image)
