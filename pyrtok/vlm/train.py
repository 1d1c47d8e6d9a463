"""``pyrtok train-vlm --config configs/embedded/<name>.yaml``: train a tiny LLaVA on the shapes VQA benchmark.

The model is a HF ``LlavaForConditionalGeneration`` (CLIP vision tower, 2-layer projector, Llama decoder)
with a word-level tokenizer; both are saved with ``save_pretrained`` so that ``PyramidVLM.from_pretrained``
and plain transformers load the result offline.

Training sees the model exactly as evaluation will: every step encodes a batch of procedural scenes into a
3-level token pyramid, one allocator drawn from ``allocation.allocators`` keeps a random fraction of the
tokens per sample (``full_probability`` of the samples keep everything), and the language model learns
the one-word answer (loss on the answer and end-of-sequence tokens only). So the model learns to answer from
any subset of multi-scale tokens. The vision tower can start from a ``pyrtok pretrain`` encoder
(``init.vision_tower``) and can be frozen for a first stage (``train.freeze_vision_steps``).

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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from pyrtok import _training
from pyrtok._training import latest_checkpoint, optimizer_step, save_checkpoint, warmup_cosine
from pyrtok.data.shapes_vqa import ANSWERS, FAMILIES, make_scene, questions_for
from pyrtok.pretrain.data import step_generator
from pyrtok.vlm.adapter import PyramidVLM
from pyrtok.vlm.tokenizer import word_tokenizer

__all__ = ["build", "evaluate", "load_config", "main", "num_tokens", "train"]

PROMPT = "USER: <image> {question} ASSISTANT:"

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "model": {"image_size": 224, "patch_size": 16, "vision_hidden": 128, "vision_layers": 3, "vision_heads": 4,
              "vision_intermediate": 512, "text_hidden": 128, "text_layers": 3, "text_heads": 4,
              "text_intermediate": 512, "levels": 3, "feature_layer": -2},
    "init": {"vision_tower": None},
    "allocation": {"allocators": ["all", "random", "pool", "laplacian"], "min_fraction": 0.05,
                   "full_probability": 0.3},
    "train": {"steps": 2000, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.01, "warmup_steps": 100,
              "grad_clip": 1.0, "freeze_vision_steps": 0, "log_every": 10, "checkpoint_every": 200,
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
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
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


def batch(split: str, first: int, count: int, size: int, seed: int = 0) -> tuple[torch.Tensor, list[dict]]:
    """Scenes ``first .. first+count-1`` of ``split``: images (count, 3, S, S) and one question each.

    The question family cycles with the scene index, so every family is equally represented.
    """
    images, items = [], []
    for index in range(first, first + count):
        scene = make_scene(seed, split, index, size)
        item = questions_for(scene, seed, split, index)[index % len(FAMILIES)]
        images.append(torch.from_numpy(np.asarray(scene.image, dtype=np.float32) / 255.0).permute(2, 0, 1))
        items.append(item)
    return torch.stack(images), items


def num_tokens(config: dict[str, Any]) -> int:
    """Tokens in the pyramid of one image: the patch grid and its ceil-halved pooled levels."""
    side, total = config["model"]["image_size"] // config["model"]["patch_size"], 0
    for _ in range(config["model"]["levels"]):
        total += side * side
        side = (side + 1) // 2
    return total


def _budgets(config: dict[str, Any], n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    a = config["allocation"]
    fraction = a["min_fraction"] + (1 - a["min_fraction"]) * torch.rand(size, generator=generator)
    full = torch.rand(size, generator=generator) < a["full_probability"]
    return torch.where(full, torch.full_like(fraction, 1.0), fraction).mul(n).ceil().long().clamp(1, n)


def _answer_labels(input_ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Labels that keep only the last ``lengths[b]`` tokens of each left-padded row (answer + </s>)."""
    labels = torch.full_like(input_ids, -100)
    for b, length in enumerate(lengths):
        labels[b, -length:] = input_ids[b, -length:]
    return labels


