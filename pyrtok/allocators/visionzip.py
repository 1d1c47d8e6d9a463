"""VisionZip: dominant tokens by [CLS] attention, plus contextual tokens merged from the rest.

As the authors run it on LLaVA-1.5 (dvlab-research/VisionZip, ``visionzip/clip_encoder.py``,
``CLIPVisionTower_VisionZip.forward``; ``visionzip/utils.py`` for the keys; ``visionzip/main.py`` for the counts):

- the counts: ``visionzip(model, dominant, contextual)`` with dominant + contextual = the budget (54 + 10 at 64,
  108 + 20 at 128, 162 + 30 at 192), and ``dominant`` *includes the [CLS] token* (``main.py`` passes
  ``dominant - 1`` to the top-k): at 64 the language model gets [CLS] + 53 patches + 10 contextual tokens. Here
  C = round(contextual * K) with ``contextual`` = 10/64 by default, and with ``cls=True`` the [CLS] token
  (``tokens.cls``) takes one of the K - C dominant slots;
- dominant patches: the top K - C - 1 of the feature layer's [CLS] attention, heads summed (``tokens.attention``,
  heads averaged: the same order, since dividing by a power-of-two head count is exact);
- the [CLS] token and the dominant patches in index order, then the contextual tokens, all through the projector;
- contextual targets: of the R remaining patches in index order, ranks 0, s, 2s, ... (s = max(1, R // C), the
  first C); every other remaining patch joins the target whose *key* it is most cosine-similar to (the feature
  layer's keys, heads averaged: ``tokens.keys``; ``similarity="keys"``); ties go to the earlier target (argmax);
- a contextual token is its target's feature *plus* the mean of the features of the other members
  (``merge="released"``); a target alone keeps its feature.

Porting rules where upstream has no code path: towers whose tokens carry no [CLS] token (Qwen, and families that do
not expose one) give the [CLS] slot to one more dominant patch; tokens without keys are grouped by their features.
At a budget that reaches every candidate, every candidate is kept as it is (no [CLS], nothing merged).

Named departures (options): ``cls=False`` (no [CLS] token; all K - C dominant slots are patches),
``similarity="features"`` (group by the tokens' features), ``merge="mean"`` (the mean of the whole group, target
included, as the paper's text describes the merge). The three together are pyrtok's earlier VisionZip
(``configs/allocators/visionzip_mean.yaml``).

The contextual tokens are :class:`~pyrtok.tokens.MergedTokens` of the selection: features (B, C, D) in the
tokens' feature space, and boxes, the union of their group's boxes. They count against the budget, as the [CLS]
token does (``selection.total`` = [CLS] + kept + merged = budget).
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

__all__ = ["MERGE_RULES", "SIMILARITIES", "VisionZipTokens", "merge_groups"]

MERGE_RULES = ("released", "mean")
"""How a group becomes one token: target + mean of the others (as released), or the mean of the whole group."""

SIMILARITIES = ("keys", "features")
"""What contextual groups are formed by: the feature layer's keys (as released) or the tokens' features."""


def merge_groups(
    features: Tensor,
    boxes: Tensor,
    rest: Tensor,
    contextual: Tensor,
    merge: str = "released",
    similarity: Tensor | None = None,
) -> MergedTokens:
    """VisionZip's contextual tokens: the ``rest`` tokens merged into ``contextual`` groups per sample.

    Targets are the remaining tokens of rank 0, s, 2s, ... (s = max(1, R // C), the first C of them) in the
    canonical order of the R remaining tokens; every other remaining token joins its most cosine-similar
    target (ties to the earlier target).

    Args:
        features: (B, N, D) token features, what the groups merge.
        boxes: (N, 4) level-0 pixel boxes of the tokens.
        rest: (B, N) bool, the tokens to merge (each sample's dropped candidates).
        contextual: (B,) long, C_b groups per sample, 0 <= C_b <= R_b.
        merge: ``"released"`` (target + mean of the other members) or ``"mean"`` (mean of the group).
        similarity: optional (B, N, D') space the groups are formed in (default: ``features``).

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
    space = features if similarity is None else similarity
    unit = space / space.norm(dim=-1, keepdim=True)  # as released: x / |x|, in the space's own dtype
    targets = torch.gather(unit, 1, repeat(target_index, "b m -> b m d", d=space.shape[-1]))
    scores = (unit @ rearrange(targets, "b m d -> b d m")).masked_fill(~valid.unsqueeze(1), float("-inf"))
    group = scores.argmax(dim=2) if slots else torch.zeros(batch, n, dtype=torch.long, device=features.device)
    group = torch.where(rest & (contextual.unsqueeze(1) > 0), group, dummy)
    # Members other than the targets, one-hot (B, N, M + 1): group sums as one batched matmul.
    joins = torch.where(is_target, dummy, group)
    member = F.one_hot(joins, slots + 1).to(features.dtype)
    others = (rearrange(member, "b n m -> b m n") @ features)[:, :slots]
    count = member.sum(1)[:, :slots].unsqueeze(2)
    target = torch.gather(features, 1, repeat(target_index, "b m -> b m d", d=dim))
    if merge == "released":
        merged = target + others / count.clamp_min(1)
    else:
        merged = (target + others) / (count + 1)
    merged = merged * valid.unsqueeze(2).to(merged.dtype)
    group = torch.where(is_target, slot, group)  # a target leads its own group (for the union boxes)
    box = repeat(boxes.float(), "n c -> b n c", b=batch)
    index = repeat(group, "b n -> b n c", c=2)
    low = torch.full((batch, slots + 1, 2), float("inf"), device=features.device).scatter_reduce_(
        1, index, box[..., :2], reduce="amin")[:, :slots]
    high = torch.full((batch, slots + 1, 2), float("-inf"), device=features.device).scatter_reduce_(
        1, index, box[..., 2:], reduce="amax")[:, :slots]
    union = torch.cat([low, high], dim=2).masked_fill(~valid.unsqueeze(2), 0.0)
    return MergedTokens(merged, valid, union)


@register("visionzip")
class VisionZipTokens(Allocator):
    """Dominant tokens by [CLS] attention plus contextual tokens merged by similarity (VisionZip).

    Args:
        contextual: the fraction of the budget given to contextual tokens, in [0, 1) (default 10/64, the
            published 54 + 10 split at 64); C_b = round(contextual * K_b), at most K_b - 1 - [CLS], and 0 when
            the budget reaches the candidates (then every candidate is kept as it is).
        cls: the [CLS] token (``tokens.cls``) takes one dominant slot and leads the tokens the language model
            gets (default True, as released; ignored where the tokens carry no [CLS]).
        similarity: ``"keys"`` (default, as released: contextual groups by the feature layer's keys,
            ``tokens.keys``; the features where the tokens carry none) or ``"features"``.
        merge: how a group becomes one token, ``"released"`` (default) or ``"mean"`` (see the module notes).
        scales: ``"finest"`` (default, as published: dominant and merged tokens come from the finest level;
            coarser ones only fill a budget above its size) or ``"all"`` (every level's tokens are candidates).

    Example:
        >>> from pyrtok.tokens import from_feature_grid
        >>> tokens = from_feature_grid(torch.randn(1, 8, 8, 4), 1, attention=torch.rand(1, 8, 8),
        ...                            cls=torch.randn(1, 4))
        >>> selection = VisionZipTokens(contextual=0.25)(tokens, 8)
        >>> int(selection.cls_count[0]), int(selection.count[0]), int(selection.merged_count[0])
        (1, 5, 2)
    """

    needs = ("attention",)
    views = "stacked"  # the released LLaVA-NeXT code: every view on its own, tiles' patches, [CLS]s, merged

    def __init__(self, contextual: float = 10 / 64, cls: bool = True, similarity: str = "keys",
                 merge: str = "released", scales: str = "finest", **options) -> None:
        super().__init__(**options)
        if isinstance(contextual, bool) or not isinstance(contextual, (int, float)) or not 0 <= contextual < 1:
            raise ValueError(f"contextual must be a fraction of the budget in [0, 1), got {contextual!r}")
        if not isinstance(cls, bool):
            raise TypeError(f"cls must be a bool (whether the [CLS] token goes to the language model), got {cls!r}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if merge not in MERGE_RULES:
            raise ValueError(f"merge must be one of {MERGE_RULES}, got {merge!r}")
        self.contextual = float(contextual)
        self.cls = cls
        self.similarity = similarity
        self.merge = merge
        self.scales = check_scales(scales)

    def reads(self, ctx: Context) -> tuple[str, ...]:
        return ("attention", "features")

    def priority(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context) -> Tensor:
        attention = cls_attention(tokens)
        if self.scales == "all":
            return attention
        return candidates_first(attention, candidate_slice(tokens, self.scales))

    def counts(self, tokens: MultiScaleTokens, budgets: Tensor) -> tuple[Tensor, Tensor]:
        """(B,) [CLS] tokens (0 or 1) and (B,) contextual tokens C_b for (B,) total budgets K_b (see the class
        notes); the dominant patches are K_b minus both."""
        candidates = candidate_slice(tokens, self.scales)
        n = candidates.stop - candidates.start
        below = budgets < n
        lead = below & (budgets >= 2) & (self.cls and tokens.cls is not None)
        share = torch.floor(budgets.double() * self.contextual + 0.5).long()
        share = torch.minimum(share, budgets - 1 - lead.long()).clamp_min(0)
        return lead, torch.where(below, share, torch.zeros_like(share))

    def __call__(
        self,
        tokens: MultiScaleTokens,
        budget: int | Tensor,
        *,
        image: Tensor | None = None,
        query: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> TokenSelection:
        """Select the [CLS] token and K_b - C_b - 1 dominant patches, and merge C_b contextual tokens:
        ``selection.total`` is K_b.

        Arguments as :meth:`Allocator.__call__`; the kept (dominant) tokens are ``index`` (B, K), the contextual
        ones ``merged`` (B, M), the [CLS] token ``cls`` (B,).
        """
        if not isinstance(tokens, MultiScaleTokens):
            raise TypeError(f"tokens must be MultiScaleTokens, got {type(tokens).__name__}")
        budgets = resolve_budget(budget, *tokens.features.shape[:2], tokens.device)
        lead, contextual = self.counts(tokens, budgets)
        dominant = super().__call__(tokens, budgets - contextual - lead.long(), image=image, query=query,
                                    generator=generator)
        merged = None
        if bool((contextual > 0).any()):
            rest = ~dominant.keep_mask(tokens.num_tokens)
            candidates = candidate_slice(tokens, self.scales)
            rest[:, : candidates.start] = False
            rest[:, candidates.stop :] = False
            keys = tokens.keys if self.similarity == "keys" else None
            merged = merge_groups(tokens.features, tokens.box, rest, contextual, self.merge, keys)
        return TokenSelection(dominant.index, dominant.mask, dominant.count, merged,
                              lead if bool(lead.any()) else None)
