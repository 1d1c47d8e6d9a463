"""Gemma 3 against references built without pyrtok's code path.

The tiny random-weight model is saved with its own processor (:func:`pyrtok.testing.save_tiny_vlm`: 64 px, 8 px
SigLIP patches pooled 2 x 2 to 16 soft tokens; a 4-layer language model alternating sliding-window (12 tokens)
and global layers). References are the processor's own prompt and pixels and the model's own
``get_image_features``, subset or pooled by hand; the contract every family keeps (full budget is the model,
batches, budgets, schedules) is ``tests/test_family_contract.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import chat, random_image
from einops import rearrange
from transformers.modeling_outputs import BaseModelOutputWithPooling

from pyrtok.tokens import TokenSelection
from pyrtok.vlm import PyramidVLM


@pytest.fixture
def gemma(tiny_vlm):
    _, model, processor = tiny_vlm("gemma3", text_layers=4)
    return model, processor


def reference_inputs(processor, image):
    """The processor's own input ids, token type ids and pixels for one image and the test question."""
    return processor(text=[chat(processor)], images=[image], return_tensors="pt")


def soft_tokens(model, pixel_values, kernel: int | None = None) -> torch.Tensor:
    """(N, D) the model's soft tokens of one image, or (with ``kernel``) its tower's patches pooled by ``kernel``
    before the projector's norm and projection, as a projector with that kernel would make them."""
    projector = model.model.multi_modal_projector
    with torch.no_grad():
        if kernel is None:
            return model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output[0]
        states = model.model.vision_tower(pixel_values=pixel_values).last_hidden_state
        side = int(states.shape[1] ** 0.5)
        grid = rearrange(states, "b (h w) d -> b d h w", h=side)
        pooled = rearrange(F.avg_pool2d(grid, kernel), "b d h w -> b (h w) d")
        return (projector.mm_soft_emb_norm(pooled) @ projector.mm_input_projection_weight)[0]


def test_the_prompt_is_the_processors_with_token_types(gemma):
    model, processor = gemma
    vlm = PyramidVLM(model, processor, allocator="all")
    image = random_image(67, 101, seed=1)
    expected = reference_inputs(processor, image)
    inputs = vlm.prepare([image], [chat(processor)])
    assert inputs.input_ids[0].tolist() == expected["input_ids"][0].tolist()
    assert inputs.extra["token_type_ids"].tolist() == expected["token_type_ids"].tolist()
    soft = int((expected["input_ids"] == model.config.image_token_index).sum())
    assert soft == 16 and inputs.counts.tolist() == [16]
    assert vlm.image_token == "<start_of_image>" and vlm.image_token_id == model.config.image_token_index
    # without token_type_ids the image tokens attend causally, and the logits move: they must reach the model
    with torch.no_grad():
        full = model(**inputs.model_inputs()).logits
        causal = model(**{k: v for k, v in inputs.model_inputs().items() if k != "token_type_ids"}).logits
    assert (full - causal).abs().max().item() > 1e-2


def test_levels_are_the_projector_with_a_larger_kernel(gemma):
    model, processor = gemma
    image = random_image(80, 56, seed=2)
    pixel_values = reference_inputs(processor, image)["pixel_values"]
    tokens = PyramidVLM(model, processor, allocator="all", levels=3).encode([image]).tokens
    assert tokens.level_shapes == ((4, 4), (2, 2), (1, 1))
    assert (tokens.features[0, tokens.level_slices[0]] - soft_tokens(model, pixel_values)).abs().max() <= 1e-5
    for level, kernel in ((1, 4), (2, 8)):
        coarse = tokens.features[0, tokens.level_slices[level]]
        assert (coarse - soft_tokens(model, pixel_values, kernel)).abs().max() <= 1e-5
    assert tokens.embeddings is tokens.features and tokens.attention is None