@torch.no_grad()
def evaluate(vlm_for: Any, config: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    """Accuracy per family on the first ``eval_questions`` validation scenes, per allocator and budget."""
    t, size = config["train"], config["model"]["image_size"]
    n = num_tokens(config)
    rows = []
    images, items = batch("validation", 0, t["eval_questions"], size)
    for name in t["eval_allocators"]:
        vlm = vlm_for(name)
        for fraction in t["eval_budgets"]:
            correct: dict[str, list[int]] = defaultdict(list)
            for start in range(0, len(items), 32):
                chunk = items[start : start + 32]
                budget = max(1, math.ceil(fraction * n))
                out = vlm.generate(images[start : start + 32].to(device),
                                   [PROMPT.format(question=i["question"]) for i in chunk],
                                   budget=budget, max_new_tokens=2)
                for item, text in zip(chunk, out.texts, strict=True):
                    correct[item["family"]].append(int(text.split()[:1] == [item["answer"]]))
            row = {"allocator": name, "fraction": fraction,
                   "overall": float(np.mean([v for vs in correct.values() for v in vs]))}
            row.update({family: float(np.mean(v)) for family, v in correct.items()})
            rows.append(row)
    return rows


def train(config: dict[str, Any], resume: bool = True, progress: bool = True, stop_after: int | None = None) -> Path:
    """Run (or resume) the training ``config`` describes; returns the output folder."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
                              step_scheduler_with_optimizer=False)
    set_seed(config["seed"])
    t, m = config["train"], config["model"]
    output = Path(t["output"])
    checkpoints = output / "checkpoints"
    if accelerator.is_main_process:
        checkpoints.mkdir(parents=True, exist_ok=True)
        (output / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    accelerator.wait_for_everyone()
    model, tokenizer = build(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, t["warmup_steps"], t["steps"]))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    start = 0
    latest = latest_checkpoint(checkpoints) if resume else None
    if latest is not None:
        accelerator.load_state(str(latest))
        start = json.loads((latest / "step.json").read_text())["step"]
    raw = accelerator.unwrap_model(model)
    vlms: dict[str, PyramidVLM] = {}

    def vlm_for(name: str) -> PyramidVLM:
        if name not in vlms:
            vlms[name] = PyramidVLM(raw, tokenizer, allocator=name, levels=m["levels"])
        return vlms[name]

    names = config["allocation"]["allocators"]
    end = t["steps"] if stop_after is None else min(t["steps"], start + stop_after)
    bar = tqdm(range(start, end), initial=start, total=t["steps"], disable=not progress
               or not accelerator.is_main_process, desc=output.name)
    rank, world = accelerator.process_index, accelerator.num_processes
    for step in bar:
        generator = step_generator(config["seed"], step, rank, stream=4)
        first = (step * world + rank) * t["batch_size"]
        images, items = batch("train", first, t["batch_size"], m["image_size"], config["seed"])
        images = images.to(accelerator.device)
        vlm = vlm_for(names[int(torch.randint(len(names), (1,), generator=generator))])
        raw.model.vision_tower.requires_grad_(step >= t["freeze_vision_steps"])
        prompts = [PROMPT.format(question=i["question"]) + f" {i['answer']} </s>" for i in items]
        inputs = vlm.prepare(images, prompts, budget=_budgets(config, num_tokens(config), len(items), generator),
                             generator=generator)
        lengths = [len(tokenizer(f" {i['answer']} </s>", add_special_tokens=False)["input_ids"]) for i in items]
        out = model(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                    position_ids=inputs["position_ids"], labels=_answer_labels(inputs["input_ids"], lengths))
        optimizer_step(accelerator, model, optimizer, scheduler, out.loss, t["grad_clip"])
        done = step + 1
        if done % t["log_every"] == 0 or done == end:
            loss = accelerator.gather(out.loss.detach().reshape(1)).mean().item()
            bar.set_postfix(loss=f"{loss:.4f}")
            if accelerator.is_main_process:
                with (output / "log.jsonl").open("a") as f:
                    f.write(json.dumps({"step": done, "loss": loss, "lr": scheduler.get_last_lr()[0],
                                        "tokens": inputs["counts"].float().mean().item()}) + "\n")
        if (done % t["eval_every"] == 0 or done == t["steps"]) and accelerator.is_main_process:
            raw.eval()
            rows = evaluate(vlm_for, config, accelerator.device)
            raw.train()
            with (output / "eval.jsonl").open("a") as f:
                for row in rows:
                    f.write(json.dumps({"step": done, **row}) + "\n")
        if done % t["checkpoint_every"] == 0 or done == end:
            save_checkpoint(accelerator, checkpoints, done, t["keep_checkpoints"])
    if accelerator.is_main_process and end == t["steps"]:
        raw.save_pretrained(output / "model")
        tokenizer.save_pretrained(output / "model")
    accelerator.wait_for_everyone()
    return output


def main(argv: list[str] | None = None) -> None:
    _training.run_cli("pyrtok train-vlm", __doc__.split("\n\n")[0], train, load_config, argv)


if __name__ == "__main__":
    main()
