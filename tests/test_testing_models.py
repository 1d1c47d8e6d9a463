"""The tiny random-weight VLM factory: every family saves, loads back offline, processes, runs and generates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from pyrtok.testing import FAMILIES, save_tiny_vlm

# PIL (width, height) of the two test images, and per family the placeholder count and Qwen grid (t, h, w)
# each gives; these are the numbers the module docstring documents.
SIZES = ((70, 100), (100, 60))
EXPECTED = {
    "llava": ((64, None), (64, None)),
    "llava_next": ((124, None), (120, None)),
    "llava_onevision": ((124, None), (120, None)),
    "qwen2_vl": ((8, [1, 8, 4]), (8, [1, 4, 8])),
    "qwen2_5_vl": ((8, [1, 8, 4]), (8, [1, 4, 8])),
    "qwen3_vl": ((6, [1, 6, 4]), (6, [1, 4, 6])),
    "internvl": ((112, None), (112, None)),
    "gemma3": ((16, None), (16, None)),
}


def _image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _prompt(processor) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_expected_covers_every_family():
    assert set(EXPECTED) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_saves_loads_runs_and_generates(family, tmp_path):
    path = save_tiny_vlm(family, tmp_path / family)
    assert path == tmp_path / family
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    config = model.config
    assert config.model_type == family
    assert not model.training
    assert model.dtype == torch.float32
    assert config._attn_implementation == "sdpa"
    tokenizer = processor.tokenizer
    if family == "gemma3":  # the prompt's marker is <start_of_image>; the placeholders are soft tokens
        assert processor.image_token == "<start_of_image>" and processor.image_token_id == config.boi_token_index
        assert tokenizer.convert_tokens_to_ids("<image_soft_token>") == config.image_token_id
    else:
        assert processor.image_token_id == config.image_token_id == tokenizer.convert_tokens_to_ids(
            processor.image_token)
    assert config.text_config.vocab_size == len(tokenizer)
    if family.startswith("qwen"):
        markers = {"vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>", "video": "<|video_pad|>"}
        for name, token in markers.items():
            token_id = tokenizer.convert_tokens_to_ids(token)
            assert getattr(config, f"{name}_token_id") == token_id != tokenizer.unk_token_id
    prompt = _prompt(processor)
    other = tokenizer.convert_tokens_to_ids("what")
    for (width, height), (count, grid) in zip(SIZES, EXPECTED[family], strict=True):
        inputs = processor(images=[_image(width, height, seed=width)], text=[prompt], return_tensors="pt")
        ids = inputs["input_ids"]
        assert tokenizer.unk_token_id not in ids.tolist()[0]
        is_image = ids == config.image_token_id
        assert int(is_image.sum()) == count, (width, height)
        if grid is not None:
            assert inputs["image_grid_thw"].tolist() == [grid]
            merged = math.prod(grid) // config.vision_config.spatial_merge_size**2
            assert merged == count
        with torch.no_grad():
            logits = model(**inputs).logits
            assert logits.shape == (1, ids.shape[1], config.text_config.vocab_size)
            assert torch.isfinite(logits).all()
            # The forward checks that the placeholders and the tower's features agree: one placeholder fewer fails.
            short = ids.clone()
            short[is_image.nonzero()[0].unbind()] = other
            with pytest.raises(ValueError):
                model(**{**inputs, "input_ids": short})
            generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert generated.shape[0] == 1
        assert ids.shape[1] < generated.shape[1] <= ids.shape[1] + 3
        assert torch.equal(generated[:, : ids.shape[1]], ids)


def test_chat_templates_write_each_family_layout(tmp_path):
    layouts = {
        "llava": "USER: <image>\nWhat colour is the shape? ASSISTANT:",
        "llava_onevision": "<|im_start|>user <image>\nWhat colour is the shape?<|im_end|>\n<|im_start|>assistant\n",
        "qwen2_vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>What colour is the shape?<|im_end|>\n"
                    "<|im_start|>assistant\n",
        "qwen3_vl": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour is the shape?"
                    "<|im_end|>\n<|im_start|>assistant\n",
        "gemma3": "<start_of_turn>user\n<start_of_image>What colour is the shape?<end_of_turn>\n"
                  "<start_of_turn>model\n",
    }
    for family, expected in layouts.items():
        processor = AutoProcessor.from_pretrained(save_tiny_vlm(family, tmp_path / family))
        assert _prompt(processor) == expected


def test_llava_next_pinpoints_follow_aspect_ratio(tmp_path):
    processor = AutoProcessor.from_pretrained(save_tiny_vlm("llava_next", tmp_path))
    sizes = [processor(images=[_image(w, h, 0)], text=[_prompt(processor)], return_tensors="pt") for w, h in SIZES]
    # base view + 3x2 tiles for the tall image, base view + 2x3 tiles for the wide one
    assert [tuple(s["pixel_values"].shape[1:]) for s in sizes] == [(7, 3, 32, 32)] * 2
    assert [s["image_sizes"].tolist() for s in sizes] == [[[100, 70]], [[60, 100]]]


def test_qwen2_5_window_partitions_and_qwen3_keeps_deepstack(tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(save_tiny_vlm("qwen2_5_vl", tmp_path / "a"))
    vision = model.config.vision_config
    side = vision.window_size // (vision.patch_size * vision.spatial_merge_size)
    assert 0 < len(vision.fullatt_block_indexes) < vision.depth
    for _, (_, h, w) in EXPECTED["qwen2_5_vl"]:
        # windows are side x side merged tokens; each test image's merged grid must span more than one
        merged_h, merged_w = h // vision.spatial_merge_size, w // vision.spatial_merge_size
        assert math.ceil(merged_h / side) * math.ceil(merged_w / side) > 1
    model = AutoModelForImageTextToText.from_pretrained(save_tiny_vlm("qwen3_vl", tmp_path / "b"))
    vision = model.config.vision_config
    assert len(vision.deepstack_visual_indexes) >= 1
    assert all(0 <= i < vision.depth for i in vision.deepstack_visual_indexes)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_weights(family, tmp_path):
    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    first = load_file(save_tiny_vlm(family, tmp_path / "a", seed=3) / "model.safetensors")
    # the caller's RNG stream is left where it was
    assert torch.equal(torch.rand(4), expected_next)
    second = load_file(save_tiny_vlm(family, tmp_path / "b", seed=3) / "model.safetensors")
    other = load_file(save_tiny_vlm(family, tmp_path / "c", seed=4) / "model.safetensors")
    assert first.keys() == second.keys() == other.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_overrides_reach_config_and_processor(tmp_path):
    vision = {"image_size": 56, "patch_size": 14}
    path = save_tiny_vlm("llava", tmp_path, text_layers=1, hidden=32, vision_config=vision)
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert model.config.text_config.num_hidden_layers == 1
    assert model.config.text_config.hidden_size == 32
    inputs = processor(images=[_image(70, 100, 0)], text=[_prompt(processor)], return_tensors="pt")
    assert inputs["pixel_values"].shape[-2:] == (56, 56)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16
    with torch.no_grad():
        model(**inputs)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"family must be one of .*qwen3_vl.*'idefics3'"):
        save_tiny_vlm("idefics3", tmp_path)
    with pytest.raises(ValueError, match="hidden"):
        save_tiny_vlm("llava", tmp_path, hidden=40)
    with pytest.raises(ValueError, match="text_layers"):
        save_tiny_vlm("llava", tmp_path, text_layers=0)
    with pytest.raises(TypeError, match="vision_config"):
        save_tiny_vlm("llava", tmp_path, vision_config=3)
