import pytest
import torch
import torch.nn.functional as F

from pyrtok.pyramid import laplacian_pyramid
from pyrtok.signals import (
    DifficultyCalibrator,
    band_energy_maps,
    center_surround,
    cls_attention,
    difficulty,
    laplacian_energy,
    query_relevance,
    redundancy,
    saliency,
    saliency_map,
    spectral_residual,
)
from pyrtok.signals._pool import box_mean, level_box_mean, normalise_map
from pyrtok.tokens import from_feature_grid


def blob_image(size: int = 128, top: int = 80, left: int = 24, side: int = 16) -> torch.Tensor:
    image = torch.full((1, 3, size, size), 0.4)
    image[:, :, top : top + side, left : left + side] = 1.0
    return image


def test_box_mean_matches_a_direct_mean(rng):
    maps = torch.rand(2, 20, 30, generator=rng)
    boxes = torch.tensor(
        [[0.0, 0.0, 30.0, 20.0], [3.0, 4.0, 9.0, 5.0], [12.5, 7.2, 13.1, 7.9], [29.0, 19.0, 40.0, 25.0]]
    )
    means = box_mean(maps, boxes)
    assert torch.allclose(means[:, 0], maps.mean((1, 2)))
    assert torch.allclose(means[:, 1], maps[:, 4:5, 3:9].mean((1, 2)))
    assert torch.allclose(means[:, 2], maps[:, 7, 12:14].mean(1))  # edges round outwards
    assert torch.allclose(means[:, 3], maps[:, 19, 29])


def test_laplacian_energy_is_the_band_energy_under_each_box(rng):
    image = torch.rand(1, 3, 64, 64, generator=rng)
    tokens = from_feature_grid(torch.rand(1, 8, 8, 4), 2, patch_size=8)
    energy = laplacian_energy(tokens, image)
    bands = laplacian_pyramid(image, 3)
    first_fine = tokens.level_slices[0].start
    assert torch.allclose(energy[0, first_fine], bands[0][0, :, :8, :8].square().mean(), rtol=1e-4)
    assert torch.allclose(energy[0, 0], bands[1][0, :, :8, :8].square().mean(), rtol=1e-4)


def test_detail_scores_higher_than_flat_areas():
    image = torch.full((1, 3, 64, 64), 0.5)
    image[:, :, :32, :32] = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = from_feature_grid(torch.rand(1, 8, 8, 4), 2, patch_size=8)
    energy = laplacian_energy(tokens, image)[0, tokens.level_slices[0]].reshape(8, 8)
    assert energy[:4, :4].min() > 10 * energy[5:, 5:].max()


@pytest.mark.parametrize("fn", [spectral_residual, center_surround])
def test_saliency_maps_peak_at_the_odd_one_out(fn):
    saliency_map = fn(blob_image())
    assert saliency_map.shape == (1, 128, 128)
    assert 0 <= saliency_map.min() and saliency_map.max() <= 1
    peak = int(saliency_map[0].argmax())
    row, col = peak // 128, peak % 128
    assert 64 <= row <= 112 and 8 <= col <= 56


