"""Steerable pyramid speed: pyrtok against pyrtools and plenoptic, with their coefficients compared, in one run.

Each case decomposes one batch of B x 3 images of S x S px into ``--levels`` scales of ``--orientations``
sub-bands, with the high-pass and low-pass residuals, in the unnormalised scaling that pyrtools and plenoptic
(``tight_frame=False``) use (pyrtok's ``scaling="pyrtools"``), so all three compute the same numbers. Every
method runs once per round, the rounds interleaved, and a method's time is its minimum over ``--repeats``
rounds after one warm-up round (``presets.interleaved``). Methods:

- pyrtok: ``steerable_pyramid`` on the (B, 3, S, S) batch, forward and forward + backward (the gradient of the
  sum of every coefficient with respect to the input);
- plenoptic: ``plenoptic.process.SteerablePyramidFreq`` built once for the image size (it precomputes its
  windows there), called on the batch, forward and forward + backward;
- pyrtools: ``pyrtools.pyramids.SteerablePyramidFreq`` looped over the 3B images (numpy, float64: the library
  builds the pyramid when constructed and has no batch dimension).

Ratios above 1 mean pyrtok is faster. ``max |diff|`` is the largest difference between pyrtok's and
pyrtools' coefficients on the first image (pyrtools interpolates its raised cosines from a lookup table, so
about 1e-5 is expected, relative to coefficients of order 1). Both libraries are in the ``dev`` extra.

    python benchmarks/bench_steerable.py [--repeats 11] [--cases 1x256 16x256 ...] [--levels 4]
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from presets import add_device_arguments, device_and_dtype, interleaved, parse_cases, run_script

from pyrtok.steerable import steerable_pyramid

DEFAULT_CASES = ["1x128", "1x256", "16x256", "1x512", "4x512"]


def pyrtok_forward(x: torch.Tensor, levels: int, orientations: int) -> None:
    steerable_pyramid(x, levels, orientations, scaling="pyrtools", check_finite=False)


def pyrtok_backward(x: torch.Tensor, levels: int, orientations: int) -> None:
    leaf = x.detach().requires_grad_(True)
    coeffs = steerable_pyramid(leaf, levels, orientations, scaling="pyrtools", check_finite=False)
    total = coeffs.highpass.sum() + coeffs.lowpass.sum() + sum(band.sum() for band in coeffs.bands)
    total.backward()


def plenoptic_forward(model: torch.nn.Module, x: torch.Tensor) -> None:
    model(x)


def plenoptic_backward(model: torch.nn.Module, x: torch.Tensor) -> None:
    leaf = x.detach().requires_grad_(True)
    sum(value.sum() for value in model(leaf).values()).backward()


def pyrtools_loop(images: list[np.ndarray], levels: int, orientations: int) -> None:
    import pyrtools

    for image in images:
        pyrtools.pyramids.SteerablePyramidFreq(image, height=levels, order=orientations - 1)


def max_difference(image: np.ndarray, levels: int, orientations: int) -> float:
    """Largest |pyrtok - pyrtools| over every coefficient of one float64 image."""
    import pyrtools

    theirs = pyrtools.pyramids.SteerablePyramidFreq(image, height=levels, order=orientations - 1).pyr_coeffs
    ours = steerable_pyramid(torch.from_numpy(image), levels, orientations, scaling="pyrtools")
    diffs = [np.abs(ours.highpass.numpy() - theirs["residual_highpass"]).max(),
             np.abs(ours.lowpass.numpy() - theirs["residual_lowpass"]).max()]
    diffs += [np.abs(ours.bands[s][b].numpy() - theirs[(s, b)]).max()
              for s in range(levels) for b in range(orientations)]
    return float(max(diffs))


def bench_case(x: torch.Tensor, images: list[np.ndarray], args: argparse.Namespace,
               device: torch.device) -> list[float]:
    """One table row (see the module) for the batch ``x`` (``images``: its float64 2-D planes)."""
    import plenoptic

    model = plenoptic.process.SteerablePyramidFreq(tuple(x.shape[-2:]), height=args.levels,
                                                   order=args.orientations - 1, tight_frame=False).to(device)
    calls: dict[str, Callable[[], object]] = {
        "pyrtok": partial(pyrtok_forward, x, args.levels, args.orientations),
        "fwd+bwd": partial(pyrtok_backward, x, args.levels, args.orientations),
        "plenoptic": partial(plenoptic_forward, model, x),
        "pleno f+b": partial(plenoptic_backward, model, x),
        "pyrtools": partial(pyrtools_loop, images, args.levels, args.orientations),
    }
    ms, _ = interleaved(calls, args.repeats, device)
    return [ms["pyrtok"], ms["fwd+bwd"], ms["plenoptic"], ms["pleno f+b"], ms["pyrtools"],
            ms["plenoptic"] / ms["pyrtok"], ms["pleno f+b"] / ms["fwd+bwd"], ms["pyrtools"] / ms["pyrtok"],
            max_difference(images[0], args.levels, args.orientations)]


def main(argv: list[str] | None = None) -> None:
    import plenoptic  # noqa: F401  (both from the dev extra: a missing one ends in one line before any timing)
    import pyrtools  # noqa: F401

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--orientations", type=int, default=4)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="BxS: B RGB images of S x S px")
    add_device_arguments(parser, sizes=False)
    args = parser.parse_args(argv)
    cases = parse_cases(parser, args.cases)
    device, dtype = device_and_dtype(args)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="plenoptic")
    print(f"torch {torch.__version__}, {args.threads} threads, pyrtok and plenoptic in {dtype} on {device}, "
          f"pyrtools float64 CPU, {args.levels} levels x {args.orientations} orientations, minimum of "
          f"{args.repeats} interleaved rounds\n")
    columns = ["pyrtok", "fwd+bwd", "plenoptic", "pleno f+b", "pyrtools", "pleno/pyr", "pleno/pyr f+b",
               "pyrtools/pyr", "max |diff|"]
    print(f"{'case':<10}" + "".join(f"{c:>14}" for c in columns) + "   (times in ms)")
    generator = torch.Generator().manual_seed(0)
    for text, (batch, side) in cases:
        cpu = torch.rand(batch, 3, side, side, generator=generator, dtype=torch.float64)
        planes = [np.ascontiguousarray(plane) for plane in cpu.reshape(-1, side, side).numpy()]
        row = bench_case(cpu.to(device, dtype), planes, args, device)
        print(f"{text:<10}" + "".join(f"{v:14.2f}" for v in row[:-1]) + f"{row[-1]:14.1e}", flush=True)


if __name__ == "__main__":
    run_script(main)
