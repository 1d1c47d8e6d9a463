"""The family-agnostic core: run a HuggingFace VLM on the tokens an allocator keeps.

The wrapped model is not modified. Images enter as users have them (PIL images, file paths, (3, H, W) tensors
in [0, 1], or a (B, 3, H, W) batch; a sample may hold several images) and become the pixels the model sees
through its own image processor (:mod:`pyrtok.vlm.families`). Images of one size are encoded together into
multi-scale tokens; the allocator keeps K_i of each image's tokens (or, with ``share_budget``, one budget is
split over a sample's images in proportion to their tokens); each image marker in the prompt is expanded to
exactly K_i placeholders; prompts of a batch are left-padded with per-sample counts. The kept tokens reach the
language model as precomputed vision outputs (``mm_encoder_outputs``), and positions are explicit: 1-D for
LLaVA, M-RoPE (t, h, w) for the Qwen family, where kept tokens keep their unpruned positions. The language
model runs with its own attention kernel (sdpa, or flash attention where installed): no hooks, no patched
classes. At full budget with the ``all`` allocator this is the unwrapped model on its own processor's inputs.

What differs between families lives in one small module each (:mod:`pyrtok.vlm.families.llava`,
:mod:`pyrtok.vlm.families.qwen`); the family is picked from the model's class (or config, in
:meth:`PyramidVLM.from_pretrained`), and an unsupported one gets an error listing the supported ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image
from torch import Tensor, nn

from pyrtok.allocators import Allocator, budget_tokens, resolve
from pyrtok.images import open_image
from pyrtok.tokens import MultiScaleTokens, TokenSelection
from pyrtok.vlm.families import Encoded, Family, family_for
from pyrtok.vlm.schedule import Schedule, resolve_schedule

__all__ = ["EncodedBatch", "ImageInput", "PyramidVLM", "VLMOutput"]

ImageInput = Image.Image | str | Path | Tensor
"""One image: a PIL image, an image file, or a (3, H, W) tensor in [0, 1]."""


@dataclass
class EncodedBatch:
    """A batch encoded once, to be allocated and answered under several allocators or budgets.

    Attributes:
        owner: (I,) the sample each image belongs to, images in prompt order.
        groups: (image indices, :class:`~pyrtok.vlm.families.Encoded`) per pixel size, in order of first
            appearance.
    """

    owner: list[int]
    groups: list[tuple[list[int], Encoded]]

    @property
    def num_samples(self) -> int:
        return max(self.owner) + 1 if self.owner else 0

    def subset(self, samples: Sequence[int]) -> EncodedBatch:
        """The encoding of some of the samples (renumbered in the given order)."""
        new_sample = {b: k for k, b in enumerate(samples)}
        keep = [i for i, b in enumerate(self.owner) if b in new_sample]
        new_index = {i: k for k, i in enumerate(sorted(keep, key=lambda i: (new_sample[self.owner[i]], i)))}
        owner = [0] * len(keep)
        for i, k in new_index.items():
            owner[k] = new_sample[self.owner[i]]
        groups = []
        for members, group in self.groups:
            chosen = [g for g, i in enumerate(members) if i in new_index]
            if chosen:
                rows = torch.tensor(chosen, device=group.pixels.device)
                groups.append(([new_index[members[g]] for g in chosen],
                               Encoded(group.tokens.select_images(rows), group.pixels[rows],
                                       {k: v[rows] for k, v in group.extras.items()})))
        return EncodedBatch(owner, groups)

    def num_tokens(self) -> list[int]:
        """(I,) tokens of each image."""
        counts = [0] * len(self.owner)
        for members, encoded in self.groups:
            for i in members:
                counts[i] = encoded.tokens.num_tokens
        return counts


@dataclass
class VLMOutput:
    """What :meth:`PyramidVLM.generate` returns.

    Attributes:
        sequences: (B, T_new) generated token ids (prompt excluded), padded with the pad id.
        texts: decoded answers, special tokens removed.
        counts: (B,) image tokens each sample was given (summed over its images).
        prompt_lengths: (B,) prompt tokens each sample's language model saw (image tokens included).
        image_counts: per sample, the tokens each of its images kept.
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
        budget: default image tokens per image: an int, a (B,) tensor (one per sample), or a float in (0, 1], a
            fraction of each image's own tokens (rounded up; native-resolution models give every image its own
            count); None keeps all.
        encoder: LLaVA only: a :class:`~pyrtok.encoders.MultiScaleEncoder` on the model's tower.
        mode, levels: ``"feature"`` (encode once, pool the grid) or ``"image"`` (encode every Gaussian level),
            and the number of pyramid levels.
        share_budget: with several images in a sample, one budget for the sample, split over its images in
            proportion to their tokens (rounded down, the remainder to the earliest images; an image left with
            none takes one from the largest share), so the shares add up to the budget, which must be at least
            the sample's image count; by default each image gets the budget.
        schedule: an in-LLM dropping schedule (FastV, PyramidDrop, DART: any spec
            :func:`pyrtok.vlm.schedule.resolve_schedule` takes), applied after the allocator's choice; None runs
            every decoder layer on every token the allocator kept.
        family_options: options of the family (for the Qwen family ``coarse_positions``).

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
        budget: int | Tensor | None = None,
        encoder: nn.Module | None = None,
        mode: str = "feature",
        levels: int = 1,
        share_budget: bool = False,
        schedule: Schedule | str | dict | Path | None = None,
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

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        allocator: Allocator | str | dict | Path | None = None,
        budget: int | None = None,
        config: str | Path | dict | None = None,
        mode: str | None = None,
        levels: int | None = None,
        schedule: Any = None,
        **model_kwargs: Any,
    ) -> PyramidVLM:
        """Load a supported VLM and its processor from a local folder or a hub id; the family comes from the
        model's config.

        ``config`` (a YAML path or dict) may give ``allocator`` (any spec :func:`pyrtok.allocators.resolve`
        takes), ``budget``, ``mode``, ``levels``, ``schedule``, ``share_budget`` and family options; explicit
        arguments win over it. The allocator and the family are resolved before the weights load, so a bad spec
        or an unsupported architecture fails at once. Other keyword arguments go to the model's
        ``from_pretrained`` (e.g. ``dtype``); the hub's (:data:`HUB_KWARGS`: ``revision``, ``token``,
        ``cache_dir``, ``subfolder``, ...) also reach the config and the processor, so all three come from the
        same files.
        """
        import transformers

        options: dict[str, Any] = {}
        if config is not None:
            options = yaml.safe_load(Path(config).read_text()) if not isinstance(config, dict) else dict(config)
        if allocator is not None:
            options["allocator"] = allocator
        for key, value in (("budget", budget), ("mode", mode), ("levels", levels), ("schedule", schedule)):
            if value is not None:
                options[key] = value
        chosen = resolve(options.pop("allocator", "all"), "allocator")
        hub = {k: v for k, v in model_kwargs.items() if k in HUB_KWARGS}
        model_config = transformers.AutoConfig.from_pretrained(path_or_id, **hub)
        family_for(model_config)
        model_class = getattr(transformers, model_config.architectures[0])
        model = model_class.from_pretrained(path_or_id, **model_kwargs)
        processor = _load_processor(path_or_id, **hub)
        levels_value = int(options.pop("levels", 1))
        return cls(model.eval(), processor, allocator=chosen, budget=options.pop("budget", None),
                   mode=options.pop("mode", "feature"), levels=levels_value, **options)

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
        """A prompt asking ``question`` about ``images`` images, in the model's own chat template (with its
        image markers, ready for :meth:`generate`); a model without a template gets LLaVA-1.5's
        ``USER: <image>\n{question} ASSISTANT:``.

        Example (the embedded model has no chat template)::

            vlm.chat_prompt("what colour is the big circle?")  # 'USER: <image>\nwhat colour ... ASSISTANT:'
        """
        if isinstance(images, bool) or not isinstance(images, int) or images < 1:
            raise ValueError(f"images must be a positive int, got {images!r}")
        template = getattr(self.processor, "chat_template", None)
        if template:
            content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": question}]
            return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True)
        return "USER: " + f"{self.image_token}\n" * images + f"{question} ASSISTANT:"

    def check_prompt(self, prompt: str, images: int = 1, argument: str = "prompt") -> None:
        """Raise a ValueError naming ``argument`` unless ``prompt`` holds the image marker once per image."""
        found = self.tokenizer(prompt, add_special_tokens=True)["input_ids"].count(self.image_token_id)
        if found != images:
            raise ValueError(f"{argument} must hold the image marker {self.image_token!r} {images} time(s), found "
                             f"{found}: {prompt!r}")

    # -- the pipeline, step by step ---------------------------------------------------------------------
    def pixels(self, images: Tensor | Sequence[ImageInput]) -> list[Tensor]:
        """Each image as the model sees it: a list of (3, H_i, W_i) tensors in [0, 1] on the model's device."""
        return [self.family.image_pixels(image).to(self.device) for image in _flatten(_per_sample(images))]

    def encode(self, images: Tensor | Sequence[ImageInput]) -> MultiScaleTokens:
        """Multi-scale tokens of images that the model sees at one size: (B, N, D)."""
        return self._encode_uniform(images).tokens

    def select(
        self,
        tokens: MultiScaleTokens,
        images: Tensor | Sequence[ImageInput],
        budget: int | Tensor | None = None,
        query: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> TokenSelection:
        """The allocator's choice on ``tokens`` (from :meth:`encode` on the same images)."""
        pixels = torch.stack(self.pixels(images))
        budget = self._budget(budget, tokens.num_tokens)
        return self.allocator(tokens, budget, image=pixels, query=query, generator=generator)

    def encode_batch(self, images: Tensor | Sequence[ImageInput | Sequence[ImageInput]]) -> EncodedBatch:
        """Encode a batch once (images grouped by the size the model sees them at): see :meth:`prepare`."""
        samples = _per_sample(images)
        owner = [b for b, sample in enumerate(samples) for _ in sample]
        return EncodedBatch(owner, self._encode_groups(self.pixels(images)))

    def select_batch(
        self,
        encoded: EncodedBatch,
        budget: int | Tensor | None = None,
        query: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> list[TokenSelection]:
        """The allocator's choice for every group of ``encoded`` (one :class:`TokenSelection` per group).

        ``budget``: tokens per image: an int, or a (B,) tensor with one value per sample (with ``share_budget``,
        per sample, split over its images).
        """
        selections = []
        for members, group in encoded.groups:
            budgets = self._image_budgets(budget, members, encoded)
            rows = None if query is None else query.to(self.device)[torch.tensor([encoded.owner[i] for i in members])]
            selections.append(self.allocator(group.tokens, budgets, image=group.pixels, query=rows,
                                             generator=generator))
        return selections

    def prepare(
        self,
        images: Tensor | Sequence[ImageInput | Sequence[ImageInput]] | None,
        prompts: Sequence[str],
        budget: int | Tensor | None = None,
        query: Tensor | None = None,
        generator: torch.Generator | None = None,
        tokens: MultiScaleTokens | None = None,
        selection: TokenSelection | None = None,
        encoded: EncodedBatch | None = None,
        selections: Sequence[TokenSelection] | None = None,
    ) -> dict[str, Any]:
        """Everything the language model needs: ``input_ids`` and ``attention_mask`` (B, T), ``position_ids``
        ((B, T), or (3, B, T) for M-RoPE) and ``mm_encoder_outputs``; plus ``counts`` (B,) and ``image_counts``.

        ``images``: a (B, 3, H, W) batch, or B entries, each one image or a list of images (one per image marker
        of its prompt). ``budget``: per image (int or (B,) tensor, one per sample). ``query``: (B, D) text
        embeddings for query-driven allocators. Precomputed steps, so that several allocators or budgets share
        one encoding: ``encoded`` (:meth:`encode_batch`; ``images`` may then be None) with optional
        ``selections`` (:meth:`select_batch`); or, for a batch of one image per sample at one size, ``tokens``
        (:meth:`encode`) with optional ``selection`` (:meth:`select`).
        """
        if encoded is None:
            samples = _per_sample(images)
            owner = [b for b, sample in enumerate(samples) for _ in sample]
            if tokens is not None or selection is not None:
                if len(owner) != len(samples):
                    raise ValueError("tokens= / selection= need exactly one image per sample")
                encoded = EncodedBatch(owner, [(list(range(len(owner))), self._encode_uniform(images, tokens))])
                selections = None if selection is None else [selection]
            else:
                encoded = EncodedBatch(owner, self._encode_groups(self.pixels(images)))
        owner = encoded.owner
        if isinstance(prompts, str) or len(prompts) != encoded.num_samples:
            raise ValueError(f"prompts must be a list of {encoded.num_samples} strings (one per sample), "
                             f"got {prompts!r}")
        if selections is None:
            selections = self.select_batch(encoded, budget, query, generator)
        if len(selections) != len(encoded.groups):
            raise ValueError(f"selections holds {len(selections)} groups but the batch has {len(encoded.groups)}")
        per_image: list[dict[str, Any]] = [{} for _ in owner]
        for (members, group), chosen in zip(encoded.groups, selections, strict=True):
            if chosen.batch_size != len(members):
                raise ValueError(f"a selection holds {chosen.batch_size} images but its group has {len(members)}")
            features, extras = self.family.kept_features(group, chosen)
            for g, i in enumerate(members):
                kept = chosen.index[g, : int(chosen.count[g])]
                # the placeholders an image takes are its language-model inputs: the kept tokens, plus any layout
                # tokens its family adds (such as row newlines)
                per_image[i] = {"features": features[g], "extras": {k: v[g] for k, v in extras.items()},
                                "count": int(features[g].shape[0])}
                if self.family.rope == "mrope":
                    merged = None if chosen.merged is None else chosen.merged.boxes[g, : int(chosen.merged.count[g])]
                    per_image[i]["positions"] = self.family.image_positions(group.tokens, kept, merged)
        image_counts = [[per_image[i]["count"] for i, o in enumerate(owner) if o == b]
                        for b in range(encoded.num_samples)]
        input_ids, attention_mask = self._expand(prompts, image_counts)
        if self.family.rope == "mrope":
            position_ids = self._mrope_positions(input_ids, attention_mask, per_image, owner)
        else:
            position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        extras_keys = per_image[0]["extras"].keys() if per_image else ()
        outputs = self.family.encoder_outputs([p["features"] for p in per_image],
                                              {k: [p["extras"][k] for p in per_image] for k in extras_keys})
        counts = torch.tensor([sum(c) for c in image_counts], device=self.device)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                "mm_encoder_outputs": outputs, "counts": counts, "image_counts": image_counts}

    # -- user-facing calls ------------------------------------------------------------------------------
    def forward(
        self,
        images: Tensor | Sequence[ImageInput | Sequence[ImageInput]],
        prompts: Sequence[str],
        labels: Tensor | Callable[[Tensor], Tensor] | None = None,
        budget: int | Tensor | None = None,
        query: Tensor | None = None,
        generator: torch.Generator | None = None,
        tokens: MultiScaleTokens | None = None,
        selection: TokenSelection | None = None,
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
        inputs = self.prepare(images, prompts, budget, query, generator, tokens, selection, encoded, selections)
        schedule = self.schedule if schedule is None else resolve_schedule(schedule)
        if schedule is not None:
            return self._scheduled_forward(inputs, schedule, labels)
        if callable(labels):
            labels = labels(inputs["input_ids"])
        out = self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         position_ids=inputs["position_ids"], mm_encoder_outputs=inputs["mm_encoder_outputs"],
                         labels=labels)
        out.input_ids, out.counts = inputs["input_ids"], inputs["counts"]
        return out

    @torch.no_grad()
    def generate(
        self,
        images: Tensor | Sequence[ImageInput | Sequence[ImageInput]],
        prompts: Sequence[str],
        budget: int | Tensor | None = None,
        query: Tensor | None = None,
        generator: torch.Generator | None = None,
        tokens: MultiScaleTokens | None = None,
        selection: TokenSelection | None = None,
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
        inputs = self.prepare(images, prompts, budget, query, generator, tokens, selection, encoded, selections)
        schedule = self.schedule if schedule is None else resolve_schedule(schedule)
        if schedule is not None:
            return self._scheduled_generate(inputs, schedule, generation_kwargs)
        generation_kwargs.setdefault("do_sample", False)
        generation_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        input_ids = inputs["input_ids"]
        sequences = self.model.generate(
            input_ids=input_ids, attention_mask=inputs["attention_mask"], position_ids=inputs["position_ids"],
            mm_encoder_outputs=inputs["mm_encoder_outputs"], **generation_kwargs,
        )[:, input_ids.shape[1]:]
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        return VLMOutput(sequences, [t.strip() for t in texts], inputs["counts"], inputs["attention_mask"].sum(-1),
                         inputs["image_counts"])

    # -- in-LLM schedules ----------------------------------------------------------------------------
    def _scheduled_forward(self, inputs: dict[str, Any], schedule: Schedule, labels: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        from pyrtok.vlm.decode import prefill

        if labels is not None:
            raise ValueError("labels are not taken with an in-LLM schedule (dropped columns have no logits); "
                             "pass schedule=None for a loss")
        state = prefill(self.model, inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"],
                        self.image_token_id, schedule, inputs["mm_encoder_outputs"])
        out = CausalLMOutputWithPast(logits=state.logits)
        out.input_ids, out.counts = inputs["input_ids"], inputs["counts"]
        out.columns, out.column_mask = state.columns, state.valid
        out.stage_counts, out.layer_tokens = state.stage_counts, state.layer_tokens
        return out

    def _scheduled_generate(self, inputs: dict[str, Any], schedule: Schedule, options: dict[str, Any]) -> VLMOutput:
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
        out = scheduled_generate(self.model, inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"],
                                 self.image_token_id, schedule, inputs["mm_encoder_outputs"], **taken)
        texts = self.tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
        return VLMOutput(out.sequences, [t.strip() for t in texts], inputs["counts"],
                         inputs["attention_mask"].sum(-1), inputs["image_counts"], out.prefill.stage_counts,
                         out.prefill.layer_tokens)

    # -- internals ----------------------------------------------------------------------------------
    def _budget(self, budget: int | float | Tensor | None, num_tokens: int) -> int | Tensor:
        budget = self.budget if budget is None else budget
        if isinstance(budget, float):
            return budget_tokens(budget, num_tokens)
        return num_tokens if budget is None else budget

    def _encode_uniform(self, images: Any, tokens: MultiScaleTokens | None = None) -> Encoded:
        pixels = self.pixels(images)
        if len({tuple(p.shape) for p in pixels}) != 1:
            raise ValueError("these images are seen at different sizes; pass them to generate()/forward(), which "
                             f"group them by size (sizes: {sorted({tuple(p.shape[-2:]) for p in pixels})})")
        stacked = torch.stack(pixels)
        if tokens is None:
            return self.family.encode(stacked)
        if self.family.encoding_extras:
            raise ValueError(f"tokens= holds only the multi-scale tokens, but this {self.family.name} model also "
                             f"needs {list(self.family.encoding_extras)} from the encoding; pass "
                             f"encoded=vlm.encode_batch(images) (and selections=vlm.select_batch(...)) instead")
        if tokens.batch_size != stacked.shape[0]:
            raise ValueError(f"tokens hold {tokens.batch_size} images but images has {stacked.shape[0]}")
        return Encoded(tokens, stacked)

    def _encode_groups(self, pixels: list[Tensor]) -> list[tuple[list[int], Encoded]]:
        """Images grouped by size (in order of first appearance), each group encoded in one pass."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(pixels):
            by_shape.setdefault(tuple(p.shape), []).append(i)
        return [(members, self.family.encode(torch.stack([pixels[i] for i in members])))
                for members in by_shape.values()]

    def _image_budgets(self, budget: int | Tensor | None, members: list[int], encoded: EncodedBatch) -> Tensor:
        """(G,) budget of each image of a group: its sample's budget, or its share of it (``share_budget``:
        in proportion to the images' tokens, rounded down, the remainder to the earliest images; an image left
        with none takes one from the largest share, so a shared budget must be at least the sample's image
        count, and the shares add up to it)."""
        budget = self.budget if budget is None else budget
        sizes = encoded.num_tokens()
        if budget is None:
            return torch.tensor([sizes[i] for i in members], dtype=torch.long, device=self.device)
        if isinstance(budget, float):  # a fraction of each image's own tokens
            return torch.tensor([budget_tokens(budget, sizes[i]) for i in members], dtype=torch.long,
                                device=self.device)
        per_sample = _per_sample_budget(budget, encoded.num_samples)
        out = []
        for i in members:
            b = encoded.owner[i]
            siblings = [j for j, o in enumerate(encoded.owner) if o == b]
            value = per_sample[b]
            if self.share_budget and len(siblings) > 1:
                if value < len(siblings):
                    raise ValueError(f"budget for sample {b} is {value} tokens, fewer than its {len(siblings)} "
                                     f"images: with share_budget each image keeps at least one token")
                total = sum(sizes[j] for j in siblings)
                shares = [value * sizes[j] // total for j in siblings]
                for k in range(value - sum(shares)):
                    shares[k % len(shares)] += 1
                for k in [k for k, share in enumerate(shares) if share == 0]:  # one token from the largest
                    shares[max(range(len(shares)), key=shares.__getitem__)] -= 1
                    shares[k] = 1
                value = shares[siblings.index(i)]
            out.append(value)
        return torch.tensor(out, dtype=torch.long, device=self.device)

    def _expand(self, prompts: Sequence[str], image_counts: list[list[int]]) -> tuple[Tensor, Tensor]:
        """Tokenise prompts, expanding image marker j of prompt b to image_counts[b][j] placeholders; left-pad."""
        marker, rows = self.image_token_id, []
        for b, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompts[{b}] must be a str, got {type(prompt).__name__}")
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            at = [k for k, token in enumerate(ids) if token == marker]
            if len(at) != len(image_counts[b]):
                raise ValueError(f"prompts[{b}] must hold the image marker {self.image_token!r} once per image "
                                 f"({len(image_counts[b])}), found {len(at)}: {prompt!r}")
            row, last = [], 0
            for k, count in zip(at, image_counts[b], strict=True):
                row += ids[last:k] + [marker] * count
                last = k + 1
            rows.append(row + ids[last:])
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows], device=self.device)
        attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], device=self.device)
        return input_ids, attention_mask

    def _mrope_positions(self, input_ids: Tensor, attention_mask: Tensor, per_image: list[dict[str, Any]],
                         owner: list[int]) -> Tensor:
        """(3, B, T) M-RoPE positions: text consecutive, each image's kept tokens at their offsets from the
        image's start, the text after an image where the unpruned model puts it; padding 0."""
        batch, length = input_ids.shape
        positions = torch.zeros(3, batch, length, dtype=torch.long, device=input_ids.device)
        marker = self.image_token_id
        for b in range(batch):
            images = iter([p for p, o in zip(per_image, owner, strict=True) if o == b])
            start = int((attention_mask[b] == 0).sum())
            ids = input_ids[b].tolist()
            k, current = start, 0
            while k < length:
                if ids[k] == marker:
                    image = next(images)
                    offsets, span = image["positions"]
                    count = offsets.shape[1]
                    positions[:, b, k : k + count] = current + offsets.to(positions.device)
                    current += span
                    k += count
                    continue
                end = k
                while end < length and ids[end] != marker:
                    end += 1
                positions[:, b, k:end] = torch.arange(current, current + end - k, device=positions.device)
                current += end - k
                k = end
        return positions


_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "trust_remote_code",
              "force_download", "proxies")
"""``from_pretrained`` keyword arguments that say where files come from: they reach the config, the weights
and the processor alike."""


def _load_processor(path_or_id: str | Path, **hub: Any) -> Any:
    """The model's ``AutoProcessor``; its tokenizer alone when no processor was saved with it (a local folder
    without processor files, or a hub repository whose processor files are missing). A processor that was
    saved but fails to load raises: falling back would silently replace the model's own image processing."""
    from transformers import AutoProcessor, AutoTokenizer

    folder = Path(path_or_id) / (hub.get("subfolder") or "")
    if folder.is_dir():
        if not any((folder / name).is_file() for name in _PROCESSOR_FILES):
            return AutoTokenizer.from_pretrained(path_or_id, **hub)
        return AutoProcessor.from_pretrained(path_or_id, **hub)
    try:
        return AutoProcessor.from_pretrained(path_or_id, **hub)
    except OSError:  # transformers' error for a missing file: the repository has no processor
        return AutoTokenizer.from_pretrained(path_or_id, **hub)


def _per_sample(images: Any) -> list[list[Any]]:
    """Images as users pass them -> one list of images per sample."""
    if isinstance(images, Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a (B, 3, H, W) tensor in [0, 1], got {tuple(images.shape)}")
        return [[image] for image in images]
    if isinstance(images, (Image.Image, str, Path)) or not isinstance(images, Sequence) or not len(images):
        raise TypeError("images must be a (B, 3, H, W) tensor or a non-empty list with one entry per sample "
                        f"(an image or a list of images), got {type(images).__name__}")
    samples = []
    for b, entry in enumerate(images):
        group = list(entry) if isinstance(entry, (list, tuple)) else [entry]
        if not group:
            raise ValueError(f"images[{b}] is an empty list; a sample needs at least one image")
        samples.append([_load(image, f"images[{b}]") for image in group])
    return samples


def _load(image: Any, name: str) -> Image.Image | Tensor:
    if isinstance(image, Tensor):
        return image
    if isinstance(image, (Image.Image, str, Path)):
        try:
            return open_image(image)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{name}: {error}") from None
    raise TypeError(f"{name} must be a PIL image, a file path or a (3, H, W) tensor, got {type(image).__name__}")


def _flatten(samples: list[list[Any]]) -> list[Any]:
    return [image for sample in samples for image in sample]


def _per_sample_budget(budget: int | Tensor, batch: int) -> list[int]:
    if isinstance(budget, Tensor):
        if budget.is_floating_point() or budget.is_complex() or budget.dtype == torch.bool:
            raise TypeError(f"a budget tensor holds token counts and must have an integer dtype, got {budget.dtype}; "
                            "pass a float (not a tensor) for a fraction of each image's tokens")
        if budget.dim() == 0:
            return [int(budget)] * batch
        if budget.shape != (batch,):
            raise ValueError(f"budget tensor must have shape ({batch},) (one per sample), got {tuple(budget.shape)}")
        return [int(v) for v in budget.tolist()]
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int or a (B,) integer tensor, got {budget!r}")
    return [budget] * batch
