"""lmms-eval model ``pyrtok``: run any lmms-eval task on the visual tokens a pyrtok allocator keeps.

The model wraps :class:`pyrtok.vlm.PyramidVLM` (a local folder or hub id of any supported family: LLaVA-1.5,
Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT, LLaVA-OneVision). The
allocator and the budget are model arguments, so lmms-eval's response cache (``--use_cache``), which keys on
the model arguments (on ``str(model)`` when given a model object, see :meth:`PyrtokLMM.__repr__`), keeps one
entry per (allocator, budget)::

    lmms-eval --model pyrtok \\
        --model_args pretrained=pyrtok/assets/tiny_llava,allocator=laplacian,budget=64,levels=3 \\
        --tasks pope --include_path <task folder> --output_path logs/ --log_samples

Model arguments (``key=value``, comma-separated):

- ``pretrained``: model folder (or hub id) that ``PyramidVLM.from_pretrained`` loads; ``embedded`` names the
  shipped tiny LLaVA, as in ablation YAML.
- ``allocator``: a registered allocator name (``pyrtok.allocators.available()``) or an allocator YAML path
  (through the Python API also a mapping with ``name`` or an allocator object; see
  ``pyrtok.allocators.resolve``); default ``all``. Query-driven allocators (``query``) need a text embedding
  lmms-eval cannot give, so they are refused.
- ``budget``: image tokens kept per sample, a positive int; omitted keeps every token.
- ``levels``, ``mode``: the token pyramid (default 1 level, ``feature`` mode); ``config``: a PyramidVLM YAML
  giving any of allocator, budget, mode, levels (explicit arguments win).
- ``prompt_template``: must hold ``{context}`` (the task's question) and the image placeholder once, written
  ``{image}`` or as the tokenizer's image token; a literal ``\\n`` becomes a newline. Default: the model's own
  chat template around ``{context}`` (``PyramidVLM.chat_prompt``), or ``USER: <image>\\n{context} ASSISTANT:``
  (LLaVA-1.5) for a model without one; the embedded tiny model was trained on
  ``USER: <image> {context} ASSISTANT:``.
- ``device`` (default cuda when available, else cpu; ``cuda:<LOCAL_RANK>`` per process when launched with
  several), ``dtype`` (auto, float32, float16, bfloat16), ``batch_size`` (positive int),
  ``max_new_tokens`` (default when a task's ``generation_kwargs`` gives none; 128).
  ``batch_size`` and ``device`` may also come from lmms-eval's own ``--batch_size`` / ``--device``; when both
  are given, the value in ``--model_args`` wins (``--batch_size auto`` is not supported).
- ``tokens_log``: a JSONL path; one line per sample ``{"task", "split", "doc_id", "tokens", "allocator",
  "budget"}``. Launched with several processes, each rank writes ``<stem>.rank<r><suffix>``.

Kept image-token counts per sample are also kept in :attr:`PyrtokLMM.kept_tokens`, and every
``generate_until`` answer is a ``GenerationResult`` whose ``token_counts`` (input = prompt text tokens plus
kept image tokens, output = generated tokens) lmms-eval writes into the logged samples. Answers served from
lmms-eval's response cache (``--use_cache``) never reach the model and so are not counted.

Enabling the model name ``pyrtok``:

1. The ``lmms_eval.models`` entry-point group, read when ``lmms_eval.models`` is imported (checked with
   lmms-eval 0.7.3). Its payload is a ``ModelManifest`` (not the class), so pyrtok's ``pyproject.toml``
   declares::

       [project.entry-points."lmms_eval.models"]
       pyrtok = "pyrtok.eval.lmms_plugin:MANIFEST"

   and the ``eval`` package must be importable where lmms-eval runs (installed alongside ``pyrtok``, or the
   repository root on ``PYTHONPATH``); otherwise lmms-eval warns that it failed to load the entry points.
2. Without the entry point, the Python API takes a model object:
   ``lmms_eval.evaluator.simple_evaluate(model=PyrtokLMM(pretrained=..., budget=64), tasks=[...])``.

Images go to the model as the ablation runner gives them: PIL images that the model's family turns into the
pixels the model sees (through the model's own image processor where one was saved with it; LLaVA-1.5 folders
without one, such as the embedded model's, resize to the tower's square with PIL's bicubic filter), so a model
sees the same pixels through either.

When a task's prompts hold words that the tokenizer maps to its unknown token (a word-level tokenizer such
as the embedded model's knows its benchmark's words and those of the stock lmms-eval prompts, nothing else),
a warning naming those words is logged once per task: the model never reads them, and a model not trained
with unknown words may answer nothing.

One image per sample (LLaVA-1.5 style): samples with several images or videos raise ``ValueError``; samples
without an image run the language model on the text alone and count 0 image tokens. ``loglikelihood`` scores
continuations with one forward pass; lmms-eval 0.7.3's evaluator, however, turns every (log-probability,
is-greedy) pair into a string, so its ``multiple_choice`` and ``loglikelihood`` tasks fail there whatever the
model (``generate_until`` tasks are unaffected). Multi-round generation is not supported.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from loguru import logger
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from pyrtok.images import open_image

if TYPE_CHECKING:
    from pyrtok.allocators.registry import AllocatorSpec

__all__ = ["DEFAULT_TEMPLATE", "MANIFEST", "MODEL_NAME", "PyrtokLMM"]

MODEL_NAME = "pyrtok"
DEFAULT_TEMPLATE = "USER: <image>\n{context} ASSISTANT:"
DTYPES = ("auto", "float32", "float16", "bfloat16")

Key = tuple[str, str, int]


@dataclass
class _Item:
    """One request made ready for the model; its image is decoded only when its batch runs.

    Attributes:
        index: position of the request in the call's list.
        prompt: the full prompt (template applied; continuation appended for log-likelihoods).
        key: (task, split, doc_id) whose kept tokens are recorded, or None (unconditional requests).
        extra: the generation kwargs (generate_until) or the continuation (loglikelihood).
        doc_to_visual: the task's function from document to visuals, or None.
        has_image: whether the sample has its one image.
    """

    index: int
    prompt: str
    key: Key | None
    extra: Any
    doc_to_visual: Callable | None = None
    has_image: bool = False


def _positive_int(value: Any, name: str, allow_none: bool = False) -> int | None:
    """``value`` as an int >= 1 (digit strings accepted, as lmms-eval passes CLI values through)."""
    if value is None and allow_none:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or omitted' if allow_none else ''}, got {value!r}")
    return value


def _truncate(text: str, until: Sequence[str]) -> str:
    """``text`` cut at the earliest occurrence of any stop string."""
    cut = min((text.index(stop) for stop in until if stop and stop in text), default=len(text))
    return text[:cut].strip()


class PyrtokLMM(lmms):
    """lmms-eval "simple" model answering from the image tokens a pyrtok allocator keeps.

    See the module notes for the arguments. After a run, ``kept_tokens[(task, split, doc_id)]`` holds the
    image tokens each sample was given and :meth:`summary` their statistics.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        allocator: AllocatorSpec | None = None,
        budget: int | str | None = None,
        levels: int | str | None = None,
        mode: str | None = None,
        config: str | None = None,
        prompt_template: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        max_new_tokens: int | str = 128,
        tokens_log: str | None = None,
    ) -> None:
        super().__init__()
        from pyrtok.allocators import available, create, resolve, spec_label
        from pyrtok.vlm import PyramidVLM

        if not isinstance(pretrained, str) or not pretrained:
            raise ValueError(f"pretrained must be a model folder or hub id, got {pretrained!r}")
        if pretrained == "embedded":
            from pyrtok.eval.config import embedded_model

            pretrained = str(embedded_model())
        self.budget = _positive_int(budget, "budget", allow_none=True)
        self.batch_size_per_process = _positive_int(batch_size, "batch_size")
        self.max_new_tokens = _positive_int(max_new_tokens, "max_new_tokens")
        levels = _positive_int(levels, "levels", allow_none=True)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        # max_batch_size only matters for lmms-eval's batch_size=auto, which this model does not offer.
        del max_batch_size

        built = None
        if allocator is not None:
            built = resolve(allocator, "allocator")
            if "query" in built.needs:
                raise ValueError(
                    f"allocator {allocator!r} needs a text-query embedding, which lmms-eval requests do not carry; "
                    f"use one of {[n for n in available() if 'query' not in create(n).needs]}"
                )

        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if self._world_size > 1 and device == "cuda":
            # One model replica per process: lmms-eval shards the requests by rank.
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        self._device = torch.device(device)

        model_kwargs = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
        self.vlm = PyramidVLM.from_pretrained(
            pretrained, allocator=built, budget=self.budget, config=config, mode=mode, levels=levels, **model_kwargs
        ).to(self._device).eval()
        if self.budget is None and self.vlm.budget is not None:
            self.budget = _positive_int(self.vlm.budget, "budget")
        if "query" in self.vlm.allocator.needs:
            raise ValueError(f"allocator {self.vlm.allocator.name!r} (from config) needs a text query; choose another")
        # Kept apart from the model, which lmms-eval's clean() deletes after a run.
        self.allocator_name = self.vlm.allocator.name
        self.levels, self.mode = self.vlm.family.levels, self.vlm.family.mode
        self.tokenizer = self.vlm.tokenizer
        self.image_token = self.vlm.image_token
        if prompt_template is None:  # the model's own chat template around the task's question
            prompt_template = self.vlm.chat_prompt("{context}")
        self.prompt_template = self._check_template(prompt_template)
        # An allocator YAML path (not just its name) and the config file tell configurations apart.
        if allocator is None:
            spec: Any = self.allocator_name
        elif isinstance(allocator, (str, Path)):
            spec = str(allocator)
        elif isinstance(allocator, Mapping):
            spec = dict(allocator)  # its options, not only its name, tell configurations apart
        else:
            spec = spec_label(allocator)
        self._identity = {"pretrained": pretrained, "allocator": spec, "config": config,
                          "budget": self.budget, "levels": self.levels, "mode": self.mode, "dtype": dtype,
                          "prompt_template": self.prompt_template}

        self.kept_tokens: dict[Key, int] = {}
        self._unknown_warned: set[str] = set()  # tasks already warned about words the tokenizer does not know
        self.tokens_log: Path | None = None
        if tokens_log:
            path = Path(tokens_log)
            if self._world_size > 1:
                path = path.with_name(f"{path.stem}.rank{self._rank}{path.suffix}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")  # one run per model object: start the log afresh
            self.tokens_log = path
        logger.info(
            f"pyrtok: {pretrained} with allocator={self.allocator_name}, budget={self.budget}, "
            f"levels={self.levels}, mode={self.mode} on {self._device}"
        )

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> PyrtokLMM:
        """The model from lmms-eval's ``--model_args`` string and its CLI settings (``batch_size``,
        ``max_batch_size``, ``device``) in ``additional_config``; a key given in both is taken from
        ``arg_string``.

        lmms-eval always passes its ``--batch_size`` (default 1), so without this ``batch_size`` in the model
        arguments would reach the constructor twice.
        """
        from lmms_eval.utils import simple_parse_args_string

        if not isinstance(arg_string, str):
            raise TypeError(f"arg_string must be a 'key=value,...' string, got {type(arg_string).__name__}")
        if additional_config is not None and not isinstance(additional_config, Mapping):
            raise TypeError(f"additional_config must be a mapping or None, got {type(additional_config).__name__}")
        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    def __repr__(self) -> str:
        # lmms-eval's response cache keys a model object by its str(); this keeps that key stable across runs
        # and distinct per configuration.
        return "PyrtokLMM(" + ", ".join(f"{k}={v!r}" for k, v in self._identity.items()) + ")"

    # -- properties lmms-eval reads ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_process

    # -- prompts and inputs ---------------------------------------------------------------------------
    def _check_template(self, template: str) -> str:
        """Validate ``template`` and normalise its image placeholder to the tokenizer's image token."""
        if not isinstance(template, str):
            raise ValueError(f"prompt_template must be a string holding {{context}}, got {template!r}")
        template = template.replace("\\n", "\n").replace("{image}", self.image_token)
        if template.count("{context}") != 1 or template.count(self.image_token) != 1:
            raise ValueError(
                f"prompt_template must hold '{{context}}' once and the image placeholder ('{{image}}' or "
                f"{self.image_token!r}) once, got {template!r}"
            )
        return template

    def _prompt(self, context: str, has_image: bool) -> str:
        """The template around ``context``, with exactly one image placeholder when there is an image."""
        head = self.prompt_template
        if not has_image or self.image_token in context:
            # Some tasks place the placeholder in the question; text-only samples have nothing to fill it with.
            head = re.sub(re.escape(self.image_token) + r"[ \t]*\n?", "", head, count=1)
        if not has_image:
            context = context.replace(self.image_token, "")
        return head.replace("{context}", context)

    def _visual(self, doc_to_visual: Callable | None, doc: Any, key: Key) -> Image.Image | None:
        """The sample's single image, or None when it has none."""
        visuals = doc_to_visual(doc) if callable(doc_to_visual) else None
        if visuals is None:
            visuals = []
        elif not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        visuals = [v for v in visuals if v is not None]
        if len(visuals) > 1:
            raise ValueError(f"sample {key} has {len(visuals)} visuals; the pyrtok model takes one image per sample")
        if not visuals:
            return None
        if not isinstance(visuals[0], Image.Image):
            raise ValueError(
                f"sample {key} has a visual of type {type(visuals[0]).__name__}; "
                "expected a PIL image (no video or audio)"
            )
        return visuals[0]

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError) as error:
            raise KeyError(f"no document {doc_id} in task_dict[{task!r}][{split!r}] (set by lmms-eval)") from error

    def _items(self, requests: Sequence[Instance], kind: str) -> list[_Item]:
        """Prompt and record key of each request (``kind``: generate_until or loglikelihood)."""
        items = []
        unknown: dict[str, dict[str, None]] = {}  # task -> words in first-seen order
        for index, request in enumerate(requests):
            args = request.args
            if kind == "loglikelihood" and len(args) == 2:
                # Unconditional continuation (acc_mutual_info): no document, no image, nothing to record.
                context, continuation = args
                items.append(_Item(index, self._prompt(context, False) + continuation, None, continuation))
                continue
            if len(args) != 6:
                second = "gen_kwargs" if kind == "generate_until" else "continuation"
                raise ValueError(
                    f"{kind} request args must be (context, {second}, doc_to_visual, doc_id, task, split), "
                    f"got {len(args)} items"
                )
            context, extra, doc_to_visual, doc_id, task, split = args
            key = (task, split, int(doc_id))
            doc = self._doc(task, split, doc_id)
            # Looked at now only to validate it and build the prompt; decoded again when its batch runs, so
            # that a task's thousands of requests never hold all their images at once.
            has_image = self._visual(doc_to_visual, doc, key) is not None
            prompt = self._prompt(context, has_image)
            if kind == "loglikelihood":
                extra = extra(doc) if callable(extra) else extra
                if isinstance(extra, list):  # doc_to_target may give several references; the first is scored
                    extra = extra[0]
                prompt += str(extra)
            if task not in self._unknown_warned:
                unknown.setdefault(task, {}).update(dict.fromkeys(self._unknown_words(prompt)))
            items.append(_Item(index, prompt, key, extra, doc_to_visual, has_image))
        for task, words in unknown.items():
            if words:
                self._unknown_warned.add(task)
                logger.warning(
                    f"pyrtok: task {task!r}: the tokenizer maps these prompt words to its unknown token "
                    f"{self.tokenizer.unk_token!r}: {list(words)}; the model reads none of them, so answers may be "
                    "empty or meaningless (check the task's pre/post prompt and prompt_template)"
                )
        return items

    def _unknown_words(self, text: str) -> list[str]:
        """The distinct pieces of ``text`` that the tokenizer maps to its unknown token, in order."""
        unk = self.tokenizer.unk_token_id
        if unk is None:
            return []
        if getattr(self.tokenizer, "is_fast", False):
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            pieces = [text[start:end] for token, (start, end) in
                      zip(encoded["input_ids"], encoded["offset_mapping"], strict=True) if token == unk]
        else:
            # Slow tokenizers give no offsets: look at each whitespace-separated word on its own.
            pieces = [word for word in text.split()
                      if unk in self.tokenizer(word, add_special_tokens=False)["input_ids"]]
        return list(dict.fromkeys(pieces))

    def _batches(self, items: list[_Item], group: Callable[[_Item], Any] = lambda item: None) -> Iterator[list[_Item]]:
        """Chunks of at most ``batch_size`` items sharing ``group`` and either all or none having an image."""
        groups: dict[Any, list[_Item]] = {}
        for item in items:
            groups.setdefault((group(item), item.has_image), []).append(item)
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                yield members[start : start + self.batch_size]

    def _with_images(self, batch: list[_Item]) -> Iterator[tuple[list[_Item], list[Image.Image] | None]]:
        """``batch`` with its images as PIL images (None: text only). The model's family turns them into the
        pixels the model sees, as for the ablation runner, and encodes images of one size together."""
        if not batch[0].has_image:
            yield batch, None
            return
        yield batch, [open_image(self._visual(item.doc_to_visual, self._doc(*item.key), item.key)) for item in batch]

    def _text_inputs(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Left-padded ``(input_ids, attention_mask)``, both (B, T), for prompts without an image."""
        rows = [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows], device=self._device)
        mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], device=self._device)
        return ids, mask

    # -- bookkeeping ----------------------------------------------------------------------------------
    def _record(self, items: Sequence[_Item], counts: Sequence[int]) -> None:
        """Store the kept image tokens of each new sample and append them to ``tokens_log``."""
        lines = []
        for item, count in zip(items, counts, strict=True):
            if item.key is None or item.key in self.kept_tokens:
                continue  # multiple-choice options and repeats share their sample's count
            self.kept_tokens[item.key] = int(count)
            task, split, doc_id = item.key
            lines.append(json.dumps({"task": task, "split": split, "doc_id": doc_id, "tokens": int(count),
                                     "allocator": self.allocator_name, "budget": self.budget}))
        if lines and self.tokens_log is not None:
            with self.tokens_log.open("a") as f:
                f.write("\n".join(lines) + "\n")

    def summary(self) -> dict[str, float | int]:
        """``{"samples", "mean", "min", "max"}`` of the kept image tokens recorded so far."""
        values = list(self.kept_tokens.values())
        if not values:
            return {"samples": 0, "mean": 0.0, "min": 0, "max": 0}
        return {"samples": len(values), "mean": float(np.mean(values)), "min": min(values), "max": max(values)}

    def _log_summary(self) -> None:
        s = self.summary()
        logger.info(
            f"pyrtok: {s['samples']} samples, kept image tokens mean {s['mean']:.1f} (min {s['min']}, max {s['max']}), "
            f"allocator={self.allocator_name}, budget={self.budget}"
        )

    # -- generation -----------------------------------------------------------------------------------
    def _generation_options(self, gen_kwargs: dict[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
        """lmms-eval ``gen_kwargs`` -> (HF ``generate`` keyword arguments, stop strings)."""
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
            raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {until!r}")
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        options: dict[str, Any] = {
            "max_new_tokens": _positive_int(gen_kwargs.get("max_new_tokens", self.max_new_tokens),
                                            "gen_kwargs['max_new_tokens']"),
            "num_beams": int(gen_kwargs.get("num_beams") or 1),
            "do_sample": temperature > 0,  # lmms-eval's convention: temperature 0 means greedy
        }
        if temperature > 0:
            options["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                options["top_p"] = float(gen_kwargs["top_p"])
        return options, list(until)

    @torch.inference_mode()
    def _generate(
        self, batch: list[_Item], images: list[Image.Image] | None, options: dict[str, Any]
    ) -> tuple[list[str], list[int], list[int]]:
        """(answers, kept image tokens, generated token counts) of one batch with its images or None."""
        prompts = [item.prompt for item in batch]
        pad = self.tokenizer.pad_token_id
        if images is not None:
            out = self.vlm.generate(images, prompts, budget=self.budget, **options)
            return out.texts, out.counts.tolist(), (out.sequences != pad).sum(-1).tolist()
        ids, mask = self._text_inputs(prompts)
        sequences = self.vlm.model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad, **options)
        sequences = sequences[:, ids.shape[1] :]
        texts = [t.strip() for t in self.tokenizer.batch_decode(sequences, skip_special_tokens=True)]
        return texts, [0] * len(batch), (sequences != pad).sum(-1).tolist()

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """One answer per request, cut at its ``until`` strings; ``token_counts`` carry input/output sizes."""
        items = self._items(requests, "generate_until")
        results: list[GenerationResult | None] = [None] * len(requests)
        bar = tqdm(total=len(items), disable=self.rank != 0, desc="pyrtok generate")
        # Requests with different generation settings never share a batch.
        for chunk in self._batches(items, lambda item: json.dumps(item.extra, sort_keys=True, default=str)):
            options, until = self._generation_options(chunk[0].extra)
            for batch, images in self._with_images(chunk):
                texts, counts, generated = self._generate(batch, images, options)
                self._record(batch, counts)
                for item, text, count, new in zip(batch, texts, counts, generated, strict=True):
                    # The placeholder stands for `count` image tokens in what the language model reads.
                    prompt_tokens = len(self.tokenizer(item.prompt)["input_ids"]) - item.has_image + count
                    results[item.index] = GenerationResult(_truncate(text, until), TokenCounts(prompt_tokens, new))
                bar.update(len(batch))
        bar.close()
        self._log_summary()
        return results

    # -- log-likelihood -------------------------------------------------------------------------------
    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(sum of the continuation's token log-probabilities, whether greedy decoding would produce it)."""
        items = self._items(requests, "loglikelihood")
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(items), disable=self.rank != 0, desc="pyrtok loglikelihood")
        for batch, images in (part for chunk in self._batches(items) for part in self._with_images(chunk)):
            lengths = []
            for item in batch:
                context = item.prompt[: len(item.prompt) - len(str(item.extra))]
                n = len(self.tokenizer(item.prompt)["input_ids"]) - len(self.tokenizer(context)["input_ids"])
                if n < 1:
                    raise ValueError(f"continuation {item.extra!r} of sample {item.key} adds no tokens to its context")
                lengths.append(n)
            prompts = [item.prompt for item in batch]
            if images is not None:
                out = self.vlm(images, prompts, budget=self.budget)
                logits, ids, counts = out.logits, out.input_ids, out.counts.tolist()
            else:
                ids, mask = self._text_inputs(prompts)
                positions = (mask.cumsum(-1) - 1).clamp_min(0)
                logits = self.vlm.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
                counts = [0] * len(batch)
            self._record(batch, counts)
            for row, (item, n) in enumerate(zip(batch, lengths, strict=True)):
                # Rows are left-padded, so every continuation ends at the last position.
                scores = F.log_softmax(logits[row, -n - 1 : -1].float(), dim=-1)
                target = ids[row, -n:]
                logprob = scores.gather(-1, target.unsqueeze(-1)).sum().item()
                results[item.index] = (float(logprob), bool((scores.argmax(-1) == target).all()))
            bar.update(len(batch))
        bar.close()
        self._log_summary()
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "the pyrtok model answers single-turn requests only (generate_until, loglikelihood); "
            "multi-round tasks are not supported"
        )


MANIFEST = ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.{PyrtokLMM.__qualname__}")
"""The payload of the ``lmms_eval.models`` entry point ``pyrtok = "pyrtok.eval.lmms_plugin:MANIFEST"``."""
