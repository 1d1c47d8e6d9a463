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
        tokens: ``tokens.aligned`` (B, N, D) where set (the tokens in the query's space, see
            :mod:`pyrtok.vlm.query`), else ``tokens.features``, already in that space (e.g. after the CLIP visual
            projection).
        query: (B, D) one embedding per sample, or (D,) shared by the batch.

    Returns:
        (B, N) similarities in [-1, 1].
    """
    if not hasattr(query, "dim") or query.dim() not in (1, 2):
        raise ValueError(f"query must be a (B, D) or (D,) tensor, got {getattr(query, 'shape', type(query))}")
    space = query_space(tokens)
    if query.dim() == 1:
        query = rearrange(query, "d -> 1 d").expand(tokens.batch_size, -1)
    if query.shape != (tokens.batch_size, space.shape[-1]):
        raise ValueError(f"query must have shape ({tokens.batch_size}, {space.shape[-1]}) to match the tokens, "
                         f"got {tuple(query.shape)}")
    # float32 even for half-precision towers, where many similarities would otherwise tie.
    query = F.normalize(query.to(device=tokens.device, dtype=torch.float32), dim=-1)
    return (F.normalize(space.float(), dim=-1) @ rearrange(query, "b d -> b d 1"))[..., 0]


def query_space(tokens: MultiScaleTokens) -> Tensor:
    """(B, N, D_q) the tokens in the text queries' space: ``tokens.aligned``, else ``tokens.features``."""
    return tokens.features if tokens.aligned is None else tokens.aligned
