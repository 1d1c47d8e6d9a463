"""The Qwen2.5-VL embedded architecture through ``train-vlm`` on a micro configuration: its build (processor, chat
template, fixed grid), training that resumes exactly, export, loading with PyramidVLM and with transformers' Auto
classes, and the exported model at full budget equal to the unwrapped model through its own processor."""

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_reproduces
from safetensors.torch import load_file

from pyrtok.data.conversations import scene_batch
from pyrtok.data.shapes_vqa import make_scene
from pyrtok.embedded.models import EMBEDDED_MODELS
from pyrtok.embedded.tiny import ARCHITECTURES, Trainee, build, chat_answer_labels
from pyrtok.embedded.train import _check, load_config, num_tokens, target_patch, train
from pyrtok.vlm import PyramidVLM

EMBEDDED = Path(__file__).parents[1] / "configs" / "embedded"

# 64 px scenes -> 112 px (8 x 8 patches of 14) -> a 4 x 4 merged grid, split into 2 x 2 windows of 56 px; block 1
# attends over the whole image. A small RoPE base makes a wrong M-RoPE position move the logits (see conftest).
QWEN_MICRO = {
    "model": {"architecture": "qwen2_5_vl", "image_size": 64, "resolution": 112, "patch_size": 14, "window_size": 56,
              "fullatt_blocks": [1], "vision_hidden": 32, "vision_layers": 2, "vision_heads": 2,
              "vision_intermediate": 64, "text_hidden": 32, "text_layers": 2, "text_heads": 2, "text_kv_heads": 1,
              "text_intermediate": 64, "text_rope_theta": 10.0, "levels": 2, "stock_prompts": True},
    "allocation": {"allocators": ["mix"], "full_steps": 1},
    "train": {"steps": 5, "dense_steps": 2, "dense_batch_size": 4, "batch_size": 3, "warmup_steps": 1, "turns": 3,
              "cls_weight": 1.0, "wording": {"suffix": 0.5, "pope": 0.5, "unknown": 0.2, "open": 0.5},
              "freeze_vision_steps": 3,
              "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 3, "eval_every": 4, "eval_questions": 6,
              "eval_allocators": ["all", "pool"]},
}


