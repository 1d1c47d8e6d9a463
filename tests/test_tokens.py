import pytest
import torch

from pyrtok.tokens import MultiScaleTokens, TokenSelection, from_feature_grid, gather, selection_boxes


def test_feature_pyramid_layout_is_canonical():
    grid = torch.rand(2, 5, 7, 3)
    tokens = from_feature_grid(grid, 3, patch_size=14)
    assert tokens.level_shapes == ((5, 7), (3, 4), (2, 2))
    assert tokens.num_tokens == 35 + 12 + 4 and tokens.image_size == (70, 98)
    # Coarsest level first, raster order inside a level.
    assert tokens.level.tolist() == [2] * 4 + [1] * 12 + [0] * 35
    level0 = tokens.level_slices[0]
    assert tokens.row[level0].tolist() == [r for r in range(5) for _ in range(7)]
    assert tokens.col[level0].tolist() == list(range(7)) * 5
    assert torch.equal(tokens.features[:, level0], grid.reshape(2, 35, 3))


def test_odd_grids_average_the_cells_they_cover():
    grid = torch.arange(9.0).reshape(1, 3, 3, 1)
    tokens = from_feature_grid(grid, 2)
    coarse = tokens.features[0, tokens.level_slices[1], 0]
    assert coarse.tolist() == [(0 + 1 + 3 + 4) / 4, (2 + 5) / 2, (6 + 7) / 2, 8.0]


def test_boxes_are_level0_pixels_clipped_to_the_image():
    tokens = from_feature_grid(torch.rand(1, 3, 3, 2), 2, patch_size=10)
    level1 = tokens.box[tokens.level_slices[1]]
    assert level1.tolist() == [[0, 0, 20, 20], [20, 0, 30, 20], [0, 20, 20, 30], [20, 20, 30, 30]]
    assert tokens.box[tokens.level_slices[0]][4].tolist() == [10, 10, 20, 20]


def test_parent_of_each_token_contains_its_centre():
    tokens = from_feature_grid(torch.rand(1, 6, 5, 2), 3, patch_size=4)
    parent = tokens.parent
    top = tokens.level == 2
    assert bool((parent[top] == -1).all())
    child, par = ~top, parent[~top]
    assert bool((tokens.level[par] == tokens.level[child] + 1).all())
    centre = (tokens.box[child, :2] + tokens.box[child, 2:]) / 2
    box = tokens.box[par]
    assert bool(((centre >= box[:, :2]) & (centre <= box[:, 2:])).all())


def test_attention_is_pooled_as_a_mean_and_cls_is_kept():
    attention = torch.rand(2, 4, 4)
    tokens = from_feature_grid(torch.rand(2, 4, 4, 3), 2, attention=attention, cls=torch.rand(2, 3))
    assert tokens.cls.shape == (2, 1, 3)
    coarse = tokens.attention[:, tokens.level_slices[1]]
    assert torch.allclose(coarse[:, 0], attention[:, :2, :2].mean((1, 2)))


def test_selection_from_keep_mask_gather_and_boxes():
    tokens = from_feature_grid(torch.rand(2, 4, 4, 3), 2, patch_size=8)
    keep = torch.zeros(2, tokens.num_tokens, dtype=torch.bool)
    keep[0, [1, 5, 9]] = True
    keep[1, [0, 19]] = True
    selection = TokenSelection.from_keep_mask(keep)
    assert selection.index.tolist() == [[1, 5, 9], [0, 19, 0]]
    assert selection.mask.tolist() == [[True, True, True], [True, True, False]]
    assert selection.count.tolist() == [3, 2]
    assert torch.equal(selection.keep_mask(tokens.num_tokens), keep)
    features, mask = gather(tokens, selection)
    assert torch.equal(features[0, 1], tokens.features[0, 5])
    assert torch.equal(features[1, 2], torch.zeros(3)) and not mask[1, 2]
    boxes = selection_boxes(tokens, selection)
    assert torch.equal(boxes[1, 1], tokens.box[19]) and torch.equal(boxes[1, 2], torch.zeros(4))


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match=r"\(B, h, w, D\)"):
        from_feature_grid(torch.rand(4, 4, 3), 2)
    with pytest.raises(ValueError, match=r"levels must be an int in \[1, 3\]"):
        from_feature_grid(torch.rand(1, 4, 4, 3), 4)
    with pytest.raises(TypeError, match="floating"):
        from_feature_grid(torch.ones(1, 4, 4, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="attention must have shape"):
        from_feature_grid(torch.rand(1, 4, 4, 3), 2, attention=torch.rand(1, 3, 3))
    tokens = from_feature_grid(torch.rand(1, 4, 4, 3), 2)
    with pytest.raises(ValueError, match="features has 19 tokens"):
        MultiScaleTokens(torch.rand(1, 19, 3), tokens.level, tokens.row, tokens.col, tokens.box,
                         ((4, 4), (2, 2)), (4, 4))
    with pytest.raises(ValueError, match="keep must be a"):
        TokenSelection.from_keep_mask(torch.ones(3, 4))
    other = TokenSelection.from_keep_mask(torch.ones(2, tokens.num_tokens, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch size"):
        gather(tokens, other)


def test_copies_keep_the_layout():
    tokens = from_feature_grid(torch.rand(1, 4, 4, 3), 2, attention=torch.rand(1, 4, 4))
    wider = tokens.with_features(torch.rand(1, tokens.num_tokens, 7))
    assert wider.dim == 7 and torch.equal(wider.box, tokens.box) and wider.attention is tokens.attention
    moved = tokens.to("cpu")
    assert torch.equal(moved.features, tokens.features) and moved.level_shapes == tokens.level_shapes
    with pytest.raises(ValueError, match="features has"):
        tokens.with_features(torch.rand(1, 3, 7))


def test_embeddings_follow_the_tokens_through_every_copy():
    grid, lm = torch.rand(3, 4, 4, 2), torch.rand(3, 4, 4, 5)
    tokens = from_feature_grid(grid, 2, embeddings=lm)
    assert tokens.embeddings.shape == (3, 20, 5)
    level0, level1 = tokens.level_slices
    assert torch.equal(tokens.embeddings[:, level0], lm.reshape(3, 16, 5))
    assert torch.allclose(tokens.embeddings[:, level1.start], lm[:, :2, :2].mean((1, 2)))  # pooled like features
    assert from_feature_grid(grid, 2).embeddings is None
    own = from_feature_grid(grid, 2, embeddings=grid)  # features that are their own embeddings: one tensor
    assert own.embeddings is own.features
    for copy in (own.select_images([0, 2]), own.to("cpu"), own.select_images(slice(1, 2))):
        assert copy.embeddings is copy.features
    picked = tokens.select_images(torch.tensor([2, 0]))
    assert torch.equal(picked.embeddings, tokens.embeddings[[2, 0]])
    assert torch.equal(tokens.to("cpu").embeddings, tokens.embeddings)
    wider = tokens.with_features(torch.rand(3, 20, 7))  # another view of the features; the LM's inputs stay
    assert wider.embeddings is tokens.embeddings
    assert tokens.with_embeddings(None).embeddings is None
    with pytest.raises(ValueError, match=r"embeddings must have shape \(B, N, D_lm\) with \(B, N\) = \(3, 20\)"):
        tokens.with_embeddings(torch.rand(3, 19, 5))
    with pytest.raises(TypeError, match="embeddings must be a"):
        tokens.with_embeddings([1.0])
    with pytest.raises(ValueError, match=r"embeddings must have shape \(3, 4, 4\)"):
        from_feature_grid(grid, 2, embeddings=torch.rand(3, 4, 5, 5))
