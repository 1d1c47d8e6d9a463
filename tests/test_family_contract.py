"""The contract every registered model family keeps, checked on every architecture in the family registry.

Each architecture's tiny random-weight model is saved with its own processor and chat template
(:data:`pyrtok.testing.ARCHITECTURES`); references come from the unwrapped model through that processor, never
from pyrtok's code path. A newly registered family is picked up here by itself (and fails until it has a tiny
build):

1. full budget with ``all`` is the model itself: same input ids, logits within 1e-5, the same greedy tokens
   with the same per-step logits, on an image of odd size and on a prompt with two images;
2. a batch with per-sample budgets equals each sample alone;
3. a schedule that keeps everything changes nothing;
4. each image keeps exactly its budget, and the placeholders are what the prompt carries;
5. a sample without an image, batched beside one with an image, answers as the model does on its text alone.
"""

from __future__ import annotations

import pytest
import torch
from conftest import Recorder, assert_reproduces, chat, random_image
from transformers import LogitsProcessorList

from pyrtok.testing import ARCHITECTURES
from pyrtok.vlm import PyramidVLM, supported_architectures

ODD = (67, 101)  # PIL (width, height): odd on both sides


def test_every_registered_architecture_has_a_tiny_build():
    assert sorted(ARCHITECTURES) == supported_architectures()


@pytest.fixture(params=supported_architectures())
def family(request, tiny_vlm):
    """(model, processor) of one registered architecture."""
    _, model, processor = tiny_vlm(ARCHITECTURES[request.param])
    return model, processor


def test_full_budget_is_the_model_through_its_own_processor(family):
    model, processor = family
    vlm = PyramidVLM(model, processor, allocator="all")
    assert_reproduces(model, processor, vlm, [random_image(*ODD, seed=1)], chat(processor))
    assert_reproduces(model, processor, vlm, [random_image(*ODD, seed=2), random_image(64, 48, seed=3)],
               chat(processor, images=2), steps=2)


def test_batched_per_sample_budgets_equal_one_by_one(family):
    model, processor = family
    images = [random_image(*ODD, seed=4), random_image(64, 64, seed=5)]
    prompts = [chat(processor), chat(processor, "how many small red circles are there?")]
    budgets = (3, 7)
    vlm = PyramidVLM(model, processor, allocator="laplacian", levels=2)
    scores = Recorder()
    batched = vlm.generate(images, prompts, budget=torch.tensor(budgets), max_new_tokens=3,
                           logits_processor=LogitsProcessorList([scores]))
    pad = processor.tokenizer.pad_token_id
    for b, (image, prompt, budget) in enumerate(zip(images, prompts, budgets, strict=True)):
        alone_scores = Recorder()
        alone = vlm.generate([image], [prompt], budget=budget, max_new_tokens=3,
                             logits_processor=LogitsProcessorList([alone_scores]))
        assert alone.counts.tolist() == batched.counts[b : b + 1].tolist()
        length = alone.sequences.shape[1]
        assert (scores.stacked()[b, :length] - alone_scores.stacked()[0]).abs().max().item() <= 1e-5
        assert batched.sequences[b, :length].tolist() == alone.sequences[0].tolist()
        assert (batched.sequences[b, length:] == pad).all()


def test_a_schedule_that_keeps_everything_changes_nothing(family):
    model, processor = family
    image, prompt = random_image(*ODD, seed=6), chat(processor)
    plain = PyramidVLM(model, processor, allocator="laplacian", budget=0.5)
    kept = PyramidVLM(model, processor, allocator="laplacian", budget=0.5,
                      schedule={"name": "fastv", "layer": 1, "keep": 1.0})
    with torch.no_grad():
        reference = plain([image], [prompt]).logits
        ours = kept([image], [prompt])
    assert ours.logits.shape == reference.shape
    assert (ours.logits - reference).abs().max().item() <= 1e-5
    assert ours.stage_counts[0, 0] == ours.stage_counts[0, 1]


@pytest.mark.parametrize("budget", [1, 5, 0.3])
def test_each_image_keeps_its_budget(family, budget):
    model, processor = family
    vlm = PyramidVLM(model, processor, allocator="random", levels=2)
    images = [[random_image(*ODD, seed=7), random_image(48, 80, seed=8)], random_image(64, 64, seed=9)]
    prompts = [chat(processor, images=2), chat(processor)]
    encoded = vlm.encode(images)
    selections = vlm.select(encoded, budget, generator=torch.Generator().manual_seed(0))
    inputs = vlm.prepare(None, prompts, encoded=encoded, selections=selections)
    sizes = encoded.num_tokens()
    expected = [min(budget, n) if isinstance(budget, int) else -(-int(budget * n * 1e6) // 10**6) for n in sizes]
    per_sample = [expected[0] + expected[1], expected[2]]
    assert inputs.encoded.kept(inputs.selections) == per_sample
    placeholders = (inputs.input_ids == vlm.image_token_id).sum(-1)
    assert placeholders.tolist() == inputs.counts.tolist() == [sum(c) for c in inputs.image_counts]
    assert all(c >= k for c, k in zip(inputs.counts.tolist(), per_sample, strict=True))  # + layout tokens


def test_a_sample_without_an_image_answers_as_the_text_model(family):
    model, processor = family
    vlm = PyramidVLM(model, processor, allocator="laplacian", budget=4)
    text_prompt = vlm.chat_prompt("what is two plus two?", images=0)
    out = vlm.generate([random_image(*ODD, seed=10), None], [chat(processor), text_prompt], max_new_tokens=3)
    tokens = processor.tokenizer([text_prompt], return_tensors="pt")
    alone = model.generate(**tokens, max_new_tokens=3, do_sample=False,
                           pad_token_id=processor.tokenizer.pad_token_id)[0, tokens["input_ids"].shape[1]:]
    assert out.sequences[1, : alone.shape[0]].tolist() == alone.tolist()
    assert out.counts.tolist()[1] == 0 and out.image_counts[1] == []
