"""HF ViTMAE with LapLoss: the loss from one forward against a reference built by hand, and ``pyrtok pretrain``
training a ``ViTMAEForPreTraining`` (``model.type: vitmae``), resuming exactly and saving its encoder."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel

from pyrtok.losses import LapLoss, lap_loss
from pyrtok.pretrain.train import build_model, load_config, train
from pyrtok.pretrain.vitmae import HFMaskedAutoencoder, vitmae_lap_loss

TINY = {"seed": 3,
        "model": {"type": "vitmae", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 1,
                  "num_heads": 2, "intermediate_size": 64, "decoder_dim": 32, "decoder_depth": 1,
                  "decoder_heads": 2, "mask_ratio": 0.75},
        "loss": {"pixel": 0.0, "lap": 1.0, "norm_pix": False, "lap_levels": 3},
        "data": {"samples": ["astronaut", "chelsea"], "shapes": 4, "crop_scale": [0.5, 1.0]},
        "train": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 2,
                  "image_every": 100}}


def tiny_vitmae(norm_pix: bool) -> ViTMAEForPreTraining:
    torch.manual_seed(0)
    config = ViTMAEConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          image_size=32, patch_size=8, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                          decoder_num_attention_heads=2, decoder_intermediate_size=64, norm_pix_loss=norm_pix)
    return ViTMAEForPreTraining(config).eval()


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("composite", [False, True])
def test_the_loss_is_the_unpatchified_prediction_against_the_input_by_hand(norm_pix, composite):
    model = tiny_vitmae(norm_pix)
    g = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(2, 3, 32, 32, generator=g)
    outputs = model(pixel_values=pixel_values, noise=torch.rand(2, 16, generator=g))
    logits = outputs.logits
    if norm_pix:  # HF's targets are per-patch normalised: back to the input's units with each target patch
        target = model.patchify(pixel_values)
        logits = logits * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    image = model.unpatchify(logits, (32, 32))
    hidden = outputs.mask.reshape(2, 4, 4).repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None].float()
    if composite:
        image = torch.where(hidden.bool(), image, pixel_values)
    reference = lap_loss(image, pixel_values, levels=4, mask=hidden)
    ours = vitmae_lap_loss(model, pixel_values, outputs, composite=composite)
    assert abs(ours.item() - reference.item()) <= 1e-6
    glo = vitmae_lap_loss(model, pixel_values, outputs, composite=composite, preset="glo")
    assert abs(glo.item() - LapLoss.from_preset("glo")(image, pixel_values, hidden).item()) <= 1e-6


def test_the_wrapper_takes_a_mask_and_draws_one_from_the_generator():
    model = build_model(load_config(None, TINY))
    assert isinstance(model, HFMaskedAutoencoder) and model.patch_size == 8
    images = torch.rand(2, 3, 32, 32)
    first = model(images, generator=torch.Generator().manual_seed(5))
    again = model(images, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first.mask, again.mask) and int(first.mask[0].sum()) == 12
    given = model(images, mask=first.mask)
    assert torch.equal(given.mask, first.mask) and torch.allclose(given.loss, first.loss)
    with pytest.raises(ValueError, match="mask must hide 12 of 16 patches"):
        model(images, mask=torch.zeros(2, 16, dtype=torch.bool))
    with pytest.raises(TypeError, match="ViTMAEForPreTraining"):
        HFMaskedAutoencoder(torch.nn.Linear(2, 2))


def test_pretrain_trains_a_vitmae_resumes_exactly_and_saves_its_encoder(tmp_path):
    whole = load_config(None, {**TINY, "train": {**TINY["train"], "output": str(tmp_path / "whole")}})
    train(whole, progress=False)
    sliced = load_config(None, {**TINY, "train": {**TINY["train"], "output": str(tmp_path / "sliced")}})
    train(sliced, progress=False, stop_after=2)
    train(sliced, progress=False)
    logs = [[json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
            for name in ("whole", "sliced")]
    assert [row["step"] for row in logs[1]] == [1, 2, 3, 4]
    assert [row["loss"] for row in logs[1]] == pytest.approx([row["loss"] for row in logs[0]], abs=1e-6)
    encoder = ViTMAEModel.from_pretrained(tmp_path / "sliced" / "encoder")
    reference = ViTMAEModel.from_pretrained(tmp_path / "whole" / "encoder")
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(encoder.parameters(), reference.parameters(),
                                                                 strict=True))
    assert encoder.config.hidden_size == 32


def test_an_older_run_without_model_type_resumes(tmp_path):
    """A run saved before ``model.type`` existed resumes without --allow-config-change: the key takes its
    default, which is what that run used."""
    import yaml

    from pyrtok._training import saved_config_changes

    config = load_config(None, {"train": {"output": str(tmp_path)}})
    old = json.loads(json.dumps(config))
    del old["model"]["type"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert saved_config_changes(tmp_path / "config.yaml", config, defaults=load_config()) == []
    assert saved_config_changes(tmp_path / "config.yaml", config) == ['model.type ((absent) -> "clip")']


def test_the_encoder_loads_into_a_vit_tower(tmp_path):
    """The saved ViTMAEModel becomes a plain ViTModel with its weights and no masking; pyrtok's encoder takes it,
    and its [CLS] attention is the tower's own (the eager attention maps, heads averaged)."""
    from pyrtok.encoders import MultiScaleEncoder
    from pyrtok.pretrain.vitmae import vit_encoder

    model = tiny_vitmae(norm_pix=False)
    model.vit.save_pretrained(tmp_path / "encoder")
    vit = vit_encoder(tmp_path / "encoder")
    assert type(vit).__name__ == "ViTModel"
    source = dict(model.vit.state_dict())
    assert all(torch.equal(value, source[name]) for name, value in vit.state_dict().items())
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    encoder = MultiScaleEncoder(vit, levels=2, feature_layer=-1)
    tokens = encoder(images)
    assert tokens.level_shapes == ((4, 4), (2, 2)) and tokens.keys.shape == (2, 20, 16)
    vit.config._attn_implementation = "eager"
    with torch.no_grad():
        pixels = encoder.normalise(images)
        out = vit(pixels, output_attentions=True, output_hidden_states=True)
    expected = out.attentions[-1][:, :, 0, 1:].mean(1)
    assert torch.allclose(tokens.attention[:, tokens.level_slices[0]], expected, atol=1e-6)
    assert torch.allclose(tokens.features[:, tokens.level_slices[0]], out.hidden_states[-1][:, 1:], atol=1e-6)
    with pytest.raises(TypeError, match="must hold a ViTMAEModel"):
        vit_encoder(torch.nn.Linear(2, 2))
