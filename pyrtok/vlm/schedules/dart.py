"""DART (Wen et al., 2025): keep the image tokens least duplicated by a few pivot tokens.

What the released code does (the official LLaVA code, ZichenWen1/DART: ``get_retained_image_token`` and the
decoder loop of its ``DART_K_norm`` model; its llmc port, ModelTC/llmc ``llmc/compression/token_reduction/dart.py``),
and pyrtok with it:

- the drop happens before layer ``K`` (``pruning_loc``, default 2; llmc lines 172-179);
- pivots: the ``pivot_image_token`` image tokens and the ``pivot_text_token`` tokens after the image (all of the
  prompt after the image span) with the largest L1 norm of layer ``K - 1``'s keys, after the rotary embedding,
  all heads concatenated (llmc lines 61-99 and 196-214; the official code reads the same keys from layer
  ``K - 1``'s outputs);
- duplication: cosine similarity of the final norm of layer ``K``'s input (``normlayer(hidden_states)``, llmc
  line 112; ``self.norm(layer_outputs[0])`` officially); each pivot in turn keeps the ``TOKEN_TOPK`` image tokens
  least similar to it among those not kept yet (llmc lines 222-235), where ``TOKEN_TOPK`` is
  ``max_num_trunction // (pivots + text pivots)`` (officially always; llmc lines 189-193 take
  ``n0 * (1 - reduction_ratio)`` when ``max_num_trunction`` is unset, which is ``keep`` here). The pivots are
  visited in CPython's iteration order of the set of their sequence indices (the official code iterates a copy
  of that set, llmc the set); text pivots are dropped at the end (llmc line 237), image pivots kept;
- counts: image pivots + every pivot's ``TOKEN_TOPK``, not the budget: ``max_num_trunction=128`` (the scripts'
  ``bash scripts/v1_5/eval/textvqa.sh 0.778 128``, llmc ``configs/sparsification/methods/DART/dart.yml``) with
  4 + 4 pivots keeps 4 + 8 x 16 = 132 of LLaVA-1.5's 576 (:func:`pyrtok.budget.dart_counts`);
- positions: kept tokens keep theirs (``position_ids = keep_indexs``, llmc line 132, and the rotary embedding
  gathered at them, lines 142-146).

The authors' own ports to Qwen2-VL and Qwen2.5-VL (ZichenWen1/DART, ``Qwen2-VL/Qwen2VL_DART/modeling_qwen2_vl_self.py``
and ``Qwen2_5-VL/Qwen2_5VL_DART/modeling_qwen2_5_vl_self.py``, ``get_retained_image_token`` and the decoder loop;
their lmms-eval models set the defaults) run the same rule with two differences, the variant ``qwen``: the count
comes from ``reduction_ratio`` (``int(n0 * (1 - reduction_ratio) / (pivots + text_pivots))``, default 0.778,
``pruned_layer``
2), and the pivots are visited in the iteration order of the set itself (``pivot_order="set"``), not of a copy.
The two orders agree for 1-4 and 8 pivots and differ for 5-7 (the copy's table is rebuilt smaller). Kept
tokens keep their M-RoPE positions there too (``position_ids[:, :, keep_indexs]``). With one image per prompt
the image span is the image's tokens and the text pivots come from everything after it, as here.

pyrtok's earlier rule is the variant ``exact``: pivots by the L1 norm of layer ``K``'s input hidden states
(``pivot_space="hidden"``), visited by decreasing norm, image pivots first, and the budget kept exactly
(``exact_budget=True``: what the pivots keep is split evenly over them, the first ones taking one more).
"""

from __future__ import annotations

import numbers
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from pyrtok.budget import budget_tokens, dart_amounts, dart_counts
from pyrtok.vlm.decode import LayerView, layer_keys
from pyrtok.vlm.schedules.base import SCHEDULES, Schedule, Stage, check_choice, check_keep, check_layer

__all__ = ["DART", "duplication_keep", "pivot_duplication_keep"]

