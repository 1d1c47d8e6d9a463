"""End-to-end pyramid demo: decompose a real photograph, reconstruct it, draw the levels, score LapLoss."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pyrtok._help import description
from pyrtok.losses import lap_loss
from pyrtok.pyramid import gaussian_pyramid, laplacian_pyramid, pyr_down, pyr_up, reconstruct_laplacian
from pyrtok.samples import SAMPLES, sample_image
from pyrtok.steerable import reconstruct_steerable, steerable_pyramid
from pyrtok.viz import band_to_image, pyramid_figure, save_png


def run(image: str = "astronaut", levels: int = 5, orientations: int = 4, out: str = "runs/pyramid_demo") -> dict:
    """Decompose ``image`` and write ``levels.png`` and ``summary.json`` under ``out``; returns the summary."""
    x = sample_image(image).unsqueeze(0)
    gauss = gaussian_pyramid(x, levels)
    lap = laplacian_pyramid(x, levels)
    steer = steerable_pyramid(x, levels=max(1, min(levels - 1, 3)), orientations=orientations)
    x64 = x.double()

    blurred = pyr_up(pyr_down(x), x.shape[-2:])
    noisy = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    summary = {
        "image": image,
        "shape": list(x.shape),
        "levels": levels,
        "laplacian_reconstruction_max_abs_error_float32": float((reconstruct_laplacian(lap) - x).abs().max()),
        "laplacian_reconstruction_max_abs_error_float64": float(
            (reconstruct_laplacian(laplacian_pyramid(x64, levels)) - x64).abs().max()
        ),
        "steerable_reconstruction_max_abs_error_float32": float((reconstruct_steerable(steer) - x).abs().max()),
        "lap_loss_blurred": float(lap_loss(blurred, x)),
        "lap_loss_noisy": float(lap_loss(noisy, x)),
        "pixel_l1_blurred": float((blurred - x).abs().mean()),
        "pixel_l1_noisy": float((noisy - x).abs().mean()),
    }
    shown = steer.bands[min(1, steer.levels - 1)]
    orient_row = [band_to_image(shown[0, :, k].mean(0, keepdim=True)) for k in range(orientations)]
    figure = pyramid_figure(
        [
            [g[0] for g in gauss],
            [band_to_image(b[0]) for b in lap[:-1]] + [lap[-1][0]],
            orient_row,
        ]
    )
    out_dir = Path(out)
    save_png(figure, str(out_dir / "levels.png"))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["figure"] = str(out_dir / "levels.png")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pyrtok demo", description=description(__doc__))
    parser.add_argument("--image", default="astronaut",
                        help="a bundled photograph, one of: " + ", ".join(SAMPLES) + " (those of "
                             "scikit-image come with the train extra; default: %(default)s)")
    parser.add_argument("--levels", type=int, default=5,
                        help="levels of the Gaussian and Laplacian pyramids (default: %(default)s)")
    parser.add_argument("--orientations", type=int, default=4,
                        help="orientation bands of the steerable pyramid (default: %(default)s)")
    parser.add_argument("--out", default="runs/pyramid_demo",
                        help="folder for levels.png and summary.json (default: %(default)s)")
    args = parser.parse_args(argv)
    summary = run(args.image, args.levels, args.orientations, args.out)
    for key, value in summary.items():
        print(f"{key:>50}: {value}")


if __name__ == "__main__":
    main()
