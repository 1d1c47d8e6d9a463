"""What each policy does, beyond the shared contract."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyrtok import allocators
from pyrtok.allocators.select import spread_priority, water_fill
from pyrtok.signals import laplacian_energy
from pyrtok.tokens import from_feature_grid

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "allocators"


def kept_levels(tokens, selection, b=0):
    index = selection.index[b][selection.mask[b]]
    return [int((tokens.level[index] == lvl).sum()) for lvl in range(tokens.num_levels)]


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(0)
    return from_feature_grid(torch.randn(1, 8, 8, 6, generator=g), 3, patch_size=8,
                             attention=torch.rand(1, 8, 8, generator=g))


def test_registry_and_every_config_file_builds():
    assert set(allocators.available()) >= {
        "all", "random", "pool", "saliency", "difficulty", "laplacian", "cls_attention", "query", "foveated"
    }
    names = set()
    for path in sorted(CONFIGS.glob("*.yaml")):
        allocator = allocators.from_config(path)
        names.add(allocator.name)
        assert allocators.from_config(allocator.config()).config() == allocator.config()
    assert names == set(allocators.available())
    with pytest.raises(ValueError, match="unknown allocator 'nope'"):
        allocators.create("nope")
    with pytest.raises(ValueError, match="'name' key"):
        allocators.from_config({"budget": 3})
    with pytest.raises(FileNotFoundError):
        allocators.from_config(CONFIGS / "missing.yaml")
    with pytest.raises(ValueError, match="already registered"):
        allocators.register("pool")(type("Again", (allocators.Allocator,), {}))


@settings(max_examples=200, deadline=None)
@given(
    weights=st.lists(st.floats(0, 100), min_size=1, max_size=5),
    capacity=st.lists(st.integers(0, 50), min_size=5, max_size=5),
    fraction=st.floats(0, 1),
)
def test_water_fill_respects_capacity_and_total(weights, capacity, fraction):
    levels = len(weights)
    cap = torch.tensor(capacity[:levels])
    total = torch.tensor([int(fraction * int(cap.sum()))])
    quotas = water_fill(torch.tensor([weights]), cap, total)[0]
    assert int(quotas.sum()) == int(total)
    assert bool((quotas <= cap).all()) and bool((quotas >= 0).all())


def test_water_fill_is_proportional_until_a_level_is_full():
    quotas = water_fill(torch.tensor([[1.0, 2.0, 1.0]]), torch.tensor([100, 100, 100]), torch.tensor([40]))
    assert quotas.tolist() == [[10, 20, 10]]
    quotas = water_fill(torch.tensor([[1.0, 8.0, 1.0]]), torch.tensor([100, 10, 100]), torch.tensor([40]))
    assert quotas.tolist() == [[15, 10, 15]]


def test_all_keeps_everything_and_random_depends_on_the_seed(tokens):
    full = allocators.create("all")(tokens, tokens.num_tokens)
    assert full.index[0].tolist() == list(range(tokens.num_tokens))
    rand = allocators.create("random")
    a = rand(tokens, 20, generator=torch.Generator().manual_seed(1))
    b = rand(tokens, 20, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a.index, b.index)
    assert torch.equal(rand(tokens, 20).index, allocators.create("random", seed=0)(tokens, 20).index)


def test_pool_keeps_a_whole_coarse_grid_and_tops_up_evenly(tokens):
    pool = allocators.create("pool")
    assert kept_levels(tokens, pool(tokens, 16)) == [0, 16, 0]  # 8x8 -> 4x4 grid exactly
    assert kept_levels(tokens, pool(tokens, 20)) == [4, 16, 0]
    corners = pool(tokens, 4 + 4)  # level 2 (2x2) whole + 4 evenly spread tokens of level 1
    index = corners.index[0]
    level1 = index[tokens.level[index] == 1]
    rows, cols = tokens.row[level1], tokens.col[level1]
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 0), (0, 2), (2, 0), (2, 2)]


def test_spread_priority_puts_strided_subgrids_first():
    priority = spread_priority(((4, 4),), torch.device("cpu")).reshape(4, 4)
    order = torch.argsort(priority.flatten(), descending=True)[:4]
    assert sorted(order.tolist()) == [0, 2, 8, 10]


def test_saliency_keeps_the_salient_region_and_respects_level_weights(tokens):
    image = torch.full((1, 3, 64, 64), 0.4)
    image[:, :, 40:56, 8:24] = 1.0
    kept = allocators.create("saliency", level_weights=[1.0, 0.0, 0.0])(tokens, 4, image=image)
    boxes = tokens.box[kept.index[0]]
    assert kept_levels(tokens, kept) == [4, 0, 0]
    assert bool(((boxes[:, 0] < 24) & (boxes[:, 2] > 8) & (boxes[:, 1] < 56) & (boxes[:, 3] > 40)).all())
    coarse = allocators.create("saliency", level_weights=[0.0, 0.0, 1.0])(tokens, 4, image=image)
    assert kept_levels(tokens, coarse) == [0, 0, 4]


def test_laplacian_quotas_follow_band_energy(tokens):
    g = torch.Generator().manual_seed(3)
    noisy = torch.rand(1, 3, 64, 64, generator=g)  # energy mostly in the finest band
    smooth = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(1, 3, 64, 64).clone()
    smooth[:, :, 16:48, 16:48] = 0.2  # one big edge: energy shared with coarse bands
    allocator = allocators.create("laplacian")
    fine_noisy = kept_levels(tokens, allocator(tokens, 40, image=noisy))[0]
    fine_smooth = kept_levels(tokens, allocator(tokens, 40, image=smooth))[0]
    assert fine_noisy > fine_smooth
    # Within a level, the highest-energy tokens are the kept ones.
    energy = laplacian_energy(tokens, smooth)[0]
    selection = allocator(tokens, 40, image=smooth)
    keep = selection.keep_mask(tokens.num_tokens)[0]
    for s in tokens.level_slices:
        if keep[s].any() and (~keep[s]).any():
            assert energy[s][keep[s]].min() >= energy[s][~keep[s]].max()


def test_cls_attention_keeps_the_most_attended_tokens(tokens):
    selection = allocators.create("cls_attention")(tokens, 10)
    expected = torch.topk(tokens.attention[0], 10).indices.sort().values
    assert torch.equal(selection.index[0], expected)


def test_query_keeps_a_context_floor_then_relevant_tokens(tokens):
    target = tokens.level_slices[0].start + 27
    query = tokens.features[:, target]
    selection = allocators.create("query", context=0.25)(tokens, 8, query=query)
    assert target in selection.index[0].tolist()
    assert kept_levels(tokens, selection)[2] >= 2  # ceil(0.25 * 8) coarsest-level context tokens
    no_context = allocators.create("query", context=0.0)(tokens, 1, query=query)
    assert no_context.index[0].tolist() == [target]


def test_foveated_is_fine_at_the_fixation_and_coarse_in_the_periphery(tokens):
    target = tokens.level_slices[0].start + 0  # top-left finest token
    selection = allocators.create("foveated")(tokens, 30, query=tokens.features[:, target])
    keep = selection.keep_mask(tokens.num_tokens)[0]
    centres = (tokens.box[:, :2] + tokens.box[:, 2:]) / 2
    distance = (centres - centres[target]).norm(dim=1)
    fine = tokens.level == 0
    assert keep[target]
    assert distance[fine & keep].max() < distance[fine & ~keep].min()  # a fovea, not scattered tokens
    assert bool(keep[tokens.level == 2].all())  # the coarse periphery is covered


def test_difficulty_gives_easy_images_smaller_budgets_and_shallower_pyramids(tokens):
    g = torch.Generator().manual_seed(0)
    easy = torch.full((1, 3, 64, 64), 0.5) + 0.05 * torch.linspace(0, 1, 64)
    hard = torch.rand(1, 3, 64, 64, generator=g)
    allocator = allocators.create("difficulty")
    batch_tokens = from_feature_grid(torch.randn(2, 8, 8, 6, generator=g), 3, patch_size=8)
    both = torch.cat([easy, hard])
    budgets = allocator.budgets(batch_tokens, 40, image=both)
    assert budgets[0] < budgets[1] <= 40
    selection = allocator(batch_tokens, 40, image=both)
    assert torch.equal(selection.count, budgets)
    easy_levels = kept_levels(batch_tokens, selection, 0)
    assert easy_levels[0] == 0  # an easy image never reaches the finest level
    with pytest.raises(ValueError, match="tiers"):
        allocators.create("difficulty", tiers=[0.5, 0.25, 1.0])


def test_redundancy_pass_skips_low_energy_children_of_kept_parents(tokens):
    image = torch.full((1, 3, 64, 64), 0.5)
    image[:, :, :, :32] = torch.rand(1, 3, 64, 32, generator=torch.Generator().manual_seed(0))
    base = allocators.create("all")
    plain = base(tokens, 60, image=image).keep_mask(tokens.num_tokens)[0]
    pruned = allocators.create("all", redundancy=True)(tokens, 60, image=image).keep_mask(tokens.num_tokens)[0]
    energy = laplacian_energy(tokens, image)[0]

    def redundant(keep):
        parent = tokens.parent
        has_parent = parent >= 0
        low = torch.zeros_like(keep)
        for s in tokens.level_slices:
            low[s] = energy[s] < energy[s].median()
        return keep & has_parent & keep[parent.clamp_min(0)] & low

    assert int(pruned.sum()) == int(plain.sum()) == 60
    assert int(redundant(pruned).sum()) < int(redundant(plain).sum())


def test_option_validation():
    with pytest.raises(ValueError, match="method"):
        allocators.create("saliency", method="itti")
    with pytest.raises(ValueError, match="context"):
        allocators.create("query", context=2)
    with pytest.raises(ValueError, match="e0"):
        allocators.create("foveated", e0=0)
    with pytest.raises(ValueError, match="redundancy_quantile"):
        allocators.create("random", redundancy_quantile=1.5)
    with pytest.raises(TypeError, match="redundancy"):
        allocators.create("random", redundancy="yes")


def test_redundancy_keeps_per_level_quotas_and_survives_infinite_scores():
    g = torch.Generator().manual_seed(0)
    tokens = from_feature_grid(torch.randn(1, 8, 8, 6, generator=g), 3, patch_size=8)
    image = torch.rand(1, 3, 64, 64, generator=g)
    for name in ("laplacian", "difficulty"):
        plain = allocators.create(name)(tokens, 30, image=image)
        pruned = allocators.create(name, redundancy=True)(tokens, 30, image=image)
        assert kept_levels(tokens, plain) == kept_levels(tokens, pruned)
    attention = torch.rand(1, 8, 8, generator=g)
    attention[0, 0, 0] = float("inf")
    hot = from_feature_grid(torch.randn(1, 8, 8, 6, generator=g), 3, patch_size=8, attention=attention)
    selection = allocators.create("cls_attention", redundancy=True)(hot, 10, image=image)
    assert selection.count.tolist() == [10]


def test_laplacian_power_zero_splits_by_level_size(tokens):
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    levels = kept_levels(tokens, allocators.create("laplacian", power=0.0)(tokens, 42, image=image))
    assert levels == [32, 8, 2]  # 64 : 16 : 4 tokens per level


def test_numpy_integer_budgets_are_accepted(tokens):
    import numpy as np

    assert allocators.create("pool")(tokens, np.int64(5)).count.tolist() == [5]


def _weighted_greedy(space: np.ndarray, weight: np.ndarray, steps: int) -> list[int]:
    """The energy-weighted max-min rule written out in numpy for one image: distances 1 - cos, the first pick
    the largest weight x distance to the nearest neighbour, then the largest weight x distance to the kept set."""
    unit = space / np.linalg.norm(space, axis=1, keepdims=True)
    distance = 1.0 - unit @ unit.T
    n = len(space)
    nearest = np.array([min(distance[i, j] for j in range(n) if j != i) for i in range(n)])
    picks = [int(np.argmax(nearest * weight))]
    while len(picks) < steps:
        to_set = np.array([min(distance[p, i] for p in picks) for i in range(n)])
        score = np.where(np.isin(np.arange(n), picks), -np.inf, to_set * weight)
        picks.append(int(np.argmax(score)))
    return picks


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_energy_diversity_is_the_weighted_max_min_rule_and_merges_what_it_drops(alpha):
    generator = torch.Generator().manual_seed(3)
    tokens = from_feature_grid(torch.randn(2, 8, 8, 12, generator=generator, dtype=torch.float64).float(), 3,
                               image_size=(64, 64))
    image = torch.rand(2, 3, 64, 64, generator=generator)
    energy = allocators.Context(image, None, None).band_energy(tokens).numpy()
    features = tokens.features.double().numpy()
    selection = allocators.create("energy_diversity", alpha=alpha)(tokens, 9, image=image)
    for b in range(2):
        weight = np.empty(tokens.num_tokens)
        for level in tokens.level_slices:
            weight[level] = np.maximum(energy[b, level] / energy[b, level].max(), 1e-6)
        picks = _weighted_greedy(features[b], weight**alpha, 9)
        kept = selection.index[b, : int(selection.count[b])].tolist()
        assert kept == sorted(picks)
        # each dropped token joins its most similar kept token; a kept token is the mean of itself and them
        unit = features[b] / np.linalg.norm(features[b], axis=1, keepdims=True)
        nearest_kept = np.array(kept)[np.argmax(unit @ unit[kept].T, axis=1)]
        for row, token in enumerate(kept):
            members = [token] + [i for i in range(tokens.num_tokens) if i not in kept and nearest_kept[i] == token]
            expected = features[b][members].mean(0)
            assert np.allclose(selection.kept_embeddings[b, row].numpy(), expected, atol=1e-5)


def test_energy_diversity_without_weight_or_merge_is_divprune_over_every_level(tokens):
    image = torch.rand(tokens.features.shape[0], 3, *tokens.image_size)
    for budget in (1, 7, 20):
        ours = allocators.create("energy_diversity", alpha=0.0, merge=False)(tokens, budget, image=image)
        divprune = allocators.create("divprune", scales="all")(tokens, budget)
        assert torch.equal(ours.index, divprune.index) and ours.kept_embeddings is None
    # with embeddings in another dtype the distances are computed in that dtype, as DivPrune computes them
    half = replace(tokens, embeddings=torch.randn(*tokens.features.shape[:2], 5).to(torch.bfloat16))
    for budget in (3, 11):
        ours = allocators.create("energy_diversity", alpha=0.0, merge=False)(half, budget, image=image)
        assert torch.equal(ours.index, allocators.create("divprune", scales="all")(half, budget).index)
    assert allocators.create("energy_diversity", alpha=40.0)(half, 5, image=image).count.tolist() == [5]
    broken = replace(half, embeddings=half.embeddings.clone().index_fill_(1, torch.tensor([3]), float("nan")))
    with pytest.raises(ValueError, match=r"tokens\.embeddings contains NaN"):
        allocators.create("energy_diversity")(broken, 4, image=image)
    with pytest.raises(ValueError, match="redundancy"):
        allocators.create("energy_diversity", redundancy=True)
    with pytest.raises(ValueError, match="alpha"):
        allocators.create("energy_diversity", alpha=-1)
    with pytest.raises(TypeError, match="merge"):
        allocators.create("energy_diversity", merge="yes")
    with pytest.raises(ValueError, match="needs image"):
        allocators.create("energy_diversity")(tokens, 4)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 40), weighted=st.booleans())
def test_max_min_order_gives_the_same_picks_on_every_path(seed, n, weighted):
    """The greedy loop runs in NumPy on a CPU in float32 / float64 and in torch elsewhere (here: bfloat16
    distances): on the same distance values both make the same picks; a similarity passed in gives the picks of
    the one computed inside (the rule itself is checked against a NumPy reference above)."""
    from pyrtok.allocators.divprune import _greedy, cosine_similarity, max_min_order

    g = torch.Generator().manual_seed(seed)
    features = torch.randn(3, n, 6, generator=g)
    weight = torch.rand(3, n, generator=g) + 0.1 if weighted else None
    steps = max(1, n // 2)
    order = max_min_order(features, steps, weight=weight)
    assert all(len(set(row)) == steps for row in order.tolist())
    assert torch.equal(max_min_order(features, steps, weight=weight, similarity=cosine_similarity(features)), order)
    # the torch loop (bfloat16 distances) against the NumPy loop on the same values in float32
    distance = (1.0 - cosine_similarity(features)).to(torch.bfloat16)
    distance.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    first = torch.randint(0, n, (3,), generator=g)
    assert torch.equal(_greedy(distance, first, steps), _greedy(distance.float(), first, steps))
    with pytest.raises(ValueError, match="similarity must be"):
        max_min_order(features, steps, similarity=torch.zeros(3, n, n + 1))


def reference_merge(embeddings, keep, dropped):
    """merge_into_kept written out token by token: each dropped token joins its most cosine-similar kept token
    (the first of equals), and a kept token becomes the mean of itself and what joined it."""
    out = embeddings.clone()
    for b in range(embeddings.shape[0]):
        kept = [j for j in range(embeddings.shape[1]) if keep[b, j]]
        groups = {j: [embeddings[b, j]] for j in kept}
        unit = embeddings[b] / embeddings[b].norm(dim=-1, keepdim=True).clamp_min(1e-8)
        for i in range(embeddings.shape[1]):
            if dropped[b, i] and kept:
                similarity = [float(unit[i] @ unit[j]) for j in kept]
                groups[kept[similarity.index(max(similarity))]].append(embeddings[b, i])
        for j, members in groups.items():
            out[b, j] = torch.stack(members).mean(0)
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 24), tied=st.booleans())
def test_merge_into_kept_is_the_mean_of_each_kept_token_and_what_joins_it(seed, n, tied):
    from pyrtok.allocators.divprune import cosine_similarity
    from pyrtok.allocators.vscan import merge_into_kept, merged_kept

    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(4, n, 5, generator=g, dtype=torch.float64)
    if tied:  # axis vectors of random length, some zero: duplicates and similarities exactly equal (0 or 1)
        axis = torch.nn.functional.one_hot(torch.randint(0, 5, (4, n), generator=g), 5)
        embeddings = (axis * torch.randint(0, 4, (4, n, 1), generator=g)).double()
    keep = torch.rand(4, n, generator=g) < 0.3
    keep[1] = False  # a row with nothing kept stays as it is
    keep[2, 0] = True  # and the others keep different counts
    dropped = ~keep & (torch.rand(4, n, generator=g) < 0.8)
    dropped[3] = ~keep[3]
    merged = merge_into_kept(embeddings, keep, dropped)
    torch.testing.assert_close(merged, reference_merge(embeddings, keep, dropped))
    assert torch.equal(merged[~keep], embeddings[~keep])  # only kept tokens change
    empty = torch.zeros(0, n, 5)
    assert merge_into_kept(empty, keep[:0], dropped[:0]).shape == (0, n, 5)
    # merged_kept: the kept rows alone, in token order, zeros past a row's count
    rows = merged_kept(embeddings, keep, dropped)
    assert rows.shape == (4, int(keep.sum(1).max()), 5)
    for b in range(4):
        count = int(keep[b].sum())
        assert torch.equal(rows[b, :count], merged[b][keep[b]]) and not rows[b, count:].any()
    # with the cosine similarities a caller already has (float32), the same merge
    single = embeddings.float()
    similarity = cosine_similarity(single)
    shared = merge_into_kept(single, keep, dropped, similarity=similarity)
    torch.testing.assert_close(shared, reference_merge(single, keep, dropped))
    expected = torch.zeros(rows.shape)
    for b in range(4):
        expected[b, : int(keep[b].sum())] = shared[b][keep[b]]
    assert torch.equal(merged_kept(single, keep, dropped, similarity=similarity), expected)
    with pytest.raises(ValueError, match="similarity must be"):
        merge_into_kept(single, keep, dropped, similarity=similarity.double())
