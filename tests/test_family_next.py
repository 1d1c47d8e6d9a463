"""LLaVA-NeXT and LLaVA-OneVision against references built without pyrtok's code path.

Tiny random-weight models are saved with their own processors (:func:`pyrtok.testing.save_tiny_vlm`). The
references are the unwrapped model run through its processor, or the model's own packed image features
(``get_image_features``: base view, then rows ended by ``image_newline``) subset by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_reproduces, chat, random_image
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from pyrtok.testing import save_tiny_vlm
from pyrtok.tokens import TokenSelection
from pyrtok.vlm import PyramidVLM

FAMILIES = ("llava_next", "llava_onevision")
SIZES = ((70, 100), (100, 60), (130, 60))  # PIL (width, height): 3x2 tiles, 2x3 tiles, 2x3 tiles unpadded


def packed(model, processor, image) -> torch.Tensor:
    """The model's own packed features of one image: (p*p + h0 * (w0 + 1), D)."""
    inputs = processor.image_processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
    return out.pooler_output[0]


# -- full budget is the unwrapped model ----------------------------------------------------------------------

@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_reproduces_the_unwrapped_model(tiny_vlm, family, size, lazy):
    _, model, processor = tiny_vlm(family)
    vlm = PyramidVLM(model, processor, allocator="all", levels=1, lazy_tiles=lazy)
    image = random_image(*size, seed=size[0])
    assert_reproduces(model, processor, vlm, [image], chat(processor))
    tokens = vlm.encode([image]).tokens
    rows, cols = vlm.family.tile_grid(tokens.image_size)
    expected_grid = {(70, 100): (3, 2), (100, 60): (2, 3), (130, 60): (2, 3)}[size]
    assert (rows, cols) == expected_grid
    assert tokens.level_shapes[-1] == (4, 4) and tokens.image_size == (size[1], size[0])
    if size == (130, 60):  # on the 64x96 canvas the image fills 5 of 8 feature rows: one padded row cut each side
        assert tokens.level_shapes[0] == (6, 12)
    else:
        assert tokens.level_shapes[0] == (rows * 4, cols * 4)


def test_feature_layer_lists_and_onevision_shrinking(tiny_vlm):
    """vision_feature_layer as a list (concatenated layers) and OneVision's anyres_max_N shrinking."""
    folder, _, processor = tiny_vlm("llava_next")
    model = AutoModelForImageTextToText.from_pretrained(folder, vision_feature_layer=[-2, -1],
                                                        ignore_mismatched_sizes=True).eval()
    assert model.config.vision_feature_layer == [-2, -1]
    vlm = PyramidVLM(model, processor, allocator="all")
    assert_reproduces(model, processor, vlm, [random_image(70, 100, seed=1)], chat(processor))

    folder, _, _ = tiny_vlm("llava_onevision")
    model = AutoModelForImageTextToText.from_pretrained(folder, vision_aspect_ratio="anyres_max_2").eval()
    processor = AutoProcessor.from_pretrained(folder)
    processor.vision_aspect_ratio = "anyres_max_2"
    image = random_image(70, 100, seed=2)
    for lazy in (False, True):
        vlm = PyramidVLM(model, processor, allocator="all", lazy_tiles=lazy)
        assert_reproduces(model, processor, vlm, [image], chat(processor))
    tokens = vlm.encode([image]).tokens
    assert tokens.level_shapes[0] == (6, 4)  # 12x8 shrunk by sqrt(96 / (2 * 16))
    # lazy, a few shrunk tokens: the tiles they read give their exact features
    eager = PyramidVLM(model, processor, allocator="all")
    keep = torch.zeros(1, tokens.num_tokens, dtype=torch.bool)
    keep[0, [16 + 0, 16 + 2 * 4 + 1, 16 + 23]] = True
    selection = TokenSelection.from_keep_mask(keep)
    lazy_inputs = vlm.prepare([image], [chat(processor)], selections=[selection])
    eager_inputs = eager.prepare([image], [chat(processor)], selections=[selection])
    for a, b in zip(lazy_inputs.mm_encoder_outputs["image"].pooler_output,
                    eager_inputs.mm_encoder_outputs["image"].pooler_output, strict=True):
        assert (a - b).abs().max().item() <= 1e-6


