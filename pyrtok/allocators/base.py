"""Common machinery of the allocators: budgets, vectorised top-k, level quotas, the registry.

An allocator turns :class:`~pyrtok.tokens.MultiScaleTokens` and a budget into a
:class:`~pyrtok.tokens.TokenSelection`. Every policy is a small subclass of :class:`Allocator` that
computes a (B, N) priority and, optionally, per-level quotas; the base class does the selection,
the cross-scale redundancy pass, and enforces the contract: each sample gets exactly
min(budget_b, N) distinct tokens (``difficulty`` may lower budget_b, see :meth:`Allocator.budgets`),
in canonical order, deterministically for a fixed seed, without a Python loop over tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from pyrtok.allocators.budget import resolve_budget
from pyrtok.allocators.registry import available, create, from_config, register
from pyrtok.tokens import MultiScaleTokens, TokenSelection

__all__ = [
    "Allocator",
    "Context",
    "available",
    "create",
    "exact_count",
    "from_config",
    "per_level_topk",
    "register",
    "resolve_budget",
    "spread_priority",
    "topk_mask",
    "water_fill",
]

def _ranks(order: Tensor) -> Tensor:
    """Inverse permutation of each row: rank of every element in ``order``."""
    ranks = torch.empty_like(order)
    return ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))


def topk_mask(priority: Tensor, k: Tensor) -> Tensor:
    """(B, N) mask of the k_b highest priorities per row; ties go to the lower index.

    Args:
        priority: (B, N) float.
        k: (B,) long, 0 <= k_b <= N.
    """
    order = torch.argsort(priority, dim=1, descending=True, stable=True)
    return _ranks(order) < k.unsqueeze(1)


def exact_count(keep: Tensor, priority: Tensor, k: Tensor, demote: Tensor | None = None) -> Tensor:
    """Adjust a (B, N) keep mask to exactly k_b tokens.

    Tokens are ranked kept first, then the others by priority; ``demote`` (B, N) moves non-kept tokens
    behind every non-demoted one (a lexicographic order, so no arithmetic on priorities).
    """
    order = torch.argsort(priority, dim=1, descending=True, stable=True)
    rank_class = (~keep).to(torch.uint8)
    if demote is not None:
        rank_class = rank_class + (demote & ~keep).to(torch.uint8)
    by_class = torch.argsort(torch.gather(rank_class, 1, order), dim=1, stable=True)
    return _ranks(torch.gather(order, 1, by_class)) < k.unsqueeze(1)


def per_level_topk(tokens: MultiScaleTokens, priority: Tensor, quotas: Tensor) -> Tensor:
    """(B, N) mask keeping the ``quotas[:, l]`` highest-priority tokens of each level l (loop over levels only)."""
    keep = torch.zeros_like(priority, dtype=torch.bool)
    for lvl, level_slice in enumerate(tokens.level_slices):
        keep[:, level_slice] = topk_mask(priority[:, level_slice], quotas[:, lvl])
    return keep


def water_fill(weights: Tensor, capacity: Tensor, total: Tensor) -> Tensor:
    """Integer quotas proportional to ``weights`` without exceeding ``capacity``, summing to ``total``.

    Finds lambda with sum_l min(capacity_l, lambda * weight_l) = total (levels that would overflow are
    filled and the rest is shared again), then rounds by largest remainder.

    Args:
        weights: (B, L) non-negative.
        capacity: (B, L) or (L,) non-negative integers.
        total: (B,) integers with total_b <= sum_l capacity_bl.

    Returns:
        (B, L) long quotas.

    Example:
        >>> water_fill(torch.tensor([[1.0, 1.0, 2.0]]), torch.tensor([4, 100, 100]), torch.tensor([20]))
        tensor([[ 4,  5, 11]])
    """
    capacity = capacity.expand_as(weights).to(weights.dtype)
    # A small share proportional to capacity lets zero-weight levels absorb what others cannot take.
    weights = weights.clamp_min(0) + 1e-9 * capacity / capacity.sum(1, keepdim=True).clamp_min(1)
    weights = weights * (capacity > 0)
    quota = torch.zeros_like(weights)
    active = capacity > 0
    remaining = total.to(weights.dtype)
    for _ in range(weights.shape[1]):
        share = weights * active
        scale = remaining / share.sum(1).clamp_min(1e-30)
        proposal = share * scale.unsqueeze(1)
        overflow = active & (proposal >= capacity)
        quota = torch.where(overflow, capacity, torch.where(active, proposal, quota))
        if not bool(overflow.any()):
            break
        active = active & ~overflow
        remaining = total.to(weights.dtype) - (quota * ~active).sum(1)
    floor = quota.floor().clamp(max=capacity)
    deficit = (total - floor.sum(1).long()).clamp_min(0)
    fraction = torch.where(floor < capacity, quota - floor, torch.full_like(quota, -1.0))
    bonus = topk_mask(fraction, deficit) & (floor < capacity)
    return (floor + bonus).long()


def spread_priority(level_shapes: tuple[tuple[int, int], ...], device: torch.device) -> Tensor:
    """(N,) priority in [0, 1) that orders each level's tokens as ever finer uniform subgrids.

    Tokens on the stride-2^k subgrid come before those only on the stride-2^(k-1) one, so the top-r tokens
    of a level are spread evenly over it for every r (the "uniform downsampling" order). Ties are broken
    by the bit-reversed raster index, which interleaves rows and columns.
    """
    parts = []
    for h, w in reversed(level_shapes):
        r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        r, c = r.reshape(-1), c.reshape(-1)
        both = r | c
        # Trailing zeros of r|c (the largest power-of-two stride the cell lies on); 0|0 gets the most.
        stride_class = torch.where(both == 0, torch.full_like(both, 31), (both & -both).float().log2().long())
        raster = r * w + c
        bits = max(1, int(h * w - 1).bit_length())
        reversed_bits = torch.zeros_like(raster)
        for b in range(bits):
            reversed_bits |= ((raster >> b) & 1) << (bits - 1 - b)
        tie = 1.0 - reversed_bits.float() / (1 << bits)
        parts.append((stride_class.float() + tie) / 33.0)
    return torch.cat(parts).to(device)


def band_maps(tokens: MultiScaleTokens, ctx: Context) -> list[Tensor]:
    """Laplacian band energy maps of ``ctx.image``, computed once per call and shared by every signal."""
    from pyrtok.signals.laplacian import band_energy_maps

    return ctx.cached("band_maps", lambda: band_energy_maps(ctx.image.float(), max(4, tokens.num_levels)))


def band_energy(tokens: MultiScaleTokens, ctx: Context) -> Tensor:
    """(B, N) Laplacian band energy of every token, shared within one allocator call."""
    from pyrtok.signals.laplacian import laplacian_energy

    return ctx.cached("laplacian_energy", lambda: laplacian_energy(tokens, ctx.image, band_maps(tokens, ctx)))


@dataclass
class Context:
    """What a policy may look at besides the tokens, and a per-call memo of computed signals."""

    image: Tensor | None
    query: Tensor | None
    generator: torch.Generator | None
    memo: dict[str, Tensor] = field(default_factory=dict)

    def cached(self, key: str, compute: Callable[[], Tensor]) -> Tensor:
        """``compute()`` once per allocator call, so hooks can share a signal without recomputing it."""
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]


class Allocator:
    """Base class: ``allocator(tokens, budget, *, image=None, query=None, generator=None)``.

    Subclasses set ``needs`` (any of "image", "query", "attention") and implement :meth:`priority`
    (B, N); per-level policies also implement :meth:`quotas` (B, L). Every allocator accepts:

    Args:
        redundancy: run the cross-scale redundancy pass: a kept fine token whose parent is kept and
            whose own band energy is below the ``redundancy_quantile`` of its level is given back, and the
            budget is refilled with the best tokens that are not redundant in that sense.
        redundancy_quantile: per-sample, per-level energy quantile under which a token counts as "low".
    """

    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, redundancy: bool = False, redundancy_quantile: float = 0.5) -> None:
        if not isinstance(redundancy, bool):
            raise TypeError(f"redundancy must be a bool, got {redundancy!r}")
        if not 0.0 <= float(redundancy_quantile) <= 1.0:
            raise ValueError(f"redundancy_quantile must be in [0, 1], got {redundancy_quantile!r}")
        self.redundancy = redundancy
        self.redundancy_quantile = float(redundancy_quantile)

    # -- policy hooks -------------------------------------------------------------------------------
    def priority(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context) -> Tensor:
        raise NotImplementedError

    def quotas(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context, priority: Tensor) -> Tensor | None:
        """(B, L) tokens per level, or None for one global top-k over the priority."""
        return None

    def effective_budgets(self, tokens: MultiScaleTokens, budgets: Tensor, ctx: Context) -> Tensor:
        """(B,) tokens each sample actually gets; min(budget, N) unless the policy adapts it."""
        return budgets

    # -- public API ---------------------------------------------------------------------------------
    def budgets(
        self,
        tokens: MultiScaleTokens,
        budget: int | Tensor,
        *,
        image: Tensor | None = None,
        query: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """(B,) number of tokens :meth:`__call__` will keep per sample for these inputs."""
        ctx = self._context(tokens, image, query, generator)
        return self.effective_budgets(tokens, resolve_budget(budget, *tokens.features.shape[:2], tokens.device), ctx)

    def __call__(
        self,
        tokens: MultiScaleTokens,
        budget: int | Tensor,
        *,
        image: Tensor | None = None,
        query: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> TokenSelection:
        """Select tokens.

        Args:
            tokens: features (B, N, D) with their layout.
            budget: an int, or a (B,) integer tensor of per-sample budgets (each >= 1).
            image: (B, C, H, W) images in [0, 1], for image-based signals.
            query: (B, D) or (D,) text embedding, for query-based policies.
            generator: random source, for stochastic policies.

        Returns:
            :class:`TokenSelection` with exactly ``self.budgets(...)[b]`` tokens in sample b.
        """
        ctx = self._context(tokens, image, query, generator)
        budgets = self.effective_budgets(tokens, resolve_budget(budget, *tokens.features.shape[:2], tokens.device), ctx)
        priority = self.priority(tokens, budgets, ctx).float()
        if priority.shape != tokens.features.shape[:2]:
            raise RuntimeError(f"{type(self).__name__}.priority returned shape {tuple(priority.shape)}")
        if bool(torch.isnan(priority).any()):
            raise ValueError(f"allocator {self.name!r}: token scores contain NaN (check the features / signals)")
        quotas = self.quotas(tokens, budgets, ctx, priority)
        keep = topk_mask(priority, budgets) if quotas is None else per_level_topk(tokens, priority, quotas)
        demote = None
        if self.redundancy:
            demote = self._redundant(tokens, keep, ctx)
            keep = keep & ~demote
            if quotas is not None:  # refill each level to its own quota, so per-level policies keep their split
                for lvl, level_slice in enumerate(tokens.level_slices):
                    keep[:, level_slice] = exact_count(keep[:, level_slice], priority[:, level_slice],
                                                       quotas[:, lvl], demote[:, level_slice])
        return TokenSelection.from_keep_mask(exact_count(keep, priority, budgets, demote))

    def config(self) -> dict[str, Any]:
        """The options this allocator was built with, ready for YAML."""
        options = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return {"name": self.name, **options}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({options})"

    # -- internals ----------------------------------------------------------------------------------
    def _context(
        self, tokens: object, image: Tensor | None, query: Tensor | None, generator: torch.Generator | None
    ) -> Context:
        if not isinstance(tokens, MultiScaleTokens):
            raise TypeError(f"tokens must be MultiScaleTokens, got {type(tokens).__name__}")
        if "image" in self.needs and image is None:
            raise ValueError(f"allocator {self.name!r} needs image= (B, C, H, W) in [0, 1]")
        if "query" in self.needs and query is None:
            raise ValueError(f"allocator {self.name!r} needs query= (B, D) text embeddings")
        if "attention" in self.needs and tokens.attention is None:
            raise ValueError(f"allocator {self.name!r} needs tokens.attention ([CLS] attention from the encoder)")
        if self.redundancy and image is None:
            raise ValueError(f"allocator {self.name!r} with redundancy=True needs image= for band energies")
        if image is not None:
            if not isinstance(image, Tensor):
                raise TypeError(f"image must be a (B, C, H, W) tensor in [0, 1], got {type(image).__name__}")
            if image.dim() != 4 or image.shape[0] != tokens.batch_size:
                raise ValueError(
                    f"image must have shape (B, C, H, W) with B = {tokens.batch_size}, got {tuple(image.shape)}"
                )
            image = image.to(tokens.device)
        if query is not None:
            if not isinstance(query, Tensor):
                raise TypeError(f"query must be a (B, D) or (D,) tensor, got {type(query).__name__}")
            query = query.to(tokens.device)
        return Context(image, query, generator)

    def _redundant(self, tokens: MultiScaleTokens, keep: Tensor, ctx: Context) -> Tensor:
        """(B, N) tokens whose parent is kept and whose own band energy is low for their level."""
        energy = band_energy(tokens, ctx)
        low = torch.zeros_like(keep)
        for level_slice in tokens.level_slices:
            threshold = torch.quantile(energy[:, level_slice], self.redundancy_quantile, dim=1, keepdim=True)
            low[:, level_slice] = energy[:, level_slice] < threshold
        parent = tokens.parent
        has_parent = (parent >= 0).unsqueeze(0)
        parent_kept = torch.gather(keep, 1, parent.clamp_min(0).expand_as(keep)) & has_parent
        return parent_kept & low
