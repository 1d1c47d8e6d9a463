"""CDPruner: the tokens a conditional determinantal point process picks, greedily, for the question.

As the authors run it on LLaVA-1.5 (Theia-4869/CDPruner, ``llava/model/llava_arch.py``: ``encode_images``;
``llava/model/multimodal_encoder/clip_encoder.py``: ``forward`` with ``texts``):

- similarity: the cosine similarity of the projector outputs (``tokens.embeddings``), in float32;
- relevance: the CLIP image embeddings of the patches (the feature layer's patches through the tower's
  ``post_layernorm`` and CLIP's ``visual_projection``: ``tokens.aligned``) against the CLIP text embedding of the
  question with the short-answer suffix removed (each 77-token segment embedded, unit norm; the mean of the
  per-segment cosines is the cosine with their mean, which is the ``query`` here: see
  :meth:`pyrtok.encoders.text.ClipQueryEncoder.encode`); negated, then min-max normalised over the image
  (``(r - min + 1e-6) / (max - min)``; over all its views where LLaVA-NeXT runs it view by view, as released);
- the kernel ``r_i S_ij r_j`` and the fast greedy MAP inference of the DPP: each step picks the token with the
  largest remaining marginal gain (``argmax``, ties to the lower index) and updates the Cholesky rows; exactly the
  budget; the kept tokens in index order.

Porting rules: where the tokens carry no ``aligned`` space the relevance compares the query with the features
(outside a VLM), and where they carry no ``embeddings`` the similarity uses the features. Without a CLIP text
tower (the embedded models, Qwen, InternVL) the VLM's language query encoder (:mod:`pyrtok.vlm.query`) is the
relevance space: the question's input embeddings against the projector outputs. Where the kernel's rank runs out
(more picks than the embedding width, which the released settings never reach) the released code divides by the
square root of a non-positive gain; here that gain is floored at 1e-12, so the remaining picks follow the kernel's
diagonal instead of NaN.

Named variant: ``relevance="plain"`` (not negated): the relevance as the paper's text describes it.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import Tensor

from pyrtok.allocators.base import Allocator, Context
from pyrtok.allocators.registry import register
from pyrtok.allocators.scales import candidate_slice, candidates_first, check_scales
from pyrtok.signals.query import query_space
from pyrtok.tokens import MultiScaleTokens

__all__ = ["RELEVANCE", "CDPrunerTokens", "conditional_kernel", "dpp_greedy_order"]

RELEVANCE = ("negated", "plain")
"""How the query's cosine becomes relevance before min-max scaling: negated (as released) or as it is."""


def conditional_kernel(similarity_space: Tensor, relevance_space: Tensor, query: Tensor,
                       relevance: str = "negated", views: int = 1) -> Tensor:
    """CDPruner's (B, n, n) kernel ``r_i S_ij r_j`` in float32.

    Args:
        similarity_space: (B, n, D) tokens whose cosine similarity is S.
        relevance_space: (B, n, D_q) tokens compared with the query.
        query: (B, D_q) the question's text embedding (not normalised again: see the module notes).
        relevance: ``"negated"`` (as released) or ``"plain"``.
        views: rows in runs of ``views`` views of one image share the min-max scaling (the released LLaVA-NeXT
            code scales over all the views it encodes together, an image's base view and tiles).
    """
    unit = similarity_space / similarity_space.norm(dim=-1, keepdim=True)
    unit = unit.float()
    similarity = unit @ unit.transpose(1, 2)
    image = relevance_space / relevance_space.norm(dim=-1, keepdim=True)
    cosine = (image.float() @ rearrange(query.float(), "b d -> b d 1"))[..., 0]  # (B, n)
    score = -cosine if relevance == "negated" else cosine
    runs = rearrange(score, "(g v) n -> g (v n)", v=views)
    low = repeat(runs.amin(dim=1), "g -> (g v) 1", v=views)
    high = repeat(runs.amax(dim=1), "g -> (g v) 1", v=views)
    score = (score - low + 1e-6) / (high - low)
    return score.unsqueeze(2) * similarity * score.unsqueeze(1)