# -- layout under a budget ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["kept_rows", "all_rows", "none"])
@pytest.mark.parametrize("family", FAMILIES)
def test_newline_rules_against_the_models_own_packing(tiny_vlm, family, rule):
    _, model, processor = tiny_vlm(family)
    image, prompt = random_image(70, 100, seed=7), chat(processor)
    reference_features = packed(model, processor, image)  # 16 base, then 12 rows of 8 tokens + a newline
    vlm = PyramidVLM(model, processor, allocator="all", newlines=rule)
    tokens = vlm.encode([image]).tokens
    assert tokens.level_shapes == ((12, 8), (4, 4))
    keep = torch.zeros(1, tokens.num_tokens, dtype=torch.bool)
    base_kept, fine_kept = [1, 6], [(0, 0), (0, 5), (3, 2), (11, 7)]  # rows 0, 3, 11 keep tokens
    keep[0, base_kept] = True
    for r, c in fine_kept:
        keep[0, 16 + r * 8 + c] = True
    positions = list(base_kept)
    for row in range(12):
        cols = [c for r, c in fine_kept if r == row]
        positions += [16 + row * 9 + c for c in cols]
        if rule == "all_rows" or (rule == "kept_rows" and cols):
            positions.append(16 + row * 9 + 8)
    expected = reference_features[positions]
    with torch.no_grad():
        ours = vlm([image], [prompt], selections=[TokenSelection.from_keep_mask(keep)])
    inputs = vlm.prepare([image], [prompt], selections=[TokenSelection.from_keep_mask(keep)])
    features = inputs.mm_encoder_outputs["image"].pooler_output[0]
    assert features.shape == expected.shape
    assert (features - expected).abs().max().item() <= 1e-6
    assert ours.counts.tolist() == [len(positions)]
    # the language model on exactly those features, 1-D positions consecutive
    ids = ours.input_ids
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                          mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=(expected,))}).logits
    assert (ours.logits - reference).abs().max().item() <= 1e-5


