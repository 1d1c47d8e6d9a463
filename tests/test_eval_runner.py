"""The ablation runner end to end on a tiny random LLaVA and a local task: grid, errors, resume after a kill,
two-process sharding, reports."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import free_port
from PIL import Image
from pyrtok.eval.ablate import main as ablate_main
from pyrtok.eval.config import load_config
from pyrtok.eval.report import summarize, write_report
from pyrtok.eval.rows import RowWriter, read_rows
from pyrtok.eval.runner import run

from pyrtok.data.local import write_split
from pyrtok.embedded.train import build
from pyrtok.embedded.train import load_config as train_config

MODEL = {"image_size": 64, "patch_size": 16, "vision_hidden": 32, "vision_layers": 2, "vision_heads": 2,
         "vision_intermediate": 64, "text_hidden": 32, "text_layers": 1, "text_heads": 2, "text_intermediate": 64,
         "levels": 2}
TIMING = ("vision_s", "allocation_s", "prefill_s", "llm_s", "time_s")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    model, tokenizer = build(train_config(None, {"model": MODEL}))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    records = []
    for i in range(40):
        image = f"images/{i}.png"
        (root / "data" / "images").mkdir(parents=True, exist_ok=True)
        if i == 5:
            (root / "data" / image).write_bytes(b"not a png")
        else:
            Image.fromarray(rng.integers(0, 255, (48 + i, 64, 3), dtype=np.uint8)).save(root / "data" / image)
        records.append({"id": f"q{i}", "image": image, "question": "what colour is the big circle?",
                        "answers": ["red" if i % 2 else "blue"], "category": "ab"[i % 2]})
    write_split(root / "data", "test", records)
    write_split(root / "data", "small", records[:8])
    return root


def config_for(assets, output, samples=8, split="test", **overrides):
    data = {"name": "toy", "output": str(output), "seed": 0, "batch_size": 3,
            "models": [{"name": "tiny", "path": str(assets / "model"), "prompt": "USER: <image> {question} ASSISTANT:",
                        "levels": 2, "max_new_tokens": 2}],
            "allocators": ["random", "pool", "laplacian"], "budgets": [1.0, 0.5, 4],
            "tasks": [{"name": "toy", "source": "local", "root": str(assets / "data"), "metric": "exact",
                       "split": split, "limit": samples, "stratify": "category"}]}
    data.update(overrides)
    return data


def comparable(rows):
    return {(r["model"], r["allocator"], r["budget"], r["task"], r["id"]): {k: v for k, v in r.items()
                                                                           if k not in TIMING} for r in rows}


def test_grid_rows_errors_and_report(assets, tmp_path):
    config = load_config(config_for(assets, tmp_path / "out", split="small"))
    output, rows = run(config, progress=False)
    cells = {(r["allocator"], r["budget"]) for r in rows}
    # N = 16 + 4 tokens; the full budget runs once, as "all"
    assert cells == {("all", 20), *((a, b) for a in ("random", "pool", "laplacian") for b in (10, 4))}
    assert len(rows) == 7 * 8
    broken = [r for r in rows if r["id"] == "q5"]
    assert len(broken) == 7 and all(r["error"].startswith("image:") and r["score"] == 0 for r in broken)
    good = [r for r in rows if r["id"] != "q5"]
    assert all(r["error"] in (None, "empty answer") and r["tokens"] == r["budget"] for r in good)
    assert any(r["prediction"] for r in good)  # the random model still says something, which gets scored
    assert all(r["tflops"] > 0 and r["prefill_s"] <= r["llm_s"] for r in good)
    with pytest.raises(FileExistsError, match="--resume"):
        run(config, progress=False)
    paths = write_report(rows, {"toy": "exact"}, output)
    report = paths["report"].read_text()
    assert "| tiny | all | 20 (100%) |" in report and "| tiny | pool | 4 (20%) |" in report
    assert "### tiny / toy" in report
    assert all(paths[k].stat().st_size > 0 for k in ("table", "categories", "budget_plot", "latency_plot"))
    table, categories = summarize(rows, {"toy": "exact"})
    assert all(r["errors"] >= 1 and r["tokens"] == r["budget"] for r in table)  # q5 counted, not averaged
    assert {c["category"] for c in categories} == {"a", "b"}


def test_summary_retention_and_categories_by_hand():
    def rows(allocator, budget, scores):
        return [{"model": "m", "allocator": allocator, "budget": budget, "task": "t", "id": str(i),
                 "category": "xy"[i % 2], "prediction": "p", "answers": ["p"], "score": float(s), "tokens": budget,
                 "fraction": budget / 20, "time_s": 0.01, "prefill_s": 0.004, "tflops": 1e-6, "error": None}
                for i, s in enumerate(scores)]

    table, categories = summarize(rows("all", 20, [1, 1, 0, 1]) + rows("pool", 4, [1, 0, 0, 1]), {"t": "exact"})
    by = {r["allocator"]: r for r in table}
    assert by["all"]["tasks"]["t"] == pytest.approx(75) and by["pool"]["tasks"]["t"] == pytest.approx(50)
    assert by["all"]["retention"] == pytest.approx(100) and by["pool"]["retention"] == pytest.approx(200 / 3)
    assert by["pool"]["prefill_ms"] == pytest.approx(4) and [r["allocator"] for r in table] == ["all", "pool"]
    pool = {c["category"]: c["value"] for c in categories if c["allocator"] == "pool"}
    assert pool == {"x": pytest.approx(50), "y": pytest.approx(50)}  # x: scores 1, 0; y: 0, 1


def test_resume_after_a_kill_gives_the_same_rows(assets, tmp_path):
    straight = load_config(config_for(assets, tmp_path / "straight", samples=39))
    _, expected = run(straight, progress=False)
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(config_for(assets, tmp_path / "killed", samples=39)))
    shard = tmp_path / "killed" / "rows" / "rows-0-of-1.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "pyrtok.eval.ablate", "--config", str(path), "--no-progress"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None and not (shard.is_file() and shard.read_text().count("\n") >= 20):
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = shard.read_text().count("\n")
    assert 20 <= written < len(expected)  # it was stopped in the middle
    with open(shard, "a") as f:
        f.write('{"model": "tiny", "allocator": "pool", "budg')  # what a kill in mid-write leaves behind
    _, resumed = run(load_config(path), resume=True, progress=False)
    assert comparable(resumed) == comparable(expected)


def test_resume_redoes_a_half_written_batch_and_ignores_other_configs(assets, tmp_path):
    config = config_for(assets, tmp_path / "out", samples=9)
    _, expected = run(load_config(config), progress=False)
    shard = tmp_path / "out" / "rows" / "rows-0-of-1.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text("".join(lines[:7]) + lines[7][:25])  # two whole batch-cells, one row of the third, a torn row
    _, resumed = run(load_config(config), resume=True, progress=False)
    assert comparable(resumed) == comparable(expected)
    # a changed config (another batch size) shares no finished rows: everything is recomputed, nothing mixed
    before = shard.read_text().count("\n")
    _, changed = run(load_config({**config, "batch_size": 2}), resume=True, progress=False)
    assert shard.read_text().count("\n") == before + len(expected) and len(changed) == len(expected)
    assert {r["fingerprint"] for r in changed}.isdisjoint({r["fingerprint"] for r in expected})
    # the saved config reads back to the same grid
    saved = load_config(tmp_path / "out" / "config.yaml")
    assert saved.allocators == load_config(config).allocators and saved.budgets == [1.0, 0.5, 4]


def test_budget_fractions_round_to_the_nearest_count_and_full_always_runs(assets, tmp_path):
    from pyrtok.eval.runner import _cells

    config = load_config(config_for(assets, tmp_path, budgets=[0.07, 0.5, 500], allocators=["pool"]))
    cells = _cells(config, 100)
    assert [(c.allocator, c.budget) for c in cells] == [("all", 100), ("pool", 50), ("pool", 7)]


def test_two_processes_shard_batches_and_match_one(assets, tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(config_for(assets, tmp_path / "two", samples=12)))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), "-m", "pyrtok.eval.ablate", "--config", str(path), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    shards = sorted(p.name for p in (tmp_path / "two" / "rows").iterdir())
    assert shards == ["rows-0-of-2.jsonl", "rows-1-of-2.jsonl"]
    assert all((tmp_path / "two" / "rows" / s).read_text() for s in shards)  # both did work
    assert (tmp_path / "two" / "report.md").is_file()
    _, single = run(load_config(config_for(assets, tmp_path / "one", samples=12)), progress=False)
    assert comparable(read_rows(tmp_path / "two")) == comparable(single)


def test_cli_overrides_and_fresh(assets, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config_for(assets, tmp_path / "cli", samples=3)))
    paths = ablate_main(["--config", str(path), "--no-progress", "--set", "budgets=[2]", "allocators=[pool]"])
    assert "report:" in capsys.readouterr().out
    rows = read_rows(tmp_path / "cli")
    assert {(r["allocator"], r["budget"]) for r in rows} == {("all", 20), ("pool", 2)} and paths["report"].is_file()
    ablate_main(["--config", str(path), "--no-progress", "--fresh", "--set", "budgets=[3]", "allocators=[pool]"])
    assert {r["budget"] for r in read_rows(tmp_path / "cli")} == {20, 3}


def test_torn_rows_are_skipped_and_writers_start_a_new_line(tmp_path):
    writer = RowWriter(tmp_path)
    row = {"model": "m", "allocator": "a", "budget": 1, "task": "t", "id": "1"}
    writer.write([row])
    writer.close()
    with open(writer.path, "a") as f:
        f.write('{"model": "m", "allo')
    again = RowWriter(tmp_path)
    again.write([{**row, "id": "2"}])
    again.close()
    assert [r["id"] for r in read_rows(tmp_path)] == ["1", "2"]


@pytest.mark.parametrize(("change", "message"), [
    ({"budgets": [0]}, "budgets\\[0\\]"), ({"budgets": [1.5]}, "fraction"), ({"allocators": ["nope"]}, "registered"),
    ({"tasks": []}, "tasks"), ({"tasks": [{"name": "x", "source": "web"}]}, "source"),
    ({"models": [{"name": "m", "path": "p", "prompt": "no placeholders"}]}, "prompt"),
    ({"tasks": [{"name": "x", "source": "shapes", "metric": "bleu"}]}, "metric"),
    ({"tasks": [{"name": "x", "source": "shapes", "prompt_task": "nope"}]}, "prompt_task"),
    ({"batch_size": 0}, "batch_size"),
])
def test_config_errors_name_the_field(assets, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        load_config(config_for(assets, tmp_path, **change))


ABLATIONS = Path(__file__).parents[1] / "configs" / "ablation"


@pytest.mark.parametrize("name", sorted(p.name for p in ABLATIONS.glob("*.yaml")))
def test_shipped_ablation_configs_load(name):
    config = load_config(ABLATIONS / name)
    assert config.tasks and config.budgets and "all" in config.allocator_specs
    assert all(t.metric for t in config.tasks)


def test_mme_subsets_keep_both_questions_of_an_image():
    from pyrtok.eval.config import TaskSpec
    from pyrtok.eval.tasks import subset

    spec = TaskSpec(name="mme", source="hf", hf_task="mme", path="lmms-lab/MME", limit=3)
    assert (spec.metric, spec.group) == ("mme", "question_id")
    records = [{"id": str(i), "question_id": f"img{i // 2}", "category": "count" if i < 8 else "OCR"}
               for i in range(12)]
    chosen = subset(records, spec.limit, stratify="category", group=spec.group)
    images = [r["question_id"] for r in chosen]
    assert len(set(images)) == 3 and all(images.count(i) == 2 for i in images)
    assert {r["category"] for r in chosen} == {"count", "OCR"}


def test_a_run_that_fails_before_its_first_sample_loads_no_model_and_blocks_no_rerun(assets, tmp_path, monkeypatch):
    from pyrtok.eval import runner

    loaded = []
    real_load_model = runner.load_model

    def counting_load_model(spec, *args, **kwargs):
        loaded.append(spec.name)
        return real_load_model(spec, *args, **kwargs)

    monkeypatch.setattr(runner, "load_model", counting_load_model)
    output = tmp_path / "out"
    good = config_for(assets, output, samples=3)
    missing_root = {**good["tasks"][0], "root": str(tmp_path / "nowhere")}
    with pytest.raises(FileNotFoundError, match=r"tasks\[toy\]\.root .*nowhere"):
        run(load_config({**good, "tasks": [missing_root]}), progress=False)
    missing_split = {**good["tasks"][0], "split": "nosuchsplit"}
    with pytest.raises(FileNotFoundError, match=r"tasks\[other\]: no split 'nosuchsplit'"):
        run(load_config({**good, "tasks": [good["tasks"][0], {**missing_split, "name": "other"}]}), progress=False)
    assert loaded == []  # every task is read before the first model loads
    assert not list(output.glob("rows/*.jsonl"))
    (output / "rows").mkdir(parents=True)
    (output / "rows" / "rows-0-of-1.jsonl").touch()  # what a failed run of an earlier version left
    _, rows = run(load_config(good), progress=False)  # the corrected rerun, without resume
    assert loaded == ["tiny"] and len(rows) == 7 * 3


def test_a_bad_allocator_spec_fails_at_config_load(assets, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml"):
        load_config(config_for(assets, tmp_path, allocators=["pool", "configs/allocators/missing.yaml"]))
    with pytest.raises(TypeError, match=r"allocators\[1\].*bogus"):
        load_config(config_for(assets, tmp_path, allocators=["pool", {"name": "saliency", "bogus": 1}]))
    with pytest.raises(ValueError, match="reserved"):
        load_config(config_for(assets, tmp_path, allocators=[{"name": "pool", "label": "coarse"}]))
    with pytest.raises(ValueError, match="reserved for the full-token reference"):
        load_config(config_for(assets, tmp_path, allocators=[{"name": "random", "label": "all"}]))
    with pytest.raises(ValueError, match="unknown keys \\['budget'\\]"):
        load_config(config_for(assets, tmp_path, budget=[0.5]))
    with pytest.raises(ValueError, match=r"tasks\[0\] has unknown keys \['lmit'\]"):
        load_config(config_for(assets, tmp_path, tasks=[{"name": "t", "lmit": 3}]))
    with pytest.raises(ValueError, match=r"models\[0\] needs the keys \['path'\]"):
        load_config(config_for(assets, tmp_path, models=[{"name": "m"}]))


def test_the_all_allocator_below_the_full_budget_is_labelled_coarse(assets, tmp_path):
    from pyrtok.eval.runner import _cells

    config = load_config(config_for(assets, tmp_path, budgets=[1.0, 0.5, 7], allocators=["all", "pool"]))
    cells = _cells(config, 100)
    assert [(c.allocator, c.budget, c.spec) for c in cells] == [
        ("all", 100, "all"), ("coarse", 50, "all"), ("pool", 50, "pool"), ("coarse", 7, "all"), ("pool", 7, "pool")]
    # rows of older runs that called these cells "all" are reported as coarse too, and never as the reference
    old = [{"model": "m", "allocator": "all", "budget": b, "task": "t", "id": str(i), "category": "x",
            "prediction": "p", "answers": ["p" if b == 20 or i else "q"], "score": float(b == 20 or i > 0),
            "tokens": b, "fraction": b / 20, "time_s": 0.01, "prefill_s": 0.004, "tflops": 1e-6, "error": None}
           for b in (20, 4) for i in range(2)]
    table, categories = summarize(old, {"t": "exact"})
    assert [(r["allocator"], r["budget"], r["retention"]) for r in table] == [("all", 20, 100.0), ("coarse", 4, 50.0)]
    assert {c["allocator"] for c in categories} == {"all", "coarse"}


def test_rows_read_back_the_latest_attempt_whatever_the_shard(tmp_path):
    row = {"model": "m", "allocator": "a", "budget": 1, "task": "t", "id": "1", "fingerprint": "f"}
    first = RowWriter(tmp_path, 0, 1)  # read first (sorted shard names), but holds the retry
    first.write([{**row, "error": "image: broken", "attempt": 0}, {**row, "error": None, "attempt": 1}])
    first.close()
    second = RowWriter(tmp_path, 0, 2)  # a later redo of the error row's batch at its old attempt
    second.write([{**row, "error": "image: broken", "attempt": 0}])
    second.close()
    assert [(r["error"], r["attempt"]) for r in read_rows(tmp_path)] == [(None, 1)]
    unused = RowWriter(tmp_path / "never", 0, 1)
    unused.write([])
    unused.close()
    assert not (tmp_path / "never").exists()  # a writer that wrote nothing leaves no shard


def test_resume_retry_errors_replaces_error_rows_once_the_cause_is_fixed(assets, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(assets / "data", data)
    task = {"name": "toy", "source": "local", "root": str(data), "metric": "exact", "split": "small"}
    config = {**config_for(assets, tmp_path / "out", allocators=["random", "pool"], budgets=[4]), "tasks": [task]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    _, rows = run(load_config(path), progress=False)
    assert all(r["error"].startswith("image:") for r in rows if r["id"] == "q5")
    shard = tmp_path / "out" / "rows" / "rows-0-of-1.jsonl"
    written = shard.read_text()
    Image.fromarray(np.full((60, 64, 3), 200, dtype=np.uint8)).save(data / "images" / "5.png")  # the fix
    _, resumed = run(load_config(path), resume=True, progress=False)
    assert shard.read_text() == written  # plain resume: error rows count as done
    assert all(r["error"].startswith("image:") for r in resumed if r["id"] == "q5")
    with pytest.raises(ValueError, match="resume"):
        run(load_config(path), retry_errors=True, progress=False)
    paths = ablate_main(["--config", str(path), "--no-progress", "--resume", "--retry-errors"])
    retried = read_rows(tmp_path / "out")
    fixed = [r for r in retried if r["id"] == "q5"]
    assert len(fixed) == 3 and all(not str(r["error"] or "").startswith("image") and r["attempt"] == 1 and
                                   r["tokens"] == r["budget"] for r in fixed)
    assert shard.read_text().startswith(written) and shard.read_text().count('"id": "q5"') == 6  # appended
    # the retried rows equal a clean run's on the fixed data, and every report counts them instead of the errors
    _, clean = run(load_config({**config, "output": str(tmp_path / "clean")}), progress=False)
    assert comparable([{**r, "attempt": 0} for r in retried]) == comparable(clean)
    clean_paths = write_report(clean, {"toy": "exact"}, tmp_path / "clean")
    assert paths["categories"].read_text() == clean_paths["categories"].read_text()
    untimed = ("model", "allocator", "budget", "fraction", "tokens", "toy", "retention", "errors")

    def table_csv(path):
        with path.open() as f:
            return [{k: r[k] for k in untimed} for r in csv.DictReader(f)]

    assert table_csv(paths["table"]) == table_csv(clean_paths["table"])
    before = {r["allocator"]: r["errors"] for r in summarize(rows, {"toy": "exact"})[0]}
    after = {r["allocator"]: int(r["errors"]) for r in table_csv(paths["table"])}
    still = {r["allocator"]: r["error"] is not None for r in fixed}  # the fixed image may get an empty answer
    assert after == {a: before[a] - 1 + still[a] for a in before}
    assert "| tiny | pool | 4 (20%) |" in paths["report"].read_text()


def test_cli_bad_task_root_is_one_line_and_the_corrected_rerun_needs_no_resume(assets, tmp_path, capsys):
    from pyrtok.cli import main as pyrtok_main

    path = tmp_path / "c.yaml"
    good = config_for(assets, tmp_path / "out", samples=3, allocators=["pool"], budgets=[4])
    path.write_text(yaml.safe_dump({**good, "tasks": [{**good["tasks"][0], "root": str(tmp_path / "typo")}]}))
    with pytest.raises(SystemExit) as exit:
        pyrtok_main(["ablate", "--config", str(path), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and err == [f"pyrtok ablate: tasks[toy].root '{tmp_path / 'typo'}' is not a folder"]
    path.write_text(yaml.safe_dump(good))
    pyrtok_main(["ablate", "--config", str(path), "--no-progress"])
    assert "report:" in capsys.readouterr().out and len(read_rows(tmp_path / "out")) == 2 * 3


def test_runner_runs_a_qwen_family_model_from_a_folder(tmp_path):
    """A native-resolution model: budgets are fractions of each image's own tokens; the prompt is the model's
    chat template; the full-token row keeps every token of every image."""
    from pyrtok.testing import save_tiny_vlm

    save_tiny_vlm("qwen2_5_vl", tmp_path / "qwen")
    config = load_config({
        "name": "qwen", "output": str(tmp_path / "out"), "batch_size": 3,
        "models": [{"name": "tiny-qwen", "path": str(tmp_path / "qwen"), "levels": 2, "max_new_tokens": 2}],
        "allocators": ["random", "laplacian"], "budgets": [1.0, 0.25],
        "tasks": [{"name": "shapes", "source": "shapes", "split": "test", "questions": 1000, "limit": 5,
                   "metric": "exact", "root": str(tmp_path / "data")}],
    })
    _, rows = run(config, progress=False)
    assert len(rows) == 5 * 3 and not any(r["error"] for r in rows)
    full = [r for r in rows if r["allocator"] == "all"]
    assert {r["fraction"] for r in full} == {1.0} and {r["budget"] for r in full} == {1.0}
    n = full[0]["tokens"]  # 224 px scenes: an 8x8 merged grid and its 4x4 pooled level
    assert n == 64 + 16
    for row in rows:
        if row["budget"] == 0.25:
            assert row["tokens"] == 20 and row["fraction"] == 0.25
    table, _ = summarize(rows, {"shapes": "exact"})
    assert {(c["allocator"], c["budget"]) for c in table} == {
        ("all", 1.0), ("random", 0.25), ("laplacian", 0.25)}


def test_an_image_the_model_refuses_is_recorded_and_the_batch_goes_on(tmp_path):
    """Qwen's processor refuses aspect ratios over 200: that sample becomes an error row in every cell, and the
    other samples of its batch are answered."""
    from pyrtok.testing import save_tiny_vlm

    save_tiny_vlm("qwen2_vl", tmp_path / "qwen")
    rng = np.random.default_rng(0)
    (tmp_path / "data" / "images").mkdir(parents=True)
    records = []
    for i, size in enumerate([(64, 48), (4000, 10), (56, 80)]):  # (width, height); the middle one is refused
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            tmp_path / "data" / "images" / f"{i}.png")
        records.append({"id": f"q{i}", "image": f"images/{i}.png", "question": "what colour is the big circle?",
                        "answers": ["red"], "category": "a"})
    write_split(tmp_path / "data", "test", records)
    config = load_config({
        "name": "refused", "output": str(tmp_path / "out"), "batch_size": 3,
        "models": [{"name": "q", "path": str(tmp_path / "qwen"), "levels": 1, "max_new_tokens": 2}],
        "allocators": ["random"], "budgets": [1.0, 0.5],
        "tasks": [{"name": "toy", "source": "local", "root": str(tmp_path / "data"), "split": "test",
                   "metric": "exact"}],
    })
    _, rows = run(config, progress=False)
    assert len(rows) == 3 * 2
    errors = {r["id"]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"q1"} and all(e.startswith("encode: ValueError") for e in errors.values())
    assert sum(1 for r in rows if r["id"] == "q1") == 2  # one error row per cell


def test_fingerprints_follow_the_options_an_allocator_resolves_to(assets, tmp_path, monkeypatch):
    """A registered name is fingerprinted by every option it resolves to: the same rule spelled as a name, a
    mapping or a YAML file shares rows, and a method whose default changes between versions is recomputed."""
    from pyrtok.eval.runner import fingerprint

    from pyrtok.allocators.visionzip import VisionZipTokens

    yaml_file = tmp_path / "zip.yaml"
    yaml_file.write_text("# a comment does not change the rule\nname: visionzip\nmerge: released\n")
    config = load_config(config_for(assets, tmp_path / "out", allocators=[
        "visionzip", {"name": "visionzip", "cls": True, "label": "zip_map"}, str(yaml_file),
        {"name": "visionzip", "merge": "mean", "label": "zip_mean"}]))
    model, task = config.models[0], config.tasks[0]
    prints = {label: fingerprint(config, model, task, label) for label in config.allocator_specs}
    assert prints["visionzip"] == prints["zip_map"] == prints["zip"] != prints["zip_mean"]
    monkeypatch.setattr(VisionZipTokens.__init__, "__defaults__", (10 / 64, True, "keys", "mean", "finest"))
    assert fingerprint(config, model, task, "visionzip") == prints["zip_mean"] != prints["visionzip"]
