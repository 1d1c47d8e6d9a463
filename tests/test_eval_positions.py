"""pyrtok positions: the position signal in the features, and answers with the image tokens' LM positions changed."""

from __future__ import annotations

import pytest
import torch
from pyrtok.eval.positions import lm_positions, main, position_signal, scramble

from pyrtok.data.conversations import scene_batch
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
    result = main(["--model", "embedded-qwen", "--scenes", "3", "--questions", "5", "--modes", "none", "same"])
    out = capsys.readouterr().out
    assert "row R^2" in out and "| none |" in out and "| same |" in out
    assert set(result["accuracy"]) == {"none", "same"}
    assert set(result["accuracy"]["none"]) == {"overall", "coarse", "fine", "counting", "spatial", "existence"}
    assert all(0 <= v <= 1 for v in result["accuracy"]["same"].values())
    for argv, message in ((["--scenes", "2"], "--scenes must be >= 3"),
                          (["--prompt", "USER: <image> ASSISTANT:"], "--prompt must contain {question}")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
