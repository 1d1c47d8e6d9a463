"""MAE pretraining: model, objectives, data, a tiny end-to-end run with exact resume, and evaluation."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from pyrtok.pretrain import ImagePool, MaskedAutoencoder, Objective, patchify, unpatchify
from pyrtok.pretrain.data import random_resized_crop, step_generator
from pyrtok.pretrain.evaluate import evaluate_run, held_out_images, masked_psnr, ssim_map
from pyrtok.pretrain.objectives import mask_image
from pyrtok.pretrain.train import load_config, main, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"
TINY = {
    "model": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
              "intermediate_size": 64, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
    "data": {"samples": ["astronaut", "chelsea"], "shapes": 2},
    "train": {"steps": 4, "batch_size": 2, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 2,
              "image_every": 2},
}


def tiny_config(tmp_path, **loss):
    overrides = {**TINY, "train": {**TINY["train"], "output": str(tmp_path)}}
    if loss:
        overrides["loss"] = loss
    return load_config(CONFIGS / "mae_mix.yaml", overrides)


def tiny_mae():
    torch.manual_seed(0)
    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=32, patch_size=8))
    return MaskedAutoencoder(encoder, decoder_dim=32, decoder_depth=1, decoder_heads=2)


def test_patchify_round_trip_and_mask_image():
    images = torch.rand(2, 3, 32, 48)
    patches = patchify(images, 8)
    assert patches.shape == (2, 24, 192)
    assert torch.equal(patches[0, 1], images[0, :, :8, 8:16].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify(patches, 8, 32, 48), images)
    mask = torch.zeros(2, 24, dtype=torch.bool)
    mask[:, 1] = True
    pixels = mask_image(mask, 8, 32, 48)
    assert pixels.shape == (2, 1, 32, 48) and pixels.sum() == 2 * 64 and pixels[0, 0, :8, 8:16].all()


def test_mae_hides_exactly_the_ratio_and_only_visible_patches_reach_the_encoder():
    mae = tiny_mae()
    images = torch.rand(3, 3, 32, 32)
    out = mae(images, generator=torch.Generator().manual_seed(0))
    assert out.pred.shape == (3, 16, 192) and out.mask.sum(1).tolist() == [12, 12, 12]
    # Changing a hidden patch leaves the prediction untouched: the encoder never saw it.
    hidden = int(out.mask[0].nonzero()[0])
    changed = images.clone()
    row, col = divmod(hidden, 4)
    changed[0, :, row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] = 1.0
    again = mae(changed, mask=out.mask)
    assert torch.allclose(again.pred, mae(images, mask=out.mask).pred, atol=1e-6)
    with pytest.raises(ValueError, match="same number"):
        bad = out.mask.clone()
        bad[0, int((~bad[0]).nonzero()[0])] = True
        mae(images, mask=bad)
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 32, 32\)"):
        mae(torch.rand(1, 3, 16, 16))


def test_the_model_owns_its_loss():
    mae = tiny_mae()
    images = torch.rand(2, 3, 32, 32)
    out = mae(images, generator=torch.Generator().manual_seed(0))
    expected = Objective()(out.pred, out.mask, images, 8)  # the default: MAE's normalised-pixel MSE
    assert out.loss.dim() == 0 and torch.equal(out.loss, expected["loss"]) and set(out.losses) == {"loss", "pixel"}
    out.loss.backward()
    assert mae.decoder_pred.weight.grad is not None
    assert mae.encoder.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    lap = MaskedAutoencoder(mae.encoder, decoder_dim=32, decoder_depth=1, decoder_heads=2,
                            objective=Objective(pixel=0.5, lap=1.0, norm_pix=False))
    mixed = lap(images, generator=torch.Generator().manual_seed(0))
    assert set(mixed.losses) == {"loss", "pixel", "lap"}
    assert torch.allclose(mixed.loss, 0.5 * mixed.losses["pixel"] + mixed.losses["lap"])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the loss stays in float32 under autocast
        assert lap(images, generator=torch.Generator().manual_seed(0)).loss.dtype == torch.float32


@pytest.mark.parametrize("loss", [dict(pixel=1.0, lap=0.0, norm_pix=True), dict(pixel=1.0, lap=0.0, norm_pix=False),
                                  dict(pixel=0.0, lap=1.0, norm_pix=False), dict(pixel=1.0, lap=0.5),
                                  dict(pixel=0.0, lap=1.0, norm_pix=False, lap_composite=True,
                                       lap_weights=[4.0, 2.0, 1.0, 1.0])])
def test_objectives_are_zero_for_a_perfect_prediction_and_count_hidden_patches_only(loss):
    images = torch.rand(2, 3, 32, 32)
    objective = Objective(**loss)
    target = patchify(images, 8)
    if objective.norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :8] = True
    perfect = objective(target, mask, images, 8)
    assert perfect["loss"].item() == pytest.approx(0.0, abs=1e-5)
    wrong_visible = target.clone()
    wrong_visible[:, 8:] += 1.0  # errors on visible patches only
    assert objective(wrong_visible, mask, images, 8)["loss"].item() < 0.35 * objective(
        target + 1.0, mask, images, 8)["loss"].item() + 1e-6
    assert objective(target + 0.3, mask, images, 8)["loss"].item() > 0.01
    if objective.lap_composite:  # visible pixels come from the input: their errors cost nothing at all
        assert objective(wrong_visible, mask, images, 8)["loss"].item() == pytest.approx(0.0, abs=1e-6)


def test_lap_weights_and_composite_options():
    images = torch.rand(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::2] = True
    pred = patchify(images, 8) + 0.2 * torch.randn(2, 16, 192)
    fine = Objective(pixel=0.0, lap=1.0, norm_pix=False, lap_weights=[1.0, 0.0, 0.0, 0.0])
    coarse = Objective(pixel=0.0, lap=1.0, norm_pix=False, lap_weights=[0.0, 0.0, 0.0, 1.0])
    assert fine(pred, mask, images, 8)["lap"].item() != pytest.approx(coarse(pred, mask, images, 8)["lap"].item())
    # the composite sees the true visible pixels, so a hidden patch's band coefficients differ at the seams
    alone = Objective(pixel=0.0, lap=1.0, norm_pix=False)(pred, mask, images, 8)["lap"]
    pasted = Objective(pixel=0.0, lap=1.0, norm_pix=False, lap_composite=True)(pred, mask, images, 8)["lap"]
    assert alone.item() != pytest.approx(pasted.item(), rel=1e-3)
    with pytest.raises(ValueError, match="lap_weights"):
        Objective(pixel=0.0, lap=1.0, lap_levels=4, lap_weights=[1.0, 1.0])


def test_data_is_deterministic_per_step_and_rank(tmp_path, monkeypatch):
    pool = ImagePool(samples=["astronaut", "chelsea"])
    a = pool.batch(4, 32, seed=0, step=5)
    assert a.shape == (4, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, pool.batch(4, 32, seed=0, step=5))
    assert not torch.equal(a, pool.batch(4, 32, seed=0, step=6))
    assert not torch.equal(a, pool.batch(4, 32, seed=0, step=5, rank=1))
    crop = random_resized_crop(torch.rand(3, 50, 80), 16, step_generator(0, 0), scale=(1.0, 1.0), ratio=(1.6, 1.6))
    assert crop.shape == (3, 16, 16)
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    folder_pool = ImagePool(samples=[], folders=[tmp_path])
    assert len(folder_pool) == 1 and folder_pool.batch(1, 8, 0, 0)[0, 0].mean() > 0.7
    with pytest.raises(FileNotFoundError):
        ImagePool(samples=[], folders=[tmp_path / "missing"])
    (tmp_path / "broken.png").write_bytes((tmp_path / "red.png").read_bytes()[:60])  # truncated
    # Pillow's own default: lmms-eval's task module, imported by other tests, sets this flag process-wide
    monkeypatch.setattr("PIL.ImageFile.LOAD_TRUNCATED_IMAGES", False)
    with pytest.raises(ValueError, match=r"image file '.*broken\.png'"):
        ImagePool(samples=[], folders=[tmp_path])
    (tmp_path / "broken.png").unlink()
    with pytest.raises(ValueError, match="empty"):
        ImagePool(samples=[])


def test_pool_adds_benchmark_scenes_and_packaged_grey_photographs():
    from pyrtok.data.shapes_vqa import make_scene

    pool = ImagePool(samples=["aero"], shapes=2, seed=3)
    assert len(pool) == 3
    aero = pool.images[0]
    assert aero.shape == (3, 512, 512) and torch.equal(aero[0], aero[2]) and aero.std() > 0.1
    scene = torch.from_numpy(np.asarray(make_scene(3, "train", 1).image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    assert torch.equal(pool.images[2], scene)
    with pytest.raises(ValueError, match="shapes must be an int >= 0"):
        ImagePool(samples=[], shapes=-1)


def test_training_resumes_exactly_and_writes_everything(tmp_path):
    straight = train(tiny_config(tmp_path / "straight"), progress=False)
    sliced_config = tiny_config(tmp_path / "sliced")
    train(sliced_config, progress=False, stop_after=3)  # interrupted after step 3 (checkpoint at 3)
    assert (tmp_path / "sliced/checkpoints/latest").read_text() == "step-0000003"
    assert not (tmp_path / "sliced/encoder").exists()
    with (tmp_path / "sliced/log.jsonl").open("a") as f:  # logged after the checkpoint, lost in a crash
        f.write(json.dumps({"step": 4, "loss": -1.0}) + "\n")
    sliced = train(sliced_config, progress=False)
    a = load_file(str(straight / "checkpoints/step-0000004/model.safetensors"))
    b = load_file(str(sliced / "checkpoints/step-0000004/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4] and {"loss", "pixel", "lap"} <= set(log[0])
    resumed = [json.loads(line) for line in (sliced / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in resumed] == [1, 2, 3, 4] and resumed[3]["loss"] == pytest.approx(log[3]["loss"])
    assert all(row["seconds"] > 0 for row in log + resumed)  # wall time since the previous row
    assert (straight / "images/step-0000002.png").stat().st_size > 0
    assert sorted(p.name for p in (straight / "checkpoints").glob("step-*")) == ["step-0000002", "step-0000004"]
    # The pretrained encoder initialises a LLaVA vision tower with the same config, unchanged.
    encoder = CLIPVisionModel.from_pretrained(straight / "encoder")
    llava = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=encoder.config, image_token_id=5,
        text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                vocab_size=16)))
    llava.model.vision_tower.load_state_dict(encoder.state_dict())
    assert torch.equal(llava.model.vision_tower.embeddings.patch_embedding.weight,
                       encoder.embeddings.patch_embedding.weight)


def test_cli_and_evaluation(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    import yaml

    config.write_text(yaml.safe_dump({**TINY, "loss": {"pixel": 0.0, "lap": 1.0, "norm_pix": False}}))
    main(["--config", str(config), "--steps", "2", "--output", str(tmp_path / "run"),
          "--set", "train.log_every=2", "--set", "data.crop_scale=[0.5, 1.0]"])
    assert "pyrtok pretrain: finished 2 steps" in capsys.readouterr().out
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["train"]["log_every"] == 2 and written["data"]["crop_scale"] == [0.5, 1.0]
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2]  # the first step is logged at once, then every log_every
    for bad in (["train.steps"], ["train..steps=3"], ["train.log_every=1", "train.log_every.x=2"]):
        with pytest.raises(SystemExit):  # malformed: argparse names --set and exits
            main(["--config", str(config), *[a for item in bad for a in ("--set", item)]])
    with pytest.raises(ValueError, match="unknown config key 'trian'"):
        main(["--config", str(config), "--set", "trian.steps=1"])
    images = held_out_images(4, 32)
    row = evaluate_run(tmp_path / "run", images)
    assert row["steps"] == 2 and row["loss"] == "1*lap"
    assert 0 < row["psnr"] < 60 and -1 <= row["ssim"] <= 1 and row["band0"] > 0
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(None, {"trian": {}})


def test_image_quality_metrics():
    x = torch.rand(2, 3, 32, 32)
    mask = torch.ones(2, 1, 32, 32)
    assert torch.allclose(ssim_map(x, x), torch.ones(2, 1, 32, 32), atol=1e-4)
    g = torch.Generator().manual_seed(0)
    slightly, very = ((x + s * torch.randn(x.shape, generator=g)).clamp(0, 1) for s in (0.05, 0.3))
    assert 1 > ssim_map(x, slightly).mean() > ssim_map(x, very).mean()
    noisy = slightly
    mse = (noisy - x).square().mean((1, 2, 3))
    assert torch.allclose(masked_psnr(noisy, x, mask), 10 * torch.log10(1 / mse), atol=1e-4)


def test_two_processes_with_torchrun(tmp_path):
    """The same training script as 2 CPU processes (DDP over gloo), launched by torchrun."""
    import subprocess
    import sys

    import yaml

    config = tmp_path / "tiny.yaml"
    settings = {**TINY, "train": {**TINY["train"], "steps": 4, "warmup_steps": 2, "output": str(tmp_path / "ddp")}}
    config.write_text(yaml.safe_dump(settings))
    from conftest import free_port

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), "-m", "pyrtok.pretrain.train", "--config", str(config)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4]  # written once, by the main process
    assert (tmp_path / "ddp" / "encoder" / "config.json").is_file()
    # The schedule advances once per step, exactly as in a single process.
    single = train(load_config(config, {"train": {"output": str(tmp_path / "single")}}), progress=False)
    single_log = [json.loads(line) for line in (single / "log.jsonl").read_text().splitlines()]
    assert [row["lr"] for row in log] == pytest.approx([row["lr"] for row in single_log])
    saved = {p.name for p in (tmp_path / "ddp" / "checkpoints" / "step-0000004").iterdir()}
    assert {"model.safetensors", "random_states_0.pkl", "random_states_1.pkl", "step.json"} <= saved


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_pretrain_config_loads_and_builds_its_objective(path):
    config = load_config(path)
    assert Path(config["train"]["output"]).name == path.stem
    Objective(**config["loss"])


def test_stop_resume_and_a_changed_config_through_the_command_line(tmp_path, capsys):
    import yaml

    from pyrtok.cli import main as pyrtok

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "log_every": 3,
                                                        "output": str(tmp_path / "run")}}))
    run = ["pretrain", "--config", str(config)]
    pyrtok([*run, "--stop-after", "2"])
    out = capsys.readouterr().out
    assert "finished" not in out and "resuming" not in out
    assert f"pyrtok pretrain: stopped at step 2 of 4 (resume with: pyrtok pretrain --config {config} " \
           f"--stop-after 2)" in out
    # a changed config is refused in one line that names the keys, before anything is touched
    before = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(SystemExit) as exit:
        pyrtok([*run, "--set", "train.lr=0.01", "--steps", "6"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(err) == 1 and err[0].startswith("pyrtok pretrain: ")
    assert "train.steps (4 -> 6)" in err[0] and "train.lr (0.0015 -> 0.01)" in err[0]
    assert "--allow-config-change" in err[0] and "--no-resume" in err[0]
    assert (tmp_path / "run" / "config.yaml").read_text() == before
    assert not list((tmp_path / "run").glob("config.previous-*"))
    # the same config resumes and says so
    pyrtok([*run, "--stop-after", "1"])
    out = capsys.readouterr().out
    assert "resuming from step 2 of 4" in out and "stopped at step 3 of 4" in out
    # allowed: it says so and keeps the old config beside the new one
    pyrtok([*run, "--steps", "6", "--allow-config-change"])
    out = capsys.readouterr().out
    assert "resuming from step 3 of 6" in out and "train.steps (4 -> 6)" in out and "config.previous-1.yaml" in out
    assert "pyrtok pretrain: finished 6 steps" in out
    assert (tmp_path / "run" / "config.previous-1.yaml").read_text() == before
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["steps"] == 6
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 3, 6]  # step 1, every 3rd, the last
    # --no-resume starts over, and a differing config.yaml is still never overwritten silently
    pyrtok([*run, "--no-resume", "--stop-after", "1"])
    out = capsys.readouterr().out
    assert "resuming" not in out and "config.previous-2.yaml" in out and "checkpoints.previous-1" in out
    assert (tmp_path / "run/checkpoints.previous-1/step-0000006").is_dir()  # the old run's, kept apart
    assert (tmp_path / "run/checkpoints/latest").read_text() == "step-0000001"
    assert "resume with: pyrtok pretrain --config" in out and "--no-resume" not in out.split("resume with:")[1]


def test_config_changes_name_every_differing_key():
    from pyrtok._training import config_changes

    old = {"seed": 0, "train": {"steps": 4, "restart": [{"steps": 2}]}, "data": {"crop_scale": (0.2, 1.0)}}
    assert config_changes(old, {"seed": 0, "train": {"steps": 4, "restart": [{"steps": 2}]},
                                "data": {"crop_scale": [0.2, 1.0]}}) == []
    assert config_changes(old, {"seed": 1, "train": {"steps": 4, "restart": [{"steps": 3}]}, "data": {},
                                "extra": 1}) == [
        "seed (0 -> 1)", 'train.restart ([{"steps": 2}] -> [{"steps": 3}])', "data.crop_scale ([0.2, 1.0] -> (absent))",
        "extra ((absent) -> 1)"]


def test_training_without_photographs_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    for module in ("skimage", "sklearn", "pywt", "matplotlib"):  # as without the train extra, this test only
        monkeypatch.setitem(sys.modules, module, None)
    config = tiny_config(tmp_path)
    config["data"] = {**config["data"], "samples": "all"}
    config["train"] = {**config["train"], "steps": 1}
    train(config, progress=False)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == ["pyrtok pretrain: warning: matplotlib, PyWavelets, scikit-image, scikit-learn not "
                        "installed, so training on shapes scenes only; the photographs come with the train "
                        'extra: pip install -e ".[train]"']
    monkeypatch.undo()
    train({**config, "train": {**config["train"], "output": str(tmp_path / "all")}}, progress=False)
    assert "warning" not in capsys.readouterr().err


def test_reconstruction_images_are_labelled(tmp_path):
    from PIL import Image

    from pyrtok.viz import labelled_grid

    tiles = [[torch.full((3, 8, 8), 0.5)] * 2] * 3
    grid = labelled_grid(tiles, ["original", "masked", "reconstruction"], ["pixel", "laplacian"])
    plain = labelled_grid(tiles, ["", "", ""], ["", ""])
    pixels = np.asarray(grid.convert("L"))
    assert grid.size[0] > plain.size[0] and grid.size[1] > plain.size[1]
    top = grid.size[1] - 3 * 8 - 2 * 4  # where the images start
    assert pixels[: top - 2].min() < 100  # column labels drawn in black above the images
    assert pixels[top:, :20].min() < 100  # row labels drawn left of them
    assert np.asarray(plain.convert("L")).min() > 100  # (without labels: only the grey tiles on white)
    with pytest.raises(ValueError, match="one label per row"):
        labelled_grid(tiles, ["a"], ["b", "c"])
    run = train(tiny_config(tmp_path), progress=False)
    image = Image.open(run / "images" / "step-0000002.png")
    # 4 preview crops of 32 px, each in pixels and as its finest Laplacian band, plus the labels
    assert image.size[0] > 8 * 32 + 7 * 4 and image.size[1] > 3 * 32 + 2 * 4


def test_pretrain_eval_without_the_held_out_photographs_names_the_extra(tmp_path, capsys, monkeypatch):
    import yaml

    from pyrtok.cli import main as pyrtok

    monkeypatch.setitem(sys.modules, "skimage", None)  # as after the main install, in this test only
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(load_config(None)))
    with pytest.raises(SystemExit) as exit:
        pyrtok(["pretrain-eval", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(err) == 1
    assert err[0].startswith("pyrtok pretrain-eval: sample 'rocket' needs scikit-image; pip install -e \".[train]\"")
