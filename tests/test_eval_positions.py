"""pyrtok positions: the position signal in the features, and answers with the image tokens' LM positions changed."""

from __future__ import annotations

import pytest
import torch
from pyrtok.eval.positions import (
    RELATION,
    eager_attention,
    lm_positions,
    main,
    object_cells,
    position_signal,
    relation_attention,
    scramble,
)

from pyrtok.data.conversations import scene_batch
from pyrtok.data.shapes_vqa import make_scene, questions_for
from pyrtok.tokens import from_feature_grid
from pyrtok.vlm import PyramidVLM


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 2, 9) M-RoPE-like positions (each axis different) and (2, 9) image masks of 4 and 3 tokens."""
    positions = torch.stack([torch.arange(9).repeat(2, 1) * k for k in (1, 10, 100)])
    image = torch.zeros(2, 9, dtype=torch.bool)
    image[0, 2:6] = True
    image[1, 5:8] = True
    return positions, image


def test_scramble_moves_only_the_image_tokens_and_every_axis_together():
    positions, image = _batch()
    assert torch.equal(scramble(positions, image, "none"), positions)
    same = scramble(positions, image, "same")
    assert torch.equal(same[:, ~image], positions[:, ~image])
    assert same[:, 0, 2:6].tolist() == [[2] * 4, [20] * 4, [200] * 4]
    assert same[:, 1, 5:8].tolist() == [[5] * 3, [50] * 3, [500] * 3]
    shuffled = scramble(positions, image, "shuffle", torch.Generator().manual_seed(3))
    assert torch.equal(shuffled[:, ~image], positions[:, ~image])
    for b, span in ((0, slice(2, 6)), (1, slice(5, 8))):
        moved = shuffled[:, b, span]
        assert sorted(moved[0].tolist()) == positions[0, b, span].tolist()
        assert torch.equal(moved[1], 10 * moved[0]) and torch.equal(moved[2], 100 * moved[0])
    flat = scramble(positions[0], image, "same")  # (B, T) positions too
    assert torch.equal(flat, same[0])
    assert not torch.equal(positions, same)  # a copy: the input is untouched
    assert positions[0, 0, 3] == 3


def test_scramble_rejects_an_unknown_mode_and_a_mask_of_another_shape():
    positions, image = _batch()
    with pytest.raises(ValueError, match="mode must be one of"):
        scramble(positions, image, "reverse")
    with pytest.raises(ValueError, match=r"image must be \(B, T\) = \(2, 9\)"):
        scramble(positions, image[:, :5], "same")


def test_position_signal_reads_positions_that_the_features_carry_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    rows = torch.arange(8).view(8, 1).expand(8, 8).float()
    cols = torch.arange(8).view(1, 8).expand(8, 8).float()
    noise = torch.randn(12, 8, 8, 16, generator=generator)
    carried = noise.clone()
    carried[..., 0] += 3 * rows
    carried[..., 1] += 3 * cols
    signal = position_signal(from_feature_grid(carried, 2))
    assert signal["row_r2"] > 0.9 and signal["col_r2"] > 0.9 and signal["cell_share"] > 0.5
    blind = position_signal(from_feature_grid(noise, 2))
    assert blind["row_r2"] < 0.1 and blind["col_r2"] < 0.1 and blind["cell_share"] < 0.15
    with pytest.raises(ValueError, match=">= 3 images"):
        position_signal(from_feature_grid(noise[:2], 2))


def test_lm_positions_changes_one_models_positions_and_restores_them():
    vlm = PyramidVLM.from_pretrained("embedded-qwen", levels=3)
    images, items = scene_batch("validation", 0, 2, 224)
    prompts = [vlm.chat_prompt(i["question"]) for i in items]
    with torch.no_grad():
        plain = vlm.prepare(images, prompts)
        with lm_positions(vlm, "same"):
            same = vlm.prepare(images, prompts)
            other = PyramidVLM.from_pretrained("embedded-qwen", levels=3).prepare(images, prompts)
        after = vlm.prepare(images, prompts)
    image = plain.input_ids == vlm.family.image_token_id
    assert torch.equal(same.input_ids, plain.input_ids)
    assert torch.equal(same.position_ids[:, ~image], plain.position_ids[:, ~image])
    assert not torch.equal(same.position_ids[:, image], plain.position_ids[:, image])
    assert torch.equal(other.position_ids, plain.position_ids) and torch.equal(after.position_ids, plain.position_ids)
    assert "position_ids" not in vars(vlm.family)
    with pytest.raises(ValueError, match="mode must be one of"), lm_positions(vlm, "mirror"):
        pass


def test_main_prints_both_tables_and_checks_its_arguments(capsys):
    result = main(["--model", "embedded-qwen", "--scenes", "3", "--questions", "5", "--modes", "none", "same",
                   "--relations", "4"])
    out = capsys.readouterr().out
    assert "row R^2" in out and "| none |" in out and "| same |" in out
    assert "| layer | subject | other object |" in out and result["relations"]["subject"].shape == (8, 3)
    assert set(result["accuracy"]) == {"none", "same"}
    assert set(result["accuracy"]["none"]) == {"overall", "coarse", "fine", "counting", "spatial", "existence"}
    assert all(0 <= v <= 1 for v in result["accuracy"]["same"].values())
    for argv, message in ((["--scenes", "2"], "--scenes must be >= 3"),
                          (["--prompt", "USER: <image> ASSISTANT:"], "--prompt must contain {question}"),
                          (["--relations", "-1"], "--relations must be >= 0"),
                          (["--split", "train", "--seed", "2", "--scenes", "3", "--questions", "0", "--relations", "1"],
                           "ask no relation question")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


def test_object_cells_mark_the_cells_each_object_covers():
    scene = make_scene(0, "validation", 5)
    assert len(scene.objects) >= 2
    marks = [object_cells(scene, thing, (8, 8)).reshape(8, 8) for thing in scene.objects]
    for thing, mark in zip(scene.objects, marks, strict=True):
        rows, cols = mark.nonzero(as_tuple=True)
        assert len(rows) >= 1  # a large object covers at least one 28 px cell by 30%
        reach = thing.size / 2 + 28 / 2 ** 0.5  # a cell it covers has its centre within the radius + half a diagonal
        assert (((cols + 0.5) * 28 - thing.centre[0]) ** 2 + ((rows + 0.5) * 28 - thing.centre[1]) ** 2).sqrt().max() \
            <= reach
    assert not (marks[0] & marks[1]).any()  # objects do not overlap, nor do their cells
    assert object_cells(scene, scene.objects[0], (14, 14)).sum() > marks[0].sum()  # finer grid, more cells
    with pytest.raises(ValueError, match="grid must be square and divide"):
        object_cells(scene, scene.objects[0], (10, 10))


def test_relation_attention_reads_every_relation_question_and_restores_the_attention():
    vlm = PyramidVLM.from_pretrained("embedded-qwen", levels=3)
    asked = [questions_for(make_scene(0, "validation", i), 0, "validation", i)[3]["question"] for i in range(8)]
    relations = [q for q in asked if RELATION.fullmatch(q)]
    assert relations and len(relations) == sum(" left of " in q or " above " in q for q in asked)
    result = relation_attention(vlm, scenes=8)
    layers, heads = vlm.model.config.text_config.num_hidden_layers, vlm.model.config.text_config.num_attention_heads
    assert result["questions"] == len(relations)
    assert result["subject"].shape == result["other"].shape == result["asymmetry"].shape == (layers, heads)
    total = result["subject"] + result["other"]
    assert (result["subject"] >= 0).all() and (result["other"] >= 0).all() and (total <= 1 + 1e-5).all()
    assert total.max() > 0.01  # the objects do get attention
    assert (result["asymmetry"].abs() <= 1).all()
    assert vlm.model.config.text_config._attn_implementation == "sdpa"
    with eager_attention(vlm):
        assert vlm.model.config.text_config._attn_implementation == "eager"
        assert vlm.model.config.vision_config._attn_implementation == "sdpa"
    assert vlm.model.config.text_config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="ask no relation question"):
        relation_attention(vlm, scenes=0)


def test_relation_attention_at_one_level_is_what_the_model_attends_through_its_own_processor():
    """The reference runs the unwrapped model on its processor's inputs (64 merged tokens, row-major) with eager
    attention, and sums the last prompt token's weights over the cells each object covers."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pyrtok.data.shapes_vqa import object_name
    from pyrtok.embedded.models import embedded_model

    folder = embedded_model("embedded-qwen")
    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(folder)
    vlm = PyramidVLM.from_pretrained("embedded-qwen", levels=1)
    scenes = 6
    expected: dict[str, list[torch.Tensor]] = {"subject": [], "other": []}
    for index in range(scenes):
        scene = make_scene(0, "validation", index)
        match = RELATION.fullmatch(questions_for(scene, 0, "validation", index)[3]["question"])
        if match is None:
            continue
        named = {object_name(o, scene.objects): o for o in scene.objects}
        inputs = processor(images=[scene.image], text=[vlm.chat_prompt(match.string)], return_tensors="pt")
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
        image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
        assert len(image) == 64
        for key in expected:
            cells = object_cells(scene, named[match[key]], (8, 8))
            expected[key].append(torch.stack([a[0, :, -1, image[cells]].sum(-1) for a in attentions]))
    result = relation_attention(vlm, scenes=scenes)
    assert result["questions"] == len(expected["subject"]) >= 2
    for key in expected:
        torch.testing.assert_close(result[key], torch.stack(expected[key]).mean(0), atol=1e-5, rtol=1e-4)
