"""PyramidVLM on a tiny LLaVA built from a config: exactness against the unwrapped model, batching, budgets."""

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from pyrtok.embedded import word_tokenizer
from pyrtok.encoders import MultiScaleEncoder
from pyrtok.vlm import PyramidVLM

WORDS = "user assistant what colour is the square circle red green blue ? : . a of shape big small".split()
PROMPTS = ["USER: <image> what colour is the square? ASSISTANT:", "USER: <image> what shape? ASSISTANT:"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tokenizer = word_tokenizer(WORDS)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=2, image_size=64, patch_size=16),
        text_config=LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=2,
                                eos_token_id=3, max_position_embeddings=256),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
    )
    model = LlavaForConditionalGeneration(config).eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return model, tokenizer, images


def reference_inputs(vlm, tokenizer, images, prompts):
    """The unwrapped model's inputs, built without the adapter: <image> repeated 16 times (4x4 patches)."""
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        at = ids.index(image_id)
        rows.append(ids[:at] + [image_id] * 16 + ids[at + 1 :])
    assert len({len(r) for r in rows}) == 1
    input_ids = torch.tensor(rows)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    return input_ids, torch.ones_like(input_ids), (images - mean) / std


def test_all_tokens_reproduce_the_unwrapped_model(tiny):
    model, tokenizer, images = tiny
    vlm = PyramidVLM(model, tokenizer, allocator="all", levels=1)
    input_ids, attention_mask, pixels = reference_inputs(vlm, tokenizer, images[:1], PROMPTS[:1])
    with torch.no_grad():
        reference = model(input_ids=input_ids, pixel_values=pixels, attention_mask=attention_mask).logits
        ours = vlm(images[:1], PROMPTS[:1])
    assert torch.equal(ours.input_ids, input_ids)
    assert (ours.logits - reference).abs().max().item() <= 1e-5
    generated = model.generate(input_ids=input_ids, pixel_values=pixels, attention_mask=attention_mask,
                               max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = vlm.generate(images[:1], PROMPTS[:1], max_new_tokens=6)
    assert torch.equal(out.sequences, generated[:, input_ids.shape[1]:])
    assert out.counts.tolist() == [16]


def test_batched_generation_equals_one_by_one(tiny):
    model, tokenizer, images = tiny
    vlm = PyramidVLM(model, tokenizer, allocator="pool", levels=2)
    budget = torch.tensor([3, 20])  # different K per sample: left padding
    batched = vlm.generate(images, PROMPTS, budget=budget, max_new_tokens=5)
    assert batched.counts.tolist() == [3, 20]
    for b in range(2):
        single = vlm.generate(images[b : b + 1], PROMPTS[b : b + 1], budget=int(budget[b]), max_new_tokens=5)
        assert single.sequences[0].tolist() == batched.sequences[b, : single.sequences.shape[1]].tolist()
    with torch.no_grad():
        logits = vlm(images, PROMPTS, budget=budget).logits
        alone = vlm(images[1:], PROMPTS[1:], budget=20).logits
    assert (logits[1, -alone.shape[1]:] - alone[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("budget", [1, 20, 100])
def test_extreme_budgets_and_image_mode(tiny, budget):
    model, tokenizer, images = tiny
    vlm = PyramidVLM(model, tokenizer, allocator="laplacian", mode="image", levels=2)
    out = vlm.generate(images, PROMPTS, budget=budget, max_new_tokens=3)
    assert out.counts.tolist() == [min(budget, 20)] * 2
    assert out.sequences.shape[0] == 2 and len(out.texts) == 2


def test_loss_with_labels(tiny):
    model, tokenizer, images = tiny
    vlm = PyramidVLM(model, tokenizer, allocator="saliency", budget=6, levels=2)
    inputs = vlm.prepare(images, PROMPTS)
    labels = inputs.input_ids.masked_fill(inputs.input_ids == vlm.image_token_id, -100)
    out = vlm(images, PROMPTS, labels=labels)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad is not None
    model.zero_grad()


def test_forward_on_precomputed_tokens_and_selection_equals_forward_from_images(tiny):
    model, tokenizer, images = tiny
    vlm = PyramidVLM(model, tokenizer, allocator="random", levels=2)
    budget = torch.tensor([5, 12])

    def labels(input_ids):  # a loss on the text after the image only: positions depend on the kept counts
        after = (input_ids == vlm.image_token_id).cumsum(-1) == (input_ids == vlm.image_token_id).sum(-1, True)
        return input_ids.masked_fill(~after | (input_ids == vlm.image_token_id), -100)

    with torch.no_grad():
        direct = vlm(images, PROMPTS, labels=labels, budget=budget, generator=torch.Generator().manual_seed(3))
        encoded = vlm.encode(images)
        selections = vlm.select(encoded, budget, generator=torch.Generator().manual_seed(3))
        shared = vlm(None, PROMPTS, labels=labels, encoded=encoded, selections=selections)
        fixed = vlm(None, PROMPTS, labels=labels(direct.input_ids), encoded=encoded, selections=selections)
        other = vlm(None, PROMPTS, budget=budget, generator=torch.Generator().manual_seed(4), encoded=encoded)
    assert direct.counts.tolist() == shared.counts.tolist() == [5, 12]
    assert torch.equal(direct.input_ids, shared.input_ids) and torch.equal(direct.logits, shared.logits)
    assert torch.isfinite(direct.loss) and torch.equal(direct.loss, shared.loss)
    assert torch.equal(fixed.loss, direct.loss)  # a labels function is the labels it returns
    assert not torch.equal(other.logits, direct.logits)  # another random selection: the selection was used
    with pytest.raises(ValueError, match="prompts must be a list of 2 strings"):
        vlm(None, PROMPTS[:1], encoded=encoded)
    with pytest.raises(ValueError, match=r"selections\[0\] holds 2 images but its group has 1"):
        vlm(None, PROMPTS[:1], encoded=encoded.subset([0]), selections=selections)


def test_from_pretrained_on_a_saved_folder(tiny, tmp_path):
    model, tokenizer, images = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text("allocator: {name: query, context: 0.25}\nbudget: 5\nlevels: 2\n")
    vlm = PyramidVLM.from_pretrained(tmp_path, config=config)
    assert vlm.allocator.name == "query" and vlm.budget == 5 and vlm.encoder.levels == 2
    out = vlm.generate(images, PROMPTS, query=torch.randn(2, 32), max_new_tokens=2)
    assert out.counts.tolist() == [5, 5]
    override = PyramidVLM.from_pretrained(tmp_path, allocator="random", budget=7, levels=1, config=config)
    assert override.allocator.name == "random" and override.budget == 7 and override.encoder.levels == 1


def test_wrapping_leaves_the_model_untouched(tiny):
    model, tokenizer, images = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attn = model.config._attn_implementation
    PyramidVLM(model, tokenizer, allocator="random", budget=4).generate(images, PROMPTS, max_new_tokens=2)
    assert model.config._attn_implementation == attn
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_inputs_get_clear_errors(tiny):
    model, tokenizer, images = tiny
    vlm = PyramidVLM(model, tokenizer)
    with pytest.raises(ValueError, match="once per image"):
        vlm.generate(images[:1], ["no placeholder here"])
    with pytest.raises(TypeError, match="integer dtype"):  # a float tensor is not silently truncated
        vlm.generate(images, PROMPTS, budget=torch.tensor([0.5, 1.7]))
    with pytest.raises(ValueError, match="list of 2 strings"):
        vlm.generate(images, PROMPTS[:1])
    with pytest.raises(ValueError, match=r"images must be a \(B, 3, H, W\)"):
        vlm.generate(images[0], PROMPTS[:1])
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        PyramidVLM(model.model.vision_tower, tokenizer)
    with pytest.raises(ValueError, match=r"allocator must be a registered allocator .*got 'best'"):
        PyramidVLM(model, tokenizer, allocator="best")
    with pytest.raises(ValueError, match=r"allocator must be a registered allocator .*got 'best'"):
        PyramidVLM.from_pretrained("no/such-model", allocator="best")  # before anything loads


def test_encoder_modes_and_attention_capture(tiny):
    model, _, images = tiny
    tower = model.model.vision_tower
    feature = MultiScaleEncoder(model, mode="feature", levels=3, feature_layer=-1)(images)
    assert feature.level_shapes == ((4, 4), (2, 2), (1, 1))
    with torch.no_grad():
        pixels = MultiScaleEncoder(model).normalise(images)
        eager = type(tower)(tower.config)
        eager.load_state_dict(tower.state_dict())
        eager.config._attn_implementation = "eager"
        reference = eager(pixels, output_attentions=True).attentions[-1].mean(1)[:, 0, 1:]
    assert torch.allclose(feature.attention[:, feature.level_slices[0]], reference, atol=1e-6)
    image_mode = MultiScaleEncoder(model, mode="image", levels=2)(images)
    assert image_mode.level_shapes == ((4, 4), (2, 2)) and image_mode.cls.shape == (2, 2, 32)
    with pytest.raises(ValueError, match="feature layer"):
        MultiScaleEncoder(model, feature_layer=9)
    with pytest.raises(ValueError, match="mode"):
        MultiScaleEncoder(model, mode="tiles")


def test_shipped_models_load_by_name(monkeypatch):
    """``embedded`` / ``embedded-llava`` name the shipped LLaVA and ``embedded-qwen`` the shipped Qwen2.5-VL wherever
    a model path is taken; unknown names and missing folders get errors that say what exists and how to make it."""
    from pyrtok.eval.config import ModelSpec

    from pyrtok.embedded.models import EMBEDDED_MODELS, embedded_model, resolve_model

    folder = embedded_model()
    assert resolve_model("embedded") == resolve_model("embedded-llava") == str(folder)
    assert resolve_model("some/hub-id") == "some/hub-id"
    assert ModelSpec("m", "embedded").resolved_path == str(folder)
    vlm = PyramidVLM.from_pretrained("embedded-llava", levels=3)
    assert type(vlm.model).__name__ == "LlavaForConditionalGeneration"
    assert resolve_model("embedded-qwen") == str(folder.parent / "tiny_qwen")
    assert type(PyramidVLM.from_pretrained("embedded-qwen", levels=3).model).__name__ == \
        "Qwen2_5_VLForConditionalGeneration"
    with pytest.raises(ValueError, match=r"embedded model must be one of \['embedded', 'embedded-llava'"):
        embedded_model("embedded-gpt")
    for name, (asset, _) in EMBEDDED_MODELS.items():
        assert embedded_model(name) == folder.parent / asset
    # a model missing from an install says how to make it
    monkeypatch.setitem(EMBEDDED_MODELS, "embedded-gone", ("no_such_model", "configs/embedded/gone.yaml"))
    with pytest.raises(FileNotFoundError, match=r"pyrtok train-vlm --config configs/embedded/gone\.yaml"):
        embedded_model("embedded-gone")
