"""VisionZip: dominant tokens by [CLS] attention, plus contextual tokens merged from the rest.

With a budget of K tokens, VisionZip keeps the K - C tokens the [CLS] token attends to most (the dominant
tokens; ``tokens.attention``: feature layer, heads averaged) and makes C new contextual tokens from the tokens
it did not keep: C of those remaining tokens, evenly spaced in their canonical order, are targets; every other
remaining token joins the target it is most similar to (cosine similarity); each group becomes one token. The
published split is 54 dominant + 10 contextual at 64 tokens (108 + 20 at 128, 162 + 30 at 192), i.e. C = 10/64
of the budget, rounded.

Choices where this differs from the published code, and why:

- Similarity space: VisionZip compares the keys of the feature layer (heads averaged). The keys are not part of
  :class:`~pyrtok.tokens.MultiScaleTokens`, so the token features are the similarity space here (the same
  features the merged tokens are averaged from).
- Group feature: ``merge="mean"`` (default) is the mean of the group's features, target included, as the paper
  describes the merge. The released code adds the target's feature to the mean of the other members
  (``target + mean(others)``, a target alone keeps its feature); ``merge="released"`` does that.

The contextual tokens are :class:`~pyrtok.tokens.MergedTokens` of the selection: features (B, C, D) in the
tokens' feature space, and boxes, the union of their group's boxes. They count against the budget
(``selection.total`` = kept + merged = budget) and come after the kept tokens wherever a model consumes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor

from pyrtok.allocators.base import Allocator, Context
from pyrtok.allocators.registry import register
from pyrtok.allocators.scales import candidate_slice, candidates_first, check_scales
from pyrtok.budget import resolve_budget
from pyrtok.signals.attention import cls_attention
from pyrtok.tokens import MergedTokens, MultiScaleTokens, TokenSelection

__all__ = ["MERGE_RULES", "VisionZipTokens", "merge_groups"]

MERGE_RULES = ("mean", "released")


def merge_groups(
    features: Tensor,
    boxes: Tensor,
    rest: Tensor,
    contextual: Tensor,
    merge: str = "mean",
) -> MergedTokens:
    """VisionZip's contextual tokens: the ``rest`` tokens merged into ``contextual`` groups per sample.

    Targets are the remaining tokens of rank 0, s, 2s, ... (s = max(1, R // C), the first C of them) in the
    canonical order of the R remaining tokens; every other remaining token joins its most cosine-similar
    target (ties to the earlier target).

    Args:
        features: (B, N, D) token features.
        boxes: (N, 4) level-0 pixel boxes of the tokens.
        rest: (B, N) bool, the tokens to merge (each sample's dropped candidates).
        contextual: (B,) long, C_b groups per sample, 0 <= C_b <= R_b.
        merge: ``"mean"`` (mean of the group) or ``"released"`` (target + mean of the other members).

    Returns:
        :class:`MergedTokens` with M = max_b C_b: features (B, M, D) in ``features``' dtype, mask (B, M) and
        union boxes (B, M, 4), groups in the canonical order of their targets.
    """
    batch, n, dim = features.shape
    slots = int(contextual.max()) if contextual.numel() else 0
    remaining = rest.sum(1)
    step = torch.where(contextual > 0, remaining // contextual.clamp_min(1), torch.ones_like(remaining))
    step = step.clamp_min(1)
    rank = rest.long().cumsum(1) - 1  # rank among the remaining tokens, canonical order
    slot = rank // step.unsqueeze(1)
    is_target = rest & (rank % step.unsqueeze(1) == 0) & (slot < contextual.unsqueeze(1))
    dummy = slots  # one extra column soaks up writes of tokens outside any group
    arange = torch.arange(n, device=features.device).expand(batch, -1)
    target_index = torch.zeros(batch, slots + 1, dtype=torch.long, device=features.device)
    target_index.scatter_(1, torch.where(is_target, slot, dummy), arange)
    target_index = target_index[:, :slots]
    valid = torch.arange(slots, device=features.device).unsqueeze(0) < contextual.unsqueeze(1)  # (B, M)
    work = features.float()
    unit = F.normalize(work, dim=-1)
    targets = torch.gather(unit, 1, repeat(target_index, "b m -> b m d", d=dim))
    similarity = (unit @ rearrange(targets, "b m d -> b d m")).masked_fill(~valid.unsqueeze(1), float("-inf"))
    group = similarity.argmax(dim=2) if slots else torch.zeros(batch, n, dtype=torch.long, device=features.device)
    group = torch.where(is_target, slot, group)  # a target always leads its own group
    group = torch.where(rest & (contextual.unsqueeze(1) > 0), group, dummy)
    # One-hot membership (B, N, M + 1): group sums as one batched matmul, faster than a scatter over D.
    member = F.one_hot(group, slots + 1).to(work.dtype)
    sums = (rearrange(member, "b n m -> b m n") @ work)[:, :slots]
    sizes = member.sum(1)[:, :slots]
    if merge == "mean":
        merged = sums / sizes.clamp_min(1).unsqueeze(2)
    else:
        target = torch.gather(work, 1, repeat(target_index, "b m -> b m d", d=dim))
        merged = target + (sums - target) / (sizes - 1).clamp_min(1).unsqueeze(2)
    merged = merged * valid.unsqueeze(2)
    box = repeat(boxes.float(), "n c -> b n c", b=batch)
    index = repeat(group, "b n -> b n c", c=2)
    low = torch.full((batch, slots + 1, 2), float("inf"), device=features.device).scatter_reduce_(
        1, index, box[..., :2], reduce="amin")[:, :slots]
    high = torch.full((batch, slots + 1, 2), float("-inf"), device=features.device).scatter_reduce_(
        1, index, box[..., 2:], reduce="amax")[:, :slots]
    union = torch.cat([low, high], dim=2).masked_fill(~valid.unsqueeze(2), 0.0)
    return MergedTokens(merged.to(features.dtype), valid, union)


@register("visionzip")
class VisionZipTokens(Allocator):
    """Dominant tokens by [CLS] attention plus contextual tokens merged by similarity (VisionZip).

    Args:
        contextual: the fraction of the budget given to contextual tokens, in [0, 1) (default 10/64, the
            published 54 + 10 split at 64); C_b = round(contextual * K_b), at most K_b - 1, and 0 when the budget
            reaches the candidates (then every candidate is kept as it is).
        scales: ``"finest"`` (default, as published: dominant and merged tokens come from the finest level;
            coarser ones only fill a budget above its size) or ``"all"`` (every level's tokens are candidates).
        merge: how a group becomes one token, ``"mean"`` (default) or ``"released"`` (see the module notes).

    Example:
        >>> from pyrtok.tokens import from_feature_grid
        >>> tokens = from_feature_grid(torch.randn(1, 8, 8, 4), 1, attention=torch.rand(1, 8, 8))
        >>> selection = VisionZipTokens(contextual=0.25)(tokens, 8)
        >>> int(selection.count[0]), int(selection.merged_count[0]), int(selection.total[0])
        (6, 2, 8)
    """

    needs = ("attention",)

    def __init__(self, contextual: float = 10 / 64, scales: str = "finest", merge: str = "mean", **options) -> None:
        super().__init__(**options)
        if isinstance(contextual, bool) or not isinstance(contextual, (int, float)) or not 0 <= contextual < 1:
            raise ValueError(f"contextual must be a fraction of the budget in [0, 1), got {contextual!r}")
        if merge not in MERGE_RULES:
            raise ValueError(f"merge must be one of {MERGE_RULES}, got {merge!r}")
        self.contextual = float(contextual)
        self.scales = check_scales(scales)
        self.merge = merge

    def reads(self, ctx: Context) -> tuple[str, ...]:
        return ("attention", "features")

    def priority(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context) -> Tensor:
        attention = cls_attention(tokens)
        if self.scales == "all":
            return attention
        return candidates_first(attention, candidate_slice(tokens, self.scales))

    def contextual_counts(self, tokens: MultiScaleTokens, budgets: Tensor) -> Tensor:
        """(B,) contextual tokens C_b for (B,) total budgets K_b (see the class notes)."""
        candidates = candidate_slice(tokens, self.scales)
        n = candidates.stop - candidates.start
        share = torch.floor(budgets.double() * self.contextual + 0.5).long()
        share = torch.minimum(share, budgets - 1).clamp_min(0)
        return torch.where(budgets >= n, torch.zeros_like(share), share)

    def __call__(
        self,
        tokens: MultiScaleTokens,
        budget: int | Tensor,
        *,
        image: Tensor | None = None,
        query: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> TokenSelection:
        """Select K_b - C_b dominant tokens and merge C_b contextual ones: ``selection.total`` is K_b.

        Arguments as :meth:`Allocator.__call__`; the kept (dominant) tokens are ``index`` (B, K), the contextual
        ones ``merged`` (B, M).
        """
        if not isinstance(tokens, MultiScaleTokens):
            raise TypeError(f"tokens must be MultiScaleTokens, got {type(tokens).__name__}")
        budgets = resolve_budget(budget, *tokens.features.shape[:2], tokens.device)
        contextual = self.contextual_counts(tokens, budgets)
        dominant = super().__call__(tokens, budgets - contextual, image=image, query=query, generator=generator)
        if not bool((contextual > 0).any()):
            return dominant
        rest = ~dominant.keep_mask(tokens.num_tokens)
        candidates = candidate_slice(tokens, self.scales)
        rest[:, : candidates.start] = False
        rest[:, candidates.stop :] = False
        merged = merge_groups(tokens.features, tokens.box, rest, contextual, self.merge)
        return TokenSelection(dominant.index, dominant.mask, dominant.count, merged)
