"""Time to first token of VLM architectures at several token budgets, split into their stages.

Models have random weights, at a size preset (``--size``, :mod:`presets`): ``cpu`` (default) runs on 2 CPU
threads, ``7b`` builds the real shapes (LLaVA-1.5-7B, LLaVA-NeXT-7B with 2 x 2 tiles, Qwen2.5-VL-7B) for a GPU
(``--device cuda --dtype bfloat16``, the defaults there), ``toy`` is what the tests run:

- ``llava``: LLaVA-1.5-style: a CLIP tower at 336 px (576 patch tokens), a 2-layer projector and a Llama
  decoder (cpu: ViT-B and 8 layers at 1024; 7b: ViT-L/14 and 32 layers at 4096). Budgets 1/3, 2/9 and 1/9 of
  the patches (192, 128, 64) of a 3-level feature pyramid (576 + 144 + 36 tokens).
- ``llava_next``: the same tower and decoder with any-resolution tiles: a 672 x 672 image takes 2 x 2 tiles of
  336 px plus the base view (2,304 + 576 tokens and 48 row newlines). Budgets 1/3, 2/9, 1/9 of the tokens.
- ``qwen2_5_vl``: Qwen2.5-VL-shaped: a native-resolution tower with window attention and the 2x2 merger on an
  896 x 896 image (1,024 merged tokens) and a Qwen2 decoder with M-RoPE (cpu: 8 blocks at 640, 4 layers at
  1024; 7b: 32 blocks at 1280, 28 layers at 3584). Budgets 1/3, 1/4 and 1/8 (341, 256, 128).

The full-token run of each is the plain grid (allocator ``all``, one level). For each run, in the same
process, on the same image and prompt, through pyrtok's public API:

- vision: ``encode`` (the tower forward and the pooled levels);
- allocation: ``select`` (signals + selection);
- LLM prefill: ``prepare`` (prompt expansion, positions) and the language model's forward over the prompt,
  keeping the KV cache, up to the logits of the first new token;
- FLOPs of the prefill from :mod:`pyrtok.vlm.flops`; peak device memory on a GPU.

Ratios are against the full-token run of the same model; the ideal prefill speed-up is the ratio of prompt
lengths. Targets: prefill speed-up at 1/8-1/9 of the tokens >= 80% of ideal, allocation <= 2% of time to
first token.

On the LLaVA-shaped model a second table times in-LLM dropping (:mod:`pyrtok.vlm.decode`'s layer loop, last
position's logits only) against the plain forward over all 576 tokens: FastV after layer 2 keeping 50% and
25%, PyramidDrop at layers L/4, L/2, 3L/4 keeping 50% each (8/16/24 of 32 layers), DART after layer 2 keeping
25%, and laplacian to 192 tokens with and without those PyramidDrop stages. FLOPs come from the
per-layer token counts (:func:`pyrtok.vlm.decode.scheduled_flops`); the ideal speed-up is the full run's FLOPs
over the row's. Target: FastV 25% and PyramidDrop >= 80% of ideal. The loop without a schedule shows the loop's
own overhead.

    python benchmarks/bench_prefill.py [--models llava llava_next qwen2_5_vl] [--size cpu|7b|toy]
        [--device cuda] [--dtype bfloat16] [--repeats 9] [--allocators laplacian pool]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image
from presets import IMAGE_SIZES, add_device_arguments, device_and_dtype, model_kwargs, run_script

from pyrtok._timing import sync
from pyrtok.testing import build_vlm
from pyrtok.vlm import PyramidVLM, resolve_schedule
from pyrtok.vlm.decode import prefill, scheduled_flops
from pyrtok.vlm.flops import llm_prefill_flops

QUESTION = " ".join(["describe the picture in detail ."] * 6)
MODELS = ("llava", "llava_next", "qwen2_5_vl")
FRACTIONS = {"llava": (1 / 3, 2 / 9, 1 / 9), "llava_next": (1 / 3, 2 / 9, 1 / 9), "qwen2_5_vl": (1 / 3, 1 / 4, 1 / 8)}


def schedule_rows(layers: int) -> list[tuple[str, str, float, object]]:
    """(label, allocator, budget fraction, schedule spec) of the in-LLM table for a decoder of ``layers`` layers
    (FastV and DART after layer 2, as published, or 1 on a 2-layer model; PyramidDrop at 1/4, 1/2 and 3/4 of the
    depth, 8/16/24 of 32); schedule None is the plain forward, "loop" the layer loop with no stage."""
    early, pdrop = min(2, layers - 1), sorted({max(1, layers * k // 4) for k in (1, 2, 3)})
    return [
        ("all (full grid)", "all", 1.0, None),
        ("loop, no schedule", "all", 1.0, "loop"),
        (f"fastv L{early} 50%", "all", 1.0, {"name": "fastv", "layer": early, "keep": 0.5}),
        (f"fastv L{early} 25%", "all", 1.0, {"name": "fastv", "layer": early, "keep": 0.25}),
        (f"pdrop {'/'.join(map(str, pdrop))} 50%", "all", 1.0, {"name": "pdrop", "layers": pdrop, "keep": 0.5}),
        (f"dart L{early} 25%", "all", 1.0, {"name": "dart", "layer": early, "keep": 0.25}),
        ("laplacian", "laplacian", 1 / 3, None),
        ("laplacian+pdrop", "laplacian", 1 / 3, {"name": "pdrop", "layers": pdrop, "keep": 0.5}),
    ]


def build(family: str, size: str, device: torch.device, dtype: torch.dtype) -> PyramidVLM:
    """A random-weight model of ``family`` at ``size`` on ``device`` in ``dtype``, wrapped (allocator ``all``)."""
    model, processor = build_vlm(family, device=device, dtype=dtype, **model_kwargs(family, size))
    vlm = PyramidVLM(model.to(device), processor)
    if family == "qwen2_5_vl":  # let the image keep its native size up to 1,024 merged tokens
        factor = 28
        vlm.family.image_processor.size = {"shortest_edge": 4 * factor**2, "longest_edge": 1024 * factor**2}
    return vlm


def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


@torch.no_grad()
def run(vlm: PyramidVLM, image: Image.Image, prompt: str, budget: int, repeats: int) -> dict[str, float]:
    vision, allocation, prefill, length = [], [], [], 0
    device = vlm.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats + 1):  # the first pass warms up
        sync(device)
        start = time.perf_counter()
        encoded = vlm.encode([image])
        sync(device)
        t_vision = time.perf_counter()
        selections = vlm.select(encoded, budget)
        sync(device)
        t_alloc = time.perf_counter()
        inputs = vlm.prepare(None, [prompt], encoded=encoded, selections=selections)
        vlm.model(**inputs.model_inputs(),
                  use_cache=True, logits_to_keep=1)
        sync(device)
        t_prefill = time.perf_counter()
        vision.append(t_vision - start)
        allocation.append(t_alloc - t_vision)
        prefill.append(t_prefill - t_alloc)
        length = inputs.input_ids.shape[1]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"vision": median_ms(vision[1:]), "allocation": median_ms(allocation[1:]),
            "prefill": median_ms(prefill[1:]), "prompt_tokens": length, "peak_gib": peak}


def report(title: str, full: dict[str, float], rows: list[tuple[str, int, dict[str, float]]], text_config) -> None:
    print(f"\n{title}")
    header = (f"{'allocator':<18}{'K':>5}{'prompt':>8}{'vision':>9}{'alloc':>8}{'prefill':>9}{'TTFT':>9}"
              f"{'prefill TFLOPs':>16}{'prefill x':>11}{'ideal x':>9}{'% ideal':>9}{'alloc %':>9}{'peak GiB':>10}")
    print(header + "   (times in ms)")
    for name, budget, r in rows:
        ttft = r["vision"] + r["allocation"] + r["prefill"]
        speedup = full["prefill"] / r["prefill"]
        ideal = full["prompt_tokens"] / r["prompt_tokens"]
        flops = llm_prefill_flops(text_config, r["prompt_tokens"])
        print(f"{name:<18}{budget:>5}{r['prompt_tokens']:>8}{r['vision']:>9.0f}{r['allocation']:>8.1f}"
              f"{r['prefill']:>9.0f}{ttft:>9.0f}{flops / 1e12:>16.3f}{speedup:>11.2f}{ideal:>9.2f}"
              f"{100 * speedup / ideal:>9.0f}{100 * r['allocation'] / ttft:>9.2f}{r['peak_gib']:>10.2f}", flush=True)


@torch.no_grad()
def run_scheduled(vlm: PyramidVLM, image: Image.Image, prompt: str, budget: int, schedule: object,
                  repeats: int) -> dict[str, object]:
    """Median prefill ms (prompt preparation and the language model up to the first token's logits) of one
    schedule (None: the model's own forward; "loop": the layer loop with no stage), and the (L,) tokens each
    decoder layer ran on."""
    encoded = vlm.encode([image])
    selections = vlm.select(encoded, budget)
    resolved = None if schedule in (None, "loop") else resolve_schedule(schedule)
    times, layer_tokens, device = [], None, vlm.device
    for _ in range(repeats + 1):  # the first pass warms up
        sync(device)
        start = time.perf_counter()
        inputs = vlm.prepare(None, [prompt], encoded=encoded, selections=selections)
        if schedule is None:
            vlm.model(**inputs.model_inputs(),
                      use_cache=True, logits_to_keep=1)
            layers = vlm.model.config.text_config.num_hidden_layers
            layer_tokens = torch.full((layers,), inputs.input_ids.shape[1])
        else:
            state = prefill(vlm.model, inputs.input_ids, inputs.attention_mask, inputs.position_ids,
                            vlm.image_token_id, resolved, inputs.mm_encoder_outputs, last_only=True)
            layer_tokens = state.layer_tokens[0]
        sync(device)
        times.append(time.perf_counter() - start)
    return {"prefill": median_ms(times[1:]), "layer_tokens": layer_tokens}


def bench_schedules(make: callable, image: Image.Image, prompt: str, tokens: int, repeats: int, title: str) -> None:
    """Print the in-LLM table (:func:`schedule_rows`), each row against the first (the plain full forward)."""
    print(f"\n{title}")
    print(f"{'row':<20}{'K':>5}{'tokens per layer':>34}{'prefill':>9}{'TFLOPs':>9}{'prefill x':>11}"
          f"{'FLOPs x':>9}{'% ideal':>9}   (times in ms)")
    full = None
    for label, allocator, fraction, schedule in schedule_rows(make("all").model.config.text_config.num_hidden_layers):
        vlm = make(allocator)
        budget = round(tokens * fraction)
        r = run_scheduled(vlm, image, prompt, budget, schedule, repeats)
        flops = float(scheduled_flops(vlm.model.config, r["layer_tokens"][None])[0])
        full = full or (r["prefill"], flops)
        speedup, ideal = full[0] / r["prefill"], full[1] / flops
        counts = "/".join(str(int(t)) for t in r["layer_tokens"])
        counts = counts if len(counts) <= 32 else counts[:29] + "..."
        print(f"{label:<20}{budget:>5}{counts:>34}{r['prefill']:>9.0f}{flops / 1e12:>9.3f}{speedup:>11.2f}"
              f"{ideal:>9.2f}{100 * speedup / ideal:>9.0f}", flush=True)


def bench(vlm_full: PyramidVLM, make: callable, image: Image.Image, prompt: str, full_tokens: int,
          budgets: list[int], allocators: list[str], repeats: int, title: str) -> None:
    full = run(vlm_full, image, prompt, full_tokens, repeats)
    rows = [("all (full grid)", full_tokens, full)]
    for name in allocators:
        vlm = make(name)
        for budget in budgets:
            rows.append((name, budget, run(vlm, image, prompt, budget, repeats)))
    report(title, full, rows, vlm_full.model.config.text_config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llava", "qwen2_5_vl"], choices=MODELS)
    parser.add_argument("--repeats", type=int, default=9)  # 3 left the 1/8 rows within noise of the target
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allocators", nargs="+", default=["laplacian", "pool", "random"])
    parser.add_argument("--skip-schedules", action="store_true", help="leave out the in-LLM dropping table")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    device, dtype = device_and_dtype(args)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {dtype} on {device}, size {args.size}, "
          f"median of {args.repeats}")
    generator = torch.Generator().manual_seed(0)
    for family in args.models:
        full = build(family, args.size, device, dtype)
        height, width = IMAGE_SIZES[family][args.size]
        image = Image.fromarray((torch.rand(height, width, 3, generator=generator) * 255).byte().numpy())
        prompt = full.chat_prompt(QUESTION)
        views = {"all": full}

        def make(name: str, views: dict = views, model: PyramidVLM = full) -> PyramidVLM:
            if name not in views:
                views[name] = PyramidVLM(model.model, model.processor, allocator=name, levels=3)
            return views[name]

        with torch.no_grad():
            tokens = full.encode([image]).num_tokens()[0]
        budgets = [round(tokens * f) for f in FRACTIONS[family]]
        bench(full, make, image, prompt, tokens, budgets, args.allocators, args.repeats,
              f"{family} at size {args.size} ({tokens} image tokens)")
        if family == "llava" and not args.skip_schedules:
            bench_schedules(make, image, prompt, tokens, args.repeats,
                            f"{family} at size {args.size}, in-LLM dropping ({tokens} image tokens)")
        del full, views


if __name__ == "__main__":
    run_script(main)