def test_a_quarter_budget_on_a_wide_image_keeps_base_and_tiles(tiny_vlm):
    """A large smooth disc (coarse detail) beside a small noisy patch (fine detail): one choice over the
    pyramid takes base-view tokens for the first and tile tokens for the second."""
    _, model, processor = tiny_vlm("llava_next")
    image = Image.new("RGB", (130, 60), (200, 200, 200))
    ImageDraw.Draw(image).ellipse((5, 5, 55, 55), fill=(220, 30, 30))
    pixels = np.array(image)
    pixels[20:40, 90:120] = np.random.default_rng(0).integers(0, 256, (20, 30, 3))
    image = Image.fromarray(pixels)
    for allocator in ("laplacian", "saliency"):
        for levels in (1, 2):
            vlm = PyramidVLM(model, processor, allocator=allocator, budget=0.25, levels=levels)
            encoded = vlm.encode([image])
            (selection,) = vlm.select(encoded)
            tokens = encoded.groups[0][1].tokens
            kept = tokens.level[selection.index[0, : int(selection.count[0])]]
            assert int(selection.count[0]) == -(-tokens.num_tokens // 4)
            assert bool((kept == tokens.num_levels - 1).any()) and bool((kept == 0).any())


# -- batches --------------------------------------------------------------------------------------------------

# -- lazy tiles -----------------------------------------------------------------------------------------------

class TileCounter:
    """Counts the views (base views and tiles) that pass through a vision tower."""

    def __init__(self, tower) -> None:
        self.views = 0
        self.handle = tower.register_forward_pre_hook(self)

    def __call__(self, module, args) -> None:
        self.views += args[0].shape[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_lazy_tiles_match_the_eager_path_and_encode_fewer_tiles(tiny_vlm, family):
    _, model, processor = tiny_vlm(family)
    image, prompt = random_image(70, 100, seed=12), chat(processor)  # 3x2 tiles
    eager = PyramidVLM(model, processor, allocator="laplacian", levels=1, budget=6)
    lazy = PyramidVLM(model, processor, allocator="laplacian", levels=1, budget=6, lazy_tiles=True)
    counter = TileCounter(model.model.vision_tower)
    try:
        encoded = lazy.encode([image])
        assert counter.views == 1  # the base view only
        eager_encoded = eager.encode([image])
        assert counter.views == 1 + 7
        (chosen,) = lazy.select(encoded)
        (eager_chosen,) = eager.select(eager_encoded)
        assert torch.equal(chosen.index, eager_chosen.index)  # pixel signals: the same choice
        counter.views = 0
        completed = lazy.complete(encoded, [chosen])  # the deferred step: the tiles the kept tokens read
        needed = int(completed.groups[0][1].extras["encoded_tiles"][0])
        assert counter.views == needed and 0 < needed < 6
        lazy_out = lazy.generate(None, [prompt], encoded=completed, selections=[chosen], max_new_tokens=4)
        assert counter.views == needed  # generate does not encode them again
        assert lazy.complete(completed, [chosen]) is completed
    finally:
        counter.handle.remove()
    eager_out = eager.generate(None, [prompt], encoded=eager_encoded, selections=[eager_chosen], max_new_tokens=4)
    assert torch.equal(lazy_out.sequences, eager_out.sequences)
    with torch.no_grad():
        a = lazy(None, [prompt], encoded=encoded, selections=[chosen]).logits
        b = eager(None, [prompt], encoded=eager_encoded, selections=[eager_chosen]).logits
    assert (a - b).abs().max().item() <= 1e-5
    (flops,), (full,) = completed.vision_flops(), eager.complete(eager_encoded, [eager_chosen]).vision_flops()
    assert flops == pytest.approx(full * (1 + needed) / 7)
    assert encoded.vision_flops()[0] == pytest.approx(full / 7)  # before the deferred step: the base view only
    # a sub-batch (the runner's one-by-one retry of a failed batch) still works
    one = encoded.subset([0])
    assert torch.equal(lazy.generate(None, [prompt], encoded=one, selections=[chosen], max_new_tokens=4).sequences,
                       lazy_out.sequences)


def test_lazy_feature_allocators_choose_from_the_base_view(tiny_vlm):
    _, model, processor = tiny_vlm("llava_next")
    image = random_image(70, 100, seed=13)
    vlm = PyramidVLM(model, processor, allocator="all", levels=1, lazy_tiles=True)
    tokens = vlm.encode([image]).tokens
    base = tokens.features[0, :16]
    # fine cell (r, c) of the 12x8 grid lies under base cell (r // 3, c // 2)
    for r, c in ((0, 0), (5, 3), (11, 7)):
        assert torch.equal(tokens.features[0, 16 + r * 8 + c], base[(r // 3) * 4 + c // 2])


# lazy tiles encode exactly the tiles the kept tokens read: image sizes (H, W), two fixed (a 45 x 147 image, both
# ways: box edges such as 49 px * 12 / 147 land a hair below a tile boundary) and random ones; OneVision configs
# that shrink (anyres_max_1, anyres_max_3) and one that does not (LLaVA-NeXT)
READ_SIZES = ((147, 45), (45, 147), *((int(h), int(w)) for h, w in np.random.default_rng(3).integers(16, 200, (14, 2))))
READ_CONFIGS = (("llava_next", None), ("llava_onevision", "anyres_max_1"), ("llava_onevision", "anyres_max_3"))


def shrinking(tiny_vlm, family, ratio):
    """The tiny model of ``family``, loaded with OneVision's ``vision_aspect_ratio=ratio`` when given."""
    folder, model, processor = tiny_vlm(family)
    if ratio is None:
        return model, processor
    model = AutoModelForImageTextToText.from_pretrained(folder, vision_aspect_ratio=ratio).eval()
    processor = AutoProcessor.from_pretrained(folder)
    processor.vision_aspect_ratio = ratio
    return model, processor


def tile_reads(model, tokens, rows: int, cols: int, levels: int, ratio) -> torch.Tensor:
    """(N, T) bool: the tiles each token's eager features depend on. Built without pyrtok's tile code: the model's
    own packing (``pack_image_features``: join, unpad, OneVision's shrink) of indicator features (tile t is 1 in
    channel t, everything else 0; bilinear weights are >= 0, so a cell depends on tile t exactly when its channel
    t is > 0), then pooled into the token pyramid as the eager path pools; base-view tokens read no tile."""
    from pyrtok.tokens import from_feature_grid

    tiles, p = rows * cols, int(model.config.vision_config.image_size // model.config.vision_config.patch_size)
    indicator = torch.zeros(1 + tiles, p * p, tiles)
    indicator[1:] = torch.eye(tiles)[:, None, :]
    sizes = torch.tensor([list(tokens.image_size)])
    with torch.no_grad():
        if ratio is None:
            packed, _ = model.model.pack_image_features([indicator], sizes, "default", image_newline=None)
        else:
            packed, _ = model.model.pack_image_features([indicator], sizes, image_newline=None,
                                                        vision_aspect_ratio=ratio)
    h0, w0 = tokens.level_shapes[0]
    assert packed[0].shape[0] == p * p + h0 * w0
    pyramid = from_feature_grid(packed[0][p * p:].reshape(1, h0, w0, tiles), levels)
    return torch.cat([torch.zeros(p * p, tiles), pyramid.features[0]]) > 0


@pytest.mark.parametrize(("family", "ratio"), READ_CONFIGS, ids=lambda v: str(v))
def test_lazy_tiles_are_exactly_the_tiles_the_kept_tokens_read(tiny_vlm, family, ratio):
    model, processor = shrinking(tiny_vlm, family, ratio)
    rng = np.random.default_rng(4)
    shrunk = 0
    for levels in (1, 2):
        vlm = PyramidVLM(model, processor, allocator="all", levels=levels, lazy_tiles=True)
        for height, width in READ_SIZES:
            tokens = vlm.encode([random_image(width, height)]).tokens
            rows, cols = vlm.family.tile_grid(tokens.image_size)
            reads = tile_reads(model, tokens, rows, cols, levels, ratio)
            grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
            # unpadding cuts one axis of the joined tile grid; only OneVision's shrink cuts both
            shrunk += tokens.level_shapes[0][0] < rows * grid and tokens.level_shapes[0][1] < cols * grid
            for k in range(tokens.num_tokens):  # every single-token placement: none extra, none missing
                need = vlm.family.needed_tiles(tokens, torch.tensor([k]))
                assert torch.equal(need, reads[k]), ((height, width), levels, k, need.nonzero(), reads[k].nonzero())
            for _ in range(4):
                index = torch.tensor(sorted(rng.choice(tokens.num_tokens, int(rng.integers(2, 12)), replace=False)))
                assert torch.equal(vlm.family.needed_tiles(tokens, index), reads[index].any(0))
    assert (shrunk > 0) == (ratio is not None)


@pytest.mark.parametrize(("family", "ratio"), READ_CONFIGS, ids=lambda v: str(v))
def test_lazy_tiles_encode_what_is_read_and_give_the_eager_features(tiny_vlm, family, ratio):
    model, processor = shrinking(tiny_vlm, family, ratio)
    rng = np.random.default_rng(5)
    counter = TileCounter(model.model.vision_tower)
    try:
        for levels, (height, width) in zip((1, 2, 2), READ_SIZES[:3], strict=True):
            image = random_image(width, height, seed=height)
            eager = PyramidVLM(model, processor, allocator="all", levels=levels)
            lazy = PyramidVLM(model, processor, allocator="all", levels=levels, lazy_tiles=True)
            encoded = lazy.encode([image])
            tokens = encoded.groups[0][1].tokens
            assert tokens.embeddings is tokens.features  # already the language model's inputs
            reads = tile_reads(model, tokens, *lazy.family.tile_grid(tokens.image_size), levels, ratio)
            for count in (1, 3, 9):
                keep = torch.zeros(1, tokens.num_tokens, dtype=torch.bool)
                keep[0, rng.choice(tokens.num_tokens, count, replace=False)] = True
                selection = TokenSelection.from_keep_mask(keep)
                expected = int(reads[keep[0]].any(0).sum())
                counter.views = 0
                completed = lazy.complete(encoded, [selection])
                assert counter.views == expected == int(completed.groups[0][1].extras["encoded_tiles"][0])
                ours = lazy.prepare(None, [chat(processor)], encoded=completed, selections=[selection])
                theirs = eager.prepare([image], [chat(processor)], selections=[selection])
                a = ours.mm_encoder_outputs["image"].pooler_output[0]
                b = theirs.mm_encoder_outputs["image"].pooler_output[0]
                assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-6
    finally:
        counter.handle.remove()


# -- errors ---------------------------------------------------------------------------------------------------

def test_unsupported_options_and_strategies_raise(tiny_vlm):
    folder, model, processor = tiny_vlm("llava_next")
    with pytest.raises(ValueError, match="newlines"):
        PyramidVLM(model, processor, newlines="sometimes")
    with pytest.raises(ValueError, match="mode"):
        PyramidVLM(model, processor, mode="image")
    with pytest.raises(TypeError, match="lazy_tiles"):
        PyramidVLM(model, processor, lazy_tiles="yes")
    with pytest.raises(ValueError, match="image processor"):
        PyramidVLM(model, processor.tokenizer)
    full = AutoModelForImageTextToText.from_pretrained(folder, vision_feature_select_strategy="full").eval()
    with pytest.raises(ValueError, match="'full' keeps the \\[CLS\\]"):
        PyramidVLM(full, processor)
    bogus = AutoModelForImageTextToText.from_pretrained(folder).eval()
    vars(bogus.config)["vision_feature_select_strategy"] = "cls_patch"  # past the config's own validation
    with pytest.raises(ValueError, match="vision_feature_select_strategy must be one of"):
        PyramidVLM(bogus, processor)
    folder, _, processor = tiny_vlm("llava_onevision")
    default = AutoModelForImageTextToText.from_pretrained(folder, vision_feature_select_strategy="default").eval()
    with pytest.raises(ValueError, match="has none"):
        PyramidVLM(default, processor)


# -- the ablation runner --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_the_ablation_runner_runs_the_family(tmp_path, family):
    from pyrtok.eval.config import load_config
    from pyrtok.eval.report import write_report
    from pyrtok.eval.runner import run

    save_tiny_vlm(family, tmp_path / family)
    config = load_config({
        "name": family, "output": str(tmp_path / "out"), "batch_size": 2,
        "models": [{"name": family, "path": str(tmp_path / family), "levels": 1, "max_new_tokens": 2}],
        "allocators": ["laplacian"], "budgets": [1.0, 0.25],
        "tasks": [{"name": "shapes", "source": "shapes", "split": "test", "questions": 1000, "limit": 3,
                   "metric": "exact", "root": str(tmp_path / "data")}],
    })
    _, rows = run(config, progress=False)
    assert len(rows) == 3 * 2 and not any(r["error"] for r in rows)
    full = [r for r in rows if r["allocator"] == "all"]
    # tokens are placeholders, newlines included (one per tile row); the fraction counts the kept tokens only
    assert all(r["fraction"] == 1.0 for r in full)
    assert all(0.2 <= r["fraction"] <= 0.3 for r in rows if r["budget"] == 0.25)
    assert all(0 < r["vision_tflops"] < r["tflops"] for r in rows)
    report = write_report(rows, {"shapes": "exact"}, tmp_path / "report")
    assert "| vision FLOPs |" in report["report"].read_text()


@pytest.mark.parametrize("family", FAMILIES)
def test_visionzip_merged_tokens_follow_the_rows_and_keep_the_budget(tiny_vlm, family):
    """VisionZip on the tile pyramid (``views="joint"``; its authors' own view-by-view rule is checked in
    ``test_published_vision.py``): kept + merged tokens make the budget exactly; the prompt holds those and the
    newline rule's newlines, the merged tokens (in the language model's space) after the last row."""
    _, model, processor = tiny_vlm(family)
    image, prompt, budget = random_image(70, 100, seed=21), chat(processor), 20
    for rule in ("kept_rows", "all_rows", "none"):
        vlm = PyramidVLM(model, processor, allocator="visionzip", budget=budget, levels=2, newlines=rule,
                         views="joint")
        encoded = vlm.encode([image])
        (selection,) = vlm.select(encoded)
        tokens = encoded.groups[0][1].tokens
        assert tokens.attention is not None and tokens.attention.shape == (1, tokens.num_tokens)
        merged = int(selection.merged_count[0])
        assert merged > 0 and int(selection.total[0]) == budget
        kept = selection.index[0, : int(selection.count[0])]
        rows_kept = len(set(tokens.row[kept[tokens.level[kept] == 0]].tolist()))
        newlines = {"kept_rows": rows_kept, "all_rows": tokens.level_shapes[0][0], "none": 0}[rule]
        inputs = vlm.prepare(None, [prompt], encoded=encoded, selections=[selection])
        placeholders = int((inputs.input_ids == model.config.image_token_id).sum())
        assert placeholders == budget + newlines == int(inputs.counts[0])
        features = inputs.mm_encoder_outputs["image"].pooler_output[0]
        assert features.shape[0] == placeholders
        assert torch.equal(features[-merged:], selection.merged.features[0, :merged].to(features))
        if newlines:  # the last row's newline comes right before the merged tokens
            assert torch.equal(features[-merged - 1], model.model.image_newline.to(features))
        with torch.no_grad():
            out = vlm.generate(None, [prompt], encoded=encoded, selections=[selection], max_new_tokens=2)
        assert out.counts.tolist() == [placeholders]


def test_an_ablation_passes_family_options_and_lazy_tiles_save_vision_flops(tmp_path):
    from pyrtok.eval.config import load_config
    from pyrtok.eval.runner import fingerprint, run

    save_tiny_vlm("llava_next", tmp_path / "next")

    def config(options, name="next"):
        return load_config({
            "name": "lazy", "output": str(tmp_path / "out"), "batch_size": 2,
            "models": [{"name": name, "path": str(tmp_path / "next"), "levels": 1, "max_new_tokens": 2,
                        "options": options}],
            "allocators": ["all", "laplacian"], "budgets": [1.0, 0.25, 0.1],
            "tasks": [{"name": "shapes", "source": "shapes", "split": "test", "questions": 1000, "limit": 3,
                       "metric": "exact", "root": str(tmp_path / "data")}],
        })

    for bad, error, match in (({"newlines": "sometimes"}, ValueError, "newlines must be one of"),
                              ({"lazy": True}, TypeError, "unexpected keyword argument 'lazy'"),
                              ({"levels": 2}, ValueError, "cannot set \\['levels'\\]")):
        with pytest.raises(error, match=match) as raised:
            config(bad, name="bad")
        assert "models[bad].options" in str(raised.value)
    assert not (tmp_path / "out").exists()
    lazy = config({"lazy_tiles": True, "newlines": "none"})
    eager = config({})
    assert lazy.models[0].options == {"lazy_tiles": True, "newlines": "none"}
    assert fingerprint(lazy, lazy.models[0], lazy.tasks[0], "laplacian") != \
        fingerprint(eager, eager.models[0], eager.tasks[0], "laplacian")
    _, rows = run(lazy, progress=False)
    assert rows and not any(r["error"] for r in rows)
    full = {r["id"]: r for r in rows if r["allocator"] == "all"}
    pruned = [r for r in rows if r["allocator"] != "all"]
    assert {r["allocator"] for r in pruned} == {"coarse", "laplacian"} and len(full) == 3
    for r in pruned:  # only the tiles under kept tokens reach the tower: never more than the full row's
        assert 0 < r["vision_tflops"] <= full[r["id"]]["vision_tflops"]
    full_mean = np.mean([r["vision_tflops"] for r in full.values()])
    for cell in {(r["allocator"], r["budget"]) for r in pruned}:  # and fewer on average in every pruned cell
        assert np.mean([r["vision_tflops"] for r in pruned if (r["allocator"], r["budget"]) == cell]) < full_mean
    # `all` below the full budget keeps the coarsest tokens first: the base view, then the top tile row
    assert all(r["vision_tflops"] < full[r["id"]]["vision_tflops"] for r in pruned if r["allocator"] == "coarse")
    # no newlines: a row's count is exactly its kept tokens
    assert all(r["fraction"] == 1.0 for r in full.values())
    assert all(abs(r["fraction"] - r["budget"]) < 0.02 for r in pruned)
    saved = load_config(tmp_path / "out" / "config.yaml")
    assert saved.models[0].options == {"lazy_tiles": True, "newlines": "none"}
