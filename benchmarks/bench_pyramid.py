"""Laplacian pyramid speed: pyrtok vs kornia vs OpenCV on the same inputs, in one run.

Each case builds a ``levels``-level Laplacian pyramid (the bands and the residual) of one float32 batch on
the CPU with 2 threads. Baselines:

- kornia: ``kornia.geometry.transform.build_laplacian_pyramid`` (its own operator; pads to powers of 2).
- OpenCV: ``cv2.pyrDown`` / ``cv2.pyrUp(dstsize=...)`` and a subtraction, looped over the images of the
  batch in HWC layout (the layout OpenCV wants; the conversion is not timed).

pyrtok is timed forward, forward + backward (gradient of the sum of all levels w.r.t. the input), and,
with ``--compile``, as a ``torch.compile``'d function (compilation excluded, reported separately).
Timings are the median of ``--repeats`` runs after ``--warmup`` runs. Ratios are pyrtok over each baseline
(< 1 means pyrtok is faster), except "kornia/pyrtok", which reads as a speed-up. ``--device`` / ``--dtype`` run
pyrtok and kornia elsewhere (on a GPU: kornia on CUDA, bfloat16 by default); OpenCV always runs on the CPU, on
float32 copies of the same images.

    python benchmarks/bench_pyramid.py [--repeats 20] [--compile] [--device cuda] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import cv2
import numpy as np
import torch
from kornia.geometry.transform import build_laplacian_pyramid
from presets import add_device_arguments, device_and_dtype

from pyrtok._timing import sync
from pyrtok.pyramid import laplacian_pyramid

CASES = [((16, 3, 336, 336), 4), ((1, 3, 1024, 1024), 5), ((1, 3, 224, 224), 4)]


def median_ms(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device | None = None) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device is not None:
            sync(device)
        start = time.perf_counter()
        fn()
        if device is not None:
            sync(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def opencv_laplacian(images: list[np.ndarray], levels: int) -> list[list[np.ndarray]]:
    out = []
    for image in images:
        bands, current = [], image
        for _ in range(levels - 1):
            down = cv2.pyrDown(current)
            bands.append(current - cv2.pyrUp(down, dstsize=(current.shape[1], current.shape[0])))
            current = down
        bands.append(current)
        out.append(bands)
    return out


def forward_backward(x: torch.Tensor, levels: int) -> None:
    leaf = x.detach().requires_grad_(True)
    sum(level.sum() for level in laplacian_pyramid(leaf, levels, check_finite=False)).backward()


def bench_case(x: torch.Tensor, levels: int, args: argparse.Namespace) -> str:
    """One table row: every method on the same batch ``x``."""
    images = [np.ascontiguousarray(im) for im in x.float().permute(0, 2, 3, 1).cpu().numpy()]
    device = x.device
    ours = median_ms(lambda: laplacian_pyramid(x, levels), args.repeats, args.warmup, device)
    backward = median_ms(lambda: forward_backward(x, levels), max(3, args.repeats // 2), args.warmup, device)
    kornia = median_ms(lambda: build_laplacian_pyramid(x, levels), max(3, args.repeats // 4), 1, device)
    opencv = median_ms(lambda: opencv_laplacian(images, levels), args.repeats, args.warmup)
    name = "x".join(map(str, x.shape)) + f" L={levels}"
    row = f"{name:<22}{ours:9.2f}{backward:9.2f}{kornia:9.2f}{opencv:9.2f}"
    compiled = None
    if args.compile:
        torch._dynamo.reset()  # each case compiles afresh instead of piling up recompilations of one function
        fn = torch.compile(lambda t: laplacian_pyramid(t, levels, check_finite=False), dynamic=False)
        fn(x)
        compiled = median_ms(lambda: fn(x), args.repeats, args.warmup, device)
        row += f"{compiled:10.2f}"
    row += f"{kornia / ours:15.1f}{ours / opencv:15.2f}"
    if compiled is not None:
        row += f"{compiled / opencv:17.2f}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(laplacian_pyramid)")
    add_device_arguments(parser, sizes=False)
    args = parser.parse_args()
    device, dtype = device_and_dtype(args)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    print(f"torch {torch.__version__}, OpenCV {cv2.__version__}, {args.threads} threads, pyrtok and kornia in "
          f"{dtype} on {device}, OpenCV float32 CPU, median of {args.repeats} after {args.warmup} warm-up runs\n")
    header = f"{'case':<22}{'pyrtok':>9}{'fwd+bwd':>9}{'kornia':>9}{'opencv':>9}"
    header += f"{'compiled':>10}" if args.compile else ""
    header += f"{'kornia/pyrtok':>15}{'pyrtok/opencv':>15}"
    header += f"{'compiled/opencv':>17}" if args.compile else ""
    print(header + "   (times in ms)")
    generator = torch.Generator().manual_seed(0)
    for shape, levels in CASES:
        print(bench_case(torch.rand(shape, generator=generator).to(device, dtype), levels, args), flush=True)

if __name__ == "__main__":
    main()
