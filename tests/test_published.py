"""The published vision-side methods (fastervlm, visionzip, divprune): each one's defining property on hand-built
inputs, checked against plain-Python references, and their merged tokens through every consumer. The published
in-LLM methods (pdrop, dart): kept sets and counts at every stage against ports of their released code, on a tiny
LLaVA no other test uses, and their named variants (pyrtok's earlier rules)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
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


def upstream_divprune(visual_tokens: torch.Tensor, keep: int) -> list[int]:
    """A port of DivPrune as its authors run it, for one image's (N, D) visual tokens and a count ``keep``.

    vbdi/divprune, LLaVA/llava/model/llava_arch.py (commit 799e2d9): lines 147-150 (``pairwise_cosine_similarity``:
    rows divided by their norms, one matrix product), 152-171 (``DivPrune``: distance 1 - cos at 155; the first
    pick is the argmax of each column's second-smallest distance, ``topk(2, dim=0, largest=False).values[1]`` at
    165; each next pick the argmax of the column minima over the picked rows, 162 and 167), 153 (the count
    ``int(round(ratio * N))``, given here as ``keep``), 374-379 (run on the image's slice of ``new_input_embeds``,
    the projector outputs of ``encode_images`` at 141-144; the picks sorted at 379).
    """
    unit = visual_tokens / visual_tokens.norm(dim=1, keepdim=True)
    distance = 1.0 - torch.mm(unit, unit.t())
    picks = torch.empty(keep, dtype=torch.long)
    for i in range(keep):
        if i == 0:
            scores = torch.topk(distance, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(torch.index_select(distance, 0, picks[:i]), dim=0).values
        picks[i] = torch.argmax(scores)
    return picks.sort().values.tolist()


@pytest.fixture(scope="module")
def divprune_llava(tmp_path_factory):
    """A tiny LLaVA of sizes no other test uses: 72 px, 8 px patches (81 tokens), LM width 96, one LM layer."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pyrtok.testing import save_tiny_vlm

    folder = save_tiny_vlm("llava", tmp_path_factory.mktemp("divprune_llava"), seed=11, hidden=96, text_layers=1,
                           vision_config={"image_size": 72, "patch_size": 8})
    return AutoModelForImageTextToText.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def test_divprune_is_upstreams_selection_on_the_language_models_input_embeddings(divprune_llava):
    """20 images x 3 budgets: the default keeps exactly what the upstream port keeps on the model's own image
    embeddings (HF ``get_image_features``: tower, feature layer, projector); ``space="tower"`` keeps what it keeps
    on the tower's features (pyrtok's earlier behaviour); the two spaces disagree (the space matters)."""
    from PIL import Image

    from pyrtok.vlm import PyramidVLM

    model, processor = divprune_llava
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (int(rng.integers(60, 110)), int(rng.integers(60, 110)), 3),
                                           dtype=np.uint8)) for _ in range(20)]
    pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embeds = torch.stack(list(model.model.get_image_features(pixel_values=pixel_values,
                                                                 return_dict=True).pooler_output))
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    tower_features = hidden[model.config.vision_feature_layer][:, 1:]  # 'default' strategy drops the [CLS]
    assert embeds.shape == (20, 81, 96) and tower_features.shape == (20, 81, 48)
    default = PyramidVLM(model, processor, allocator="divprune")
    tower = PyramidVLM(model, processor, allocator={"name": "divprune", "space": "tower"})
    with torch.no_grad():
        encoded = default.encode(images)
    (_, group), = encoded.groups
    assert torch.allclose(group.tokens.embeddings, embeds, atol=1e-5)  # the family filled the LM's inputs
    shared = []
    for budget in (8, 20, 40):
        (ours,), (ours_tower,) = default.select(encoded, budget), tower.select(encoded, budget)
        for i in range(20):
            expected = upstream_divprune(embeds[i], budget)
            assert kept(ours, i) == expected, (i, budget)
            assert kept(ours_tower, i) == upstream_divprune(tower_features[i], budget), (i, budget)
            shared.append(len(set(kept(ours_tower, i)) & set(expected)))
    assert min(shared) < 40  # the tower's space keeps other tokens


