"""The base class of every allocator, and the per-call context its policy hooks read.

An allocator turns :class:`~pyrtok.tokens.MultiScaleTokens` and a budget into a
:class:`~pyrtok.tokens.TokenSelection`. Every policy is a small subclass of :class:`Allocator` that
computes a (B, N) priority and, optionally, per-level quotas; the base class validates the inputs (NaN
included), does the selection with the primitives of :mod:`pyrtok.allocators.select`, runs the cross-scale
redundancy pass, and enforces the contract: each sample gets exactly min(budget_b, N) distinct tokens
(``difficulty`` may lower budget_b, see :meth:`Allocator.budgets`), in canonical order, deterministically for
a fixed seed, without a Python loop over tokens. The registry lives in :mod:`pyrtok.allocators.registry`,
budgets in :mod:`pyrtok.budget`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from pyrtok.allocators.select import exact_count, per_level_topk, topk_mask
from pyrtok.budget import resolve_budget
from pyrtok.signals.laplacian import band_energy_maps, laplacian_energy
from pyrtok.tokens import MultiScaleTokens, TokenSelection

__all__ = ["INPUTS", "Allocator", "Context"]

INPUTS = ("image", "query", "features", "attention")
"""What a policy may read: the image, the query, and the tokens' features and [CLS] attention."""


