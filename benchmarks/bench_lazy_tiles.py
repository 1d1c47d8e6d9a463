"""Lazy tiles on a LLaVA-NeXT-shaped model: vision time and FLOPs against encoding every tile, in one run.

Model: ``LlavaNextForConditionalGeneration`` with random weights (:func:`pyrtok.testing.save_tiny_vlm`, saved to
a temporary folder with its processor): a CLIP ViT-B/14-like tower (hidden 768, 12 layers, 12 heads, MLP 3072,
336 px, patch 14: 24 x 24 = 576 patches per view), LLaVA-NeXT's pinpoints [[336, 672], [672, 336], [672, 672],
[1008, 336], [336, 1008]] and a small Llama (hidden 256, 2 layers). Images (``--scenes``), each 672 x 672, so
2 x 2 tiles + the base view: 576 base + 2304 tile tokens:

- ``photo``: a photograph (a bundled sample, random pixels if none is installed), detail everywhere;
- ``object``: the same photograph at half the side in one quadrant of a flat grey canvas (an object on a plain
  background, as in product shots, documents with margins or screenshots), detail in one tile.

Baseline (``eager``): ``encode`` runs the tower on the base view and all 4 tiles, then the allocator
chooses and the kept tokens' language-model inputs are built (``family.kept_features``). ``lazy``
(``lazy_tiles=True``): ``encode`` runs the base view only, the allocator chooses, and ``complete``
encodes only the tiles under kept tile tokens. Vision time = encode + allocate + kept features (everything
before the language model), the median of ``--repeats`` runs after one warm-up, eager and lazy interleaved in
every round so that background load on a shared machine reaches both. Vision FLOPs are the family's count
(``EncodedBatch.vision_flops``: the tower's forward FLOPs per view encoded). Ratios are lazy / eager of the same run.

Allocators: ``laplacian`` and ``saliency`` read pixels only, so the lazy selection is exactly the eager one
(checked: "same"); ``pool`` scores features, so lazily it chooses from the base view (tile tokens carry the
base-view feature under them) and its selection may differ.

``--device`` / ``--dtype`` run it elsewhere (on a GPU, bfloat16 by default); ``--size 7b`` takes LLaVA-NeXT-7B's
shapes (CLIP ViT-L/14 at 336 px and a 32-layer, 4096-wide Llama, :mod:`presets`) with these pinpoints, ``toy``
the sizes the tests run (56 px tiles).

    python benchmarks/bench_lazy_tiles.py [--repeats 3] [--threads 2] [--budgets 1.0 0.5 0.25 0.1]
        [--size cpu|7b|toy] [--device cuda] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from einops import rearrange
from PIL import Image
from presets import add_device_arguments, device_and_dtype, model_kwargs, run_script

from pyrtok._timing import sync
from pyrtok.samples import available_samples, sample_image
from pyrtok.testing import build_vlm
from pyrtok.vlm import PyramidVLM

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TOWER = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
         "image_size": 336, "patch_size": 14, "projection_dim": 768}


def build(size: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, object]:
    """The NeXT-shaped random model and its processor (``cpu``: a ViT-B-sized tower and a small Llama)."""
    if size == "cpu":
        options = {"hidden": 256, "text_layers": 2, "vision_config": TOWER, "image_grid_pinpoints": PINPOINTS}
    else:
        options = model_kwargs("llava_next", size)
        if size == "7b":
            options["image_grid_pinpoints"] = PINPOINTS
    model, processor = build_vlm("llava_next", device=device, dtype=dtype, **options)
    return model.to(device), processor


def photo(side: int) -> Image.Image:
    """A ``side`` x ``side`` RGB photograph (random pixels where no sample is installed)."""
    if "astronaut" in available_samples():
        pixels = (sample_image("astronaut", side) * 255).round().to(torch.uint8)
    else:
        pixels = torch.randint(0, 256, (3, side, side), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return Image.fromarray(rearrange(pixels, "c h w -> h w c").numpy())


def object_on_plain(image: Image.Image) -> Image.Image:
    """``image`` at half its side in the top-left quadrant of a flat mid-grey canvas of its size."""
    canvas = Image.new("RGB", image.size, (128, 128, 128))
    canvas.paste(image.resize((image.width // 2, image.height // 2), Image.BICUBIC), (0, 0))
    return canvas


def vision_pass(vlm: PyramidVLM, image: Image.Image, budget: float) -> tuple[torch.Tensor, float]:
    """Everything before the language model for one image: (kept indices (K,), vision FLOPs)."""
    encoded = vlm.encode([image])
    (selection,) = vlm.select(encoded, budget=budget)
    completed = vlm.complete(encoded, [selection])
    vlm.family.kept_features(completed.groups[0][1], selection)
    return selection.index[0, : int(selection.count[0])], completed.vision_flops()[0]


def timed(fn, device: torch.device) -> tuple[object, float]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    parser.add_argument("--allocators", nargs="+", default=["laplacian", "saliency", "pool"])
    parser.add_argument("--scenes", nargs="+", default=["photo", "object"], choices=["photo", "object"])
    add_device_arguments(parser)
    args = parser.parse_args()
    device, dtype = device_and_dtype(args)
    torch.set_num_threads(args.threads)
    with torch.no_grad():
        model, processor = build(args.size, device, dtype)
        side = 2 * int(model.config.vision_config.image_size)  # 2 x 2 tiles
        scenes = {"photo": photo(side)}
        scenes["object"] = object_on_plain(scenes["photo"])
        tower = sum(p.numel() for p in model.model.vision_tower.parameters()) / 1e6
        print(f"LLaVA-NeXT-shaped random model ({args.size}): CLIP tower {tower:.0f}M parameters at "
              f"{side // 2} px, image {side}x{side}, {dtype} on {device}, {args.threads} threads, median of "
              f"{args.repeats} runs after one warm-up")
        rows = []
        for scene, name in ((scene, name) for scene in args.scenes for name in args.allocators):
            image = scenes[scene]
            eager = PyramidVLM(model, processor, allocator=name, views="joint")  # lazy tiles choose jointly
            lazy = PyramidVLM(model, processor, allocator=name, lazy_tiles=True)
            for budget in args.budgets:
                times: dict[str, list[float]] = {"eager": [], "lazy": []}
                results = {}
                for round_ in range(args.repeats + 1):  # round 0 warms up
                    for label, vlm in (("eager", eager), ("lazy", lazy)):
                        results[label], seconds = timed(
                            lambda vlm=vlm, budget=budget, image=image: vision_pass(vlm, image, budget), device)
                        if round_:
                            times[label].append(seconds)
                (eager_index, eager_flops), (lazy_index, lazy_flops) = results["eager"], results["lazy"]
                same = torch.equal(eager_index, lazy_index)
                eager_s, lazy_s = statistics.median(times["eager"]), statistics.median(times["lazy"])
                tiles = round((lazy_flops / eager_flops) * 5 - 1)
                rows.append((scene, name, budget, len(lazy_index), tiles, eager_s, lazy_s, lazy_s / eager_s,
                             lazy_flops / eager_flops, "same" if same else "differs"))
                print(f"  {scene} {name} {budget:.0%}: eager {eager_s:.2f} s, lazy {lazy_s:.2f} s", flush=True)
        print()
        print("| image | allocator | budget | kept tokens | tiles encoded (of 4) | eager s | lazy s | time ratio | "
              "FLOPs ratio | selection |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for scene, name, budget, kept, tiles, eager_s, lazy_s, time_ratio, flops_ratio, same in rows:
            print(f"| {scene} | {name} | {budget:.0%} | {kept} | {tiles} | {eager_s:.2f} | {lazy_s:.2f} | "
                  f"{time_ratio:.2f} | {flops_ratio:.2f} | {same} |")


if __name__ == "__main__":
    run_script(main)
