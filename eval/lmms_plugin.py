"""lmms-eval model ``pyrtok``: run any lmms-eval task on the visual tokens a pyrtok allocator keeps.

A thin wrapper of :class:`pyrtok.vlm.PyramidVLM` (any supported family), which does the work: images through
the model's own processor, allocation under :mod:`pyrtok.budget`'s budgets (an int count or a fraction in
(0, 1] per image), left-padded batches (text-only samples included), generation and kept-token counts::

    lmms-eval --model pyrtok --tasks pope --include_path <task folder> --output_path logs/ \\
        --model_args pretrained=pyrtok/assets/tiny_llava,allocator=laplacian,budget=64,levels=3

The model arguments, the kept-token log and the entry point are in eval/README.md ("lmms-eval"). A misspelled
or bad argument ends the run with one line naming it. One image per sample; a sample without one runs on its
text alone. lmms-eval 0.7.3's evaluator turns ``loglikelihood`` pairs into strings, so its ``multiple_choice``
tasks fail there for every model.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from lmms_eval.utils import handle_arg_string, simple_parse_args_string
from loguru import logger
from PIL import Image
from tqdm.auto import tqdm

from pyrtok.budget import budget_tokens
from pyrtok.vlm.query import bare_question

__all__ = ["DEFAULT_TEMPLATE", "MANIFEST", "MODEL_NAME", "PyrtokLMM"]

MODEL_NAME = "pyrtok"
DEFAULT_TEMPLATE = "USER: <image>\n{context} ASSISTANT:"  # chat_prompt for a model without a chat template
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class _Item:
    """A request: the (task, split, doc_id) its kept tokens are recorded under (None: not recorded), its
    gen_kwargs (generate_until) or continuation tokens (loglikelihood), where its image comes from, its prompt."""

    index: int
    key: tuple[str, str, int] | None
    extra: Any
    doc_to_visual: Callable | None
    prompt: str = ""
    question: str = ""  # the context as a query-reading allocator gets it (pyrtok.vlm.query.bare_question)


def _positive_int(value: Any, name: str) -> int:
    """``value`` (strings as lmms-eval passes them) as an int >= 1."""
    value = handle_arg_string(value) if isinstance(value, str) else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _budget(value: Any) -> int | float:
    """``value`` (strings as lmms-eval passes them) as a budget by :mod:`pyrtok.budget`'s rules."""
    value = handle_arg_string(value) if isinstance(value, str) else value
    try:
        budget_tokens(value, 1)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be an int token count >= 1 or a fraction in (0, 1], got {value!r}") from None
    return value


