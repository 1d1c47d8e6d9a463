"""In-LLM schedules (FastV, PyramidDrop, DART) against references built without pyrtok's layer loop.

What every schedule keeps (keeping everything is the plain run, batched equals one by one, stage counts) is
checked by tests/test_schedule_contract.py over the registry; this module checks each rule's choices.

Tiny random-weight models (4 text layers) are saved with their processors and loaded once per module. Kept sets
are checked against the plain HF model's own eager attention weights (``output_attentions``) or its hidden
states (``output_hidden_states``); generation against a loop that reruns the whole pruned sequence through the
model's own decoder layers at every step, with no cache and no mask (the causal kernel path).
"""

from __future__ import annotations

import copy
import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import Recorder, random_image, recorded
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LogitsProcessorList

from pyrtok.testing import save_tiny_vlm
from pyrtok.vlm import Prepared, PyramidVLM, create_schedule, resolve_schedule, schedule_label
from pyrtok.vlm.decode import language_model, scheduled_flops
from pyrtok.vlm.flops import llm_prefill_flops
from pyrtok.vlm.schedules import matched_keep, schedule_prefill_flops

FAMILIES = ("llava", "qwen2_5_vl")
QUESTION = "what colour is the shape?"
LONG_QUESTION = "how many small red circles are there in the picture on the left?"
# A small theta makes every M-RoPE axis visible at the tolerances used here (see tests/test_families.py).
ROPE = {"rope_type": "default", "rope_theta": 10.0, "mrope_section": [2, 3, 3]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (model (sdpa), eager copy, processor)."""
    cache: dict[str, tuple] = {}

    def load(family: str):
        if family not in cache:
            overrides = {"text_config": {"rope_parameters": ROPE}} if family != "llava" else {}
            folder = save_tiny_vlm(family, tmp_path_factory.mktemp(family), hidden=64, text_layers=4, **overrides)
            model = AutoModelForImageTextToText.from_pretrained(folder).eval()
            eager = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
            cache[family] = (model, eager, AutoProcessor.from_pretrained(folder))
        return cache[family]

    return load


def chat(processor, question: str = QUESTION) -> str:
    content = [{"type": "image"}, {"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def image_of(family: str) -> Image.Image:
    # Qwen: 112x112 px is a 4x4 merged grid (16 image tokens); LLaVA: always 64 tokens
    return random_image(112, 112, seed=5) if family != "llava" else random_image(70, 100, seed=5)


def kept_image_columns(out, image_token_id: int) -> set[int]:
    columns = out.columns[0][out.column_mask[0]]
    return {int(c) for c in columns if int(out.input_ids[0, c]) == image_token_id}


# Keeping everything, batching and stage counts are the schedule contract's (tests/test_schedule_contract.py).

# -- 1. kept sets equal independent references -------------------------------------------------------------------

def top_set(scores: torch.Tensor, columns: torch.Tensor, k: int) -> set[int]:
    return {int(columns[i]) for i in scores.topk(k).indices}


@pytest.mark.parametrize("rule", ["fastv", "pdrop"])
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_rules_keep_what_eager_attention_ranks_first(tiny, family, rule):
    model, eager, processor = tiny(family)
    image, prompt = image_of(family), chat(processor)
    # FastV at layer 2 ranks by layer 1's attention; PyramidDrop at layer 1 by layer 1's own attention.
    spec = {"name": "fastv", "layer": 2, "keep": 0.25} if rule == "fastv" else \
        {"name": "pdrop", "layers": [1], "keep": 0.5}
    vlm = PyramidVLM(model, processor, schedule=spec)
    inputs = vlm.prepare([image], [prompt])
    with torch.no_grad():
        attentions = eager(**inputs.model_inputs(), output_attentions=True).attentions
        ours = vlm([image], [prompt])
    image_columns = (inputs.input_ids[0] == model.config.image_token_id).nonzero()[:, 0]
    n = image_columns.numel()
    k = int(np.ceil(n * spec["keep"]))
    received = attentions[1][0, :, -1, image_columns].mean(0)  # heads averaged, last prompt token's row
    expected = top_set(received, image_columns, k)
    assert kept_image_columns(ours, model.config.image_token_id) == expected
    assert ours.stage_counts.tolist() == [[n, k]]
    # not a trivial set: the lowest-ranked image tokens are gone
    assert len(expected) < n


def decoder_from(lm: torch.nn.Module, start: int) -> torch.nn.Module:
    """A copy of the decoder stack ``lm`` that starts at layer ``start`` (its layers, norm and rotary embedding;
    the copy's config says how many layers it has), to run later stages of a reference on given hidden states.
    Its layers keep their original cache indices, so it runs without a cache."""
    tail = copy.deepcopy(lm)
    tail.layers = torch.nn.ModuleList(list(tail.layers)[start:])
    tail.config.num_hidden_layers = len(tail.layers)
    if getattr(tail.config, "layer_types", None):
        tail.config.layer_types = tail.config.layer_types[start:]
    return tail


@pytest.mark.parametrize("family", FAMILIES)
def test_pyramid_drop_later_stages_keep_what_eager_attention_ranks_first(tiny, family):
    """Every stage of a 3-stage PyramidDrop (pyrtok's ``keep_positions`` variant) against the plain eager model
    run on the sequence as that stage finds it: the stage's layer and those after it, on the columns the earlier
    stages kept, at their original positions; the last prompt token's attention there (heads averaged) ranks the
    image tokens still present. (The released rule, which renumbers positions, is tests/test_published.py's.)"""
    model, eager, processor = tiny(family)
    image, prompt = image_of(family), chat(processor)
    layers, keep = [1, 2, 3], 0.5
    vlm = PyramidVLM(model, processor, schedule={"name": "pdrop", "layers": layers, "keep": keep,
                                                 "rounding": "per_stage", "positions": "keep"})
    inputs = vlm.prepare([image], [prompt])
    ids, positions = inputs.input_ids[0], inputs.position_ids
    image_token = ids == model.config.image_token_id
    with torch.no_grad():
        ours = vlm([image], [prompt])
        hidden = eager(**inputs.model_inputs(), output_hidden_states=True).hidden_states[layers[0]]
    columns = torch.arange(ids.shape[0])  # the prompt columns the current stage sees

    def seen() -> dict:
        # an explicit mask: without one, transformers reads the gaps that dropped tokens leave in the position
        # ids as the starts of packed sequences and stops attention across them
        return {"position_ids": positions[..., columns], "attention_mask": torch.ones(1, columns.numel(),
                                                                                       dtype=torch.long)}

    counts = [int(image_token.sum())]
    for i, layer in enumerate(layers):
        tail = decoder_from(language_model(eager), layer)
        with torch.no_grad():
            attention = tail(inputs_embeds=hidden, **seen(), use_cache=False, output_attentions=True).attentions[0]
        present = columns[image_token[columns]]
        received = attention[0, :, -1, image_token[columns]].mean(0)
        budget = int(np.ceil(present.numel() * keep))
        kept = top_set(received, present, budget)
        assert len(kept) < present.numel()  # the stage drops something
        survivors = ~image_token[columns] | torch.tensor([int(c) in kept for c in columns])
        columns = columns[survivors]
        counts.append(budget)
        if i + 1 < len(layers):  # the next stage's input: this stage's layers run on the kept columns
            with torch.no_grad():
                hidden = tail(inputs_embeds=hidden[:, survivors], **seen(), use_cache=False,
                              output_hidden_states=True).hidden_states[layers[i + 1] - layer]
    assert ours.stage_counts.tolist() == [counts]
    assert kept_image_columns(ours, model.config.image_token_id) == kept
    assert ours.columns[0][ours.column_mask[0]].tolist() == columns.tolist()


def duplication_reference(hidden: torch.Tensor, normed: torch.Tensor, image_columns: list[int], text_after: list[int],
                          budget: int, pivots: int, text_pivots: int) -> set[int]:
    """DART's rule written plainly over Python sets, on one sample's (T, D) states."""
    norms = {c: float(hidden[c].abs().sum()) for c in image_columns + text_after}
    image_pivots = sorted(image_columns, key=lambda c: -norms[c])[: min(pivots, budget)]
    text_chosen = sorted(text_after, key=lambda c: -norms[c])[:text_pivots]
    kept, remaining = set(image_pivots), [c for c in image_columns if c not in image_pivots]
    order = image_pivots + text_chosen
    extra = budget - len(image_pivots)
    for j, pivot in enumerate(order):
        take = extra // len(order) + (1 if j < extra % len(order) else 0)
        similarity = {c: float(F.cosine_similarity(normed[pivot], normed[c], dim=0)) for c in remaining}
        chosen = sorted(remaining, key=lambda c: similarity[c])[:take]
        kept.update(chosen)
        remaining = [c for c in remaining if c not in chosen]
    return kept


@pytest.mark.parametrize("family", FAMILIES)
def test_dart_keeps_the_duplication_rule_set(tiny, family):
    model, _, processor = tiny(family)
    image, prompt = image_of(family), chat(processor)
    # pyrtok's ``exact`` variant (the released rule is tests/test_published.py's)
    spec = {"name": "dart", "layer": 2, "keep": 0.5, "pivots": 2, "text_pivots": 2, "pivot_space": "hidden",
            "exact_budget": True}
    vlm = PyramidVLM(model, processor, schedule=spec)
    inputs = vlm.prepare([image], [prompt])
    with torch.no_grad():
        hidden = model(**inputs.model_inputs(), output_hidden_states=True).hidden_states[2][0]  # input of layer 2
        normed = language_model(model).norm(hidden)
        ours = vlm([image], [prompt])
    ids = inputs.input_ids[0]
    image_columns = (ids == model.config.image_token_id).nonzero()[:, 0].tolist()
    text_after = list(range(image_columns[-1] + 1, ids.shape[0]))
    budget = int(np.ceil(len(image_columns) * 0.5))
    expected = duplication_reference(hidden, normed, image_columns, text_after, budget, 2, 2)
    assert len(expected) == budget
    assert kept_image_columns(ours, model.config.image_token_id) == expected


# -- 2. generation after a pruned prefill --------------------------------------------------------------------------

def no_cache_reference(model, inputs: Prepared, layer: int, kept: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Greedy decoding that reruns, at every step, the whole sequence through the model's own layers without a
    cache: layers before ``layer`` on every prompt column, the rest on the ``kept`` prompt columns (bool (T,)),
    new tokens always, each at the last prompt position + 1 per step (every axis)."""
    lm = language_model(model)
    ids, positions = inputs.input_ids, inputs.position_ids
    image = ids == model.config.image_token_id
    with torch.no_grad():
        prompt_embeds = model.get_input_embeddings()(ids)
        features = torch.cat(list(inputs.mm_encoder_outputs["image"].pooler_output))
        prompt_embeds[image] = features
    new: list[int] = []
    logits_per_step = []
    for _ in range(steps):
        tokens = torch.tensor([new], dtype=torch.long)
        embeds = torch.cat([prompt_embeds, model.get_input_embeddings()(tokens)], dim=1)
        extra = torch.arange(1, len(new) + 1)
        step_positions = torch.cat([positions, positions[..., -1:] + extra], dim=-1)
        columns = torch.cat([kept, torch.ones(len(new), dtype=torch.bool)])
        with torch.no_grad():
            hidden = embeds
            cos, sin = lm.rotary_emb(hidden, step_positions)
            for index, decoder in enumerate(lm.layers):
                if index == layer:
                    hidden, cos, sin = hidden[:, columns], cos[:, columns], sin[:, columns]
                hidden = decoder(hidden, attention_mask=None, position_embeddings=(cos, sin))
            logits = model.get_output_embeddings()(lm.norm(hidden[:, -1]))
        logits_per_step.append(logits[0])
        new.append(int(logits.argmax(-1)))
    return logits_per_step


@pytest.mark.parametrize("spec", [{"name": "fastv", "layer": 2, "keep": 0.25},
                                  {"name": "dart", "layer": 1, "keep": 0.5, "pivots": 2}], ids=lambda s: s["name"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generation_after_pruning_equals_a_no_cache_rerun(tiny, family, spec):
    model, _, processor = tiny(family)
    image, prompt, steps = image_of(family), chat(processor), 5
    vlm = PyramidVLM(model, processor, schedule=spec)
    inputs = vlm.prepare([image], [prompt])
    with torch.no_grad():
        pruned = vlm([image], [prompt])
    kept = torch.zeros(inputs.input_ids.shape[1], dtype=torch.bool)
    kept[pruned.columns[0][pruned.column_mask[0]]] = True
    assert int((~kept).sum()) > 0
    expected = no_cache_reference(model, inputs, spec["layer"], kept, steps)
    recorder = Recorder()
    out = vlm.generate([image], [prompt], max_new_tokens=steps, eos_token_id=[],
                       logits_processor=LogitsProcessorList([recorder]))
    assert out.sequences[0].tolist() == [int(s.argmax()) for s in expected]
    assert (recorded(recorder)[0] - torch.stack(expected)).abs().max().item() <= 1e-5
    # the cache holds, per layer, only what that layer saw
    total = inputs.input_ids.shape[1]
    assert out.layer_tokens[0].tolist() == [total] * spec["layer"] + [int(kept.sum())] * (4 - spec["layer"])



def renumbered_reference(model, inputs: Prepared, stages: dict[int, torch.Tensor], steps: int) -> list[torch.Tensor]:
    """Greedy decoding that reruns, at every step, the whole sequence through the model's own layers without a
    cache, positioned as PyramidDrop's released code positions it: layers before the first stage on every prompt
    column at the prompt's own positions (new tokens at the last prompt position + 1 per step); from the layer of
    each stage in ``stages`` (layer -> bool (T,) of the prompt columns it kept) on, the kept columns and every new
    token at positions 0 .. T'-1, the same on every M-RoPE axis."""
    lm = language_model(model)
    ids, positions = inputs.input_ids, inputs.position_ids
    image = ids == model.config.image_token_id
    with torch.no_grad():
        prompt_embeds = model.get_input_embeddings()(ids)
        prompt_embeds[image] = torch.cat(list(inputs.mm_encoder_outputs["image"].pooler_output))
    new: list[int] = []
    logits_per_step = []
    for _ in range(steps):
        embeds = torch.cat([prompt_embeds, model.get_input_embeddings()(torch.tensor([new], dtype=torch.long))], 1)
        step_positions = torch.cat([positions, positions[..., -1:] + torch.arange(1, len(new) + 1)], dim=-1)
        current = torch.arange(ids.shape[1])  # the prompt columns the current layer runs on
        with torch.no_grad():
            hidden = embeds
            cos, sin = lm.rotary_emb(hidden, step_positions)
            for index, decoder in enumerate(lm.layers):
                if index in stages:
                    chosen = stages[index][current]
                    hidden = hidden[:, torch.cat([chosen, torch.ones(len(new), dtype=torch.bool)])]
                    current = current[chosen]
                    fresh = torch.arange(hidden.shape[1])[None]
                    cos, sin = lm.rotary_emb(hidden, fresh.expand(3, 1, -1) if positions.dim() == 3 else fresh)
                hidden = decoder(hidden, attention_mask=None, position_embeddings=(cos, sin))
            logits = model.get_output_embeddings()(lm.norm(hidden[:, -1]))
        logits_per_step.append(logits[0])
        new.append(int(logits.argmax(-1)))
    return logits_per_step


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_after_renumbering_equals_a_no_cache_rerun(tiny, family):
    """PyramidDrop (released rule) renumbers positions after each drop; decoding goes on from the per-layer
    cache with the new token at each layer's own next position."""
    model, _, processor = tiny(family)
    image, prompt, steps, layers = image_of(family), chat(processor), 5, [1, 3]
    spec = {"name": "pdrop", "layers": layers, "keep": 0.5}
    vlm = PyramidVLM(model, processor, schedule=spec)
    inputs = vlm.prepare([image], [prompt])
    stages = {}
    for s, layer in enumerate(layers):  # a prefix of the schedule keeps what the whole one keeps at that stage
        with torch.no_grad():
            out = vlm([image], [prompt], schedule=dict(spec, layers=layers[: s + 1]))
        stages[layer] = torch.zeros(inputs.input_ids.shape[1], dtype=torch.bool)
        stages[layer][out.columns[0][out.column_mask[0]]] = True
    assert int(stages[3].sum()) < int(stages[1].sum()) < inputs.input_ids.shape[1]
    expected = renumbered_reference(model, inputs, stages, steps)
    recorder = Recorder()
    out = vlm.generate([image], [prompt], max_new_tokens=steps, eos_token_id=[],
                       logits_processor=LogitsProcessorList([recorder]))
    assert out.sequences[0].tolist() == [int(s.argmax()) for s in expected]
    assert (recorded(recorder)[0] - torch.stack(expected)).abs().max().item() <= 1e-5


# -- 3. Qwen3-VL DeepStack -----------------------------------------------------------------------------------------

def test_qwen3_deepstack_keep_everything_is_the_plain_run(tmp_path):
    overrides = {"text_config": {"rope_parameters": dict(ROPE, mrope_interleaved=True)}}
    folder = save_tiny_vlm("qwen3_vl", tmp_path / "q3", hidden=64, text_layers=4, **overrides)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    image, prompt = random_image(70, 100, seed=4), chat(processor)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    vlm = PyramidVLM(model, processor, schedule={"name": "fastv", "layer": 1, "keep": 1.0})
    with torch.no_grad():
        reference = model(**inputs).logits
        ours = vlm([image], [prompt])
        pruned = vlm([image], [prompt], schedule={"name": "fastv", "layer": 1, "keep": 0.5})
    assert (ours.logits - reference).abs().max().item() <= 1e-5
    assert pruned.stage_counts.tolist() == [[6, 3]]


# -- 4. specs, validation, FLOPs -----------------------------------------------------------------------------------

def test_specs_resolve_and_bad_input_is_named(tmp_path):
    path = tmp_path / "pdrop.yaml"
    path.write_text("name: pdrop\nlayers: [8, 16, 24]\nkeep: 0.5\n")
    assert resolve_schedule(path).describe() == "pdrop(layers=[8, 16, 24], keep=0.5)"
    assert resolve_schedule(str(path)).describe() == resolve_schedule({"name": "pdrop"}).describe()
    assert resolve_schedule(None) is None
    assert schedule_label({"name": "fastv", "label": "FastV-25%", "keep": 0.25}) == "FastV-25%"
    assert schedule_label("fastv") == "fastv(layer=2, keep=0.5)"
    with pytest.raises(ValueError, match="unknown schedule 'fast'"):
        create_schedule("fast")
    with pytest.raises(ValueError, match="keep must be a fraction"):
        create_schedule("fastv", keep=1.5)
    with pytest.raises(ValueError, match="strictly increasing"):
        create_schedule("pdrop", layers=[8, 8])
    with pytest.raises(ValueError, match="layer must be an int >= 1"):
        create_schedule("fastv", layer=0)
    with pytest.raises(ValueError, match="one per stage"):
        create_schedule("pdrop", layers=[1, 2], keep=[0.5])
    with pytest.raises(TypeError, match="schedule 'dart'"):
        create_schedule("dart", ratio=0.5)


def test_too_deep_a_layer_and_labels_are_refused(tiny):
    model, _, processor = tiny("llava")
    vlm = PyramidVLM(model, processor, schedule={"name": "pdrop", "layers": [2, 4]})
    image, prompt = image_of("llava"), chat(processor)
    with pytest.raises(ValueError, match="drops at layer 4 but the language model has 4 layers"):
        vlm([image], [prompt])
    with pytest.raises(ValueError, match="labels"):
        vlm([image], [prompt], labels=torch.zeros(1, 3, dtype=torch.long), schedule="fastv")


def test_flops_follow_the_per_layer_counts(tiny):
    model, _, processor = tiny("llava")
    vlm = PyramidVLM(model, processor, schedule={"name": "fastv", "layer": 2, "keep": 0.25})
    with torch.no_grad():
        out = vlm([image_of("llava")], [chat(processor)])
    text = model.config.text_config
    full = out.input_ids.shape[1]
    pruned = full - 64 + 16
    assert out.layer_tokens.tolist() == [[full, full, pruned, pruned]]
    # half the layers at each length, and the LM head once, for the last position
    expected = (llm_prefill_flops(text, full, 0) + llm_prefill_flops(text, pruned, 0)) / 2
    assert scheduled_flops(model.config, out.layer_tokens).item() == pytest.approx(
        expected + 2 * text.hidden_size * text.vocab_size)
    assert scheduled_flops(model.config, out.layer_tokens).item() < llm_prefill_flops(text, full)



@pytest.mark.parametrize(("name", "options"), [("fastv", {"layer": 1}), ("pdrop", {"layers": [1, 2, 3]}),
                                               ("dart", {"layer": 1}), ("vscan", {"layer": 2})])
def test_a_matched_schedule_costs_at_most_the_vision_budget_and_runs_its_counts(tiny, name, options):
    """matched_keep's schedule, run through the model, keeps the per-layer counts it promised; its measured
    prefill FLOPs are at most those of 40 vision-side tokens, and the next keep that keeps more costs more."""
    model, _, processor = tiny("llava")
    prompt, image = chat(processor), image_of("llava")
    text_tokens = len(processor(images=[image], text=[prompt])["input_ids"][0]) - 64
    match = matched_keep(model.config, name, options, image_tokens=64, text_tokens=text_tokens, budget=40)
    assert match is not None and match.ratio <= 1
    vlm = PyramidVLM(model, processor, schedule=match.schedule)
    with torch.no_grad():
        out = vlm([image], [prompt])
    assert out.layer_tokens.tolist() == [[text_tokens + n for n in match.layer_tokens]]
    assert scheduled_flops(model.config, out.layer_tokens).item() == pytest.approx(match.flops)
    assert match.flops <= llm_prefill_flops(model.config.text_config, text_tokens + 40)
    # the first larger keep that changes what the schedule keeps costs more than the budget
    counts = match.schedule.stage_counts(64)
    richer = next(schedule for c in range(round(match.keep * 64) + 1, 65)
                  if (schedule := create_schedule(name, **options, keep=c / 64)).stage_counts(64) != counts)
    assert schedule_prefill_flops(model.config, richer, 64, text_tokens) > match.budget_flops
    # below some budget the layers before the first drop already cost more than the whole vision-side prefill
    assert matched_keep(model.config, name, options, image_tokens=64, text_tokens=text_tokens, budget=1) is None


def test_matched_keep_names_bad_input(tiny):
    model, _, _ = tiny("llava")
    with pytest.raises(ValueError, match="keep"):
        matched_keep(model.config, "fastv", {"layer": 1, "keep": 0.5}, image_tokens=64, text_tokens=10, budget=8)
    with pytest.raises(ValueError, match="budget"):
        matched_keep(model.config, "fastv", {"layer": 1}, image_tokens=64, text_tokens=10, budget=65)
    with pytest.raises(ValueError, match="drops at layer 8"):  # the tiny model has 4 decoder layers
        matched_keep(model.config, "pdrop", {"layers": [8, 16, 24]}, image_tokens=64, text_tokens=10, budget=8)


def test_match_flops_prints_each_schedule_at_each_budget(tiny, tmp_path, capsys):
    from pyrtok.cli import main

    model, _, _ = tiny("llava")
    model.config.save_pretrained(tmp_path)
    main(["match-flops", "--model", str(tmp_path), "--image-tokens", "64", "--text-tokens", "11",
          "--budgets", "0.6", "2", "--schedule", "{name: fastv, layer: 1}"])
    rows = capsys.readouterr().out.splitlines()[1:]
    expected = matched_keep(model.config, "fastv", {"layer": 1}, image_tokens=64, text_tokens=11, budget=39)
    assert " 39 " in rows[0] and repr(expected.keep) in rows[0] and rows[0].endswith(str(expected.layer_tokens))
    assert "none" in rows[1]
    with pytest.raises(SystemExit):
        main(["match-flops", "--model", str(tmp_path), "--image-tokens", "64", "--text-tokens", "11",
              "--budgets", "2.5", "--schedule", "{name: fastv, layer: 1}"])
    assert "--budgets must be fractions" in capsys.readouterr().err

# -- 5. the ablation runner: schedules next to allocators --------------------------------------------------------

def _model_and_local_task(tmp_path, questions: int):
    """A tiny LLaVA (4 decoder layers) saved under ``tmp_path/model`` and a local task of ``questions``
    random images under ``tmp_path/data``; returns the model folder."""
    from pyrtok.data.local import write_split

    folder = save_tiny_vlm("llava", tmp_path / "model", hidden=64, text_layers=4)
    (tmp_path / "data" / "images").mkdir(parents=True)
    records = []
    for i in range(questions):
        random_image(64, 64, seed=i).save(tmp_path / "data" / "images" / f"{i}.png")
        records.append({"id": f"q{i}", "image": f"images/{i}.png", "question": QUESTION, "answers": ["red"],
                        "category": "a"})
    write_split(tmp_path / "data", "test", records)
    return folder


def test_ablation_rows_report_effective_tokens_and_flops(tmp_path):
    from pyrtok.eval.config import load_config
    from pyrtok.eval.report import write_report
    from pyrtok.eval.runner import run

    folder = _model_and_local_task(tmp_path, 3)
    config = load_config({
        "name": "in-llm", "output": str(tmp_path / "out"), "batch_size": 2,
        "models": [{"name": "tiny", "path": str(folder), "levels": 1, "max_new_tokens": 2}],
        "allocators": ["laplacian"], "budgets": [1.0, 32],
        "schedules": [{"name": "fastv", "layer": 2, "keep": 0.25, "label": "fastv"}],
        "tasks": [{"name": "toy", "source": "local", "root": str(tmp_path / "data"), "metric": "exact",
                   "split": "test"}]})
    _, rows = run(config, progress=False)
    by = {}
    for row in rows:
        assert row["error"] in (None, "empty answer")
        by.setdefault((row["allocator"], row["budget"]), []).append(row)
    assert set(by) == {("all", 64), ("laplacian", 32), ("all+fastv", 64), ("laplacian+fastv", 32)}
    full, fastv = by[("all", 64)][0], by[("all+fastv", 64)][0]
    assert full["effective_tokens"] == 64 and fastv["tokens"] == 64
    assert fastv["effective_tokens"] == pytest.approx((64 * 2 + 16 * 2) / 4)
    assert by[("laplacian+fastv", 32)][0]["effective_tokens"] == pytest.approx((32 * 2 + 8 * 2) / 4)
    assert fastv["llm_tflops"] < full["llm_tflops"]
    # a scheduled row's prefill ends at the first token's logits, before its decoding ends
    assert all(0 < r["prefill_s"] < r["llm_s"] for r in by[("all+fastv", 64)] + by[("laplacian+fastv", 32)])
    # the plain cell's FLOPs follow the same per-layer rule at full length
    assert full["llm_tflops"] * 1e12 == pytest.approx(llm_prefill_flops(
        AutoModelForImageTextToText.from_pretrained(folder).config.text_config, full["prompt_tokens"]))
    # the report shows them next to the kept tokens; rows of runs that did not record them show "-"
    older = [{k: v for k, v in r.items() if k != "effective_tokens"} if r["allocator"] == "laplacian" else r
             for r in rows]
    paths = write_report(older, {"toy": "exact"}, tmp_path / "report")
    lines = paths["report"].read_text().splitlines()
    assert lines[2].startswith("| model | allocator | tokens | effective tokens | toy |")
    assert any(line.startswith("| tiny | all | 64 (100%) | 64.0 |") for line in lines)
    assert any(line.startswith("| tiny | all+fastv | 64 (100%) | 40.0 |") for line in lines)
    assert any(line.startswith("| tiny | laplacian+fastv | 32 (50%) | 20.0 |") for line in lines)
    assert any(line.startswith("| tiny | laplacian | 32 (50%) | - |") for line in lines)
    with paths["table"].open() as f:
        table = {(r["allocator"], r["budget"]): r["effective_tokens"] for r in csv.DictReader(f)}
    assert table == {("all", "64"): "64.0", ("all+fastv", "64"): "40.0", ("laplacian", "32"): "-",
                     ("laplacian+fastv", "32"): "20.0"}


def test_a_scheduled_cell_keeps_the_random_tokens_of_its_unscheduled_twin(tmp_path, monkeypatch):
    """The allocator's draws are seeded without the schedule's label: a scheduled cell draws exactly as its
    unscheduled twin (under a schedule that keeps everything, it answers as the plain one)."""
    from pyrtok.eval import runner
    from pyrtok.eval.config import load_config
    from pyrtok.eval.runner import Cell, run

    assert Cell("random+fastv", 16, 0.25, "random", "fastv").selection_key == "random"
    assert Cell("random", 16, 0.25, "random").selection_key == "random"
    folder = _model_and_local_task(tmp_path, 4)
    config = load_config({
        "name": "twins", "output": str(tmp_path / "out"), "batch_size": 2,
        "models": [{"name": "tiny", "path": str(folder), "levels": 1, "max_new_tokens": 4}],
        "allocators": ["random"], "budgets": [4],
        "schedules": [{"name": "fastv", "layer": 2, "keep": 1.0, "label": "keepall"}],
        "tasks": [{"name": "toy", "source": "local", "root": str(tmp_path / "data"), "metric": "exact",
                   "split": "test"}]})
    seeds: list[tuple] = []
    seed = runner._seed
    monkeypatch.setattr(runner, "_seed", lambda *parts: seeds.append(parts) or seed(*parts))
    _, rows = run(config, progress=False)
    answers = {(r["allocator"], r["id"]): r["prediction"] for r in rows}
    assert len(answers) == 4 * 4  # all, random, and each under the schedule
    assert all(answers[("random+keepall", f"q{i}")] == answers[("random", f"q{i}")] for i in range(4))
    # per batch: all, all+keepall, random, random+keepall; each twin pair drew from the same seed
    drawn = [parts[4] for parts in seeds]
    assert sorted(set(drawn)) == ["all", "random"] and len(seeds) == 2 * 4
    assert [p for p in seeds if p[4] == "random"][::2] == [p for p in seeds if p[4] == "random"][1::2]
