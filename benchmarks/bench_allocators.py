"""Allocator cost next to the vision encoder: every registered allocator vs one CLIP ViT-B/16 forward pass.

For each resolution R (224, 336) and batch size B (1, 16), the token set of a ViT-B/16 at R is built from random
D = 768 patch features: the (R/16) x (R/16) patch grid pooled 2 x 2 twice by ``from_feature_grid(levels=3)``,
i.e. 14x14 + 7x7 + 4x4 = 261 tokens at 224 and 21x21 + 11x11 + 6x6 = 598 tokens at 336, with a [CLS]
attention map (softmax of random logits). Building the tokens is not timed.

Each allocator is timed end to end: one call ``allocator(tokens, budget, image=..., query=...)``, which computes
every signal it needs from its inputs (saliency maps, Laplacian band energies, difficulty, query relevance) and
then the priorities, level quotas and top-k. Inputs: ``image`` = bundled photographs resized to R x R, in
[0, 1], cycled to fill the batch (random pixels if no photograph is installed), given to every allocator
(those that do not use it ignore it; ``foveated`` fixates on its saliency peak); ``query`` = a random (B, 768)
vector, given only to allocators that need one; the budget is ``--budget-fraction`` of the tokens.

The reference is one forward pass of ``transformers.CLIPVisionModel`` ViT-B/16 with random weights, built from
``CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
image_size=R, patch_size=16)`` (eval mode, ``torch.no_grad``) on the same (B, 3, R, R) batch, measured in the
same run. Everything runs on ``--device`` in ``--dtype`` (default: the CPU in float32 with ``--threads`` threads,
default 2; on a GPU, bfloat16; images stay float32, token features and CLIP take the dtype). Timings are the median
of ``--repeats`` runs after ``--warmup`` runs (CLIP: ``--clip-repeats`` after one warm-up run, since a batch of
16 at 336 takes seconds per pass). The runs of one (R, B) case are interleaved: every round runs each allocator
once, and CLIP's runs are spread evenly over the rounds, so that a burst of background load on a shared machine
neither lands on one allocator only nor misses the reference.
The ratio is allocator ms / CLIP ms; rows above the 2 % target are flagged.

    python benchmarks/bench_allocators.py [--repeats 20] [--batches 1 16] [--resolutions 224 336]
                                          [--allocators saliency laplacian] [--clip-repeats 3]
                                          [--device cuda] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
import transformers
from presets import add_device_arguments, device_and_dtype, run_script
from transformers import CLIPVisionConfig, CLIPVisionModel

from pyrtok import allocators
from pyrtok._timing import sync
from pyrtok.samples import available_samples, sample_image
from pyrtok.tokens import MultiScaleTokens, from_feature_grid

PATCH, DIM, LEVELS, TARGET = 16, 768, 3, 0.02


def interleaved_median_ms(calls: dict[str, tuple[Callable[[], object], int, int]],
                          device: torch.device | None = None) -> dict[str, float]:
    """Median ms of each ``name: (fn, repeats, warmup)``, timed in interleaved rounds (with the work queued on
    ``device`` finished before each clock read).

    After every warm-up, round r runs each call once if r is one of its ``repeats`` rounds, spread evenly over
    the ``max(repeats)`` rounds. A burst of background load on a shared machine then spreads over all calls, and
    the encoder's few runs span the same time window as the allocators' many runs.
    """
    for fn, _, warmup in calls.values():
        for _ in range(warmup):
            fn()
    rounds = max(repeats for _, repeats, _ in calls.values())
    chosen = {
        name: {int(i * (rounds - 1) / (repeats - 1) + 0.5) for i in range(repeats)} if repeats > 1 else {rounds // 2}
        for name, (_, repeats, _) in calls.items()
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds):
        for name, (fn, _, _) in calls.items():
            if r in chosen[name]:
                if device is not None:
                    sync(device)
                start = time.perf_counter()
                fn()
                if device is not None:
                    sync(device)
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def clip_model(resolution: int) -> CLIPVisionModel:
    config = CLIPVisionConfig(hidden_size=DIM, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=resolution, patch_size=PATCH)
    return CLIPVisionModel(config).eval()


def photo_batch(batch: int, resolution: int, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, R, R) in [0, 1]: the bundled photographs, cycled; random pixels if none is installed."""
    names = available_samples()
    if not names:
        return torch.rand(batch, 3, resolution, resolution, generator=generator)
    photos = [sample_image(name, resolution) for name in names[: min(batch, len(names))]]
    return torch.stack([photos[b % len(photos)] for b in range(batch)])


