"""The family-agnostic core: run a HuggingFace VLM on the tokens an allocator keeps.

The wrapped model is not modified. One step API, each step's result typed and reusable:

``encode`` (images -> :class:`~pyrtok.vlm.batch.EncodedBatch`, images of one size encoded together) ->
``select`` (the allocator's :class:`~pyrtok.tokens.TokenSelection` per group, under budgets from
:mod:`pyrtok.budget`) -> ``complete`` (the family's deferred vision work, such as lazy tiles; nothing for
most families) -> ``prepare`` (prompts expanded to the kept tokens, left-padded, with the family's positions
and ``mm_encoder_outputs``: a :class:`Prepared`) -> ``forward`` / ``generate``.

``forward`` and ``generate`` run every step they are not handed, so ``vlm.generate(images, prompts)`` is the
whole pipeline and ``vlm.generate(None, prompts, encoded=..., selections=...)`` shares one encoding between
allocators or budgets. Images go through the model's own image processor (:mod:`pyrtok.vlm.families`); the
language model runs with its own attention kernel on explicit positions. At full budget with the ``all``
allocator this is the unwrapped model on its own processor's inputs. What differs between families lives in
one module each; this core holds no branch on the family.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from pyrtok.allocators import Allocator, resolve
from pyrtok.budget import sample_budgets
from pyrtok.tokens import MultiScaleTokens, TokenSelection
from pyrtok.vlm import prompts as prompting
from pyrtok.vlm.batch import EncodedBatch, Images, per_sample
from pyrtok.vlm.families import Family, family_for
from pyrtok.vlm.families.base import Encoded
from pyrtok.vlm.hub import HUB_KWARGS, load_model
from pyrtok.vlm.query import resolve_query_encoder
from pyrtok.vlm.schedules import Schedule, resolve_schedule

__all__ = ["HUB_KWARGS", "Prepared", "PyramidVLM", "VLMOutput"]

Budget = int | float | Tensor | None
"""Image tokens: an int per image, a float fraction in (0, 1] of each image's tokens, a (B,) integer tensor
(one per sample), or None for every token (:func:`pyrtok.budget.sample_budgets`)."""


@dataclass
class Prepared:
    """Everything the language model needs for one batch, and what it was built from.

    Attributes:
        input_ids, attention_mask: (B, T) the expanded, left-padded prompts.
        position_ids: (B, T), or (3, B, T) for M-RoPE families.
        mm_encoder_outputs: the kept tokens as the model's precomputed vision outputs (None without images).
        counts: (B,) image placeholders each sample was given (summed over its images).
        image_counts: per sample, the placeholders each of its images took.
        encoded: the batch's encoding after the deferred step (its ``vision_flops()`` count everything).
        selections: the selection of each group of ``encoded``.
        extra: the family's other model inputs (Gemma 3's ``token_type_ids``).
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    mm_encoder_outputs: dict[str, Any] | None
    counts: Tensor
    image_counts: list[list[int]]
    encoded: EncodedBatch
    selections: list[TokenSelection]
    extra: dict[str, Tensor] = field(default_factory=dict)

    def model_inputs(self) -> dict[str, Any]:
        """The keyword arguments of the model's ``forward`` / ``generate``."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids, "mm_encoder_outputs": self.mm_encoder_outputs, **self.extra}


@dataclass
class VLMOutput:
    """What :meth:`PyramidVLM.generate` returns.

    Attributes:
        sequences: (B, T_new) generated token ids (prompt excluded), padded with the pad id.
        texts: decoded answers, special tokens removed.
        counts: (B,) image placeholders each sample was given (summed over its images).
        prompt_lengths: (B,) prompt tokens each sample's language model saw (image tokens included).
        image_counts: per sample, the placeholders each of its images took.
        stage_counts: with an in-LLM schedule, (B, S + 1) image tokens entering the language model and after
            each of its S stages.
        layer_tokens: with an in-LLM schedule, (B, L) tokens each decoder layer ran on in the prompt pass.
    """

    sequences: Tensor
    texts: list[str]
    counts: Tensor
    prompt_lengths: Tensor | None = None
    image_counts: list[list[int]] | None = None
    stage_counts: Tensor | None = None
    layer_tokens: Tensor | None = None


class PyramidVLM(nn.Module):
    """A HF VLM fed with allocated multi-scale tokens.

    Args:
        model: a supported ``*ForConditionalGeneration`` (:func:`pyrtok.vlm.supported_architectures`).
        processor: its processor (``AutoProcessor``), or its tokenizer alone where the family allows it
            (LLaVA-1.5 without a saved image processor resizes to the tower's square).
        allocator: any allocator spec :func:`pyrtok.allocators.resolve` takes.
        budget: default image tokens (see :data:`Budget`); None keeps all.
        encoder: LLaVA only: a :class:`~pyrtok.encoders.MultiScaleEncoder` on the model's tower.
        mode, levels: ``"feature"`` (encode once, pool the grid) or ``"image"`` (encode every Gaussian level),
            and the number of pyramid levels.
        share_budget: with several images in a sample, one budget for the sample, split over its images in
            proportion to their tokens (:func:`pyrtok.budget.image_shares`); by default each image gets it.
        schedule: an in-LLM dropping schedule (any spec :func:`pyrtok.vlm.schedules.resolve_schedule` takes),
            applied after the allocator's choice; None runs every decoder layer on every kept token.
        query_encoder: the space of text queries (:mod:`pyrtok.vlm.query`): ``"language"`` (the model's own input
            embeddings), ``"clip:<path>"`` or an encoder object; :meth:`encode` aligns the tokens with it and
            :meth:`encode_query` embeds questions in it. None (default): the allocator gets the queries it is
            given, compared with the tokens' features.
        family_options: options of the family (Qwen: ``coarse_positions``; LLaVA-NeXT: ``newlines``,
            ``lazy_tiles``, ``views``; InternVL: ``lazy_tiles``; Gemma 3: ``pan_and_scan``).

    Example (the embedded model; real ones come the same way from a folder or a hub id)::

        vlm = PyramidVLM.from_pretrained("pyrtok/assets/tiny_llava", allocator="laplacian", budget=64, levels=3)
        out = vlm.generate([image_a, image_b], ["USER: <image> what colour is the big circle? ASSISTANT:"] * 2,
                           max_new_tokens=2)
        out.texts, out.counts
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        allocator: Allocator | str | dict | Path = "all",
        budget: Budget = None,
        encoder: nn.Module | None = None,
        mode: str = "feature",
        levels: int = 1,
        share_budget: bool = False,
        schedule: Schedule | str | dict | Path | None = None,
        query_encoder: Any = None,
        **family_options: Any,
    ) -> None:
        super().__init__()
        family_class = family_for(model)
        if encoder is not None:
            family_options["encoder"] = encoder
        self.model = model
        self.processor = processor
        self.family: Family = family_class(model, processor, mode=mode, levels=levels, **family_options)
        self.tokenizer = self.family.tokenizer
        self.allocator = resolve(allocator, "allocator")
        self.budget = budget
        self.share_budget = bool(share_budget)
        self.schedule = resolve_schedule(schedule)
        self.query_encoder = resolve_query_encoder(query_encoder, model, self.tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        allocator: Allocator | str | dict | Path | None = None,
        budget: Budget = None,
        config: str | Path | dict | None = None,
        mode: str | None = None,
        levels: int | None = None,
        schedule: Any = None,
        query_encoder: Any = None,
        **model_kwargs: Any,
    ) -> PyramidVLM:
        """Load a supported VLM and its processor from a local folder or a hub id (:func:`pyrtok.vlm.hub.
        load_model`); the family comes from the model's config.

        ``config`` (a YAML path or dict) may give ``allocator``, ``budget``, ``mode``, ``levels``, ``schedule``,
        ``query_encoder``, ``share_budget`` and family options; explicit arguments win over it. The allocator is
        resolved before the weights load, so a bad spec fails at once. Other keyword arguments go to the model's
        ``from_pretrained`` (e.g. ``dtype``; the hub's, :data:`HUB_KWARGS`, also to its config and processor).
        """
        options: dict[str, Any] = {}
        if config is not None:
            options = yaml.safe_load(Path(config).read_text()) if not isinstance(config, dict) else dict(config)
        for key, value in (("allocator", allocator), ("budget", budget), ("mode", mode), ("levels", levels),
                           ("schedule", schedule), ("query_encoder", query_encoder)):
            if value is not None:
                options[key] = value
        options["allocator"] = resolve(options.get("allocator", "all"), "allocator")
        model, processor = load_model(path_or_id, **model_kwargs)
        options["levels"] = int(options.get("levels", 1))
        return cls(model, processor, **options)

    # -- views ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def encoder(self) -> nn.Module:
        """The family's multi-scale encoder (LLaVA-1.5: a :class:`~pyrtok.encoders.MultiScaleEncoder`)."""
        encoder = getattr(self.family, "encoder", None)
        if encoder is None:
            raise AttributeError(f"the {self.family.name} family encodes through the model; it has no .encoder")
        return encoder

    @property
    def image_token_id(self) -> int:
        return self.family.image_token_id

    @property
    def image_token(self) -> str:
        return self.family.image_token

    def chat_prompt(self, question: str, images: int = 1) -> str:
        """A prompt asking ``question`` about ``images`` images (0: text only), in the model's own chat template
        (with its image markers, ready for :meth:`generate`); a model without a template gets LLaVA-1.5's
        ``USER: <image>\n{question} ASSISTANT:``.

        Example (the embedded model has no chat template)::

            vlm.chat_prompt("what colour is the big circle?")  # 'USER: <image>\nwhat colour ... ASSISTANT:'
        """
        return prompting.chat_prompt(self.processor, self.image_token, question, images)

    def check_prompt(self, prompt: str, images: int = 1, argument: str = "prompt") -> None:
        """Raise a ValueError naming ``argument`` unless ``prompt`` holds the image marker once per image."""
        prompting.check_prompt(self.tokenizer, self.family.marker_id, self.image_token, prompt, images, argument)

    # -- the pipeline, step by step ---------------------------------------------------------------------
    def pixels(self, images: Images) -> list[Tensor]:
        """Each image as the model sees it: a list of (3, H_i, W_i) tensors in [0, 1] on the model's device."""
        return [self.family.image_pixels(image).to(self.device) for sample in per_sample(images) for image in sample]

    def encode(self, images: Images) -> EncodedBatch:
        """Encode a batch once: images grouped by the size the model sees them at, each group in one pass.

        ``images``: a (B, 3, H, W) batch, or B entries, each one image, a list of images (one per image marker
        of its prompt) or None (a text-only sample).
        """
        samples = per_sample(images)
        owner = [b for b, sample in enumerate(samples) for _ in sample]
        pixels = [self.family.image_pixels(image).to(self.device) for sample in samples for image in sample]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(pixels):
            by_shape.setdefault(tuple(p.shape), []).append(i)
        groups = [(members, self._aligned(self.family.encode(torch.stack([pixels[i] for i in members]))))
                  for members in by_shape.values()]
        return EncodedBatch(owner, groups, len(samples))

    def _aligned(self, encoded: Encoded) -> Encoded:
        """``encoded`` with its tokens in the query encoder's space (``tokens.aligned``), where one is attached."""
        if self.query_encoder is None:
            return encoded
        aligned = self._align(self.family.query_space(encoded)).aligned
        return replace(encoded, tokens=encoded.tokens.with_aligned(aligned))

    def _align(self, tokens: MultiScaleTokens) -> MultiScaleTokens:
        """``tokens`` in the query encoder's space, where one is attached."""
        return tokens if self.query_encoder is None else self.query_encoder.align(tokens)

    def encode_query(self, questions: Sequence[str]) -> Tensor:
        """(B, D_q) the questions in the query encoder's space, for query-reading allocators (``select(query=)``).

        Example (the embedded model)::

            vlm = PyramidVLM.from_pretrained("embedded", allocator="cdpruner", query_encoder="language")
            vlm.generate(images, prompts, budget=32, query=vlm.encode_query(questions))
        """
        if self.query_encoder is None:
            raise ValueError("this PyramidVLM has no query_encoder: pass query_encoder='language' (the model's own "
                             "input embeddings) or 'clip:<path>' to embed questions")
        return self.query_encoder.encode(list(questions)).to(self.device)

    def select(
        self,
        encoded: EncodedBatch,
        budget: Budget = None,
        query: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> list[TokenSelection]:
        """The allocator's choice for every group of ``encoded`` (one :class:`TokenSelection` per group).

        ``budget``: see :data:`Budget` (default: the one given at construction; with ``share_budget`` a
        per-sample budget is split over the sample's images). ``query``: (B, D) text embeddings for
        query-driven allocators.
        """
        budget = self.budget if budget is None else budget
        budgets = sample_budgets(budget, encoded.owner, encoded.num_tokens(), self.share_budget)
        selections = []
        for members, group in encoded.groups:
            rows = None if query is None else query.to(self.device)[torch.tensor([encoded.owner[i] for i in members])]
            chosen = torch.tensor([budgets[i] for i in members], dtype=torch.long, device=self.device)
            selections.append(self.family.select(self.allocator, group, chosen, rows, generator, self._align))
        return selections

    def complete(self, encoded: EncodedBatch, selections: Sequence[TokenSelection]) -> EncodedBatch:
        """The family's deferred vision work for ``selections`` (LLaVA-NeXT's lazy tiles encode the tiles the
        kept tokens read); ``encoded`` itself where the family defers nothing. Time it as vision work."""
        encoded.check(selections)
        if not self.family.defers or encoded.completed_for(selections):
            return encoded
        groups = [(members, self.family.after_selection(group, chosen))
                  for (members, group), chosen in zip(encoded.groups, selections, strict=True)]
        return EncodedBatch(encoded.owner, groups, encoded.num_samples, tuple(selections))

    def prepare(
        self,
        images: Images | None,
        prompts: Sequence[str],
        budget: Budget = None,
        query: Tensor | None = None,
        generator: torch.Generator | None = None,
        encoded: EncodedBatch | None = None,
        selections: Sequence[TokenSelection] | None = None,
    ) -> Prepared:
        """Every step up to the language model, for the steps not handed in.

        ``images`` (see :meth:`encode`) may be None when ``encoded`` is given; ``selections`` (from
        :meth:`select`) skip the allocator; an ``encoded`` that :meth:`complete` returned for these
        ``selections`` skips the deferred step.
        """
        if encoded is None:
            if images is None:
                raise ValueError("pass images, or encoded= from vlm.encode(images)")
            encoded = self.encode(images)
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) != encoded.num_samples:
            raise ValueError(f"prompts must be a list of {encoded.num_samples} strings (one per sample), "
                             f"got {prompts!r}")
        if selections is None:
            selections = self.select(encoded, budget, query, generator)
        selections = list(selections)
        encoded = self.complete(encoded, selections)
        features: list[Tensor | None] = [None] * len(encoded.owner)
        extras: list[dict[str, Any]] = [{} for _ in encoded.owner]
        positions: list[Any] = [None] * len(encoded.owner)
        views: list[list[int] | None] = [None] * len(encoded.owner)
        for (members, group), chosen in zip(encoded.groups, selections, strict=True):
            kept, more = self.family.kept_features(group, chosen)
            for g, i in enumerate(members):
                features[i], extras[i] = kept[g], {k: v[g] for k, v in more.items()}
                merged = None if chosen.merged is None else chosen.merged.boxes[g, : int(chosen.merged.count[g])]
                index = chosen.index[g, : int(chosen.count[g])]
                positions[i] = self.family.image_positions(group.tokens, index, merged)
                views[i] = self.family.image_views(group.tokens, index, 0 if merged is None else len(merged))
        per_sample_images = [[i for i, o in enumerate(encoded.owner) if o == b] for b in range(encoded.num_samples)]
        image_counts = [[int(features[i].shape[0]) for i in images_of] for images_of in per_sample_images]
        input_ids, attention_mask = prompting.expand(self.tokenizer, self.family.marker_id, self.image_token,
                                                     prompts, image_counts, self.device, self.family.image_run,
                                                     self.family.image_text,
                                                     [[views[i] for i in images_of] for images_of in per_sample_images])
        position_ids = self.family.position_ids(input_ids, attention_mask,
                                                [[positions[i] for i in images_of] for images_of in per_sample_images])
        outputs = None
        if encoded.owner:
            keys = extras[0].keys()
            outputs = self.family.encoder_outputs(features, {k: [e[k] for e in extras] for k in keys})
        counts = torch.tensor([sum(c) for c in image_counts], device=self.device)
        return Prepared(input_ids, attention_mask, position_ids, outputs, counts, image_counts, encoded, selections,
                        self.family.model_inputs(input_ids, attention_mask))

    # -- user-facing calls ------------------------------------------------------------------------------
    def forward(
        self,
        images: Images | None,
        prompts: Sequence[str],
        labels: Tensor | Callable[[Tensor], Tensor] | None = None,
        budget: Budget = None,
        query: Tensor | None = None,
        generator: torch.Generator | None = None,
        encoded: EncodedBatch | None = None,
        selections: Sequence[TokenSelection] | None = None,
        schedule: Schedule | str | dict | Path | None = None,
    ):
        """Logits (and loss, given ``labels``) of the language model on the images and B prompts.

        ``labels``: (B, T) targets aligned with the expanded ``input_ids`` (-100 where no loss), or a function
        from those (B, T) ``input_ids`` to the labels, for labels that follow the text (such as a loss on the
        answers only), whose positions depend on how many image tokens each sample keeps. The other arguments
        are those of :meth:`prepare`.

        Returns the model's output object (``logits`` (B, T, V), ``loss`` given labels), with ``input_ids``
        (B, T) and ``counts`` (B,) attributes added. With a ``schedule`` (default: the one given at construction),
        ``logits`` are (B, T', V) over the columns the last layer saw, with ``columns`` (B, T') (their columns in
        ``input_ids``), ``column_mask`` (B, T'), ``stage_counts`` (B, S + 1) and ``layer_tokens`` (B, L) added;
        labels are not taken then.
        """
        inputs = self.prepare(images, prompts, budget, query, generator, encoded, selections)
        schedule = self.schedule if schedule is None else resolve_schedule(schedule)
        if schedule is not None:
            return self._scheduled_forward(inputs, schedule, labels)
        if callable(labels):
            labels = labels(inputs.input_ids)
        out = self.model(**inputs.model_inputs(), labels=labels)
        out.input_ids, out.counts = inputs.input_ids, inputs.counts
        return out

    @torch.no_grad()
    def generate(
        self,
        images: Images | None,
        prompts: Sequence[str],
        budget: Budget = None,
        query: Tensor | None = None,
        generator: torch.Generator | None = None,
        encoded: EncodedBatch | None = None,
        selections: Sequence[TokenSelection] | None = None,
        schedule: Schedule | str | dict | Path | None = None,
        **generation_kwargs: Any,
    ) -> VLMOutput:
        """Answer each prompt about its images from the allocated tokens (greedy unless told otherwise).

        The positions of the prompt (M-RoPE for the Qwen family) are passed explicitly and continue by one per
        new token, so decoding never falls back to positions the model would infer from ``inputs_embeds``.
        The arguments are those of :meth:`prepare`; the rest go to the model's ``generate``. With a ``schedule``
        (default: the one given at construction) the prompt runs through :func:`pyrtok.vlm.decode.prefill` and
        decoding is greedy from its per-layer cache (``max_new_tokens``, ``eos_token_id``, ``pad_token_id`` and
        ``logits_processor`` are taken); the output adds ``stage_counts`` and ``layer_tokens``.
        """
        inputs = self.prepare(images, prompts, budget, query, generator, encoded, selections)
        schedule = self.schedule if schedule is None else resolve_schedule(schedule)
        if schedule is not None:
            return self._scheduled_generate(inputs, schedule, generation_kwargs)
        generation_kwargs.setdefault("do_sample", False)
        generation_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        sequences = self.model.generate(**inputs.model_inputs(), **generation_kwargs)[:, inputs.input_ids.shape[1]:]
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        return VLMOutput(sequences, [t.strip() for t in texts], inputs.counts, inputs.attention_mask.sum(-1),
                         inputs.image_counts)

    # -- in-LLM schedules ----------------------------------------------------------------------------
    def _scheduled_forward(self, inputs: Prepared, schedule: Schedule, labels: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        from pyrtok.vlm.decode import prefill

        if labels is not None:
            raise ValueError("labels are not taken with an in-LLM schedule (dropped columns have no logits); "
                             "pass schedule=None for a loss")
        state = prefill(self.model, inputs.input_ids, inputs.attention_mask, inputs.position_ids,
                        self.image_token_id, schedule, inputs.mm_encoder_outputs,
                        image_blocks=self.family.bidirectional_images)
        out = CausalLMOutputWithPast(logits=state.logits)
        out.input_ids, out.counts = inputs.input_ids, inputs.counts
        out.columns, out.column_mask = state.columns, state.valid
        out.stage_counts, out.layer_tokens = state.stage_counts, state.layer_tokens
        return out

    def _scheduled_generate(self, inputs: Prepared, schedule: Schedule, options: dict[str, Any]) -> VLMOutput:
        from pyrtok.vlm.decode import scheduled_generate

        options = dict(options)
        if options.pop("do_sample", False):
            raise ValueError("in-LLM schedules decode greedily: do_sample must be False")
        taken = {k: options.pop(k) for k in ("max_new_tokens", "eos_token_id", "pad_token_id", "logits_processor")
                 if k in options}
        if options:
            raise ValueError(f"with an in-LLM schedule, generate takes max_new_tokens, eos_token_id, pad_token_id "
                             f"and logits_processor; got also {sorted(options)}")
        taken.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        out = scheduled_generate(self.model, inputs.input_ids, inputs.attention_mask, inputs.position_ids,
                                 self.image_token_id, schedule, inputs.mm_encoder_outputs,
                                 image_blocks=self.family.bidirectional_images, **taken)
        texts = self.tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
        return VLMOutput(out.sequences, [t.strip() for t in texts], inputs.counts, inputs.attention_mask.sum(-1),
                         inputs.image_counts, out.prefill.stage_counts, out.prefill.layer_tokens)