@pytest.mark.parametrize("budget", [3, 9])
def test_kept_tokens_keep_the_bidirectional_mask_over_the_kept_set(gemma, budget):
    """A pruned image is the model's own forward on a prompt of K soft tokens (built as the processor writes it),
    fed the kept soft tokens and their token types: the model's own mask makes them one bidirectional block."""
    model, processor = gemma
    image = random_image(67, 101, seed=3)
    vlm = PyramidVLM(model, processor, allocator="random", budget=budget)
    generator = torch.Generator().manual_seed(4)
    encoded = vlm.encode([image])
    (selection,) = vlm.select(encoded, budget, generator=generator)
    kept = selection.index[0, : int(selection.count[0])]
    with torch.no_grad():
        ours = vlm([image], [chat(processor)], selections=[selection], encoded=encoded).logits
    boi, eoi = processor.tokenizer.boi_token, processor.tokenizer.eoi_token
    run = f"\n\n{boi}{processor.tokenizer.image_token * budget}{eoi}\n\n"
    ids = processor.tokenizer(chat(processor).replace(boi, run), return_tensors="pt")["input_ids"]
    features = soft_tokens(model, reference_inputs(processor, image)["pixel_values"])[kept]
    token_types = (ids == model.config.image_token_index).long()
    with torch.no_grad():
        reference = model(input_ids=ids, token_type_ids=token_types,
                          mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features)}).logits
    assert ours.shape == reference.shape and (ours - reference).abs().max().item() <= 1e-5


def test_schedules_build_the_models_own_masks(gemma):
    """The scheduled loop reproduces the model with a stage that keeps everything: sliding windows counted over
    the sequence and the image block (without the block rule the logits would move); a pruning stage keeps its
    share of the image tokens."""
    from pyrtok.vlm.families.gemma3 import Gemma3Family

    model, processor = gemma
    images, prompts = [random_image(67, 101, seed=5), random_image(64, 64, seed=6)], [chat(processor)] * 2
    plain = PyramidVLM(model, processor, allocator="laplacian", budget=10, levels=2)
    kept = PyramidVLM(model, processor, allocator="laplacian", budget=10, levels=2,
                      schedule={"name": "fastv", "layer": 2, "keep": 1.0})
    with torch.no_grad():
        reference = plain(images, prompts).logits
        ours = kept(images, prompts).logits
    assert (ours - reference).abs().max().item() <= 1e-5
    assert reference.shape[1] > model.config.text_config.sliding_window  # the window is overrun
    causal = PyramidVLM(model, processor, allocator="laplacian", budget=10, levels=2,
                        schedule={"name": "fastv", "layer": 2, "keep": 1.0})
    causal.family.bidirectional_images = False  # this instance only: the class keeps its rule
    assert Gemma3Family.bidirectional_images
    with torch.no_grad():
        assert (causal(images, prompts).logits - reference).abs().max().item() > 1e-3
    pruned = PyramidVLM(model, processor, allocator="laplacian", budget=10, levels=2,
                        schedule={"name": "pdrop", "layers": [2], "keep": 0.5})
    out = pruned.generate(images, prompts, max_new_tokens=2)
    assert out.stage_counts.tolist() == [[10, 5], [10, 5]]


def test_merged_tokens_and_a_bad_mode(gemma):
    model, processor = gemma
    vlm = PyramidVLM(model, processor, allocator={"name": "divprune"}, budget=6, levels=2)
    out = vlm.generate([random_image(67, 101, seed=7)], [chat(processor)], max_new_tokens=2)
    assert out.counts.tolist() == [6]
    selection = TokenSelection.from_keep_mask(torch.ones(1, 20, dtype=torch.bool))
    assert selection.count.tolist() == [20]
    with pytest.raises(ValueError, match="mode must be 'feature'"):
        PyramidVLM(model, processor, mode="image")


# -- the ablation runner and the lmms-eval plugin -------------------------------------------------------------