def vit_tokens(batch: int, resolution: int, generator: torch.Generator) -> MultiScaleTokens:
    """The 3-level token set of a ViT-B/16 at ``resolution``, with random features and [CLS] attention."""
    side = resolution // PATCH
    features = torch.randn(batch, side, side, DIM, generator=generator)
    logits = torch.randn(batch, side * side, generator=generator)
    attention = F.softmax(logits, dim=1).view(batch, side, side)
    return from_feature_grid(features, LEVELS, patch_size=PATCH, attention=attention)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per allocator (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per allocator before timing")
    parser.add_argument("--clip-repeats", type=int, default=3, help="timed CLIP forward passes (after 1 warm-up)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[224, 336])
    parser.add_argument("--allocators", nargs="+", default=allocators.available(), choices=allocators.available(),
                        metavar="NAME", help=f"subset of {allocators.available()} (default: all)")
    parser.add_argument("--budget-fraction", type=float, default=0.25, help="budget as a fraction of the tokens")
    parser.add_argument("--threads", type=int, default=2)
    add_device_arguments(parser, sizes=False)
    args = parser.parse_args()
    device, dtype = device_and_dtype(args)
    for resolution in args.resolutions:
        if resolution < 2 * PATCH or resolution % PATCH:
            parser.error(f"--resolutions must be multiples of {PATCH} and >= {2 * PATCH}, got {resolution}")
    if min(args.batches) < 1 or args.repeats < 1 or args.clip_repeats < 1 or args.warmup < 0:
        parser.error("--batches, --repeats and --clip-repeats must be >= 1 and --warmup >= 0")
    if not 0 < args.budget_fraction <= 1:
        parser.error(f"--budget-fraction must be in (0, 1], got {args.budget_fraction}")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, {dtype} on "
          f"{device}; "
          f"allocators: median of {args.repeats} after {args.warmup} warm-up runs; "
          f"CLIP ViT-B/16 forward: median of {args.clip_repeats} after 1\n")
    header = f"{'allocator':<15}{'res':>5}{'batch':>6}{'tokens':>8}{'budget':>8}{'ms':>10}{'CLIP ms':>10}{'ratio %':>9}"
    print(header)
    print("-" * len(header))
    generator = torch.Generator().manual_seed(0)
    above = 0
    with torch.no_grad():
        for resolution in args.resolutions:
            model = clip_model(resolution).to(device, dtype)
            for batch in args.batches:
                image = photo_batch(batch, resolution, generator).to(device)
                tokens = vit_tokens(batch, resolution, generator).to(device)
                tokens = tokens.with_features(tokens.features.to(dtype))
                query = torch.randn(batch, DIM, generator=generator).to(device)
                budget = max(1, round(args.budget_fraction * tokens.num_tokens))
                calls = {"<clip>": (partial(model, pixel_values=image.to(dtype)), args.clip_repeats, 1)}
                for name in args.allocators:
                    allocator = allocators.create(name)
                    inputs = {"image": image, "query": query if "query" in allocator.needs else None}
                    calls[name] = (partial(allocator, tokens, budget, **inputs), args.repeats, args.warmup)
                medians = interleaved_median_ms(calls, device)
                clip = medians.pop("<clip>")
                for name, ms in medians.items():
                    ratio = 100 * ms / clip
                    flag = f"  > {100 * TARGET:g}% target" if ratio > 100 * TARGET else ""
                    above += bool(flag)
                    print(f"{name:<15}{resolution:>5}{batch:>6}{tokens.num_tokens:>8}{budget:>8}{ms:>10.2f}"
                          f"{clip:>10.1f}{ratio:>9.2f}{flag}", flush=True)
            del model
    print(f"\n{above} row(s) above the {100 * TARGET:g}% target")
    untimed = sorted(set(allocators.available()) - set(args.allocators))
    print(f"not timed (registered but not selected): {untimed}" if untimed
          else f"every registered allocator timed ({len(allocators.available())})")


if __name__ == "__main__":
    run_script(main)
