"""The published vision-side methods (fastervlm, visionzip, divprune): each one's defining property on hand-built
inputs, checked against plain-Python references, and their merged tokens through every consumer."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from pyrtok import allocators
from pyrtok.allocators.divprune import max_min_order
from pyrtok.tokens import MergedTokens, MultiScaleTokens, TokenSelection, from_feature_grid
from pyrtok.viz import MERGED_COLOUR, draw_selection

PUBLISHED = ("fastervlm", "visionzip", "divprune")


def grid_tokens(batch: int = 2, side: int = 6, dim: int = 5, levels: int = 2, seed: int = 0) -> MultiScaleTokens:
    g = torch.Generator().manual_seed(seed)
    return from_feature_grid(torch.randn(batch, side, side, dim, generator=g), levels, patch_size=8,
                             attention=torch.rand(batch, side, side, generator=g))


def kept(selection: TokenSelection, b: int) -> list[int]:
    return selection.index[b, : int(selection.count[b])].tolist()


# -- plain-Python references ----------------------------------------------------------------------------------

def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm


def greedy_max_min(vectors: list[list[float]]) -> list[int]:
    """DivPrune's rule, one token at a time: the token farthest from its nearest neighbour, then the token
    farthest from the kept set."""
    n = len(vectors)
    distance = [[1.0 - cosine(u, v) for v in vectors] for u in vectors]
    nearest = [min((distance[i][j] for j in range(n) if j != i), default=math.inf) for i in range(n)]
    picks = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(picks) < n:
        rest = [i for i in range(n) if i not in picks]
        picks.append(max(rest, key=lambda i: (min(distance[i][p] for p in picks), -i)))
    return picks


def visionzip_reference(tokens: MultiScaleTokens, b: int, budget: int, contextual: int):
    """Dominant tokens = the top attention of the finest level; groups built token by token."""
    finest = range(tokens.level_slices[0].start, tokens.level_slices[0].stop)
    attention = tokens.attention[b].tolist()
    by_attention = sorted(finest, key=lambda i: (-attention[i], i))
    dominant = sorted(by_attention[: budget - contextual])
    rest = [i for i in finest if i not in dominant]
    step = max(1, len(rest) // contextual)
    targets = rest[::step][:contextual]
    features = tokens.features[b].tolist()
    groups = {t: [t] for t in targets}
    for i in rest:
        if i not in groups:
            best = max(range(len(targets)), key=lambda j: (cosine(features[i], features[targets[j]]), -j))
            groups[targets[best]].append(i)
    means = [[sum(features[i][d] for i in groups[t]) / len(groups[t]) for d in range(tokens.dim)] for t in targets]
    boxes = tokens.box.tolist()
    unions = [[min(boxes[i][0] for i in groups[t]), min(boxes[i][1] for i in groups[t]),
               max(boxes[i][2] for i in groups[t]), max(boxes[i][3] for i in groups[t])] for t in targets]
    return dominant, groups, torch.tensor(means), torch.tensor(unions)


# -- divprune -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_max_min_order_equals_the_plain_python_greedy_rule(seed):
    features = torch.randn(3, 17, 4, generator=torch.Generator().manual_seed(seed))
    order = max_min_order(features, 17)
    for b in range(3):
        assert order[b].tolist() == greedy_max_min(features[b].tolist())


@pytest.mark.parametrize("scales", ["finest", "all"])
def test_divprune_keeps_the_first_k_greedy_picks(scales):
    tokens = grid_tokens(batch=2, side=5, levels=2, seed=3)
    budgets = torch.tensor([4, 9])
    selection = allocators.create("divprune", scales=scales)(tokens, budgets)
    candidates = tokens.level_slices[0] if scales == "finest" else slice(0, tokens.num_tokens)
    for b in range(2):
        picks = greedy_max_min(tokens.features[b, candidates].tolist())
        expected = sorted(candidates.start + p for p in picks[: int(budgets[b])])
        assert kept(selection, b) == expected


def test_divprune_never_picks_a_duplicate_twice_and_fills_past_the_finest_level():
    features = torch.ones(1, 4, 4, 3)  # every token identical: all distances are 0
    tokens = from_feature_grid(features, 2)
    selection = allocators.create("divprune")(tokens, 18)  # 16 finest tokens + 2 coarse ones
    assert int(selection.count[0]) == 18 and len(set(kept(selection, 0))) == 18
    assert set(range(4, 20)) <= set(kept(selection, 0))  # the whole finest level, then coarse tokens
    with pytest.raises(ValueError, match="steps must be an int"):
        max_min_order(features.flatten(1, 2), 17)


# -- fastervlm ------------------------------------------------------------------------------------------------

def test_fastervlm_is_the_top_attention_of_the_finest_level():
    tokens = grid_tokens(batch=2, side=6, levels=3, seed=4)
    selection = allocators.create("fastervlm")(tokens, 7)
    finest = tokens.level_slices[0]
    for b in range(2):
        top = torch.topk(tokens.attention[b, finest], 7).indices + finest.start
        assert kept(selection, b) == sorted(top.tolist())
    # Over every level it is our cls_attention: one global top-k.
    everywhere = allocators.create("fastervlm", scales="all")(tokens, 7)
    assert torch.equal(everywhere.index, allocators.create("cls_attention")(tokens, 7).index)
    for b in range(2):
        assert kept(everywhere, b) == sorted(torch.topk(tokens.attention[b], 7).indices.tolist())
    # A budget above the finest level keeps all of it, then the best coarser tokens.
    n0 = finest.stop - finest.start
    big = allocators.create("fastervlm")(tokens, n0 + 2)
    assert set(range(finest.start, finest.stop)) <= set(kept(big, 0))


# -- visionzip ------------------------------------------------------------------------------------------------

def test_visionzip_split_follows_the_paper():
    tokens = grid_tokens(batch=1, side=24, dim=4, levels=1, seed=5)
    allocator = allocators.create("visionzip")
    for budget, (dominant, contextual) in {64: (54, 10), 128: (108, 20), 192: (162, 30)}.items():
        selection = allocator(tokens, budget)
        assert (int(selection.count[0]), int(selection.merged_count[0])) == (dominant, contextual)
    full = allocator(tokens, tokens.num_tokens)  # every token kept as it is: nothing is left to merge
    assert full.merged is None and int(full.count[0]) == tokens.num_tokens


@pytest.mark.parametrize("levels", [1, 2])
def test_visionzip_dominant_tokens_and_merged_means_match_the_reference(levels):
    tokens = grid_tokens(batch=2, side=6, dim=5, levels=levels, seed=6)
    selection = allocators.create("visionzip", contextual=0.25)(tokens, 12)  # 9 dominant + 3 contextual
    merged = selection.merged
    for b in range(2):
        dominant, groups, means, unions = visionzip_reference(tokens, b, 12, 3)
        assert kept(selection, b) == dominant
        assert int(merged.count[b]) == 3
        assert torch.allclose(merged.features[b], means, atol=1e-6)
        assert torch.equal(merged.boxes[b], unions)
        assert sum(len(g) for g in groups.values()) == 36 - 9  # every dropped finest token is in one group


def test_visionzip_released_merge_rule_adds_the_target_to_the_mean_of_the_others():
    tokens = grid_tokens(batch=1, side=6, dim=5, levels=1, seed=7)
    selection = allocators.create("visionzip", contextual=0.25, merge="released")(tokens, 12)
    _, groups, _, _ = visionzip_reference(tokens, 0, 12, 3)
    features = tokens.features[0]
    for slot, (target, members) in enumerate(groups.items()):
        others = [i for i in members if i != target]
        expected = features[target] + (features[others].mean(0) if others else 0)
        assert torch.allclose(selection.merged.features[0, slot], expected, atol=1e-6)


# -- shared: exact budgets, batching, determinism, errors -----------------------------------------------------

@pytest.mark.parametrize("scales", ["finest", "all"])
@pytest.mark.parametrize("name", PUBLISHED)
def test_batched_equals_one_by_one_with_exact_budgets(name, scales):
    tokens = grid_tokens(batch=3, side=7, dim=6, levels=3, seed=8)
    budgets = torch.tensor([5, 23, 60])
    allocator = allocators.create(name, scales=scales)
    batched = allocator(tokens, budgets)
    assert torch.equal(batched.total, budgets)
    if name == "visionzip":  # round(10/64 * K); none once the budget covers the candidates (49 finest tokens)
        assert batched.merged_count.tolist() == ([1, 4, 0] if scales == "finest" else [1, 4, 9])
    for b in range(3):
        alone = allocator(tokens.select_images([b]), int(budgets[b]))
        assert kept(alone, 0) == kept(batched, b)
        if name == "visionzip":
            m = int(alone.merged_count[0])
            assert m == int(batched.merged_count[b])
            if m == 0:
                assert alone.merged is None
                continue
            assert torch.allclose(alone.merged.features[0, :m], batched.merged.features[b, :m], atol=1e-6)
            assert torch.equal(alone.merged.boxes[0, :m], batched.merged.boxes[b, :m])
        else:
            assert batched.merged is None
    again = allocator(tokens, budgets)
    assert torch.equal(again.index, batched.index)


@pytest.mark.parametrize("name", PUBLISHED)
def test_nan_and_bad_options_get_clear_errors(name):
    tokens = grid_tokens()
    poisoned = tokens.features.clone()
    poisoned[1, 3, 0] = float("nan")
    if name != "fastervlm":  # fastervlm never reads the features
        with pytest.raises(ValueError, match=rf"'{name}': tokens\.features contains NaN.*sample\(s\) \[1\]"):
            allocators.create(name)(tokens.with_features(poisoned), 5)
    with pytest.raises(ValueError, match=r"scales must be one of \('finest', 'all'\).*'coarse'"):
        allocators.create(name, scales="coarse")
    with pytest.raises(TypeError, match="MultiScaleTokens"):
        allocators.create(name)(tokens.features, 5)


def test_visionzip_options_and_missing_attention():
    with pytest.raises(ValueError, match=r"contextual must be a fraction of the budget in \[0, 1\), got 1.0"):
        allocators.create("visionzip", contextual=1.0)
    with pytest.raises(ValueError, match="merge must be one of"):
        allocators.create("visionzip", merge="sum")
    bare = from_feature_grid(torch.randn(1, 4, 4, 3), 1)
    for name in ("visionzip", "fastervlm"):
        with pytest.raises(ValueError, match=rf"'{name}' needs tokens\.attention"):
            allocators.create(name)(bare, 4)
    assert allocators.create("divprune")(bare, 4).count.tolist() == [4]  # divprune needs only the features
    plain = allocators.create("visionzip", contextual=0.0)(grid_tokens(), 9)
    assert plain.merged is None and plain.count.tolist() == [9, 9]


def test_merged_tokens_validate_their_shapes():
    with pytest.raises(ValueError, match=r"merged mask must be a \(2, 3\) bool tensor"):
        MergedTokens(torch.zeros(2, 3, 4), torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"merged boxes must have shape \(2, 3, 4\)"):
        MergedTokens(torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 3))
    merged = MergedTokens(torch.zeros(1, 3, 4), torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="merged tokens have batch size 1, the index has 2"):
        TokenSelection.from_keep_mask(torch.ones(2, 5, dtype=torch.bool), merged)


# -- consumers: viz, the LLaVA path, Qwen positions -----------------------------------------------------------

def test_viz_outlines_merged_union_boxes():
    tokens = grid_tokens(batch=1, side=6, levels=1, seed=9)
    selection = allocators.create("visionzip", contextual=0.5)(tokens, 6)
    picture = draw_selection(torch.zeros(3, 48, 48), tokens, selection, width=2)
    for x0, y0, x1, y1 in selection.merged.boxes[0].round().long().tolist():
        assert picture.getpixel((x0, y0)) == MERGED_COLOUR
        assert picture.getpixel((min(x1 - 1, 47), min(y1 - 1, 47))) == MERGED_COLOUR
    kept_only = draw_selection(torch.zeros(3, 48, 48), tokens, allocators.create("fastervlm")(tokens, 6))
    pixels = torch.tensor(list(kept_only.tobytes())).view(-1, 3)
    assert not bool((pixels == torch.tensor(MERGED_COLOUR)).all(1).any())  # the colour marks merged tokens only


@pytest.fixture(scope="module")
def tiny_llava():
    from pyrtok.embedded import word_tokenizer

    torch.manual_seed(0)
    tokenizer = word_tokenizer("user assistant what colour is the square ? :".split())
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=2, image_size=64, patch_size=16),
        text_config=LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=2,
                                eos_token_id=3, max_position_embeddings=256),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
    )
    return LlavaForConditionalGeneration(config).eval(), tokenizer


@pytest.mark.parametrize("scales", ["finest", "all"])
def test_llava_places_projected_merged_tokens_after_the_kept_ones(tiny_llava, scales):
    from pyrtok.vlm import PyramidVLM

    model, tokenizer = tiny_llava
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    prompts = ["USER: <image> what colour is the square? ASSISTANT:"] * 2
    allocator = {"name": "visionzip", "contextual": 0.25, "scales": scales}
    vlm = PyramidVLM(model, tokenizer, allocator=allocator, levels=2)  # 16 + 4 tokens per image
    budgets = torch.tensor([8, 5])
    encoded = vlm.encode(images)
    (selection,) = vlm.select(encoded, budgets)
    assert selection.count.tolist() == [6, 4] and selection.merged_count.tolist() == [2, 1]
    inputs = vlm.prepare(None, prompts, encoded=encoded, selections=[selection])
    assert inputs.counts.tolist() == [8, 5]
    placeholders = (inputs.input_ids == vlm.image_token_id).sum(1)
    assert placeholders.tolist() == [8, 5]
    per_image = inputs.mm_encoder_outputs["image"].pooler_output
    projector = model.model.multi_modal_projector
    with torch.no_grad():
        for b in range(2):
            k, m = int(selection.count[b]), int(selection.merged_count[b])
            assert per_image[b].shape[0] == k + m
            kept_features = encoded.groups[0][1].tokens.features[b, selection.index[b, :k]]
            assert torch.allclose(per_image[b][:k], projector(kept_features), atol=1e-6)
            assert torch.allclose(per_image[b][k:], projector(selection.merged.features[b, :m]), atol=1e-6)
    out = vlm.generate(images, prompts, budget=budgets, max_new_tokens=2)
    assert out.counts.tolist() == [8, 5]  # what the ablation harness records as a row's tokens


def test_qwen_places_merged_tokens_at_the_cell_under_their_box_centre(tmp_path):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pyrtok.testing import save_tiny_vlm
    from pyrtok.vlm import PyramidVLM

    folder = save_tiny_vlm("qwen2_vl", tmp_path / "qwen", hidden=64)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    image = Image.fromarray((torch.rand(100, 70, 3, generator=torch.Generator().manual_seed(2)) * 255)
                            .to(torch.uint8).numpy())
    vlm = PyramidVLM(model, processor, allocator="all")
    prompt = vlm.chat_prompt("what colour is the shape?")
    tokens = vlm.encode([image]).tokens
    assert tokens.level_shapes == ((4, 2),) and tokens.image_size == (112, 56)  # 28 px cells
    keep = torch.zeros(1, tokens.num_tokens, dtype=torch.bool)
    keep[0, [1, 6]] = True  # cells (0, 1) and (3, 0)
    boxes = torch.tensor([[[0.0, 0.0, 56.0, 28.0], [0.0, 56.0, 28.0, 112.0]]])  # centres (28, 14), (14, 84)
    features = torch.randn(1, 2, tokens.dim)
    merged = MergedTokens(features, torch.ones(1, 2, dtype=torch.bool), boxes)
    inputs = vlm.prepare([image], [prompt], selections=[TokenSelection.from_keep_mask(keep, merged)])
    ids, positions = inputs.input_ids[0], inputs.position_ids[:, 0]
    columns = (ids == model.config.image_token_id).nonzero()[:, 0]
    assert columns.numel() == 4
    start = int(positions[0, columns[0]])
    offsets = (positions[:, columns] - start).T.tolist()
    assert offsets == [[0, 0, 1], [0, 3, 0], [0, 0, 1], [0, 3, 0]]  # kept cells, then the merged box centres
    assert torch.equal(inputs.mm_encoder_outputs["image"].pooler_output[0][2:], features[0])
