import pytest
import torch
import torch.nn.functional as F

from pyrtok.losses import LapLoss, lap_loss, laplacian_band_errors
from pyrtok.pyramid import gaussian_pyramid, laplacian_pyramid


@pytest.fixture
def pair(rng):
    target = torch.rand(2, 3, 32, 32, generator=rng)
    pred = (target + 0.1 * torch.randn(target.shape, generator=rng)).clamp(0, 1)
    return pred, target


@pytest.mark.parametrize("distance", ["l1", "l2", "charbonnier"])
def test_zero_for_identical_positive_otherwise_and_symmetric(pair, distance):
    pred, target = pair
    assert lap_loss(target, target, distance=distance).item() == 0.0
    loss = lap_loss(pred, target, distance=distance)
    assert loss.item() > 0
    assert torch.allclose(loss, lap_loss(target, pred, distance=distance), rtol=1e-6, atol=0)


def test_residual_is_included(pair):
    _, target = pair
    shifted = target + 0.1  # a constant offset lives only in the low-pass residual
    errors = laplacian_band_errors(shifted, target, levels=4)
    assert torch.allclose(errors[:, :-1], torch.zeros(2, 3), atol=1e-6)
    assert torch.allclose(errors[:, -1], torch.full((2,), 0.1), atol=1e-5)
    assert lap_loss(shifted, target, levels=4).item() == pytest.approx(0.1, abs=1e-5)


@pytest.mark.parametrize(("distance", "plain"), [("l1", F.l1_loss), ("l2", F.mse_loss)])
def test_one_level_equals_the_plain_distance(pair, distance, plain):
    pred, target = pair
    assert torch.allclose(lap_loss(pred, target, levels=1, distance=distance), plain(pred, target), rtol=1e-6)


def test_charbonnier_one_level(pair):
    pred, target = pair
    eps = 1e-2
    expected = (torch.sqrt((pred - target) ** 2 + eps**2) - eps).mean()
    assert torch.allclose(lap_loss(pred, target, levels=1, distance="charbonnier", eps=eps), expected, rtol=1e-6)


def test_per_level_errors_match_a_manual_computation(pair):
    pred, target = pair
    pairs = zip(laplacian_pyramid(pred, 4), laplacian_pyramid(target, 4), strict=True)
    manual = [(a - b).abs().flatten(1).mean(1) for a, b in pairs]
    assert torch.allclose(laplacian_band_errors(pred, target, 4), torch.stack(manual, 1), atol=1e-6)


def test_weights_are_respected(pair):
    pred, target = pair
    errors = laplacian_band_errors(pred, target, 4)
    weights = [0.5, 2.0, 0.0, 3.0]
    assert torch.allclose(lap_loss(pred, target, 4, weights), (errors * torch.tensor(weights)).sum(1).mean())
    assert torch.allclose(lap_loss(pred, target, 4), errors.sum(1).mean())
    zeroed = lap_loss(pred, target, 4, [0.0, 0.0, 0.0, 1.0])
    assert torch.allclose(zeroed, errors[:, -1].mean())


def test_mask_restricts_the_loss(rng):
    target = torch.rand(2, 3, 128, 128, generator=rng)
    mask = torch.zeros(2, 1, 128, 128)
    mask[:, :, :, :48] = 1
    pred = target.clone()
    pred[:, :, :, 112:] = torch.rand(2, 3, 128, 16, generator=rng)  # far outside the mask at every level
    assert lap_loss(pred, target, levels=3, mask=mask).item() == pytest.approx(0.0, abs=1e-7)
    assert lap_loss(pred, target, levels=3).item() > 0.01
    pred[:, :, :, :8] += 0.2  # inside the mask
    assert lap_loss(pred, target, levels=3, mask=mask).item() > 0.01


