"""``pyrtok train-vlm --config configs/embedded/<name>.yaml``: train a tiny LLaVA on the shapes VQA benchmark.

The model is a HF ``LlavaForConditionalGeneration`` (CLIP vision tower, 2-layer projector, Llama decoder)
with a word-level tokenizer; both are saved with ``save_pretrained`` so that ``PyramidVLM.from_pretrained``
and plain transformers load the result offline.

Training sees the model exactly as evaluation will: every step encodes a batch of procedural scenes into a
3-level token pyramid, one allocator drawn from ``allocation.allocators`` keeps a random fraction of the
tokens per sample (``full_probability`` of the samples keep everything), and the language model learns
the one-word answer (loss on the answer and end-of-sequence tokens only). So the model learns to answer from
any subset of multi-scale tokens.

Training is staged, because a tiny model trained end to end from scratch answers from the question alone
(the language prior) long before it learns to look. Stage 1 (``train.dense_steps``) trains only the vision
tower, with linear heads on its level-0 tokens that predict what each patch shows (the colour and shape of
the large object covering it, the glyph of the small label, the colour of a tiny dot;
:func:`pyrtok.data.shapes_vqa.patch_targets`) and where it is (its row and column, so that the features
carry their location once an allocator has dropped tokens). Stage 2 trains the VLM on the answers. Its
first ``allocation.coarse_steps`` steps see only the coarse levels (every level but the finest): each of
their tokens covers a large part of an object, so the model learns to read the image from few, telling
tokens (the pooled levels share the features' space, so the skill carries over to the finest level). The
next ``allocation.full_steps`` steps keep all tokens; then the token dropout above starts. With
``train.turns`` > 1 every stage-2 sample is a conversation of that many questions about its image
(:func:`conversation`), so one encoded image supervises several answers; ``turns`` may also map families
to counts (``{spatial: 4, ...}``) to ask the hard ones more often. The last steps of stage 2 can be warm
restarts (SGDR, ``train.restart``: one ``{steps, lr, turns}`` or a list of them): in each, the LR warms up
again to its ``lr`` and follows a new cosine to 0 over its ``steps``, with its own ``turns``. The steps
before a restart are exactly those of the same config without it, so a finished run can be extended by
resuming it under a config with one more restart. The tower can
be frozen for the first ``train.freeze_vision_steps`` steps of stage 2 (or all of them); while it trains,
the dense loss stays on as an auxiliary term (``train.dense_weight``). The vision tower can also start
from a ``pyrtok pretrain`` encoder (``init.vision_tower``). ``model.text_init_std`` sets the initial weight
scale of the language model and the projector (LLaVA initialises both from the text config), and
``model.text_rope_theta`` the language model's RoPE base: a large base keeps the rotary angles small
across the few hundred image tokens, so attention can match image content at any distance.

Batches are a pure function of (seed, step, process): runs resume exactly from the latest checkpoint, and
the same script runs multi-process (see ``pyrtok.pretrain.train`` for the launch commands). Outputs under
``train.output``: ``log.jsonl``, ``eval.jsonl`` (accuracy per family and budget), ``checkpoints/``, and
``model/`` (the final model and tokenizer).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from tqdm.auto import tqdm

from pyrtok import _training
from pyrtok._training import latest_checkpoint, optimizer_step, save_checkpoint, trim_log, warmup_cosine
from pyrtok.data.shapes_vqa import ANSWERS, FAMILIES, TARGETS, make_scene, patch_targets, questions_for
from pyrtok.images import image_tensor
from pyrtok.pretrain.data import step_generator
from pyrtok.vlm.adapter import PyramidVLM
from pyrtok.vlm.tokenizer import word_tokenizer

__all__ = ["build", "conversation", "evaluate", "load_config", "main", "num_tokens", "scene_questions", "train"]

PROMPT = "USER: <image> {question} ASSISTANT:"

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "model": {"image_size": 224, "patch_size": 16, "vision_hidden": 128, "vision_layers": 3, "vision_heads": 4,
              "vision_intermediate": 512, "text_hidden": 128, "text_layers": 3, "text_heads": 4,
              "text_intermediate": 512, "text_init_std": 0.02, "text_rope_theta": 10000.0, "levels": 3,
              "feature_layer": -2},
    "init": {"vision_tower": None},
    "allocation": {"allocators": ["all", "random", "pool", "laplacian"], "min_fraction": 0.05,
                   "full_probability": 0.3, "coarse_steps": 0, "full_steps": 0},
    "train": {"steps": 2000, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.01, "warmup_steps": 100,
              "grad_clip": 1.0, "turns": 1, "dense_steps": 0, "dense_batch_size": 64, "dense_weight": 0.2,
              "freeze_vision_steps": 0, "restart": [],
              "log_every": 10, "checkpoint_every": 200,
              "keep_checkpoints": 2, "eval_every": 500, "eval_questions": 250,
              "eval_budgets": [1.0, 0.11], "eval_allocators": ["all", "random", "pool", "laplacian"],
              "output": "runs/embedded/default"},
}


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """:data:`DEFAULTS`, updated by the YAML at ``path`` and then by ``overrides``."""
    return _training.load_config(DEFAULTS, path, overrides)


def vocabulary(scenes: int = 400) -> list[str]:
    """Every word the prompts and answers of the benchmark use (deterministic)."""
    words = {"user", "assistant", ":", "?"} | set(ANSWERS)
    for index in range(scenes):
        scene = make_scene(0, "train", index, size=32)
        for item in questions_for(scene, 0, "train", index):
            words.update(re.findall(r"\w+|[^\w\s]", item["question"].lower()))
    return sorted(words)


def build(config: dict[str, Any]):
    """A fresh (model, tokenizer) pair from ``config['model']`` (and ``init.vision_tower`` if set)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    m = config["model"]
    tokenizer = word_tokenizer(vocabulary())
    vision = CLIPVisionConfig(hidden_size=m["vision_hidden"], intermediate_size=m["vision_intermediate"],
                              num_hidden_layers=m["vision_layers"], num_attention_heads=m["vision_heads"],
                              image_size=m["image_size"], patch_size=m["patch_size"])
    text = LlamaConfig(hidden_size=m["text_hidden"], intermediate_size=m["text_intermediate"],
                       num_hidden_layers=m["text_layers"], num_attention_heads=m["text_heads"],
                       num_key_value_heads=m["text_heads"], vocab_size=len(tokenizer), max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
                       initializer_range=m["text_init_std"],
                       rope_theta=float(m["text_rope_theta"]))
    model = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=m["feature_layer"], projector_hidden_act="gelu",
    ))
    if config["init"]["vision_tower"]:
        pretrained = CLIPVisionModel.from_pretrained(config["init"]["vision_tower"])
        model.model.vision_tower.load_state_dict(pretrained.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def batch(
    split: str,
    first: int,
    count: int,
    size: int,
    seed: int = 0,
    patch: int | None = None,
    turns: int | Mapping[str, int] = 1,
) -> tuple[Tensor, list[dict]] | tuple[Tensor, list[dict], dict[str, Tensor]]:
    """Scenes ``first .. first+count-1`` of ``split``: images (count, 3, S, S) and one question each.

    The question family cycles with the scene index, so every family is equally represented. With
    ``turns`` > 1, each question also carries ``"more"``: the scene's next ``turns - 1`` questions (the
    following families, cyclically; see :func:`scene_questions` for more than one per family, or for a
    ``{family: count}`` mapping), for multi-turn training. With ``patch``, also the per-patch targets of
    every scene, ``{name: (count, S/patch, S/patch) int64}``.
    """
    many = num_turns(turns)
    if many < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    images, items, targets = [], [], defaultdict(list)
    for index in range(first, first + count):
        scene = make_scene(seed, split, index, size)
        first_question, *more = scene_questions(scene, seed, split, index, turns)
        item = {**first_question, **({"more": more} if many > 1 else {})}
        images.append(image_tensor(scene.image))
        items.append(item)
        if patch is not None:
            for name, value in patch_targets(scene, patch).items():
                targets[name].append(torch.from_numpy(value))
    if patch is None:
        return torch.stack(images), items
    return torch.stack(images), items, {name: torch.stack(v) for name, v in targets.items()}


_DRAW_STRIDE = 100_003  # seed offset between the question draws of one scene


def scene_questions(
    scene: Any, seed: int, split: str, index: int, turns: int | Mapping[str, int]
) -> list[dict]:
    """Up to ``turns`` distinct questions about scene ``index``, families cycling from ``index % 5``.

    The first five are the benchmark's own (:func:`~pyrtok.data.shapes_vqa.questions_for`), so the first is
    exactly the question the split asks; further ones come from fresh draws of the same generator (other
    objects, pairs, absent things), skipping any question already asked. ``turns`` may instead map each
    family to how many of its questions to ask (every family at least once, missing ones once): the
    conversation then goes round the families in the same order, each until its count is reached. A scene
    with little to ask about (one object) may yield fewer questions than asked for.
    """
    order = [(index + k) % len(FAMILIES) for k in range(len(FAMILIES))]
    if isinstance(turns, Mapping):
        counts = family_counts(turns)
        pools: dict[str, list[dict]] = {family: [] for family in FAMILIES}
        for question in _distinct_questions(scene, seed, split, index, order, 4 * max(counts.values())):
            pool = pools[question["family"]]
            if len(pool) < counts[question["family"]]:
                pool.append(question)
            if all(len(pools[f]) == n for f, n in counts.items()):
                break
        rounds = max(counts.values())
        return [pools[FAMILIES[k]][r] for r in range(rounds) for k in order if r < len(pools[FAMILIES[k]])]
    out: list[dict] = []
    for question in _distinct_questions(scene, seed, split, index, order, 4 * math.ceil(turns / len(FAMILIES))):
        out.append(question)
        if len(out) == turns:
            break
    return out


def _distinct_questions(
    scene: Any, seed: int, split: str, index: int, order: list[int], draws: int
) -> Iterator[dict]:
    """The questions of ``draws`` successive draws of the generator about one scene, families in ``order``
    within each draw, each question text once."""
    asked: set[str] = set()
    for draw in range(draws):
        questions = questions_for(scene, seed + draw * _DRAW_STRIDE, split, index)
        for k in order:
            if questions[k]["question"] not in asked:
                asked.add(questions[k]["question"])
                yield questions[k]


def family_counts(turns: Mapping[str, int]) -> dict[str, int]:
    """``{family: questions per image}`` for every family, from a partial mapping (missing ones ask once)."""
    unknown = set(turns) - set(FAMILIES)
    if unknown:
        raise ValueError(f"turns names unknown families {sorted(unknown)}; expected some of {list(FAMILIES)}")
    counts = {family: turns.get(family, 1) for family in FAMILIES}
    bad = {f: n for f, n in counts.items() if not isinstance(n, int) or isinstance(n, bool) or n < 1}
    if bad:
        raise ValueError(f"turns must ask every family an integer >= 1 times, got {bad}")
    return counts


def num_turns(turns: int | Mapping[str, int]) -> int:
    """Questions per image that ``turns`` (a count or a per-family mapping) asks for."""
    return sum(family_counts(turns).values()) if isinstance(turns, Mapping) else turns


class DenseHeads(nn.Module):
    """Linear per-patch classifiers on level-0 tokens: what each patch shows and where it is.

    The scene heads predict :data:`~pyrtok.data.shapes_vqa.TARGETS`; the position heads predict the patch's
    row and column in the ``grid`` x ``grid`` patch grid, so the features keep their location even when an
    allocator drops tokens and the language model no longer sees them in grid order.
    """

    def __init__(self, dim: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.heads = nn.ModuleDict({name: nn.Linear(dim, classes) for name, classes in TARGETS.items()})
        self.position = nn.ModuleDict({name: nn.Linear(dim, grid) for name in ("row", "col")})

    def forward(self, features: Tensor, targets: dict[str, Tensor]) -> Tensor:
        """Mean loss over the six heads for (B, G*G, D) features and ``{name: (B, G, G)}`` scene targets.

        Scene heads use a class-balanced cross-entropy: patches with content (target > 0) and empty patches
        weigh half each, so a one-patch dot counts.
        """
        if features.shape[1] != self.grid**2:
            raise ValueError(f"features must hold {self.grid}x{self.grid} level-0 tokens, got {features.shape[1]}")
        losses = []
        for name, head in self.heads.items():
            target = targets[name].flatten(1)
            loss = F.cross_entropy(head(features).flatten(0, 1), target.flatten(), reduction="none")
            positive = (target.flatten() > 0).float()
            parts = [(loss * w).sum() / w.sum() for w in (positive, 1 - positive) if w.sum() > 0]
            losses.append(sum(parts) / len(parts))
        cells = torch.arange(self.grid**2, device=features.device)
        for name, target in (("row", cells // self.grid), ("col", cells % self.grid)):
            logits = self.position[name](features)
            losses.append(F.cross_entropy(logits.flatten(0, 1), target.repeat(features.shape[0])))
        return sum(losses) / len(losses)


class Trainee(nn.Module):
    """The LLaVA and the dense heads as one module, so one (DDP-wrapped) forward serves both stages."""

    def __init__(self, llava: nn.Module, tokenizer: Any, levels: int) -> None:
        super().__init__()
        self.llava = llava
        vision = llava.config.vision_config
        self.heads = DenseHeads(vision.hidden_size, vision.image_size // vision.patch_size)
        self.tokenizer, self.levels = tokenizer, levels
        self._vlms: dict[str, PyramidVLM] = {}

    def vlm(self, allocator: str) -> PyramidVLM:
        """A :class:`PyramidVLM` view of the LLaVA with ``allocator`` (cached; shares the weights)."""
        if allocator not in self._vlms:
            self._vlms[allocator] = PyramidVLM(self.llava, self.tokenizer, allocator=allocator, levels=self.levels)
        return self._vlms[allocator]

    def forward(
        self,
        images: Tensor,
        targets: dict[str, Tensor],
        items: list[dict] | None = None,
        allocator: str = "all",
        budgets: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(dense loss, answer loss, kept counts); the last two are None without ``items`` (stage 1).

        While the vision tower is frozen it runs without autograd and the dense loss is a constant 0.
        """
        vlm = self.vlm(allocator)
        tower_trains = any(p.requires_grad for p in self.llava.model.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and tower_trains):
            prepared = vlm.encoder.prepare(images)
            tokens = vlm.encode(prepared)
        level0 = tokens.features[:, tokens.level_slices[0]]
        dense = self.heads(level0, targets) if tower_trains else level0.new_zeros(())
        if items is None:
            return dense, None, None
        inputs = vlm.prepare(prepared, [conversation(i) for i in items], budgets, generator=generator, tokens=tokens)
        labels = _answer_labels(inputs["input_ids"], self.tokenizer)
        out = self.llava(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                         position_ids=inputs["position_ids"], labels=labels)
        return dense, out.loss, inputs["counts"]


def num_tokens(config: dict[str, Any], levels: int | None = None) -> int:
    """Tokens in the pyramid of one image: the patch grid and its ceil-halved pooled levels.

    ``levels`` counts only the finest that many levels (default: all of ``model.levels``).
    """
    levels = config["model"]["levels"] if levels is None else levels
    if not 1 <= levels <= config["model"]["levels"]:
        raise ValueError(f"levels must be in [1, model.levels={config['model']['levels']}], got {levels}")
    side, total = config["model"]["image_size"] // config["model"]["patch_size"], 0
    for _ in range(levels):
        total += side * side
        side = (side + 1) // 2
    return total


def _budgets(config: dict[str, Any], n: int, size: int, generator: torch.Generator, full: bool = False) -> Tensor:
    a = config["allocation"]
    fraction = a["min_fraction"] + (1 - a["min_fraction"]) * torch.rand(size, generator=generator)
    keep_all = (torch.rand(size, generator=generator) < a["full_probability"]) | full
    return torch.where(keep_all, torch.full_like(fraction, 1.0), fraction).mul(n).ceil().long().clamp(1, n)


def _allocation(config: dict[str, Any], stage_step: int, size: int, generator: torch.Generator) -> tuple[str, Tensor]:
    """The allocator name and (size,) budgets of stage-2 step ``stage_step``: coarse levels, all, then dropout.

    The draws from ``generator`` are the same in every phase, so resumed runs stay exact.
    """
    a = config["allocation"]
    allocator = a["allocators"][int(torch.randint(len(a["allocators"]), (1,), generator=generator))]
    n = num_tokens(config)
    budgets = _budgets(config, n, size, generator, full=stage_step < a["coarse_steps"] + a["full_steps"])
    if stage_step < a["coarse_steps"]:  # every level but the finest: `all` keeps tokens coarse-first
        return "all", torch.full_like(budgets, n - num_tokens(config, 1))
    return allocator, budgets


def conversation(item: dict) -> str:
    """The training text of a question and its ``"more"`` follow-ups: LLaVA-style turns, image in the first.

    ``USER: <image> q1 ASSISTANT: a1 </s> USER: q2 ASSISTANT: a2 </s> ...``; the first turn is exactly the
    single-question prompt evaluation uses, and later turns supervise more answers per encoded image.
    """
    text = PROMPT.format(question=item["question"]) + f" {item['answer']} </s>"
    return text + "".join(f" USER: {q['question']} ASSISTANT: {q['answer']} </s>" for q in item.get("more", []))


def _answer_labels(input_ids: Tensor, tokenizer: Any) -> Tensor:
    """(B, T) labels that keep every answer: the tokens after each ``ASSISTANT :`` up to its ``</s>``."""
    assistant, colon = tokenizer.convert_tokens_to_ids(["assistant", ":"])
    eos = tokenizer.eos_token_id
    rows = []
    for row in input_ids.tolist():
        labels, answering, previous = [], False, None
        for token in row:
            labels.append(token if answering else -100)
            answering = token != eos if answering else (previous, token) == (assistant, colon)
            previous = token
        rows.append(labels)
    return torch.tensor(rows, dtype=input_ids.dtype, device=input_ids.device)


@torch.no_grad()
def evaluate(vlm_for: Any, config: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    """Accuracy per family on the first ``eval_questions`` validation scenes, per allocator and budget."""
    t, size = config["train"], config["model"]["image_size"]
    n = num_tokens(config)
    rows = []
    images, items = batch("validation", 0, t["eval_questions"], size)
    full: dict[str, float] | None = None  # every allocator keeps every token at a full budget: score it once
    for name in t["eval_allocators"]:
        vlm = vlm_for(name)
        for fraction in t["eval_budgets"]:
            budget = max(1, math.ceil(fraction * n - 1e-9))  # 0.07 * 100 is 7 tokens, as in the harness
            if budget >= n and full is not None:
                rows.append({"allocator": name, "fraction": fraction, **full})
                continue
            correct: dict[str, list[int]] = defaultdict(list)
            for start in range(0, len(items), 32):
                chunk = items[start : start + 32]
                out = vlm.generate(images[start : start + 32].to(device),
                                   [PROMPT.format(question=i["question"]) for i in chunk],
                                   budget=budget, max_new_tokens=2)
                for item, text in zip(chunk, out.texts, strict=True):
                    correct[item["family"]].append(int(text.split()[:1] == [item["answer"]]))
            scores = {"overall": float(np.mean([v for vs in correct.values() for v in vs]))}
            scores.update({family: float(np.mean(v)) for family, v in correct.items()})
            if budget >= n:
                full = scores
            rows.append({"allocator": name, "fraction": fraction, **scores})
    return rows


RESTART: dict[str, Any] = {"steps": 0, "lr": 5e-4, "turns": None}


def restarts(t: dict[str, Any]) -> list[dict[str, Any]]:
    """The warm restarts of ``train.restart`` (one mapping or a list of them), each with a ``start`` step.

    They are the last steps of the run, in order: the final one covers the last ``steps`` steps, the one
    before it the ``steps`` before those, and so on. Entries with ``steps: 0`` are dropped.
    """
    entries = t["restart"] if isinstance(t["restart"], list) else [t["restart"]]
    phases = []
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"train.restart[{k}] must be a mapping of {sorted(RESTART)}, got {entry!r}")
        phases.append(_training.merge_config(RESTART, entry, f"train.restart[{k}]."))
    phases = [p for p in phases if p["steps"]]
    start = t["steps"] - sum(p["steps"] for p in phases)
    for phase in phases:
        phase["start"], start = start, start + phase["steps"]
    return phases


def _phase(step: int, phases: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The warm restart of ``phases`` (from :func:`restarts`) that ``step`` is in, or None before the first."""
    return next((p for p in reversed(phases) if step >= p["start"]), None)


def _schedule(step: int, t: dict[str, Any]) -> float:
    """LR factor: warm-up then flat through stage 1; warm-up then cosine to 0 through stage 2; and in each
    warm restart of ``train.restart``: warm-up to its ``lr`` then cosine to 0 again over its ``steps``."""
    if step < t["dense_steps"]:
        return min(1.0, (step + 1) / max(1, t["warmup_steps"]))
    phases = restarts(t)
    phase = _phase(step, phases)
    if phase is None:
        end = phases[0]["start"] if phases else t["steps"]
        return warmup_cosine(step - t["dense_steps"], t["warmup_steps"], end - t["dense_steps"])
    return phase["lr"] / t["lr"] * warmup_cosine(step - phase["start"], t["warmup_steps"], phase["steps"])


def _turns(step: int, t: dict[str, Any]) -> int | dict[str, int]:
    """Questions per image at ``step`` (a count or per-family counts): 1 in stage 1, ``train.turns`` in
    stage 2, and the ``turns`` of the warm restart it is in, if that sets them."""
    if step < t["dense_steps"]:
        return 1
    phase = _phase(step, restarts(t))
    return phase["turns"] or t["turns"] if phase is not None else t["turns"]


def train(config: dict[str, Any], resume: bool = True, progress: bool = True, stop_after: int | None = None) -> Path:
    """Run (or resume) the training ``config`` describes; returns the output folder.

    ``train.steps`` counts both stages; the first ``train.dense_steps`` of them are stage 1.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
                              step_scheduler_with_optimizer=False)
    set_seed(config["seed"])
    t, m, a = config["train"], config["model"], config["allocation"]
    if not 0 <= t["dense_steps"] < t["steps"]:
        raise ValueError(f"train.dense_steps must be in [0, train.steps={t['steps']}), got {t['dense_steps']}")
    restart_steps = sum(p["steps"] for p in restarts(t))
    if not 0 <= restart_steps < t["steps"] - t["dense_steps"]:
        raise ValueError(f"train.restart.steps (all restarts together) must be in [0, train.steps - "
                         f"train.dense_steps={t['steps'] - t['dense_steps']}), got {restart_steps}")
    if a["coarse_steps"] and m["levels"] < 2:
        raise ValueError(f"allocation.coarse_steps needs model.levels >= 2 (a coarse level), got {m['levels']}")
    output = Path(t["output"])
    checkpoints = output / "checkpoints"
    if accelerator.is_main_process:
        checkpoints.mkdir(parents=True, exist_ok=True)
        (output / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    accelerator.wait_for_everyone()
    llava, tokenizer = build(config)
    trainee = Trainee(llava, tokenizer, m["levels"])
    optimizer = torch.optim.AdamW(trainee.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, t))
    model, optimizer, scheduler = accelerator.prepare(trainee, optimizer, schedule)
    start = 0
    latest = latest_checkpoint(checkpoints) if resume else None
    if latest is not None:
        accelerator.load_state(str(latest))
        start = json.loads((latest / "step.json").read_text())["step"]
        # the saved LR is the old schedule's; this config's (a longer run, a restart) applies from `start`
        for group, base in zip(optimizer.param_groups, schedule.base_lrs, strict=True):
            group["lr"] = base * _schedule(start, t)
    if accelerator.is_main_process:
        for name in ("log.jsonl", "eval.jsonl"):
            trim_log(output / name, start)
    end = t["steps"] if stop_after is None else min(t["steps"], start + stop_after)
    bar = tqdm(range(start, end), initial=start, total=t["steps"], disable=not progress
               or not accelerator.is_main_process, desc=output.name)
    rank, world = accelerator.process_index, accelerator.num_processes
    for step in bar:
        generator = step_generator(config["seed"], step, rank, stream=4)
        stage2 = step >= t["dense_steps"]
        size = t["batch_size"] if stage2 else t["dense_batch_size"]
        first = (step * world + rank) * max(t["batch_size"], t["dense_batch_size"])
        images, items, targets = batch("train", first, size, m["image_size"], config["seed"], m["patch_size"],
                                       turns=_turns(step, t))
        images = images.to(accelerator.device)
        targets = {name: v.to(accelerator.device) for name, v in targets.items()}
        if stage2:
            stage_step = step - t["dense_steps"]
            trainee.llava.model.vision_tower.requires_grad_(stage_step >= t["freeze_vision_steps"])
            allocator, budgets = _allocation(config, stage_step, size, generator)
            dense, answer, counts = model(images, targets, items, allocator, budgets, generator)
            loss = answer + t["dense_weight"] * dense
        else:
            dense, answer, counts = model(images, targets)
            loss = dense
        optimizer_step(accelerator, model, optimizer, scheduler, loss, t["grad_clip"])
        done = step + 1
        if done % t["log_every"] == 0 or done == end:
            losses = accelerator.gather(torch.stack([dense.detach(), (answer if stage2 else dense).detach()]))
            dense_loss, answer_loss = losses.reshape(-1, 2).mean(0).tolist()
            bar.set_postfix(dense=f"{dense_loss:.3f}", **({"answer": f"{answer_loss:.3f}"} if stage2 else {}))
            if accelerator.is_main_process:
                row = {"step": done, "stage": 2 if stage2 else 1, "dense_loss": dense_loss,
                       "lr": scheduler.get_last_lr()[0]}
                if stage2:
                    row.update(loss=answer_loss, tokens=counts.float().mean().item())
                with (output / "log.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")
        if stage2 and (done % t["eval_every"] == 0 or done == t["steps"]) and accelerator.is_main_process:
            trainee.eval()
            rows = evaluate(trainee.vlm, config, accelerator.device)
            trainee.train()
            with (output / "eval.jsonl").open("a") as f:
                for row in rows:
                    f.write(json.dumps({"step": done, **row}) + "\n")
        if done % t["checkpoint_every"] == 0 or done == end:
            save_checkpoint(accelerator, checkpoints, done, t["keep_checkpoints"])
    if accelerator.is_main_process and end == t["steps"]:
        trainee.llava.save_pretrained(output / "model")
        tokenizer.save_pretrained(output / "model")
    accelerator.wait_for_everyone()
    return output


def main(argv: list[str] | None = None) -> None:
    _training.run_cli("pyrtok train-vlm", __doc__.split("\n\n")[0], train, load_config, argv)


if __name__ == "__main__":
    main()