PIVOT_SPACES = ("keys", "hidden")
PIVOT_ORDERS = ("copy", "set")
DEFAULT_MAX_NUM_TRUNCTION = 128


def _count(value: Any, argument: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{argument} must be an int >= {low}, got {value!r}")
    return int(value)


def _ratio(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= float(value) < 1:
        raise ValueError(f"reduction_ratio must be a fraction in [0, 1) of the image tokens dropped, got {value!r}")
    return float(value)


@SCHEDULES.register("dart")
class DART(Schedule):
    """DART (duplication-aware): before layer ``layer``, pivots, then per pivot the image tokens least similar to it.

    Args:
        layer: ``K``, the first layer that runs on the kept tokens, >= 1; default 2.
        keep: the share of the image tokens behind each pivot's count: every pivot keeps
            ``ceil((n0 * keep) // (pivots + text_pivots))``. Give at most one of ``keep``, ``max_num_trunction``
            and ``reduction_ratio``.
        max_num_trunction: the official LLaVA code's name (sic) for the tokens the pivots keep between them: every
            pivot keeps ``max_num_trunction // (pivots + text_pivots)``; default 128 when neither of the others
            is given.
        reduction_ratio: the official Qwen code's (and llmc's) amount: every pivot keeps
            ``int(n0 * (1 - reduction_ratio) / (pivots + text_pivots))``.
        pivots: image pivots; default 4.
        text_pivots: pivots among the tokens after the sample's last image token; default 4.
        pivot_space: ``"keys"`` (default, the released code): pivots by the L1 norm of layer ``layer - 1``'s
            rotated keys; ``"hidden"``: by the L1 norm of layer ``layer``'s input hidden states.
        exact_budget: keep exactly ``keep`` of the image tokens (rounded up) or exactly ``max_num_trunction``,
            pivots visited by decreasing norm (image pivots first) and the tokens split evenly over them, instead
            of the released code's counts (image pivots + every pivot's share) and pivot order; default False.
        pivot_order: ``"copy"`` (default, the official LLaVA code): the pivots in the iteration order of a copy
            of their index set; ``"set"`` (the official Qwen code): of the set itself.

    Example:
        >>> DART().stage_counts(576), DART(keep=0.25).stage_counts(261)
        ([576, 132], [261, 68])
        >>> SCHEDULES.create("dart", keep=0.25, **DART.variants["exact"]).stage_counts(261)
        [261, 66]
    """

    variants: ClassVar[dict[str, dict[str, Any]]] = {
        "exact": {"pivot_space": "hidden", "exact_budget": True},
        "qwen": {"reduction_ratio": 0.778, "pivot_order": "set"},
    }

    def __init__(self, layer: int = 2, keep: float | None = None, max_num_trunction: int | None = None,
                 pivots: int = 4, text_pivots: int = 4, pivot_space: str = "keys", exact_budget: bool = False,
                 reduction_ratio: float | None = None, pivot_order: str = "copy") -> None:
        self.layer = check_layer(layer, "layer", 1)
        given = dart_amounts(keep, max_num_trunction, reduction_ratio)
        self.keep = None if keep is None else check_keep(keep)
        self.reduction_ratio = None if reduction_ratio is None else _ratio(reduction_ratio)
        self.max_num_trunction = (_count(max_num_trunction, "max_num_trunction", 1) if max_num_trunction is not None
                                  else DEFAULT_MAX_NUM_TRUNCTION if not given else None)
        self.pivot_order = check_choice(pivot_order, "pivot_order", PIVOT_ORDERS)
        self.pivots = _count(pivots, "pivots", 1)
        self.text_pivots = _count(text_pivots, "text_pivots", 0)
        self.pivot_space = check_choice(pivot_space, "pivot_space", PIVOT_SPACES)
        if not isinstance(exact_budget, bool):
            raise ValueError(f"exact_budget must be True or False, got {exact_budget!r}")
        self.exact_budget = exact_budget
        self.stages = [Stage(self.layer, self.layer, self.keep, self._rule)]

    def describe(self) -> str:
        amount = (f"keep={self.keep:g}" if self.keep is not None
                  else f"reduction_ratio={self.reduction_ratio:g}" if self.reduction_ratio is not None
                  else f"max_num_trunction={self.max_num_trunction}")
        text = f"dart(layer={self.layer}, {amount}, pivots={self.pivots}, text_pivots={self.text_pivots}"
        if self.pivot_space != "keys":
            text += f", pivot_space={self.pivot_space!r}"
        if self.exact_budget:
            text += ", exact_budget=True"
        if self.pivot_order != "copy":
            text += f", pivot_order={self.pivot_order!r}"
        return text + ")"

    def _amount(self) -> dict[str, Any]:
        return {"keep": self.keep, "max_num_trunction": self.max_num_trunction,
                "reduction_ratio": self.reduction_ratio}

    def stage_counts(self, entering: int) -> list[int]:
        """``[n0, kept]``; for the released rule, when the prompt has at least ``text_pivots`` tokens after the
        image (:func:`pyrtok.budget.dart_counts`)."""
        if entering <= 0:
            return [entering, 0]
        if self.exact_budget:
            share = self.keep if self.reduction_ratio is None else 1 - self.reduction_ratio
            kept = (int(budget_tokens(share, entering)) if share is not None
                    else min(self.max_num_trunction, entering))
            return [entering, kept]
        return [entering, dart_counts(entering, self.pivots, self.text_pivots, **self._amount())[2]]

    def _rule(self, view: LayerView, budgets: Tensor) -> Tensor:
        if self.pivot_space == "keys":
            keys = layer_keys(view.previous_layer, view.previous_hidden, view.cos, view.sin)
            states = rearrange(keys, "b h t d -> b t (h d)")
        else:
            states = view.hidden
        normed = view.final_norm(view.hidden)
        candidates = view.image & view.valid
        if self.exact_budget:
            return duplication_keep(states, normed, candidates, view.valid, budgets, self.pivots, self.text_pivots)
        return pivot_duplication_keep(states, normed, candidates, view.valid, self.pivots, self.text_pivots,
                                      **self._amount(), pivot_order=self.pivot_order)


def pivot_duplication_keep(states: Tensor, normed: Tensor, image: Tensor, valid: Tensor, pivots: int,
                           text_pivots: int, keep: float | None = None, max_num_trunction: int | None = None,
                           reduction_ratio: float | None = None, pivot_order: str = "copy") -> Tensor:
    """DART's duplication rule as its released code runs it: (B, T) bool of the image tokens kept.

    Args:
        states: (B, T, E) the states whose L1 norm picks the pivots (layer K-1's rotated keys, heads concatenated).
        normed: (B, T, D) the states compared by cosine similarity (the final norm of layer K's input).
        image: (B, T) bool, the image tokens (the candidates); valid: (B, T) bool, False on padding.
        pivots, text_pivots, keep, max_num_trunction, reduction_ratio, pivot_order: as :class:`DART` (one of
            ``keep``, ``max_num_trunction`` and ``reduction_ratio``).

    Each sample: ``min(pivots, n)`` image pivots and ``min(text_pivots, m)`` pivots among its ``m`` valid tokens
    after its last image token, by the L1 norm of ``states``; the pivots are visited in CPython's iteration order
    of the set built from the list of their sequence indices (``pivot_order="set"``) or of a copy of that set
    (``"copy"``), the list holding image pivots then text pivots, each by
    decreasing norm (index in the sample's unpadded sequence, as the released code sees a batch of one), each
    keeping the :func:`pyrtok.budget.dart_counts` per-pivot count (capped by what is left)
    of the image tokens least cosine-similar to it among those not kept yet. Image pivots are kept.
    """
    keep_mask = torch.zeros_like(image)
    strength = torch.linalg.vector_norm(states, ord=1, dim=-1)
    sequence = valid.long().cumsum(-1) - 1
    columns = torch.arange(image.shape[1], device=image.device)
    for b in range(image.shape[0]):
        candidates = columns[image[b]]
        count = int(candidates.numel())
        if not count:
            continue
        text = columns[valid[b] & ~image[b] & (columns > int(candidates[-1]))]
        found = min(text_pivots, int(text.numel()))
        image_count, per_pivot, _ = dart_counts(count, pivots, text_pivots, keep, max_num_trunction, found,
                                                reduction_ratio)
        image_pivots = candidates[strength[b, candidates].topk(image_count).indices]
        text_chosen = text[strength[b, text].topk(found).indices]
        pivot_columns = torch.cat([image_pivots, text_chosen]).tolist()
        indices = sequence[b, pivot_columns].tolist()  # image pivots, then text pivots, each by decreasing norm
        at = dict(zip(indices, pivot_columns, strict=True))
        keep_mask[b, image_pivots] = True
        remaining = image[b].clone()
        remaining[image_pivots] = False
        # The released code's visiting order: CPython's iteration order of the set built from that list (the
        # Qwen code) or of a copy of it (the LLaVA code). It depends on how the set is built (a copy of 5-7
        # entries is rehashed into a smaller table; from a dict it can differ too), so it is built the same way.
        built = set(indices)
        for index in list(built.copy() if pivot_order == "copy" else built):
            left = columns[remaining]
            take = min(per_pivot, int(left.numel()))
            if not take:
                break
            similarity = F.cosine_similarity(normed[b, at[index]], normed[b, left], dim=-1)
            picked = left[(-similarity).topk(take).indices]
            keep_mask[b, picked] = True
            remaining[picked] = False
    return keep_mask


def duplication_keep(hidden: Tensor, normed: Tensor, image: Tensor, valid: Tensor, budgets: Tensor,
                     pivots: int, text_pivots: int) -> Tensor:
    """pyrtok's exact-budget duplication rule (the ``exact`` variant of :class:`DART`): (B, T) bool of the image
    tokens kept.

    ``hidden`` (B, T, D) ranks pivots by L1 norm: ``min(pivots, budget)`` image tokens, and ``text_pivots``
    valid non-image tokens after the sample's last image token. Each pivot in turn (image pivots by descending
    norm, then text pivots) keeps the image tokens whose ``normed`` (B, T, D) states are least cosine-similar to
    its own, among those not yet kept: the ``budget - image pivots`` extra tokens are split evenly over the
    pivots, the first ones taking one more when it does not divide. ``image`` (B, T) marks the candidates.
    """
    keep = torch.zeros_like(image)
    strength = hidden.float().abs().sum(-1)
    columns = torch.arange(image.shape[1], device=image.device)
    for b in range(image.shape[0]):
        budget = int(budgets[b])
        if budget == 0:
            continue
        candidates = image[b].clone()
        count = int(candidates.sum())
        first = min(pivots, budget)
        chosen = strength[b].masked_fill(~candidates, float("-inf")).topk(first).indices
        order = [int(c) for c in chosen]
        candidates[chosen] = False
        keep[b, chosen] = True
        if text_pivots and count:
            last = int(columns[image[b]].max())
            text = valid[b] & ~image[b] & (columns > last)
            found = min(text_pivots, int(text.sum()))
            if found:
                order += [int(c) for c in strength[b].masked_fill(~text, float("-inf")).topk(found).indices]
        extra = budget - first
        if not extra:
            continue
        share, remainder = divmod(extra, len(order))
        vectors = F.normalize(normed[b].float(), dim=-1)
        for j, pivot in enumerate(order):
            take = min(share + int(j < remainder), int(candidates.sum()))
            if not take:
                continue
            similarity = (vectors @ vectors[pivot]).masked_fill(~candidates, float("inf"))
            picked = (-similarity).topk(take).indices
            keep[b, picked] = True
            candidates[picked] = False
    return keep