def test_divprune_reads_the_embeddings_in_their_dtype_and_checks_them():
    tokens = grid_tokens(batch=2, side=5, dim=6, levels=1, seed=12)
    g = torch.Generator().manual_seed(13)
    embeddings = torch.randn(2, tokens.num_tokens, 9, generator=g)
    with_lm = tokens.with_embeddings(embeddings)
    for budget in (3, 11):
        ours = allocators.create("divprune")(with_lm, budget)
        tower = allocators.create("divprune", space="tower")(with_lm, budget)
        plain = allocators.create("divprune")(tokens, budget)  # no embeddings: the features
        for b in range(2):
            assert kept(ours, b) == upstream_divprune(embeddings[b], budget)
            assert kept(tower, b) == kept(plain, b) == upstream_divprune(tokens.features[b], budget)
    # the distances are computed in the embeddings' own dtype, as upstream runs in the model's dtype
    half = with_lm.with_embeddings(embeddings.bfloat16())
    selection = allocators.create("divprune")(half, 6)
    for b in range(2):
        assert kept(selection, b) == upstream_divprune(embeddings[b].bfloat16(), 6)
    poisoned = embeddings.clone()
    poisoned[1, 4, 2] = float("inf")
    with pytest.raises(ValueError, match=r"'divprune': tokens\.embeddings contains NaN or infinite.*\[1\]"):
        allocators.create("divprune")(tokens.with_embeddings(poisoned), 4)
    with pytest.raises(ValueError, match=r"space must be one of \('embeddings', 'tower'\).*'projector'"):
        allocators.create("divprune", space="projector")


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
    # no [CLS] or keys on these tokens: 9 dominant patches + 3 contextual grouped by the features
    selection = allocators.create("visionzip", contextual=0.25, merge="mean")(tokens, 12)
    assert selection.cls is None
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
    selection = allocators.create("visionzip", contextual=0.25)(tokens, 12)  # merge="released" is the default
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
    # the [CLS] token first (as released), then the dominant patches, then the contextual tokens
    assert selection.cls.tolist() == [True, True]
    assert selection.count.tolist() == [5, 3] and selection.merged_count.tolist() == [2, 1]
    inputs = vlm.prepare(None, prompts, encoded=encoded, selections=[selection])
    assert inputs.counts.tolist() == [8, 5]
    placeholders = (inputs.input_ids == vlm.image_token_id).sum(1)
    assert placeholders.tolist() == [8, 5]
    per_image = inputs.mm_encoder_outputs["image"].pooler_output
    projector = model.model.multi_modal_projector
    tokens = encoded.groups[0][1].tokens
    with torch.no_grad():
        for b in range(2):
            k, m = int(selection.count[b]), int(selection.merged_count[b])
            assert per_image[b].shape[0] == 1 + k + m
            assert torch.allclose(per_image[b][0], projector(tokens.cls[b, 0]), atol=1e-6)
            kept_features = tokens.features[b, selection.index[b, :k]]
            assert torch.allclose(per_image[b][1 : 1 + k], projector(kept_features), atol=1e-6)
            assert torch.allclose(per_image[b][1 + k :], projector(selection.merged.features[b, :m]), atol=1e-6)
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
    assert tokens.embeddings is tokens.features  # the merged tokens already are the language model's inputs
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


# -- in-LLM methods: PyramidDrop and DART against ports of their released code ------------------------------------
#
# A tiny LLaVA no other test uses: 6 decoder layers, hidden 96, multi-head attention (4 heads, 4 key/value heads,
# as LLaVA-1.5's Vicuna: the released PyramidDrop code multiplies per-head queries by per-head keys and has no
# grouped-query path). 64 image tokens per image. pyrtok runs it with sdpa on a left-padded batch of 20 images
# (two prompts of different lengths); the ports run its eager copy one image at a time, unpadded, as the released
# code runs LLaVA-1.5 evaluation (batch of one).

PORT_IMAGES = 20
PORT_QUESTIONS = ("what colour is the shape?", "how many small red circles are there in the picture on the left?")


@pytest.fixture(scope="module")
def port_model(tmp_path_factory):
    from conftest import chat, random_image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pyrtok.testing import save_tiny_vlm
    from pyrtok.vlm import PyramidVLM

    folder = save_tiny_vlm("llava", tmp_path_factory.mktemp("port_llava"), seed=5, text_layers=6, hidden=96,
                           text_config={"num_key_value_heads": 4})
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    eager = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(folder)
    images = [random_image(60 + 3 * i, 90 - 2 * i, seed=100 + i) for i in range(PORT_IMAGES)]
    prompts = [chat(processor, PORT_QUESTIONS[i % 2]) for i in range(PORT_IMAGES)]
    vlm = PyramidVLM(model, processor)
    inputs = vlm.prepare(images, prompts)
    return model, eager, vlm, images, inputs


