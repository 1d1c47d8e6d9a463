"""The contract every registered in-LLM schedule keeps, checked on every name in the schedule registry.

Each schedule runs with its own defaults (the layers its paper uses) on tiny models deep enough for them (25
decoder layers), a LLaVA (1-D positions) and a Qwen2.5-VL (M-RoPE). A newly registered schedule is picked up
here by itself:

1. with ``keep=1.0`` (every schedule takes ``keep``, the share of image tokens a stage keeps) it is the plain
   run: logits within 1e-5, the same greedy tokens;
2. with its defaults, each stage keeps what :func:`pyrtok.budget.stage_budgets` gives for the tokens it
   received, and no decoder layer runs on more tokens than the one before it;
3. a batch with per-sample budgets equals each sample alone.
"""

from __future__ import annotations

import pytest
import torch
from conftest import Recorder, chat, random_image
from transformers import LogitsProcessorList

from pyrtok.budget import stage_budgets
from pyrtok.vlm import SCHEDULES, PyramidVLM, create_schedule

LAYERS = 25


@pytest.fixture(params=["llava", "qwen2_5_vl"])
def family(request, tiny_vlm):
    _, model, processor = tiny_vlm(request.param, text_layers=LAYERS)
    return model, processor


@pytest.mark.parametrize("name", SCHEDULES.available())
def test_keeping_everything_is_the_plain_run(family, name):
    model, processor = family
    image, prompt = random_image(200, 260, seed=1), chat(processor)
    plain = PyramidVLM(model, processor, allocator="laplacian", budget=12)
    scheduled = PyramidVLM(model, processor, allocator="laplacian", budget=12,
                           schedule=create_schedule(name, keep=1.0))
    with torch.no_grad():
        reference, ours = plain([image], [prompt]), scheduled([image], [prompt])
    assert (ours.logits - reference.logits).abs().max().item() <= 1e-5
    assert ours.stage_counts.unique().tolist() == [12]
    expected, got = Recorder(), Recorder()
    a = plain.generate([image], [prompt], max_new_tokens=3, logits_processor=LogitsProcessorList([expected]))
    b = scheduled.generate([image], [prompt], max_new_tokens=3, logits_processor=LogitsProcessorList([got]))
    assert torch.equal(a.sequences, b.sequences)
    assert (expected.stacked() - got.stacked()).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", SCHEDULES.available())
def test_stages_keep_their_share_and_layers_never_grow(family, name):
    model, processor = family
    schedule = create_schedule(name)
    vlm = PyramidVLM(model, processor, allocator="laplacian", budget=20, schedule=schedule)
    with torch.no_grad():
        out = vlm([random_image(200, 260, seed=2)], [chat(processor)])
    counts = out.stage_counts[0]
    assert counts[0] == 20 and counts.shape[0] == len(schedule.stages) + 1
    for s, stage in enumerate(schedule.stages):
        assert counts[s + 1] == stage_budgets(stage.keep, counts[s : s + 1])[0]
    tokens = out.layer_tokens[0]
    assert tokens.shape[0] == LAYERS and bool((tokens[1:] <= tokens[:-1]).all())


@pytest.mark.parametrize("name", SCHEDULES.available())
def test_batched_equals_one_by_one(family, name):
    model, processor = family
    images = [random_image(200, 260, seed=3), random_image(64, 64, seed=4)]
    prompts = [chat(processor), chat(processor, "how many small red circles are there?")]
    budgets = (9, 16)
    vlm = PyramidVLM(model, processor, allocator="laplacian", levels=2, schedule=create_schedule(name))
    scores = Recorder()
    batched = vlm.generate(images, prompts, budget=torch.tensor(budgets), max_new_tokens=3,
                           logits_processor=LogitsProcessorList([scores]))
    for b, (image, prompt, budget) in enumerate(zip(images, prompts, budgets, strict=True)):
        alone_scores = Recorder()
        alone = vlm.generate([image], [prompt], budget=budget, max_new_tokens=3,
                             logits_processor=LogitsProcessorList([alone_scores]))
        assert alone.stage_counts.tolist() == batched.stage_counts[b : b + 1].tolist()
        assert torch.equal(alone.layer_tokens[0], batched.layer_tokens[b])
        length = alone.sequences.shape[1]
        assert (scores.stacked()[b, :length] - alone_scores.stacked()[0]).abs().max().item() <= 1e-5
        assert batched.sequences[b, :length].tolist() == alone.sequences[0].tolist()