def test_token_saliency_ranks_the_blob_tokens_first():
    tokens = from_feature_grid(torch.rand(1, 8, 8, 4), 2, patch_size=16)
    scores = saliency(tokens, blob_image())[0, tokens.level_slices[0]].reshape(8, 8)
    peak = int(scores.argmax())
    assert (peak // 8, peak % 8) in {(5, 1), (5, 2)}  # the blob spans columns 24-40: patches 1 and 2 of row 5


def test_cls_attention_and_query_relevance():
    attention = torch.rand(2, 4, 4)
    tokens = from_feature_grid(torch.randn(2, 4, 4, 5), 2, attention=attention)
    assert torch.equal(cls_attention(tokens), tokens.attention)
    with pytest.raises(ValueError, match="attention is None"):
        cls_attention(from_feature_grid(torch.rand(1, 4, 4, 5), 2))
    query = torch.randn(2, 5)
    expected = F.cosine_similarity(tokens.features, query.unsqueeze(1), dim=-1)
    assert torch.allclose(query_relevance(tokens, query), expected, atol=1e-6)
    assert torch.allclose(query_relevance(tokens, query[0]), F.cosine_similarity(tokens.features, query[0], dim=-1),
                          atol=1e-6)
    with pytest.raises(ValueError, match="query must have shape"):
        query_relevance(tokens, torch.randn(3, 5))


def test_redundancy_is_high_for_uniform_features_and_lower_for_noise(rng):
    uniform = from_feature_grid(torch.ones(1, 6, 6, 4), 3)
    assert torch.allclose(redundancy(uniform), torch.ones(1, uniform.num_tokens))
    noisy = from_feature_grid(torch.randn(1, 6, 6, 4, generator=rng), 3)
    scores = redundancy(noisy)
    assert scores.shape == (1, noisy.num_tokens) and scores.mean() < 0.6
    # A token identical to its four neighbours scores higher than the rest of its level.
    grid = torch.randn(1, 6, 6, 4, generator=rng)
    grid[0, 1:4, 1:4] = grid[0, 2, 2]
    scores = redundancy(from_feature_grid(grid, 1))[0].reshape(6, 6)
    assert scores[2, 2] == scores.max()


def test_difficulty_is_calibrated_and_orders_flat_below_busy(rng):
    flat = torch.full((1, 3, 224, 224), 0.5) + 0.02 * torch.linspace(0, 1, 224)
    busy = torch.rand(1, 3, 224, 224, generator=rng)
    scene = blob_image(224)
    values = difficulty(torch.cat([flat, scene, busy]))
    assert bool(((values >= 0) & (values <= 1)).all())
    assert values[0] < values[2] and values[1] < values[2]
    tokens = from_feature_grid(torch.randn(1, 14, 14, 8, generator=rng), 2, patch_size=16)
    with_query = difficulty(busy, tokens, torch.randn(1, 8, generator=rng))
    assert with_query.shape == (1,)
    with pytest.raises(ValueError, match="query needs tokens"):
        difficulty(busy, None, torch.randn(1, 8))


def test_calibrator_spreads_reference_values_uniformly(rng, tmp_path):
    raw = torch.rand(1000, generator=rng) ** 3
    calibrator = DifficultyCalibrator.fit(raw)
    calibrated = calibrator(raw)
    assert abs(calibrated.mean().item() - 0.5) < 0.02
    assert (calibrated.quantile(0.9) - 0.9).abs() < 0.02
    assert bool((calibrator(raw.sort().values).diff() >= 0).all())
    calibrator.save(tmp_path / "ref.json")
    assert torch.allclose(DifficultyCalibrator.load(tmp_path / "ref.json").quantiles, calibrator.quantiles)
    with pytest.raises(ValueError, match="non-decreasing"):
        DifficultyCalibrator(torch.tensor([0.3, 0.1]))
    default = DifficultyCalibrator.default()
    assert default.quantiles.numel() == 101


def test_level_box_mean_pools_each_level_over_its_own_boxes(rng):
    tokens = from_feature_grid(torch.rand(2, 7, 9, 4), 3, patch_size=8)  # odd grids: partial coarse cells
    maps = [torch.rand(2, 56 >> lvl, 72 >> lvl, generator=rng) for lvl in range(4)]  # a spare fourth map is ignored
    pooled = level_box_mean(maps, tokens)
    assert pooled.shape == (2, tokens.num_tokens)
    for lvl, level_slice in enumerate(tokens.level_slices):
        scale = torch.tensor([maps[lvl].shape[-1] / 72, maps[lvl].shape[-2] / 56] * 2)
        assert torch.equal(pooled[:, level_slice], box_mean(maps[lvl], tokens.box[level_slice] * scale))


def test_combined_saliency_is_the_normalised_sum_of_both_maps(rng):
    image = torch.rand(2, 3, 96, 80, generator=rng)
    expected = normalise_map(spectral_residual(image) + center_surround(image))
    assert torch.equal(saliency_map(image), expected)
    grey = image[:, :1]
    assert torch.equal(saliency_map(grey), normalise_map(spectral_residual(grey) + center_surround(grey)))


def test_signals_check_images_and_levels_unless_told_not_to():
    tokens = from_feature_grid(torch.rand(1, 4, 4, 4), 2, patch_size=16)
    image = blob_image(64)
    image[0, 0, 5, 5] = float("nan")
    for fn in (lambda: saliency(tokens, image), lambda: laplacian_energy(tokens, image), lambda: difficulty(image),
               lambda: spectral_residual(image), lambda: band_energy_maps(image, 3)):
        with pytest.raises(ValueError, match="image contains NaN"):
            fn()
    assert torch.isnan(saliency(tokens, image, "spectral_residual", check_finite=False)).all()
    with pytest.raises(ValueError, match="levels must be >= 1"):
        band_energy_maps(blob_image(64), 0)
    with pytest.raises(TypeError, match="levels must be an int"):
        band_energy_maps(blob_image(64), 2.0)
    with pytest.raises(ValueError, match="at least 4 band energy maps"):
        difficulty(blob_image(64), band_maps=band_energy_maps(blob_image(64), 3))
