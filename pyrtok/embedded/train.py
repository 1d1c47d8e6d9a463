"""``pyrtok train-vlm --config configs/embedded/<name>.yaml``: train a tiny VLM on the shapes VQA benchmark.

The model (``model.architecture``) is a HF ``LlavaForConditionalGeneration`` (CLIP vision tower, 2-layer
projector, Llama decoder; ``llava``) or ``Qwen2_5_VLForConditionalGeneration`` (native-resolution ViT with window
attention, the 2x2 patch merger, a Qwen2 decoder with M-RoPE, its own processor and chat template;
``qwen2_5_vl``), with a word-level tokenizer (:mod:`pyrtok.embedded.tiny`); all are saved with
``save_pretrained`` so that ``PyramidVLM.from_pretrained`` and plain transformers load the result offline. One
loop trains both; what differs (the tower, the level-0 grid, the scene feature, the conversation's template)
is the architecture's (:class:`pyrtok.embedded.tiny.Architecture`).

Training sees the model exactly as evaluation will: every step encodes a batch of procedural scenes into a
3-level token pyramid, one allocator drawn from ``allocation.allocators`` keeps a random fraction of the
tokens per sample (``full_probability`` of the samples keep everything), and the language model learns
the one-word answer (loss on the answer and end-of-sequence tokens only). So the model learns to answer from
any subset of multi-scale tokens. The name ``mix`` in ``allocation.allocators`` is the policy-neutral
:class:`TrainingMix` (whole levels, or random subsets with random per-level shares, scattered or in random
blobs; ``allocation.mix``), which no evaluated allocator matches, so that no policy meets at test time the
token sets it was trained on.

Training is staged, because a tiny model trained end to end from scratch answers from the question alone
(the language prior) long before it learns to look. Stage 1 (``train.dense_steps``) trains only the vision
tower, with linear heads on its level-0 tokens (LLaVA: the tower's patch states; Qwen: the merged tokens,
after the merger, at the grid the language model sees) that predict what each patch shows (the colour and shape of
the large object covering it, the glyph of the small label, the colour of a tiny dot;
:func:`pyrtok.data.shapes_vqa.patch_targets`) and where it is (its row and column, so that the features
carry their location once an allocator has dropped tokens). Stage 2 trains the VLM on the answers. Its
first ``allocation.coarse_steps`` steps see only the coarse levels (every level but the finest): each of
their tokens covers a large part of an object, so the model learns to read the image from few, telling
tokens (the pooled levels share the features' space, so the skill carries over to the finest level). The
next ``allocation.full_steps`` steps keep all tokens; then the token dropout above starts. With
``train.turns`` > 1 every stage-2 sample is a conversation of that many questions about its image
(:func:`~pyrtok.data.conversations.conversation`), so one encoded image supervises several answers;
``turns`` may also map families to counts (``{spatial: 4, ...}``) to ask the hard ones more often. The
last steps of stage 2 can be warm restarts (SGDR, ``train.restart``: one ``{steps, lr, turns}`` or a list of
them): in each, the LR warms up again to its ``lr`` and follows a new cosine to 0 over its ``steps``, with its
own ``turns`` (:func:`pyrtok._training.lr_factor`). The steps before a restart are exactly those of the same
config without it, so a finished run can be extended by resuming it under a config with one more restart.
With ``train.cls_weight`` > 0, stage 1 also trains the tower's [CLS] token (at the feature layer) to predict
what the scene holds (:func:`pyrtok.data.shapes_vqa.scene_labels`), so that [CLS] attention reads the scene;
``cls.jsonl`` logs how much of that attention falls on content (:func:`pyrtok.embedded.tiny.cls_focus`) at the end
of stage 1 and at every evaluation. Qwen's tower has no [CLS]: its scene head reads the mean of the merged tokens
(and there is no ``cls.jsonl``). ``train.wording`` gives the probabilities of training wordings of a turn
(the short-answer suffix of stock lmms-eval tasks, POPE's "in the image" form, unknown words, and the open
form of a spatial question answered with its direction word; :func:`~pyrtok.data.conversations.reword`), and
``model.stock_prompts`` adds the stock prompts' words to the tokenizer (an open form adds its own); validation
always asks the bare benchmark prompt (in the model's own chat template for Qwen, as the harness does). A LLaVA
conversation is ``USER: <image> q1 ASSISTANT: a1 </s> USER: q2 ...``; a Qwen one is the model's ChatML (default
system message, the image in the first user turn).
The tower can be frozen for the first ``train.freeze_vision_steps`` steps of stage 2 (or all of them; Qwen's
merger, its projector, trains with the language model like LLaVA's projector); while it trains,
the dense (and [CLS]) losses stay on as an auxiliary term (``train.dense_weight``). The vision tower can also start
from a ``pyrtok pretrain`` encoder (``init.vision_tower``). ``model.text_init_std`` sets the initial weight
scale of the language model and the projector (LLaVA initialises both from the text config), and
``model.text_rope_theta`` the language model's RoPE base: a large base keeps the rotary angles small
across the few hundred image tokens, so attention can match image content at any distance.

Batches are a pure function of (seed, step, process): runs resume exactly from the latest checkpoint, and
the same script runs multi-process (``accelerate launch --multi_gpu --num_processes N -m pyrtok.embedded.train
--config ...``; on CPU processes ``ACCELERATE_USE_CPU=true torchrun --nproc_per_node N -m ...``). Validation
scores answers with the harness's first-word exact match (:func:`pyrtok.metrics.first_word_match`), so its
numbers mean what an ablation table's do. Outputs under ``train.output``: ``log.jsonl`` (with ``seconds``, the
wall time since the previous row: their sum is the run's time in its loop, across resumes), ``eval.jsonl``
(accuracy per family and budget), ``checkpoints/``, and ``model/`` (the final model and its processor: a
LLaVA's is its tokenizer). With ``train.data_workers: 1`` a spawned worker process builds the next step's
scenes while this step computes (:class:`pyrtok._prefetch.Prefetcher`), which pays when a core is free (a GPU
run); the default, 0, builds them in the training process, as fast on 2 CPU cores that the training threads
fill (``benchmarks/bench_train_data.py``). The batches are the same either way.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from pyrtok import _training
from pyrtok._prefetch import Prefetcher
from pyrtok._training import Run, lr_factor, optimizer_step, restarts, step_generator, turns_at
from pyrtok.allocators import Allocator, available, budget_tokens
from pyrtok.allocators.base import Context
from pyrtok.data.conversations import PROMPT, WORDING, scene_batch
from pyrtok.embedded.tiny import Trainee, architecture, build, cls_focus
from pyrtok.metrics import first_word_match
from pyrtok.tokens import MultiScaleTokens, pyramid_tokens

# build: the harness and its tests build the tiny model from a train-vlm config through this module
__all__ = ["DEFAULTS", "MIX", "TrainingMix", "build", "evaluate", "load_config", "main", "num_tokens", "target_patch",
           "train"]

MIX = "mix"
"""The name that stands for :class:`TrainingMix` in ``allocation.allocators`` (not a registered allocator)."""

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    # image_size: the scenes' side; the rest of the first line is Qwen's only (resolution: the side its processor
    # resizes every square to; fullatt_blocks: the tower blocks with full attention, the others windowed);
    # feature_layer is LLaVA's only
    "model": {"architecture": "llava", "image_size": 224, "resolution": None, "merge_size": 2,
              "temporal_patch_size": 2, "window_size": 112, "fullatt_blocks": [], "text_kv_heads": None,
              "patch_size": 16, "vision_hidden": 128, "vision_layers": 3, "vision_heads": 4,
              "vision_intermediate": 512, "text_hidden": 128, "text_layers": 3, "text_heads": 4,
              "text_intermediate": 512, "text_init_std": 0.02, "text_rope_theta": 10000.0, "levels": 3,
              "feature_layer": -2, "stock_prompts": False},
    "init": {"vision_tower": None},
    "allocation": {"allocators": ["all", "random", "pool", "laplacian"], "min_fraction": 0.05,
                   "full_probability": 0.3, "coarse_steps": 0, "full_steps": 0,
                   "mix": {"whole_levels": 0.2, "blobs": 0.5, "level_spread": 3.0}},
    "train": {"steps": 2000, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.01, "warmup_steps": 100,
              "grad_clip": 1.0, "turns": 1, "dense_steps": 0, "dense_batch_size": 64, "dense_weight": 0.2,
              "cls_weight": 0.0, "wording": dict(WORDING), "focus_scenes": 64,
              "freeze_vision_steps": 0, "restart": [],
              "log_every": 10, "checkpoint_every": 200, "data_workers": 0,
              "keep_checkpoints": 2, "eval_every": 500, "eval_questions": 250,
              "eval_budgets": [1.0, 0.11], "eval_allocators": ["all", "random", "pool", "laplacian"],
              "output": "runs/embedded/default"},
}


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """:data:`DEFAULTS`, updated by the YAML at ``path`` and then by ``overrides``."""
    return _training.load_config(DEFAULTS, path, overrides)


def num_tokens(config: dict[str, Any], levels: int | None = None) -> int:
    """Tokens in the pyramid of one image: the level-0 grid (LLaVA's patch grid, Qwen's merged grid) and its
    ceil-halved pooled levels.

    ``levels`` counts only the finest that many levels (default: all of ``model.levels``).
    """
    m = config["model"]
    levels = m["levels"] if levels is None else levels
    if not 1 <= levels <= m["levels"]:
        raise ValueError(f"levels must be in [1, model.levels={m['levels']}], got {levels}")
    side = architecture(config).grid(m)
    return pyramid_tokens((side, side), levels)


def target_patch(config: dict[str, Any]) -> int:
    """The side, in scene pixels, of one level-0 token: the patch of the dense targets
    (:func:`~pyrtok.data.shapes_vqa.patch_targets`)."""
    m = config["model"]
    return m["image_size"] // architecture(config).grid(m)


class TrainingMix(Allocator):
    """Policy-neutral training token sets: whole levels, or random subsets with random per-level shares.

    Per sample, with probability ``whole_levels``: a random non-empty set of whole levels (the budget becomes
    their size); otherwise a weighted random subset of the budget's size in which every token of level l
    weighs exp(u_l), u_l uniform in [-``level_spread``, ``level_spread``] per sample and level, so the share of
    each level ranges from almost none to almost all. Those subsets are scattered (independent noise per token)
    or, with probability ``blobs``, clumped into a few random regions (a smooth random field over the image,
    the same at every level), the shapes that content-driven selections take, placed without looking at the
    content. Nothing here reads the image, the features or [CLS]: no evaluated allocator's choice is favoured.
    Not registered: it exists to train, not to be evaluated (``mix`` in ``allocation.allocators``).

    Every draw comes from the call's ``generator`` (memoised per call, so the budget and the choice agree).

    Example:
        >>> from pyrtok.tokens import from_feature_grid
        >>> tokens = from_feature_grid(torch.rand(4, 8, 8, 2), 3)
        >>> mix = TrainingMix(whole_levels=1.0)
        >>> selection = mix(tokens, 10, generator=torch.Generator().manual_seed(0))
        >>> set(selection.count.tolist()) <= {4, 16, 20, 64, 68, 80, 84}  # sums of the level sizes 64, 16 and 4
        True
    """

    def __init__(self, whole_levels: float = 0.2, blobs: float = 0.5, level_spread: float = 3.0, **options) -> None:
        super().__init__(**options)
        for name, value in (("whole_levels", whole_levels), ("blobs", blobs)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"allocation.mix.{name} must be a probability in [0, 1], got {value!r}")
        if not float(level_spread) >= 0.0:
            raise ValueError(f"allocation.mix.level_spread must be >= 0, got {level_spread!r}")
        self.whole_levels, self.blobs, self.level_spread = float(whole_levels), float(blobs), float(level_spread)

    def _draws(self, tokens: MultiScaleTokens, ctx: Context) -> dict[str, Tensor]:
        def draw() -> dict[str, Tensor]:
            g = ctx.generator or torch.Generator().manual_seed(0)
            b, n, levels = tokens.batch_size, tokens.num_tokens, tokens.num_levels
            whole = torch.rand(b, generator=g) < self.whole_levels
            chosen = torch.rand(b, levels, generator=g) < 0.5
            fallback = torch.randint(levels, (b,), generator=g)
            # an empty draw keeps one random level instead
            chosen |= ~chosen.any(1, keepdim=True) & (torch.arange(levels) == fallback.unsqueeze(1))
            logits = (2 * torch.rand(b, levels, generator=g) - 1) * self.level_spread
            blob = torch.rand(b, generator=g) < self.blobs
            sharpness = 1 + 5 * torch.rand(b, 1, generator=g)
            field = torch.randn(b, 1, 3, 3, generator=g)
            gumbel = -torch.log(-torch.log(torch.rand(b, n, generator=g).clamp(1e-9, 1 - 1e-9)))
            smooth = torch.zeros(b, n)
            for lvl, level_slice in enumerate(tokens.level_slices):
                h, w = tokens.level_shapes[lvl]
                grid = F.interpolate(field, size=(h, w), mode="bilinear", align_corners=False)
                smooth[:, level_slice] = rearrange(grid, "b 1 h w -> b (h w)")
            level = tokens.level.cpu()
            priority = logits[:, level] + torch.where(blob.unsqueeze(1), sharpness * smooth + 0.5 * gumbel, gumbel)
            in_chosen = chosen[:, level]
            priority = torch.where(whole.unsqueeze(1), in_chosen.float() * 10 + torch.rand(b, n, generator=g),
                                   priority)
            sizes = (chosen * tokens.level_sizes.cpu()).sum(1)
            device = tokens.device
            return {"whole": whole.to(device), "sizes": sizes.to(device), "priority": priority.to(device)}

        return ctx.cached("training_mix", draw)

    def effective_budgets(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context) -> Tensor:
        draws = self._draws(tokens, ctx)
        return torch.where(draws["whole"], draws["sizes"].to(budgets.dtype), budgets)

    def priority(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context) -> Tensor:
        return self._draws(tokens, ctx)["priority"]


def _budgets(config: dict[str, Any], n: int, size: int, generator: torch.Generator, full: bool = False) -> Tensor:
    """(size,) budgets: a fraction uniform in [min_fraction, 1], or all ``n`` tokens for a ``full_probability``
    share of the samples (for every sample when ``full``)."""
    a = config["allocation"]
    fraction = a["min_fraction"] + (1 - a["min_fraction"]) * torch.rand(size, generator=generator)
    keep_all = (torch.rand(size, generator=generator) < a["full_probability"]) | full
    return budget_tokens(torch.where(keep_all, torch.full_like(fraction, 1.0), fraction), n)


def _allocation(config: dict[str, Any], stage_step: int, size: int, generator: torch.Generator) -> tuple[str, Tensor]:
    """The allocator name (or :data:`MIX`) and (size,) budgets of stage-2 step ``stage_step``: coarse levels,
    all, then dropout.

    The draws from ``generator`` are the same in every phase, so resumed runs stay exact.
    """
    a = config["allocation"]
    allocator = a["allocators"][int(torch.randint(len(a["allocators"]), (1,), generator=generator))]
    n = num_tokens(config)
    budgets = _budgets(config, n, size, generator, full=stage_step < a["coarse_steps"] + a["full_steps"])
    if stage_step < a["coarse_steps"]:  # every level but the finest: `all` keeps tokens coarse-first
        return "all", torch.full_like(budgets, n - num_tokens(config, 1))
    return allocator, budgets


@torch.no_grad()
def evaluate(vlm_for: Any, config: dict[str, Any], device: torch.device,
             prompt: Callable[[str], str] | None = None) -> list[dict[str, Any]]:
    """Accuracy per family on the first ``eval_questions`` validation scenes, per allocator and budget.

    ``vlm_for(name)`` gives the :class:`~pyrtok.vlm.PyramidVLM` of allocator ``name``; ``train.eval_budgets``
    are fractions of the tokens (:func:`~pyrtok.allocators.budget_tokens`). ``prompt(question)`` is the
    evaluation prompt (default: LLaVA-1.5's :data:`~pyrtok.data.conversations.PROMPT`; a model with a chat
    template: :meth:`PyramidVLM.chat_prompt`). An answer is right when its first word is the answer
    (:func:`~pyrtok.metrics.first_word_match`, the harness's ``exact`` metric).
    """
    t, size = config["train"], config["model"]["image_size"]
    n = num_tokens(config)
    prompt = prompt or (lambda question: PROMPT.format(question=question))
    rows = []
    images, items = scene_batch("validation", 0, t["eval_questions"], size)
    full: dict[str, float] | None = None  # every allocator keeps every token at a full budget: score it once
    for name in t["eval_allocators"]:
        vlm = vlm_for(name)
        for fraction in t["eval_budgets"]:
            budget = budget_tokens(float(fraction), n)  # a fraction even when YAML reads 1.0 as 1
            if budget >= n and full is not None:
                rows.append({"allocator": name, "fraction": fraction, **full})
                continue
            correct: dict[str, list[float]] = defaultdict(list)
            for start in range(0, len(items), 32):
                chunk = items[start : start + 32]
                out = vlm.generate(images[start : start + 32].to(device),
                                   [prompt(i["question"]) for i in chunk],
                                   budget=budget, max_new_tokens=2)
                for item, text in zip(chunk, out.texts, strict=True):
                    correct[item["family"]].append(first_word_match(text, [item["answer"]]))
            scores = {"overall": float(np.mean([v for vs in correct.values() for v in vs]))}
            scores.update({family: float(np.mean(v)) for family, v in correct.items()})
            if budget >= n:
                full = scores
            rows.append({"allocator": name, "fraction": fraction, **scores})
    return rows


def _focus(trainee: Trainee, config: dict[str, Any], device: torch.device) -> dict[str, float]:
    """:func:`~pyrtok.embedded.tiny.cls_focus` on the first ``train.focus_scenes`` validation scenes, content being
    the patches the dense targets mark (large objects, the label, the dots)."""
    m = config["model"]
    images, _, targets = scene_batch("validation", 0, config["train"]["focus_scenes"], m["image_size"],
                                     config["seed"], target_patch(config))
    covered = (targets["colour"] > 0) | (targets["glyph"] > 0) | (targets["dot"] > 0)
    return cls_focus(trainee.vlm("all"), images.to(device), covered)


def _check(config: dict[str, Any]) -> None:
    t, m, a = config["train"], config["model"], config["allocation"]
    arch = architecture(config)
    if arch.name == "qwen2_5_vl":
        factor = m["patch_size"] * m["merge_size"]
        if not isinstance(m["resolution"], int) or m["resolution"] < factor or m["resolution"] % factor:
            raise ValueError(f"model.resolution must be a positive multiple of patch_size x merge_size = {factor} "
                             f"for a Qwen2.5-VL, got {m['resolution']!r}")
    if m["image_size"] % arch.grid(m):
        raise ValueError(f"model.image_size {m['image_size']} must be a multiple of the level-0 grid "
                         f"{arch.grid(m)} (the dense targets' patches)")
    if not 0 <= t["dense_steps"] < t["steps"]:
        raise ValueError(f"train.dense_steps must be in [0, train.steps={t['steps']}), got {t['dense_steps']}")
    restart_steps = sum(p["steps"] for p in restarts(t))
    if not 0 <= restart_steps < t["steps"] - t["dense_steps"]:
        raise ValueError(f"train.restart.steps (all restarts together) must be in [0, train.steps - "
                         f"train.dense_steps={t['steps'] - t['dense_steps']}), got {restart_steps}")
    if a["coarse_steps"] and m["levels"] < 2:
        raise ValueError(f"allocation.coarse_steps needs model.levels >= 2 (a coarse level), got {m['levels']}")
    unknown = [name for name in a["allocators"] if name != MIX and name not in available()]
    if unknown or not a["allocators"]:
        raise ValueError(f"allocation.allocators must name registered allocators or {MIX!r}, got {a['allocators']}")
    if not t["cls_weight"] >= 0:
        raise ValueError(f"train.cls_weight must be >= 0, got {t['cls_weight']!r}")
    if not isinstance(t["data_workers"], int) or isinstance(t["data_workers"], bool) or t["data_workers"] not in (0, 1):
        raise ValueError(f"train.data_workers must be 0 (build batches in the training process) or 1 (a worker "
                         f"builds the next one), got {t['data_workers']!r}")


def train(config: dict[str, Any], resume: bool = True, progress: bool = True, stop_after: int | None = None) -> Path:
    """Run (or resume) the training ``config`` describes; returns the output folder.

    ``train.steps`` counts both stages; the first ``train.dense_steps`` of them are stage 1. ``stop_after``
    ends this invocation after that many steps (with a checkpoint); the next call resumes where it stopped.
    """
    _check(config)
    t, m = config["train"], config["model"]
    run = Run(config)
    accelerator = run.accelerator
    vlm_model, processor = build(config)
    trainee = Trainee(vlm_model, processor, config)
    arch, patch = trainee.arch, target_patch(config)
    optimizer = torch.optim.AdamW(trainee.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, t))
    model, optimizer, scheduler = accelerator.prepare(trainee, optimizer, schedule)
    run.resume(resume, schedule, logs=("log.jsonl", "eval.jsonl", "cls.jsonl"))
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    mix = TrainingMix(**config["allocation"]["mix"])
    wording = t["wording"] if any(t["wording"].values()) else None
    bar = run.steps(t["steps"], stop_after, progress)

    def batch(step: int) -> dict[str, Any]:
        """The arguments of :func:`scene_batch` for ``step`` on this process."""
        size = t["batch_size"] if step >= t["dense_steps"] else t["dense_batch_size"]
        first = (step * world + rank) * max(t["batch_size"], t["dense_batch_size"])
        return {"split": "train", "first": first, "count": size, "size": m["image_size"], "seed": config["seed"],
                "patch": patch, "turns": turns_at(step, t), "wording": wording}

    with Prefetcher(scene_batch, workers=t["data_workers"]) as batches:
        for step in bar:
            generator = step_generator(config["seed"], step, rank, stream=4)
            stage2 = step >= t["dense_steps"]
            images, items, targets = batches(batch(step), batch(step + 1) if step + 1 < run.end else None)
            size = images.shape[0]
            images, targets = images.to(device), {name: v.to(device) for name, v in targets.items()}
            if stage2:
                stage_step = step - t["dense_steps"]
                for module in arch.tower(trainee.model):
                    module.requires_grad_(stage_step >= t["freeze_vision_steps"])
                allocator, budgets = _allocation(config, stage_step, size, generator)
                dense, scene, answer, counts = model(images, targets, items, mix if allocator == MIX else allocator,
                                                     budgets, generator)
                loss = answer + t["dense_weight"] * (dense + t["cls_weight"] * scene)
            else:
                dense, scene, answer, counts = model(images, targets)
                loss = dense + t["cls_weight"] * scene
            optimizer_step(accelerator, model, optimizer, scheduler, loss, t["grad_clip"])
            done = step + 1
            if run.log_due(done, t["log_every"]) or done == run.end:
                losses = accelerator.gather(torch.stack([dense.detach(), (answer if stage2 else dense).detach(),
                                                         scene.detach()]))
                dense_loss, answer_loss, scene_loss = losses.reshape(-1, 3).mean(0).tolist()
                bar.set_postfix(dense=f"{dense_loss:.3f}", **({"answer": f"{answer_loss:.3f}"} if stage2 else {}))
                row = {"step": done, "stage": 2 if stage2 else 1, "dense_loss": dense_loss, "scene_loss": scene_loss,
                       "lr": scheduler.get_last_lr()[0], "seconds": round(run.lap(), 3)}
                if stage2:
                    row.update(loss=answer_loss, tokens=counts.float().mean().item())
                run.log("log.jsonl", row)
            if stage2 and (done % t["eval_every"] == 0 or done == t["steps"]) and run.is_main:
                trainee.eval()
                rows = evaluate(trainee.vlm, config, device,
                                lambda question: arch.prompt(trainee.vlm("all"), question))
                trainee.train()
                run.log("eval.jsonl", *({"step": done, **row} for row in rows))
            focus_due = done == t["dense_steps"] or (stage2 and done % t["eval_every"] == 0)
            if t["cls_weight"] and arch.has_cls and focus_due and run.is_main:
                trainee.eval()
                run.log("cls.jsonl", {"step": done, **_focus(trainee, config, device)})
                trainee.train()
            if done % t["checkpoint_every"] == 0 or done == run.end:
                run.checkpoint(done, t["keep_checkpoints"])
    if run.is_main and run.finished:
        trainee.model.save_pretrained(run.output / "model")
        processor.save_pretrained(run.output / "model")
    accelerator.wait_for_everyone()
    return run.output


def main(argv: list[str] | None = None) -> None:
    _training.run_cli("pyrtok train-vlm", __doc__.split("\n\n")[0], train, load_config, argv)


if __name__ == "__main__":
    main()
