"""``pyrtok pretrain-eval RUN [RUN ...]``: reconstruction quality of pretrained MAEs on held-out images.

Every model sees the same held-out crops (photographs kept out of training, :data:`HELD_OUT_SAMPLES`)
with the same masks. For the hidden patches only, it reports PSNR (from the MSE over hidden pixels),
SSIM (the SSIM map of the composite image, averaged over hidden pixels; 11x11 Gaussian window, sigma
1.5), and the mean absolute error of each Laplacian band of the composite over the hidden region
(band 0 is the finest; the mask is carried down the pyramid as in LapLoss).

A model trained with per-patch normalised targets (``norm_pix``) predicts no absolute intensities; its
pixels are recovered with each hidden patch's true mean and std, i.e. with oracle low frequencies. Such
rows are marked ``oracle stats`` and are not comparable with models that predict pixels themselves.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

from pyrtok._help import description
from pyrtok.losses import laplacian_band_errors
from pyrtok.pretrain.data import HELD_OUT_SAMPLES, ImagePool, step_generator
from pyrtok.pretrain.objectives import composite, mask_image
from pyrtok.pretrain.train import build_model

__all__ = ["evaluate_run", "masked_psnr", "masked_ssim", "ssim_map"]


def ssim_map(x: Tensor, y: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """(B, C, H, W) images in [0, 1] -> (B, 1, H, W) SSIM map (channel mean), reflect-padded borders."""
    t = torch.arange(window, dtype=x.dtype, device=x.device) - window // 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = (g / g.sum()).view(1, 1, -1)
    channels = x.shape[1]

    def blur(z: Tensor) -> Tensor:
        z = F.pad(z, (window // 2,) * 4, mode="reflect")
        z = F.conv2d(z, g.view(1, 1, 1, -1).expand(channels, 1, 1, window), groups=channels)
        return F.conv2d(z, g.view(1, 1, -1, 1).expand(channels, 1, window, 1), groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean(1, keepdim=True)


def masked_psnr(x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """(B,) PSNR in dB over the pixels where the (B, 1, H, W) mask is 1."""
    mse = ((x - y).square().mean(1, keepdim=True) * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def masked_ssim(x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    return (ssim_map(x, y) * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1e-12)


def held_out_images(count: int, size: int, seed: int = 1234) -> Tensor:
    pool = ImagePool(samples=list(HELD_OUT_SAMPLES))
    return torch.cat([pool.batch(min(16, count - i), size, seed, step=i // 16) for i in range(0, count, 16)])


@torch.no_grad()
def evaluate_run(run: str | Path, images: Tensor, levels: int = 4, seed: int = 1234) -> dict[str, float]:
    """Metrics of the run's latest checkpoint on ``images`` (B, 3, S, S)."""
    from safetensors.torch import load_file

    run = Path(run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    model = build_model(config).eval()
    latest = (run / "checkpoints" / "latest").read_text().strip()
    state = load_file(str(run / "checkpoints" / latest / "model.safetensors"))
    model.load_state_dict(state)
    generator = step_generator(seed, 0, 0, stream=3)
    if model.mask_ratio <= 0:
        raise ValueError(f"run {run.name!r} has mask_ratio {model.mask_ratio}: there are no hidden patches to score")
    out = model(images, mask=model.random_mask(images.shape[0], model.mask_ratio, generator, images.device))
    patch = model.patch_size
    filled = composite(out.pred, out.mask, images, patch, config["loss"]["norm_pix"])
    weights = mask_image(out.mask, patch, images.shape[-2], images.shape[-1])
    bands = laplacian_band_errors(filled, images, levels, mask=weights).mean(0)
    steps = json.loads((run / "checkpoints" / latest / "step.json").read_text())["step"]
    loss = config["loss"]
    name = "+".join(f"{w:g}*{k}" for k, w in (("pixel", loss["pixel"]), ("lap", loss["lap"])) if w)
    oracle = bool(loss["norm_pix"])
    return {"run": run.name, "loss": name + (" (norm_pix, oracle stats)" if oracle else ""),
            "steps": steps, "psnr": masked_psnr(filled, images, weights).mean().item(),
            "ssim": masked_ssim(filled, images, weights).mean().item(),
            **{f"band{j}": v.item() for j, v in enumerate(bands)}}


def markdown(rows: list[dict[str, float]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[k]:.4f}" if isinstance(row[k], float) else str(row[k])
                                        for k in keys) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pyrtok pretrain-eval", description=description(__doc__))
    parser.add_argument("runs", nargs="+", metavar="RUN", help="output folders of pyrtok pretrain runs")
    parser.add_argument("--images", type=int, default=64,
                        help="number of held-out crops (the held-out photographs come with the train extra; "
                             "default: %(default)s)")
    parser.add_argument("--levels", type=int, default=4,
                        help="Laplacian levels whose band errors are reported (default: %(default)s)")
    parser.add_argument("--out", help="also write the table (Markdown) and rows (JSON) next to this path")
    args = parser.parse_args(argv)
    sizes = {yaml.safe_load((Path(r) / "config.yaml").read_text())["model"]["image_size"] for r in args.runs}
    if len(sizes) != 1:
        raise SystemExit(f"runs use different image sizes {sorted(sizes)}; compare like with like")
    images = held_out_images(args.images, sizes.pop())
    rows = [evaluate_run(run, images, args.levels) for run in args.runs]
    table = markdown(rows)
    print(table)
    if args.out:
        Path(args.out).with_suffix(".md").write_text(table + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=2))
