"""Encoders on towers built from configs: CLIP, SigLIP, CLIPModel (text queries), local from_pretrained."""

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from pyrtok import allocators
from pyrtok.embedded import word_tokenizer
from pyrtok.encoders import ClipQueryEncoder, MultiScaleEncoder

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
             patch_size=16)


def test_feature_mode_level0_is_the_tower_output():
    tower = CLIPVisionModel(CLIPVisionConfig(**TOWER)).eval()
    images = torch.rand(2, 3, 64, 64)
    encoder = MultiScaleEncoder(tower, levels=3, feature_layer=-1)
    tokens = encoder(images)
    with torch.no_grad():
        reference = tower(encoder.normalise(images)).last_hidden_state[:, 1:]
    assert torch.allclose(tokens.features[:, tokens.level_slices[0]], reference, atol=1e-6)
    assert tokens.cls.shape == (2, 1, 32) and tokens.attention.shape == (2, 21)
    coarse = tokens.features[:, tokens.level_slices[2]]
    assert torch.allclose(coarse[:, 0], reference.mean(1), atol=1e-5)


def test_image_mode_encodes_each_gaussian_level_at_its_own_size():
    tower = CLIPVisionModel(CLIPVisionConfig(**TOWER)).eval()
    encoder = MultiScaleEncoder(tower, mode="image", levels=3, image_size=0)
    tokens = encoder(torch.rand(1, 3, 130, 96))  # rounded to 128 x 96
    assert tokens.image_size == (128, 96)
    assert tokens.level_shapes == ((8, 6), (4, 3), (2, 2))
    level2 = tokens.box[tokens.level_slices[2]]
    assert level2[-1].tolist() == pytest.approx([48.0, 64.0, 96.0, 128.0])
    assert tokens.cls.shape == (1, 3, 32)
    # Attention is rescaled to a density per level-0 patch; undoing that gives each pass's attention to
    # its patches, which sums to at most 1 ([CLS] also attends to itself).
    sizes = tokens.level_sizes
    for level, s in enumerate(tokens.level_slices):
        per_pass = tokens.attention[0, s].sum() * sizes[0] / sizes[level]
        assert 0 < per_pass <= 1 + 1e-5


def test_siglip_tower_has_no_cls_but_a_probe_attention():
    tower = SiglipVisionModel(SiglipVisionConfig(**TOWER)).eval()
    tokens = MultiScaleEncoder(tower, levels=2, feature_layer=-1)(torch.rand(2, 3, 64, 64))
    assert tokens.cls is None
    assert tokens.attention.shape == (2, 20)
    assert torch.allclose(tokens.attention[:, tokens.level_slices[0]].sum(1), torch.ones(2), atol=1e-5)
    with torch.no_grad():  # the probe attends to the normalised last layer, as the head does in the model
        encoder = MultiScaleEncoder(tower)
        last = tower(encoder.normalise(encoder.prepare(torch.rand(2, 3, 64, 64))), output_hidden_states=True)
        head = tower.head
        _, reference = head.attention(head.probe.expand(2, -1, -1), last.last_hidden_state, last.last_hidden_state)
        ours = encoder.tower.attention_row(last.hidden_states, -1)
    assert torch.allclose(ours, reference[:, 0], atol=1e-6)
    selection = allocators.create("cls_attention")(tokens, 5)
    assert selection.count.tolist() == [5, 5]


def test_clip_query_encoder_and_local_from_pretrained(tmp_path):
    tokenizer = word_tokenizer("a red car blue sky dog".split())
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=len(tokenizer), bos_token_id=2, eos_token_id=3, pad_token_id=0),
        vision_config=TOWER, projection_dim=16,
    )
    CLIPModel(config).save_pretrained(tmp_path)
    clip = CLIPModel.from_pretrained(tmp_path).eval()
    query = ClipQueryEncoder(clip, tokenizer)
    texts = query.encode(["a red car", "blue sky"])
    assert texts.shape == (2, 16) and torch.allclose(texts.norm(dim=-1), torch.ones(2), atol=1e-5)
    tokens = query.project_tokens(MultiScaleEncoder(clip, levels=2, feature_layer=-1)(torch.rand(2, 3, 64, 64)))
    assert tokens.dim == 16
    selection = allocators.create("query")(tokens, 6, query=texts)
    assert selection.count.tolist() == [6, 6]
    with pytest.raises(ValueError, match="non-empty list"):
        query.encode("a red car")
    with pytest.raises(TypeError, match="CLIPModel"):
        ClipQueryEncoder(clip.vision_model, tokenizer)


def test_llava_next_tower_is_found():
    from transformers import LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**TOWER),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                vocab_size=50),
        image_token_id=40, image_grid_pinpoints=[[64, 64], [64, 128]],
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    tokens = MultiScaleEncoder(model, levels=2)(torch.rand(1, 3, 64, 64))
    assert tokens.level_shapes == ((4, 4), (2, 2)) and tokens.dim == 32
