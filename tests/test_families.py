"""Every supported VLM family against references built without pyrtok's code path.

Each family's tiny random-weight model is saved with its own processor (:func:`pyrtok.testing.save_tiny_vlm`)
and loaded once per module. References come from the unwrapped model run through its own processor, its own
``get_rope_index`` and ``get_image_features``, or a plain no-cache decoding loop; PyramidVLM is only ever
used through its public calls.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMALL_ROPE, Recorder, chat, random_image, recorded
from einops import rearrange, reduce
from transformers import AutoModelForImageTextToText, AutoProcessor, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutputWithPooling

from pyrtok.pyramid import gaussian_pyramid
from pyrtok.testing import save_tiny_vlm
from pyrtok.tokens import TokenSelection
from pyrtok.vlm import PyramidVLM

FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
QWEN = FAMILIES[1:]
SIZES = ((70, 100), (100, 60))  # PIL (width, height): one tall, one wide


def build(family: str, folder):
    """Save a tiny ``family`` model (hidden 64: a 16-wide head) and its processor to ``folder``."""
    overrides = {"text_config": {"rope_parameters": SMALL_ROPE[family]}} if family in SMALL_ROPE else {}
    return save_tiny_vlm(family, folder, hidden=64, **overrides)


def merged_tokens(model, processor, image) -> int:
    """Placeholders the processor gives a Qwen-family image: grid cells / merge^2."""
    grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
    return int(grid.prod()) // model.config.vision_config.spatial_merge_size**2


def until_eos(tokens: list[int], eos: int | list[int] | None) -> list[int]:
    stops = set(eos if isinstance(eos, list) else [eos])
    for k, token in enumerate(tokens):
        if token in stops:
            return tokens[: k + 1]
    return tokens


def pruned_reference(model, processor, images: list, prompt: str, keeps: list[torch.Tensor]) -> dict:
    """The unwrapped Qwen model's inputs with the placeholders of image i where ``keeps[i]`` (n_i,) is False removed.

    Positions come from the model's own ``get_rope_index`` on the full prompt (the kept columns only), and the
    kept tokens' features from its own ``get_image_features`` (DeepStack layers subset alike).
    """
    full = processor(images=images, text=[prompt], return_tensors="pt")
    ids, token_types = full["input_ids"], full["mm_token_type_ids"]
    is_image = ids[0] == model.config.image_token_id
    assert torch.equal(token_types[0].bool(), is_image)
    positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=token_types,
                                              image_grid_thw=full["image_grid_thw"],
                                              attention_mask=full["attention_mask"])
    with torch.no_grad():
        vision = model.model.get_image_features(full["pixel_values"], full["image_grid_thw"], return_dict=True)
    assert [f.shape[0] for f in vision.pooler_output] == [k.numel() for k in keeps]
    columns = torch.ones_like(is_image)
    columns[is_image.nonzero()[:, 0]] = torch.cat(keeps)
    deepstack = getattr(vision, "deepstack_features", None)
    return {"input_ids": ids[:, columns], "position_ids": positions[:, :, columns],
            "features": tuple(f[k] for f, k in zip(vision.pooler_output, keeps, strict=True)),
            "deepstack": None if deepstack is None else [tuple(f[k] for f, k in zip(layer, keeps, strict=True))
                                                         for layer in deepstack],
            "output_class": type(vision)}


def encoder_outputs(reference: dict) -> dict:
    """A fresh ``mm_encoder_outputs`` of the kept features, in the model's own output class."""
    if reference["deepstack"] is None:
        return {"image": BaseModelOutputWithPooling(pooler_output=reference["features"])}
    return {"image": reference["output_class"](pooler_output=reference["features"],
                                               deepstack_features=reference["deepstack"])}


def fixed_keep(n: int) -> torch.Tensor:
    """Drop every third merged token (at least one), keep the rest: a fixed, non-contiguous subset."""
    keep = torch.arange(n) % 3 != 1
    assert 0 < int(keep.sum()) < n
    return keep