def dpp_greedy_order(kernel: Tensor, steps: int) -> Tensor:
    """The first ``steps`` picks of the fast greedy MAP inference of a DPP with (B, n, n) ``kernel``.

    Each step picks the token of largest remaining gain ``d_j^2`` and updates ``c_i`` and ``d_i^2`` as Chen et al.
    (2018) do (``e = (L[j] - c[:, j] . c) / d_j``; ``d^2 -= e^2``); ties go to the lower index.

    Returns:
        (B, steps) long indices, distinct in each row, in pick order.
    """
    batch, n, _ = kernel.shape
    rows = torch.arange(batch, device=kernel.device)
    cis = torch.zeros(steps, batch, n, device=kernel.device, dtype=kernel.dtype)
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    picks = torch.empty(steps, batch, dtype=torch.long, device=kernel.device)
    for i in range(steps):
        j = torch.argmax(gains, dim=-1)
        picks[i] = j
        projected = torch.einsum("tb,tbn->bn", cis[:i, rows, j], cis[:i])
        e = (kernel[rows, j] - projected) / torch.sqrt(gains[rows, j].clamp_min(1e-12)).unsqueeze(-1)
        cis[i] = e
        gains = gains - e.square()
        gains[rows, j] = -float("inf")
    return picks.t()


@register("cdpruner")
class CDPrunerTokens(Allocator):
    """The greedy MAP of a DPP whose kernel weighs token similarity by relevance to the question (CDPruner).

    Args:
        relevance: ``"negated"`` (default, as released) or ``"plain"`` (see the module notes).
        scales: ``"finest"`` (default, as published: the finest level's tokens; coarser ones only fill a budget
            above its size) or ``"all"`` (every level's tokens are candidates).

    Example:
        >>> from pyrtok.tokens import from_feature_grid
        >>> tokens = from_feature_grid(torch.randn(2, 4, 4, 8), 1)
        >>> CDPrunerTokens()(tokens, torch.tensor([3, 5]), query=torch.randn(2, 8)).count.tolist()
        [3, 5]
    """

    needs = ("query",)

    views = "stacked"  # the released LLaVA-NeXT code: every view its own DPP, tiles joined without unpadding

    def __init__(self, relevance: str = "negated", scales: str = "finest", **options) -> None:
        super().__init__(**options)
        if relevance not in RELEVANCE:
            raise ValueError(f"relevance must be one of {RELEVANCE}, got {relevance!r}")
        self.relevance = relevance
        self.scales = check_scales(scales)

    def reads(self, ctx: Context) -> tuple[str, ...]:
        return ("query", "features")

    def priority(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context) -> Tensor:
        candidates = candidate_slice(tokens, self.scales)
        similarity = tokens.embeddings if tokens.embeddings is not None else tokens.features
        query = ctx.query if ctx.query.dim() == 2 else ctx.query.expand(tokens.batch_size, -1)
        space = query_space(tokens)
        if query.shape != (tokens.batch_size, space.shape[-1]):
            raise ValueError(f"query must have shape ({tokens.batch_size}, {space.shape[-1]}) to match the tokens' "
                             f"query space, got {tuple(query.shape)}")
        kernel = conditional_kernel(similarity[:, candidates], space[:, candidates], query, self.relevance,
                                    tokens.views)
        n = kernel.shape[1]
        steps = min(n, int(budgets.max()))
        order = dpp_greedy_order(kernel, steps)
        score = torch.full((tokens.batch_size, n), -float(steps), device=tokens.device)
        score.scatter_(1, order, -torch.arange(steps, device=tokens.device, dtype=torch.float32).expand_as(order))
        full = torch.zeros(tokens.features.shape[:2], device=tokens.device)
        full[:, candidates] = score
        return candidates_first(full, candidates)
