"""[CLS] attention as a token score (FasterVLM-style)."""

from __future__ import annotations

from torch import Tensor

from pyrtok.tokens import MultiScaleTokens


def cls_attention(tokens: MultiScaleTokens) -> Tensor:
    """(B, N) attention of the [CLS] token to each token, as the encoder captured it.

    Raises:
        ValueError: when the tokens carry no attention (the encoder did not expose it).
    """
    if tokens.attention is None:
        raise ValueError(
            "tokens.attention is None: this signal needs [CLS] attention captured by the encoder "
            "(pass attention= to from_feature_grid, or encode with attention capture enabled)"
        )
    return tokens.attention
