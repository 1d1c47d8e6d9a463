"""No ablation command loses results or mixes two runs: ``--fresh`` sets the earlier run aside, a second run on a
folder in use is refused, and rows without an answer name their image, show in the report and fail the command."""

import csv
import fcntl
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image
from pyrtok.eval.ablate import main as ablate_main
from pyrtok.eval.config import load_config
from pyrtok.eval.outputs import LOCK_NAME, OutputInUseError, hold
from pyrtok.eval.report import summarize
from pyrtok.eval.rows import read_rows
from pyrtok.eval.runner import run

from pyrtok.cli import main as pyrtok_main
from pyrtok.data.local import write_split
from pyrtok.embedded.train import build
from pyrtok.embedded.train import load_config as train_config

MODEL = {"image_size": 64, "patch_size": 16, "vision_hidden": 32, "vision_layers": 1, "vision_heads": 2,
         "vision_intermediate": 64, "text_hidden": 32, "text_layers": 1, "text_heads": 2, "text_intermediate": 64,
         "levels": 2}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny random LLaVA and a 6-sample split whose q1 image is missing and q4 image is not a PNG."""
    root = tmp_path_factory.mktemp("assets")
    model, tokenizer = build(train_config(None, {"model": MODEL}))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    (root / "data" / "images").mkdir(parents=True)
    records = []
    for i in range(6):
        image = f"images/{i}.png"
        if i == 4:
            (root / "data" / image).write_bytes(b"not a png")
        elif i != 1:
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "data" / image)
        records.append({"id": f"q{i}", "image": image, "question": "what colour is the big circle?",
                        "answers": ["red"], "category": "a"})
    write_split(root / "data", "test", records)
    write_split(root / "data", "good", [r for i, r in enumerate(records) if i not in (1, 4)])
    return root


def config_file(assets, path, output, split="good", root=None, **overrides):
    data = {"name": "toy", "output": str(output), "seed": 0, "batch_size": 2,
            "models": [{"name": "tiny", "path": str(assets / "model"), "prompt": "USER: <image> {question} ASSISTANT:",
                        "levels": 2, "max_new_tokens": 2}],
            "allocators": ["pool"], "budgets": [4],
            "tasks": [{"name": "toy", "source": "local", "root": str(root or assets / "data"), "metric": "exact",
                       "split": split}]}
    data.update(overrides)
    path.write_text(yaml.safe_dump(data))
    return path


def budgets(folder):
    return {r["budget"] for r in read_rows(folder)}


def test_fresh_sets_the_earlier_run_aside_and_deletes_nothing(assets, tmp_path, capsys):
    path = config_file(assets, tmp_path / "c.yaml", tmp_path / "out")
    out = tmp_path / "out"
    ablate_main(["--config", str(path), "--no-progress"])
    first = read_rows(out)
    assert budgets(out) == {20, 4} and len(first) == 2 * 4
    assert "set aside" not in capsys.readouterr().err  # nothing earlier: nothing to set aside
    # the README's second example, on the same folder: a narrower grid that must not cost the first run its rows
    ablate_main(["--config", str(path), "--no-progress", "--fresh", "--set", "budgets=[3]"])
    err = [line for line in capsys.readouterr().err.splitlines() if "set aside" in line]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("out.previous-")]
    assert len(aside) == 1 and err == [f"pyrtok ablate: earlier run set aside in {aside[0]}"]
    assert budgets(out) == {20, 3}
    assert read_rows(aside[0]) == first  # the earlier run, whole: rows, its config and its report
    assert {"config.yaml", "report.md", "table.csv"} <= {p.name for p in aside[0].iterdir()}
    assert load_config(aside[0] / "config.yaml").budgets == [4] and load_config(out / "config.yaml").budgets == [3]
    assert not (aside[0] / LOCK_NAME).exists() and (out / LOCK_NAME).is_file()  # the lock stays with the folder
    # the runner's own fresh start, twice within a second: two set-aside folders, every row still somewhere
    second = read_rows(out)
    run(load_config(path, {"budgets": [2]}), fresh=True, progress=False)
    run(load_config(path, {"budgets": [5]}), fresh=True, progress=False)
    aside = sorted(p for p in tmp_path.iterdir() if p.name.startswith("out.previous-"))
    assert len(aside) == 3 and budgets(out) == {20, 5}
    assert sorted(budgets(p) for p in aside) == sorted([{20, 4}, {20, 3}, {20, 2}])
    assert any(read_rows(p) == second for p in aside)


def test_a_second_run_on_a_folder_in_use_is_refused(assets, tmp_path, capsys):
    out = tmp_path / "out"
    path = config_file(assets, tmp_path / "c.yaml", out)
    out.mkdir()
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT)  # another run's hold on the folder
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(OutputInUseError, match=f"{out} is in use by another run"):
            run(load_config(path), resume=True, progress=False)
        with pytest.raises(SystemExit) as exit:
            pyrtok_main(["ablate", "--config", str(path), "--no-progress", "--resume"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit.value.code == 2 and len(err) == 1
        assert err[0].startswith(f"pyrtok ablate: {out} is in use by another run") and "--output" in err[0]
        assert not (out / "rows").exists()  # refused before it wrote anything
    finally:
        os.close(fd)
    _, rows = run(load_config(path), progress=False)  # released: the same command now runs
    assert len(rows) == 2 * 4


def test_a_killed_run_leaves_a_lock_that_blocks_nothing(assets, tmp_path):
    out = tmp_path / "out"
    path = config_file(assets, tmp_path / "c.yaml", out)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pyrtok.eval.outputs import hold\n"
         f"with hold({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputInUseError, match=f"pid {holder.pid}"):  # the message names the holder
            run(load_config(path), progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK_NAME).is_file()  # what a killed run leaves behind, unlocked by the kernel
    _, rows = run(load_config(path), progress=False)
    assert len(rows) == 2 * 4
    with hold(out), hold(out):  # a process may re-enter its own hold (the command line holds it around the runner)
        pass


def test_error_rows_name_their_image_and_the_cli_reports_them_and_fails(assets, tmp_path, capsys):
    out, data = tmp_path / "out", tmp_path / "data"
    shutil.copytree(assets / "data", data)
    path = config_file(assets, tmp_path / "c.yaml", out, split="test", root=data)
    with pytest.raises(SystemExit) as exit:
        pyrtok_main(["ablate", "--config", str(path), "--no-progress"])
    assert exit.value.code == 1
    captured = capsys.readouterr()
    rows = read_rows(out)
    assert len(rows) == 2 * 6  # everything was written first
    errors = {r["id"]: r["error"] for r in rows if r["error"] and r["error"] != "empty answer"}
    assert set(errors) == {"q1", "q4"}
    missing, broken = data / "images" / "1.png", data / "images" / "4.png"
    assert all(e.startswith(f"image: {missing}: FileNotFoundError") for i, e in errors.items() if i == "q1")
    assert all(e.startswith(f"image: {broken}: ") for i, e in errors.items() if i == "q4")
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("pyrtok ablate: 4 of 12 rows are errors (2 samples without an answer")
    assert last.endswith("rerun with --resume --retry-errors")
    # the headline keeps counting them as wrong; beside it, the answered-only accuracy and the failure count
    report = (out / "report.md").read_text()
    assert "| toy | toy answered |" in report and "| errors | failed |" in report
    assert "4 rows got no answer" in report and "--resume --retry-errors" in captured.out
    with (out / "table.csv").open() as f:
        table = {r["allocator"]: r for r in csv.DictReader(f)}
    for allocator, row in table.items():
        mine = [r for r in rows if r["allocator"] == allocator]
        answered = [r for r in mine if r["id"] not in errors]
        assert float(row["toy"]) == pytest.approx(100 * sum(r["score"] for r in mine) / 6)
        assert float(row["toy_answered"]) == pytest.approx(100 * sum(r["score"] for r in answered) / 4)
        assert int(row["failed"]) == 2 and int(row["errors"]) >= 2
    # once the files are fixed, the advertised command recomputes them and succeeds
    for i in (1, 4):
        Image.fromarray(np.full((48, 64, 3), 200, dtype=np.uint8)).save(data / "images" / f"{i}.png")
    pyrtok_main(["ablate", "--config", str(path), "--no-progress", "--resume", "--retry-errors"])
    captured = capsys.readouterr()
    assert "rows are errors" not in captured.err and "toy answered" not in captured.out
    assert not any(r["error"] and r["error"] != "empty answer" for r in read_rows(out))


def test_the_table_gives_answered_accuracy_beside_the_headline_by_hand():
    def row(i, score, error=None):
        return {"model": "m", "allocator": "all", "budget": 20, "task": "t", "id": str(i), "category": "x",
                "prediction": "" if error else "p", "answers": ["p"], "score": float(score), "tokens": 20,
                "fraction": 1.0, "time_s": 0.01, "prefill_s": 0.004, "tflops": 1e-6, "error": error}

    rows = [row(0, 1), row(1, 0), row(2, 0, "empty answer"), row(3, 0, "image: /x/3.png: FileNotFoundError: gone")]
    (entry,), _ = summarize(rows, {"t": "exact"})
    assert entry["tasks"]["t"] == pytest.approx(25)  # unchanged: a failure counts as a wrong answer
    assert entry["answered"]["t"] == pytest.approx(100 / 3)  # an empty answer is an answer (a wrong one)
    assert (entry["errors"], entry["failed"]) == (2, 1)
    (entry,), _ = summarize([row(0, 0, "image: gone")], {"t": "exact"})
    assert entry["answered"]["t"] != entry["answered"]["t"]  # NaN: nothing was answered
