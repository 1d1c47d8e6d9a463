"""DivPrune: keep a maximally diverse subset of the tokens (greedy max-min cosine distance).

DivPrune treats pruning as a max-min diversity problem on the cosine distance 1 - cos(e_i, e_j) of the tokens.
Its greedy solution picks first the token farthest from its nearest neighbour, then repeatedly the token whose
distance to the kept set (its distance to the nearest kept token) is largest. The first K picks do not depend
on K, so the pick order is a priority: one greedy pass up to the largest budget of the batch serves every
sample's budget, and the pass is vectorised over the batch (a loop over the K steps only, never over tokens or
samples).

As the authors run it (vbdi/divprune at 799e2d9, ``LLaVA/llava/model/llava_arch.py``:
``pairwise_cosine_similarity`` and ``DivPrune`` at lines 147-171, called at lines 365-379 on the first forward):

- the space: the language model's input embeddings of the image tokens (the projector outputs, sliced from
  ``new_input_embeds`` at line 374), in the model's dtype (float16 in their runs); here ``tokens.embeddings``,
  which the model families fill, in its own dtype (``space="embeddings"``, the default);
- the distance: ``1 - cos``, with each row divided by its norm and one matrix product;
- the first pick: the argmax over tokens of the second-smallest entry of the token's column of the distance
  matrix (the smallest is its distance to itself), i.e. its distance to its nearest neighbour;
- each next pick: the argmax of the minimum over the picked rows; ties go to the lower index (``argmax``);
- the kept indices are sorted (line 379: the image tokens keep their order in the prompt);
- the count: ``int(round(ratio * N))`` of a ratio (line 153). Here the allocator keeps exactly the count it is
  given (min(budget, N)); a fraction in an ablation is turned into a count by :mod:`pyrtok.budget`, which rounds
  up (0.098 of 576 tokens: 57, where upstream keeps 56), so for upstream's count of a ratio pass
  ``int(round(ratio * N))`` as the budget.

Departures: (1) in a degenerate case only, upstream leaves picked tokens in the argmax at their distance to
themselves (about 0, float rounding), so when every token left lies within that rounding of a kept one (exact
duplicates) it can pick a kept token again and keep fewer distinct tokens; here a picked token is never picked
again (the allocator contract: distinct indices). (2) For LLaVA-1.6 upstream's candidates are the whole packed
image sequence (lines 369-374: the base view, the unpadded tile grid and its ``image_newline`` tokens); here the
candidates are ``scales``' tokens (by default the level-0 tile grid; ``scales="all"`` adds the base view), and
newlines follow the kept rows by the family's rule. LLaVA-1.5 (one grid, ``levels=1``) has neither difference.

``space="tower"`` (a named variant, pyrtok's earlier behaviour): the same greedy rule on ``tokens.features`` in
float32, which for LLaVA-1.5 are the vision tower's outputs before the projector (for Qwen and LLaVA-NeXT the
features already are the language model's inputs, so there the two differ only in the dtype of the distances).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pyrtok.allocators.base import Allocator, Context
from pyrtok.allocators.registry import register
from pyrtok.allocators.scales import candidate_slice, candidates_first, check_scales
from pyrtok.tokens import MultiScaleTokens

__all__ = ["SPACES", "DivPruneTokens", "cosine_similarity", "embedding_space", "max_min_order"]

SPACES = ("embeddings", "tower")
"""Where DivPrune compares tokens: the language model's input embeddings (as published) or ``tokens.features``."""


