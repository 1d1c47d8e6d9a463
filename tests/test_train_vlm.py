"""The tiny-LLaVA training command on a micro configuration: build, train, resume exactly, evaluate, load."""

import json

import torch
from safetensors.torch import load_file

from pyrtok.vlm import PyramidVLM
from pyrtok.vlm.train import _answer_labels, batch, build, load_config, num_tokens, train, vocabulary

MICRO = {
    "model": {"image_size": 64, "patch_size": 16, "vision_hidden": 32, "vision_layers": 2, "vision_heads": 2,
              "vision_intermediate": 64, "text_hidden": 32, "text_layers": 1, "text_heads": 2,
              "text_intermediate": 64, "levels": 2},
    "train": {"steps": 4, "batch_size": 3, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 2,
              "eval_every": 4, "eval_questions": 10, "eval_allocators": ["all", "pool"]},
}


def micro(tmp_path, name):
    return load_config(None, {**MICRO, "train": {**MICRO["train"], "output": str(tmp_path / name)}})


def test_vocabulary_covers_every_answer_and_labels_keep_the_answer():
    words = vocabulary(50)
    assert {"yes", "no", "red", "circle", "7", "k"} <= set(words)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [5, 6, 7, 8, 9, 10]])
    labels = _answer_labels(ids, [2, 3])
    assert labels.tolist() == [[-100, -100, -100, -100, 7, 8], [-100, -100, -100, 8, 9, 10]]


def test_batches_cycle_through_families_and_token_count():
    images, items = batch("train", 0, 10, 64)
    assert images.shape == (10, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    assert [i["family"] for i in items[:5]] == ["coarse", "fine", "counting", "spatial", "existence"]
    assert num_tokens(load_config()) == 196 + 49 + 16


def test_training_resumes_exactly_evaluates_and_saves_a_loadable_model(tmp_path):
    straight = train(micro(tmp_path, "straight"), progress=False)
    config = micro(tmp_path, "sliced")
    train(config, progress=False, stop_after=2)
    sliced = train(config, progress=False)
    a = load_file(str(straight / "checkpoints/step-0000004/model.safetensors"))
    b = load_file(str(sliced / "checkpoints/step-0000004/model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4] and all(row["loss"] > 0 for row in log)
    rows = [json.loads(line) for line in (straight / "eval.jsonl").read_text().splitlines()]
    assert {(r["allocator"], r["fraction"]) for r in rows} == {("all", 1.0), ("all", 0.11), ("pool", 1.0),
                                                               ("pool", 0.11)}
    assert all(0 <= r["overall"] <= 1 for r in rows)
    vlm = PyramidVLM.from_pretrained(straight / "model", allocator="laplacian", budget=8, levels=2)
    images, items = batch("test", 0, 2, 64)
    out = vlm.generate(images, [f"USER: <image> {i['question']} ASSISTANT:" for i in items], max_new_tokens=2)
    assert out.counts.tolist() == [8, 8] and len(out.texts) == 2


def test_pretrained_tower_initialisation(tmp_path):
    model, _ = build(load_config(None, MICRO))
    model.model.vision_tower.save_pretrained(tmp_path / "encoder")
    again, _ = build(load_config(None, {**MICRO, "init": {"vision_tower": str(tmp_path / "encoder")}}))
    assert torch.equal(again.model.vision_tower.embeddings.patch_embedding.weight,
                       model.model.vision_tower.embeddings.patch_embedding.weight)
