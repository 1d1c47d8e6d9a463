"""The allocator contract, for every registered policy, on random shapes, budgets, batches and seeds."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyrtok import allocators
from pyrtok._checks import max_levels
from pyrtok.tokens import MultiScaleTokens, from_feature_grid

FIXED_BUDGET = [name for name in allocators.available() if name not in ("difficulty", "vscan")]
NO_REDUNDANCY = ("vscan", "energy_diversity")  # pick, then merge the rest: the redundancy pass does not apply


@st.composite
def problems(draw):
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    levels = draw(st.integers(1, min(3, max_levels(h, w))))
    batch, dim, patch = draw(st.integers(1, 3)), draw(st.integers(2, 6)), draw(st.sampled_from([4, 8, 16]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    tokens = from_feature_grid(torch.randn(batch, h, w, dim, generator=g), levels, patch_size=patch,
                               attention=torch.rand(batch, h, w, generator=g))
    n = tokens.num_tokens
    if draw(st.booleans()):  # a VLM's tokens also carry the language model's input embeddings (divprune's space)
        tokens = tokens.with_embeddings(torch.randn(batch, n, draw(st.integers(2, 6)), generator=g))
    kind = draw(st.sampled_from(["one", "n-1", "n", "over", "any", "per-sample"]))
    if kind == "per-sample":
        budget = torch.tensor(draw(st.lists(st.integers(1, n + 3), min_size=batch, max_size=batch)))
    else:
        budget = {"one": 1, "n-1": max(1, n - 1), "n": n, "over": n + 7, "any": draw(st.integers(1, n))}[kind]
    image = torch.rand(batch, 3, h * patch, w * patch, generator=g)
    query = torch.randn(batch, dim, generator=g)
    return tokens, budget, image, query, seed


def expected_counts(tokens: MultiScaleTokens, budget) -> torch.Tensor:
    budget = torch.as_tensor(budget).expand(tokens.batch_size)
    return budget.clamp_max(tokens.num_tokens)


@pytest.mark.parametrize("redundancy", [False, True])
@pytest.mark.parametrize("name", allocators.available())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_contract(name, redundancy, problem):
    tokens, budget, image, query, seed = problem
    if redundancy and name in NO_REDUNDANCY:
        with pytest.raises(ValueError, match="redundancy pass does not apply"):
            allocators.create(name, redundancy=redundancy)
        return
    allocator = allocators.create(name, redundancy=redundancy)
    kwargs = {"image": image, "query": query}
    selection = allocator(tokens, budget, generator=torch.Generator().manual_seed(seed), **kwargs)
    counts = allocator.budgets(tokens, budget, **kwargs)
    cap = expected_counts(tokens, budget)
    if name in FIXED_BUDGET:
        assert torch.equal(counts, cap)
    else:
        assert bool(((counts >= 1) & (counts <= cap)).all())
    # Merged tokens (visionzip's contextual ones) count against the budget: kept + merged == the budget.
    assert torch.equal(selection.total, counts)
    assert selection.index.shape == selection.mask.shape == (tokens.batch_size, int(selection.count.max()))
    if selection.merged is not None:
        merged = selection.merged
        m = int(merged.count.max())
        assert merged.features.shape == (tokens.batch_size, m, tokens.dim) and merged.boxes.shape[:2] == (
            tokens.batch_size, m)
        for b in range(tokens.batch_size):
            c = int(merged.count[b])
            assert bool(merged.mask[b, :c].all()) and not bool(merged.mask[b, c:].any())
            assert bool((merged.features[b, c:] == 0).all()) and bool(torch.isfinite(merged.features).all())
            boxes = merged.boxes[b, :c]
            assert bool((boxes[:, :2] < boxes[:, 2:]).all())
            assert bool((boxes[:, 2] <= tokens.image_size[1]).all())
            assert bool((boxes[:, 3] <= tokens.image_size[0]).all())
    for b in range(tokens.batch_size):
        k = int(selection.count[b])
        valid = selection.index[b, :k]
        assert bool(selection.mask[b, :k].all()) and not bool(selection.mask[b, k:].any())
        assert bool((selection.index[b, k:] == 0).all())
        assert bool(((valid >= 0) & (valid < tokens.num_tokens)).all())
        assert bool((valid[1:] > valid[:-1]).all())  # distinct, canonical order
    again = allocator(tokens, budget, generator=torch.Generator().manual_seed(seed), **kwargs)
    assert torch.equal(again.index, selection.index) and torch.equal(again.mask, selection.mask)
    assert (again.merged is None) == (selection.merged is None)
    if selection.merged is not None:
        assert torch.equal(again.merged.features, selection.merged.features)
        assert torch.equal(again.merged.boxes, selection.merged.boxes)


@pytest.fixture
def small():
    g = torch.Generator().manual_seed(0)
    tokens = from_feature_grid(torch.randn(2, 6, 6, 4, generator=g), 2, patch_size=8,
                               attention=torch.rand(2, 6, 6, generator=g))
    return tokens, torch.rand(2, 3, 48, 48, generator=g), torch.randn(2, 4, generator=g)


@pytest.mark.parametrize("name", allocators.available())
def test_bad_budgets_get_clear_errors(name, small):
    tokens, image, query = small
    allocator = allocators.create(name)
    call = lambda budget: allocator(tokens, budget, image=image, query=query)  # noqa: E731
    with pytest.raises(ValueError, match="budget must be >= 1"):
        call(0)
    with pytest.raises(ValueError, match="budget must be >= 1"):
        call(torch.tensor([3, -1]))
    with pytest.raises(TypeError, match="budget must be an int"):
        call(2.5)
    with pytest.raises(TypeError, match="bool"):
        call(True)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        call(torch.tensor([3, 4, 5]))
    with pytest.raises(TypeError, match="integer dtype"):
        call(torch.tensor([3.0, 4.0]))
    with pytest.raises(TypeError, match="MultiScaleTokens"):
        allocator(tokens.features, 4, image=image, query=query)
    with pytest.raises(ValueError, match="image must have shape"):
        allocator(tokens, 4, image=image[:1], query=query)


def test_missing_inputs_and_nan_scores_get_clear_errors(small):
    tokens, _, _ = small
    with pytest.raises(ValueError, match="needs image="):
        allocators.create("saliency")(tokens, 4)
    with pytest.raises(ValueError, match="needs query="):
        allocators.create("query")(tokens, 4)
    bare = from_feature_grid(tokens.features[:, :36].reshape(2, 6, 6, 4), 2)
    for name in ("cls_attention", "fastervlm", "visionzip"):
        with pytest.raises(ValueError, match=rf"'{name}' needs tokens\.attention"):
            allocators.create(name)(bare, 4)
    with pytest.raises(ValueError, match="redundancy=True needs image="):
        allocators.create("random", redundancy=True)(tokens, 4)
    nan_attention = tokens.attention.clone()
    nan_attention[0, 3] = float("nan")
    broken = MultiScaleTokens(tokens.features, tokens.level, tokens.row, tokens.col, tokens.box,
                              tokens.level_shapes, tokens.image_size, attention=nan_attention)
    with pytest.raises(ValueError, match="contain NaN"):
        allocators.create("cls_attention")(broken, 4)
    with pytest.raises(ValueError, match="query must have shape"):
        allocators.create("query")(tokens, 4, query=torch.randn(2, 7))


# The inputs each registered policy reads, without and with a query (None: the policy cannot run that way).
# all / random / pool compute no scores and read none of them.
READS = {
    "all": ((), ()),
    "random": ((), ()),
    "pool": ((), ()),
    "saliency": (("image",), ("image",)),
    "laplacian": (("image",), ("image",)),
    "cls_attention": (("attention",), ("attention",)),
    "fastervlm": (("attention",), ("attention",)),
    "visionzip": (("attention", "features"), ("attention", "features")),
    "vscan": (("attention", "features"), ("attention", "features")),
    "divprune": (("features",), ("features",)),
    "energy_diversity": (("image", "features"), ("image", "features")),
    "query": (None, ("query", "features")),
    "cdpruner": (None, ("query", "features")),
    "difficulty": (("image",), ("image", "query", "features")),
    "foveated": (("image",), ("query", "features")),
}
LABELS = {"image": "image", "query": "query", "features": "tokens.features", "attention": "tokens.attention"}
CASES = [
    (name, with_query, poisoned)
    for name, modes in READS.items()
    for with_query, reads in zip((False, True), modes, strict=True)
    if reads is not None
    for poisoned in LABELS
]


def test_every_registered_allocator_has_its_inputs_listed():
    assert set(READS) == set(allocators.available())


def poison(small, poisoned: str):
    """The small problem with one NaN in sample 1 of the named input."""
    tokens, image, query = small
    inputs = {"image": image, "query": query, "features": tokens.features, "attention": tokens.attention}
    inputs = {key: value.clone() for key, value in inputs.items()}
    inputs[poisoned][1].view(-1)[2] = float("nan")
    image, query, features, attention = inputs.values()
    tokens = MultiScaleTokens(features, tokens.level, tokens.row, tokens.col, tokens.box, tokens.level_shapes,
                              tokens.image_size, attention=attention)
    return tokens, image, query


@pytest.mark.parametrize(("name", "with_query", "poisoned"), CASES)
def test_nan_in_an_input_a_policy_reads_is_rejected_by_name(name, with_query, poisoned, small):
    tokens, image, query = poison(small, poisoned)
    allocator = allocators.create(name)
    kwargs = {"image": image, "query": query if with_query else None}
    reads = READS[name][with_query]
    if poisoned in reads:
        message = rf"allocator '{name}': {LABELS[poisoned]} contains NaN.*sample\(s\) \[1\]"
        with pytest.raises(ValueError, match=message):
            allocator(tokens, 5, **kwargs)
        with pytest.raises(ValueError, match=message):
            allocator.budgets(tokens, 5, **kwargs)
    else:  # an input the policy never looks at cannot spoil its selection
        selection = allocator(tokens, 5, **kwargs)
        assert torch.equal(selection.total, allocator.budgets(tokens, 5, **kwargs))
        assert bool((selection.count >= 1).all()) and bool((selection.count <= 5).all())
        clean = allocator(*small[:1], 5, image=small[1], query=small[2] if with_query else None)
        assert torch.equal(selection.index, clean.index)


def test_redundancy_reads_the_image_and_infinite_images_are_rejected(small):
    tokens, image, query = small
    nan_image = image.clone()
    nan_image[0, 1, 2, 3] = float("nan")
    allocators.create("all")(tokens, 5, image=nan_image)  # the plain policy never looks at it
    with pytest.raises(ValueError, match=r"'all': image contains NaN.*sample\(s\) \[0\]"):
        allocators.create("all", redundancy=True)(tokens, 5, image=nan_image)
    inf_image = image.clone()
    inf_image[1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"image contains NaN or infinite values \(sample\(s\) \[1\]\)"):
        allocators.create("saliency")(tokens, 5, image=inf_image)
    shared = query[0].clone()
    shared[0] = float("nan")
    with pytest.raises(ValueError, match=r"query contains NaN.*the shared query"):
        allocators.create("query")(tokens, 5, query=shared)