def qwen_micro(folder, **train_options):
    return load_config(None, {**QWEN_MICRO, "train": {**QWEN_MICRO["train"], "output": str(folder),
                                                      **train_options}})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A straight micro run and the same run stopped after 3 steps and resumed."""
    root = tmp_path_factory.mktemp("qwen_runs")
    straight = train(qwen_micro(root / "straight"), progress=False)
    config = qwen_micro(root / "sliced")
    train(config, progress=False, stop_after=3)
    return straight, train(config, progress=False), config


def test_build_is_a_qwen2_5_vl_with_its_processor_chat_template_and_a_fixed_merged_grid():
    config = load_config(None, QWEN_MICRO)
    model, processor = build(config)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    vision = model.config.vision_config
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)
    assert (vision.window_size, list(vision.fullatt_block_indexes)) == (56, [1])
    assert model.config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]  # Qwen's 2:3:3 of head_dim / 2
    # every square image, whatever its side, becomes the same grid: 8 x 8 patches, 4 x 4 merged tokens
    for side in (64, 100):
        image = make_scene(0, "test", 0, side).image
        grid = processor(images=[image], text=["<|image_pad|>"], return_tensors="pt")["image_grid_thw"]
        assert grid.tolist() == [[1, 8, 8]]
    assert num_tokens(config) == 16 + 4 and target_patch(config) == 16
    _, _, targets = scene_batch("train", 0, 2, 64, patch=target_patch(config))
    assert targets["colour"].shape == (2, 4, 4)  # the dense targets are at the merged grid
    # the training conversation starts with exactly the evaluation prompt, in the model's own template
    trainee = Trainee(model, processor, config)
    vlm = trainee.vlm("all")
    item = {"question": "what colour is the big circle?", "answer": "red",
            "more": [{"question": "how many squares are there?", "answer": "2", "text": "how many squares are there?"
                      "\nAnswer the question using a single word or phrase."}]}
    text = ARCHITECTURES["qwen2_5_vl"].conversation(processor, item)
    assert text.startswith(vlm.chat_prompt("what colour is the big circle?") + "red<|im_end|>")
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    tokenizer = processor.tokenizer
    assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]
    assert trainee.heads.grid == 4 and trainee.heads.heads["colour"].in_features == 32  # merged tokens, LM width


def test_chat_answer_labels_keep_the_assistant_answers_only():
    config = load_config(None, QWEN_MICRO)
    _, processor = build(config)
    tokenizer = processor.tokenizer
    arch = ARCHITECTURES["qwen2_5_vl"]
    first = {"question": "what colour is the big circle?", "answer": "red"}
    second = {"question": "how many squares are there?", "answer": "2"}
    rows = [tokenizer(arch.conversation(processor, item))["input_ids"] for item in (first, {**first, "more": [second]})]
    ids = torch.tensor([[tokenizer.pad_token_id] * (len(rows[1]) - len(rows[0])) + rows[0], rows[1]])
    labels = chat_answer_labels(ids, tokenizer)
    kept = [tokenizer.convert_ids_to_tokens([i for i in row if i != -100]) for row in labels.tolist()]
    assert kept == [["red", "<|im_end|>"], ["red", "<|im_end|>", "2", "<|im_end|>"]]
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        chat_answer_labels(ids[0], tokenizer)


def test_qwen_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"model\.resolution must be a positive multiple of"):
        _check(load_config(None, {**QWEN_MICRO, "model": {**QWEN_MICRO["model"], "resolution": 100}}))
    with pytest.raises(ValueError, match=r"model\.image_size 70 must be a multiple of the level-0 grid 4"):
        _check(load_config(None, {**QWEN_MICRO, "model": {**QWEN_MICRO["model"], "image_size": 70}}))
    with pytest.raises(ValueError, match=r"model\.architecture must be one of"):
        num_tokens(load_config(None, {"model": {"architecture": "qwen3_vl"}}))
    with pytest.raises(ValueError, match=r"init\.vision_tower"):
        build(load_config(None, {**QWEN_MICRO, "init": {"vision_tower": "somewhere"}}))


def test_qwen_training_resumes_exactly_trains_the_tower_first_then_the_merger_with_the_language_model(runs):
    from accelerate.utils import set_seed

    straight, sliced, config = runs
    for step in (4, 5):
        a = load_file(str(straight / f"checkpoints/step-{step:07d}/model.safetensors"))
        b = load_file(str(sliced / f"checkpoints/step-{step:07d}/model.safetensors"))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    set_seed(0)
    initial = build(config)[0].state_dict()
    stage1 = load_file(str(straight / "checkpoints/step-0000002/model.safetensors"))
    final = load_file(str(straight / "checkpoints/step-0000005/model.safetensors"))

    def keys(part):
        found = [k for k in stage1 if k.startswith(f"qwen.model.{part}")]
        assert found
        return found

    def same(a, b, part):
        return [torch.equal(a[k], b[k.removeprefix("qwen.")] if b is initial else b[k]) for k in keys(part)]

    # stage 1: the tower and the merger (the heads read merged tokens) train; the language model does not
    assert all(same(stage1, initial, "language_model."))
    assert not any(same(stage1, initial, "visual.blocks.0.mlp.")) and not any(same(stage1, initial, "visual.merger."))
    # stage 2, tower frozen: patch embedding and blocks stay; the merger trains with the language model
    assert all(same(final, stage1, "visual.blocks.")) and all(same(final, stage1, "visual.patch_embed."))
    assert not all(same(final, stage1, "visual.merger.")) and not all(same(final, stage1, "language_model."))
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [row["stage"] for row in log] == [1, 1, 2, 2, 2] and all(row["scene_loss"] > 0 for row in log[:2])
    assert all(row["loss"] > 0 for row in log[2:]) and log[2]["tokens"] == num_tokens(config)
    assert [row["dense_loss"] for row in log[2:]] == [0.0, 0.0, 0.0]
    rows = [json.loads(line) for line in (straight / "eval.jsonl").read_text().splitlines()]
    assert {(r["allocator"], r["fraction"]) for r in rows} == {("all", 1.0), ("all", 0.11), ("pool", 1.0),
                                                               ("pool", 0.11)}
    assert not (straight / "cls.jsonl").exists()  # no [CLS] whose attention to measure


def test_qwen_export_loads_with_pyramidvlm_and_transformers_and_equals_the_unwrapped_model(runs, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pyrtok.embedded.export import export_checkpoint

    straight, _, _ = runs
    out = export_checkpoint(straight, tmp_path / "model", checkpoint=straight / "checkpoints/step-0000004")
    assert json.loads((out / "training_step.json").read_text())["step"] == 4
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor" and processor.chat_template
    state = load_file(str(straight / "checkpoints/step-0000004/model.safetensors"))
    assert torch.equal(model.model.visual.merger.mlp[0].weight, state["qwen.model.visual.merger.mlp.0.weight"])
    vlm = PyramidVLM(model, processor)  # the `all` allocator, one level, every token
    scene = make_scene(0, "test", 0, 64).image
    assert_reproduces(model, processor, vlm, [scene], vlm.chat_prompt("what colour is the big circle?"))
    pyramid = PyramidVLM.from_pretrained(out, allocator="laplacian", budget=5, levels=2)
    images, items = scene_batch("test", 0, 2, 64)
    answers = pyramid.generate(images, [pyramid.chat_prompt(i["question"]) for i in items], max_new_tokens=2)
    assert answers.counts.tolist() == [5, 5] and len(answers.texts) == 2
    # the final model of a finished run is the same folder layout
    assert (straight / "model" / "processor_config.json").is_file()
    assert type(PyramidVLM.from_pretrained(straight / "model", levels=2).processor).__name__ == "Qwen2_5_VLProcessor"


def test_shipped_qwen_config_is_a_deeper_qwen_at_native_resolution_with_the_llava_recipe():
    config = load_config(Path(__file__).parents[1] / EMBEDDED_MODELS["embedded-qwen"][1])  # the shipped recipe
    fair = load_config(EMBEDDED / "tiny_llava_fair.yaml")
    m = config["model"]
    assert m["architecture"] == "qwen2_5_vl" and m["text_layers"] >= 8
    # native resolution: a 224 px scene is 16 x 16 patches, 8 x 8 merged tokens of 28 px (the LLaVA's 16 px: 261)
    assert num_tokens(config) == 64 + 16 + 4 and num_tokens(fair) == 196 + 49 + 16 and target_patch(config) == 28
    # the recipe is the fair model's: the policy-neutral mix, stock prompt words and wordings, the [CLS]-role head
    for section, key in (("allocation", "allocators"), ("allocation", "mix"), ("allocation", "min_fraction"),
                         ("allocation", "full_probability"), ("train", "batch_size"),
                         ("train", "eval_budgets"), ("model", "stock_prompts"), ("model", "levels"),
                         ("model", "image_size")):
        assert config[section][key] == fair[section][key], (section, key)
    # the fair model's wordings, and the open spatial forms (tests/test_open_forms.py)
    def closed(recipe: dict) -> dict:
        return {k: v for k, v in recipe["train"]["wording"].items() if k != "open"}

    assert closed(config) == closed(fair) and config["train"]["wording"]["open"] > 0
    assert config["train"]["cls_weight"] > 0 and config["train"]["freeze_vision_steps"] == \
        config["train"]["steps"] - config["train"]["dense_steps"]
    model, processor = build(config)
    size = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    assert size <= 15e6
    scene = make_scene(0, "test", 0).image  # 224 px as it is: 16 x 16 patches, 8 x 8 merged tokens
    inputs = processor(images=[scene], text=[PyramidVLM(model, processor).chat_prompt("what?")], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 16, 16]]
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 64


def test_the_shipped_qwen_is_exact_at_full_budget_and_answers_the_shapes_benchmark():
    """``embedded-qwen``: the exported tiny Qwen2.5-VL loads by name as HF's own class with its processor; at full
    budget pyrtok gives what the unwrapped model gives through its processor, and it answers most test questions."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pyrtok.embedded.models import embedded_model

    folder = embedded_model("embedded-qwen")
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert model.config.text_config.num_hidden_layers >= 8
    size = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    assert size <= 15e6
    vlm = PyramidVLM(model, processor)
    scene = make_scene(0, "test", 3).image
    assert_reproduces(model, processor, vlm, [scene], vlm.chat_prompt("how many shapes are there?"))
    pyramid = PyramidVLM.from_pretrained("embedded-qwen", levels=3)
    images, items = scene_batch("test", 0, 40, 224)
    answers = pyramid.generate(images, [pyramid.chat_prompt(i["question"]) for i in items], max_new_tokens=2)
    assert answers.counts.tolist() == [84] * 40
    right = sum(t.strip().split(" ")[0] == i["answer"] for t, i in zip(answers.texts, items, strict=True))
    assert right >= 28, (right, list(zip(answers.texts, [i["answer"] for i in items], strict=True)))


