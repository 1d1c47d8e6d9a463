"""CLIP text embeddings, and tokens projected into CLIP's joint space, for query relevance.

Query relevance compares tokens with a text embedding, so both must live in the same space. For a HF
``CLIPModel`` the text side is ``get_text_features``; on the vision side, token features from the last
layer go through the model's ``post_layernorm`` and ``visual_projection`` exactly as the pooled [CLS]
feature does (for earlier layers this is the usual approximation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyrtok.tokens import MultiScaleTokens

__all__ = ["ClipQueryEncoder"]


def _features(output: Any) -> Tensor:
    # transformers 5 returns an output object; 4.x returned the tensor itself.
    return output.pooler_output if hasattr(output, "pooler_output") else output


class ClipQueryEncoder(nn.Module):
    """Text queries and visual tokens in one CLIP embedding space.

    Args:
        model: a HF ``CLIPModel``.
        tokenizer: its tokenizer (or a processor with ``.tokenizer``).

    Example::

        query = ClipQueryEncoder(clip, tokenizer)
        tokens = MultiScaleEncoder(clip, feature_layer=-1)(images)
        allocator(query.project_tokens(tokens), 64, query=query.encode(["the red car"]))
    """

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        if not hasattr(model, "get_text_features") or not hasattr(model, "visual_projection"):
            raise TypeError(f"model must be a HF CLIPModel, got {type(model).__name__}")
        self.model = model
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> Tensor:
        """``texts`` -> (B, P) unit-norm text embeddings."""
        if isinstance(texts, str) or not texts:
            raise ValueError(f"texts must be a non-empty list of strings, got {texts!r}")
        device = next(self.model.parameters()).device
        inputs = self.tokenizer(list(texts), padding=True, return_tensors="pt").to(device)
        inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        return F.normalize(_features(self.model.get_text_features(**inputs)), dim=-1)

    def project_tokens(self, tokens: MultiScaleTokens) -> MultiScaleTokens:
        """Tokens of the CLIP vision tower (B, N, D) -> the same tokens in the joint space (B, N, P)."""
        vision = self.model.vision_model
        if tokens.dim != vision.config.hidden_size:
            raise ValueError(
                f"tokens have dim {tokens.dim}, but this CLIP vision tower has hidden size {vision.config.hidden_size}"
            )
        return tokens.with_features(self.model.visual_projection(vision.post_layernorm(tokens.features)))