def test_mask_is_carried_down_with_pyr_down(pair, rng):
    pred, target = pair
    mask = (torch.rand(2, 1, 32, 32, generator=rng) > 0.5).float()
    masks = gaussian_pyramid(mask, 3)
    bands = laplacian_pyramid(pred - target, 3)
    manual = [(b.abs() * m).flatten(1).sum(1) / m.expand_as(b).flatten(1).sum(1)
              for b, m in zip(bands, masks, strict=True)]
    errors = laplacian_band_errors(pred, target, 3, mask=mask.bool())
    assert torch.allclose(errors, torch.stack(manual, 1), atol=1e-6)


def test_empty_mask_contributes_zero(pair):
    pred, target = pair
    mask = torch.ones(2, 1, 32, 32)
    mask[1] = 0
    per_sample = lap_loss(pred, target, mask=mask, reduction="none")
    assert per_sample[1].item() == 0.0 and per_sample[0].item() > 0


def test_gradient_matches_finite_differences():
    pred = torch.rand(2, 2, 12, 10, dtype=torch.float64, requires_grad=True)
    target = torch.rand(2, 2, 12, 10, dtype=torch.float64)
    mask = torch.rand(2, 1, 12, 10, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: lap_loss(p, target, 3, distance="l2", mask=mask), (pred,))
    assert torch.autograd.gradcheck(lambda p: lap_loss(p, target, 3, distance="charbonnier", mask=mask), (pred,))
    # l1 is non-smooth only at exact ties, which random inputs avoid.
    assert torch.autograd.gradcheck(lambda p: lap_loss(p, target, 3, [1.0, 0.5, 2.0]), (pred,))