class PyrtokLMM(lmms):
    """lmms-eval "simple" model answering from the image tokens a pyrtok allocator keeps (see the module notes)."""

    is_simple = True

    def __init__(self, pretrained: str, allocator: Any = None, budget: int | float | str | None = None,
                 levels: int | str | None = None, mode: str | None = None, config: str | None = None,
                 prompt_template: str | None = None, device: str | None = None, dtype: str = "auto",
                 batch_size: int | str = 1, max_new_tokens: int | str = 128, tokens_log: str | None = None,
                 query_encoder: str | None = None) -> None:
        super().__init__()
        from pyrtok.allocators import resolve, spec_label
        from pyrtok.vlm import PyramidVLM

        if not isinstance(pretrained, str) or not pretrained:
            raise ValueError(f"pretrained must be a model folder, a hub id or a shipped model's name (embedded, "
                             f"embedded-llava, embedded-qwen), got {pretrained!r}")
        from pyrtok.embedded.models import resolve_model

        pretrained = str(resolve_model(pretrained))
        budget = None if budget is None else _budget(budget)
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.max_new_tokens = _positive_int(max_new_tokens, "max_new_tokens")
        levels = None if levels is None else _positive_int(levels, "levels")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        built = None if allocator is None else resolve(allocator, "allocator")  # before loading
        self._rank, self._world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self._world_size > 1 and device == "cuda":  # one replica per process; lmms-eval shards by rank
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        self.device = torch.device(device)
        dtypes = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
        if query_encoder is None and built is not None and "query" in built.needs:
            query_encoder = "language"  # the question through the model's own input embeddings (pyrtok.vlm.query)
        self.vlm = PyramidVLM.from_pretrained(pretrained, allocator=built, budget=budget, config=config, mode=mode,
                                              levels=levels, query_encoder=query_encoder,
                                              **dtypes).to(self.device).eval()
        self.budget = self.vlm.budget = None if self.vlm.budget is None else _budget(self.vlm.budget)
        self.allocator_name = self.vlm.allocator.name  # kept apart from the model (clean() drops it)
        if "query" in self.vlm.allocator.needs and self.vlm.query_encoder is None:
            raise ValueError(f"allocator {self.allocator_name!r} reads the question: pass query_encoder=language "
                             "(the model's input embeddings) or query_encoder=clip:<path>")
        self.levels, self.mode = self.vlm.family.levels, self.vlm.family.mode
        self.tokenizer, self.image_token = self.vlm.tokenizer, self.vlm.image_token
        self.prompt_template = self._check_template(
            self.vlm.chat_prompt("{context}") if prompt_template is None else prompt_template)
        # The template without its placeholder: for questions holding their own, and text-only ones (unless the
        # model's chat template gives a text-only prompt).
        self._bare = re.sub(re.escape(self.image_token) + r"[ \t]*\n?", "", self.prompt_template, count=1)
        self._text = self._bare if prompt_template is not None else self.vlm.chat_prompt("{context}", images=0)
        # Cache key: a YAML path, a mapping's options and the config file tell configurations apart.
        spec = (self.allocator_name if allocator is None else dict(allocator) if isinstance(allocator, Mapping)
                else str(allocator) if isinstance(allocator, (str, Path)) else spec_label(allocator))
        self._identity = {"pretrained": pretrained, "allocator": spec, "config": config, "budget": self.budget,
                          "levels": self.levels, "mode": self.mode, "dtype": dtype,
                          "prompt_template": self.prompt_template, "query_encoder": query_encoder}
        self.kept_tokens: dict[tuple[str, str, int], int] = {}
        self._warned: set[str] = set()  # tasks already warned about words the tokenizer does not know
        self.tokens_log = Path(tokens_log) if tokens_log else None
        if self.tokens_log is not None:
            if self._world_size > 1:
                self.tokens_log = self.tokens_log.with_stem(f"{self.tokens_log.stem}.rank{self._rank}")
            self.tokens_log.parent.mkdir(parents=True, exist_ok=True)
            self.tokens_log.write_text("")  # one run per model object: the log starts afresh
        logger.info(f"pyrtok: {pretrained} with allocator={self.allocator_name}, budget={self.budget}, "
                    f"levels={self.levels}, mode={self.mode} on {self.device}")

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> PyrtokLMM:
        """The model from ``--model_args`` and lmms-eval's CLI settings (``batch_size``, ``max_batch_size``,
        ``device``) in ``additional_config`` (``arg_string`` wins). A bad argument raises ``SystemExit`` with one
        line naming it: lmms-eval prints any ``Exception`` as a traceback and then exits with status 0."""
        if not isinstance(arg_string, str):
            raise TypeError(f"arg_string must be a 'key=value,...' string, got {type(arg_string).__name__}")
        if not isinstance(additional_config or {}, Mapping):
            raise TypeError(f"additional_config must be a mapping or None, got {type(additional_config).__name__}")
        valid = list(inspect.signature(cls).parameters)
        try:
            args = simple_parse_args_string(arg_string)
        except ValueError:
            raise SystemExit(f"pyrtok: --model_args must be key=value pairs, got {arg_string!r}") from None
        for name in args:
            if name not in valid:
                close = difflib.get_close_matches(name, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SystemExit(f"pyrtok: unknown model argument {name!r}{hint}; valid: {', '.join(valid)}")
        # lmms-eval's max_batch_size only serves its batch_size=auto, which this model does not offer.
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args and k in valid}
        try:
            return cls(**args, **extra)
        except (ValueError, TypeError, OSError) as error:
            if os.environ.get("VERBOSITY") == "DEBUG":  # lmms-eval's --verbosity DEBUG: the traceback
                raise
            raise SystemExit(f"pyrtok: bad model argument: {error}") from None

    def __repr__(self) -> str:  # lmms-eval's response cache keys a model object by its str()
        return "PyrtokLMM(" + ", ".join(f"{k}={v!r}" for k, v in self._identity.items()) + ")"

    # -- requests -------------------------------------------------------------------------------------
    def _check_template(self, template: str) -> str:
        """``template`` checked, a typed ``\\n`` as a newline and ``{image}`` as the image token."""
        if not isinstance(template, str) or template.count("{context}") != 1:
            raise ValueError(f"prompt_template must hold '{{context}}' once, got {template!r}")
        template = template.replace("\\n", "\n").replace("{image}", self.image_token)
        self.vlm.check_prompt(template, 1, "prompt_template")  # the image placeholder once
        return template

    def _image(self, item: _Item) -> Image.Image | None:
        """The sample's one PIL image or None; asked again when its batch runs, so only a batch is decoded."""
        if item.key is None:
            return None
        task, split, doc_id = item.key
        try:
            doc = self.task_dict[task][split][doc_id]
        except (KeyError, IndexError) as error:
            raise KeyError(f"no document {doc_id} in task_dict[{task!r}][{split!r}] (set by lmms-eval)") from error
        visuals = item.doc_to_visual(doc) if callable(item.doc_to_visual) else None
        visuals = [v for v in (visuals if isinstance(visuals, (list, tuple)) else [visuals]) if v is not None]
        if len(visuals) > 1:
            raise ValueError(f"sample {item.key} has {len(visuals)} visuals; pyrtok takes one image per sample")
        if visuals and not isinstance(visuals[0], Image.Image):
            raise ValueError(f"sample {item.key} has a visual of type {type(visuals[0]).__name__}; expected a PIL "
                             "image (no video or audio)")
        return visuals[0] if visuals else None

    def _items(self, requests: Sequence[Instance], kind: str) -> list[_Item]:
        """Each request's item, all checked before anything runs; unknown prompt words warned once per task."""
        items, unknown = [], {}
        for index, request in enumerate(requests):
            if kind == "loglikelihood" and len(request.args) == 2:  # acc_mutual_info's unconditional requests
                (context, extra), item = request.args, _Item(index, None, None, None)
            elif len(request.args) == 6:
                context, extra, doc_to_visual, doc_id, task, split = request.args
                item = _Item(index, (task, split, int(doc_id)), extra, doc_to_visual)
            else:
                raise ValueError(f"{kind} request args must be (context, gen_kwargs or continuation, doc_to_visual, "
                                 f"doc_id, task, split), got {len(request.args)} items")
            item.question = bare_question(context.replace(self.image_token, ""))
            if self._image(item) is None:  # text only: nothing can fill a placeholder
                item.prompt = self._text.replace("{context}", context.replace(self.image_token, ""))
            else:  # a question holding its own placeholder keeps that one
                item.prompt = (self._bare if self.image_token in context else self.prompt_template).replace(
                    "{context}", context)
            if kind == "loglikelihood":  # extra becomes the continuation's token count, scored at the prompt's end
                if callable(extra):  # a task's doc_to_target
                    extra = extra(self.task_dict[task][split][int(doc_id)])
                extra = str(extra[0] if isinstance(extra, list) else extra)  # the first of several references
                item.extra = len(self.tokenizer(item.prompt + extra)["input_ids"]) - len(
                    self.tokenizer(item.prompt)["input_ids"])
                if item.extra < 1:
                    raise ValueError(f"continuation {extra!r} of sample {item.key} adds no tokens to its context")
                item.prompt += extra
            if item.key is not None and item.key[0] not in self._warned:
                unknown.setdefault(item.key[0], {}).update(dict.fromkeys(self._unknown_words(item.prompt)))
            items.append(item)
        for task, words in unknown.items():
            if words:
                self._warned.add(task)
                logger.warning(f"pyrtok: task {task!r}: the tokenizer maps these prompt words to its unknown token "
                               f"{self.tokenizer.unk_token!r}: {list(words)}; the model reads none of them, so "
                               "answers may be empty or meaningless (check the task's prompt and prompt_template)")
        return items

    def _unknown_words(self, text: str) -> list[str]:
        """The distinct pieces of ``text`` that the tokenizer maps to its unknown token, in order."""
        tok, unk = self.tokenizer, self.tokenizer.unk_token_id
        if unk is None:
            return []
        if getattr(tok, "is_fast", False):
            got = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            pieces = [text[a:b] for t, (a, b) in zip(got["input_ids"], got["offset_mapping"], strict=True) if t == unk]
        else:  # slow tokenizers give no offsets: each whitespace-separated word on its own
            pieces = [word for word in text.split() if unk in tok(word, add_special_tokens=False)["input_ids"]]
        return list(dict.fromkeys(pieces))

    def _batches(self, items: list[_Item], desc: str, group: Callable[[_Item], Any] = lambda item: None
                 ) -> Iterator[tuple[list[_Item], list[Image.Image | None], list[str]]]:
        """(items, images, prompts) of runs of at most ``batch_size`` items sharing ``group``, with a bar."""
        groups: dict[Any, list[_Item]] = {}
        for item in items:
            groups.setdefault(group(item), []).append(item)
        with tqdm(total=len(items), disable=self.rank != 0, desc=desc) as bar:
            for members in groups.values():
                for start in range(0, len(members), self.batch_size):
                    batch = members[start : start + self.batch_size]
                    yield batch, [self._image(item) for item in batch], [item.prompt for item in batch]
                    bar.update(len(batch))

    # -- kept tokens ----------------------------------------------------------------------------------
    def _record(self, batch: Sequence[_Item], counts: torch.Tensor) -> None:
        """Store each new sample's kept image tokens (the core's ``counts``) and append them to ``tokens_log``."""
        new = {item.key: int(n) for item, n in zip(batch, counts.tolist(), strict=True)
               if item.key is not None and item.key not in self.kept_tokens}  # options and repeats share one
        self.kept_tokens.update(new)
        if new and self.tokens_log is not None:
            with self.tokens_log.open("a") as f:
                f.writelines(json.dumps({"task": t, "split": s, "doc_id": d, "tokens": n,
                                         "allocator": self.allocator_name, "budget": self.budget}) + "\n"
                             for (t, s, d), n in new.items())

    def summary(self, log: bool = False) -> dict[str, float | int]:
        """``{"samples", "mean", "min", "max"}`` of the kept image tokens recorded so far (logged with ``log``)."""
        values = list(self.kept_tokens.values()) or [0]
        out = {"samples": len(self.kept_tokens), "mean": sum(values) / len(values), "min": min(values),
               "max": max(values)}
        if log:
            logger.info(f"pyrtok: kept image tokens {out}, allocator={self.allocator_name}, budget={self.budget}")
        return out

    # -- what lmms-eval calls -------------------------------------------------------------------------
    def _generation_options(self, gen_kwargs: dict[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
        """lmms-eval ``gen_kwargs`` -> (HF ``generate`` keyword arguments, stop strings)."""
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else until
        if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
            raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {until!r}")
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        options = {"max_new_tokens": _positive_int(gen_kwargs.get("max_new_tokens", self.max_new_tokens),
                                                   "gen_kwargs['max_new_tokens']"), "do_sample": temperature > 0}
        beams = int(gen_kwargs.get("num_beams") or 1)
        if beams > 1:  # only asked for when wanted: an in-LLM schedule decodes greedily and refuses the option
            options["num_beams"] = beams
        if temperature > 0:  # lmms-eval's convention: temperature 0 means greedy
            top_p = gen_kwargs.get("top_p")
            options.update(temperature=temperature, **({} if top_p is None else {"top_p": float(top_p)}))
        return options, list(until)

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """One answer per request, cut at its ``until`` strings; ``token_counts`` carry input/output sizes."""
        results: list[Any] = [None] * len(requests)
        for batch, images, prompts in self._batches(  # requests with different settings never share a batch
                self._items(requests, "generate_until"), "pyrtok generate",
                lambda item: json.dumps(item.extra, sort_keys=True, default=str)):
            options, until = self._generation_options(batch[0].extra)
            out = self.vlm.generate(images, prompts, query=self._query(batch), **options)
            self._record(batch, out.counts)
            new = (out.sequences != self.tokenizer.pad_token_id).sum(-1).tolist()
            for item, text, n_in, n_out in zip(batch, out.texts, out.prompt_lengths.tolist(), new, strict=True):
                cut = min((text.index(stop) for stop in until if stop and stop in text), default=len(text))
                results[item.index] = GenerationResult(text[:cut].strip(), TokenCounts(n_in, n_out))
        self.summary(log=True)
        return results

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(sum of the continuation's token log-probabilities, whether greedy decoding would produce it)."""
        results: list[Any] = [None] * len(requests)
        for batch, images, prompts in self._batches(self._items(requests, "loglikelihood"), "pyrtok loglikelihood"):
            out = self.vlm(images, prompts, query=self._query(batch))
            self._record(batch, out.counts)
            for row, item in enumerate(batch):  # left-padded rows: every continuation ends at the last position
                scores = F.log_softmax(out.logits[row, -item.extra - 1 : -1].float(), dim=-1)
                target = out.input_ids[row, -item.extra :]
                logprob = scores.gather(-1, target.unsqueeze(-1)).sum().item()
                results[item.index] = (float(logprob), bool((scores.argmax(-1) == target).all()))
        self.summary(log=True)
        return results

    def _query(self, batch: Sequence[_Item]) -> torch.Tensor | None:
        """The batch's questions in the query encoder's space, for an allocator that reads them; else None."""
        if "query" not in self.vlm.allocator.needs:
            return None
        return self.vlm.encode_query([item.question for item in batch])

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the pyrtok model answers single-turn requests only (generate_until, "
                                  "loglikelihood); multi-round tasks are not supported")


MANIFEST = ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.{PyrtokLMM.__qualname__}")
"""The payload of the ``lmms_eval.models`` entry point ``pyrtok = "pyrtok.eval.lmms_plugin:MANIFEST"``."""
