"""VScan's vision side: a local scan of an early layer's [CLS] attention in windows, a global scan of the feature
layer's, and every dropped token merged into its most similar kept token after the projector.

As the authors run it on LLaVA-1.5 (Tencent/SelfEvolvingAgent, folder ``VScan/``,
``llava/model/llava_arch.py``: ``encode_images``, ``window_cls_selection``, ``token_merging``;
``llava/model/multimodal_encoder/clip_encoder.py``: every layer's [CLS] row, heads averaged):

- the local scan: the [CLS] attention inside the 6th of the tower's 24 layers (``tokens.early_attention``: a
  quarter of the depth), on the 24 x 24 grid split into 4 x 4 windows of 6 x 6; each window keeps its top
  k = int(T / 2) // 16 tokens (T the budget, ``local`` = 1/2 of it);
- the global scan: the feature layer's [CLS] attention (``tokens.attention``) with the local picks zeroed, top
  T - int(T / 2);
- the kept tokens, in index order, go through the projector; each dropped token joins the kept token whose
  projector output is most cosine-similar to its own (ties to the first), and each kept token becomes the mean
  of itself and the tokens that joined it (``selection.kept_embeddings``, in the language model's space:
  ``tokens.embeddings``, the features where the tokens carry none);
- the language-model stage (layer 16 of 32 keeps a third, with positions renumbered) is the ``vscan`` schedule
  (:mod:`pyrtok.vlm.schedules.vscan`); the published "64 tokens" are 96 here and 32 from layer 16 on.

The kept count is what the released code keeps: 16 k + T - int(T / 2), which is T when int(T / 2) is a multiple
of 16 (the published 96, 192, 288) and fewer otherwise; ``selection.count`` reports it.

On towers without [CLS] (Qwen-VL) the authors' own Qwen2.5-VL code (``VScan/qwen/model/qwen2_5_vl_custom.py``,
``Qwen2_5_VLForConditionalGeneration_X.forward``; ``qwen2_5_vl_utils.py``: ``window_selection``,
``token_merging``) runs, the ``capped`` scan (``scan="auto"`` picks it where the tokens' attention is the
attention they receive, ``tokens.received``):

- the scores are the attention each merged token receives in the tower's first full-attention block (local) and
  its last block (global), the ``early_attention`` and ``attention`` the Qwen family fills;
- the local scan keeps int(T / 2) tokens: all merged tokens in decreasing local score, each taken while its
  window of ``window_size`` x ``window_size`` tokens (4 x 4; the rows and columns past the last whole window
  belong to the last window) holds fewer than ceil(int(T / 2) / windows) picks;
- the global scan keeps T - int(T / 2) by the global score among the rest; merging as above. The count is the
  budget T (``int(0.167 * N)`` in the authors' Qwen script).

Porting rules where the released code has no path: grids other than 24 x 24 are split into ``windows`` x
``windows`` windows at the integer boundaries ``i * h // windows`` (6 x 6 windows at 24); k is capped by the
smallest window's size; where the tokens carry no early attention the local scan reads the feature layer's; the
local picks are excluded from the global scan outright (the released code zeroes their attention, which only
differs where an attention weight is exactly zero). Candidates are the finest level; a budget above it keeps all
of it and fills from the coarser levels by attention, without merging.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pyrtok.allocators.base import Allocator, Context
from pyrtok.allocators.registry import register
from pyrtok.budget import resolve_budget
from pyrtok.signals.attention import cls_attention
from pyrtok.tokens import MultiScaleTokens, TokenSelection

__all__ = ["SCANS", "VScanTokens", "capped_window_scan", "merge_into_kept", "merged_kept", "window_ids"]

SCANS = ("auto", "windows", "capped")


def window_ids(shape: tuple[int, int], windows: int, device: torch.device | str = "cpu") -> Tensor:
    """(h * w,) the window (row-major over ``windows`` x ``windows``) of every cell of an (h, w) grid, raster order.

    Window boundaries are ``i * h // windows`` (rows) and ``j * w // windows`` (columns).

    Example:
        >>> window_ids((4, 4), 2).view(4, 4).tolist()
        [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    """
    h, w = shape

    def bands(side: int) -> Tensor:
        starts = torch.tensor([i * side // windows for i in range(1, windows)], device=device)
        return torch.bucketize(torch.arange(side, device=device), starts, right=True)

    return (bands(h)[:, None] * windows + bands(w)[None, :]).flatten()


def capped_window_scan(scores: Tensor, shape: tuple[int, int], counts: Tensor, window: int = 4) -> Tensor:
    """VScan's Qwen local scan: (B, h * w) bool of the ``counts[b]`` tokens taken in decreasing ``scores``
    (B, h * w, raster order), each while its window holds fewer than ``ceil(counts[b] / windows)`` picks.

    Windows are ``window`` x ``window`` tokens; the ``h % window`` rows and ``w % window`` columns past the last
    whole window belong to the last one (at least one window per side). Equal scores: the earlier token first.

    Example:
        >>> scores = torch.arange(16.0).flip(0)[None]  # the top-left token scores highest
        >>> capped_window_scan(scores, (4, 4), torch.tensor([4]), window=2).view(4, 4).int().tolist()
        [[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    """
    h, w = shape
    rows_of_windows, cols_of_windows = max(h // window, 1), max(w // window, 1)
    cells = torch.arange(h * w, device=scores.device)
    row = (cells // w // window).clamp(max=rows_of_windows - 1)
    col = (cells % w // window).clamp(max=cols_of_windows - 1)
    windows = row * cols_of_windows + col  # (h * w,)
    caps = torch.ceil(counts.double() / (rows_of_windows * cols_of_windows)).long()  # (B,)
    order = scores.float().argsort(dim=1, descending=True, stable=True)  # (B, N)
    in_order = F.one_hot(windows[order], rows_of_windows * cols_of_windows)  # (B, N, W)
    rank = (in_order.cumsum(1) * in_order).sum(-1) - 1  # rank of each token within its window, in score order
    allowed = rank < caps[:, None]
    taken = allowed & (allowed.long().cumsum(1) <= counts[:, None])
    keep = torch.zeros_like(taken)
    return keep.scatter(1, order, taken)


def _merge(embeddings: Tensor, keep: Tensor, dropped: Tensor,
           similarity: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The merge of :func:`merge_into_kept`: (B, K, D) float32 merged kept tokens, (B, K) their indices in token
    order and (B, K) whether each slot holds a kept token (K = max(1, the most any row keeps))."""
    work = embeddings.float()
    batch, n, d = work.shape
    # the kept tokens of each row first, in token order (a stable sort), padded to the longest row's count
    count = max(1, int(keep.sum(1).max()))
    kept = torch.sort(keep.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :count]  # (B, K)
    valid = keep.gather(1, kept)  # (B, K): False on the padding
    at_kept = kept.unsqueeze(2).expand(-1, -1, d)  # (B, K, D) index of the kept rows
    if similarity is None:
        unit = work / work.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        to_kept = unit @ unit.gather(1, at_kept).transpose(1, 2)  # (B, N, K)
    elif similarity.shape != (batch, n, n) or similarity.dtype != torch.float32:
        raise ValueError(f"similarity must be a ({batch}, {n}, {n}) float32 tensor, got "
                         f"{tuple(similarity.shape)} {similarity.dtype}")
    else:
        to_kept = similarity.gather(2, kept.unsqueeze(1).expand(-1, n, -1))  # (B, N, K)
    slot = to_kept.masked_fill_(~valid.unsqueeze(1), float("-inf")).argmax(dim=2)  # (B, N): the first of equals
    # a row without a kept token has nowhere to merge: its dropped tokens stay as they are
    joins = (dropped & keep.any(dim=1, keepdim=True)).to(work.dtype)  # (B, N)
    members = F.one_hot(slot, count).to(work.dtype) * joins.unsqueeze(2)  # (B, N, K): who joins which kept token
    sums = work.gather(1, at_kept) + members.transpose(1, 2) @ work  # (B, K, D)
    return sums / (1 + members.sum(1)).unsqueeze(2), kept, valid


def merge_into_kept(embeddings: Tensor, keep: Tensor, dropped: Tensor, *,
                    similarity: Tensor | None = None) -> Tensor:
    """Each ``dropped`` token joins its most cosine-similar kept token; a kept token becomes the mean of itself
    and the tokens that joined it.

    Args:
        embeddings: (B, N, D) the tokens, in the space they are merged in.
        keep: (B, N) bool, the kept tokens (at least one per row that has dropped tokens).
        dropped: (B, N) bool, the tokens to merge (disjoint from ``keep``).
        similarity: optional (B, N, N) float32 cosine similarities of ``embeddings``, when the caller has them
            already (:func:`~pyrtok.allocators.divprune.cosine_similarity`); the kept tokens' columns are read
            from it instead of being computed again.

    Returns:
        (B, N, D) ``embeddings`` with every kept token replaced by its merged value (other rows unchanged).

    Similarities are taken to the kept tokens only, (B, N, K): K / N of the work of a full (B, N, N) matrix; the
    sums are a matrix product, so they come out the same on every run and device. :func:`merged_kept` gives the
    kept rows alone.
    """
    if embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
        return embeddings
    merged, kept, _ = _merge(embeddings, keep, dropped, similarity)
    out = embeddings.float().scatter(1, kept.unsqueeze(2).expand_as(merged), merged)  # padding: restored below
    return torch.where(keep.unsqueeze(2), out.to(embeddings.dtype), embeddings)


def merged_kept(embeddings: Tensor, keep: Tensor, dropped: Tensor, *, similarity: Tensor | None = None) -> Tensor:
    """The kept rows of :func:`merge_into_kept` alone: (B, K, D) in ``embeddings``' dtype, each row's kept tokens
    in token order (the order of :meth:`~pyrtok.tokens.TokenSelection.from_keep_mask`), K the most any row
    keeps, zeros past a row's count."""
    batch, n, d = embeddings.shape
    k = int(keep.sum(1).max()) if batch and n else 0
    if k == 0:
        return embeddings.new_zeros(batch, 0, d)
    merged, _, valid = _merge(embeddings, keep, dropped, similarity)
    return merged[:, :k].to(embeddings.dtype) * valid[:, :k].unsqueeze(2).to(embeddings.dtype)


@register("vscan")
class VScanTokens(Allocator):
    """VScan's vision side: local windows of early [CLS] attention, global feature-layer [CLS] attention, and
    dropped tokens merged into the kept ones after the projector.

    Args:
        local: the share of the budget the local scan spends (default 1/2, as released).
        windows: windows per side of the local scan (default 4: 16 windows, 6 x 6 at 24 x 24, as released).
        merge: merge the dropped tokens into the kept ones (default True, as released).
        scan: ``"windows"`` (the LLaVA code: each of ``windows`` x ``windows`` windows keeps its top k),
            ``"capped"`` (the Qwen code: a capped greedy scan over windows of ``window_size`` tokens, the budget
            kept exactly) or ``"auto"`` (default: ``capped`` where the tokens' attention is the attention they
            receive, ``tokens.received``, as on Qwen towers; else ``windows``).
        window_size: the side, in tokens, of the ``capped`` scan's windows (default 4, as released).

    Example:
        >>> from pyrtok.tokens import from_feature_grid
        >>> g = torch.Generator().manual_seed(0)
        >>> tokens = from_feature_grid(torch.randn(1, 8, 8, 4, generator=g), 1,
        ...                            attention=torch.rand(1, 8, 8, generator=g))
        >>> selection = VScanTokens()(tokens, 12)  # local: int(12 / 2) // 16 = 0 per window
        >>> int(selection.count[0]), selection.kept_embeddings.shape  # global: 6
        (6, torch.Size([1, 6, 4]))
        >>> int(VScanTokens(scan="capped")(tokens, 12).count[0])  # the Qwen code's scan keeps the budget
        12
    """

    needs = ("attention",)
    views = "each"  # the released LLaVA-NeXT code: every view on its own, unpadded, a newline per row

    def __init__(self, local: float = 0.5, windows: int = 4, merge: bool = True, scan: str = "auto",
                 window_size: int = 4, **options) -> None:
        super().__init__(**options)
        if self.redundancy:
            raise ValueError("vscan picks tokens by windows and merges the rest into them; the redundancy pass "
                             "does not apply (use redundancy: false)")
        if isinstance(local, bool) or not isinstance(local, (int, float)) or not 0 <= local < 1:
            raise ValueError(f"local must be the share of the budget for the local scan, in [0, 1), got {local!r}")
        if isinstance(windows, bool) or not isinstance(windows, int) or windows < 1:
            raise ValueError(f"windows must be a positive int (windows per side), got {windows!r}")
        if not isinstance(merge, bool):
            raise TypeError(f"merge must be a bool, got {merge!r}")
        if scan not in SCANS:
            raise ValueError(f"scan must be one of {SCANS}, got {scan!r}")
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"window_size must be a positive int (tokens per window side), got {window_size!r}")
        self.local, self.windows, self.merge = float(local), windows, merge
        self.scan, self.window_size = scan, window_size

    def scan_for(self, tokens: MultiScaleTokens) -> str:
        """The local scan these tokens get: ``capped`` (the Qwen code) or ``windows`` (the LLaVA code)."""
        if self.scan != "auto":
            return self.scan
        return "capped" if tokens.received else "windows"

    def reads(self, ctx: Context) -> tuple[str, ...]:
        return ("attention", "features") if self.merge else ("attention",)

    def priority(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context) -> Tensor:
        return cls_attention(tokens)  # used only above the finest level's size

    def effective_budgets(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context) -> Tensor:
        """(B,) tokens kept: with the LLaVA code's window scan 16 k_b + T_b - int(T_b / 2) below the finest
        level's size (the released count), the budget above it; with the Qwen code's capped scan the budget."""
        n0 = tokens.level_slices[0].stop - tokens.level_slices[0].start
        if self.scan_for(tokens) == "capped":
            return budgets
        per_window, global_count = self.counts(tokens, budgets)
        return torch.where(budgets >= n0, budgets, per_window * self.windows**2 + global_count)

    def counts(self, tokens: MultiScaleTokens, budgets: Tensor) -> tuple[Tensor, Tensor]:
        """(B,) local picks per window k_b and (B,) global picks for (B,) budgets below the finest level's size."""
        windows = window_ids(tokens.level_shapes[0], self.windows, tokens.device)
        smallest = int(torch.bincount(windows, minlength=self.windows**2).min())
        local = torch.floor(budgets.double() * self.local).long()
        per_window = (local // self.windows**2).clamp(max=smallest)
        return per_window, budgets - local

    def _local_scan(self, early: Tensor, tokens: MultiScaleTokens, budgets: Tensor) -> tuple[Tensor, Tensor]:
        """The local scan on the finest level's (B, n0) ``early`` scores: (B, n0) bool picks and (B,) the global
        scan's count (the capped scan: the rest of the budget; the window scan: T - int(T / 2), as released)."""
        shape = tokens.level_shapes[0]
        if self.scan_for(tokens) == "capped":
            local = torch.floor(budgets.clamp(max=early.shape[1]).double() * self.local).long()
            keep = capped_window_scan(early, shape, local, self.window_size)
            return keep, budgets - keep.sum(1)  # what the windows' caps left untaken goes to the global scan
        per_window, global_count = self.counts(tokens, budgets)
        windows = window_ids(shape, self.windows, early.device)
        keep = torch.zeros_like(early, dtype=torch.bool)
        rows = torch.arange(early.shape[0], device=early.device)
        k = int(per_window.max())
        for w in range(self.windows**2 if k else 0):
            top = early.masked_fill(windows != w, float("-inf")).topk(k, dim=1).indices  # (B, k)
            take = torch.arange(k, device=early.device)[None] < per_window[:, None]
            keep[rows[:, None].expand_as(top)[take], top[take]] = True
        return keep, global_count

    def __call__(
        self,
        tokens: MultiScaleTokens,
        budget: int | Tensor,
        *,
        image: Tensor | None = None,
        query: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> TokenSelection:
        """Select the local and global tokens (window scan: 16 k_b and T_b - int(T_b / 2); capped scan:
        int(T_b / 2) and the rest of T_b), merging the rest of the finest level into them
        (``selection.kept_embeddings``). Arguments as :meth:`Allocator.__call__`."""
        if not isinstance(tokens, MultiScaleTokens):
            raise TypeError(f"tokens must be MultiScaleTokens, got {type(tokens).__name__}")
        budgets = resolve_budget(budget, *tokens.features.shape[:2], tokens.device)
        finest = tokens.level_slices[0]
        n0 = finest.stop - finest.start
        if bool((budgets >= n0).all()):  # nothing of the finest level is dropped: the base class fills by attention
            return super().__call__(tokens, budgets, image=image, query=query, generator=generator)
        self._context(tokens, image, query, generator)  # input checks (NaN, missing attention)
        batch = tokens.batch_size
        deep = tokens.attention[:, finest].float()
        early = tokens.early_attention if tokens.early_attention is not None else tokens.attention
        early = early[:, finest].float()
        rows = torch.arange(batch, device=tokens.device)
        keep, global_count = self._local_scan(early, tokens, budgets)
        scores = deep.masked_fill(keep, float("-inf"))
        g = int(global_count.max())
        top = scores.topk(min(g, n0), dim=1).indices
        take = torch.arange(top.shape[1], device=tokens.device)[None] < global_count[:, None]
        keep[rows[:, None].expand_as(top)[take], top[take]] = True
        full = budgets >= n0
        keep[full] = True
        mask = torch.zeros(batch, tokens.num_tokens, dtype=torch.bool, device=tokens.device)
        mask[:, finest] = keep
        if bool(full.any()):  # a sample whose budget covers the finest level fills from the coarser ones
            filled = super().__call__(tokens, budgets, image=image, query=query, generator=generator)
            mask[full] = filled.keep_mask(tokens.num_tokens)[full]
        selection = TokenSelection.from_keep_mask(mask)
        if not self.merge:
            return selection
        space = tokens.embeddings if tokens.embeddings is not None else tokens.features
        dropped = torch.zeros_like(mask)
        dropped[:, finest] = ~keep
        dropped[full] = False
        kept = merged_kept(space, mask, dropped)
        return TokenSelection(selection.index, selection.mask, selection.count, kept_embeddings=kept)
