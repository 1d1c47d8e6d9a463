"""Time to first token of two VLM architectures at several token budgets, split into their stages.

Both models have random weights and are sized to run on a CPU:

- ``llava``: LLaVA-1.5-style: a CLIP ViT-B tower (hidden 768, 12 layers, patch 14) at 336 px, which gives
  LLaVA's 576 patch tokens, a 2-layer projector and a Llama decoder of 8 layers at hidden size 1024. Budgets
  192, 128, 64 of a 3-level feature pyramid (576 + 144 + 36 tokens).
- ``qwen2_5_vl``: Qwen2.5-VL-shaped: a native-resolution tower (hidden 640, 8 layers, patch 14, window
  attention with full attention in blocks 4 and 8, 2x2 merger) on an 896 x 896 image, which gives 1,024 merged
  tokens, and a Qwen2 decoder of 4 layers at hidden size 1024 with M-RoPE. Budgets 1/3, 1/4 and 1/8 of them
  (341, 256, 128) of a 3-level feature pyramid (1,024 + 256 + 64 tokens).

The full-token run of each is the plain grid (allocator ``all``, one level). For each run, in the same
process, on the same image and prompt, through pyrtok's public API:

- vision: ``encode`` (the tower forward and the pooled levels);
- allocation: ``select`` (signals + selection);
- LLM prefill: ``prepare`` (prompt expansion, positions) and the language model's forward over the prompt,
  keeping the KV cache, up to the logits of the first new token;
- FLOPs of the prefill from :mod:`pyrtok.vlm.flops`.

Ratios are against the full-token run of the same model; the ideal prefill speed-up is the ratio of prompt
lengths. Targets: prefill speed-up at 1/8 of the tokens (64 for LLaVA, 128 for Qwen) >= 80% of ideal,
allocation <= 2% of time to first token.

On the LLaVA-shaped model a second table times in-LLM dropping (:mod:`pyrtok.vlm.decode`'s layer loop, last
position's logits only) against the plain forward over all 576 tokens: FastV after layer 2 keeping 50% and 25%,
PyramidDrop at layers 2, 4, 6 keeping 50% each (8/16/24 of 32 layers, scaled to 8), DART after layer 2 keeping
25%, and laplacian to 192 tokens with and without those PyramidDrop stages. FLOPs come from the per-layer token
counts (:func:`pyrtok.vlm.decode.scheduled_flops`); the ideal speed-up is the full run's FLOPs over the row's.
Target: FastV 25% and PyramidDrop >= 80% of ideal. The loop without a schedule shows the loop's own overhead.

    python benchmarks/bench_prefill.py [--models llava qwen2_5_vl] [--repeats 9] [--allocators laplacian pool]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from pyrtok.embedded import word_tokenizer
from pyrtok.testing import save_tiny_vlm
from pyrtok.vlm import PyramidVLM, resolve_schedule
from pyrtok.vlm.decode import prefill, scheduled_flops
from pyrtok.vlm.flops import llm_prefill_flops

QUESTION = " ".join(["describe the picture in detail ."] * 6)
# (label, allocator, budget, schedule spec): the in-LLM rows on the 8-layer LLaVA-shaped model; schedule None
# with label "loop" runs the layer loop with no stage, None otherwise the plain forward
SCHEDULE_ROWS = [
    ("all (full grid)", "all", 576, None),
    ("loop, no schedule", "all", 576, "loop"),
    ("fastv L2 50%", "all", 576, {"name": "fastv", "layer": 2, "keep": 0.5}),
    ("fastv L2 25%", "all", 576, {"name": "fastv", "layer": 2, "keep": 0.25}),
    ("pdrop 2/4/6 50%", "all", 576, {"name": "pdrop", "layers": [2, 4, 6], "keep": 0.5}),
    ("dart L2 25%", "all", 576, {"name": "dart", "layer": 2, "keep": 0.25}),
    ("laplacian", "laplacian", 192, None),
    ("laplacian+pdrop", "laplacian", 192, {"name": "pdrop", "layers": [2, 4, 6], "keep": 0.5}),
]


def build_llava(seed: int = 0) -> tuple[LlavaForConditionalGeneration, object]:
    torch.manual_seed(seed)
    tokenizer = word_tokenizer("user assistant describe the picture in detail .".split())
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, image_size=336, patch_size=14),
        text_config=LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                                max_position_embeddings=2048, pad_token_id=0, bos_token_id=2, eos_token_id=3),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
    )
    return LlavaForConditionalGeneration(config).eval(), tokenizer


def build_qwen(folder: str) -> PyramidVLM:
    save_tiny_vlm("qwen2_5_vl", folder, text_layers=4, hidden=1024,
                  vision_config={"depth": 8, "hidden_size": 640, "intermediate_size": 1728, "num_heads": 10,
                                 "window_size": 112, "fullatt_block_indexes": [3, 7]},
                  text_config={"intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 2,
                               "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                   "mrope_section": [8, 12, 12]}})  # head_dim 64
    vlm = PyramidVLM.from_pretrained(folder)
    factor = 28
    vlm.family.image_processor.size = {"shortest_edge": 4 * factor**2, "longest_edge": 1024 * factor**2}
    return vlm


def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


@torch.no_grad()
def run(vlm: PyramidVLM, image: Image.Image, prompt: str, budget: int, repeats: int) -> dict[str, float]:
    vision, allocation, prefill, length = [], [], [], 0
    for _ in range(repeats + 1):  # the first pass warms up
        start = time.perf_counter()
        encoded = vlm.encode([image])
        t_vision = time.perf_counter()
        selections = vlm.select(encoded, budget)
        t_alloc = time.perf_counter()
        inputs = vlm.prepare(None, [prompt], encoded=encoded, selections=selections)
        vlm.model(**inputs.model_inputs(),
                  use_cache=True, logits_to_keep=1)
        t_prefill = time.perf_counter()
        vision.append(t_vision - start)
        allocation.append(t_alloc - t_vision)
        prefill.append(t_prefill - t_alloc)
        length = inputs.input_ids.shape[1]
    return {"vision": median_ms(vision[1:]), "allocation": median_ms(allocation[1:]),
            "prefill": median_ms(prefill[1:]), "prompt_tokens": length}


def report(title: str, full: dict[str, float], rows: list[tuple[str, int, dict[str, float]]], text_config) -> None:
    print(f"\n{title}")
    header = (f"{'allocator':<18}{'K':>5}{'prompt':>8}{'vision':>9}{'alloc':>8}{'prefill':>9}{'TTFT':>9}"
              f"{'prefill TFLOPs':>16}{'prefill x':>11}{'ideal x':>9}{'% ideal':>9}{'alloc %':>9}")
    print(header + "   (times in ms)")
    for name, budget, r in rows:
        ttft = r["vision"] + r["allocation"] + r["prefill"]
        speedup = full["prefill"] / r["prefill"]
        ideal = full["prompt_tokens"] / r["prompt_tokens"]
        flops = llm_prefill_flops(text_config, r["prompt_tokens"])
        print(f"{name:<18}{budget:>5}{r['prompt_tokens']:>8}{r['vision']:>9.0f}{r['allocation']:>8.1f}"
              f"{r['prefill']:>9.0f}{ttft:>9.0f}{flops / 1e12:>16.3f}{speedup:>11.2f}{ideal:>9.2f}"
              f"{100 * speedup / ideal:>9.0f}{100 * r['allocation'] / ttft:>9.2f}", flush=True)


@torch.no_grad()
def run_scheduled(vlm: PyramidVLM, image: Image.Image, prompt: str, budget: int, schedule: object,
                  repeats: int) -> dict[str, object]:
    """Median prefill ms (prompt preparation and the language model up to the first token's logits) of one
    schedule (None: the model's own forward; "loop": the layer loop with no stage), and the (L,) tokens each
    decoder layer ran on."""
    encoded = vlm.encode([image])
    selections = vlm.select(encoded, budget)
    resolved = None if schedule in (None, "loop") else resolve_schedule(schedule)
    times, layer_tokens = [], None
    for _ in range(repeats + 1):  # the first pass warms up
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
        times.append(time.perf_counter() - start)
    return {"prefill": median_ms(times[1:]), "layer_tokens": layer_tokens}


def bench_schedules(make: callable, image: Image.Image, prompt: str, repeats: int, title: str) -> None:
    """Print the in-LLM table: :data:`SCHEDULE_ROWS`, each against the first (the plain full forward)."""
    print(f"\n{title}")
    print(f"{'row':<20}{'K':>5}{'tokens per layer':>34}{'prefill':>9}{'TFLOPs':>9}{'prefill x':>11}"
          f"{'FLOPs x':>9}{'% ideal':>9}   (times in ms)")
    full = None
    for label, allocator, budget, schedule in SCHEDULE_ROWS:
        vlm = make(allocator)
        r = run_scheduled(vlm, image, prompt, budget, schedule, repeats)
        flops = float(scheduled_flops(vlm.model.config, r["layer_tokens"][None])[0])
        full = full or (r["prefill"], flops)
        speedup, ideal = full[0] / r["prefill"], full[1] / flops
        counts = "/".join(str(int(t)) for t in r["layer_tokens"])
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llava", "qwen2_5_vl"], choices=["llava", "qwen2_5_vl"])
    parser.add_argument("--repeats", type=int, default=9)  # 3 left the 1/8 rows within noise of the target
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allocators", nargs="+", default=["laplacian", "pool", "random"])
    parser.add_argument("--skip-schedules", action="store_true", help="leave out the in-LLM dropping table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float32 CPU, median of {args.repeats}")
    generator = torch.Generator().manual_seed(0)
    if "llava" in args.models:
        model, tokenizer = build_llava()
        image = Image.fromarray((torch.rand(336, 336, 3, generator=generator) * 255).byte().numpy())
        prompt = f"USER: <image> {QUESTION} ASSISTANT:"
        bench(PyramidVLM(model, tokenizer, allocator="all", levels=1),
              lambda name: PyramidVLM(model, tokenizer, allocator=name, levels=3), image, prompt, 576,
              [192, 128, 64], args.allocators, args.repeats, "LLaVA-1.5-style (576 patch tokens)")
        if not args.skip_schedules:
            views = {"all": PyramidVLM(model, tokenizer, allocator="all", levels=1),
                     "laplacian": PyramidVLM(model, tokenizer, allocator="laplacian", levels=3)}
            bench_schedules(views.__getitem__, image, prompt, args.repeats,
                            "LLaVA-1.5-style, in-LLM dropping (8 decoder layers, 576 image tokens)")
    if "qwen2_5_vl" in args.models:
        with tempfile.TemporaryDirectory() as folder:
            full = build_qwen(folder)
            image = Image.fromarray((torch.rand(896, 896, 3, generator=generator) * 255).byte().numpy())
            prompt = full.chat_prompt(QUESTION)

            def make(name: str) -> PyramidVLM:
                return PyramidVLM(full.model, full.processor, allocator=name, levels=3)

            make_full = PyramidVLM(full.model, full.processor, allocator="all", levels=1)
            bench(make_full, make, image, prompt, 1024, [341, 256, 128], args.allocators, args.repeats,
                  "Qwen2.5-VL-shaped (1,024 merged tokens)")


if __name__ == "__main__":
    main()
