"""The procedural shapes VQA benchmark and the local dataset format."""

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pyrtok.cli import main as cli_main
from pyrtok.data import ANSWERS, FAMILIES, make_scene, questions_for, read_split, samples, write_split


def test_scenes_are_deterministic_and_splits_differ():
    a = np.asarray(make_scene(0, "test", 3).image)
    assert a.shape == (224, 224, 3)
    assert np.array_equal(a, np.asarray(make_scene(0, "test", 3).image))
    assert not np.array_equal(a, np.asarray(make_scene(0, "validation", 3).image))
    assert not np.array_equal(a, np.asarray(make_scene(1, "test", 3).image))
    scene = make_scene(0, "test", 3)
    assert questions_for(scene, 0, "test", 3) == questions_for(make_scene(0, "test", 3), 0, "test", 3)


def test_every_scene_asks_each_family_once_with_one_word_answers():
    families, existence, categories = Counter(), Counter(), Counter()
    for _, scene, items in samples("validation", 120):
        assert [q["family"] for q in items] == list(FAMILIES)
        for q in items:
            assert q["answer"] in ANSWERS and " " not in q["answer"] and isinstance(q["answer"], str)
            families[q["family"]] += 1
            categories[q["category"]] += 1
            if q["family"] == "existence":
                existence[q["answer"]] += 1
        assert 1 <= len(scene.objects) <= 4 and 1 <= len(scene.dots) <= 2
    assert 0.4 <= existence["yes"] / sum(existence.values()) <= 0.6  # balanced, POPE-like
    assert categories["absent adversarial"] > 0 and categories["absent random"] > 0
    assert categories["label digit"] > 0 and categories["label letter"] > 0 and categories["dot colour"] > 0


def test_answers_match_the_scene():
    for _, scene, items in samples("test", 40):
        by_family = {q["family"]: q for q in items}
        count = by_family["counting"]
        shape = count["question"].split()[2][:-1]
        assert int(count["answer"]) == sum(o.shape == shape for o in scene.objects)
        fine = by_family["fine"]
        if "label" in fine["question"]:
            assert fine["answer"] == scene.glyph.lower()
        else:
            assert fine["answer"] in {d.colour for d in scene.dots}
        exist = by_family["existence"]
        words = exist["question"].rstrip("?").split()
        present = (words[-2], words[-1]) in {(o.colour, o.shape) for o in scene.objects}
        assert exist["answer"] == ("yes" if present else "no")


def test_local_format_round_trip_and_command(tmp_path, capsys):
    cli_main(["make-shapes", "--out", str(tmp_path), "--splits", "validation", "--questions", "12"])
    records = list(read_split(tmp_path, "validation"))
    assert len(records) == 15  # 3 scenes x 5 families
    assert {r["category"] for r in records} == set(FAMILIES)
    assert Image.open(records[0]["image"]).size == (224, 224)
    assert len({r["id"] for r in records}) == 15
    with pytest.raises(ValueError, match="lacks the fields"):
        write_split(tmp_path, "bad", [{"id": "x"}])
    assert not (tmp_path / "bad.jsonl").exists()
    with pytest.raises(FileNotFoundError, match="no split 'train'"):
        list(read_split(tmp_path, "train"))
    good = '{"id": "a", "image": "x.png", "question": "q?", "answers": ["yes"], "category": "c"}'
    (tmp_path / "broken.jsonl").write_text(good + "\nnot json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl:2 is not valid JSON"):
        list(read_split(tmp_path, "broken"))
    (tmp_path / "partial.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(ValueError, match=r"partial\.jsonl:1 lacks the fields"):
        list(read_split(tmp_path, "partial"))



def test_pope_rows_ask_each_scenes_existence_question_in_popes_words():
    from pyrtok.data.shapes_pope import POPE_COLUMNS, pope_rows

    rows = pope_rows("test", 40, seed=3)
    assert [tuple(r) for r in rows] == [POPE_COLUMNS] * 40
    assert len({r["question_id"] for r in rows}) == 40
    assert {r["answer"] for r in rows} == {"yes", "no"}
    assert {r["category"] for r in rows} <= {"present", "absent random", "absent adversarial"}
    for (_, scene, items), row in zip(samples("test", 40, seed=3), rows, strict=True):
        exist = next(i for i in items if i["family"] == "existence")
        assert row["question"] == exist["question"][0].upper() + exist["question"][1:-1] + " in the image?"
        assert row["answer"] == exist["answer"] and row["category"] == exist["category"]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(row["image"]["bytes"]))), np.asarray(scene.image))
    assert [r["question"] for r in pope_rows("test", 40, seed=4)] != [r["question"] for r in rows]
    with pytest.raises(ValueError, match="questions must be an int >= 1"):
        pope_rows("test", 0)
    with pytest.raises(ValueError, match="split must be one of"):
        pope_rows("dev", 4)


def test_make_shapes_writes_a_pope_task_that_includes_lmms_evals_own(tmp_path):
    pytest.importorskip("lmms_eval")
    import datasets
    import yaml

    cli_main(["make-shapes", "--format", "pope", "--out", str(tmp_path), "--splits", "test", "--questions", "6"])
    task = yaml.safe_load((tmp_path / "pope_shapes.yaml").read_text())
    assert Path(task["include"]).name == "pope.yaml" and Path(task["include"]).parent.name == "pope"
    assert task["task"] == "pope_shapes" and task["dataset_kwargs"]["data_files"] == {"test": "test.parquet"}
    table = datasets.load_dataset("parquet", data_files={"test": str(tmp_path / "test.parquet")})["test"]
    assert table.num_rows == 6 and isinstance(table[0]["image"], Image.Image)
    assert table[0]["image"].size == (224, 224)
