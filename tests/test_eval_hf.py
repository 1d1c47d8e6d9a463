"""The HuggingFace task loaders (pyrtok.eval.tasks.hf) on tiny save_to_disk copies, and the prompt conventions."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pyrtok.eval.tasks.hf import HF_TASKS, DatasetImage, load_hf_task
from pyrtok.eval.tasks.prompts import PROMPTS, format_question

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def hf() -> Any:
    return pytest.importorskip("datasets")


def _image(colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (8, 6), colour)


def _save(hf: Any, folder: Path, columns: dict[str, list], features: dict[str, Any], split: str | None) -> str:
    """Write a Dataset (split None) or a one-split DatasetDict to ``folder``; returns the folder."""
    dataset = hf.Dataset.from_dict(columns, features=hf.Features(features))
    (dataset if split is None else hf.DatasetDict({split: dataset})).save_to_disk(str(folder))
    return str(folder)


def _vqav2_columns(hf: Any) -> tuple[dict[str, list], dict[str, Any]]:
    answer = {"answer": hf.Value("string"), "answer_confidence": hf.Value("string"), "answer_id": hf.Value("int64")}
    columns = {
        "question_type": ["what color is the", "is the"],
        "multiple_choice_answer": ["red", "yes"],
        "answers": [
            [{"answer": "red", "answer_confidence": "yes", "answer_id": 1},
             {"answer": "dark red", "answer_confidence": "maybe", "answer_id": 2}],
            [{"answer": "yes", "answer_confidence": "yes", "answer_id": 1}],
        ],
        "image_id": [9, 10],
        "answer_type": ["other", "yes/no"],
        "question_id": [9001, 10002],
        "question": ["What color is the bus?", "Is the man smiling?"],
        "image": [_image((255, 0, 0)), _image((0, 255, 0))],
    }
    features = {
        "question_type": hf.Value("string"), "multiple_choice_answer": hf.Value("string"),
        "answers": hf.List(answer), "image_id": hf.Value("int64"), "answer_type": hf.Value("string"),
        "question_id": hf.Value("int64"), "question": hf.Value("string"), "image": hf.Image(),
    }
    return columns, features


# --- loaders ------------------------------------------------------------------------------------------


def test_vqav2_maps_answers_types_and_ids(hf: Any, tmp_path: Path) -> None:
    folder = _save(hf, tmp_path / "vqav2", *_vqav2_columns(hf), split="validation")
    records = load_hf_task("vqav2", folder)
    assert [r["id"] for r in records] == ["9001", "10002"]
    first = records[0]
    assert first["answers"] == ["red", "dark red"]
    assert first["category"] == first["answer_type"] == "other"
    assert first["question_type"] == "what color is the"
    assert first["question_id"] == 9001 and first["image_id"] == 9
    assert first["multiple_choice_answer"] == "red"
    assert isinstance(first["image"], DatasetImage)  # decoded only when read
    assert first["image"].open().getpixel((0, 0)) == (255, 0, 0)
    assert records[1]["category"] == "yes/no"
    assert len(load_hf_task("vqav2", folder, limit=1)) == 1


def test_loading_reads_no_image_until_one_is_opened(hf: Any, tmp_path: Path) -> None:
    columns, features = _vqav2_columns(hf)
    columns["image"] = [{"bytes": b"not an image", "path": None}, _image((0, 0, 255))]
    records = load_hf_task("vqav2", _save(hf, tmp_path / "vqav2", columns, features, split="validation"))
    assert [type(r["image"]) for r in records] == [DatasetImage, DatasetImage]  # the broken one loads too
    assert records[1]["image"].open().getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(Exception, match="cannot identify image"):
        records[0]["image"].open()


def test_missing_column_names_task_and_column(hf: Any, tmp_path: Path) -> None:
    columns, features = _vqav2_columns(hf)
    del columns["answer_type"], features["answer_type"]
    folder = _save(hf, tmp_path / "vqav2", columns, features, split="validation")
    with pytest.raises(ValueError, match=r"'vqav2'.*\['answer_type'\]"):
        load_hf_task("vqav2", folder)


def test_split_choice_and_unknown_split(hf: Any, tmp_path: Path) -> None:
    columns, features = _vqav2_columns(hf)
    dataset = hf.Dataset.from_dict(columns, features=hf.Features(features))
    hf.DatasetDict({"validation": dataset, "testdev": dataset.select([0])}).save_to_disk(str(tmp_path / "two"))
    assert len(load_hf_task("vqav2", str(tmp_path / "two"))) == 2
    assert len(load_hf_task("vqav2", str(tmp_path / "two"), split="testdev")) == 1
    with pytest.raises(ValueError, match=r"split 'test' is not in .*\['testdev', 'validation'\]"):
        load_hf_task("vqav2", str(tmp_path / "two"), split="test")
    # A folder with a single split answers the default split whatever its name.
    hf.DatasetDict({"val": dataset}).save_to_disk(str(tmp_path / "one"))
    assert len(load_hf_task("vqav2", str(tmp_path / "one"))) == 2


def test_textvqa_keeps_ocr_tokens(hf: Any, tmp_path: Path) -> None:
    columns = {
        "image_id": ["0054c91397f2fe05"], "question_id": [34602], "question": ["what is the brand of this camera?"],
        "question_tokens": [["what", "is", "the", "brand"]], "image": [_image((1, 2, 3))],
        "image_width": [8], "image_height": [6], "answers": [["nous les gosses", "dakota", "dakota digital"]],
        "image_classes": [["Camera"]], "set_name": ["val"], "ocr_tokens": [["dakota", "digital", "camera"]],
    }
    features = {
        "image_id": hf.Value("string"), "question_id": hf.Value("int32"), "question": hf.Value("string"),
        "question_tokens": hf.List(hf.Value("string")), "image": hf.Image(), "image_width": hf.Value("int32"),
        "image_height": hf.Value("int32"), "answers": hf.List(hf.Value("string")),
        "image_classes": hf.List(hf.Value("string")), "set_name": hf.Value("string"),
        "ocr_tokens": hf.List(hf.Value("string")),
    }
    (record,) = load_hf_task("textvqa", _save(hf, tmp_path / "textvqa", columns, features, split=None))
    assert record["id"] == "34602" and record["question_id"] == 34602
    assert record["answers"] == ["nous les gosses", "dakota", "dakota digital"]
    assert record["ocr_tokens"] == ["dakota", "digital", "camera"]
    assert record["category"] == "all"


def _gqa_folders(hf: Any, tmp_path: Path, image_ids: list[str]) -> tuple[str, str]:
    types = {"structural": hf.Value("string"), "semantic": hf.Value("string"), "detailed": hf.Value("string")}
    questions = {
        "id": ["201307251", "201640614", "202225914"],
        "imageId": ["n161313", "n235859", "n161313"],
        "question": ["Is it overcast?", "Who is wearing the dress?", "What is the man holding?"],
        "answer": ["no", "woman", "racket"],
        "fullAnswer": ["No, it is clear.", "The woman is wearing a dress.", "The man is holding a racket."],
        "isBalanced": [True, True, True],
        "types": [{"structural": "verify", "semantic": "global", "detailed": "weatherVerify"},
                  {"structural": "query", "semantic": "rel", "detailed": "relS"},
                  {"structural": "query", "semantic": "obj", "detailed": "objThisChoose"}],
    }
    q_features = {
        "id": hf.Value("string"), "imageId": hf.Value("string"), "question": hf.Value("string"),
        "answer": hf.Value("string"), "fullAnswer": hf.Value("string"), "isBalanced": hf.Value("bool"), "types": types,
    }
    colours = [(10 * n, 0, 0) for n in range(len(image_ids))]
    images = {"id": image_ids, "image": [_image(c) for c in colours]}
    i_features = {"id": hf.Value("string"), "image": hf.Image()}
    return (_save(hf, tmp_path / "gqa_q", questions, q_features, split="testdev"),
            _save(hf, tmp_path / "gqa_i", images, i_features, split="testdev"))


def test_gqa_joins_questions_and_images(hf: Any, tmp_path: Path) -> None:
    questions, images = _gqa_folders(hf, tmp_path, ["n000001", "n235859", "n161313"])
    records = load_hf_task("gqa", questions, images_path=images)
    assert [r["id"] for r in records] == ["201307251", "201640614", "202225914"]
    # n161313 is the third image (red 20), n235859 the second (red 10).
    assert [r["image"].open().getpixel((0, 0)) for r in records] == [(20, 0, 0), (10, 0, 0), (20, 0, 0)]
    assert records[0]["image"] is records[2]["image"]  # one reference per image, shared
    assert [r["category"] for r in records] == ["verify", "query", "query"]
    assert records[1]["semantic"] == "rel" and records[1]["structural"] == "query"
    assert records[0]["image_id"] == "n161313" and records[0]["answers"] == ["no"]
    assert records[0]["full_answer"] == "No, it is clear."


def test_gqa_needs_images_and_every_image(hf: Any, tmp_path: Path) -> None:
    questions, images = _gqa_folders(hf, tmp_path, ["n161313"])
    with pytest.raises(ValueError, match="needs images_path"):
        load_hf_task("gqa", questions)
    with pytest.raises(ValueError, match="'n235859'"):
        load_hf_task("gqa", questions, images_path=images)
    with pytest.raises(ValueError, match=r"'gqa'.*images dataset lacks.*\['image'\]"):
        load_hf_task("gqa", questions, images_path=questions)


def test_pope_ids_unique_across_categories(hf: Any, tmp_path: Path) -> None:
    columns = {
        "id": ["0", "1", "2"], "question_id": ["1", "1", "2"],
        "question": ["Is there a snowboard in the image?", "Is there a dog in the image?", "Is there a car?"],
        "answer": ["Yes", "no", "no"], "image_source": ["COCO_val2014_000000310196"] * 3,
        "image": [_image((0, 0, 9))] * 3, "category": ["adversarial", "popular", "adversarial"],
    }
    features = {k: hf.Value("string") for k in columns if k != "image"} | {"image": hf.Image()}
    records = load_hf_task("pope", _save(hf, tmp_path / "pope", columns, features, split="test"))
    assert [r["id"] for r in records] == ["adversarial/1", "popular/1", "adversarial/2"]
    assert [r["answers"] for r in records] == [["yes"], ["no"], ["no"]]
    assert [r["category"] for r in records] == ["adversarial", "popular", "adversarial"]


def test_mme_pairs_share_question_id(hf: Any, tmp_path: Path) -> None:
    columns = {
        "question_id": ["code_reasoning/0020.png", "code_reasoning/0020.png", "10002.jpg", "10002.jpg"],
        "image": [_image((5, 5, 5))] * 4,
        "question": ["Is a c++ code shown in the picture? Please answer yes or no.",
                     "Is a python code shown in the picture? Please answer yes or no.",
                     "Is this artwork created by Gentile da Fabriano? Please answer yes or no.",
                     "Is this artwork created by Titian? Please answer yes or no."],
        "answer": ["Yes", "No", "No.", "Yes"],
        "category": ["code_reasoning", "code_reasoning", "artwork", "artwork"],
    }
    features = {k: hf.Value("string") for k in columns if k != "image"} | {"image": hf.Image()}
    records = load_hf_task("mme", _save(hf, tmp_path / "mme", columns, features, split="test"))
    assert [r["id"] for r in records] == [
        "code_reasoning/0020.png", "code_reasoning/0020.png#1", "artwork/10002.jpg", "artwork/10002.jpg#1"]
    assert [r["question_id"] for r in records] == [
        "code_reasoning/0020.png", "code_reasoning/0020.png", "10002.jpg", "10002.jpg"]
    assert [r["answers"] for r in records] == [["yes"], ["no"], ["no"], ["yes"]]
    assert records[2]["category"] == "artwork"


def test_scienceqa_letters_options_and_subject(hf: Any, tmp_path: Path) -> None:
    columns = {
        "image": [_image((0, 9, 0))] * 2,
        "question": ["Which of these states is farthest north?", "Which word would you find on a dictionary page?"],
        "choices": [["West Virginia", "Louisiana", "Arizona", "Oklahoma"], ["hurry", "hump"]],
        "answer": [0, 1],
        "hint": ["", "Look at the guide words."],
        "task": ["closed choice"] * 2, "grade": ["grade2", "grade3"],
        "subject": ["social science", "language science"], "topic": ["geography", "reference-skills"],
        "category": ["Geography", "Reference skills"], "skill": ["Read a map: cardinal directions", "Guide words"],
        "lecture": ["", ""], "solution": ["", ""],
    }
    features = {k: hf.Value("string") for k in columns if k not in ("image", "choices", "answer")} | {
        "image": hf.Image(), "choices": hf.List(hf.Value("string")), "answer": hf.Value("int8")}
    records = load_hf_task("scienceqa_img", _save(hf, tmp_path / "sqa", columns, features, split="test"))
    assert [r["answers"] for r in records] == [["A"], ["B"]]
    assert records[0]["options"] == ["West Virginia", "Louisiana", "Arizona", "Oklahoma"]
    assert [r["category"] for r in records] == ["social science", "language science"]
    assert records[0]["sqa_category"] == "Geography" and records[1]["hint"] == "Look at the guide words."
    assert [r["id"] for r in records] == ["0", "1"]
    assert format_question("scienceqa_img", records[1]) == (
        "Context: Look at the guide words.\nWhich word would you find on a dictionary page?\nA. hurry\nB. hump"
        + LETTER)


def test_hub_ids_configs_and_splits(hf: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    questions, images = _gqa_folders(hf, tmp_path, ["n161313", "n235859"])
    calls: list[tuple[str, str | None, str]] = []

    def fake_load_dataset(path: str, name: str | None = None, *, split: str) -> Any:
        calls.append((path, name, split))
        return hf.load_from_disk(images if name.endswith("_images") else questions)[split]

    monkeypatch.setattr(hf, "load_dataset", fake_load_dataset)
    assert len(load_hf_task("gqa")) == 3
    assert calls == [("lmms-lab/GQA", "testdev_balanced_instructions", "testdev"),
                     ("lmms-lab/GQA", "testdev_balanced_images", "testdev")]
    calls.clear()
    load_hf_task("gqa", "lmms-lab/GQA", name="testdev_all_instructions")
    assert calls[1] == ("lmms-lab/GQA", "testdev_all_images", "testdev")
    expected = {"vqav2": ("lmms-lab/VQAv2", None, "validation"), "textvqa": ("lmms-lab/textvqa", None, "validation"),
                "pope": ("lmms-lab/POPE", None, "test"), "mme": ("lmms-lab/MME", None, "test"),
                "scienceqa_img": ("lmms-lab/ScienceQA", "ScienceQA-IMG", "test")}
    for task, (hub_id, config, split) in expected.items():
        assert (HF_TASKS[task].hub_id, HF_TASKS[task].config, HF_TASKS[task].split) == (hub_id, config, split)


def test_bad_arguments(hf: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="task must be one of"):
        load_hf_task("okvqa")
    with pytest.raises(FileNotFoundError, match="save_to_disk"):
        load_hf_task("mme", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="limit"):
        load_hf_task("mme", str(tmp_path), limit=-1)


def test_without_datasets_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_hf_task("mme", str(tmp_path))


# --- prompts ------------------------------------------------------------------------------------------


def test_prompts_per_task() -> None:
    assert format_question("vqav2", {"question": "What color is the bus?"}) == "What color is the bus?" + SHORT
    assert format_question("gqa", {"question": "Is it overcast?"}) == "Is it overcast?" + SHORT
    assert format_question("pope", {"question": " Is there a dog in the image? "}) == (
        "Is there a dog in the image?" + SHORT)
    assert format_question("mme", {"question": "Is a c++ code shown in the picture? Please answer yes or no."}) == (
        "Is a c++ code shown in the picture?" + SHORT)
    record = {"question": "what is the brand of this NASA camera?", "ocr_tokens": ["dakota", "digital"]}
    assert format_question("textvqa", record) == "What is the brand of this nasa camera?" + SHORT
    assert format_question("textvqa", record, ocr=True) == (
        "What is the brand of this nasa camera?\nReference OCR token: dakota, digital" + SHORT)
    sqa = {"question": "Which of these states is farthest north?", "options": ["West Virginia", "Arizona"], "hint": ""}
    assert format_question("scienceqa_img", sqa) == (
        "Which of these states is farthest north?\nA. West Virginia\nB. Arizona" + LETTER)
    assert format_question("shapes", {"question": "how many circles are there?"}) == "how many circles are there?"


def test_prompt_overrides() -> None:
    record = {"question": "Is there a dog? Please answer yes or no."}
    assert format_question("vqav2", {"question": "Q?"}, "Look. ", "") == "Look. Q?"
    assert format_question("gqa", {"question": "Q?"}, post_prompt=" Answer:") == "Q? Answer:"
    # MME keeps its own instruction only when both pre and post are empty.
    assert format_question("mme", record, "", "") == "Is there a dog? Please answer yes or no."
    assert format_question("mme", record, "Hi. ", "") == "Hi. Is there a dog?"
    assert format_question("shapes", {"question": "q"}, "pre ", " post") == "pre q post"


def test_prompt_errors() -> None:
    with pytest.raises(ValueError, match=r"task must be one of \['gqa', 'mme', 'pope', 'scienceqa_img'"):
        format_question("okvqa", {"question": "q"})
    with pytest.raises(ValueError, match="'options'"):
        format_question("scienceqa_img", {"id": "7", "question": "q"})
    with pytest.raises(ValueError, match="ocr applies"):
        format_question("gqa", {"question": "q"}, ocr=True)
    assert set(PROMPTS) == set(HF_TASKS) | {"shapes"}


def test_the_runner_answers_a_hf_task_from_a_folder(hf: Any, tmp_path: Path) -> None:
    from pyrtok.eval.config import load_config
    from pyrtok.eval.runner import run

    from pyrtok.testing import save_tiny_vlm

    columns = {"question_id": ["a", "b", "c"], "question": ["Is there a red square in the image?"] * 3,
               "answer": ["yes", "no", "yes"], "category": ["random", "popular", "random"],
               "image": [_image((255, 0, 0)), _image((0, 0, 255)), _image((255, 0, 0))]}
    features = {"question_id": hf.Value("string"), "question": hf.Value("string"), "answer": hf.Value("string"),
                "category": hf.Value("string"), "image": hf.Image()}
    folder = _save(hf, tmp_path / "pope", columns, features, split="test")
    model = save_tiny_vlm("llava", tmp_path / "model")
    config = load_config({
        "name": "hf", "output": str(tmp_path / "out"), "batch_size": 2,
        "models": [{"name": "tiny", "path": str(model), "levels": 1, "max_new_tokens": 2}],
        "allocators": ["laplacian"], "budgets": [1.0, 0.25],
        "tasks": [{"name": "pope", "source": "hf", "hf_task": "pope", "path": folder, "limit": 2}]})
    _, rows = run(config, progress=False)
    assert len(rows) == 2 * 2 and {r["task"] for r in rows} == {"pope"}
    assert all(r["error"] in (None, "empty answer") for r in rows)  # every image was read and encoded