# -- 1. full budget reproduces the unwrapped model through its own processor ----------------------------------

# -- 2. pruned finest-level tokens keep their unpruned M-RoPE positions ---------------------------------------

@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("family", QWEN)
def test_pruning_equals_the_model_on_the_kept_tokens(tiny_vlm, family, size):
    _, model, processor = tiny_vlm(family)
    image, prompt = random_image(*size, seed=size[0]), chat(processor)
    keep = fixed_keep(merged_tokens(model, processor, image))
    reference = pruned_reference(model, processor, [image], prompt, [keep])
    vlm = PyramidVLM(model, processor, allocator="all", levels=1)
    with torch.no_grad():
        expected = model(input_ids=reference["input_ids"], position_ids=reference["position_ids"],
                         attention_mask=torch.ones_like(reference["input_ids"]),
                         mm_encoder_outputs=encoder_outputs(reference)).logits
        ours = vlm([image], [prompt], selections=[TokenSelection.from_keep_mask(keep[None])])
    assert torch.equal(ours.input_ids, reference["input_ids"])
    assert ours.counts.tolist() == [int(keep.sum())]
    assert (ours.logits - expected).abs().max().item() <= 1e-5
    # Every axis is visible at this tolerance: the kept tokens' rows in place of their columns (or the reverse)
    # move the logits far beyond it.
    image_columns = reference["input_ids"][0] == model.config.image_token_id
    for axis, other in ((2, 1), (1, 2)):
        swapped = reference["position_ids"].clone()
        swapped[axis, 0, image_columns] = swapped[other, 0, image_columns]
        with torch.no_grad():
            moved = model(input_ids=reference["input_ids"], position_ids=swapped,
                          attention_mask=torch.ones_like(reference["input_ids"]),
                          mm_encoder_outputs=encoder_outputs(reference)).logits
        assert (moved - expected).abs().max().item() > 1e-4


# -- 3. generation after pruning carries M-RoPE positions through every step ----------------------------------

@pytest.mark.parametrize("family", QWEN)
def test_pruned_generation_equals_a_no_cache_loop_with_explicit_positions(tiny_vlm, family):
    _, model, processor = tiny_vlm(family)
    image, prompt, steps = random_image(70, 100, seed=3), chat(processor), 5
    keep = fixed_keep(merged_tokens(model, processor, image))
    reference = pruned_reference(model, processor, [image], prompt, [keep])
    ids, positions = reference["input_ids"], reference["position_ids"]
    step_logits = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids),
                           mm_encoder_outputs=encoder_outputs(reference)).logits[:, -1]
            step_logits.append(logits)
            token = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
            positions = torch.cat([positions, positions[:, :, -1:] + 1], dim=2)
    expected = until_eos(ids[0, reference["input_ids"].shape[1]:].tolist(), model.generation_config.eos_token_id)
    vlm = PyramidVLM(model, processor, allocator="all", levels=1)
    recorder = Recorder()
    out = vlm.generate([image], [prompt], selections=[TokenSelection.from_keep_mask(keep[None])], max_new_tokens=steps,
                       logits_processor=LogitsProcessorList([recorder]))
    assert out.sequences[0].tolist() == expected
    assert out.counts.tolist() == [int(keep.sum())]
    ours = recorded(recorder)
    assert (ours - torch.stack(step_logits[: ours.shape[1]], dim=1)).abs().max().item() <= 1e-5
    first_logits = step_logits[0]

    # The failure this guards against: without explicit positions, generate falls back to 1-D positions.
    unpositioned = model.generate(input_ids=reference["input_ids"],
                                  attention_mask=torch.ones_like(reference["input_ids"]),
                                  mm_encoder_outputs=encoder_outputs(reference), max_new_tokens=1, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True)
    assert (unpositioned.logits[0] - first_logits).abs().max().item() > 1e-4
    if reference["deepstack"] is None:  # inputs_embeds alone would also lose Qwen3-VL's DeepStack features
        embeds = model.get_input_embeddings()(reference["input_ids"]).clone()
        embeds[reference["input_ids"] == model.config.image_token_id] = torch.cat(reference["features"])
        with torch.no_grad():
            model.model.rope_deltas = None  # no positions left over from an earlier call: the plain fallback
            fallback = model(inputs_embeds=embeds, attention_mask=torch.ones_like(reference["input_ids"])).logits
            matched = model(inputs_embeds=embeds, attention_mask=torch.ones_like(reference["input_ids"]),
                            position_ids=reference["position_ids"]).logits
        assert (matched[:, -1] - first_logits).abs().max().item() <= 1e-5
        assert (fallback[:, -1] - first_logits).abs().max().item() > 1e-4


