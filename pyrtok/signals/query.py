"""Query relevance: cosine similarity between tokens and a text embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from pyrtok.tokens import MultiScaleTokens


def query_relevance(tokens: MultiScaleTokens, query: Tensor) -> Tensor:
    """Cosine similarity of every token with the query embedding.

    Args:
        tokens: features (B, N, D), already in the text embedding's space (e.g. after the CLIP
            visual projection).
        query: (B, D) one embedding per sample, or (D,) shared by the batch.

    Returns:
        (B, N) similarities in [-1, 1].
    """
    if not hasattr(query, "dim") or query.dim() not in (1, 2):
        raise ValueError(f"query must be a (B, D) or (D,) tensor, got {getattr(query, 'shape', type(query))}")
    if query.dim() == 1:
        query = rearrange(query, "d -> 1 d").expand(tokens.batch_size, -1)
    if query.shape != (tokens.batch_size, tokens.dim):
        raise ValueError(
            f"query must have shape ({tokens.batch_size}, {tokens.dim}) to match the tokens, got {tuple(query.shape)}"
        )
    # float32 even for half-precision towers, where many similarities would otherwise tie.
    query = F.normalize(query.to(device=tokens.device, dtype=torch.float32), dim=-1)
    return (F.normalize(tokens.features.float(), dim=-1) @ rearrange(query, "b d -> b d 1"))[..., 0]