def cosine_similarity(features: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """(B, n, n) cosine similarity of every pair of tokens of ``features`` (B, n, D), in ``dtype`` (default: the
    features' own): each row divided by its norm (``x / |x|`` as DivPrune divides; a zero row stays zero), then
    one matrix product."""
    unit = F.normalize(features.to(dtype or features.dtype), dim=-1)
    return unit @ unit.transpose(1, 2)


def max_min_order(features: Tensor, steps: int, dtype: torch.dtype | None = None,
                  weight: Tensor | None = None, *, similarity: Tensor | None = None) -> Tensor:
    """The first ``steps`` picks of greedy max-min diversity on cosine distance, per sample.

    Pick 1 is the token farthest from its nearest neighbour; pick t + 1 is the token, not yet picked, farthest
    from the picked set (the largest distance to its nearest picked token). Ties go to the lower index. With
    ``weight``, every distance is multiplied by the candidate's weight before the argmax (all ones: the same
    picks).

    Args:
        features: (B, n, D) token features (finite).
        steps: picks to make, 1 <= steps <= n.
        dtype: the dtype the distances are computed in; default: that of ``features`` (DivPrune's authors
            compute them in the model's dtype).
        weight: optional (B, n) positive weights of the candidates.
        similarity: optional ``cosine_similarity(features, dtype)``, when the caller has it already (it is not
            modified).

    Returns:
        (B, steps) long indices into n, in pick order, distinct in each row.

    Example:
        >>> f = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.1]]])
        >>> max_min_order(f, 3).tolist()
        [[3, 0, 2]]
    """
    if not isinstance(features, Tensor) or features.dim() != 3:
        raise ValueError(f"features must be a (B, n, D) tensor, got {getattr(features, 'shape', features)}")
    batch, n, _ = features.shape
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= n:
        raise ValueError(f"steps must be an int in [1, {n}], got {steps!r}")
    if weight is not None and (weight.shape != features.shape[:2] or not bool((weight > 0).all())):
        raise ValueError(f"weight must be a ({batch}, {n}) tensor of positive weights, got "
                         f"{tuple(weight.shape)}")
    if similarity is None:
        similarity = cosine_similarity(features, dtype)
    elif similarity.shape != (batch, n, n):
        raise ValueError(f"similarity must be ({batch}, {n}, {n}), got {tuple(similarity.shape)}")
    distance = 1.0 - similarity  # (B, n, n); row = a (picked) token, column = a candidate
    if weight is not None:
        # each candidate's column times its weight, once: a positive factor commutes with the minima and the
        # top-k below, so every step's weighted argmax is the same as weighting that step's distances
        column = weight.unsqueeze(1)
        same = torch.promote_types(distance.dtype, weight.dtype) == distance.dtype
        distance = distance.mul_(column) if same else distance * column  # promoted as the weighted products were
    if n == 1:  # a lone token has no neighbour: it is the pick
        pick = torch.zeros(batch, dtype=torch.long, device=features.device)
    else:
        # Each column's second-smallest entry: the smallest is the token's distance to itself.
        pick = distance.topk(2, dim=1, largest=False).values[:, 1].argmax(dim=1)
    # A token's distance to itself becomes -inf, so that a picked token sits at -inf in the distances to the set
    # (a minimum keeps it there): duplicates (distance 0 to the set) and zero features are never picked twice.
    distance.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    return _greedy(distance, pick, steps)


def _greedy(distance: Tensor, first: Tensor, steps: int) -> Tensor:
    """(B, steps) picks of the max-min loop on a (B, n, n) ``distance`` whose diagonal is -inf, from the (B,)
    ``first`` picks. On a CPU in float32 / float64 the loop runs in NumPy on the same memory: a step is then
    a few microseconds instead of three torch dispatches, with the same picks (both argmaxes take the first of
    equal maxima)."""
    batch = distance.shape[0]
    if distance.device.type == "cpu" and distance.dtype in (torch.float32, torch.float64):
        rows = distance.detach().numpy()
        picks = np.empty((batch, steps), dtype=np.int64)
        picks[:, 0] = first.numpy()
        for b in range(batch):
            to_set = rows[b, picks[b, 0]].copy()  # (n,) distance of every token to its nearest picked token
            for step in range(1, steps):
                pick = picks[b, step] = to_set.argmax()
                np.minimum(to_set, rows[b, pick], out=to_set)
        return torch.from_numpy(picks)
    rows = torch.arange(batch, device=distance.device)
    picks = [first]
    to_set = distance[rows, first]
    for _ in range(steps - 1):
        pick = to_set.argmax(dim=1)
        picks.append(pick)
        to_set = torch.minimum(to_set, distance[rows, pick])
    return torch.stack(picks, dim=1)


def embedding_space(tokens: MultiScaleTokens, allocator: str) -> Tensor:
    """(B, N, D') the language model's input embeddings of the tokens (``tokens.embeddings``, checked finite: the
    base class checks only the inputs it knows), or the features where the tokens carry none."""
    embeddings = tokens.embeddings
    if embeddings is None:
        return tokens.features
    if not bool(torch.isfinite(embeddings.sum(dtype=torch.float32))):
        bad = ~torch.isfinite(embeddings).flatten(1).all(1)
        if bool(bad.any()):
            raise ValueError(f"allocator {allocator!r}: tokens.embeddings contains NaN or infinite values "
                             f"(sample(s) {torch.nonzero(bad).flatten().tolist()})")
    return embeddings


@register("divprune")
class DivPruneTokens(Allocator):
    """Greedy max-min diversity on the cosine distance of the tokens (DivPrune).

    Args:
        scales: ``"finest"`` (default, as published: diversity among the finest level's tokens; coarser ones
            only fill a budget above the finest level's size, coarsest first) or ``"all"`` (every level's tokens
            are candidates, compared in the one space they share).
        space: ``"embeddings"`` (default, as published: ``tokens.embeddings``, the language model's input
            embeddings, in their own dtype; ``tokens.features`` when the tokens carry none) or ``"tower"``
            (``tokens.features`` in float32: the vision tower's space for LLaVA-1.5).

    The allocator keeps exactly the count it is given (see the module notes on upstream's rounding of a ratio).

    Example:
        >>> from pyrtok.tokens import from_feature_grid
        >>> tokens = from_feature_grid(torch.randn(2, 4, 4, 8), 2)
        >>> DivPruneTokens()(tokens, torch.tensor([3, 5])).count.tolist()
        [3, 5]
    """

    views = "sequence"  # the released LLaVA-1.6 code: one choice over the model's image sequence, newlines included

    def __init__(self, scales: str = "finest", space: str = "embeddings", **options) -> None:
        super().__init__(**options)
        self.scales = check_scales(scales)
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES} (the language model's input embeddings, as published, "
                             f"or the tokens' features), got {space!r}")
        self.space = space

    def reads(self, ctx: Context) -> tuple[str, ...]:
        return ("features",)

    def _space(self, tokens: MultiScaleTokens) -> tuple[Tensor, torch.dtype]:
        """The (B, N, D') tensor the distances compare, and the dtype they are computed in."""
        if self.space == "tower" or tokens.embeddings is None:
            features = tokens.features
            return features, torch.float32 if self.space == "tower" else features.dtype
        embeddings = embedding_space(tokens, self.name)
        return embeddings, embeddings.dtype


    def priority(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context) -> Tensor:
        candidates = candidate_slice(tokens, self.scales)
        space, dtype = self._space(tokens)
        features = space[:, candidates]
        n = features.shape[1]
        steps = min(n, int(budgets.max()))
        order = max_min_order(features, steps, dtype)  # (B, steps)
        # Picked tokens score by pick order; the rest of the candidates come after them.
        score = torch.full(features.shape[:2], -float(steps), device=tokens.device)
        score.scatter_(1, order, -torch.arange(steps, device=tokens.device, dtype=torch.float32).expand_as(order))
        full = torch.zeros(tokens.features.shape[:2], device=tokens.device)
        full[:, candidates] = score
        return candidates_first(full, candidates)