def unpadded(model, inputs, b: int) -> tuple[torch.Tensor, int, int, int]:
    """Sample ``b`` as the released code sees it: (1, T, D) input embeddings with its image features in place, the
    image's first index, its image tokens, and the padding columns pyrtok put before it."""
    ids = inputs.input_ids[b][inputs.attention_mask[b].bool()]
    pad = int((~inputs.attention_mask[b].bool()).sum())
    image = ids == model.config.image_token_id
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        embeds[image] = inputs.mm_encoder_outputs["image"].pooler_output[b].to(embeds.dtype)
    start = int(image.nonzero()[0, 0])
    return embeds[None], start, int(image.sum()), pad


def causal_mask(length: int, dtype: torch.dtype) -> torch.Tensor:
    """The (1, 1, T, T) additive causal mask the released code builds (``_prepare_4d_causal_attention_mask``)."""
    upper = torch.ones(length, length, dtype=torch.bool).triu(1)
    return torch.zeros(length, length, dtype=dtype).masked_fill(upper, torch.finfo(dtype).min)[None, None]


def rotated_qk(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(1, H, T, d) queries and keys of ``layer`` for its input ``hidden`` after the rotary embedding, computed as the
    released code recomputes them (input norm, q/k projections, ``apply_rotary_pos_emb``)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attention = layer.self_attn
    x = layer.input_layernorm(hidden)
    length, d = x.shape[1], attention.head_dim
    q = attention.q_proj(x).view(1, length, -1, d).transpose(1, 2)
    k = attention.k_proj(x).view(1, length, -1, d).transpose(1, 2)
    return apply_rotary_pos_emb(q, k, cos, sin)


@torch.no_grad()
def pdrop_port(eager, embeds: torch.Tensor, image_start: int, n0: int, layer_list: list[int],
               ratio_list: list[float] | None = None,
               image_token_list: list[int] | None = None) -> tuple[list[set[int]], list[int]]:
    """Cooperx521/PyramidDrop, llava/model/modeling_llama_pdrop.py, inference path, ported:
    ``pdrop_forward`` lines 1187-1238 (a stage runs after layer ``rank_layer - 1``), ``pdrop_rank_drop`` lines
    1306-1307 (counts: ``int(n0 * ratio)`` of the tokens that entered, ``ratio_list`` with 1.0 prepended as
    ``llava/eval/model_vqa_loader.py`` lines 94-96 do), 1320-1342 (q/k of layer ``rank_layer`` at the current
    positions), 1390-1401 (the last prompt token's row, causal softmax, mean over heads, image columns), 1405-1410
    (topk, sorted, sequence rebuilt), 1446 (positions renumbered ``arange(0, cur_len)``).

    VScan's language-model stage is this code path with absolute counts (Tencent/SelfEvolvingAgent,
    VScan/llava/model/modeling_llama_x.py lines 1231 and 1320-1490; lines 1337-1338: ``image_token_list`` with
    ``visual_token_num`` prepended, each ``min``-ed with the tokens present): pass ``image_token_list``.

    Returns the kept image tokens after each stage (as indices of the unpadded prompt) and the counts."""
    from pyrtok.vlm.decode import language_model

    lm = language_model(eager)
    ratios = [1.0, *(ratio_list or [])]
    hidden, columns = embeds, torch.arange(embeds.shape[1])
    positions = torch.arange(embeds.shape[1])[None]
    kept, counts = [], [n0]
    for layer_idx, layer in enumerate(lm.layers):
        cos, sin = lm.rotary_emb(hidden, positions)
        hidden = layer(hidden, attention_mask=causal_mask(hidden.shape[1], hidden.dtype),
                       position_embeddings=(cos, sin))
        rank_layer = layer_idx + 1
        if rank_layer not in layer_list:
            continue
        stage = layer_list.index(rank_layer)
        if image_token_list is None:
            image_tokens, keep_length = int(n0 * ratios[stage]), int(n0 * ratios[stage + 1])
        else:
            image_tokens, keep_length = (min(image_token_list[stage], n0), min(image_token_list[stage + 1], n0))
        attention = lm.layers[rank_layer].self_attn
        q, k = rotated_qk(lm.layers[rank_layer], hidden, *lm.rotary_emb(hidden, positions))
        last = hidden.shape[1] - 1  # prompt_len + image_tokens - 1
        scores = q[0][:, last:last + 1] @ k[0].transpose(1, 2) / math.sqrt(attention.head_dim)
        scores = scores + causal_mask(hidden.shape[1], scores.dtype)[0, :, last:last + 1]
        weights = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
        ranked = weights.mean(0)[:, image_start:image_start + image_tokens].mean(0)
        top = (ranked.topk(keep_length).indices + image_start).sort().values
        order = torch.cat([torch.arange(image_start), top, torch.arange(image_start + image_tokens, hidden.shape[1])])
        hidden, columns = hidden[:, order], columns[order]
        positions = torch.arange(hidden.shape[1])[None]
        kept.append({int(c) for c in columns[image_start:image_start + keep_length]})
        counts.append(keep_length)
    return kept, counts


def dart_pivots(lm, embeds: torch.Tensor, positions: torch.Tensor, K: int, qk, start: int, length: int,
                pivot_image_token: int, pivot_text_token: int) -> tuple[list[int], list[int], torch.Tensor]:
    """What DART's released code reads before layer ``K`` (one unpadded prompt, as its decoder loop runs): the
    image pivots and the text pivots among the tokens after the image span ``[start, start + length)``, by the L1
    norm of layer ``K - 1``'s rotated keys (``qk(layer, hidden, cos, sin)[1]``, heads concatenated), as sequence
    indices; and the final norm of layer ``K``'s input (1, T, D)."""
    hidden = embeds
    cos, sin = lm.rotary_emb(hidden, positions)
    for index in range(K):
        if index == K - 1:
            key_states = qk(lm.layers[index], hidden, cos, sin)[1]
        hidden = lm.layers[index](hidden, attention_mask=causal_mask(hidden.shape[1], hidden.dtype),
                                  position_embeddings=(cos, sin))
    states = key_states.permute(0, 2, 1, 3).reshape(1, embeds.shape[1], -1)
    image_norm = torch.norm(states[0][start:start + length], p=1, dim=-1)
    query_norm = torch.norm(states[0][start + length:], p=1, dim=-1)
    image_indices = (image_norm.topk(pivot_image_token).indices + start).tolist()
    query_indices = (query_norm.topk(pivot_text_token).indices + start + length).tolist()
    return image_indices, query_indices, lm.norm(hidden)


@torch.no_grad()
def dart_port(eager, embeds: torch.Tensor, image_start: int, image_length: int, K: int, max_num_trunction: int,
              pivot_image_token: int = 4, pivot_text_token: int = 4) -> set[int]:
    """DART's released selection, ported from ModelTC/llmc llmc/compression/token_reduction/dart.py (the port of
    ZichenWen1/DART's official LLaVA code, whose ``get_retained_image_token`` it follows): lines 61-99 and 163-170
    (keys of layer ``K - 1``, after the rotary embedding, all heads), 101-112 and 172-179 (before layer ``K``: the
    model's final norm of layer ``K``'s input), 182-241 (``TOKEN_TOPK = max_num_trunction // pivots`` (official:
    ``int(MAX_NUM_TRUNCTION // (pivot_image_token + pivot_text_token))``), pivots by the keys' L1 norm among the
    image span and everything after it, each pivot in the set's iteration order (officially a copy of it) taking
    its ``TOKEN_TOPK`` least cosine-similar tokens not taken yet, text pivots removed at the end).

    Returns the kept image tokens (indices of the unpadded prompt)."""
    from pyrtok.vlm.decode import language_model

    image_indices, query_indices, last_layer_state = dart_pivots(
        language_model(eager), embeds, torch.arange(embeds.shape[1])[None], K, rotated_qk, image_start, image_length,
        pivot_image_token, pivot_text_token)
    token_topk = int(max_num_trunction // (pivot_image_token + pivot_text_token))
    indices = set(image_indices + query_indices)
    pivots = indices.copy()
    valid = set(range(image_start, image_start + image_length)) - set(image_indices)
    for item in list(pivots):
        candidates = list(valid)
        distance = -F.cosine_similarity(last_layer_state[0][item], last_layer_state[0][candidates], dim=-1)
        chosen = [candidates[i] for i in distance.topk(token_topk).indices.tolist()]
        indices.update(chosen)
        valid.difference_update(chosen)
    indices.difference_update(query_indices)
    return indices


def kept_by_sample(vlm, inputs, schedule) -> tuple[list[set[int]], torch.Tensor]:
    """pyrtok's kept image tokens of every sample (indices of its unpadded prompt) and its stage counts: the
    scheduled prompt pass :meth:`PyramidVLM.__call__` runs, on the prepared batch."""
    from pyrtok.vlm import resolve_schedule
    from pyrtok.vlm.decode import prefill

    with torch.no_grad():
        out = prefill(vlm.model, inputs.input_ids, inputs.attention_mask, inputs.position_ids, vlm.image_token_id,
                      resolve_schedule(schedule), inputs.mm_encoder_outputs, last_only=True)
    kept = []
    for b in range(inputs.input_ids.shape[0]):
        pad = int((~inputs.attention_mask[b].bool()).sum())
        columns = out.columns[b][out.valid[b]]
        kept.append({int(c) - pad for c in columns if int(inputs.input_ids[b, c]) == vlm.image_token_id})
    return kept, out.stage_counts


PDROP_LAYERS = [1, 3, 5]
PDROP_RATIOS = {0.5: [0.5, 0.25, 0.125], 0.3: [0.3, 0.09, 0.027], 0.7: [0.7, 0.49, 0.343]}  # as the scripts pass them


@pytest.mark.parametrize("lam", list(PDROP_RATIOS))
def test_pdrop_keeps_what_the_released_code_keeps_at_every_stage(port_model, lam):
    model, eager, vlm, images, inputs = port_model
    assert inputs.attention_mask.float().mean() < 1  # two prompt lengths: the batch is padded
    expected = []
    for b in range(len(images)):
        embeds, start, n0, _ = unpadded(model, inputs, b)
        expected.append(pdrop_port(eager, embeds, start, n0, PDROP_LAYERS, PDROP_RATIOS[lam]))
    for stages in range(1, len(PDROP_LAYERS) + 1):  # stage s of a prefix schedule is stage s of the whole one
        spec = {"name": "pdrop", "layers": PDROP_LAYERS[:stages], "keep": lam}
        kept, counts = kept_by_sample(vlm, inputs, spec)
        for b, (sets, upstream_counts) in enumerate(expected):
            assert kept[b] == sets[stages - 1], (lam, stages, b)
            assert counts[b].tolist() == upstream_counts[: stages + 1]
    assert expected[0][1] == {0.5: [64, 32, 16, 8], 0.3: [64, 19, 5, 1], 0.7: [64, 44, 31, 21]}[lam]


@pytest.mark.parametrize("layer", [2, 3])
def test_vscan_stage_keeps_what_the_released_code_keeps(port_model, layer):
    """VScan's language-model stage (a third of the 64 image tokens: 21, positions renumbered) against the port."""
    model, eager, vlm, images, inputs = port_model
    kept, counts = kept_by_sample(vlm, inputs, {"name": "vscan", "layer": layer})
    for b in range(len(images)):
        embeds, start, n0, _ = unpadded(model, inputs, b)
        sets, upstream_counts = pdrop_port(eager, embeds, start, n0, [layer], image_token_list=[n0, 21])
        assert kept[b] == sets[0], (layer, b)
        assert counts[b].tolist() == upstream_counts == [64, 21]


DART_BUDGETS = (8, 24, 40)  # max_num_trunction: 4 + 8 x (1, 3, 5) = 12, 28, 44 of 64 image tokens kept


@pytest.mark.parametrize("budget", DART_BUDGETS)
def test_dart_keeps_what_the_released_code_keeps(port_model, budget):
    model, eager, vlm, images, inputs = port_model
    kept, counts = kept_by_sample(vlm, inputs, {"name": "dart", "layer": 2, "max_num_trunction": budget})
    for b in range(len(images)):
        embeds, start, n0, _ = unpadded(model, inputs, b)
        expected = dart_port(eager, embeds, start, n0, 2, budget)
        assert kept[b] == expected, (budget, b)
        assert counts[b].tolist() == [64, 4 + 8 * (budget // 8)] == [64, len(expected)]


def test_the_variants_keep_pyrtoks_earlier_rules(port_model):
    """``pdrop`` ``keep_positions`` counts by the per-stage rule and keeps positions; ``dart`` ``exact`` keeps the
    exact budget with the hidden-state pivots of :func:`duplication_keep` (pyrtok's rules before the released ones
    became the defaults); both differ from the released rules on this model."""
    from pyrtok.vlm.decode import language_model
    from pyrtok.vlm.schedules import DART, PyramidDrop, create_schedule, duplication_keep

    model, _, vlm, images, inputs = port_model
    assert create_schedule("pdrop", layers=[8, 16], keep=0.3).stage_counts(196) == [196, 58, 17]
    variant = create_schedule("pdrop", layers=[8, 16], keep=0.3, **PyramidDrop.variants["keep_positions"])
    assert variant.stage_counts(196) == [196, 59, 18]
    old = {"name": "pdrop", "layers": PDROP_LAYERS, "keep": 0.3, **PyramidDrop.variants["keep_positions"]}
    old_kept, old_counts = kept_by_sample(vlm, inputs, old)
    assert old_counts.tolist() == [[64, 20, 6, 2]] * len(images)  # 64 -> ceil(19.2) -> ceil(6.0) -> ceil(1.8)
    new_kept, _ = kept_by_sample(vlm, inputs, {"name": "pdrop", "layers": PDROP_LAYERS, "keep": 0.3})
    assert any(not new <= old for new, old in zip(new_kept, old_kept, strict=True))  # positions change the ranking

    exact = {"name": "dart", "layer": 2, "keep": 0.25, "pivots": 4, "text_pivots": 4, **DART.variants["exact"]}
    exact_kept, exact_counts = kept_by_sample(vlm, inputs, exact)
    assert exact_counts.tolist() == [[64, 16]] * len(images)
    with torch.no_grad():
        states = model(**inputs.model_inputs(), output_hidden_states=True).hidden_states[2]  # input of layer 2
    valid = inputs.attention_mask.bool()
    image = (inputs.input_ids == model.config.image_token_id) & valid
    reference = duplication_keep(states, language_model(model).norm(states), image, valid,
                                 torch.full((len(images),), 16), 4, 4)
    for b in range(len(images)):
        pad = int((~valid[b]).sum())
        assert exact_kept[b] == {int(c) - pad for c in reference[b].nonzero()[:, 0]}
    released, _ = kept_by_sample(vlm, inputs, {"name": "dart", "layer": 2, "keep": 0.25})
    assert any(a != b for a, b in zip(released, exact_kept, strict=True))


# -- DART's own Qwen ports ------------------------------------------------------------------------------------------
#
# Tiny Qwen2-VL and Qwen2.5-VL models no other test uses: 4 decoder layers, hidden 80 (4 heads of 20, GQA with 1
# key/value head, as Qwen's own), images of odd sizes. The reference runs the model's own pieces one prompt at a
# time, unpadded, as the released lmms-eval models do (batch of one): the processor, ``get_image_features``,
# ``get_rope_index``, the decoder layers with an additive causal mask.

QWEN_DART_IMAGES = 8


@torch.no_grad()
def qwen_prompt(model, processor, image, prompt: str) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """One prompt through the model's own pieces (processor, ``get_image_features``, ``get_rope_index``): (1, T, D)
    input embeddings with the image features in place, (3, 1, T) M-RoPE positions, and the image span: its first
    placeholder and the placeholders up to ``<|vision_end|>`` (DART's lmms-eval model, lines 332-338)."""
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    ids = inputs["input_ids"]
    positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                              image_grid_thw=inputs["image_grid_thw"],
                                              attention_mask=inputs["attention_mask"])
    features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                              return_dict=True).pooler_output
    embeds = model.get_input_embeddings()(ids)
    image = ids[0] == model.config.image_token_id
    embeds[0, image] = torch.cat(features).to(embeds.dtype)
    start = ids[0].tolist().index(model.config.image_token_id)
    length = ids[0].tolist().index(model.config.vision_end_token_id) - start
    return embeds, positions, start, length


def qwen_qk(layer, hidden: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None):
    """(1, H, T, d) queries and (1, H_kv, T, d) keys of a Qwen decoder ``layer`` for its input ``hidden``: input
    norm, q/k projections, and the rotary embedding where ``cos``/``sin`` are given."""
    attention = layer.self_attn
    x = layer.input_layernorm(hidden)
    q = attention.q_proj(x).view(1, x.shape[1], -1, attention.head_dim).transpose(1, 2)
    k = attention.k_proj(x).view(1, x.shape[1], -1, attention.head_dim).transpose(1, 2)
    if cos is None:
        return q, k
    return sys.modules[type(attention).__module__].apply_rotary_pos_emb(q, k, cos, sin)


@torch.no_grad()
def dart_qwen_port(model, processor, image, prompt: str, K: int, reduction_ratio: float,
                   pivot_image_token: int = 4, pivot_text_token: int = 4) -> tuple[set[int], int]:
    """The official Qwen ports' selection (ZichenWen1/DART, Qwen2_5-VL/Qwen2_5VL_DART/modeling_qwen2_5_vl_self.py
    lines 1458-1486 and 1553-1597; the Qwen2-VL file's lines 338-346 and 404-440 are the same rule), ported:
    before layer ``K``: layer ``K - 1``'s output keys (after the rotary embedding, key/value heads concatenated)
    rank ``pivot_image_token`` image pivots and ``pivot_text_token`` pivots among the tokens after the image span
    by L1 norm; ``TOKEN_TOPK = int(n0 * (1 - reduction_ratio) / (image + text pivots))``; each pivot in the order of
    the set itself (no copy) takes its ``TOKEN_TOPK`` least cosine-similar tokens, on the final norm of layer
    ``K``'s input, among those not taken; text pivots removed at the end.

    Returns the kept image tokens (indices of the prompt) and the image tokens the prompt holds."""
    from pyrtok.vlm.decode import language_model

    embeds, positions, start, length = qwen_prompt(model, processor, image, prompt)
    image_indices, query_indices, last_layer_state = dart_pivots(
        language_model(model), embeds, positions, K, qwen_qk, start, length, pivot_image_token, pivot_text_token)
    token_topk = int(length * (1 - reduction_ratio) / (pivot_image_token + pivot_text_token))
    indices = set(image_indices + query_indices)
    valid = set(range(start, start + length)) - set(image_indices)
    candidates = list(valid)
    for item in list(indices):
        distance = -F.cosine_similarity(last_layer_state[0][item], last_layer_state[0][candidates], dim=-1)
        chosen = [candidates[i] for i in distance.topk(token_topk).indices.tolist()]
        indices.update(chosen)
        valid.difference_update(chosen)
        candidates = list(valid)
    indices.difference_update(query_indices)
    return indices, length


def qwen_port_model(folder, family: str, seed: int, kv_heads: int, sizes: tuple[int, int, int, int]):
    """A tiny ``family`` model (4 layers, hidden 80: 4 heads of 20, ``kv_heads`` key/value heads), its processor, a
    :class:`PyramidVLM` of it at one level, and the prepared batch of :data:`QWEN_DART_IMAGES` images of sizes
    ``(w0 + dw * i, h0 - dh * i)`` (``sizes = (w0, dw, h0, dh)``) with the two port questions."""
    from conftest import chat, random_image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pyrtok.testing import save_tiny_vlm
    from pyrtok.vlm import PyramidVLM

    folder = save_tiny_vlm(family, folder / family, seed=seed, text_layers=4, hidden=80,
                           text_config={"num_attention_heads": 4, "num_key_value_heads": kv_heads})
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    w0, dw, h0, dh = sizes
    images = [random_image(w0 + dw * i, h0 - dh * i, seed=100 * seed + i) for i in range(QWEN_DART_IMAGES)]
    prompts = [chat(processor, PORT_QUESTIONS[i % 2]) for i in range(QWEN_DART_IMAGES)]
    vlm = PyramidVLM(model, processor, levels=1)
    return model, processor, vlm, images, prompts, vlm.prepare(images, prompts)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_dart_on_qwen_keeps_what_the_authors_qwen_port_keeps(tmp_path, family):
    from pyrtok.vlm.schedules import DART

    model, processor, vlm, images, prompts, inputs = qwen_port_model(tmp_path, family, 11, 1, (90, 13, 150, 11))
    assert inputs.attention_mask.float().mean() < 1  # prompts and images of different lengths: padded
    # 4 + 2 pivots: the set's own order and its copy's differ (a copy of 5-7 entries is rehashed smaller)
    assert any(list(set(s)) != list(set(s).copy()) for s in ([1, 9, 40, 33, 60, 71], [5, 80, 81, 120, 7, 3]))
    for ratio, text_pivots in ((0.778, 4), (0.5, 4), (0.5, 2)):
        spec = {"name": "dart", "layer": 2, **DART.variants["qwen"], "reduction_ratio": ratio,
                "text_pivots": text_pivots}
        kept, counts = kept_by_sample(vlm, inputs, spec)
        for b in range(QWEN_DART_IMAGES):
            expected, n0 = dart_qwen_port(model, processor, images[b], prompts[b], 2, ratio,
                                          pivot_text_token=text_pivots)
            assert kept[b] == expected, (family, ratio, text_pivots, b)
            per = int(n0 * (1 - ratio) / (4 + text_pivots))
            assert counts[b].tolist() == [n0, len(expected)] == [n0, 4 + (4 + text_pivots) * per]
    copied, _ = kept_by_sample(vlm, inputs, {**spec, "pivot_order": "copy"})
    assert copied != kept  # with 6 pivots the LLaVA code's order keeps other tokens on some image



@torch.no_grad()
def vscan_qwen_stage_port(model, processor, image, prompt: str, rank_layer: int, ratio: float) -> tuple[set[int], int]:
    """VScan's language-model stage on Qwen2.5-VL as released (Tencent/SelfEvolvingAgent, VScan/qwen/model/
    qwen2_5_vl_custom.py: ``Qwen2_5_VLModel_X.forward`` lines 626-652, after layer ``rank_layer - 1``;
    ``layer_prune`` lines 691-784: layer ``rank_layer``'s input norm and q/k projections with the rotary embedding
    left out, key/value heads repeated, the last token's row, fp32 softmax over every column, the mean over
    heads of the image columns, the top ``int(ratio * n)``, sorted, positions kept), ported.

    Returns the kept image tokens (indices of the prompt), the image tokens the prompt holds, and the last
    token's logits (V,) after the remaining layers run on the kept sequence at its kept positions."""
    from pyrtok.vlm.decode import language_model

    embeds, positions, start, length = qwen_prompt(model, processor, image, prompt)
    lm = language_model(model)
    hidden = embeds
    cos, sin = lm.rotary_emb(hidden, positions)
    for index in range(rank_layer):
        hidden = lm.layers[index](hidden, attention_mask=causal_mask(hidden.shape[1], hidden.dtype),
                                  position_embeddings=(cos, sin))
    attention = lm.layers[rank_layer].self_attn
    q, k = qwen_qk(lm.layers[rank_layer], hidden)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    last = hidden.shape[1] - 1
    weights = (q[0][:, last:last + 1] @ k[0].transpose(1, 2) / math.sqrt(attention.head_dim)).softmax(
        dim=-1, dtype=torch.float32).to(q.dtype)
    ranked = weights.mean(0)[:, start:start + length].mean(0)
    top = (ranked.topk(int(ratio * length)).indices + start).sort().values
    order = torch.cat([torch.arange(start), top, torch.arange(start + length, hidden.shape[1])])
    hidden, positions = hidden[:, order], positions[:, :, order]
    cos, sin = lm.rotary_emb(hidden, positions)
    for layer in lm.layers[rank_layer:]:
        hidden = layer(hidden, attention_mask=causal_mask(hidden.shape[1], hidden.dtype),
                       position_embeddings=(cos, sin))
    logits = model.lm_head(lm.norm(hidden))[0, -1]
    return set(top.tolist()), length, logits


def test_vscan_stage_on_qwen_keeps_what_the_authors_qwen_code_keeps(tmp_path):
    """The ``qwen`` variant of the ``vscan`` schedule (no rotary in the scores, positions kept, ``int`` counts) on a
    tiny Qwen2.5-VL, two layers and two shares, against the port; the LLaVA rule keeps other tokens there."""
    from pyrtok.vlm.schedules import VScan

    model, processor, vlm, images, prompts, inputs = qwen_port_model(tmp_path, "qwen2_5_vl", 17, 2,
                                                                     (120, 17, 170, 9))
    for layer, ratio in ((2, 0.333), (3, 0.5)):
        spec = {"name": "vscan", "layer": layer, **VScan.variants["qwen"], "keep": ratio}
        kept, counts = kept_by_sample(vlm, inputs, spec)
        with torch.no_grad():
            logits = vlm(images, prompts, schedule=spec).logits[:, -1]
        for b in range(QWEN_DART_IMAGES):
            expected, n0, last = vscan_qwen_stage_port(model, processor, images[b], prompts[b], layer, ratio)
            assert kept[b] == expected, (layer, ratio, b)
            assert counts[b].tolist() == [n0, int(ratio * n0)]
            assert (logits[b] - last).abs().max() <= 1e-4, (layer, ratio, b)  # kept tokens at their positions
    llava_rule, _ = kept_by_sample(vlm, inputs, {"name": "vscan", "layer": 3, "keep": 0.5})
    assert llava_rule != kept
