"""Vision-side published methods against ports of their authors' code, on a tiny LLaVA no other test uses.

Each port is written from the upstream file named in its docstring and runs on the model's own HF pieces (the
tower with eager attention for its attention maps, the projector), one image at a time, as the released
evaluation scripts run LLaVA-1.5; pyrtok runs the same model through :class:`~pyrtok.vlm.PyramidVLM` on a batch
of 20 images. Kept sets must be identical and the language model's image inputs equal within 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyrtok import allocators
from pyrtok.tokens import TokenSelection, from_feature_grid

IMAGES = 20


@pytest.fixture(scope="module")
def published_llava(tmp_path_factory):
    """A tiny LLaVA: 80 px at 8 px patches (100 tokens), a 6-layer tower with 4 heads (feature layer -2), a 4-layer
    language model 64 wide; its processor; an eager-attention copy of it; and 20 images of odd sizes."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pyrtok.testing import save_tiny_vlm

    folder = save_tiny_vlm("llava", tmp_path_factory.mktemp("published_llava"), seed=23, hidden=64, text_layers=4,
                           vision_config={"image_size": 80, "patch_size": 8, "num_hidden_layers": 6,
                                          "num_attention_heads": 4})
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    eager = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, (int(rng.integers(50, 130)), int(rng.integers(50, 130)), 3),
                                           dtype=np.uint8)) for _ in range(IMAGES)]
    return model, AutoProcessor.from_pretrained(folder), eager, images


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
    with pytest.raises(ValueError, match="carry no \\[CLS\\] feature.*cls: false"):
        Family.gather_kept(torch.randn(1, 4, 3), selection)
    cls = torch.randn(1, 3)
    (row,) = Family.gather_kept(torch.randn(1, 4, 3), selection, cls=cls)
    assert row.shape == (5, 3) and torch.equal(row[0], cls[0])
    with pytest.raises(ValueError, match=r"cls must be a \(1,\) bool tensor"):
        TokenSelection.from_keep_mask(torch.ones(1, 4, dtype=torch.bool), lead=torch.tensor([1]))
