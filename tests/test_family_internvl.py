"""InternVL against references built without pyrtok's code path.

The tiny random-weight model is saved with its own processor (:func:`pyrtok.testing.save_tiny_vlm`: 56 px tiles
of 7 px patches, 4x4 tokens a tile after the pixel shuffle, 1..6 tiles). References are the processor's own
views (tiles, then the thumbnail) and the model's own ``get_image_features`` on them, subset by hand; the contract
every family keeps (full budget is the model, batches, budgets) is ``tests/test_family_contract.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_reproduces, chat, random_image
from einops import rearrange
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText
from transformers.modeling_outputs import BaseModelOutputWithPooling

from pyrtok.testing import save_tiny_vlm
from pyrtok.tokens import TokenSelection
from pyrtok.vlm import PyramidVLM

Q = 4  # tokens per tile side
# PIL (width, height) -> (rows, cols) of tiles the processor picks (closest aspect ratio within 1..6 tiles)
GRIDS = {(67, 101): (3, 2), (100, 60): (2, 3), (200, 40): (1, 5), (48, 64): (3, 2), (64, 64): (1, 1), (60, 56): (1, 1)}


def views(processor, image) -> torch.Tensor:
    """The processor's own normalised views of one image (tiles row-major, then the thumbnail)."""
    return processor(images=[image], text=[chat(processor)], return_tensors="pt")["pixel_values"]


def model_tokens(model, pixel_values) -> torch.Tensor:
    """(V, Q * Q, D) the model's own tokens of each view."""
    with torch.no_grad():
        return model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output


# -- the tile grid and the thumbnail --------------------------------------------------------------------------

