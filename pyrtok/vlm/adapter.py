"""Run a HuggingFace LLaVA-family VLM on the tokens an allocator keeps.

The wrapped model is not modified. For each image, the encoder builds multi-scale tokens, the allocator
keeps K_b of them, the model's own projector maps them to the language model's width, and the prompt's
image placeholder is expanded to exactly K_b placeholder tokens whose embeddings are replaced by the
projected tokens. The language model then runs on ``inputs_embeds`` with its ordinary attention kernel
(sdpa, or flash attention where installed): no attention hooks, no patched classes. Batches whose samples
keep different numbers of tokens are left-padded, with position ids taken from the attention mask, so a
batch gives what each sample gives alone.

Supported: ``LlavaForConditionalGeneration`` (LLaVA-1.5-style: one image, a CLIP or SigLIP tower, a
projector, a decoder-only LM). With a SigLIP tower every patch is kept as a token (SigLIP has no [CLS]);
HF's own ``vision_feature_select_strategy="default"`` would drop the first patch there. Not supported:
LLaVA-NeXT's any-resolution tiling and Qwen2-VL's dynamic
resolution (their placeholder layouts and position schemes differ).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from pyrtok.allocators import Allocator, resolve
from pyrtok.encoders import MultiScaleEncoder
from pyrtok.tokens import MultiScaleTokens, TokenSelection, gather

__all__ = ["PyramidVLM", "VLMOutput"]


@dataclass
class VLMOutput:
    """What :meth:`PyramidVLM.generate` returns.

    Attributes:
        sequences: (B, T_new) generated token ids (prompt excluded), padded with the pad id.
        texts: decoded answers, special tokens removed.
        counts: (B,) image tokens each sample was given.
        prompt_lengths: (B,) prompt tokens each sample's language model saw (image tokens included).
    """

    sequences: Tensor
    texts: list[str]
    counts: Tensor
    prompt_lengths: Tensor | None = None


def _supported(model: nn.Module) -> None:
    if type(model).__name__ != "LlavaForConditionalGeneration":
        raise TypeError(
            f"PyramidVLM supports LlavaForConditionalGeneration (LLaVA-1.5-style) models, got {type(model).__name__}"
        )


class PyramidVLM(nn.Module):
    """A LLaVA-family model fed with allocated multi-scale tokens.

    Args:
        model: a HF ``LlavaForConditionalGeneration``.
        tokenizer: its tokenizer (or a processor with a ``.tokenizer``); must know the image token.
        allocator: any allocator spec :func:`pyrtok.allocators.resolve` takes: an
            :class:`~pyrtok.allocators.Allocator`, a registered name, a YAML path or a mapping with ``name``.
        budget: default number of image tokens per sample (int or (B,) tensor); None keeps all.
        encoder: a :class:`~pyrtok.encoders.MultiScaleEncoder` on the model's tower; by default one in
            ``mode`` with ``levels`` levels, using the model's ``vision_feature_layer``.
        mode, levels: for the default encoder.

    Example (a tiny random model; real ones come from :meth:`from_pretrained`)::

        vlm = PyramidVLM(model, tokenizer, allocator="laplacian", budget=64, levels=3)
        out = vlm.generate(images, ["USER: <image>\\nWhat colour is the square? ASSISTANT:"], max_new_tokens=5)
        out.texts, out.counts
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        allocator: Allocator | str | dict | Path = "all",
        budget: int | Tensor | None = None,
        encoder: MultiScaleEncoder | None = None,
        mode: str = "feature",
        levels: int = 1,
    ) -> None:
        super().__init__()
        _supported(model)
        self.model = model
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        self.allocator = resolve(allocator, "allocator")
        self.budget = budget
        config = model.config
        if encoder is None:
            layer = config.vision_feature_layer
            if not isinstance(layer, int):
                raise ValueError(f"vision_feature_layer lists several layers ({layer}); pass an encoder explicitly")
            encoder = MultiScaleEncoder(model, mode=mode, levels=levels, feature_layer=layer)
        self.encoder = encoder
        if getattr(config, "vision_feature_select_strategy", "default") != "default" and encoder.tower.has_cls:
            raise ValueError("only vision_feature_select_strategy='default' (patch tokens, no [CLS]) is supported")
        self.image_token_id = int(config.image_token_id)
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token for batched, left-padded prompts")

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
        **model_kwargs: Any,
    ) -> PyramidVLM:
        """Load a LLaVA model and its tokenizer from a local folder or a hub id.

        ``config`` (a YAML path or dict) may give ``allocator`` (any spec :func:`pyrtok.allocators.resolve`
        takes), ``budget``, ``mode`` and ``levels``; explicit arguments win over it. The allocator is resolved
        before the weights load, so a bad spec fails at once. Other keyword arguments go to
        ``LlavaForConditionalGeneration.from_pretrained`` (e.g. ``torch_dtype``).
        """
        from transformers import AutoTokenizer, LlavaForConditionalGeneration

        options: dict[str, Any] = {}
        if config is not None:
            options = yaml.safe_load(Path(config).read_text()) if not isinstance(config, dict) else dict(config)
        if allocator is not None:
            options["allocator"] = allocator
        for key, value in (("budget", budget), ("mode", mode), ("levels", levels)):
            if value is not None:
                options[key] = value
        chosen = resolve(options.get("allocator", "all"), "allocator")
        model = LlavaForConditionalGeneration.from_pretrained(path_or_id, **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
        return cls(
            model.eval(), tokenizer, allocator=chosen, budget=options.get("budget"),
            mode=options.get("mode", "feature"), levels=int(options.get("levels", 1)),
        )

    # -- the pipeline, step by step ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, images: Tensor) -> MultiScaleTokens:
        """(B, 3, H, W) in [0, 1] -> multi-scale tokens from the model's own tower."""
        return self.encoder(images.to(self.device))

    def select(
        self,
        tokens: MultiScaleTokens,
        images: Tensor,
        budget: int | Tensor | None = None,
        query: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> TokenSelection:
        budget = self.budget if budget is None else budget
        budget = tokens.num_tokens if budget is None else budget
        prepared = self.encoder.prepare(images.to(self.device))
        return self.allocator(tokens, budget, image=prepared, query=query, generator=generator)

    def image_embeddings(self, tokens: MultiScaleTokens, selection: TokenSelection) -> Tensor:
        """(B, K, D_lm) projected features of the kept tokens (padded entries are projections of zeros)."""
        features, _ = gather(tokens, selection)
        return self.model.model.multi_modal_projector(features)

    def build_inputs(self, prompts: Sequence[str], counts: Tensor) -> tuple[Tensor, Tensor]:
        """Tokenise prompts with their image placeholder expanded to counts[b] tokens; left-pad.

        Returns:
            ``(input_ids, attention_mask)``, both (B, T).
        """
        if isinstance(prompts, str) or len(prompts) != len(counts):
            raise ValueError(f"prompts must be a list of {len(counts)} strings (one per image), got {prompts!r}")
        rows = []
        for b, prompt in enumerate(prompts):
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            if ids.count(self.image_token_id) != 1:
                raise ValueError(
                    f"prompts[{b}] must contain the image placeholder {self.image_token!r} exactly once, got {prompt!r}"
                )
            at = ids.index(self.image_token_id)
            rows.append(ids[:at] + [self.image_token_id] * int(counts[b]) + ids[at + 1 :])
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows], device=self.device)
        attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], device=self.device)
        return input_ids, attention_mask

    def inputs_embeds(self, input_ids: Tensor, image_embeds: Tensor, selection: TokenSelection) -> Tensor:
        """Token embeddings of ``input_ids`` with the image placeholders replaced, in order, by the kept tokens."""
        embeds = self.model.get_input_embeddings()(input_ids)
        slots = (input_ids == self.image_token_id).unsqueeze(-1)
        valid = image_embeds[selection.mask].to(embeds.dtype)
        return embeds.masked_scatter(slots, valid)

    def prepare(
        self,
        images: Tensor,
        prompts: Sequence[str],
        budget: int | Tensor | None = None,
        query: Tensor | None = None,
        generator: torch.Generator | None = None,
        tokens: MultiScaleTokens | None = None,
        selection: TokenSelection | None = None,
    ) -> dict[str, Tensor]:
        """Everything the language model needs: ``inputs_embeds``, ``attention_mask``, ``position_ids``,
        plus ``input_ids`` and the kept ``counts``.

        ``tokens`` (from :meth:`encode` on the same images) skips the vision tower, so several allocators
        or budgets can share one encoding; ``selection`` (from :meth:`select` on those tokens) skips the
        allocator, so it can be timed or inspected on its own.
        """
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a (B, 3, H, W) tensor in [0, 1], got {getattr(images, 'shape', images)}")
        images = self.encoder.prepare(images.to(self.device))  # resized once, shared by encoder and signals
        if tokens is None:
            tokens = self.encode(images)
        elif tokens.features.shape[0] != images.shape[0]:
            raise ValueError(f"tokens hold {tokens.features.shape[0]} images but images has {images.shape[0]}")
        if selection is None:
            selection = self.select(tokens, images, budget, query, generator)
        input_ids, attention_mask = self.build_inputs(prompts, selection.count)
        embeds = self.inputs_embeds(input_ids, self.image_embeddings(tokens, selection), selection)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        return {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": position_ids,
                "input_ids": input_ids, "counts": selection.count}

    # -- user-facing calls ------------------------------------------------------------------------------
    def forward(
        self,
        images: Tensor,
        prompts: Sequence[str],
        labels: Tensor | Callable[[Tensor], Tensor] | None = None,
        budget: int | Tensor | None = None,
        query: Tensor | None = None,
        generator: torch.Generator | None = None,
        tokens: MultiScaleTokens | None = None,
        selection: TokenSelection | None = None,
    ):
        """Logits (and loss, given ``labels``) of the language model on (B, 3, H, W) ``images`` and B prompts.

        ``labels``: (B, T) targets aligned with the expanded ``input_ids`` (-100 where no loss), or a function
        from those (B, T) ``input_ids`` to the labels, for labels that follow the text (such as a loss on the
        answers only), whose positions depend on how many image tokens each sample keeps.
        ``tokens``, ``selection``: precomputed :meth:`encode` / :meth:`select` results (see :meth:`prepare`),
        e.g. to train the tower with its own loss on the same encoding.

        Returns the model's output object (``logits`` (B, T, V), ``loss`` given labels), with ``input_ids``
        (B, T) and ``counts`` (B,) attributes added.
        """
        inputs = self.prepare(images, prompts, budget, query, generator, tokens, selection)
        if callable(labels):
            labels = labels(inputs["input_ids"])
        out = self.model(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                         position_ids=inputs["position_ids"], labels=labels)
        out.input_ids, out.counts = inputs["input_ids"], inputs["counts"]
        return out

    @torch.no_grad()
    def generate(
        self,
        images: Tensor,
        prompts: Sequence[str],
        budget: int | Tensor | None = None,
        query: Tensor | None = None,
        generator: torch.Generator | None = None,
        tokens: MultiScaleTokens | None = None,
        selection: TokenSelection | None = None,
        **generation_kwargs: Any,
    ) -> VLMOutput:
        """Answer each prompt about its image from the allocated tokens (greedy unless told otherwise).

        ``tokens``, ``selection``: precomputed :meth:`encode` / :meth:`select` results (see :meth:`prepare`).
        """
        inputs = self.prepare(images, prompts, budget, query, generator, tokens, selection)
        generation_kwargs.setdefault("do_sample", False)
        generation_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        sequences = self.model.generate(
            inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"], **generation_kwargs
        )
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        return VLMOutput(sequences, [t.strip() for t in texts], inputs["counts"], inputs["attention_mask"].sum(-1))