def test_the_runner_and_the_plugin_run_the_family(tmp_path):
    from pyrtok.eval.config import load_config
    from pyrtok.eval.lmms_plugin import PyrtokLMM
    from pyrtok.eval.runner import run
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pyrtok.testing import save_tiny_vlm

    folder = save_tiny_vlm("gemma3", tmp_path / "gemma3")
    config = load_config({
        "name": "gemma3", "output": str(tmp_path / "out"), "batch_size": 2,
        "models": [{"name": "gemma3", "path": str(folder), "levels": 2, "max_new_tokens": 2},
                   {"name": "gemma3-pas", "path": str(folder), "levels": 2, "max_new_tokens": 2,
                    "options": {"pan_and_scan": True}}],
        "allocators": ["laplacian", "cdpruner"], "budgets": [1.0, 0.25],
        "tasks": [{"name": "shapes", "source": "shapes", "split": "test", "questions": 1000, "limit": 3,
                   "metric": "exact", "root": str(tmp_path / "data")}],
    })
    _, rows = run(config, progress=False)
    assert len(rows) == 2 * 3 * 3 and not any(r["error"] for r in rows)
    plain = [r for r in rows if r["model"] == "gemma3"]
    quarter = [r["tokens"] for r in plain if r["budget"] == 5]  # a quarter of 16 + 4 tokens: one count
    assert quarter and set(quarter) == {5}
    # with pan-and-scan the token count depends on the image: budgets stay fractions, each image's own share
    crops = [r for r in rows if r["model"] == "gemma3-pas"]
    assert {r["budget"] for r in crops} == {1.0, 0.25}
    assert {r["tokens"] for r in crops if r["budget"] == 0.25} == {5}  # square scenes: no crops, 20 tokens
    assert all(0 < r["vision_tflops"] < r["tflops"] for r in rows)

    model, processor = AutoModelForImageTextToText.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    from lmms_eval.api.instance import Instance

    image = random_image(67, 101, seed=8)
    lm = PyrtokLMM(pretrained=str(folder), allocator="all", device="cpu")
    lm.task_dict = {"t": {"test": [{"image": image, "question": "what colour is the square?"}]}}
    request = Instance("generate_until", ("what colour is the square?", {"max_new_tokens": 3},
                                          lambda doc: [doc["image"]], 0, "t", "test"), 0,
                       {"task": "t", "doc_id": 0, "repeats": 1, "split": "test"})
    (result,) = lm.generate_until([request])
    prompt = lm.prompt_template.replace("{context}", "what colour is the square?")
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    new = model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert result.text == processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    assert lm.kept_tokens[("t", "test", 0)] == 16


# -- pan-and-scan crops ----------------------------------------------------------------------------------------

WIDE, TALL, THREE, SQUARE = (600, 300), (280, 700), (900, 280), (300, 290)  # 2, 2, 3 and no crops


def test_pan_and_scan_at_full_budget_is_the_processors_crops(gemma):
    """With ``pan_and_scan=True`` every view the processor makes (the original, then 2-3 crops) reaches the model
    as the processor lays it out, two images per prompt, landscape and portrait: the same ids and logits."""
    model, processor = gemma
    vlm = PyramidVLM(model, processor, allocator="all", pan_and_scan=True)
    for sizes in ((WIDE, TALL), (THREE, SQUARE)):
        images = [random_image(*size, seed=sum(size)) for size in sizes]
        prompt = chat(processor, images=2)
        expected = processor(text=[prompt], images=images, do_pan_and_scan=True, return_tensors="pt")
        assert expected["pixel_values"].shape[0] == {(WIDE, TALL): 6, (THREE, SQUARE): 5}[sizes]
        inputs = vlm.prepare([images], [prompt])
        assert inputs.input_ids[0].tolist() == expected["input_ids"][0].tolist()
        with torch.no_grad():
            reference = model(**expected).logits
            ours = model(**inputs.model_inputs()).logits
        assert (ours - reference).abs().max().item() <= 1e-5
    tokens = vlm.encode([random_image(*WIDE, seed=1)]).tokens
    assert tokens.level_shapes == ((4, 8), (4, 4)) and tokens.image_size == (64, 128)  # crops canvas, original


