"""Vision-side published methods against ports of their authors' code, on a tiny LLaVA no other test uses.

Each port is written from the upstream file named in its docstring and runs on the model's own HF pieces (the
tower with eager attention for its attention maps, the projector), one image at a time, as the released
evaluation scripts run LLaVA-1.5; pyrtok runs the same model through :class:`~pyrtok.vlm.PyramidVLM` on a batch
of 20 images. Kept sets must be identical and the language model's image inputs equal within 1e-5.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyrtok import allocators
from pyrtok.tokens import TokenSelection, from_feature_grid, gather

IMAGES = 20


def tiny_published(family: str, folder, seed: int, sides: tuple[int, int], image_seed: int, **model_options):
    """A tiny random-weight VLM saved with its processor, an eager-attention copy of it (for attention maps), and
    20 random images with sides in ``sides``: (model, processor, eager, images)."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pyrtok.testing import save_tiny_vlm

    folder = save_tiny_vlm(family, folder, seed=seed, **model_options)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    eager = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
    rng = np.random.default_rng(image_seed)
    images = [Image.fromarray(rng.integers(0, 256, (int(rng.integers(*sides)), int(rng.integers(*sides)), 3),
                                           dtype=np.uint8)) for _ in range(IMAGES)]
    return model, AutoProcessor.from_pretrained(folder), eager, images


@pytest.fixture(scope="module")
def published_llava(tmp_path_factory):
    """A tiny LLaVA: 80 px at 8 px patches (100 tokens), a 6-layer tower with 4 heads (feature layer -2), a 4-layer
    language model 64 wide; its processor; an eager-attention copy of it; and 20 images of odd sizes."""
    return tiny_published("llava", tmp_path_factory.mktemp("published_llava"), 23, (50, 130), 5, hidden=64,
                          text_layers=4, vision_config={"image_size": 80, "patch_size": 8, "num_hidden_layers": 6,
                                                        "num_attention_heads": 4})


def kept(selection: TokenSelection, b: int) -> list[int]:
    return selection.index[b, : int(selection.count[b])].tolist()


def lm_inputs(vlm, encoded, selection: TokenSelection) -> list[torch.Tensor]:
    """The language model's image inputs pyrtok builds for each image: (C + K + M, D_lm)."""
    prompts = [vlm.chat_prompt("what is it?")] * selection.batch_size
    with torch.no_grad():
        inputs = vlm.prepare(None, prompts, encoded=encoded, selections=[selection])
    return list(inputs.mm_encoder_outputs["image"].pooler_output)


def round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


# -- VisionZip ------------------------------------------------------------------------------------------------