def test_the_shipped_qwens_merged_tokens_carry_their_own_position():
    """Its model card says the tower's output tells where each merged token sits, though the tower has no absolute
    position embedding: a linear probe fitted on 64 validation scenes reads the row and the column of the 8 x 8
    grid from the merged tokens of 32 other scenes (chance: 1 in 8)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pyrtok.embedded.models import embedded_model

    folder = embedded_model("embedded-qwen")
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor.image_processor(images=[make_scene(0, "validation", i).image for i in range(96)],
                                       return_tensors="pt")
    with torch.no_grad():
        merged = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    tokens = torch.stack(list(merged)).double()  # (96 scenes, 64 merged tokens in row-major order, 96)
    assert tokens.shape == (96, 64, 96)
    design = torch.cat([tokens, torch.ones(96, 64, 1, dtype=torch.double)], dim=2)
    for name, cell in (("row", torch.arange(64) // 8), ("column", torch.arange(64) % 8)):
        target = torch.nn.functional.one_hot(cell, 8).double().expand(64, -1, -1)
        weights = torch.linalg.lstsq(design[:64].reshape(-1, 97), target.reshape(-1, 8)).solution
        accuracy = ((design[64:] @ weights).argmax(-1) == cell).double().mean().item()
        assert accuracy >= 0.85, (name, accuracy)
