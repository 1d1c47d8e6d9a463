"""The tiny-LLaVA training command on a micro configuration: build, train, resume exactly, evaluate, load."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pyrtok._training import lr_factor, merge_config, restarts, turns_at
from pyrtok.data.conversations import (
    answer_labels,
    conversation,
    family_counts,
    scene_batch,
    scene_questions,
    vocabulary,
)
from pyrtok.data.shapes_vqa import COLOURS, DIGITS, LETTERS, TARGETS, make_scene, patch_targets, questions_for
from pyrtok.embedded.tiny import DenseHeads, build
from pyrtok.embedded.train import evaluate, load_config, num_tokens, train
from pyrtok.vlm import PyramidVLM

MICRO = {
    "model": {"image_size": 64, "patch_size": 16, "vision_hidden": 32, "vision_layers": 2, "vision_heads": 2,
              "vision_intermediate": 64, "text_hidden": 32, "text_layers": 1, "text_heads": 2,
              "text_intermediate": 64, "levels": 2},
    "allocation": {"full_steps": 1},
    "train": {"steps": 5, "dense_steps": 2, "dense_batch_size": 4, "batch_size": 3, "warmup_steps": 1,
              "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 3, "eval_every": 4, "eval_questions": 10,
              "eval_allocators": ["all", "pool"]},
}


def micro(tmp_path, name):
    return load_config(None, {**MICRO, "train": {**MICRO["train"], "output": str(tmp_path / name)}})


def test_vocabulary_covers_every_answer_and_labels_keep_the_answer():
    words = vocabulary(50)
    assert {"yes", "no", "red", "circle", "7", "k"} <= set(words)
    from pyrtok.embedded.tokenizer import word_tokenizer

    tokenizer = word_tokenizer(words)
    first = {"question": "what colour is the big circle?", "answer": "red"}
    second = {"question": "how many squares are there?", "answer": "2"}
    texts = [conversation(first), conversation({**first, "more": [second]})]
    assert texts[1] == ("USER: <image> what colour is the big circle? ASSISTANT: red </s> "
                        "USER: how many squares are there? ASSISTANT: 2 </s>")
    rows = [tokenizer(text)["input_ids"] for text in texts]
    ids = torch.tensor([[tokenizer.pad_token_id] * (len(rows[1]) - len(rows[0])) + rows[0], rows[1]])
    labels = answer_labels(ids, tokenizer)
    kept = [tokenizer.convert_ids_to_tokens([i for i in row if i != -100]) for row in labels.tolist()]
    assert kept == [["red", "</s>"], ["red", "</s>", "2", "</s>"]]


def test_batches_cycle_through_families_and_token_count():
    images, items = scene_batch("train", 0, 10, 64)
    assert images.shape == (10, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    assert [i["family"] for i in items[:5]] == ["coarse", "fine", "counting", "spatial", "existence"]
    _, talks = scene_batch("train", 3, 2, 64, turns=3)
    assert [[q["family"] for q in (i, *i["more"])] for i in talks] == [["spatial", "existence", "coarse"],
                                                                       ["existence", "coarse", "fine"]]
    assert talks[0]["question"] == items[3]["question"] and "more" not in items[3]
    with pytest.raises(ValueError, match="turns must be >= 1"):
        scene_batch("train", 0, 1, 64, turns=0)
    assert num_tokens(load_config()) == 196 + 49 + 16


def test_more_turns_than_families_draw_fresh_distinct_questions_about_the_same_scene():
    index = 7
    scene = make_scene(0, "train", index, 64)
    benchmark = questions_for(scene, 0, "train", index)
    ten = scene_questions(scene, 0, "train", index, 10)
    order = [(index + k) % 5 for k in range(5)]
    assert ten[:5] == [benchmark[k] for k in order]  # the split's own questions come first, in batch order
    assert len({q["question"] for q in ten}) == len(ten) > 5
    _, talks = scene_batch("train", index, 1, 64, turns=10)
    first = {k: v for k, v in talks[0].items() if k != "more"}
    assert [first, *talks[0]["more"]] == ten
    alone = next(i for i in range(100) if len(make_scene(0, "train", i, 64).objects) == 1)
    few = scene_questions(make_scene(0, "train", alone, 64), 0, "train", alone, 60)  # runs out of questions
    assert 5 <= len(few) < 60 and len({q["question"] for q in few}) == len(few)


def test_per_family_turns_ask_each_family_its_count_round_robin():
    counts = {"coarse": 2, "fine": 2, "spatial": 4, "existence": 3}  # counting left out: asked once
    index = next(i for i in range(100) if len(make_scene(0, "train", i, 64).objects) == 4)
    scene = make_scene(0, "train", index, 64)
    talk = scene_questions(scene, 0, "train", index, counts)
    families = [q["family"] for q in talk]
    assert {f: families.count(f) for f in families} == {**family_counts(counts), "counting": 1}
    assert talk[0] == questions_for(scene, 0, "train", index)[index % 5]  # the split's question first
    assert families[:5] == [["coarse", "fine", "counting", "spatial", "existence"][(index + k) % 5] for k in range(5)]
    assert len({q["question"] for q in talk}) == len(talk) == 12
    _, items = scene_batch("train", index, 1, 64, turns=counts)
    assert [items[0]["question"]] + [q["question"] for q in items[0]["more"]] == [q["question"] for q in talk]
    with pytest.raises(ValueError, match=r"unknown families \['colour'\]"):
        family_counts({"colour": 2})
    with pytest.raises(ValueError, match="integer >= 1"):
        family_counts({"spatial": 0})


def test_warm_restarts_chain_from_the_end_of_the_run():
    t = load_config(None, {"train": {"steps": 100, "dense_steps": 10, "warmup_steps": 2, "turns": 5, "restart": [
        {"steps": 30, "lr": 5e-4, "turns": 10}, {"steps": 20, "lr": 2e-4, "turns": {"spatial": 3}}]}})["train"]
    first, second = restarts(t)
    assert (first["start"], second["start"]) == (50, 80)
    one = {**t, "steps": 80, "restart": [t["restart"][0]]}  # the same run without the last restart
    assert [lr_factor(s, t) for s in range(80)] == [lr_factor(s, one) for s in range(80)]
    assert lr_factor(81, t) == pytest.approx(2e-4 / t["lr"]) and lr_factor(99, t) < 0.01
    assert (turns_at(5, t), turns_at(49, t), turns_at(50, t), turns_at(80, t)) == (1, 5, 10, {"spatial": 3})
    configured = load_config(None, {"train": {"restart": {"steps": 20, "lr": 2e-4}}})  # as a YAML file sets it
    assert load_config(None, {"train": {"restart": t["restart"]}})["train"]["restart"] == t["restart"]
    assert merge_config(configured, {"train": {"restart": t["restart"]}})["train"]["restart"] == t["restart"]
    single = {**t, "restart": {"steps": 20, "lr": 2e-4, "turns": None}}  # one mapping is one restart
    assert restarts(single)[0]["start"] == 80 and turns_at(90, single) == 5
    with pytest.raises(ValueError, match=r"unknown config key 'train\.restart\[0\]\.rate'"):
        restarts({**t, "restart": [{"steps": 5, "rate": 1e-3}]})


def test_patch_targets_mark_objects_label_and_dots():
    scene = make_scene(0, "train", 3)
    targets = patch_targets(scene, 16)
    assert set(targets) == set(TARGETS) and all(t.shape == (14, 14) for t in targets.values())
    for thing in scene.objects:
        row, col = int(thing.centre[1] // 16), int(thing.centre[0] // 16)
        assert targets["colour"][row, col] == list(COLOURS).index(thing.colour) + 1
    glyph = targets["glyph"]
    assert 1 <= (glyph > 0).sum() <= 4 and set(glyph[glyph > 0].tolist()) == {(DIGITS + LETTERS).index(scene.glyph) + 1}
    x0, y0, x1, y1 = scene.label_box
    assert glyph[int((y0 + y1) / 2 // 16), int((x0 + x1) / 2 // 16)] > 0
    assert (targets["dot"] > 0).sum() == len(scene.dots)
    images, _, batched = scene_batch("train", 3, 2, 224, patch=16)
    assert images.shape == (2, 3, 224, 224) and torch.equal(batched["glyph"][0], torch.from_numpy(glyph))


def test_dense_loss_balances_rare_positives_and_trains_position_heads():
    heads = DenseHeads(8, grid=2)
    features = torch.randn(2, 4, 8)
    targets = {name: torch.zeros(2, 2, 2, dtype=torch.long) for name in TARGETS}
    targets["dot"][0, 0, 0] = 3
    loss = heads(features, targets)
    assert loss.ndim == 0 and loss > 0
    loss.backward()
    assert heads.heads["dot"].weight.grad.abs().sum() > 0
    assert heads.position["row"].weight.grad.abs().sum() > 0 and heads.position["col"].weight.grad.abs().sum() > 0
    # the one dot patch weighs as much as the seven empty ones: "no dot anywhere", confidently, must cost more
    # than a uniform guess (unbalanced, the seven right answers would make it cheaper)
    dot = heads.heads["dot"]
    with torch.no_grad():
        dot.weight.zero_()
        dot.bias.zero_()
    uniform = heads(features, targets)
    with torch.no_grad():
        dot.bias[0] = 5.0
    assert heads(features, targets) > uniform
    with pytest.raises(ValueError, match="2x2 level-0 tokens"):
        heads(torch.randn(2, 9, 8), targets)


def test_training_resumes_exactly_evaluates_and_saves_a_loadable_model(tmp_path):
    from accelerate.utils import set_seed

    straight = train(micro(tmp_path, "straight"), progress=False)
    config = micro(tmp_path, "sliced")
    interrupted = train(config, progress=False, stop_after=3)
    with (interrupted / "log.jsonl").open("a") as f:  # a row logged after the last checkpoint, then a crash
        f.write(json.dumps({"step": 4, "stage": 2, "loss": -1.0}) + "\n")
    sliced = train(config, progress=False)
    a = load_file(str(straight / "checkpoints/step-0000005/model.safetensors"))
    b = load_file(str(sliced / "checkpoints/step-0000005/model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # stage 1 trains the tower (and heads) only: the language model still has its initial weights
    set_seed(0)
    initial, _ = build(config)
    stage1 = load_file(str(straight / "checkpoints/step-0000002/model.safetensors"))
    lm = [k for k in stage1 if k.startswith("llava.model.language_model.")]
    tower = [k for k in stage1 if k.startswith("llava.model.vision_tower.")]
    state = initial.state_dict()
    assert lm and all(torch.equal(stage1[k], state[k.removeprefix("llava.")]) for k in lm)
    assert any(not torch.equal(stage1[k], state[k.removeprefix("llava.")]) for k in tower)
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4, 5] and [row["stage"] for row in log] == [1, 1, 2, 2, 2]
    resumed = [json.loads(line) for line in (sliced / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in resumed] == [1, 2, 3, 4, 5] and min(row["loss"] for row in resumed[2:]) > 0
    assert all(row["loss"] > 0 for row in log[2:]) and all(row["dense_loss"] > 0 for row in log)
    # each row's wall time since the previous one; the resumed log holds each step's once
    assert all(row["seconds"] > 0 for row in log + resumed)
    assert log[2]["tokens"] == num_tokens(config)  # allocation.full_steps: the first stage-2 step keeps all
    rows = [json.loads(line) for line in (straight / "eval.jsonl").read_text().splitlines()]
    assert {(r["allocator"], r["fraction"]) for r in rows} == {("all", 1.0), ("all", 0.11), ("pool", 1.0),
                                                               ("pool", 0.11)}
    assert all(0 <= r["overall"] <= 1 for r in rows)
    vlm = PyramidVLM.from_pretrained(straight / "model", allocator="laplacian", budget=8, levels=2)
    images, items = scene_batch("test", 0, 2, 64)
    out = vlm.generate(images, [f"USER: <image> {i['question']} ASSISTANT:" for i in items], max_new_tokens=2)
    assert out.counts.tolist() == [8, 8] and len(out.texts) == 2


def test_a_warm_restart_extends_a_finished_run_exactly(tmp_path):
    short = micro(tmp_path, "extended")
    short["train"].update(keep_checkpoints=10, checkpoint_every=1)
    train(short, progress=False)
    restart = {"steps": 2, "lr": 8e-4, "turns": 3}
    extended = {**short, "train": {**short["train"], "steps": 7, "restart": restart}}
    resumed = train(extended, progress=False)
    straight = train({**extended, "train": {**extended["train"], "output": str(tmp_path / "straight")}},
                     progress=False)
    for step in (5, 7):  # the steps before the restart are the short run's; the restart resumes exactly
        a = load_file(str(resumed / f"checkpoints/step-{step:07d}/model.safetensors"))
        b = load_file(str(straight / f"checkpoints/step-{step:07d}/model.safetensors"))
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    lrs = [row["lr"] for row in log]  # the LR the next step uses: cosine to 0, then warmed up again
    assert lrs[3] < lrs[2] and lrs[3] < lrs[4] == pytest.approx(restart["lr"]) and lrs[-1] == 0
    with pytest.raises(ValueError, match=r"train\.restart\.steps \(all restarts together\) must be in"):
        train({**extended, "train": {**extended["train"], "restart": {**restart, "steps": 5}}}, progress=False)


def test_evaluation_scores_the_full_budget_once_and_every_allocator_at_each_budget():
    from types import SimpleNamespace

    config = load_config(None, {**MICRO, "train": {**MICRO["train"], "eval_questions": 6,
                                                   "eval_allocators": ["all", "random", "pool"]}})
    n, calls = num_tokens(config), []

    def vlm_for(name):
        def generate(images, prompts, budget, max_new_tokens):
            calls.append((name, budget))
            return SimpleNamespace(texts=["red" if name == "pool" and budget < n else "no"] * len(prompts))
        return SimpleNamespace(generate=generate)

    rows = evaluate(vlm_for, config, torch.device("cpu"))
    small = max(1, -(-11 * n // 100))
    assert calls == [("all", n), ("all", small), ("random", small), ("pool", small)]
    assert [(r["allocator"], r["fraction"]) for r in rows] == [(a, f) for a in ("all", "random", "pool")
                                                              for f in (1.0, 0.11)]
    full = [r for r in rows if r["fraction"] == 1.0]
    assert all(r == {**full[0], "allocator": r["allocator"]} for r in full)
    assert rows[5]["overall"] != rows[3]["overall"]  # pool answered differently at 11%


def test_validation_scores_with_the_harness_exact_match_which_keeps_the_old_numbers_on_the_tiny_model():
    from pyrtok.eval.metrics.exact import first_word_match as harness_rule

    from pyrtok.data.shapes_vqa import ANSWERS
    from pyrtok.embedded.tokenizer import word_tokenizer
    from pyrtok.metrics import first_word, first_word_match

    assert harness_rule is first_word_match  # one definition
    # train-vlm used to score text.split()[:1] == [answer]; the harness rule also lower-cases and trims
    # punctuation. On every text the tiny model can generate in evaluation (two new tokens, decoded as
    # PyramidVLM does), the two agree, so the shipped model's validation numbers keep their meaning.
    tokenizer = word_tokenizer(vocabulary())
    ids = range(len(tokenizer))
    texts = {t.strip() for t in tokenizer.batch_decode([[a, b] for a in ids for b in ids], skip_special_tokens=True)}
    assert {"red", "red ?", "? red", ": 7", ""} <= texts and len(texts) > 5000
    assert all(first_word(a) == a for a in ANSWERS)  # answers need no normalising
    for text in texts:
        old = text.split()[:1]
        new = first_word(text)
        assert (old[0] if old and old[0] in ANSWERS else None) == (new if new in ANSWERS else None), text
    assert first_word_match("Red.", ["red"]) == 1.0 and "Red." not in texts  # where the rules could differ


def test_training_budgets_round_a_fraction_as_budget_tokens_does():
    from pyrtok.allocators import budget_tokens
    from pyrtok.embedded.train import _budgets

    config = load_config()
    n = 261
    generator = torch.Generator().manual_seed(0)
    drawn = _budgets(config, n, 50_000, generator)
    replay = torch.Generator().manual_seed(0)
    a = config["allocation"]
    fractions = a["min_fraction"] + (1 - a["min_fraction"]) * torch.rand(50_000, generator=replay)
    keep_all = torch.rand(50_000, generator=replay) < a["full_probability"]
    pairs = zip(fractions.tolist(), keep_all.tolist(), strict=True)
    reference = torch.tensor([n if full else budget_tokens(f, n) for f, full in pairs])
    assert torch.equal(drawn, reference)
    assert int(drawn.min()) >= 1 and int(drawn.max()) == n and bool(keep_all.any())
    # the float32 draw 218 / 261 + a hair, whose float32 product with 261 is exactly 218.0, is 219 tokens
    assert int(budget_tokens(torch.tensor([0.8352490663528442]), n)) == budget_tokens(0.8352490663528442, n) == 219


def test_layers_flow_one_way():
    import ast

    root = Path(__file__).parents[1] / "pyrtok"

    def imports(path):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        return found

    assert not {m for p in (root / "vlm").glob("*.py") for m in imports(p) if m.startswith("pyrtok.pretrain")}
    assert not {m for p in root.rglob("*.py") for m in imports(p) if m.startswith("pyrtok.eval")}


def test_pretrained_tower_initialisation(tmp_path):
    model, _ = build(load_config(None, MICRO))
    model.model.vision_tower.save_pretrained(tmp_path / "encoder")
    again, _ = build(load_config(None, {**MICRO, "init": {"vision_tower": str(tmp_path / "encoder")}}))
    assert torch.equal(again.model.vision_tower.embeddings.patch_embedding.weight,
                       model.model.vision_tower.embeddings.patch_embedding.weight)


def test_frozen_tower_stage_keeps_the_tower_and_skips_the_dense_loss_after_a_coarse_curriculum(tmp_path):
    config = micro(tmp_path, "frozen")
    config["allocation"].update(coarse_steps=1, full_steps=1)
    config["train"]["turns"] = 5
    config["train"].update(steps=4, dense_steps=2, freeze_vision_steps=4, checkpoint_every=2, eval_every=100)
    config["model"].update(text_init_std=0.1, text_rope_theta=1e6)
    out = train(config, progress=False)
    stage1 = load_file(str(out / "checkpoints/step-0000002/model.safetensors"))
    final = load_file(str(out / "checkpoints/step-0000004/model.safetensors"))
    def changed(prefix):
        keys = [k for k in final if k.startswith(prefix)]
        assert keys
        return [not torch.equal(stage1[k], final[k]) for k in keys]

    assert not any(changed("llava.model.vision_tower."))
    assert any(changed("llava.model.language_model.")) and any(changed("llava.model.multi_modal_projector."))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["dense_loss"] for row in log[2:]] == [0.0, 0.0] and all(row["loss"] > 0 for row in log[2:])
    # the first stage-2 step sees the coarse level only (4 of 4 x 4 + 2 x 2 tokens), the next one everything
    assert num_tokens(config, 1) == 16 and [row["tokens"] for row in log[2:]] == [4, 20]
    # text_init_std sets the language model's initial scale
    model, _ = build(config)
    std = model.model.language_model.layers[0].mlp.up_proj.weight.std().item()
    inv_freq = model.model.language_model.rotary_emb.inv_freq
    assert 0.08 < std < 0.12 and torch.allclose(inv_freq[1], torch.tensor(1e6 ** (-2 / 16)))


def test_export_writes_a_loadable_model_from_any_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from pyrtok.embedded.export import export_checkpoint

    config = micro(tmp_path, "run")
    config["train"].update(steps=3, dense_steps=1, checkpoint_every=1, eval_every=100)
    run = train(config, progress=False)
    out = export_checkpoint(run, tmp_path / "model", checkpoint=run / "checkpoints/step-0000002")
    assert json.loads((out / "training_step.json").read_text())["step"] == 2
    assert load_config(out / "training_config.yaml") == load_config(run / "config.yaml")
    state = load_file(str(run / "checkpoints/step-0000002/model.safetensors"))
    vlm = PyramidVLM.from_pretrained(out, levels=2)
    assert torch.equal(vlm.model.model.multi_modal_projector.linear_1.weight,
                       state["llava.model.multi_modal_projector.linear_1.weight"])
    # checkpoints of runs from before the position heads still export
    older = {k: v for k, v in state.items() if not k.startswith("heads.position.")}
    save_file(older, str(run / "checkpoints/step-0000002/model.safetensors"))
    export_checkpoint(run, tmp_path / "older", checkpoint=run / "checkpoints/step-0000002")
    older["llava.model.multi_modal_projector.linear_1.weight"] = torch.zeros(1)
    save_file(older, str(run / "checkpoints/step-0000002/model.safetensors"))
    with pytest.raises(Exception, match="linear_1"):
        export_checkpoint(run, tmp_path / "broken", checkpoint=run / "checkpoints/step-0000002")


EMBEDDED = Path(__file__).parents[1] / "configs" / "embedded"


@pytest.mark.parametrize("name", sorted(p.name for p in EMBEDDED.glob("*.yaml")))
def test_shipped_embedded_configs_load_with_a_valid_schedule(name):
    t = (config := load_config(EMBEDDED / name))["train"]
    # the LLaVAs' 16 px patches give 196 + 49 + 16 tokens; the Qwen's native 8 x 8 merged grid 64 + 16 + 4
    assert num_tokens(config) == (84 if config["model"]["architecture"] == "qwen2_5_vl" else 261)
    assert sum(p["steps"] for p in restarts(t)) < t["steps"] - t["dense_steps"]
    factors = [lr_factor(step, t) for step in range(t["steps"])]
    assert all(0 <= f <= 1 for f in factors) and factors[-1] < 0.01  # every schedule anneals to ~0
    assert {turns_at(step, t) for step in range(t["dense_steps"])} == {1}


def test_training_mix_is_no_registered_allocator_and_keeps_exact_budgets_whole_levels_and_blobs():
    from pyrtok.allocators import available
    from pyrtok.embedded.train import MIX, TrainingMix, _check
    from pyrtok.tokens import from_feature_grid

    fair = load_config(EMBEDDED / "tiny_llava_fair.yaml")
    assert fair["allocation"]["allocators"] == [MIX] and MIX not in available()
    assert not set(fair["allocation"]["allocators"]) & set(available())  # no evaluated policy is trained on
    tokens = from_feature_grid(torch.rand(64, 8, 8, 4), 3)  # levels of 64, 16 and 4 tokens
    budgets = torch.randint(1, 85, (64,))
    mixed = TrainingMix(whole_levels=0.0)(tokens, budgets, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mixed.count, budgets)
    again = TrainingMix(whole_levels=0.0)(tokens, budgets, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.index, mixed.index)  # a pure function of the generator
    # random per-level shares: among samples keeping 20 tokens, the coarse share ranges widely
    shares = []
    for seed in range(20):
        sel = TrainingMix(whole_levels=0.0)(tokens, 20, generator=torch.Generator().manual_seed(seed))
        shares += ((tokens.level[sel.index] > 0) & sel.mask).float().mean(1).tolist()
    assert min(shares) < 0.1 and max(shares) > 0.7
    # whole levels: every kept set is a union of whole levels
    whole = TrainingMix(whole_levels=1.0)(tokens, 10, generator=torch.Generator().manual_seed(2))
    for b in range(64):
        kept = tokens.level[whole.index[b][whole.mask[b]]]
        levels = kept.unique()
        assert len(kept) == sum(int(tokens.level_sizes[lvl]) for lvl in levels)
    assert len({int(c) for c in whole.count}) > 3
    # blobs: a clumped set keeps more neighbours of its level-0 tokens than a scattered one
    def neighbours(allocator):
        sel = allocator(tokens, 20, generator=torch.Generator().manual_seed(3))
        keep = sel.keep_mask(tokens.num_tokens)[:, tokens.level_slices[0]].float().reshape(64, 1, 8, 8)
        around = torch.nn.functional.conv2d(keep, torch.ones(1, 1, 3, 3), padding=1) - keep
        return float((around * keep).sum() / keep.sum().clamp_min(1))
    blobs = neighbours(TrainingMix(whole_levels=0.0, blobs=1.0, level_spread=0.0))
    scattered = neighbours(TrainingMix(whole_levels=0.0, blobs=0.0, level_spread=0.0))
    assert blobs > 1.5 * scattered
    with pytest.raises(ValueError, match=r"allocation\.allocators must name registered allocators or 'mix'"):
        _check(load_config(None, {"allocation": {"allocators": ["laplacian", "mixx"]}}))
    with pytest.raises(ValueError, match=r"allocation\.mix\.blobs must be a probability"):
        TrainingMix(blobs=2)


def test_scene_labels_of_a_hand_built_scene_and_the_cls_head_loss():
    from PIL import Image

    from pyrtok.data.shapes_vqa import SCENE_LABELS, Scene, Thing, scene_labels

    scene = Scene(Image.new("RGB", (64, 64)),
                  [Thing("circle", "red", (10, 10), 8), Thing("square", "blue", (40, 40), 8),
                   Thing("circle", "blue", (40, 10), 8)],
                  "K", (50, 50, 56, 56), [Thing("circle", "yellow", (5, 50), 2)])
    labels = scene_labels(scene)
    present = {SCENE_LABELS[i] for i in labels.nonzero()[0]}
    assert present == {"colour red", "colour blue", "shape circle", "shape square", "object red circle",
                       "object blue square", "object blue circle", "dot yellow", "glyph k"}
    assert labels.dtype == np.float32 and labels.shape == (len(SCENE_LABELS),) == (84,)
    _, _, targets = scene_batch("train", 0, 3, 64, patch=16)
    assert torch.equal(targets["scene"][1], torch.from_numpy(scene_labels(make_scene(0, "train", 1, 64))))
    heads = DenseHeads(8, grid=2)
    cls = torch.randn(3, 8)
    loss = heads.scene_loss(cls, targets["scene"])
    loss.backward()
    assert loss > 0 and heads.scene[1].weight.grad.abs().sum() > 0
    one = targets["scene"][:1]
    with torch.no_grad():  # a uniform guess costs log 2; confident and right much less, confident and wrong more
        heads.scene[1].weight.zero_()
        heads.scene[1].bias.zero_()
        uniform = heads.scene_loss(cls[:1], one)
        heads.scene[1].bias.copy_(5 * (2 * one[0] - 1))
        right = heads.scene_loss(cls[:1], one)
        wrong = heads.scene_loss(cls[:1], 1 - one)
    assert uniform == pytest.approx(np.log(2), rel=1e-5) and right < 0.01 < np.log(2) < wrong
    with pytest.raises(ValueError, match=r"labels \(B, 84\)"):
        heads.scene_loss(cls, targets["scene"][:, :5])


def test_cls_focus_measures_attention_mass_on_content_against_its_area():
    from types import SimpleNamespace

    from pyrtok.embedded.tiny import cls_focus
    from pyrtok.tokens import from_feature_grid

    attention = torch.zeros(2, 4, 4)
    attention[:, 0, 0] = 3.0  # three quarters of the mass on one patch
    attention[:, 3, 3] = 1.0
    tokens = from_feature_grid(torch.rand(2, 4, 4, 8), 2, attention=attention)
    vlm = SimpleNamespace(encoder=SimpleNamespace(prepare=lambda images: images),
                          encode=lambda prepared: SimpleNamespace(tokens=tokens))
    covered = torch.zeros(2, 4, 4, dtype=torch.bool)
    covered[:, :2, :2] = True
    focus = cls_focus(vlm, torch.rand(2, 3, 64, 64), covered)
    assert focus["mass"] == pytest.approx(0.75) and focus["area"] == pytest.approx(0.25)
    assert focus["lift"] == pytest.approx(3.0)


def test_stock_prompt_words_are_known_and_training_wordings_vary():
    from pyrtok.data.conversations import SHORT_ANSWER, pope_question, reword
    from pyrtok.embedded.tokenizer import word_tokenizer

    tokenizer = word_tokenizer(vocabulary(stock_prompts=True))
    unk = tokenizer.unk_token_id
    lmms_pope = ("USER: <image>\nIs there a red circle in the image?\nAnswer the question using a single word or "
                 "phrase. ASSISTANT:")
    assert unk not in tokenizer(lmms_pope)["input_ids"]
    assert unk in word_tokenizer(vocabulary())(f"what colour? {SHORT_ANSWER}")["input_ids"]  # the old vocabulary
    config = load_config(EMBEDDED / "tiny_llava_fair.yaml")
    assert config["model"]["stock_prompts"] and len(build(config)[1]) == len(tokenizer)
    # wordings: bare, the suffix, POPE's form and unknown words all appear; the benchmark question stays
    _, plain = scene_batch("train", 0, 60, 32, turns=5)
    _, items = scene_batch("train", 0, 60, 32, turns=5, wording=config["train"]["wording"])
    turns = [t for i in items for t in (i, *i["more"])]
    assert [t["question"] for t in turns] == [t["question"] for i in plain for t in (i, *i["more"])]
    texts = [t["text"] for t in turns]
    assert any(t == q["question"] for t, q in zip(texts, turns, strict=True))
    assert any(t.endswith("\n" + SHORT_ANSWER) for t in texts) and any("<unk>" in t for t in texts)
    existence = [t["text"] for t in turns if t["family"] == "existence"]
    assert any("in the image?" in t for t in existence)
    assert not any("in the image" in t["text"] for t in turns if t["family"] != "existence")
    firsts = [conversation(i).split(" ASSISTANT:")[0] for i in items]
    assert all(f == f"USER: <image> {i['text']}" for f, i in zip(firsts, items, strict=True))
    assert any(i["text"] != i["question"] for i in items)  # the first turn is reworded too, in the same template
    _, again = scene_batch("train", 0, 60, 32, turns=5, wording=config["train"]["wording"])
    assert again == items  # a pure function of (seed, split, index)
    assert pope_question("is there a red circle?") == "is there a red circle in the image?"
    assert reword({"question": "is there a red circle?", "answer": "yes", "family": "existence"},
                  np.random.default_rng(0), {"suffix": 0.0, "pope": 0.0, "unknown": 0.0}) == {
        "text": "is there a red circle?", "answer": "yes"}
    with pytest.raises(ValueError, match="existence question"):
        pope_question("what colour is the big circle?")
    with pytest.raises(ValueError, match=r"unknown variants \['prefix'\]"):
        reword({"question": "q?", "answer": "a", "family": "fine"}, np.random.default_rng(0), {"prefix": 1.0})


def test_fair_training_resumes_exactly_with_the_mix_cls_head_and_wordings(tmp_path):
    def fair(name):
        config = micro(tmp_path, name)
        config["model"]["stock_prompts"] = True
        config["allocation"].update(allocators=["mix"], full_steps=0, full_probability=0.0)
        config["train"].update(steps=5, cls_weight=1.0, wording={"suffix": 0.5, "pope": 0.5, "unknown": 0.2},
                               turns=3, eval_every=100, focus_scenes=4, eval_allocators=["all"])
        return config

    straight = train(fair("straight"), progress=False)
    config = fair("sliced")
    train(config, progress=False, stop_after=3)
    sliced = train(config, progress=False)
    for step in (4, 5):
        a = load_file(str(straight / f"checkpoints/step-{step:07d}/model.safetensors"))
        b = load_file(str(sliced / f"checkpoints/step-{step:07d}/model.safetensors"))
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    stage1 = load_file(str(straight / "checkpoints/step-0000002/model.safetensors"))
    assert "heads.scene.1.weight" in stage1
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert all(row["scene_loss"] > 0 for row in log[:2]) and all(row["loss"] > 0 for row in log[2:])
    focus = [json.loads(line) for line in (straight / "cls.jsonl").read_text().splitlines()]
    assert [row["step"] for row in focus] == [2] and 0 <= focus[0]["mass"] <= 1 and 0 < focus[0]["area"] < 1
    vlm = PyramidVLM.from_pretrained(straight / "model", levels=2)
    assert vlm.tokenizer.unk_token_id not in vlm.tokenizer("in the image? answer the question using a single word "
                                                           "or phrase.")["input_ids"][1:]


def test_a_data_worker_builds_the_same_batches_and_a_run_resumes_exactly_with_it(tmp_path, monkeypatch):
    import pyrtok.embedded.train as training
    from pyrtok._prefetch import Prefetcher

    answered = []

    class Counting(Prefetcher):
        def close(self):
            answered.append(self.ahead)
            super().close()

    monkeypatch.setattr(training, "Prefetcher", Counting)
    inline = micro(tmp_path, "inline")
    train(inline, progress=False)
    assert inline["train"]["data_workers"] == 0 == load_config(None)["train"]["data_workers"]  # the default
    config = micro(tmp_path, "worker")
    config["train"]["data_workers"] = 1
    train(config, progress=False, stop_after=3)
    worker = train(config, progress=False)
    assert answered == [0, 2, 1]  # inline: none; the worker made steps 2-3 of the first call and 5 of the second
    for step in (4, 5):  # 4: the first step of the resumed invocation
        a = load_file(str(tmp_path / f"inline/checkpoints/step-{step:07d}/model.safetensors"))
        b = load_file(str(worker / f"checkpoints/step-{step:07d}/model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"train\.data_workers must be 0 .* or 1"):
        train({**config, "train": {**config["train"], "data_workers": 2}}, progress=False)
