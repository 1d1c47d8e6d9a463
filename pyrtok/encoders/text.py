"""CLIP text embeddings, and tokens projected into CLIP's joint space, for query relevance.

Query relevance compares tokens with a text embedding, so both must live in the same space. For a HF
``CLIPModel`` the text side is ``get_text_features``; on the vision side, token features from the last
layer go through the model's ``post_layernorm`` and ``visual_projection`` exactly as the pooled [CLS]
feature does (for earlier layers this is the usual approximation). For an OpenCLIP ``CLIP`` model the text
side is ``encode_text`` and the vision side ``visual.ln_post`` then ``visual.proj``
(:meth:`pyrtok.encoders.openclip.OpenClipTower.project`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyrtok.encoders.openclip import OpenClipTower, is_openclip
from pyrtok.tokens import MultiScaleTokens

__all__ = ["ClipQueryEncoder"]


def _features(output: Any) -> Tensor:
    # transformers 5 returns an output object; 4.x returned the tensor itself.
    return output.pooler_output if hasattr(output, "pooler_output") else output


class ClipQueryEncoder(nn.Module):
    """Text queries and visual tokens in one CLIP embedding space.

    Args:
        model: a HF ``CLIPModel`` or an OpenCLIP ``CLIP`` model.
        tokenizer: its tokenizer (a HF tokenizer or a processor with ``.tokenizer``; OpenCLIP's
            ``open_clip.get_tokenizer(name)``).

    Example::

        query = ClipQueryEncoder(clip, tokenizer)
        tokens = MultiScaleEncoder(clip, feature_layer=-1)(images)
        allocator(query.project_tokens(tokens), 64, query=query.encode(["the red car"]))
    """

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.openclip = hasattr(model, "encode_text") and is_openclip(model)
        if not self.openclip and not (hasattr(model, "get_text_features") and hasattr(model, "visual_projection")):
            raise TypeError(f"model must be a HF CLIPModel or an OpenCLIP CLIP model, got {type(model).__name__}")
        self.model = model
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        self._visual = OpenClipTower(model) if self.openclip else None
        self.vision_dim = self._visual.hidden_size if self._visual else model.vision_model.config.hidden_size

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> Tensor:
        """``texts`` -> (B, P) text embeddings: unit norm for a text within one context of the text tower.

        A HF CLIP reads each text as CDPruner's authors do (``clip_encoder.py``, ``forward`` with ``texts``): its
        token ids (no truncation) zero-padded on the right to a multiple of the context (``max_position_embeddings``),
        each context-long segment embedded; the result is the mean of the segments' unit-norm embeddings (the
        mean cosine with the segments is the cosine with that mean). OpenCLIP's tokenizer truncates to its context.
        """
        if isinstance(texts, str) or not texts:
            raise ValueError(f"texts must be a non-empty list of strings, got {texts!r}")
        device = next(self.model.parameters()).device
        if self.openclip:
            return F.normalize(self.model.encode_text(self.tokenizer(list(texts)).to(device)), dim=-1)
        context = int(self.model.config.text_config.max_position_embeddings)
        segments, owner = [], []
        for i, text in enumerate(texts):
            encoded = self.tokenizer(text=text, return_tensors="pt")
            encoded = {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask")}
            length = encoded["input_ids"].shape[1]
            count = (length - 1) // context + 1
            pad = context * count - length
            segments.append({k: torch.cat([v, v.new_zeros((1, pad))], dim=1).reshape(-1, context)
                             for k, v in encoded.items()})
            owner += [i] * count
        inputs = {k: torch.cat([s[k] for s in segments]).to(device) for k in segments[0]}
        embeds = F.normalize(_features(self.model.get_text_features(**inputs)), dim=-1)
        owner_t = torch.tensor(owner, device=device)
        sums = embeds.new_zeros(len(texts), embeds.shape[-1]).index_add_(0, owner_t, embeds)
        return sums / torch.bincount(owner_t, minlength=len(texts)).unsqueeze(1).to(embeds.dtype)

    def align(self, tokens: MultiScaleTokens) -> MultiScaleTokens:
        """The tokens with ``aligned`` = their features in the joint space (:meth:`project`); the query encoder
        protocol of :mod:`pyrtok.vlm.query`."""
        return tokens.with_aligned(self.project(tokens.features))

    def project(self, features: Tensor) -> Tensor:
        """(..., D) vision-tower features -> (..., P) in the joint space, as the model projects its [CLS]."""
        if features.shape[-1] != self.vision_dim:
            raise ValueError(
                f"features have dim {features.shape[-1]}, but this CLIP vision tower has hidden size {self.vision_dim}"
            )
        if self._visual is not None:
            return self._visual.project(features)
        return self.model.visual_projection(self.model.vision_model.post_layernorm(features))

    def project_tokens(self, tokens: MultiScaleTokens) -> MultiScaleTokens:
        """Tokens of the CLIP vision tower (B, N, D) -> the same tokens in the joint space (B, N, P)."""
        return tokens.with_features(self.project(tokens.features))
