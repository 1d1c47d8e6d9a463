import json

import pytest
import torch

from pyrtok.cli import main as cli_main
from pyrtok.demo import run
from pyrtok.samples import available_samples, sample_image


def test_bundled_samples_load_as_unit_range_rgb():
    names = available_samples()
    assert "astronaut" in names
    image = sample_image("astronaut", size=(96, 128))
    assert image.shape == (3, 96, 128) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.1
    with pytest.raises(ValueError, match="name must be one of"):
        sample_image("lena")


def test_demo_writes_figure_and_reports_exact_reconstruction(tmp_path):
    summary = run("chelsea", levels=4, out=str(tmp_path))
    assert (tmp_path / "levels.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["laplacian_reconstruction_max_abs_error_float32"] <= 1e-5
    assert saved["laplacian_reconstruction_max_abs_error_float64"] <= 1e-12
    assert saved["steerable_reconstruction_max_abs_error_float32"] <= 1e-5
    assert summary["lap_loss_blurred"] > 0 and summary["lap_loss_noisy"] > 0


def test_cli_dispatches_and_rejects_unknown_commands(tmp_path, capsys):
    cli_main(["demo", "--image", "coffee", "--levels", "3", "--out", str(tmp_path)])
    assert "laplacian_reconstruction_max_abs_error_float32" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown command"):
        cli_main(["frobnicate"])


def test_demo_without_scikit_image_names_the_extra_in_one_line(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "skimage", None)  # as after the main install, in this test only
    assert "astronaut" not in available_samples() and "grace_hopper" in available_samples()
    with pytest.raises(SystemExit) as exit:
        cli_main(["demo", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(err) == 1
    assert err[0].startswith("pyrtok demo: sample 'astronaut' needs scikit-image; pip install -e \".[train]\"")
    assert "grace_hopper" in err[0]  # what can be shown without it
    cli_main(["demo", "--image", "grace_hopper", "--levels", "3", "--out", str(tmp_path)])
    assert (tmp_path / "levels.png").is_file()


@pytest.mark.parametrize("levels", [1, 2])
def test_demo_with_few_levels(tmp_path, levels):
    summary = run("camera", levels=levels, out=str(tmp_path))
    assert summary["laplacian_reconstruction_max_abs_error_float32"] <= 1e-5
