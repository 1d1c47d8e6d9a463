"""pyrtok coverage: what the kept tokens cover of shapes scenes."""

from __future__ import annotations

import pytest
import torch
from pyrtok.eval.coverage import content_boxes, coverage, main

from pyrtok.data.shapes_vqa import make_scene
from pyrtok.tokens import TokenSelection, from_feature_grid


def _tokens(grid: int = 8, levels: int = 3, size: int = 224):
    return from_feature_grid(torch.zeros(1, grid, grid, 4), levels, image_size=(size, size))


def _keeping(tokens, picks: list[int]) -> TokenSelection:
    keep = torch.zeros(1, tokens.features.shape[1], dtype=torch.bool)
    keep[0, picks] = True
    return TokenSelection.from_keep_mask(keep)


def _finest_at(tokens, x: float, y: float) -> int:
    """The index of the finest-level token whose box holds (x, y)."""
    box, level = tokens.box, tokens.level
    inside = (level == 0) & (box[:, 0] <= x) & (x < box[:, 2]) & (box[:, 1] <= y) & (y < box[:, 3])
    return int(inside.nonzero()[0, 0])


def test_content_boxes_hold_the_drawn_things_and_scale_with_the_image():
    scene = make_scene(0, "validation", 3)
    boxes = content_boxes(scene)
    assert boxes["label"].tolist() == [list(map(float, scene.label_box))]
    assert boxes["dots"].shape == (len(scene.dots), 4) and boxes["objects"].shape == (len(scene.objects), 4)
    dot = scene.dots[0]
    assert boxes["dots"][0].tolist() == pytest.approx([dot.centre[0] - dot.size / 2, dot.centre[1] - dot.size / 2,
                                                       dot.centre[0] + dot.size / 2, dot.centre[1] + dot.size / 2])
    doubled = content_boxes(scene, (448, 448))
    assert torch.allclose(doubled["objects"], 2 * boxes["objects"])


def test_every_token_covers_everything_and_the_coarsest_level_no_fine_detail():
    scene = make_scene(0, "validation", 3)
    tokens = _tokens()
    n = tokens.features.shape[1]
    full = coverage(tokens, _keeping(tokens, list(range(n))), [scene])
    assert full.kinds == {"label": 1.0, "dots": 1.0, "objects": 1.0}
    assert full.kept == n and sum(full.levels) == pytest.approx(1.0)
    coarsest = (tokens.level == tokens.num_levels - 1).nonzero()[:, 0].tolist()
    coarse = coverage(tokens, _keeping(tokens, coarsest), [scene])
    assert coarse.kinds["label"] == 0.0 and coarse.kinds["dots"] == 0.0
    assert coarse.levels == (0.0, 0.0, 1.0)


def test_one_finest_token_on_a_dot_covers_that_dot_alone():
    scene = next(s for s in (make_scene(0, "validation", i) for i in range(50)) if len(s.dots) == 2)
    tokens = _tokens()
    first = scene.dots[0]
    result = coverage(tokens, _keeping(tokens, [_finest_at(tokens, *first.centre)]), [scene])
    near = content_boxes(scene)["dots"][1]
    token = tokens.box[_finest_at(tokens, *first.centre)]
    apart = bool(near[0] >= token[2] or near[2] <= token[0] or near[1] >= token[3] or near[3] <= token[1])
    assert result.kinds["dots"] == (0.5 if apart else 1.0)
    assert result.levels == (1.0, 0.0, 0.0) and result.kept == 1.0


def test_a_selection_of_other_images_is_refused():
    tokens = _tokens()
    with pytest.raises(ValueError, match="selection holds 1 images, scenes 2"):
        coverage(tokens, _keeping(tokens, [0]), [make_scene(0, "validation", 0)] * 2)


def test_the_command_on_the_embedded_model(capsys):
    rows = main(["--allocators", "all", "divprune", "--budgets", "1.0", "10", "--scenes", "4"])
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("| allocator | budget |")
    everything = next(r for r in rows if r["allocator"] == "all" and r["budget"] == 1.0)
    assert everything["kept"] == 261 and everything["label"] == everything["dots"] == 1.0
    divprune = next(r for r in rows if r["allocator"] == "divprune" and r["budget"] == 10)
    assert divprune["kept"] == 10 and divprune["levels"][0] == 1.0  # DivPrune keeps the finest grid's tokens


@pytest.mark.parametrize(("budget", "expected"), [("1.5", "a token count or a fraction in (0, 1]"),
                                                  ("0", "a token count must be >= 1"),
                                                  ("lots", "invalid budget value")])
def test_a_bad_budget_names_what_is_expected(capsys, budget, expected):
    with pytest.raises(SystemExit):
        main(["--allocators", "all", "--budgets", budget])
    err = capsys.readouterr().err
    assert "--budgets" in err and expected in err
