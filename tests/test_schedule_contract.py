"""The contract every registered in-LLM schedule keeps, checked on every name in the schedule registry.

Each schedule runs with its own defaults (the layers its paper uses) on tiny models deep enough for them (25
decoder layers), a LLaVA (1-D positions) and a Qwen2.5-VL (M-RoPE). A newly registered schedule, and each of
its named variants (``Schedule.variants``), is picked up here by itself:

1. with ``keep=1.0`` (every schedule takes ``keep``, the share of image tokens a stage keeps) its own counts
   (:meth:`Schedule.stage_counts`) keep every token and it is the plain run: logits within 1e-5, the same greedy
   tokens;
2. with its defaults, each stage keeps what the schedule's own :meth:`Schedule.stage_counts` says for the
   tokens that entered, and no decoder layer runs on more tokens than the one before it;
3. a batch with per-sample budgets equals each sample alone.
"""

from __future__ import annotations

import pytest
import torch
from conftest import Recorder, chat, random_image
from transformers import LogitsProcessorList

from pyrtok.vlm import PyramidVLM, create_schedule
from pyrtok.vlm.schedules import schedule_variants

LAYERS = 25
SPECS = schedule_variants()  # "name" or "name:variant" -> (name, options)


@pytest.fixture(params=["llava", "qwen2_5_vl"])
def family(request, tiny_vlm):
    _, model, processor = tiny_vlm(request.param, text_layers=LAYERS)
    return model, processor


@pytest.mark.parametrize("spec", list(SPECS))
def test_keeping_everything_is_the_plain_run(family, spec):
    model, processor = family
    name, options = SPECS[spec]
    image, prompt = random_image(200, 260, seed=1), chat(processor)
    # keep everything: keep 1.0, or a reduction ratio of 0 where the variant counts by one (DART's Qwen code)
    everything = {"reduction_ratio": 0.0} if "reduction_ratio" in options else {"keep": 1.0}
    schedule = create_schedule(name, **{**options, **everything})
    assert schedule.stage_counts(12) == [12] * (len(schedule.stages) + 1)
    plain = PyramidVLM(model, processor, allocator="laplacian", budget=12)
    scheduled = PyramidVLM(model, processor, allocator="laplacian", budget=12, schedule=schedule)
    with torch.no_grad():
        reference, ours = plain([image], [prompt]), scheduled([image], [prompt])
    assert (ours.logits - reference.logits).abs().max().item() <= 1e-5
    assert ours.stage_counts.unique().tolist() == [12]
    expected, got = Recorder(), Recorder()
    a = plain.generate([image], [prompt], max_new_tokens=3, logits_processor=LogitsProcessorList([expected]))
    b = scheduled.generate([image], [prompt], max_new_tokens=3, logits_processor=LogitsProcessorList([got]))
    assert torch.equal(a.sequences, b.sequences)
    assert (expected.stacked() - got.stacked()).abs().max().item() <= 1e-5


@pytest.mark.parametrize("spec", list(SPECS))
def test_stages_keep_their_own_counts_and_layers_never_grow(family, spec):
    model, processor = family
    name, options = SPECS[spec]
    schedule = create_schedule(name, **options)
    vlm = PyramidVLM(model, processor, allocator="laplacian", budget=20, schedule=schedule)
    with torch.no_grad():
        out = vlm([random_image(200, 260, seed=2)], [chat(processor)])
    counts = out.stage_counts[0]
    assert counts[0] == 20 and counts.shape[0] == len(schedule.stages) + 1
    assert counts.tolist() == schedule.stage_counts(20)
    tokens = out.layer_tokens[0]
    assert tokens.shape[0] == LAYERS and bool((tokens[1:] <= tokens[:-1]).all())


@pytest.mark.parametrize("spec", list(SPECS))
def test_batched_equals_one_by_one(family, spec):
    model, processor = family
    name, options = SPECS[spec]
    images = [random_image(200, 260, seed=3), random_image(64, 64, seed=4)]
    prompts = [chat(processor), chat(processor, "how many small red circles are there?")]
    budgets = (9, 16)
    vlm = PyramidVLM(model, processor, allocator="laplacian", levels=2, schedule=create_schedule(name, **options))
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