@torch.no_grad()
def upstream_visionzip(tower, pixel_values: torch.Tensor, dominant: int, contextual: int):
    """A port of VisionZip as released, for a batch of images: (tokens for the projector, kept indices).

    dvlab-research/VisionZip at 3151f6d: ``visionzip/main.py`` line 7 (``apply_info(..., dominant_num=dominant-1,
    contextual_num=contextual)``: the [CLS] token is one of the ``dominant``); ``visionzip/utils.py`` lines 24 and
    89 (the metric: the raw key states of the layer, heads averaged, ``raw_key_states.mean(1)``) and 191 (kept
    from ``layers[-2]``); ``visionzip/clip_encoder.py`` lines 43-83 (``CLIPVisionTower_VisionZip.forward``:
    attention and hidden states of layer -2, [CLS] attention summed over heads, top-k + 1, [CLS] and dominant in
    index order, targets every ``step``-th remaining token, assignment by argmax of key cosine similarity,
    ``target + sum(others) / count``). The keys come from a forward hook on that layer's ``k_proj``.
    """
    layer = getattr(tower, "vision_model", tower).encoder.layers[-2]  # transformers 5 flattened the wrapper
    captured = {}
    handle = layer.self_attn.k_proj.register_forward_hook(lambda module, args, out: captured.update(keys=out))
    outs = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    handle.remove()
    heads = layer.self_attn.num_heads
    b, t, _ = captured["keys"].shape
    metric = captured["keys"].view(b, t, heads, -1).transpose(1, 2).mean(1)  # raw_key_states.mean(1)
    attn_weights = outs.attentions[-2]
    hidden_states = outs.hidden_states[-2]
    dominant_num, contextual_num = dominant - 1, contextual

    cls_attention = attn_weights[:, :, 0, 1:]
    cls_attention_sum = cls_attention.sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((b, 1), dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(b, dominant_num + 1, -1)

    metric_filtered = metric[mask].view(b, t - (dominant_num + 1), metric.shape[2])
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(b, t - (dominant_num + 1), -1)
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)

    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    others = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    tokens_to_merge = metric_normalized[:, others, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(b, tokens_to_merge.shape[1], contextual_num, dtype=hidden_states_filtered.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    hidden_to_merge = hidden_states_filtered[:, others, :]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    target_hidden = hidden_states_filtered[:, target_indices, :]
    contextual_tokens = target_hidden + aggregated_hidden
    return torch.cat([dominant_tokens, contextual_tokens], dim=1), all_indices


def test_visionzip_is_the_released_code_on_llava(published_llava):
    """20 images x 3 budgets: the [CLS] token, the dominant patches and the contextual tokens as the released
    code makes them, through the projector, within 1e-5; the earlier rule (``visionzip_mean``) keeps the same
    number of tokens but other ones."""
    from pyrtok.vlm import PyramidVLM

    model, processor, eager, images = published_llava
    pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    vlm = PyramidVLM(model, processor, allocator="visionzip")
    earlier = PyramidVLM(model, processor, allocator="configs/allocators/visionzip_mean.yaml")
    with torch.no_grad():
        encoded = vlm.encode(images)
    (_, group), = encoded.groups
    assert group.tokens.keys.shape == (IMAGES, 100, 8) and group.tokens.cls.shape == (IMAGES, 1, 32)
    projector = model.model.multi_modal_projector
    moved = []
    for budget in (10, 32, 64):
        contextual = round_half_up(budget * 10 / 64)
        expected, indices = upstream_visionzip(eager.model.vision_tower, pixel_values, budget - contextual,
                                               contextual)
        with torch.no_grad():
            expected = projector(expected)
        (ours,), (theirs_earlier,) = vlm.select(encoded, budget), earlier.select(encoded, budget)
        assert ours.cls.all() and ours.total.tolist() == [budget] * IMAGES
        assert ours.merged_count.tolist() == [contextual] * IMAGES
        features = lm_inputs(vlm, encoded, ours)
        for i in range(IMAGES):
            assert kept(ours, i) == sorted((indices[i, 1:] - 1).tolist()), (i, budget)
            assert features[i].shape == expected[i].shape
            assert torch.allclose(features[i], expected[i], atol=1e-5), (i, budget)
            moved.append(len(set(kept(theirs_earlier, i)) ^ set(kept(ours, i))))
        assert theirs_earlier.cls is None and theirs_earlier.total.tolist() == [budget] * IMAGES
    assert max(moved) > 0  # the [CLS] slot alone moves one dominant token


def test_visionzip_counts_follow_the_released_split():
    g = torch.Generator().manual_seed(5)
    grid = torch.randn(1, 24, 24, 4, generator=g)
    attention = torch.rand(1, 24, 24, generator=g)
    with_cls = from_feature_grid(grid, 1, attention=attention, cls=torch.randn(1, 4, generator=g))
    bare = from_feature_grid(grid, 1, attention=attention)
    allocator = allocators.create("visionzip")
    for budget, (patches, contextual) in {64: (53, 10), 128: (107, 20), 192: (161, 30)}.items():
        selection = allocator(with_cls, budget)
        assert (int(selection.cls_count[0]), int(selection.count[0]), int(selection.merged_count[0])) == \
            (1, patches, contextual)
        # without a [CLS] token (or with cls=False) its slot goes to one more dominant patch
        for other in (allocator(bare, budget), allocators.create("visionzip", cls=False)(with_cls, budget)):
            assert (int(other.cls_count[0]), int(other.count[0]), int(other.merged_count[0])) == \
                (0, patches + 1, contextual)
    full = allocator(with_cls, with_cls.num_tokens)  # every token kept as it is: no [CLS], nothing merged
    assert full.cls is None and full.merged is None and int(full.count[0]) == with_cls.num_tokens
    one = allocator(with_cls, 1)  # a single slot is a patch
    assert one.cls is None and int(one.count[0]) == 1
    with pytest.raises(TypeError, match="cls must be a bool"):
        allocators.create("visionzip", cls="yes")
    with pytest.raises(ValueError, match=r"similarity must be one of \('keys', 'features'\)"):
        allocators.create("visionzip", similarity="values")


def test_a_family_without_cls_features_refuses_a_cls_selection():
    from pyrtok.vlm.families.base import Family

    selection = TokenSelection.from_keep_mask(torch.ones(1, 4, dtype=torch.bool), lead=torch.tensor([True]))
    assert selection.total.tolist() == [5]
    with pytest.raises(ValueError, match=r"carry no \[CLS\] feature.*cls: false"):
        Family.gather_kept(torch.randn(1, 4, 3), selection)
    cls = torch.randn(1, 3)
    (row,) = Family.gather_kept(torch.randn(1, 4, 3), selection, cls=cls)
    assert row.shape == (5, 3) and torch.equal(row[0], cls[0])
    with pytest.raises(ValueError, match=r"cls must be a \(1,\) bool tensor"):
        TokenSelection.from_keep_mask(torch.ones(1, 4, dtype=torch.bool), lead=torch.tensor([1]))


# -- VScan ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vscan_llava(tmp_path_factory):
    """A tiny LLaVA with VScan's grid: 96 px at 4 px patches (24 x 24 = 576 tokens, as CLIP ViT-L/14 at 336 px), an
    8-layer tower (early layer 2, a quarter), a 2-layer language model; its eager copy and 20 images."""
    return tiny_published("llava", tmp_path_factory.mktemp("vscan_llava"), 29, (70, 140), 9, hidden=48,
                          text_layers=2, vision_config={"image_size": 96, "patch_size": 4, "num_hidden_layers": 8,
                                                        "num_attention_heads": 2})


def window_cls_selection(image_attentions: torch.Tensor, visual_token_num: int, window_size: int = 6):
    """VScan/llava/model/llava_arch.py lines 199-252 (``window_cls_selection``), ported."""
    B, N = image_attentions.shape
    assert N == 24 * 24
    H = W = 24
    attn_map = image_attentions.view(B, H, W)
    num_windows_h, num_windows_w = H // window_size, W // window_size
    k = visual_token_num // (num_windows_h * num_windows_w)
    token_indices = []
    for b in range(B):
        indices_b = []
        for i in range(num_windows_h):
            for j in range(num_windows_w):
                window = attn_map[b, i * window_size:(i + 1) * window_size, j * window_size:(j + 1) * window_size]
                _, topk_indices = torch.topk(window.reshape(-1), k)
                for idx in topk_indices:
                    dy, dx = divmod(idx.item(), window_size)
                    indices_b.append((i * window_size + dy) * W + j * window_size + dx)
        token_indices.append(indices_b)
    return torch.tensor(token_indices, dtype=torch.long)


def token_merging(image_features: torch.Tensor, index_mask: torch.Tensor, scaling: float = 1) -> torch.Tensor:
    """VScan/llava/model/llava_arch.py lines 142-197 (``token_merging``), ported."""
    B, _, D = image_features.shape
    T = index_mask.sum(dim=1)
    retained_tokens = torch.stack([image_features[b][index_mask[b]] for b in range(B)], dim=0)
    non_retained_tokens = torch.stack([image_features[b][~index_mask[b]] for b in range(B)], dim=0)
    if non_retained_tokens.shape[1] == 0:
        return image_features
    cosine_sim = F.cosine_similarity(non_retained_tokens.unsqueeze(2), retained_tokens.unsqueeze(1), dim=3)
    nearest_token_indices = cosine_sim.argmax(dim=2)
    merge_count = torch.zeros(B, int(T[0]), dtype=torch.int)
    merged_features = torch.zeros_like(retained_tokens)
    merged_features += retained_tokens * scaling
    merged_features.scatter_add_(1, nearest_token_indices.unsqueeze(-1).expand(-1, -1, D), non_retained_tokens)
    merge_count.scatter_add_(1, nearest_token_indices, torch.ones_like(nearest_token_indices, dtype=merge_count.dtype))
    merged_features /= (scaling + merge_count.unsqueeze(2))
    for b in range(B):
        image_features[b, index_mask[b]] = merged_features[b]
    return image_features


@torch.no_grad()
def upstream_vscan(model, eager, pixel_values: torch.Tensor, visual_token_num: int, early: int):
    """VScan's vision side as released: (the language model's image inputs, kept indices) of each image."""
    image_features, index_mask = vscan_encode_images(model, eager, pixel_values, visual_token_num, early)
    return ([image_features[b][index_mask[b]] for b in range(len(index_mask))],
            [index_mask[b].nonzero().flatten().tolist() for b in range(len(index_mask))])


@torch.no_grad()
def vscan_encode_images(model, eager, pixel_values: torch.Tensor, visual_token_num: int, early: int):
    """VScan's ``encode_images`` as released: (B, N, D_lm) every patch through the projector, kept ones merged,
    and the (B, N) mask of the kept ones.

    Tencent/SelfEvolvingAgent at a82450e, ``VScan/llava/model/multimodal_encoder/clip_encoder.py`` lines 38-44
    (every layer's [CLS] row, ``attentions[:, :, :, 0, 1:]``) and ``VScan/llava/model/llava_arch.py`` lines 254-293
    (``encode_images``: heads averaged; the shallow layer ``image_attentions[5]`` of 24, here the layer inside which
    hidden state ``early`` is made, ``early - 1``; the deep one ``[-2]``; local ``int(T * 0.5)`` by windows, global
    the rest with the local picks zeroed; the projector; ``token_merging`` with ``scaling=1``; kept in index order).
    """
    outs = eager.model.vision_tower(pixel_values, output_attentions=True, output_hidden_states=True)
    image_features = outs.hidden_states[-2][:, 1:]
    image_attentions = torch.stack(outs.attentions, dim=0)[:, :, :, 0, 1:].mean(dim=2)  # (layers, B, 576)
    B, N = image_features.shape[:2]
    image_attentions_shallow = image_attentions[early - 1]
    image_attentions_deep = image_attentions[-2].clone()
    local_ratio = 1 - 0.5
    local_indices = window_cls_selection(image_attentions_shallow, int(visual_token_num * local_ratio), 6)
    for b in range(B):
        image_attentions_deep[b, local_indices[b]] = 0
    global_indices = torch.topk(image_attentions_deep, k=visual_token_num - int(visual_token_num * local_ratio),
                                dim=1)[1]
    token_indices = torch.cat((local_indices, global_indices), dim=1)
    index_mask = torch.zeros(B, N, dtype=torch.bool)
    index_mask.scatter_(1, token_indices, True)
    image_features = model.model.multi_modal_projector(image_features)
    return token_merging(image_features, index_mask, scaling=1), index_mask


def test_vscan_vision_side_is_the_released_code_on_llava(vscan_llava):
    """20 images x 3 budgets on a 24 x 24 grid: the local and global scans keep the released code's tokens (at 40,
    16 x 1 local + 20 global = 36: the released count, reported as it is), and each kept token's language-model
    input is its merged value within 1e-5."""
    from pyrtok.vlm import PyramidVLM

    model, processor, eager, images = vscan_llava
    pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    vlm = PyramidVLM(model, processor, allocator="vscan")
    assert vlm.encoder.early_layer == 2
    with torch.no_grad():
        encoded = vlm.encode(images)
    for budget, count in ((96, 96), (192, 192), (40, 36)):
        expected, indices = upstream_vscan(model, eager, pixel_values, budget, early=2)
        (ours,) = vlm.select(encoded, budget)
        assert ours.count.tolist() == [count] * IMAGES and ours.total.tolist() == [count] * IMAGES
        features = lm_inputs(vlm, encoded, ours)
        for i in range(IMAGES):
            assert kept(ours, i) == indices[i], (i, budget)
            assert torch.allclose(features[i], expected[i], atol=1e-5), (i, budget)
    unmerged = PyramidVLM(model, processor, allocator={"name": "vscan", "merge": False})
    (plain,) = unmerged.select(encoded, 96)
    (merged,) = vlm.select(encoded, 96)
    assert torch.equal(plain.index, merged.index) and plain.kept_embeddings is None


def test_vscan_windows_and_options():
    from pyrtok.allocators.vscan import capped_window_scan, window_ids

    # the capped scan: 10 x 10 tokens in windows of 4 -> 2 x 2 windows (rows and columns 8-9 join the last ones);
    # keep 8 -> at most 2 per window, in decreasing score
    scores = torch.arange(100.0).flip(0)[None]  # raster order, the first token highest
    keep = capped_window_scan(scores, (10, 10), torch.tensor([8]), window=4).view(10, 10)
    assert keep.sum() == 8 and [int(keep[r // 4 * 4:(r // 4 + 1) * 4 + (2 if r // 4 else 0),
                                            c // 4 * 4:(c // 4 + 1) * 4 + (2 if c // 4 else 0)].sum())
                                for r, c in ((0, 0), (0, 4), (4, 0), (4, 4))] == [2, 2, 2, 2]
    assert keep[0, :2].all() and keep[0, 4:6].all() and keep[4, :2].all() and keep[4, 4:6].all()

    assert torch.bincount(window_ids((24, 24), 4)).tolist() == [36] * 16  # 6 x 6 windows, as released
    assert torch.bincount(window_ids((10, 10), 4)).tolist() == [4, 6, 4, 6, 6, 9, 6, 9] * 2
    g = torch.Generator().manual_seed(3)
    tokens = from_feature_grid(torch.randn(2, 10, 10, 6, generator=g), 2, attention=torch.rand(2, 10, 10, generator=g),
                               early_attention=torch.rand(2, 10, 10, generator=g))
    allocator = allocators.create("vscan")
    selection = allocator(tokens, torch.tensor([64, 20]))
    # 64: 32 local -> 2 per window (16 windows) + 32 global; 20: 10 local -> 0 per window + 10 global
    assert selection.count.tolist() == [64, 10]
    full = allocator(tokens, tokens.num_tokens)  # every token kept, nothing merged
    assert full.count.tolist() == [tokens.num_tokens] * 2
    # on received attention (Qwen towers) the default is the Qwen code's capped scan: the budget exactly
    received = from_feature_grid(torch.randn(2, 10, 10, 6, generator=g), 2, received=True,
                                 attention=torch.rand(2, 10, 10, generator=g))
    assert allocators.create("vscan").scan_for(received) == "capped"
    assert allocators.create("vscan").scan_for(tokens) == "windows"
    assert allocators.create("vscan")(received, torch.tensor([64, 20])).count.tolist() == [64, 20]
    # where the windows' caps leave part of the local share untaken, the global scan takes it: still the budget
    odd = from_feature_grid(torch.randn(1, 11, 11, 6, generator=g), 1, received=True,
                            attention=torch.rand(1, 11, 11, generator=g))
    for local, budget in ((0.95, 120), (0.9, 110)):
        assert allocators.create("vscan", local=local)(odd, budget).count.tolist() == [budget]
    for bad, match in (({"local": 1.5}, "local must be"), ({"windows": 0}, "windows must be"),
                       ({"merge": "yes"}, "merge must be a bool"), ({"scan": "grid"}, "scan must be one of"),
                       ({"window_size": 0}, "window_size must be")):
        with pytest.raises((ValueError, TypeError), match=match):
            allocators.create("vscan", **bad)



# -- LLaVA-NeXT: VisionZip's and VScan's own any-resolution code ------------------------------------------------
# A tiny LLaVA-NeXT no other test uses: views of 96 px at 4 px patches (24 x 24 = 576 patches a view, as CLIP
# ViT-L/14 at 336 px, so VScan's 6 x 6 windows and VisionZip's hard-coded 576 / 24 hold), a 4-layer tower (early
# layer 1), pinpoints up to 2 x 2 and 1 x 3 tiles, and 20 images of odd sizes. pyrtok runs the eager copy too: over
# 100 views and 3 budgets, the sdpa kernel's rounding (1e-7 in the keys) flips one near-tie of VisionZip's
# contextual assignment, which is float noise, not a rule.

NEXT_PINPOINTS = [[96, 96], [96, 192], [192, 96], [192, 192], [96, 288], [288, 96]]


@pytest.fixture(scope="module")
def published_next(tmp_path_factory):
    return tiny_published("llava_next", tmp_path_factory.mktemp("published_next"), 31, (40, 300), 13, hidden=48,
                          text_layers=2, image_grid_pinpoints=NEXT_PINPOINTS,
                          vision_config={"image_size": 96, "patch_size": 4, "num_hidden_layers": 4,
                                         "num_attention_heads": 2})


def next_views(model, processor, image):
    """The processor's views of one image, (V, 3, s, s) (the base view first), and the tile grid (rows, cols), as
    ``get_anyres_image_grid_shape`` gives it (HF's pinpoints and image sizes are (height, width), LLaVA's
    (width, height): the same grid)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    out = processor.image_processor(images=[image], return_tensors="pt")
    rows, cols = get_anyres_image_grid_shape(out["image_sizes"][0].tolist(), model.config.image_grid_pinpoints,
                                             model.config.vision_config.image_size)
    return out["pixel_values"][0], (rows, cols)


def restore_image_features_sorted(model, image_feature, cur_keep_idx, width, height, grid=24):
    """visionzip/llava_arch.py lines 42-80 (``restore_image_features_sorted``), ported: the tiles' dominant
    patches in raster order of the joined tile grid (no unpadding, no newlines), then every tile's [CLS], then
    every tile's contextual tokens."""
    num_img, total_patches, feature_dim = image_feature.shape
    num_keep = cur_keep_idx.shape[1]
    num_extra = total_patches - num_keep
    cur_keep_idx_sorted, _ = cur_keep_idx.sort(dim=1)
    cur_keep_idx_sorted_restore = cur_keep_idx_sorted[:, 1:] - 1
    restored_features = torch.zeros((num_img, grid * grid, feature_dim), dtype=image_feature.dtype)
    mask = torch.zeros(num_img, grid * grid, dtype=torch.bool)
    mask.scatter_(1, cur_keep_idx_sorted_restore, True)
    kept_features = image_feature[:, 1:num_keep, :]
    restored_features[mask] = kept_features.reshape(-1, feature_dim)
    assert width * height == restored_features.shape[0]
    restored_features = restored_features.view(height, width, grid, grid, feature_dim)
    restored_features = restored_features.permute(0, 2, 1, 3, 4).contiguous()
    restored_features = restored_features.view(height * grid, width * grid, feature_dim)
    mask = mask.view(height, width, grid, grid).permute(0, 2, 1, 3).contiguous().view(height * grid, width * grid)
    image_feature_select = restored_features[mask]
    raw_img_feature_merge = image_feature[:, -num_extra:, ].reshape(-1, feature_dim)
    cls_img_feature_merge = image_feature[:, 0, ]
    return torch.cat([image_feature_select, cls_img_feature_merge, raw_img_feature_merge])


@torch.no_grad()
def upstream_visionzip_next(model, eager, processor, image, dominant: int, contextual: int):
    """VisionZip's LLaVA-NeXT path as released, one image: (its language-model image inputs, each view's kept
    patch indices). ``visionzip/llava_arch.py`` lines 91-129 (every view through ``CLIPVisionTower_VisionZip``
    and the projector; the base view's [CLS] + dominant + contextual first, then ``restore_image_features_sorted``
    of the tiles)."""
    pixel_values, (rows, cols) = next_views(model, processor, image)
    features, keep_idx = upstream_visionzip(eager.model.vision_tower, pixel_values, dominant, contextual)
    image_feature = model.model.multi_modal_projector(features)
    base_image_feature, tiles = image_feature[0], image_feature[1:]
    restored = restore_image_features_sorted(model, tiles, keep_idx[1:], cols, rows)
    kept_per_view = [sorted((row[1:] - 1).tolist()) for row in keep_idx]
    return torch.cat((base_image_feature, restored), dim=0), kept_per_view


def unpad_image(tensor, original_size):
    """VScan/llava/model/llava_arch.py lines 102-130 (``unpad_image``, LLaVA's: ``int()`` of the scaled side),
    ported; ``original_size`` is (width, height)."""
    original_width, original_height = original_size
    current_height, current_width = tensor.shape[1:]
    if original_width / original_height > current_width / current_height:
        new_height = int(original_height * (current_width / original_width))
        padding = (current_height - new_height) // 2
        return tensor[:, padding:current_height - padding, :]
    new_width = int(original_width * (current_height / original_height))
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding:current_width - padding]


@torch.no_grad()
def upstream_vscan_next(model, eager, processor, image, visual_token_num: int, early: int):
    """VScan's LLaVA-NeXT path as released, one image: (its language-model image inputs, each view's kept
    indices). ``VScan/llava/model/llava_arch.py`` lines 295-361 (``prepare_inputs_labels_for_multimodal``,
    ``spatial_unpad``: ``encode_images`` on every view with the same count; the base view's kept tokens, then
    the tiles joined, unpadded, a newline column (always kept) appended, the kept tokens in raster order)."""
    pixel_values, (rows, cols) = next_views(model, processor, image)
    image_feature, index_mask = vscan_encode_images(model, eager, pixel_values, visual_token_num, early)
    kept_per_view = [row.nonzero().flatten().tolist() for row in index_mask]
    base_image_feature, base_index_mask = image_feature[0], index_mask[0]
    height = width = 24
    image_feature = image_feature[1:].view(rows, cols, height, width, -1)
    index_mask = index_mask[1:].view(rows, cols, height, width)
    image_feature = image_feature.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
    index_mask = index_mask.permute(0, 2, 1, 3).contiguous().unsqueeze(0).flatten(1, 2).flatten(2, 3)
    size = (image.width, image.height)
    image_feature = unpad_image(image_feature, size)
    index_mask = unpad_image(index_mask, size)
    newline = model.model.image_newline
    image_feature = torch.cat((image_feature, newline[:, None, None].expand(*image_feature.shape[:-1], 1)), dim=-1)
    index_mask = torch.cat((index_mask, torch.ones(*index_mask.shape[:-1], 1, dtype=torch.bool)), dim=-1)
    image_feature = image_feature.flatten(1, 2).transpose(0, 1)[index_mask.flatten(1, 2).squeeze(0)]
    return torch.cat((base_image_feature[base_index_mask], image_feature), dim=0), kept_per_view


@torch.no_grad()
def upstream_fastervlm_next(model, eager, processor, image, visual_token_num: int):
    """FasterVLM's LLaVA-NeXT path as released, one image: (its language-model image inputs, each view's kept
    indices). Theia-4869/FasterVLM at f5d5f12, ``llava/model/multimodal_encoder/clip_encoder.py`` lines 36-47
    (the feature layer's patches and its attention's [CLS] row), ``llava/model/llava_arch.py`` lines 141-158
    (``encode_images``: heads averaged, top-k per view, the projector) and 160-223
    (``prepare_inputs_labels_for_multimodal`` with ``mm_patch_merge_type = 'spatial'`` forced on line 177: the
    base view's kept tokens, then the tiles joined in raster order, padding kept, no newlines)."""
    pixel_values, (rows, cols) = next_views(model, processor, image)
    outs = eager.model.vision_tower(pixel_values, output_attentions=True, output_hidden_states=True)
    image_features = outs.hidden_states[-2][:, 1:]
    image_attentions = outs.attentions[-2][:, :, 0, 1:].mean(dim=1)
    token_indices = torch.topk(image_attentions, k=visual_token_num, dim=1)[1]
    index_masks = torch.zeros(image_features.shape[:2], dtype=torch.bool).scatter_(1, token_indices, True)
    image_features = model.model.multi_modal_projector(image_features)
    kept_per_view = [row.nonzero().flatten().tolist() for row in index_masks]
    base_image_feature = image_features[0][index_masks[0]]
    image_feature = image_features[1:].view(rows, cols, 24, 24, -1).permute(0, 2, 1, 3, 4).contiguous()
    index_mask = index_masks[1:].view(rows, cols, 24, 24).permute(0, 2, 1, 3).contiguous()
    image_feature = image_feature.flatten(0, 3)[index_mask.flatten(0, 3)]
    return torch.cat((base_image_feature, image_feature), dim=0), kept_per_view


def view_budgets(processor, images, per_view: int) -> torch.Tensor:
    """(B,) image budgets that give every view ``per_view`` tokens."""
    views = [processor.image_processor(images=[image], return_tensors="pt")["pixel_values"].shape[1]
             for image in images]
    return torch.tensor(views) * per_view


def view_runs(vlm, encoded, budgets, query=None):
    """Select and prepare a LLaVA-NeXT batch under (B,) ``budgets``; per image: (its index b, the group's
    selection, the image's row in it, the language model's image inputs pyrtok builds)."""
    selections = vlm.select(encoded, budgets, query=query)
    inputs = vlm.prepare(None, [vlm.chat_prompt("what is it?")] * encoded.num_samples, encoded=encoded,
                         selections=selections)
    for b in range(encoded.num_samples):
        (k, i), = [(k, g.index(b)) for k, (g, _) in enumerate(encoded.groups) if b in g]
        yield b, selections[k], i, inputs.mm_encoder_outputs["image"].pooler_output[b]


def test_visionzip_is_the_released_code_on_llava_next(published_next):
    """20 images x 3 budgets: every view keeps [CLS] + dominant + contextual as the released code does, and the
    language model gets them in the released order (the base view, the tiles' patches in the joined grid, the
    tiles' [CLS], their contextual tokens), within 1e-5; ``views="joint"`` is pyrtok's one choice over the
    pyramid."""
    from pyrtok.vlm import PyramidVLM
    from pyrtok.vlm.families.views import ViewSelection

    model, processor, eager, images = published_next
    vlm = PyramidVLM(eager, processor, allocator="visionzip")
    with torch.no_grad():
        encoded = vlm.encode(images)
    for per_view in (16, 64, 144):
        contextual = round_half_up(per_view * 10 / 64)
        for b, chosen, i, ours in view_runs(vlm, encoded, view_budgets(processor, images, per_view)):
            image = images[b]
            assert isinstance(chosen, ViewSelection) and chosen.rule == "stacked"
            expected, kept_views = upstream_visionzip_next(model, eager, processor, image, per_view - contextual,
                                                           contextual)
            views = chosen.views
            for v, indices in enumerate(kept_views):
                assert kept(views, i * chosen.num_views + v) == indices, (b, per_view, v)
            assert ours.shape == expected.shape and int(chosen.total[i]) == expected.shape[0]
            assert torch.allclose(ours, expected, atol=1e-5), (b, per_view)
    joint = PyramidVLM(model, processor, allocator="visionzip", views="joint")
    assert not any(isinstance(s, ViewSelection) for s in joint.select(joint.encode(images[:2]), 64))


def test_vscan_is_the_released_code_on_llava_next(published_next):
    """20 images x 3 budgets: every view scans and merges as the released code does (the same count each), the
    tiles' kept tokens in the padding are dropped as the model unpads, a newline ends every row; the language
    model's image inputs within 1e-5."""
    from pyrtok.vlm import PyramidVLM

    model, processor, eager, images = published_next
    vlm = PyramidVLM(eager, processor, allocator="vscan")
    with torch.no_grad():
        encoded = vlm.encode(images)
    dropped = 0
    for per_view in (32, 96, 192):
        for b, chosen, i, ours in view_runs(vlm, encoded, view_budgets(processor, images, per_view)):
            image = images[b]
            assert chosen.rule == "each"
            expected, kept_views = upstream_vscan_next(model, eager, processor, image, per_view, early=1)
            for v, indices in enumerate(kept_views):
                assert kept(chosen.views, i * chosen.num_views + v) == indices, (b, per_view, v)
            assert ours.shape == expected.shape, (b, per_view)
            assert torch.allclose(ours, expected, atol=1e-5), (b, per_view)
            dropped += int(chosen.views.count[i * chosen.num_views: (i + 1) * chosen.num_views].sum()
                           - chosen.count[i])
    assert dropped > 0  # some kept tokens fell in the padding and were dropped, as the released code drops them


def test_fastervlm_is_the_released_code_on_llava_next(published_next):
    """20 images x 3 budgets: every view keeps its own top-K [CLS] attention, and the language model gets the base
    view's, then the tiles' in raster order of the joined grid (FasterVLM's forced ``spatial`` layout)."""
    from pyrtok.vlm import PyramidVLM

    model, processor, eager, images = published_next
    vlm = PyramidVLM(eager, processor, allocator="fastervlm")
    with torch.no_grad():
        encoded = vlm.encode(images)
    for per_view in (32, 64, 144):
        for b, chosen, i, ours in view_runs(vlm, encoded, view_budgets(processor, images, per_view)):
            image = images[b]
            assert chosen.rule == "stacked" and chosen.views.merged is None and chosen.views.cls is None
            expected, kept_views = upstream_fastervlm_next(model, eager, processor, image, per_view)
            for v, indices in enumerate(kept_views):
                assert kept(chosen.views, i * chosen.num_views + v) == indices, (b, per_view, v)
            assert ours.shape == expected.shape and torch.allclose(ours, expected, atol=1e-5), (b, per_view)


def divprune(visual_feature_vectors, image_feature_length, threshold_ratio):
    """vbdi/divprune, ``LLaVA/llava/model/llava_arch.py`` lines 147-171 (``pairwise_cosine_similarity``,
    ``DivPrune``), ported: ``int(round(ratio * length))`` picks, the first the token farthest from its nearest
    neighbour, then the token farthest from the kept set."""
    threshold_terms = int(round(threshold_ratio * image_feature_length))  # noqa: RUF046 (as released)
    norm_matrix = visual_feature_vectors / visual_feature_vectors.norm(dim=1, keepdim=True)
    cosine_matrix = 1.0 - torch.mm(norm_matrix, norm_matrix.t())
    s = torch.empty(threshold_terms, dtype=torch.long)
    for i in range(threshold_terms):
        m2 = cosine_matrix if i == 0 else torch.index_select(cosine_matrix, 0, s[:i])
        scores = torch.topk(m2, 2, dim=0, largest=False).values[1, :] if i == 0 else torch.min(m2, dim=0).values
        s[i] = torch.argmax(scores)
    return s


@torch.no_grad()
def upstream_divprune_next(model, processor, image, ratio: float):
    """DivPrune's LLaVA-1.6 path as released, one image: (its language-model image inputs, kept positions).
    ``LLaVA/llava/model/llava_arch.py`` lines 181-230 (the model's own image sequence: the base view, then the
    unpadded tile rows each ended by ``image_newline``) and 352-385 (``LAYER_INDEX=0``: DivPrune over that whole
    sequence, newlines included, the kept positions sorted). The sequence is the HF model's own
    (``get_image_features``, which packs it the same way)."""
    out = processor.image_processor(images=[image], return_tensors="pt")
    (sequence,) = model.model.get_image_features(pixel_values=out["pixel_values"],
                                                 image_sizes=out["image_sizes"]).pooler_output
    kept = divprune(sequence, sequence.shape[0], ratio).sort().values
    return sequence[kept], kept.tolist(), sequence.shape[0]


def test_divprune_is_the_released_code_on_llava_next(published_next):
    """20 images x 3 ratios: DivPrune over the model's image sequence with its newline tokens as candidates, the
    count ``round(ratio * length)``, kept in sequence order; the language model's inputs within 1e-5."""
    from pyrtok.vlm import PyramidVLM

    model, processor, _, images = published_next
    vlm = PyramidVLM(model, processor, allocator="divprune")
    with torch.no_grad():
        encoded = vlm.encode(images)
    newlines = 0
    for ratio in (0.02, 0.05, 0.1):
        expected = [upstream_divprune_next(model, processor, image, ratio) for image in images]
        budgets = torch.tensor([round(ratio * length) for _, _, length in expected])
        for b, chosen, i, ours in view_runs(vlm, encoded, budgets):
            features, positions, _ = expected[b]
            assert chosen.rule == "sequence" and kept(chosen, i) == positions, (b, ratio)
            assert ours.shape == features.shape and torch.allclose(ours, features, atol=1e-5), (b, ratio)
            newlines += int((features == model.model.image_newline).all(-1).sum())
    assert newlines > 0  # some images keep a newline token, as the released code may


def test_view_rules_and_their_errors(published_next):
    from pyrtok.vlm import PyramidVLM

    model, processor, _, images = published_next
    family = PyramidVLM(model, processor).family
    assert [family.view_rule(allocators.create(name)) for name in ("laplacian", "divprune", "vscan", "visionzip")] \
        == ["joint", "sequence", "each", "stacked"]
    pooled = PyramidVLM(model, processor, allocator="divprune", levels=2)
    assert pooled.family.view_rule(pooled.allocator) == "joint"  # the model's sequence has no pooled levels
    with pytest.raises(ValueError, match="has no pooled levels: use levels=1"):
        forced = PyramidVLM(model, processor, allocator="divprune", levels=2, views="sequence")
        forced.select(forced.encode(images[:1]), 20)
    lazy = PyramidVLM(model, processor, allocator="visionzip", lazy_tiles=True)
    assert lazy.family.view_rule(lazy.allocator) == "joint"  # lazy tiles choose from the base view
    with pytest.raises(ValueError, match="views must be one of"):
        PyramidVLM(model, processor, views="tiles")
    with pytest.raises(ValueError, match="does not go with lazy_tiles=True"):
        PyramidVLM(model, processor, views="each", lazy_tiles=True)
    assert family.view_rule(allocators.create("cls_attention")) == "joint"  # pyrtok's own: every level
    pooled = PyramidVLM(model, processor, allocator="visionzip", levels=2)
    assert pooled.family.view_rule(pooled.allocator) == "joint"
    with pytest.raises(ValueError, match="does not go with lazy_tiles=True"):
        PyramidVLM(model, processor, views="sequence", lazy_tiles=True)
    # any allocator runs view by view on request: DivPrune on every view, the model's layout
    each = PyramidVLM(model, processor, allocator="divprune", views="each")
    encoded = each.encode(images[:1])
    (chosen,) = each.select(encoded, view_budgets(processor, images[:1], 20))
    assert chosen.views.count.tolist() == [20] * chosen.num_views
    with pytest.raises(ValueError, match="budgets must be at least"):
        each.select(encoded, chosen.num_views - 1)
    (everything,) = PyramidVLM(model, processor, allocator="visionzip").select(encoded)  # budget None: all
    assert everything.views.count.tolist() == [576] * chosen.num_views and everything.views.merged is None
    with pytest.raises(TypeError, match="made view by view"):
        gather(encoded.groups[0][1].tokens, chosen)
    # two images of one size in one group: each image's choice is the one it gets alone
    stacked = PyramidVLM(model, processor, allocator="visionzip")
    twin = images[0].transpose(0)  # a mirror image: the same size, other pixels
    both = stacked.encode([images[0], twin])
    assert len(both.groups) == 1
    for b, chosen, i, ours in view_runs(stacked, both, view_budgets(processor, [images[0], twin], 32)):
        alone = stacked.encode([[images[0], twin][b]])
        (_, single, _, expected), = view_runs(stacked, alone, view_budgets(processor, [images[0]], 32))
        assert torch.equal(chosen.views.index[i * chosen.num_views: (i + 1) * chosen.num_views], single.views.index)
        assert torch.allclose(ours, expected, atol=1e-6)


# VScan's own Qwen2.5-VL code: a tiny Qwen2.5-VL no other test uses (a 4-block tower, blocks 1 and 3 full
# attention, windows of 112 px = 4 x 4 merged tokens as Qwen's own; pixels up to 16 x 16 merged tokens) and 8
# images of odd sizes (9-14 merged tokens a side, so windows leave remainders).

QWEN_IMAGES = 8


@pytest.fixture(scope="module")
def vscan_qwen(tmp_path_factory):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pyrtok.testing import save_tiny_vlm

    folder = save_tiny_vlm("qwen2_5_vl", tmp_path_factory.mktemp("vscan_qwen"), seed=31, hidden=64, text_layers=2,
                           vision_config={"depth": 4, "fullatt_block_indexes": [1, 3], "window_size": 112})
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    processor.image_processor.size = {"shortest_edge": 16 * 28**2, "longest_edge": 256 * 28**2}
    rng = np.random.default_rng(13)
    images = [Image.fromarray(rng.integers(0, 256, (int(rng.integers(250, 400)), int(rng.integers(250, 400)), 3),
                                           dtype=np.uint8)) for _ in range(QWEN_IMAGES)]
    return model, processor, images


def qwen_window_selection(attn_weights: torch.Tensor, num_keep_tokens: int, image_grid_thw: torch.Tensor,
                          window_size: int = 4) -> torch.Tensor:
    """VScan/qwen/model/qwen2_5_vl_utils.py ``window_selection``, ported (a greedy pass in decreasing score, each
    window of ``window_size`` x ``window_size`` merged tokens capped at ceil(keep / windows); the remainder rows
    and columns go to the last window)."""
    token_h, token_w = int(image_grid_thw[0, 1]) // 2, int(image_grid_thw[0, 2]) // 2
    assert token_h * token_w == attn_weights.shape[0]
    num_windows_h, num_windows_w = token_h // window_size, token_w // window_size
    limit = math.ceil(num_keep_tokens / (num_windows_h * num_windows_w))
    counter = torch.zeros(token_h, token_w, dtype=torch.int)
    keep, total = [], 0
    for index in torch.argsort(attn_weights, dim=0, descending=True, stable=True).tolist():
        x, y = (index // token_w) // window_size, (index % token_w) // window_size
        x, y = min(x, num_windows_h - 1), min(y, num_windows_w - 1)
        if counter[x, y] < limit:
            counter[x, y] += 1
            keep.append(index)
            total += 1
        if total >= num_keep_tokens:
            break
    assert total == num_keep_tokens
    return torch.tensor(keep, dtype=torch.long)


def qwen_token_merging(image_embeds: torch.Tensor, keep_indices: torch.Tensor, scaling: float = 1) -> torch.Tensor:
    """VScan/qwen/model/qwen2_5_vl_utils.py ``token_merging``, ported: (T, D) the kept tokens, each the mean of
    itself and the dropped tokens most cosine-similar to it."""
    N, D = image_embeds.shape
    mask = torch.zeros(N, dtype=torch.bool)
    mask[keep_indices] = True
    retained, others = image_embeds[mask], image_embeds[~mask]
    nearest = F.cosine_similarity(others.unsqueeze(1), retained.unsqueeze(0), dim=2).argmax(dim=1)
    merged = retained * scaling
    merged = merged.scatter_add(0, nearest.unsqueeze(-1).expand(-1, D), others)
    count = torch.zeros(len(retained), dtype=torch.int)
    count = count.scatter_add(0, nearest, torch.ones_like(nearest, dtype=torch.int))
    return merged / (scaling + count.unsqueeze(1))


@torch.no_grad()
def upstream_vscan_qwen(model, processor, image, ratio: float):
    """VScan's vision side on Qwen2.5-VL as released, one image (Tencent/SelfEvolvingAgent, VScan/qwen/model/
    qwen2_5_vl_custom.py: ``Qwen2_5_VisionTransformerPretrainedModel_X.forward`` lines 295-392, the block loop with
    the attention maps of the first full-attention block (local) and the last block (global) from the SDPA
    attention's ``output_attentions`` path, lines 466-515: rotated q/k of ``norm1`` of the block input, the
    segment mask, fp32 softmax; heads summed, query rows averaged, 2 x 2 units averaged, raster order;
    ``Qwen2_5_VLForConditionalGeneration_X.forward`` lines 143-166: ``int(ratio * n)`` kept, half by
    ``window_selection`` on the local scores, the rest by the global scores with the local picks zeroed, sorted,
    ``token_merging`` of the merger outputs with ``scaling=1``), written on transformers' own vision pieces.

    Returns the language model's image inputs (K, D) and the kept indices (raster order of the merged grid)."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen
    from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

    visual = model.model.visual
    inputs = processor.image_processor(images=[image], return_tensors="pt")
    pixel_values, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    position_ids = get_vision_position_ids(grid, visual.spatial_merge_size)
    cu_seqlens, _ = get_vision_attention_seqlens(grid, visual.config)
    window_index, cu_window_seqlens = get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                                              window_size=visual.window_size,
                                                              patch_size=visual.patch_size)
    hidden = visual.patch_embed(pixel_values)
    seq_len = hidden.shape[0]
    hidden = visual.permute_input_for_window_attn(hidden, window_index, seq_len=seq_len)
    cos, sin = (visual.permute_input_for_window_attn(f, window_index, seq_len=seq_len)
                for f in visual.rotary_pos_emb(hidden, position_ids))
    local_layer, global_layer = visual.fullatt_block_indexes[0], len(visual.blocks) - 1
    maps = {}
    for layer_num, blk in enumerate(visual.blocks):
        cu = cu_seqlens if layer_num in visual.fullatt_block_indexes else cu_window_seqlens
        if layer_num in (local_layer, global_layer):
            attention = blk.attn
            q, k, _ = attention.qkv(blk.norm1(hidden)).reshape(seq_len, 3, attention.num_heads, -1).permute(
                1, 0, 2, 3).unbind(0)
            q, k = qwen.apply_rotary_pos_emb_vision(q, k, cos, sin)
            q, k = q.transpose(0, 1), k.transpose(0, 1)
            mask = torch.full([1, seq_len, seq_len], torch.finfo(q.dtype).min)
            for i in range(1, len(cu)):
                mask[..., cu[i - 1]:cu[i], cu[i - 1]:cu[i]] = 0
            weights = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(q.size(-1)) + mask
            maps[layer_num] = weights.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        hidden = blk(hidden, cu_seqlens=cu, position_embeddings=(cos, sin))
    reverse = torch.argsort(window_index)
    scores = []
    for layer in (local_layer, global_layer):
        per_unit = maps[layer].sum(dim=0).mean(dim=0).view(-1, visual.spatial_merge_unit).mean(dim=1)
        scores.append(per_unit[reverse])
    image_embeds = visual.merger(hidden)[reverse]
    local_scores, global_scores = scores
    n = image_embeds.shape[0]
    num_keep = int(ratio * n)
    keep_local = qwen_window_selection(local_scores, num_keep // 2, grid, window_size=4)
    global_scores = global_scores.clone()
    global_scores[keep_local] = 0
    keep_global = torch.topk(global_scores, num_keep - num_keep // 2).indices
    keep = torch.sort(torch.cat((keep_local, keep_global)))[0]
    return qwen_token_merging(image_embeds, keep, scaling=1), keep.tolist(), image_embeds


def test_vscan_vision_side_is_the_authors_qwen_code(vscan_qwen):
    """8 images x 3 ratios: the capped window scan and the global scan keep the released Qwen code's tokens (the
    budget, ``int(ratio * n)``, exactly), and each kept token's language-model input is its merged value within
    1e-5; ``scan="auto"`` picks the Qwen code on a tower without [CLS]."""
    from pyrtok.vlm import PyramidVLM

    model, processor, images = vscan_qwen
    vlm = PyramidVLM(model, processor, allocator="vscan", levels=1)
    with torch.no_grad():
        encoded = vlm.encode(images)
    tokens_of = {i: (group.tokens, j) for members, group in encoded.groups for j, i in enumerate(members)}
    sizes = [int(tokens_of[i][0].num_tokens) for i in range(QWEN_IMAGES)]
    assert len(encoded.groups) > 1 and min(sizes) >= 81  # odd grids of several sizes
    prompts = [vlm.chat_prompt("what is it?")] * QWEN_IMAGES
    for ratio in (0.167, 0.333, 0.5):
        budgets = [int(ratio * n) for n in sizes]
        selections = vlm.select(encoded, torch.tensor(budgets))
        with torch.no_grad():
            inputs = vlm.prepare(None, prompts, encoded=encoded, selections=selections)
        features = list(inputs.mm_encoder_outputs["image"].pooler_output)
        chosen = {i: (selection, j) for (members, _), selection in zip(encoded.groups, selections, strict=True)
                  for j, i in enumerate(members)}
        for i, image in enumerate(images):
            expected, indices, tower = upstream_vscan_qwen(model, processor, image, ratio)
            tokens, row = tokens_of[i]
            assert torch.allclose(tokens.features[row], tower, atol=1e-5)  # the port runs the model's own tower
            selection, j = chosen[i]
            assert int(selection.count[j]) == budgets[i] == len(indices)
            assert kept(selection, j) == indices, (i, ratio)
            assert torch.allclose(features[i], expected, atol=1e-5), (i, ratio)


# -- CDPruner -------------------------------------------------------------------------------------------------

QUESTIONS = ("what colour is the shape?",
             "how many small red circles are there in the picture on the left side of the large blue square "
             "next to the green triangle at the top?")  # 26 words: two segments of a 16-position text tower


def clip_on_tower(model, tokenizer, seed: int):
    """A tiny CLIP whose vision tower is ``model``'s (as LLaVA's tower is CLIP ViT-L's), with a text tower of 16
    positions, so that long questions take two segments."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          vocab_size=len(tokenizer), max_position_embeddings=16, eos_token_id=tokenizer.eos_token_id,
                          bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=model.config.vision_config.to_dict(),
                        projection_dim=24)
    torch.manual_seed(seed)
    clip = CLIPModel(config).eval()
    clip.vision_model.load_state_dict(model.model.vision_tower.state_dict())
    return clip, tokenizer


@pytest.fixture(scope="module")
def published_clip(published_llava):
    model, processor, _, _ = published_llava
    return clip_on_tower(model, processor.tokenizer, seed=31)


@torch.no_grad()
def upstream_cdpruner(model, clip, tokenizer, pixel_values: torch.Tensor, question: str, visual_token_num: int):
    """CDPruner as released, for the views of one image (a batch of 1 on LLaVA-1.5) and its question: the kept
    indices of each view.

    Theia-4869/CDPruner at 9541616: ``llava/model/multimodal_encoder/clip_encoder.py`` ``forward`` (the question
    tokenized without truncation, zero-padded to a multiple of ``max_position_embeddings`` and split into segments,
    ``text_embeds`` of each; ``image_embeds``: the feature-layer patches through the tower's ``post_layernorm`` and
    CLIP's ``visual_projection``) and ``llava/model/llava_arch.py`` lines 141-187 (``encode_images``: cosine
    similarity of the projector outputs in float32, relevance ``(-cos).mean`` over segments, min-max with 1e-6, the
    kernel, the fast greedy MAP loop, sorted). The min-max scaling spans the whole batch, every view of the image.
    """
    tower = model.model.vision_tower
    outs = tower(pixel_values, output_hidden_states=True)
    image_outputs = outs.hidden_states[-2][:, 1:]
    max_position_embeddings = clip.config.text_config.max_position_embeddings
    text_inputs = dict(tokenizer(text=question, return_tensors="pt"))
    text_inputs = {k: v for k, v in text_inputs.items() if k in ("input_ids", "attention_mask")}
    text_segment = (text_inputs["input_ids"].shape[1] - 1) // max_position_embeddings + 1
    text_padding = max_position_embeddings * text_segment - text_inputs["input_ids"].shape[1]
    text_inputs = {k: torch.cat([v, v.new_zeros((v.shape[0], text_padding))], dim=1)
                   .reshape(-1, max_position_embeddings) for k, v in text_inputs.items()}
    text_embeds = clip.text_projection(clip.text_model(**text_inputs).pooler_output)
    image_embeds = clip.visual_projection(tower.post_layernorm(image_outputs).float())

    image_features = model.model.multi_modal_projector(image_outputs)
    B, N, _ = image_features.shape
    image_normalized = (image_features / image_features.norm(dim=-1, keepdim=True)).float()
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = torch.matmul(image_embeds, text_embeds.t())
    relevance = (-relevance).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    cis = torch.zeros((visual_token_num, B, N))
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (kernel[torch.arange(B), j] - torch.einsum('tb,tbn->bn', cis[:i, torch.arange(B), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float('inf')
    return [row.tolist() for row in torch.sort(select_idx.t()).values]


def test_cdpruner_is_the_released_code_on_llava(published_llava, published_clip):
    """20 images x 3 budgets, two questions (one of two text segments): the kept sets of the released code, with
    the CLIP query encoder; the ``plain`` variant (relevance not negated) keeps other tokens."""
    from pyrtok.encoders.text import ClipQueryEncoder
    from pyrtok.vlm import PyramidVLM

    model, processor, _, images = published_llava
    clip, tokenizer = published_clip
    pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    encoder = ClipQueryEncoder(clip, tokenizer)
    vlm = PyramidVLM(model, processor, allocator="cdpruner", query_encoder=encoder)
    plain = PyramidVLM(model, processor, allocator={"name": "cdpruner", "relevance": "plain"}, query_encoder=encoder)
    questions = [QUESTIONS[i % 2] for i in range(IMAGES)]
    with torch.no_grad():
        encoded = vlm.encode(images)
        query = vlm.encode_query(questions)
    (_, group), = encoded.groups
    assert group.tokens.aligned.shape == (IMAGES, 100, 24)
    differ = 0
    for budget in (8, 20, 40):
        (ours,) = vlm.select(encoded, budget, query=query)
        (theirs_plain,) = plain.select(encoded, budget, query=query)
        assert ours.count.tolist() == [budget] * IMAGES
        for i in range(IMAGES):
            (expected,) = upstream_cdpruner(model, clip, tokenizer, pixel_values[i:i + 1], questions[i], budget)
            assert kept(ours, i) == expected, (i, budget)
            differ += kept(theirs_plain, i) != expected
    assert differ > 0


def test_language_query_encoder_is_the_mean_of_unit_input_embeddings(published_llava):
    from pyrtok.vlm import PyramidVLM

    model, processor, _, images = published_llava
    vlm = PyramidVLM(model, processor, allocator="cdpruner", query_encoder="language")
    query = vlm.encode_query(["what colour", ""])
    table = model.get_input_embeddings().weight
    ids = processor.tokenizer("what colour", add_special_tokens=False)["input_ids"]
    assert torch.allclose(query[0], F.normalize(table[ids], dim=-1).mean(0), atol=1e-6)
    assert torch.equal(query[1], torch.zeros_like(query[1]))
    encoded = vlm.encode(images[:2])
    tokens = encoded.groups[0][1].tokens
    assert tokens.aligned is tokens.embeddings  # the language model's inputs are the query space
    (selection,) = vlm.select(encoded, 10, query=query)
    assert selection.count.tolist() == [10, 10]
    with pytest.raises(ValueError, match="has no query_encoder"):
        PyramidVLM(model, processor).encode_query(["what"])
    with pytest.raises(ValueError, match="query_encoder must be None, 'language'"):
        PyramidVLM(model, processor, query_encoder="bert")


@pytest.fixture(scope="module")
def published_next_clip(published_next):
    model, processor, _, _ = published_next
    return clip_on_tower(model, processor.tokenizer, seed=37)


def test_cdpruner_is_the_released_code_on_llava_next(published_next, published_next_clip):
    """20 images x 3 counts per view, two questions: every view keeps its own DPP's tokens, the relevance scaled
    over all of the image's views as the released code scales its batch, laid out as its forced ``spatial``
    layout (the base view, then the tiles joined in raster order, padding kept, no newlines)."""
    from pyrtok.encoders.text import ClipQueryEncoder
    from pyrtok.vlm import PyramidVLM

    model, processor, _, images = published_next  # CDPruner reads no attention: the model's own kernel
    clip, tokenizer = published_next_clip
    vlm = PyramidVLM(model, processor, allocator="cdpruner", query_encoder=ClipQueryEncoder(clip, tokenizer))
    questions = [QUESTIONS[i % 2] for i in range(IMAGES)]
    with torch.no_grad():
        encoded = vlm.encode(images)
        query = vlm.encode_query(questions)
    for per_view in (8, 16, 32):  # well below the kernel's rank (48, the language model's width)
        for b, chosen, i, ours in view_runs(vlm, encoded, view_budgets(processor, images, per_view), query):
            image = images[b]
            assert chosen.rule == "stacked"
            pixel_values, (rows, cols) = next_views(model, processor, image)
            expected = upstream_cdpruner(model, clip, tokenizer, pixel_values, questions[b], per_view)
            for v, indices in enumerate(expected):
                assert kept(chosen.views, i * chosen.num_views + v) == indices, (b, per_view, v)
            with torch.no_grad():  # the forced 'spatial' layout of the kept projector outputs
                features = model.model.multi_modal_projector(
                    model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:])
            mask = torch.zeros(features.shape[:2], dtype=torch.bool)
            for v, indices in enumerate(expected):
                mask[v, indices] = True
            tiles = features[1:].view(rows, cols, 24, 24, -1).permute(0, 2, 1, 3, 4).flatten(0, 3)
            tile_mask = mask[1:].view(rows, cols, 24, 24).permute(0, 2, 1, 3).flatten(0, 3)
            layout = torch.cat((features[0][mask[0]], tiles[tile_mask]))
            assert ours.shape == layout.shape and torch.allclose(ours, layout, atol=1e-5), (b, per_view)