def test_video_and_reductions(rng):
    target = torch.rand(2, 4, 3, 32, 32, generator=rng)
    pred = target.flip(-1)
    per_sample = lap_loss(pred, target, reduction="none")
    assert per_sample.shape == (2,)
    assert torch.allclose(lap_loss(pred, target, reduction="sum"), per_sample.sum())
    assert torch.allclose(lap_loss(pred, target), per_sample.mean())
    frames = torch.stack([lap_loss(pred[:, t], target[:, t], reduction="none") for t in range(4)], 1)
    assert torch.allclose(per_sample, frames.mean(1), atol=1e-6)
    mask = torch.ones(2, 4, 1, 32, 32)
    assert torch.allclose(lap_loss(pred, target, mask=mask), lap_loss(pred, target), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(pair, dtype):
    pred, target = pair
    loss = lap_loss(pred.to(dtype), target.to(dtype))
    assert loss.dtype == torch.float32
    reference = lap_loss(pred.to(dtype).float(), target.to(dtype).float())
    assert torch.allclose(loss, reference, rtol=1e-5)


def test_module_and_default_levels(pair, device):
    pred, target = (t.to(device) for t in pair)
    module = LapLoss(levels=3, distance="l2", reduction="none")
    assert torch.allclose(module(pred, target), lap_loss(pred, target, 3, distance="l2", reduction="none"))
    assert laplacian_band_errors(pred, target).shape == (2, 5)  # min(5, max_levels(32, 32) = 6)
    assert laplacian_band_errors(pred[..., :4, :4], target[..., :4, :4]).shape == (2, 3)


def test_bad_inputs_get_clear_errors(pair):
    pred, target = pair
    with pytest.raises(ValueError, match="same shape"):
        lap_loss(pred, target[..., :16])
    with pytest.raises(TypeError, match="same dtype"):
        lap_loss(pred.double(), target)
    with pytest.raises(TypeError, match="floating dtype"):
        lap_loss((pred * 255).byte(), (target * 255).byte())
    with pytest.raises(ValueError, match="batched"):
        lap_loss(pred[0, 0], target[0, 0])
    with pytest.raises(ValueError, match="distance"):
        lap_loss(pred, target, distance="huber")
    with pytest.raises(ValueError, match="reduction"):
        lap_loss(pred, target, reduction="max")
    with pytest.raises(ValueError, match="one entry per level"):
        lap_loss(pred, target, 3, [1.0, 1.0])
    with pytest.raises(ValueError, match="non-negative"):
        lap_loss(pred, target, 2, [1.0, -1.0])
    with pytest.raises(ValueError, match="the maximum is 6"):
        lap_loss(pred, target, 7)
    with pytest.raises(ValueError, match="mask has shape"):
        lap_loss(pred, target, mask=torch.ones(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        lap_loss(pred, target, mask=torch.full((2, 1, 32, 32), 2.0))
    with pytest.raises(TypeError, match="mask must be bool or floating"):
        lap_loss(pred, target, mask=torch.ones(2, 1, 32, 32, dtype=torch.int64))
    bad = target.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="target contains NaN"):
        lap_loss(pred, bad)
    nan_pred = pred.clone()
    nan_pred[0, 0, 0, 0] = float("nan")
    assert torch.isnan(lap_loss(nan_pred, target))  # a diverging prediction stays visible
    with pytest.raises(ValueError, match="one entry per level"):
        LapLoss(levels=2, weights=[1.0])


def test_level_counts_are_checked_like_the_pyramid_checks_them(pair):
    pred, target = pair
    with pytest.raises(ValueError, match="levels must be >= 1"):
        LapLoss(levels=0)
    with pytest.raises(TypeError, match="levels must be an int >= 1 or None"):
        LapLoss(levels=2.5)
    with pytest.raises(TypeError, match="levels must be an int"):
        lap_loss(pred, target, levels=True)
    assert LapLoss(levels=None)(pred, target) == lap_loss(pred, target)


def test_the_loss_builds_on_the_public_pyramid_only():
    from pyrtok import losses, pyramid

    borrowed = {name for name, value in vars(losses).items() if getattr(value, "__module__", None) == pyramid.__name__}
    assert borrowed and not any(name.startswith("_") for name in borrowed)


@pytest.mark.parametrize("distance", ["l1", "l2", "charbonnier"])
def test_unmasked_errors_and_gradients_equal_the_distance_map_then_its_mean(distance):
    """L1 and L2 run as a norm and a dot product; they give the mean of the distance map and its gradient."""
    from pyrtok.losses import _distance

    g = torch.Generator().manual_seed(3)
    pred = torch.rand(3, 2, 33, 40, generator=g, dtype=torch.float64).requires_grad_(True)
    target = torch.rand(3, 2, 33, 40, generator=g, dtype=torch.float64)
    ours = laplacian_band_errors(pred, target, 4, distance=distance)
    reference = torch.stack([_distance(band, distance, 1e-3).flatten(1).mean(-1)
                             for band in laplacian_pyramid(pred - target, 4)], dim=-1)
    assert torch.allclose(ours, reference, rtol=1e-12, atol=1e-15)
    weights = torch.rand(4, generator=g, dtype=torch.float64)
    grad_ours, = torch.autograd.grad((ours * weights).sum(), pred)
    grad_reference, = torch.autograd.grad((reference * weights).sum(), pred)
    assert torch.allclose(grad_ours, grad_reference, rtol=1e-10, atol=1e-15)


def test_l1_gradient_is_zero_where_nothing_differs_and_can_be_differentiated_again():
    g = torch.Generator().manual_seed(5)
    target = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64)
    pred = torch.stack([target[0], torch.rand(3, 16, 16, generator=g, dtype=torch.float64)]).requires_grad_(True)
    (grad,) = torch.autograd.grad(lap_loss(pred, target, 3), pred, create_graph=True)
    assert torch.equal(grad[0], torch.zeros_like(grad[0]))  # sign(0) = 0, as |x|'s own gradient has it
    assert grad[1].abs().sum() > 0
    away = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64, requires_grad=True)  # no ties: |x| is smooth
    assert torch.autograd.gradgradcheck(lambda p: lap_loss(p, target, 3), (away,))
