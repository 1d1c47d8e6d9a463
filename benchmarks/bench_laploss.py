"""LapLoss forward + backward against the snippets people copy, at training sizes, in one run.

For each case (a batch of predictions and targets, images or video), every loss is timed forward + backward
(the gradient w.r.t. the prediction), interleaved round by round so that background load reaches all of them,
the minimum of ``--repeats`` rounds after one warm-up, and the peak memory of one forward + backward beyond the
inputs: on a GPU the allocator's peak, on a CPU the growth of the peak resident set of a fresh process that
runs only that loss (``--memory``; a process per loss, so it takes a while). Rows:

- each snippet (ports in ``tests/snippet_ports.py``: RIFE's ``LapLoss``, mtyka's TensorFlow original ported,
  the GLO PyTorch port) against ``LapLoss.from_preset`` of it: the same loss, so the ratio is the cost of
  pyrtok's implementation;
- pyrtok's own ``LapLoss`` (OpenCV-exact pyramid, 5 levels with the residual) without and with a mask (75% of
  16 px patches hidden, as MAE), against the fastest snippet: the residual and the mask are what the snippets
  lack;
- ``pyrtok (elementwise)``: pyrtok's ``LapLoss`` inside ``pyramid.elementwise()``, the pyramid on torch's
  elementwise ops (the portable path: GPUs and builds without the native kernels), against ``pyrtok``: its
  ratio is the speed-up of the native kernels.

Video batches (B, T, C, H, W) go to pyrtok as they are and to the snippets flattened to (B * T, C, H, W), as a
user of them would. ``--dtype bfloat16`` runs the losses under autocast (inputs in bfloat16; pyrtok computes in
float32). Ratios < 1: pyrtok is faster.

    python benchmarks/bench_laploss.py [--repeats 5] [--cases 32x224 32x512 4x8x224] [--memory] [--device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from presets import add_device_arguments, device_and_dtype, interleaved, parse_cases, run_script

from pyrtok.losses import LapLoss
from pyrtok.pyramid import elementwise

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from snippet_ports import PORTS  # the ports live with the tests that check them

DEFAULT_CASES = ["32x224", "32x512", "4x8x224"]


def parse_case(text: str) -> tuple[int, ...]:
    """"32x224" -> (32, 3, 224, 224); "4x8x224" -> (4, 8, 3, 224, 224)."""
    parts = text.split("x")
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts):
        raise ValueError(f"a case is BxS (images) or BxTxS (video), got {text!r}")
    *lead, side = (int(p) for p in parts)
    if side < 64 or side % 32:
        raise ValueError(f"the snippets' 5-band ports need a side that is a multiple of 32, at least 64, got {text!r}")
    return *lead, 3, side, side


def patch_mask(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """(B, [T,] 1, H, W) float: 75% of 16 px patches hidden (1), as MAE hides them."""
    *lead, _, height, width = shape
    grid = torch.rand(*lead, 1, height // 16, width // 16, generator=generator) < 0.75
    return grid.repeat_interleave(16, -2).repeat_interleave(16, -1).float()


def step(loss: Callable[..., torch.Tensor], pred: torch.Tensor, target: torch.Tensor, autocast: bool,
         *extra: torch.Tensor) -> None:
    """One forward + backward of ``loss(pred, target, *extra)`` w.r.t. ``pred``."""
    leaf = pred.detach().requires_grad_(True)
    context = torch.autocast(pred.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        value = loss(leaf, target, *extra)
    value.backward()


def elementwise_step(loss: Callable[..., torch.Tensor], pred: torch.Tensor, target: torch.Tensor,
                     autocast: bool) -> None:
    """:func:`step` with the pyramid on its elementwise path (``pyramid.elementwise``)."""
    with elementwise():
        step(loss, pred, target, autocast)


def _cpu_peak_child(name: str, shape: tuple[int, ...], autocast: bool, threads: int, queue: object) -> None:
    """In a fresh process: the peak resident memory (MiB) one forward + backward of loss ``name`` adds (Linux:
    the peak is reset through ``/proc/self/clear_refs`` once the inputs exist)."""
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    pred, target = (torch.rand(shape, generator=generator) for _ in range(2))
    mask = patch_mask(shape, generator)
    flat = (pred.flatten(0, 1), target.flatten(0, 1)) if pred.dim() == 5 else (pred, target)
    losses = {**{f"{n} (snippet)": (port, flat, ()) for n, port in PORTS.items()},
              **{f"{n} (preset)": (LapLoss.from_preset(n), flat, ()) for n in PORTS},
              "pyrtok": (LapLoss(levels=5), (pred, target), ()), "pyrtok + mask": (LapLoss(levels=5), (pred, target),
                                                                                  (mask,)),
              "pyrtok (elementwise)": (LapLoss(levels=5), (pred, target), ())}
    loss, inputs, extra = losses[name]
    path = elementwise() if name == "pyrtok (elementwise)" else contextlib.nullcontext()

    def status(field: str) -> int:  # kB
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
        return int(line.split()[1])

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM) to the current one
    before = status("VmRSS:")
    with path:
        step(loss, *inputs, autocast, *extra)
    queue.put((status("VmHWM:") - before) / 2**10)  # kB -> MiB


def cpu_peaks(names: list[str], shape: tuple[int, ...], autocast: bool, threads: int) -> dict[str, float]:
    """name -> peak MiB one forward + backward adds on the CPU, each measured in its own process."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    peaks = {}
    for name in names:
        queue = context.Queue()
        process = context.Process(target=_cpu_peak_child, args=(name, shape, autocast, threads, queue))
        process.start()
        peaks[name] = queue.get()
        process.join()
    return peaks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES,
                        help="BxS images or BxTxS video; S a multiple of 32, at least 64 (the snippets need it)")
    parser.add_argument("--memory", action="store_true", help="on a CPU, measure peak memory (a process per loss)")
    add_device_arguments(parser, sizes=False)
    args = parser.parse_args(argv)
    cases = parse_cases(parser, args.cases, parse_case)
    device, dtype = device_and_dtype(args)
    autocast = dtype != torch.float32
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {device}, "
          f"{'bfloat16 autocast' if autocast else 'float32'}, forward + backward, minimum of {args.repeats}")
    print(f"{'case':<16}{'loss':<22}{'ms':>10}{'peak MiB':>10}{'baseline':>22}{'ratio':>8}")
    generator = torch.Generator().manual_seed(0)
    for text, shape in cases:
        pred, target = (torch.rand(shape, generator=generator).to(device) for _ in range(2))
        mask = patch_mask(shape, generator).to(device)
        flat = (pred.flatten(0, 1), target.flatten(0, 1)) if pred.dim() == 5 else (pred, target)
        calls: dict[str, Callable[[], None]] = {}
        for name, port in PORTS.items():
            calls[f"{name} (snippet)"] = partial(step, port, *flat, autocast)
            calls[f"{name} (preset)"] = partial(step, LapLoss.from_preset(name), *flat, autocast)
        ours = LapLoss(levels=5)
        calls["pyrtok"] = partial(step, ours, pred, target, autocast)
        calls["pyrtok + mask"] = partial(step, ours, pred, target, autocast, mask)
        calls["pyrtok (elementwise)"] = partial(elementwise_step, ours, pred, target, autocast)
        times, peaks_ = interleaved(calls, args.repeats, device)
        results = {name: (times[name], peaks_[name]) for name in calls}
        if args.memory and device.type == "cpu":
            peaks = cpu_peaks(list(calls), shape, autocast, args.threads)
            results = {name: (ms, peaks[name]) for name, (ms, _) in results.items()}
        fastest = min((name for name in results if name.endswith("(snippet)")), key=lambda n: results[n][0])
        for name, (ms, peak) in results.items():
            baseline = fastest if name.startswith("pyrtok") else name.replace("(preset)", "(snippet)")
            baseline = "pyrtok" if name == "pyrtok (elementwise)" else baseline
            ratio = "" if name == baseline else f"{ms / results[baseline][0]:.2f}"
            print(f"{text:<16}{name:<22}{ms:>10.1f}{peak:>10.0f}{baseline if ratio else '':>22}{ratio:>8}",
                  flush=True)


if __name__ == "__main__":
    run_script(main)