# -- 4. batched generation with per-sample budgets equals one sample at a time -------------------------------

# -- 5. several images in one prompt -------------------------------------------------------------------------

def shares(budget: int, sizes: list[int]) -> list[int]:
    """The documented share_budget rule: proportional to tokens, rounded down, remainder to the earliest."""
    out = [budget * s // sum(sizes) for s in sizes]
    for k in range(budget - sum(out)):
        out[k % len(out)] += 1
    for k in [k for k, v in enumerate(out) if v == 0]:  # an image left with none takes one from the largest
        out[out.index(max(out))] -= 1
        out[k] = 1
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_several_images_in_one_prompt(tiny_vlm, family):
    _, model, processor = tiny_vlm(family)
    first, second = random_image(70, 100, seed=4), random_image(130, 130, seed=5)
    prompt = chat(processor, images=2)
    inputs = processor(images=[first, second], text=[prompt], return_tensors="pt")
    vlm = PyramidVLM(model, processor, allocator="all", levels=1)
    with torch.no_grad():
        reference = model(**inputs).logits
        ours = vlm([[first, second]], [prompt])
    assert torch.equal(ours.input_ids, inputs["input_ids"])
    assert (ours.logits - reference).abs().max().item() <= 1e-5

    sizes = ([64, 64] if family == "llava"
             else [merged_tokens(model, processor, image) for image in (first, second)])
    assert sum(sizes) == int((inputs["input_ids"] == model.config.image_token_id).sum())
    budget = 5
    each = PyramidVLM(model, processor, allocator="laplacian", levels=1)
    out = each.generate([[first, second]], [prompt], budget=budget, max_new_tokens=1)
    assert out.image_counts == [[budget, budget]]
    assert out.counts.tolist() == [2 * budget]

    shared = PyramidVLM(model, processor, allocator="laplacian", levels=1, share_budget=True)
    for budget in (10, 11):
        out = shared.generate([[first, second]], [prompt], budget=budget, max_new_tokens=1)
        assert out.image_counts == [shares(budget, sizes)]
        assert out.counts.tolist() == [budget]
    # Each image keeps at least one token and the shares add up to the budget (the larger image gives one up).
    out = shared.generate([[second, first]], [prompt], budget=2, max_new_tokens=1)
    assert out.image_counts == [[1, 1]] and out.counts.tolist() == [2]
    with pytest.raises(ValueError, match="budget for sample 0 is 1 tokens, fewer than its 2 images"):
        shared.generate([[first, second]], [prompt], budget=1, max_new_tokens=1)
    if family == "llava":  # equal images split evenly, the odd token to the first
        assert shares(11, sizes) == [6, 5]
    elif family == "qwen2_vl":  # 8 and 25 merged tokens: 10 * 8 // 33 = 2 (+1 remainder), 10 * 25 // 33 = 7
        assert sizes == [8, 25] and shares(10, sizes) == [3, 7]


@pytest.mark.parametrize("family", QWEN)
def test_several_pruned_images_keep_their_unpruned_positions(tiny_vlm, family):
    """Two images of different grids, each pruned: the second image and the text after it sit where the
    unpruned model puts them."""
    _, model, processor = tiny_vlm(family)
    images = [random_image(70, 100, seed=4), random_image(130, 130, seed=5)]
    prompt = chat(processor, images=2)
    keeps = [fixed_keep(merged_tokens(model, processor, images[0])),
             torch.arange(merged_tokens(model, processor, images[1])) % 4 != 0]
    reference = pruned_reference(model, processor, images, prompt, keeps)
    with torch.no_grad():
        expected = model(input_ids=reference["input_ids"], position_ids=reference["position_ids"],
                         attention_mask=torch.ones_like(reference["input_ids"]),
                         mm_encoder_outputs=encoder_outputs(reference)).logits
    vlm = PyramidVLM(model, processor, allocator="all", levels=1)
    encoded = vlm.encode([images])
    assert [members for members, _ in encoded.groups] == [[0], [1]]  # two sizes: one group each
    selections = [TokenSelection.from_keep_mask(keep[None]) for keep in keeps]
    with torch.no_grad():
        ours = vlm([images], [prompt], encoded=encoded, selections=selections)
    assert torch.equal(ours.input_ids, reference["input_ids"])
    assert ours.counts.tolist() == [int(sum(keep.sum() for keep in keeps))]
    assert (ours.logits - expected).abs().max().item() <= 1e-5


# -- 6. wrapping patches nothing ------------------------------------------------------------------------------

def snapshot(model) -> dict:
    classes = {type(m) for m in model.modules()} | set(type(model).__mro__)
    return {
        "type": type(model),
        "class_vars": {cls: dict(vars(cls)) for cls in classes},
        "mro_forward": [vars(cls).get("forward") for cls in type(model).__mro__],
        "bound_forward": model.forward.__func__,
        "instance": set(vars(model)),
        "modules": [(name, type(m), vars(m).get("forward"), type(m).forward, dict(m._forward_hooks),
                     dict(m._forward_pre_hooks)) for name, m in model.named_modules()],
        "parameters": [(name, p.data_ptr()) for name, p in model.named_parameters()],
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_wrapping_patches_nothing(tiny_vlm, family):
    folder, _, processor = tiny_vlm(family)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()  # never wrapped before
    image, prompt = random_image(70, 100, seed=6), chat(processor)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    # transformers installs its output-capturing hooks on first use: run the unwrapped model once first.
    model.generate(**inputs, max_new_tokens=1, do_sample=False)
    before = snapshot(model)
    vlm = PyramidVLM(model, processor, allocator="laplacian", levels=2, budget=3)
    with torch.no_grad():
        vlm([image], [prompt])
    vlm.generate([image], [prompt], max_new_tokens=2)
    after = snapshot(model)
    assert type(model) is before["type"]
    for key in before:
        assert after[key] == before[key], key
    assert "forward" not in vars(model)


# -- 7. positions of coarse-level tokens ----------------------------------------------------------------------

@pytest.mark.parametrize("rule, expected", [
    # qwen2_vl, 70x100 -> 56x112 px: a 4x2 merged grid (28 px cells), level 1 is 2x1. Kept: both level-1
    # tokens (boxes of rows 0-1 and 2-3, columns 0-1), then fine cells (1, 0) and (3, 1).
    ("centre", [(1, 1), (3, 1), (1, 0), (3, 1)]),  # box centres (28, 28) and (28, 84) px
    ("corner", [(0, 0), (2, 0), (1, 0), (3, 1)]),  # the top-left cell of each box
])
def test_coarse_token_positions(tiny_vlm, rule, expected):
    _, model, processor = tiny_vlm("qwen2_vl")
    image, prompt = random_image(70, 100, seed=7), chat(processor)
    vlm = PyramidVLM(model, processor, allocator="all", levels=2, coarse_positions=rule)
    encoded = vlm.encode([image])
    tokens = encoded.tokens
    assert tokens.level_shapes == ((4, 2), (2, 1))
    keep = torch.zeros(1, tokens.num_tokens, dtype=torch.bool)
    keep[0, [0, 1, 2 + 1 * 2 + 0, 2 + 3 * 2 + 1]] = True
    inputs = vlm.prepare(None, [prompt], encoded=encoded, selections=[TokenSelection.from_keep_mask(keep)])
    ids, positions = inputs.input_ids[0], inputs.position_ids[:, 0]
    image_columns = (ids == model.config.image_token_id).nonzero()[:, 0]
    full = processor(images=[image], text=[prompt], return_tensors="pt")
    unpruned, _ = model.model.get_rope_index(full["input_ids"], mm_token_type_ids=full["mm_token_type_ids"],
                                             image_grid_thw=full["image_grid_thw"])
    full_image = (full["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
    start = int(unpruned[0, 0, full_image[0]])
    assert start == int(image_columns[0])  # no padding, the text before the image is 0 .. start - 1
    assert positions[:, image_columns].T.tolist() == [[start, start + r, start + c] for r, c in expected]
    # The text after the image sits where the unpruned model puts it.
    after = ids.shape[0] - int(image_columns[-1]) - 1
    assert torch.equal(positions[:, -after:], unpruned[:, 0, -after:])
    with pytest.raises(ValueError, match="coarse_positions"):
        PyramidVLM(model, processor, levels=2, coarse_positions="middle")


# -- 8. image mode: a separate tower pass per level -----------------------------------------------------------

@pytest.mark.parametrize("family, side", [("qwen2_vl", 112), ("qwen3_vl", 128)])
def test_image_mode_encodes_each_level_separately(tiny_vlm, family, side):
    _, model, processor = tiny_vlm(family)
    image = random_image(side, side, seed=8)  # a 4x4 merged grid; its half-size Gaussian level is 2x2
    feature = PyramidVLM(model, processor, mode="feature", levels=2)
    per_level = PyramidVLM(model, processor, mode="image", levels=2)
    with torch.no_grad():
        pooled, native = feature.encode([image]).tokens, per_level.encode([image]).tokens
    assert pooled.level_shapes == native.level_shapes == ((4, 4), (2, 2))
    fine, coarse = native.level_slices[0], native.level_slices[1]
    assert torch.allclose(native.features[:, fine], pooled.features[:, fine], atol=1e-5)

    pixels = per_level.pixels([image])[0]
    assert pixels.shape == (3, side, side)
    half = gaussian_pyramid(pixels[None], 2)[1][0].clamp(0, 1)
    level = processor.image_processor(images=[half], do_resize=False, do_rescale=False, return_tensors="pt")
    with torch.no_grad():
        tower = model.model.get_image_features(level["pixel_values"], level["image_grid_thw"], return_dict=True)
    assert (native.features[0, coarse] - tower.pooler_output[0]).abs().max().item() <= 1e-5

    grid = rearrange(pooled.features[0, fine], "(h w) d -> h w d", h=4)
    two_by_two = rearrange(reduce(grid, "(h a) (w b) d -> h w d", "mean", a=2, b=2), "h w d -> (h w) d")
    assert torch.allclose(pooled.features[0, coarse], two_by_two, atol=1e-5)
    assert (native.features[0, coarse] - two_by_two).abs().max().item() > 1e-3


# -- 9. unsupported architectures fail before the weights load ------------------------------------------------

def test_unsupported_architecture_fails_before_loading_weights(tmp_path):
    folder = build("llava_next", tmp_path / "llava_next")
    for weights in folder.glob("*.safetensors"):
        weights.unlink()  # a ValueError (not a missing-weights OSError) proves nothing was loaded
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["LlavaNextVideoForConditionalGeneration"]  # a real architecture pyrtok lacks
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="LlavaNextVideoForConditionalGeneration") as error:
        PyramidVLM.from_pretrained(folder)
    for supported in ("LlavaForConditionalGeneration", "Qwen2VLForConditionalGeneration",
                      "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration"):
        assert supported in str(error.value)


@pytest.mark.parametrize("family", QWEN)
def test_an_encoding_and_a_selection_passed_back_give_the_same_answer(tiny_vlm, family):
    _, model, processor = tiny_vlm(family)
    image, prompt = random_image(70, 100, seed=3), chat(processor)
    vlm = PyramidVLM(model, processor, allocator="laplacian", levels=2, budget=5)
    with torch.no_grad():
        plain = vlm([image], [prompt]).logits
        encoded = vlm.encode([image])  # Qwen3-VL's DeepStack features travel with the encoding
        assert torch.equal(vlm(None, [prompt], encoded=encoded).logits, plain)
        assert torch.equal(vlm(None, [prompt], encoded=encoded, selections=vlm.select(encoded)).logits, plain)


def test_hub_arguments_reach_the_config_the_weights_and_the_processor(tmp_path):
    folder = build("qwen2_vl", tmp_path / "repo" / "variant")
    vlm = PyramidVLM.from_pretrained(tmp_path / "repo", subfolder="variant", local_files_only=True)
    assert vlm.family.name == "qwen2_vl" and vlm.family.image_processor is not None
    processor = AutoProcessor.from_pretrained(folder)
    assert vlm.family.image_processor.to_dict() == processor.image_processor.to_dict()

def test_a_saved_processor_that_fails_to_load_is_not_replaced_by_the_tokenizer(tmp_path):
    folder = build("llava", tmp_path / "llava")
    assert PyramidVLM.from_pretrained(folder).family.image_processor is not None
    config = json.loads((folder / "processor_config.json").read_text())
    config["image_processor"]["image_processor_type"] = "NoSuchImageProcessor"
    (folder / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Unrecognized image processor"):
        PyramidVLM.from_pretrained(folder)
    for name in ("preprocessor_config.json", "processor_config.json"):
        (folder / name).unlink(missing_ok=True)
    assert PyramidVLM.from_pretrained(folder).family.image_processor is None  # none saved: the tokenizer alone

# -- 10. tensors in [0, 1] ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", QWEN)
def test_tensor_images(tiny_vlm, family):
    _, model, processor = tiny_vlm(family)
    prompt = chat(processor)
    vlm = PyramidVLM(model, processor, allocator="all", levels=1)
    generator = torch.Generator().manual_seed(9)
    factor = model.config.vision_config.patch_size * model.config.vision_config.spatial_merge_size

    # A size the processor keeps as it is: exactly the model on the processor's own output.
    exact = torch.rand(3, 4 * factor, 2 * factor, generator=generator)
    inputs = processor(images=[exact], text=[prompt], do_rescale=False, return_tensors="pt")
    with torch.no_grad():
        reference = model(**inputs).logits
        ours = vlm([exact], [prompt])
    assert torch.equal(ours.input_ids, inputs["input_ids"])
    assert (ours.logits - reference).abs().max().item() <= 1e-5

    # Other sizes are resized to the size the processor picks; a (B, 3, H, W) batch works the same.
    odd = torch.rand(3, 100, 70, generator=generator)
    grid = processor.image_processor(images=[odd], do_rescale=False, return_tensors="pt")["image_grid_thw"][0]
    patch = model.config.vision_config.patch_size
    assert tuple(vlm.pixels([odd])[0].shape) == (3, int(grid[1]) * patch, int(grid[2]) * patch)
    tokens = int(grid.prod()) // model.config.vision_config.spatial_merge_size**2
    batch = torch.stack([odd, torch.rand(3, 100, 70, generator=generator)])
    out = vlm.generate(batch, [prompt, prompt], max_new_tokens=2)
    assert out.counts.tolist() == [tokens, tokens]
    alone = vlm.generate([odd], [prompt], max_new_tokens=2)
    assert out.sequences[0, : alone.sequences.shape[1]].tolist() == alone.sequences[0].tolist()
    with pytest.raises(ValueError, match="image tensor"):
        vlm.generate([torch.rand(1, 100, 70)], [prompt], max_new_tokens=1)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\], got values in \[.*, 25\d"):
        vlm.generate([odd * 255], [prompt], max_new_tokens=1)  # 0-255 pixels