@pytest.mark.parametrize("kept", [[0, 3, 16, 17, 30], None], ids=["two-crops-empty", "random-20"])
def test_pan_and_scan_prunes_across_views_under_one_budget(gemma, kept):
    """A pruned image keeps its tokens from every view under one budget; the prompt has one run per view (the
    original, each crop) holding that view's kept tokens, empty runs included, each its own bidirectional
    block: the model's own forward on that prompt with those soft tokens (from ``get_image_features`` on the
    processor's crops) gives the same logits."""
    model, processor = gemma
    image = random_image(*THREE, seed=9)
    budget = 20 if kept is None else len(kept)
    vlm = PyramidVLM(model, processor, allocator="random", budget=budget, pan_and_scan=True)
    encoded = vlm.encode([image])
    if kept is None:
        (selection,) = vlm.select(encoded, budget, generator=torch.Generator().manual_seed(7))
    else:
        mask = torch.zeros(1, encoded.tokens.num_tokens, dtype=torch.bool)
        mask[0, kept] = True
        selection = TokenSelection.from_keep_mask(mask)
    with torch.no_grad():
        ours = vlm([image], [chat(processor)], selections=[selection], encoded=encoded).logits
    # the reference: canonical index -> (view, soft token) from the layout alone: the original's 4 x 4 grid
    # first, then the 4 x 12 canvas of three crops, raster order
    pixel_values = processor(text=[chat(processor)], images=[image], do_pan_and_scan=True,
                             return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        soft = model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output  # (4, 16, D)
    picks: list[list[int]] = [[], [], [], []]
    for k in selection.index[0, : int(selection.count[0])].tolist():
        if k < 16:
            picks[0].append(k)
        else:
            row, col = divmod(k - 16, 12)
            picks[1 + col // 4].append(row * 4 + col % 4)
    assert sum(map(len, picks)) == budget
    assert [len(p) for p in picks] == [2, 3, 0, 0] if kept else all(picks)
    features = torch.cat([soft[v][sorted(p)] for v, p in enumerate(picks)])
    tokenizer = processor.tokenizer
    run = [f"\n\n{tokenizer.boi_token}{tokenizer.image_token * len(p)}{tokenizer.eoi_token}\n\n" for p in picks]
    text = (f"Here is the original image {run[0]} and here are some crops to help you see better "
            + " ".join(run[1:]))
    ids = tokenizer(chat(processor).replace(tokenizer.boi_token, text), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = model(input_ids=ids, token_type_ids=(ids == model.config.image_token_index).long(),
                          mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features)}).logits
    assert ours.shape == reference.shape and (ours - reference).abs().max().item() <= 1e-5


def test_pan_and_scan_levels_stay_inside_a_crop_and_options_are_checked(gemma):
    model, processor = gemma
    vlm = PyramidVLM(model, processor, allocator="laplacian", budget=12, levels=3, pan_and_scan=True)
    tokens = vlm.encode([random_image(*WIDE, seed=2)]).tokens
    assert tokens.level_shapes == ((4, 8), (2, 4), (1, 2), (4, 4))  # each pooled cell inside one crop
    out = vlm.generate([random_image(*TALL, seed=3)], [chat(processor)], max_new_tokens=2)
    assert out.counts.tolist() == [12]
    # the scheduled loop builds one bidirectional block per view's run, as the model does
    scheduled = PyramidVLM(model, processor, allocator="laplacian", budget=12, levels=3, pan_and_scan=True,
                           schedule={"name": "fastv", "layer": 2, "keep": 1.0})
    images, prompts = [random_image(*WIDE, seed=4)], [chat(processor)]
    with torch.no_grad():
        assert (scheduled(images, prompts).logits - vlm(images, prompts).logits).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="at most 3 levels, got 4"):
        PyramidVLM(model, processor, levels=4, pan_and_scan=True)
    with pytest.raises(ValueError, match="pan_and_scan must be True or False"):
        PyramidVLM(model, processor, pan_and_scan="yes")