@dataclass
class Context:
    """What a policy may look at besides the tokens, and a per-call memo of computed signals.

    ``checked`` names the inputs the base class has already rejected NaN (and infinity) in, so that signals
    computed from them can skip their own finite check (``check_finite=self.unchecked("image")``).
    """

    image: Tensor | None
    query: Tensor | None
    generator: torch.Generator | None
    memo: dict[str, Any] = field(default_factory=dict)
    checked: frozenset[str] = frozenset()

    def unchecked(self, name: str) -> bool:
        """Whether input ``name`` still needs a finite check (the base class did not check it)."""
        return name not in self.checked

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per allocator call, so hooks can share a signal without recomputing it."""
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    def band_maps(self, tokens: MultiScaleTokens) -> list[Tensor]:
        """Laplacian band energy maps of ``image``: max(4, L) maps (B, H_l, W_l), computed once per call.

        At least four bands, so that :func:`~pyrtok.signals.difficulty.difficulty` can share them.
        """
        return self.cached("band_maps", lambda: band_energy_maps(self.image.float(), max(4, tokens.num_levels),
                                                                 check_finite=self.unchecked("image")))

    def band_energy(self, tokens: MultiScaleTokens) -> Tensor:
        """(B, N) Laplacian band energy of every token (see :func:`~pyrtok.signals.laplacian_energy`)."""
        return self.cached("band_energy", lambda: laplacian_energy(tokens, self.image, self.band_maps(tokens),
                                                                    check_finite=self.unchecked("image")))


class Allocator:
    """Base class: ``allocator(tokens, budget, *, image=None, query=None, generator=None)``.

    Subclasses set ``needs`` (the inputs they cannot run without: any of "image", "query", "attention"),
    override :meth:`reads` when they read more than that (or read some inputs only sometimes), and implement
    :meth:`priority` (B, N); per-level policies also implement :meth:`quotas` (B, L). Every input a call reads
    is checked for NaN before any signal is computed (the image for infinite values too), so a bad input gets
    an error that names it instead of a silently meaningless selection. Every allocator accepts:

    Args:
        redundancy: run the cross-scale redundancy pass: a kept fine token whose parent is kept and
            whose own band energy is below the ``redundancy_quantile`` of its level is given back, and the
            budget is refilled with the best tokens that are not redundant in that sense.
        redundancy_quantile: per-sample, per-level energy quantile under which a token counts as "low".
    """

    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()
    views: ClassVar[str] = "joint"
    """How the authors run the method on an any-resolution image's views (LLaVA-NeXT), what the family's
    ``views="auto"`` follows: ``"joint"`` (one choice over every view; pyrtok's rule where authors published no
    such code), ``"each"`` or ``"stacked"`` (each view on its own), or ``"sequence"`` (one choice over the model's
    own image sequence, newline tokens included); see :mod:`pyrtok.vlm.families.views`."""

    def __init__(self, *, redundancy: bool = False, redundancy_quantile: float = 0.5) -> None:
        if not isinstance(redundancy, bool):
            raise TypeError(f"redundancy must be a bool, got {redundancy!r}")
        if not 0.0 <= float(redundancy_quantile) <= 1.0:
            raise ValueError(f"redundancy_quantile must be in [0, 1], got {redundancy_quantile!r}")
        self.redundancy = redundancy
        self.redundancy_quantile = float(redundancy_quantile)

    # -- policy hooks -------------------------------------------------------------------------------
    def reads(self, ctx: Context) -> tuple[str, ...]:
        """The inputs (names from :data:`INPUTS`) this call reads; by default those in ``needs``."""
        return self.needs

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
        # A top-k (or quotas that add up to the budget) already keeps exactly budget_b tokens: nothing to adjust.
        if demote is not None or not torch.equal(keep.sum(1), budgets):
            keep = exact_count(keep, priority, budgets, demote)
        return TokenSelection.from_keep_mask(keep)

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
        ctx = Context(image, query, generator)
        ctx.checked = self._check_inputs(tokens, ctx)
        return ctx

    def _check_inputs(self, tokens: MultiScaleTokens, ctx: Context) -> frozenset[str]:
        """Reject NaN in every input this call reads (and infinity where it cannot be meant: all but attention).

        Returns the names of the inputs it checked.
        """
        reads = set(self.reads(ctx)) | ({"image"} if self.redundancy else set())
        unknown = reads - set(INPUTS)
        if unknown:
            raise RuntimeError(f"{type(self).__name__}.reads returned {sorted(unknown)}; inputs are {INPUTS}")
        values = {"image": ctx.image, "query": ctx.query, "features": tokens.features, "attention": tokens.attention}
        for name in INPUTS:
            value = values[name]
            if name not in reads or value is None:
                continue
            # [CLS] attention may be +inf where the encoder saturates; it still ranks, so only NaN is rejected.
            finite = name != "attention"
            # One summing pass proves most inputs clean; only a NaN or non-finite sum pays for the exact check.
            total = value.sum(dtype=torch.float32)
            if bool(torch.isfinite(total)) or (not finite and not bool(torch.isnan(total))):
                continue
            bad = ~torch.isfinite(value) if finite else torch.isnan(value)
            if not bool(bad.any()):
                continue
            label = name if name in ("image", "query") else f"tokens.{name}"
            what = "NaN or infinite values" if finite else "NaN"
            where = "the shared query" if value.dim() == 1 else \
                f"sample(s) {torch.nonzero(bad.flatten(1).any(1)).flatten().tolist()}"
            raise ValueError(f"allocator {self.name!r}: {label} contains {what} ({where}); inputs a policy reads "
                             f"must not contain NaN, since every score computed from them would be meaningless")
        return frozenset(name for name in reads if values[name] is not None)

    def _redundant(self, tokens: MultiScaleTokens, keep: Tensor, ctx: Context) -> Tensor:
        """(B, N) tokens whose parent is kept and whose own band energy is low for their level."""
        energy = ctx.band_energy(tokens)
        low = torch.zeros_like(keep)
        for level_slice in tokens.level_slices:
            threshold = torch.quantile(energy[:, level_slice], self.redundancy_quantile, dim=1, keepdim=True)
            low[:, level_slice] = energy[:, level_slice] < threshold
        parent = tokens.parent
        has_parent = (parent >= 0).unsqueeze(0)
        parent_kept = torch.gather(keep, 1, parent.clamp_min(0).expand_as(keep)) & has_parent
        return parent_kept & low