@pytest.mark.parametrize("size", GRIDS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_tile_grid_is_the_processors(tiny_vlm, size):
    _, model, processor = tiny_vlm("internvl")
    vlm = PyramidVLM(model, processor, allocator="all")
    image = random_image(*size, seed=size[0])
    rows, cols = vlm.family.tile_grid((size[1], size[0]))
    assert (rows, cols) == GRIDS[size]
    pixel_values = views(processor, image)
    count = rows * cols
    assert pixel_values.shape[0] == count + (count > 1)  # a thumbnail only when there are several tiles
    # the tiles, joined in this grid, are the processor's resize of the whole image to the (rows x cols) canvas
    canvas = processor.image_processor(images=[image], crop_to_patches=False, return_tensors="pt",
                                       size={"height": rows * 56, "width": cols * 56})["pixel_values"][0]
    joined = rearrange(pixel_values[:count], "(r c) ch h w -> ch (r h) (c w)", r=rows)
    assert (joined - canvas).abs().max().item() <= 1e-5
    if count > 1:  # the thumbnail is the whole image at one tile's size
        thumb = processor.image_processor(images=[image], crop_to_patches=False, return_tensors="pt")
        assert (pixel_values[-1] - thumb["pixel_values"][0]).abs().max().item() <= 1e-5
    tokens = vlm.encode([image]).tokens
    assert tokens.image_size == (size[1], size[0])
    if count > 1:
        assert tokens.level_shapes == ((rows * Q, cols * Q), (Q, Q))  # tiles at level 0, the thumbnail on top
    else:
        assert tokens.level_shapes == ((Q, Q),)  # the single tile alone: no thumbnail
    levels = PyramidVLM(model, processor, levels=2).encode([image]).tokens
    assert levels.level_shapes[:2] == ((rows * Q, cols * Q), (-(-rows * Q // 2), -(-cols * Q // 2)))


def test_tokens_are_the_models_own_and_full_budget_keeps_its_order(tiny_vlm):
    """Level 0 is the joined tile grid of the model's tokens, the top level its thumbnail tokens; at full budget
    the language model gets them tile by tile (raster within a tile), the thumbnail last, as the model does."""
    _, model, processor = tiny_vlm("internvl")
    image = random_image(67, 101, seed=3)  # 3 rows x 2 cols of tiles
    reference = model_tokens(model, views(processor, image))  # (7, 16, D)
    vlm = PyramidVLM(model, processor, allocator="all")
    tokens = vlm.encode([image]).tokens
    assert torch.allclose(tokens.features[0, :16], reference[6], atol=1e-6)  # canonical order: coarsest first
    grid = rearrange(tokens.features[0, 16:], "(h w) d -> h w d", h=3 * Q)
    for tile in range(6):
        r, c = divmod(tile, 2)
        block = rearrange(grid[r * Q : (r + 1) * Q, c * Q : (c + 1) * Q], "h w d -> (h w) d")
        assert torch.allclose(block, reference[tile], atol=1e-6)
    inputs = vlm.prepare([image], [chat(processor)])
    features = inputs.mm_encoder_outputs["image"].pooler_output[0]
    assert torch.allclose(features, rearrange(reference, "v n d -> (v n) d"), atol=1e-6)


def test_a_tensor_image_is_the_pil_image(tiny_vlm):
    """Images enter as users have them: a (3, H, W) tensor of a PIL image's pixels encodes as the PIL image."""
    from pyrtok.images import image_tensor

    _, model, processor = tiny_vlm("internvl")
    vlm = PyramidVLM(model, processor, levels=2)
    image = random_image(67, 101, seed=11)
    a, b = vlm.encode([image]).tokens, vlm.encode([image_tensor(image)]).tokens
    assert a.level_shapes == b.level_shapes and torch.equal(a.box, b.box)
    assert (a.features - b.features).abs().max().item() <= 1e-6


def test_the_run_is_wrapped_in_img_markers_under_any_budget(tiny_vlm):
    _, model, processor = tiny_vlm("internvl")
    tokenizer = processor.tokenizer
    start, end = tokenizer.convert_tokens_to_ids(["<img>", "</img>"])
    vlm = PyramidVLM(model, processor, allocator="laplacian")
    images = [random_image(67, 101, seed=1), random_image(64, 64, seed=2)]
    for budget in (None, 5):
        inputs = vlm.prepare([images], [chat(processor, images=2)], budget=budget)
        ids = inputs.input_ids[0].tolist()
        marker = model.config.image_token_id
        for count in inputs.image_counts[0]:
            at = ids.index(start)
            assert ids[at + 1 : at + 1 + count] == [marker] * count and ids[at + 1 + count] == end
            ids = ids[at + 2 + count :]
        assert start not in ids and marker not in ids
    assert inputs.image_counts == [[5, 5]]
    # the family's run for one image is the processor's text around its placeholders: <img> markers </img>
    assert vlm.family.image_run(3) == [start, *[model.config.image_token_id] * 3, end]


# -- boxes ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(67, 101), (200, 40), (64, 48)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_boxes_are_in_original_image_pixels(tiny_vlm, size):
    _, model, processor = tiny_vlm("internvl")
    width, height = size
    vlm = PyramidVLM(model, processor, levels=2)
    tokens = vlm.encode([random_image(width, height, seed=4)]).tokens
    rows, cols = vlm.family.tile_grid((height, width))
    for level in range(tokens.num_levels):
        box = tokens.box[tokens.level == level]
        # every level covers the whole original image, edge to edge, without overlap
        area = ((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])).sum().item()
        assert area == pytest.approx(width * height, rel=1e-5)
        assert box[:, 0].min().item() == 0 and box[:, 1].min().item() == 0
        assert box[:, 2].max().item() == pytest.approx(width) and box[:, 3].max().item() == pytest.approx(height)
    fine = tokens.box[tokens.level == 0]
    h0, w0 = tokens.level_shapes[0]
    assert (h0, w0) == (rows * Q, cols * Q)
    assert torch.allclose(fine[:, 2] - fine[:, 0], torch.full((h0 * w0,), width / w0))
    assert torch.allclose(fine[:, 3] - fine[:, 1], torch.full((h0 * w0,), height / h0))
    # each level-0 token lies inside its tile's share of the image
    tile_row, tile_col = tokens.row[tokens.level == 0] // Q, tokens.col[tokens.level == 0] // Q
    assert bool((fine[:, 1] >= tile_row * height / rows - 1e-4).all())
    assert bool((fine[:, 3] <= (tile_row + 1) * height / rows + 1e-4).all())
    assert bool((fine[:, 0] >= tile_col * width / cols - 1e-4).all())
    assert bool((fine[:, 2] <= (tile_col + 1) * width / cols + 1e-4).all())
    if rows * cols > 1:  # thumbnail cells split the image into Q x Q
        top = tokens.box[tokens.level == tokens.num_levels - 1]
        assert torch.allclose(top[:, 2] - top[:, 0], torch.full((Q * Q,), width / Q))
        assert torch.allclose(top[:, 3] - top[:, 1], torch.full((Q * Q,), height / Q))


# -- one budget over tiles and thumbnail ----------------------------------------------------------------------

def test_a_quarter_budget_keeps_tiles_and_thumbnail(tiny_vlm):
    """A large smooth disc (coarse detail) beside a small noisy patch (fine detail): one choice over the
    pyramid takes thumbnail tokens for the first and tile tokens for the second."""
    _, model, processor = tiny_vlm("internvl")
    image = Image.new("RGB", (168, 56), (200, 200, 200))  # 1 x 3 tiles
    ImageDraw.Draw(image).ellipse((4, 4, 52, 52), fill=(220, 30, 30))
    pixels = np.array(image)
    pixels[16:40, 120:150] = np.random.default_rng(0).integers(0, 256, (24, 30, 3))
    image = Image.fromarray(pixels)
    for allocator in ("laplacian", "saliency"):
        for levels in (1, 2):
            vlm = PyramidVLM(model, processor, allocator=allocator, budget=0.25, levels=levels)
            encoded = vlm.encode([image])
            (selection,) = vlm.select(encoded)
            tokens = encoded.groups[0][1].tokens
            assert tokens.level_shapes[0] == (Q, 3 * Q)
            kept = tokens.level[selection.index[0, : int(selection.count[0])]]
            assert int(selection.count[0]) == -(-tokens.num_tokens // 4)
            assert bool((kept == tokens.num_levels - 1).any()) and bool((kept == 0).any()), (allocator, levels)


def test_kept_tokens_follow_the_models_order(tiny_vlm):
    """Kept level-0 tokens tile by tile (raster within a tile, not raster over the joined grid), pooled levels
    next, the thumbnail last; the language model runs on exactly those features."""
    _, model, processor = tiny_vlm("internvl")
    image, prompt = random_image(67, 101, seed=5), chat(processor)
    reference = model_tokens(model, views(processor, image))  # (7, 16, D): tiles 0..5, thumbnail
    vlm = PyramidVLM(model, processor, allocator="all", levels=2)
    tokens = vlm.encode([image]).tokens
    assert tokens.level_shapes == ((12, 8), (6, 4), (4, 4))
    keep = torch.zeros(1, tokens.num_tokens, dtype=torch.bool)
    thumb_kept, pooled_kept = [2, 9], [(0, 3), (5, 0)]
    # (row, col) in the joined 12 x 8 grid: (0, 5) lies in tile 1, (1, 0) in tile 0, (4, 1) in tile 2
    fine_kept = [(0, 5), (1, 0), (4, 1), (11, 7)]
    keep[0, thumb_kept] = True
    for r, c in pooled_kept:
        keep[0, 16 + r * 4 + c] = True
    for r, c in fine_kept:
        keep[0, 16 + 24 + r * 8 + c] = True
    selection = TokenSelection.from_keep_mask(keep)
    inputs = vlm.prepare([image], [prompt], selections=[selection])
    features = inputs.mm_encoder_outputs["image"].pooler_output[0]
    grid = rearrange(reference[:6], "(tr tc) (h w) d -> (tr h) (tc w) d", tr=3, h=Q)
    pooled = torch.nn.functional.avg_pool2d(rearrange(grid, "h w d -> d h w"), 2)
    expected = [grid[1, 0], grid[0, 5], grid[4, 1], grid[11, 7]]  # tile 0, tile 1, tile 2, tile 5
    expected += [pooled[:, r, c] for r, c in pooled_kept] + [reference[6, i] for i in thumb_kept]
    assert features.shape == (len(expected), reference.shape[-1])
    assert (features - torch.stack(expected)).abs().max().item() <= 1e-5
    with torch.no_grad():
        ours = vlm([image], [prompt], selections=[selection])
        ids = ours.input_ids
        run = BaseModelOutputWithPooling(pooler_output=torch.stack(expected)[None])
        reference_logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 mm_encoder_outputs={"image": run}).logits
    assert (ours.logits - reference_logits).abs().max().item() <= 1e-5


# -- [CLS] attention ------------------------------------------------------------------------------------------

def test_cls_attention_is_the_towers_own(tiny_vlm):
    """Each token's attention is the [CLS] row of the feature layer's eager attention, summed over the 2x2
    patches it concatenates; tiles share their view's unit mass, the thumbnail is a density per level-0 cell."""
    folder, _, processor = tiny_vlm("internvl")
    eager = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
    image = random_image(100, 60, seed=6)  # 2 rows x 3 cols of tiles
    pixel_values = views(processor, image)
    with torch.no_grad():
        out = eager.model.vision_tower(pixel_values=pixel_values, output_attentions=True, return_dict=True)
    row = out.attentions[-1].mean(1)[:, 0, 1:]  # (7, 64): [CLS] to the 8 x 8 patches, heads averaged
    per_token = rearrange(row, "v (h a w b) -> v h w (a b)", h=Q, a=2, b=2).sum(-1)  # (7, 4, 4)
    tokens = PyramidVLM(eager, processor, allocator="all").encode([image]).tokens
    attention = tokens.attention[0]
    h0, w0 = 2 * Q, 3 * Q
    expected_top = per_token[6].flatten() * Q * Q / (h0 * w0)
    assert torch.allclose(attention[:16], expected_top, atol=1e-5)
    grid = rearrange(per_token[:6] / 6, "(tr tc) h w -> (tr h) (tc w)", tr=2)
    assert torch.allclose(attention[16:], grid.flatten(), atol=1e-5)
    assert attention[16:].sum().item() == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("allocator", ["fastervlm", "visionzip"])
def test_attention_allocators_run_and_keep_their_budget(tiny_vlm, allocator):
    _, model, processor = tiny_vlm("internvl")
    vlm = PyramidVLM(model, processor, allocator=allocator, budget=10)
    images, prompts = [random_image(67, 101, seed=7), random_image(64, 64, seed=8)], [chat(processor)] * 2
    out = vlm.generate(images, prompts, max_new_tokens=2)
    assert out.counts.tolist() == [10, 10]
    inputs = vlm.prepare(images, prompts)
    assert (inputs.input_ids == model.config.image_token_id).sum(-1).tolist() == [10, 10]


# -- lazy tiles -----------------------------------------------------------------------------------------------

class ViewCounter:
    """Counts the views (tiles and thumbnails) that pass through the vision tower."""

    def __init__(self, tower) -> None:
        self.views = 0
        self.handle = tower.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs) -> None:
        values = args[0] if args else kwargs["pixel_values"]
        self.views += values.shape[0]


@pytest.mark.parametrize("size", [(67, 101), (64, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_lazy_tiles_at_full_budget_are_the_model(tiny_vlm, size):
    _, model, processor = tiny_vlm("internvl")
    vlm = PyramidVLM(model, processor, allocator="all", lazy_tiles=True)
    assert_reproduces(model, processor, vlm, [random_image(*size, seed=9)], chat(processor))


def test_lazy_tiles_match_the_eager_path_and_encode_fewer_tiles(tiny_vlm):
    _, model, processor = tiny_vlm("internvl")
    image, prompt = random_image(67, 101, seed=12), chat(processor)  # 3 x 2 tiles and a thumbnail
    eager = PyramidVLM(model, processor, allocator="laplacian", levels=2, budget=6)
    lazy = PyramidVLM(model, processor, allocator="laplacian", levels=2, budget=6, lazy_tiles=True)
    counter = ViewCounter(model.model.vision_tower)
    try:
        encoded = lazy.encode([image])
        assert counter.views == 1  # the thumbnail only
        eager_encoded = eager.encode([image])
        assert counter.views == 1 + 7
        (chosen,) = lazy.select(encoded)
        (eager_chosen,) = eager.select(eager_encoded)
        assert torch.equal(chosen.index, eager_chosen.index)  # pixel signals: the same choice
        counter.views = 0
        completed = lazy.complete(encoded, [chosen])
        needed = int(completed.groups[0][1].extras["encoded_tiles"][0])
        assert counter.views == needed and 0 < needed < 6
        lazy_out = lazy.generate(None, [prompt], encoded=completed, selections=[chosen], max_new_tokens=4)
        assert counter.views == needed  # generate does not encode them again
    finally:
        counter.handle.remove()
    eager_out = eager.generate(None, [prompt], encoded=eager_encoded, selections=[eager_chosen], max_new_tokens=4)
    assert torch.equal(lazy_out.sequences, eager_out.sequences)
    with torch.no_grad():
        a = lazy(None, [prompt], encoded=completed, selections=[chosen]).logits
        b = eager(None, [prompt], encoded=eager_encoded, selections=[eager_chosen]).logits
    assert (a - b).abs().max().item() <= 1e-5
    (flops,), (full,) = completed.vision_flops(), eager_encoded.vision_flops()
    assert flops == pytest.approx(full * (1 + needed) / 7)
    assert encoded.vision_flops()[0] == pytest.approx(full / 7)


def test_lazy_feature_allocators_choose_from_the_thumbnail(tiny_vlm):
    _, model, processor = tiny_vlm("internvl")
    tokens = PyramidVLM(model, processor, lazy_tiles=True).encode([random_image(67, 101, seed=13)]).tokens
    thumb = tokens.features[0, :16]
    # level-0 cell (r, c) of the 12 x 8 grid lies under thumbnail cell (r // 3, c // 2)
    for r, c in ((0, 0), (5, 3), (11, 7)):
        assert torch.equal(tokens.features[0, 16 + r * 8 + c], thumb[(r // 3) * Q + c // 2])


def test_needed_tiles_cover_pooled_tokens(tiny_vlm):
    _, model, processor = tiny_vlm("internvl")
    vlm = PyramidVLM(model, processor, levels=4, lazy_tiles=True)
    tokens = vlm.encode([random_image(67, 101, seed=14)]).tokens  # 3 x 2 tiles of 4 x 4 tokens
    assert tokens.level_shapes == ((12, 8), (6, 4), (3, 2), (2, 1), (4, 4))
    start = {level: int(tokens.level_slices[level].start) for level in range(5)}
    cases = {  # (level, (row, col)) -> the tiles (row-major over 3 x 2) under it
        (4, (1, 2)): [],  # a thumbnail token needs no tile
        (0, (4, 5)): [3],  # level-0 row 4, col 5: tile (1, 1)
        (1, (2, 1)): [2],  # level-0 rows 4-5, cols 2-3: tile (1, 0)
        (2, (2, 1)): [5],  # level-0 rows 8-11, cols 4-7: tile (2, 1)
        (3, (0, 0)): [0, 1, 2, 3],  # level-0 rows 0-7, cols 0-7: tiles (0, *) and (1, *)
        (3, (1, 0)): [4, 5],  # level-0 rows 8-11 (the edge cell is cut), cols 0-7: tiles (2, *)
    }
    for (level, (r, c)), expected in cases.items():
        index = start[level] + r * tokens.level_shapes[level][1] + c
        need = vlm.family.needed_tiles(tokens, torch.tensor([index]))
        assert need.nonzero().flatten().tolist() == expected, (level, r, c)


# -- errors ---------------------------------------------------------------------------------------------------

def test_unsupported_options_raise(tiny_vlm):
    folder, model, processor = tiny_vlm("internvl")
    with pytest.raises(ValueError, match="mode"):
        PyramidVLM(model, processor, mode="image")
    with pytest.raises(TypeError, match="lazy_tiles"):
        PyramidVLM(model, processor, lazy_tiles="yes")
    with pytest.raises(TypeError, match="newlines"):
        PyramidVLM(model, processor, newlines="none")
    with pytest.raises(ValueError, match="image processor"):
        PyramidVLM(model, processor.tokenizer)
    full = AutoModelForImageTextToText.from_pretrained(folder, vision_feature_select_strategy="full").eval()
    with pytest.raises(ValueError, match="'default'"):
        PyramidVLM(full, processor)


# -- the ablation runner --------------------------------------------------------------------------------------

def test_the_ablation_runner_runs_the_family(tmp_path):
    from pyrtok.eval.config import load_config
    from pyrtok.eval.runner import run

    save_tiny_vlm("internvl", tmp_path / "internvl")
    config = load_config({
        "name": "internvl", "output": str(tmp_path / "out"), "batch_size": 2,
        "models": [{"name": "internvl", "path": str(tmp_path / "internvl"), "levels": 1, "max_new_tokens": 2}],
        "allocators": ["laplacian"], "budgets": [1.0, 0.25],
        "tasks": [{"name": "shapes", "source": "shapes", "split": "test", "questions": 1000, "limit": 3,
                   "metric": "exact", "root": str(tmp_path / "data")}],
    })
    _, rows = run(config, progress=False)
    assert len(rows) == 3 * 2 and not any(r["error"] for r in rows)
    assert all(r["fraction"] == 1.0 for r in rows if r["allocator"] == "all")
    assert all(0.2 <= r["fraction"] <= 0.3 for r in rows if r["budget"] == 0.25)
    assert all(0 < r["vision_tflops"] < r["tflops"] for r in rows)
