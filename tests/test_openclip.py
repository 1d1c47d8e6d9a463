"""OpenCLIP towers built from configs: exact features, resized positions, [CLS] attention, text queries, loading."""

import json

import open_clip
import pytest
import torch
from open_clip.model import resize_pos_embed
from open_clip.transformer import VisionTransformer

from pyrtok import allocators
from pyrtok.encoders import ClipQueryEncoder, MultiScaleEncoder, OpenClipTower, create_openclip

VISION = dict(width=32, layers=3, heads=2, mlp_ratio=2.0, patch_size=16)
VISION_CFG = dict(image_size=64, width=32, layers=3, head_width=16, mlp_ratio=2.0, patch_size=16)  # = VISION
TEXT_CFG = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)


def _visual(image_size: int = 64) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(image_size=image_size, output_dim=16, **VISION).eval()


def _clip() -> open_clip.CLIP:
    torch.manual_seed(0)
    return open_clip.CLIP(embed_dim=16, vision_cfg=VISION_CFG, text_cfg=TEXT_CFG).eval()


@pytest.mark.parametrize("layer", [-1, -2])
def test_feature_mode_level0_is_the_towers_own_block_output(layer):
    visual = _visual()
    encoder = MultiScaleEncoder(visual, levels=3, feature_layer=layer)
    images = torch.rand(2, 3, 64, 64)
    tokens = encoder(images)
    with torch.no_grad():
        reference = visual.forward_intermediates(encoder.normalise(images), indices=[VISION["layers"] + layer],
                                                 output_fmt="NLC", intermediates_only=True,
                                                 output_extra_tokens=True)
    assert tokens.level_shapes == ((4, 4), (2, 2), (1, 1))
    assert torch.allclose(tokens.features[:, tokens.level_slices[0]], reference["image_intermediates"][0], atol=1e-6)
    assert torch.allclose(tokens.cls[:, 0], reference["image_intermediates_prefix"][0][:, 0], atol=1e-6)


def test_smaller_levels_use_the_position_grid_open_clip_resizes_to():
    visual = _visual(64)
    tower = OpenClipTower(visual)
    # The same weights loaded into a 32-pixel model: OpenCLIP resizes the position grid on load.
    state = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    resize_pos_embed(state, type("Holder", (), {"visual": _visual(32)})())
    small = _visual(32)
    small.load_state_dict({k.removeprefix("visual."): v for k, v in state.items()})
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = tower.hidden_states(pixels)[-1]
        reference = small.forward_intermediates(pixels, indices=[2], output_fmt="NLC", intermediates_only=True,
                                                output_extra_tokens=True)
    assert torch.allclose(ours[:, 1:], reference["image_intermediates"][0], atol=1e-5)

    tokens = MultiScaleEncoder(visual, mode="image", levels=3)(torch.rand(1, 3, 64, 64))
    assert tokens.level_shapes == ((4, 4), (2, 2), (1, 1)) and tokens.cls.shape == (1, 3, 32)


def test_cls_attention_row_equals_the_blocks_attention_weights():
    visual = _visual()
    tower = OpenClipTower(visual)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        states = tower.hidden_states(pixels)
        block = visual.transformer.resblocks[1]
        x = block.ln_1(states[1])
        _, weights = block.attn(x, x, x, need_weights=True, average_attn_weights=True)
        ours = tower.attention_row(states, 2)
    assert torch.allclose(ours, weights[:, 0, 1:], atol=1e-6)
    assert tower.attention_row(states, 0) is None

    tokens = MultiScaleEncoder(visual, levels=2, feature_layer=-1)(torch.rand(2, 3, 64, 64))
    assert tokens.attention.shape == (2, 20)
    assert allocators.create("cls_attention")(tokens, 5).count.tolist() == [5, 5]


def test_custom_attention_blocks_encode_without_attention():
    torch.manual_seed(0)
    visual = VisionTransformer(image_size=64, output_dim=16, qk_norm=True, **VISION).eval()
    tokens = MultiScaleEncoder(visual, levels=2)(torch.rand(1, 3, 64, 64))
    assert tokens.attention is None and tokens.features.shape == (1, 20, 32)


def test_query_encoder_shares_the_models_joint_space():
    clip = _clip()
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=TEXT_CFG["context_length"])
    query = ClipQueryEncoder(clip, tokenizer)
    texts = query.encode(["a red car", "blue sky"])
    with torch.no_grad():
        reference = clip.encode_text(tokenizer(["a red car", "blue sky"]), normalize=True)
    assert texts.shape == (2, 16) and torch.allclose(texts, reference, atol=1e-6)

    images = torch.rand(2, 3, 64, 64)
    encoder = MultiScaleEncoder(clip, levels=2, feature_layer=-1)
    tokens = encoder(images)
    with torch.no_grad():  # the [CLS] state projected token-wise is the model's own image embedding
        assert torch.allclose(query.project(tokens.cls[:, 0]), clip.encode_image(encoder.normalise(images)),
                              atol=1e-5)
    projected = query.project_tokens(tokens)
    assert projected.dim == 16
    assert allocators.create("query")(projected, 6, query=texts).count.tolist() == [6, 6]
    with pytest.raises(ValueError, match="hidden size 32"):
        query.project(torch.rand(2, 16))
    with pytest.raises(TypeError, match="OpenCLIP CLIP model"):
        ClipQueryEncoder(clip.visual, tokenizer)


def test_create_openclip_from_a_config_and_a_local_checkpoint(tmp_path):
    config = tmp_path / "pyrtok-tiny-vit.json"
    config.write_text(json.dumps({"embed_dim": 16, "vision_cfg": VISION_CFG, "text_cfg": TEXT_CFG}))
    open_clip.add_model_config(config)
    model, tokenizer = create_openclip("pyrtok-tiny-vit")
    checkpoint = tmp_path / "weights.pt"
    torch.save(model.state_dict(), checkpoint)
    loaded, _ = create_openclip("pyrtok-tiny-vit", pretrained=str(checkpoint))
    assert not loaded.training
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert tokenizer(["a red car"]).shape == (1, TEXT_CFG["context_length"])
    tokens = MultiScaleEncoder(loaded, levels=3)(torch.rand(1, 3, 80, 80))  # resized to the tower's 64
    assert tokens.level_shapes == ((4, 4), (2, 2), (1, 1))


def test_bad_towers_are_refused_by_name():
    with pytest.raises(TypeError, match="OpenCLIP VisionTransformer"):
        OpenClipTower(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="feature layer must be in"):
        MultiScaleEncoder(_visual(), feature_layer=4)
