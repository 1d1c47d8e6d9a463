"""The open form of the spatial questions (a training wording): its text and answer against the scene's own
geometry, its place among the wording draws, and the vocabulary and config of the recipe that asks it."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from pyrtok.data.conversations import OPEN_WORDS, open_question, reword, scene_batch, vocabulary
from pyrtok.data.shapes_vqa import make_scene, object_name, questions_for
from pyrtok.embedded.tiny import build
from pyrtok.embedded.train import load_config

EMBEDDED = Path(__file__).parents[1] / "configs" / "embedded"
RESTART_TURNS = {"coarse": 2, "fine": 2, "counting": 1, "spatial": 4, "existence": 3}
SHIPPED_CONVERSATIONS = "761ac0075aecdee9a04d6abba1c22b7240191e04590ca83dc5b08058266f8f2d"


def _direction(scene, question: str) -> str:
    """The direction word a spatial question's open form must be answered with, from the objects' centres."""
    names = {object_name(o, scene.objects): o for o in scene.objects}
    half = scene.image.size[0] / 2
    for name, thing in names.items():
        if question == f"is the {name} on the left side?" or question == f"is the {name} on the right side?":
            return "left" if thing.centre[0] < half else "right"
    for a_name, a in names.items():
        for b_name, b in names.items():
            if question == f"is the {a_name} left of the {b_name}?":
                return "left" if a.centre[0] < b.centre[0] else "right"
            if question == f"is the {a_name} above the {b_name}?":
                return "above" if a.centre[1] < b.centre[1] else "below"
    raise AssertionError(f"no object pair matches {question!r}")


def test_open_answers_follow_the_scene_geometry_for_every_kind_of_spatial_question():
    seen = set()
    for index in range(300):
        scene = make_scene(0, "validation", index)
        item = questions_for(scene, 0, "validation", index)[3]
        text, answer = open_question(item["question"], item["answer"])
        assert answer == _direction(scene, item["question"]), item
        kind = "side" if "side" in text else text.split(" or ")[0].split()[-1]
        side = item["question"].replace(" on the left side?", " on the right side?")
        assert text == {"side": side.replace(" on the right side?", " on the left or right side?"),
                        "left": item["question"].replace(" left of ", " left or right of "),
                        "above": item["question"].replace(" above ", " above or below ")}[kind]
        seen.add((kind, answer))
    # every form and every answer occurs
    assert seen == {("side", "left"), ("side", "right"), ("left", "left"), ("left", "right"), ("above", "above"),
                    ("above", "below")}


def test_open_question_names_its_bad_input():
    with pytest.raises(ValueError, match="answer must be 'yes' or 'no'"):
        open_question("is the red circle left of the big square?", "left")
    with pytest.raises(ValueError, match="spatial yes / no question"):
        open_question("is there a red circle?", "yes")


def test_open_wording_asks_half_the_spatial_turns_openly_and_leaves_other_recipes_draws_alone():
    wording = {"suffix": 0.4, "pope": 0.5, "unknown": 0.1}
    # a recipe without the open form draws exactly what it drew before the form existed (these conversations,
    # as the recipes without it were trained on them, hashed)
    for without in (wording, {**wording, "open": 0.0}):
        _, before = scene_batch("train", 0, 40, 32, turns=RESTART_TURNS, wording=without)
        assert hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest() == SHIPPED_CONVERSATIONS
    _, plain = scene_batch("train", 0, 80, 32, turns=5, wording=wording)
    _, opened = scene_batch("train", 0, 80, 32, turns=5, wording={**wording, "open": 0.5})
    turns = [t for i in opened for t in (i, *i["more"])]
    spatial = [t for t in turns if t["family"] == "spatial"]
    open_turns = [t for t in spatial if t["answer"] not in ("yes", "no")]
    assert 0.3 < len(open_turns) / len(spatial) < 0.7
    for turn in open_turns:
        assert turn["text"].split("\n")[0].split(" <unk>")[0] == open_question(turn["question"], "yes")[0]
    # only spatial turns change their answer; the benchmark's question stays in "question"
    before = [t for i in plain for t in (i, *i["more"])]
    assert [t["question"] for t in turns] == [t["question"] for t in before]
    assert all(t["answer"] == u["answer"] for t, u in zip(turns, before, strict=True) if t["family"] != "spatial")
    # the draws are made whatever the item: the same generator state after any item
    states = []
    for item in ({"question": "is there a red circle?", "answer": "yes", "family": "existence"},
                 {"question": "is the red circle above the big square?", "answer": "no", "family": "spatial"}):
        rng = np.random.default_rng(3)
        reword(item, rng, {"open": 1.0})
        states.append(rng.random())
    assert states[0] == states[1]
    # within one conversation each open form is asked once; a repeat keeps its yes / no form
    _, restarts = scene_batch("train", 0, 200, 32, turns=RESTART_TURNS, wording={**wording, "open": 1.0})
    repeats = 0
    for item in restarts:
        conversation_turns = [item, *item["more"]]
        texts = [t["text"].split("\n")[0].split(" <unk>")[0] for t in conversation_turns if t["family"] == "spatial"]
        opened = [t for t in texts if " or " in t]
        assert len(opened) == len(set(opened))
        repeats += len(texts) - len(opened)
        assert all(t["answer"] in ("yes", "no") for t in conversation_turns
                   if t["family"] == "spatial" and " or " not in t["text"])
    assert repeats > 0
    assert reword({"question": "is the big circle on the left side?", "answer": "no", "family": "spatial"},
                  np.random.default_rng(0), {"open": 1.0}) == {"text": "is the big circle on the left or right side?",
                                                                "answer": "right"}


def test_the_open_recipe_tokenizer_knows_every_open_form_and_the_others_are_unchanged():
    assert "below" not in vocabulary(stock_prompts=True)
    words = vocabulary(stock_prompts=True, wording={"open": 0.5})
    assert set(OPEN_WORDS) <= set(words) and set(words) - set(vocabulary(stock_prompts=True)) == {"below"}
    config = load_config(EMBEDDED / "tiny_qwen_open.yaml")
    _, processor = build(config)
    tokenizer = processor.tokenizer
    _, items = scene_batch("train", 0, 60, 224, turns=config["train"]["restart"][0]["turns"],
                           wording=config["train"]["wording"])
    texts = [t["text"] + " " + t["answer"] for i in items for t in (i, *i["more"])]
    assert any(" below" in t for t in texts) and any("left or right of" in t for t in texts)
    assert all(tokenizer.unk_token_id not in tokenizer(t.replace("<unk>", ""))["input_ids"] for t in texts)


def test_the_open_recipe_is_the_previous_qwens_model_with_the_open_wording_and_a_shorter_schedule():
    previous, open_recipe = load_config(EMBEDDED / "tiny_qwen.yaml"), load_config(EMBEDDED / "tiny_qwen_open.yaml")
    for section in ("model", "allocation", "init"):
        assert open_recipe[section] == previous[section], section
    assert open_recipe["train"]["wording"] == {**previous["train"]["wording"], "open": 0.5}
    t = open_recipe["train"]
    assert t["dense_steps"] <= previous["train"]["dense_steps"] and t["freeze_vision_steps"] == t["steps"] - \
        t["dense_steps"]
    assert t["steps"] < previous["train"]["steps"]
