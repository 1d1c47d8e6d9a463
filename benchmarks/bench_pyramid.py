"""Laplacian pyramid speed: pyrtok against OpenCV, kornia and its own elementwise path, in one run.

Each case builds a ``levels``-level Laplacian pyramid (the bands and the residual) of one batch of B x 3 images.
Every method runs once per round, the rounds interleaved so that background load reaches all of them alike,
and a method's time is its minimum over ``--repeats`` rounds after one warm-up round (robust on a shared
machine). Methods:

- pyrtok: ``laplacian_pyramid`` as users call it (on a CPU: the native kernels);
- pyrtok fwd+bwd: the same, then the gradient of the sum of all levels with respect to the input;
- elementwise: ``laplacian_pyramid`` inside ``pyramid.elementwise()``, the polyphase taps as torch's elementwise
  ops (the portable path: GPUs and builds without the native kernels), forward and forward + backward;
- OpenCV: ``cv2.pyrDown`` / ``cv2.pyrUp(dstsize=...)`` and a subtraction, looped over the images in HWC
  float32 (the layout OpenCV wants; the conversion is not timed); always on the CPU;
- kornia: ``kornia.geometry.transform.build_laplacian_pyramid`` (its own operator, padded to powers of 2),
  ``--kornia`` rounds (it is 20-40x slower on a CPU);
- compiled (``--compile``): ``torch.compile(laplacian_pyramid)``, compilation excluded.

Ratios: pyrtok / OpenCV (< 1: pyrtok is faster), elementwise / pyrtok forward and forward + backward (the
speed-up of the native kernels), kornia / pyrtok (a speed-up). ``--dtype bfloat16`` gives pyrtok and kornia
bfloat16 images (pyrtok computes in float32); ``--device cuda`` runs them on a GPU, OpenCV on float32 CPU copies.

    python benchmarks/bench_pyramid.py [--repeats 11] [--cases 1x224 16x336 ...] [--dtype bfloat16] [--compile]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from presets import add_device_arguments, device_and_dtype, interleaved, parse_cases, run_script

from pyrtok.pyramid import elementwise, laplacian_pyramid

DEFAULT_CASES = ["1x224", "16x224", "1x336", "16x336", "1x512", "16x512", "1x1024", "4x1024"]
LEVELS = 4


def opencv_laplacian(images: list[np.ndarray], levels: int) -> None:
    import cv2

    for image in images:
        current = image
        for _ in range(levels - 1):
            down = cv2.pyrDown(current)
            _ = current - cv2.pyrUp(down, dstsize=(current.shape[1], current.shape[0]))
            current = down


def forward(x: torch.Tensor) -> None:
    laplacian_pyramid(x, LEVELS, check_finite=False)


def forward_backward(x: torch.Tensor) -> None:
    leaf = x.detach().requires_grad_(True)
    sum(level.float().sum() for level in laplacian_pyramid(leaf, LEVELS, check_finite=False)).backward()


def portable(fn: Callable[[torch.Tensor], None], x: torch.Tensor) -> None:
    with elementwise():
        fn(x)


def bench_case(
    x: torch.Tensor, images: list[np.ndarray], args: argparse.Namespace, device: torch.device
) -> list[float]:
    """One table row (see the module): every method on the batch ``x`` (``images``: its HWC float32 copies)."""
    every = max(1, args.repeats // max(args.kornia, 1))
    calls: dict[str, Callable[[], object]] = {
        "pyrtok": partial(forward, x),
        "fwd+bwd": partial(forward_backward, x),
        "elem": partial(portable, forward, x),
        "elem f+b": partial(portable, forward_backward, x),
        "opencv": partial(opencv_laplacian, images, LEVELS),
    }
    if args.kornia:
        from kornia.geometry.transform import build_laplacian_pyramid

        calls["kornia"] = partial(build_laplacian_pyramid, x, LEVELS)
    if args.compile:
        torch._dynamo.reset()  # each case compiles afresh
        compiled = torch.compile(partial(laplacian_pyramid, levels=LEVELS, check_finite=False), dynamic=False)
        compiled(x)
        calls["compiled"] = partial(compiled, x)
    ms, _ = interleaved(calls, args.repeats, device, every={"kornia": every})
    kornia = ms.get("kornia", float("nan"))
    row = [ms["pyrtok"], ms["fwd+bwd"], ms["elem"], ms["elem f+b"], ms["opencv"], kornia,
           ms["pyrtok"] / ms["opencv"], ms["elem"] / ms["pyrtok"], ms["elem f+b"] / ms["fwd+bwd"],
           kornia / ms["pyrtok"]]
    if args.compile:
        row += [ms["compiled"], ms["compiled"] / ms["opencv"]]
    return row


def main(argv: list[str] | None = None) -> None:
    import cv2  # the dev extra, as kornia: a missing one ends in one line (presets.run_script)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--kornia", type=int, default=2, help="kornia rounds (0: leave it out)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(laplacian_pyramid)")
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="BxS: B RGB images of S x S px")
    add_device_arguments(parser, sizes=False)
    args = parser.parse_args(argv)
    cases = parse_cases(parser, args.cases)
    if args.kornia:
        import kornia  # noqa: F401  (checked before any timing, as OpenCV is)
    device, dtype = device_and_dtype(args)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    print(f"torch {torch.__version__}, OpenCV {cv2.__version__}, {args.threads} threads, pyrtok in {dtype} on "
          f"{device}, OpenCV float32 CPU, {LEVELS} levels, minimum of {args.repeats} interleaved rounds\n")
    columns = ["pyrtok", "fwd+bwd", "elem", "elem f+b", "opencv", "kornia", "pyr/opencv", "elem/pyr",
               "elem/pyr f+b", "kornia/pyr"] + (["compiled", "comp/opencv"] if args.compile else [])
    print(f"{'case':<10}" + "".join(f"{c:>13}" for c in columns) + "   (times in ms)")
    generator = torch.Generator().manual_seed(0)
    for text, (batch, side) in cases:
        cpu = torch.rand(batch, 3, side, side, generator=generator)
        x = cpu.to(device, dtype)
        row = bench_case(x, [np.ascontiguousarray(im) for im in cpu.permute(0, 2, 3, 1).numpy()], args, device)
        print(f"{text:<10}" + "".join(f"{v:13.2f}" for v in row), flush=True)


if __name__ == "__main__":
    run_script(main)
