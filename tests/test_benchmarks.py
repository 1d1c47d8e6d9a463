"""The benchmarks stay runnable: their size presets build the real shapes (on the meta device, no memory), and
each benchmark runs end to end at its toy size (the tables they print are their results; no timing is asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def benchmarks(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    torch_threads = torch.get_num_threads()
    yield
    torch.set_num_threads(torch_threads)


# Published parameter counts of the models whose shapes the 7b presets take.
SEVEN_B = {"llava": 7_062_902_784, "llava_next": 7_062_906_880, "qwen2_5_vl": 8_292_166_656}


@pytest.mark.parametrize("family", sorted(SEVEN_B))
def test_the_7b_presets_are_the_real_shapes(benchmarks, family):
    from presets import model_kwargs

    from pyrtok.testing import build_vlm

    model, _ = build_vlm(family, device="meta", dtype=torch.bfloat16, **model_kwargs(family, "7b"))
    assert sum(p.numel() for p in model.parameters()) == SEVEN_B[family]
    assert next(model.parameters()).dtype == torch.bfloat16 and next(model.parameters()).device.type == "meta"


def test_device_arguments(benchmarks):
    import argparse

    from presets import add_device_arguments, device_and_dtype, model_kwargs

    parser = argparse.ArgumentParser()
    add_device_arguments(parser)
    args = parser.parse_args(["--device", "cpu"])
    assert device_and_dtype(args) == (torch.device("cpu"), torch.float32) and args.size == "cpu"
    assert device_and_dtype(parser.parse_args(["--device", "cpu", "--dtype", "bfloat16"]))[1] == torch.bfloat16
    with pytest.raises(ValueError, match="size must be one of"):
        model_kwargs("llava", "13b")


def test_bench_prefill_runs_at_toy_size(benchmarks, capsys):
    import bench_prefill

    bench_prefill.main(["--size", "toy", "--repeats", "1", "--device", "cpu", "--allocators", "laplacian",
                        "--models", "llava", "llava_next", "qwen2_5_vl"])
    out = capsys.readouterr().out
    assert "torch.float32 on cpu, size toy" in out
    for title in ("llava at size toy (64 image tokens)", "llava_next at size toy (80 image tokens)",
                  "qwen2_5_vl at size toy (64 image tokens)", "in-LLM dropping"):
        assert title in out
    assert out.count("\nlaplacian ") == 3 * 3 + 1  # three budgets per model, and the in-LLM row
    assert "laplacian+pdrop" in out and "dart L1 25%" in out


def test_bench_lazy_tiles_and_allocators_run_at_toy_size(benchmarks, capsys, monkeypatch):
    import bench_allocators
    import bench_lazy_tiles

    monkeypatch.setattr("sys.argv", ["bench_lazy_tiles.py", "--size", "toy", "--repeats", "1", "--budgets", "0.25",
                                     "--allocators", "laplacian", "--scenes", "photo", "--device", "cpu"])
    bench_lazy_tiles.main()
    out = capsys.readouterr().out
    assert "| photo | laplacian | 25% |" in out and "same |" in out
    monkeypatch.setattr("sys.argv", ["bench_allocators.py", "--resolutions", "64", "--batches", "1", "--repeats",
                                     "1", "--warmup", "0", "--clip-repeats", "1", "--allocators", "laplacian",
                                     "cdpruner", "vscan", "--device", "cpu"])
    bench_allocators.main()
    out = capsys.readouterr().out
    assert all(f"\n{name} " in out for name in ("laplacian", "cdpruner", "vscan"))


def test_bench_pyramid_prints_every_ratio(benchmarks, capsys):
    import bench_pyramid
    import presets

    bench_pyramid.main(["--repeats", "1", "--kornia", "1", "--cases", "1x32", "12x40", "--device", "cpu"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("1x32", "12x40"))]
    assert [row[0] for row in rows] == ["1x32", "12x40"]
    assert all(len(row) == 11 and all(float(v) > 0 for v in row[1:]) for row in rows)
    with pytest.raises(ValueError, match="BxS"):
        presets.parse_case("336")


def test_bench_steerable_times_all_three_and_compares_their_coefficients(benchmarks, capsys):
    import bench_steerable
    import presets

    bench_steerable.main(["--repeats", "1", "--levels", "2", "--cases", "1x32", "2x48", "--device", "cpu"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("1x32", "2x48"))]
    assert [row[0] for row in rows] == ["1x32", "2x48"]
    assert all(len(row) == 10 and all(float(v) > 0 for v in row[1:]) for row in rows)
    assert all(float(row[-1]) < 1e-4 for row in rows)  # pyrtok's coefficients are pyrtools'
    with pytest.raises(ValueError, match="BxS"):
        presets.parse_case("256")


def test_bench_laploss_runs_on_images_and_video(benchmarks, capsys):
    import bench_laploss

    bench_laploss.main(["--repeats", "1", "--cases", "2x64", "1x2x64", "--device", "cpu"])
    out = capsys.readouterr().out
    for case in ("2x64", "1x2x64"):
        for name in ("rife (preset)", "glo (preset)", "mtyka (preset)", "pyrtok + mask"):
            assert any(line.startswith(case) and name in line for line in out.splitlines()), (case, name)
    with pytest.raises(ValueError, match="a case is BxS"):
        bench_laploss.parse_case("64")
    # peak memory on the CPU: one fresh process per loss, a number for each
    peaks = bench_laploss.cpu_peaks(["pyrtok + mask", "glo (snippet)"], (2, 3, 64, 64), False, 1)
    assert set(peaks) == {"pyrtok + mask", "glo (snippet)"} and all(v >= 0 for v in peaks.values())


def test_bench_train_data_times_both_stages_with_and_without_the_worker(benchmarks, capsys, tmp_path):
    import bench_train_data
    import yaml

    micro = {"model": {"image_size": 64, "patch_size": 16, "vision_hidden": 16, "vision_layers": 1,
                       "vision_heads": 2, "vision_intermediate": 32, "text_hidden": 16, "text_layers": 1,
                       "text_heads": 2, "text_intermediate": 32, "levels": 2},
             "train": {"batch_size": 2, "dense_batch_size": 2, "warmup_steps": 1,
                       "restart": [{"steps": 1, "turns": {"spatial": 2, "fine": 1}}]}}
    config = tmp_path / "micro.yaml"
    config.write_text(yaml.safe_dump(micro))
    t = bench_train_data.load_config(config)
    lm = bench_train_data.stage_config(t, "lm", 3, 1, tmp_path / "lm")["train"]
    assert lm["turns"] == {"spatial": 2, "fine": 1} and lm["dense_steps"] == 0 and lm["restart"] == []
    assert lm["data_workers"] == 1 and lm["freeze_vision_steps"] == lm["steps"] == 4  # past the 3 timed steps
    tower = bench_train_data.stage_config(t, "tower", 3, 0, tmp_path / "tower")["train"]
    assert tower["dense_steps"] == 4 and tower["steps"] == 5 and tower["data_workers"] == 0
    bench_train_data.main(["--config", str(config), "--steps", "2", "--rounds", "1", "--threads", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [row[0] for row in rows[2:]] == ["tower", "lm"]
    assert all(float(row[1]) > 0 and float(row[2]) > 0 and float(row[3]) > 0 for row in rows[2:])


@pytest.mark.parametrize("script, module, distribution", [("bench_pyramid", "cv2", "opencv-python-headless"),
                                                          ("bench_pyramid", "kornia", "kornia"),
                                                          ("bench_steerable", "plenoptic", "plenoptic"),
                                                          ("bench_steerable", "pyrtools", "pyrtools")])
def test_a_missing_dev_package_ends_a_benchmark_in_one_line(benchmarks, monkeypatch, capsys, script, module,
                                                            distribution):
    import importlib
    import sys

    from presets import run_script

    bench = importlib.import_module(script)  # imports without the package: it is needed only when timing
    for name in [m for m in sys.modules if m.split(".")[0] == module] or [module]:  # as after the main install
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{script}.py"])
    with pytest.raises(SystemExit) as exit:
        run_script(lambda: bench.main(["--repeats", "1", "--cases", "1x32", "--device", "cpu"]))
    assert exit.value.code == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [f'{script}.py: needs {distribution}; pip install -e ".[dev]"']
    assert not out  # before any timing

    def bug():
        import pyrtok.no_such_module  # noqa: F401  (a bug, not a missing extra)

    with pytest.raises(ModuleNotFoundError):  # keeps its traceback
        run_script(bug)


@pytest.mark.parametrize("script", ["bench_pyramid", "bench_steerable"])
def test_a_malformed_case_is_one_line_naming_the_option(benchmarks, capsys, script):
    import importlib

    with pytest.raises(SystemExit) as exit:
        importlib.import_module(script).main(["--cases", "1x32", "1x3x3"])
    assert exit.value.code == 2
    out, err = capsys.readouterr()
    assert not out and err.strip().splitlines()[-1].endswith(
        "error: --cases: a case is BxS (batch x side in pixels), got '1x3x3'")


def test_a_malformed_laploss_case_is_one_line_naming_the_option(benchmarks, capsys):
    import bench_laploss

    assert bench_laploss.parse_case("32x224") == (32, 3, 224, 224)
    assert bench_laploss.parse_case("4x8x224") == (4, 8, 3, 224, 224)
    with pytest.raises(ValueError, match="multiple of 32, at least 64"):
        bench_laploss.parse_case("2x48")
    with pytest.raises(SystemExit) as exit:
        bench_laploss.main(["--cases", "32x224", "4xax224"])
    assert exit.value.code == 2
    out, err = capsys.readouterr()
    assert not out and err.strip().splitlines()[-1].endswith(
        "error: --cases: a case is BxS (images) or BxTxS (video), got '4xax224'")
