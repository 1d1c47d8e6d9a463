"""In-LLM token dropping: schedules that decide, at chosen decoder layers, which image tokens go on.

A schedule is a list of :class:`Stage` s. A stage observes the input of one decoder layer (``observe``), chooses
which image tokens survive, and every layer from ``layer`` on runs on the kept tokens only (kept tokens keep
their positions). ``keep`` is a fraction of the image tokens present at that stage, rounded up by
:func:`pyrtok.allocators.budget_tokens`. The rules:

- ``fastv`` (FastV): one stage; the last prompt token's attention inside layer ``layer - 1`` (averaged over
  heads) ranks the image tokens; layers ``layer`` and later see the top ``keep``.
- ``pdrop`` (PyramidDrop): a stage at each of ``layers``; at each, the last instruction token's attention in
  that layer ranks the image tokens still present, and that layer already runs on the top ``keep``.
- ``dart`` (DART, duplication): at layer ``layer``, ``pivots`` image tokens with the largest L1 norm of the
  layer's input (and ``text_pivots`` instruction tokens after the image) are pivots; each pivot in turn keeps
  the image tokens least similar (cosine, on the final-norm'd hidden states) to it among those not yet kept,
  so near-duplicates of what is kept go. Image pivots are kept; the total is exactly the stage's budget.

Scores that need attention come from the layer's own norm, q/k projections (and q/k norms) and rotary
embedding for the one query row needed, so every layer itself runs with sdpa or flash attention.
The loop that runs a schedule is :mod:`pyrtok.vlm.decode`. Schedules are reachable by name
(:func:`create_schedule`), from YAML, or from a mapping with ``name`` (:func:`resolve_schedule`).

Example:
    >>> create_schedule("pdrop", layers=[8, 16, 24], keep=0.5).describe()
    'pdrop(layers=[8, 16, 24], keep=0.5)'
    >>> [(s.observe, s.layer) for s in create_schedule("fastv", layer=2, keep=0.25).stages]
    [(1, 2)]
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import yaml
from einops import rearrange, repeat
from torch import Tensor, nn

__all__ = ["DART", "FastV", "LayerView", "PyramidDrop", "Schedule", "Stage", "attention_to_last", "available_schedules",
           "create_schedule", "register_schedule", "resolve_schedule", "schedule_label", "stage_budgets"]

_SCHEDULES: dict[str, type[Schedule]] = {}


@dataclass
class LayerView:
    """What a stage sees of the batch at the input of the layer it observes.

    Attributes:
        hidden: (B, T, D) the layer's input hidden states (left-padded columns).
        layer: the decoder layer module (its own norm, projections and attention).
        cos, sin: (B, T, head_dim) the rotary embedding of every column (already at its position).
        valid: (B, T) bool, False on padding.
        image: (B, T) bool, True on image tokens still present.
        final_norm: the language model's final norm module.
    """

    hidden: Tensor
    layer: nn.Module
    cos: Tensor
    sin: Tensor
    valid: Tensor
    image: Tensor
    final_norm: nn.Module


@dataclass
class Stage:
    """One dropping step: observe the input of layer ``observe``; layers ``layer`` and later see the kept tokens.

    ``rule`` takes the :class:`LayerView` and the (B,) number of image tokens to keep and returns a (B, T) bool
    mask of the image tokens kept.
    """

    observe: int
    layer: int
    keep: float
    rule: Callable[[LayerView, Tensor], Tensor]


def stage_budgets(keep: float, image_counts: Tensor) -> Tensor:
    """(B,) image tokens each sample keeps at a stage: ``keep`` of its (B,) ``image_counts``, rounded up (at
    least 1, 0 for a sample without image tokens)."""
    from pyrtok.allocators import budget_tokens

    out = [budget_tokens(float(keep), int(n)) if int(n) > 0 else 0 for n in image_counts.tolist()]
    return torch.tensor(out, dtype=torch.long, device=image_counts.device)


def attention_to_last(view: LayerView) -> Tensor:
    """(B, T) attention probabilities of the last column (the last prompt token) over every column, averaged
    over heads, in ``view.layer``'s self-attention: from the layer's own input norm, q/k projections (q/k norms
    where it has them) and rotary embedding, for that one query row. Padding gets 0.
    """
    attention = view.layer.self_attn
    x = view.layer.input_layernorm(view.hidden)
    head_dim = attention.head_dim
    q = rearrange(attention.q_proj(x[:, -1:]), "b t (h d) -> b t h d", d=head_dim)
    k = rearrange(attention.k_proj(x), "b t (h d) -> b t h d", d=head_dim)
    if hasattr(attention, "q_norm"):
        q, k = attention.q_norm(q), attention.k_norm(k)
    q, k = rearrange(q, "b t h d -> b h t d"), rearrange(k, "b t h d -> b h t d")
    rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb
    q = rotate(q, q, view.cos[:, -1:], view.sin[:, -1:])[0]
    k = rotate(k, k, view.cos, view.sin)[1]
    k = repeat(k, "b h t d -> b (h g) t d", g=q.shape[1] // k.shape[1])
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k)[:, :, 0] * attention.scaling
    logits = logits.masked_fill(~view.valid[:, None], float("-inf"))
    return logits.float().softmax(-1).to(q.dtype).mean(1)


def _top(scores: Tensor, candidates: Tensor, budgets: Tensor) -> Tensor:
    """(B, T) bool: the ``budgets[b]`` best-scoring candidates of each row (ties: earlier column first)."""
    scores = scores.float().masked_fill(~candidates, float("-inf"))
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                            .expand_as(order))
    return candidates & (rank < budgets[:, None])


def _attention_rule(view: LayerView, budgets: Tensor) -> Tensor:
    return _top(attention_to_last(view), view.image & view.valid, budgets)


class Schedule:
    """Base class: a named list of :attr:`stages`, in layer order."""

    name: ClassVar[str] = ""
    stages: list[Stage]

    def describe(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.describe()

    def check_layers(self, num_layers: int) -> None:
        """Raise a ValueError unless every stage fits a language model of ``num_layers`` decoder layers."""
        for stage in self.stages:
            if stage.layer >= num_layers:
                raise ValueError(f"{self.describe()} drops at layer {stage.layer} but the language model has "
                                 f"{num_layers} layers (0 .. {num_layers - 1})")


def register_schedule(name: str) -> Callable[[type[Schedule]], type[Schedule]]:
    """Class decorator: make a schedule reachable as ``create_schedule(name, ...)``."""

    def wrap(cls: type[Schedule]) -> type[Schedule]:
        if name in _SCHEDULES:
            raise ValueError(f"a schedule named {name!r} is already registered ({_SCHEDULES[name].__name__})")
        cls.name = name
        _SCHEDULES[name] = cls
        return cls

    return wrap


def _keep(value: Any, argument: str = "keep") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) <= 1:
        raise ValueError(f"{argument} must be a fraction in (0, 1] of the image tokens present, got {value!r}")
    return float(value)


def _layer(value: Any, argument: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{argument} must be an int >= {low} (a decoder layer index), got {value!r}")
    return int(value)


@register_schedule("fastv")
class FastV(Schedule):
    """FastV: after layer ``layer - 1``, keep ``keep`` of the image tokens, ranked by the last prompt token's
    attention in layer ``layer - 1``. Args: ``layer`` (>= 1; FastV's K, default 2), ``keep`` (default 0.5)."""

    def __init__(self, layer: int = 2, keep: float = 0.5) -> None:
        self.layer = _layer(layer, "layer", 1)
        self.keep = _keep(keep)
        self.stages = [Stage(self.layer - 1, self.layer, self.keep, _attention_rule)]

    def describe(self) -> str:
        return f"fastv(layer={self.layer}, keep={self.keep:g})"


@register_schedule("pdrop")
class PyramidDrop(Schedule):
    """PyramidDrop: at each of ``layers`` (increasing), keep ``keep`` of the image tokens still present, ranked by
    the last instruction token's attention in that layer. ``keep``: one fraction, or one per stage."""

    def __init__(self, layers: Sequence[int] = (8, 16, 24), keep: float | Sequence[float] = 0.5) -> None:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not len(layers):
            raise ValueError(f"layers must be a non-empty list of decoder layer indices, got {layers!r}")
        self.layers = [_layer(v, f"layers[{i}]", 0) for i, v in enumerate(layers)]
        if any(b <= a for a, b in zip(self.layers, self.layers[1:], strict=False)):
            raise ValueError(f"layers must be strictly increasing, got {self.layers}")
        if isinstance(keep, Sequence) and not isinstance(keep, (str, bytes)):
            if len(keep) != len(self.layers):
                raise ValueError(f"keep must be one fraction or one per stage ({len(self.layers)}), got {keep!r}")
            self.keep = [_keep(v, f"keep[{i}]") for i, v in enumerate(keep)]
        else:
            self.keep = [_keep(keep)] * len(self.layers)
        self.stages = [Stage(layer, layer, k, _attention_rule) for layer, k in zip(self.layers, self.keep,
                                                                                  strict=True)]

    def describe(self) -> str:
        keep = self.keep[0] if len(set(self.keep)) == 1 else self.keep
        return f"pdrop(layers={self.layers}, keep={keep if isinstance(keep, list) else format(keep, 'g')})"


@register_schedule("dart")
class DART(Schedule):
    """DART (duplication-aware): at layer ``layer``, pivots, then per pivot the image tokens least similar to it.

    Args:
        layer: the first layer that runs on the kept tokens (its input is observed), >= 1; default 2.
        keep: fraction of the image tokens kept; default 0.25.
        pivots: image pivots (largest L1 norm of the layer's input); default 4.
        text_pivots: instruction-token pivots (tokens after the last image token, largest L1 norm); default 4.
    """

    def __init__(self, layer: int = 2, keep: float = 0.25, pivots: int = 4, text_pivots: int = 4) -> None:
        self.layer = _layer(layer, "layer", 1)
        self.keep = _keep(keep)
        if isinstance(pivots, bool) or not isinstance(pivots, numbers.Integral) or pivots < 1:
            raise ValueError(f"pivots must be a positive int, got {pivots!r}")
        if isinstance(text_pivots, bool) or not isinstance(text_pivots, numbers.Integral) or text_pivots < 0:
            raise ValueError(f"text_pivots must be an int >= 0, got {text_pivots!r}")
        self.pivots, self.text_pivots = int(pivots), int(text_pivots)
        self.stages = [Stage(self.layer, self.layer, self.keep, self._rule)]

    def describe(self) -> str:
        return (f"dart(layer={self.layer}, keep={self.keep:g}, pivots={self.pivots}, "
                f"text_pivots={self.text_pivots})")

    def _rule(self, view: LayerView, budgets: Tensor) -> Tensor:
        return duplication_keep(view.hidden, view.final_norm(view.hidden), view.image & view.valid,
                                view.valid, budgets, self.pivots, self.text_pivots)


def duplication_keep(hidden: Tensor, normed: Tensor, image: Tensor, valid: Tensor, budgets: Tensor,
                     pivots: int, text_pivots: int) -> Tensor:
    """DART's duplication rule: (B, T) bool of the image tokens kept.

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


def available_schedules() -> list[str]:
    """Names of the registered schedules."""
    return sorted(_SCHEDULES)


def create_schedule(name: str, **config: Any) -> Schedule:
    """Build the schedule registered as ``name`` with keyword ``config``.

    Example:
        >>> create_schedule("dart", layer=2, keep=0.25, pivots=8).describe()
        'dart(layer=2, keep=0.25, pivots=8, text_pivots=4)'
    """
    if name not in _SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; available: {available_schedules()}")
    try:
        return _SCHEDULES[name](**config)
    except TypeError as error:
        raise TypeError(f"schedule {name!r}: {error}") from None


def resolve_schedule(spec: Any, argument: str = "schedule") -> Schedule | None:
    """Every form of a schedule spec -> a :class:`Schedule` (None stays None: no in-LLM dropping).

    ``spec``: a registered name, a YAML path (a mapping with ``name``), a mapping with ``name`` (and an optional
    ``label``) and options, or a :class:`Schedule`.
    """
    if spec is None or isinstance(spec, Schedule):
        return spec
    if isinstance(spec, Path) or (isinstance(spec, str) and spec.endswith((".yaml", ".yml"))):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"{argument}: no schedule file {str(path)!r}")
        spec = yaml.safe_load(path.read_text())
    if isinstance(spec, str):
        return create_schedule(spec)
    if isinstance(spec, Mapping):
        options = dict(spec)
        options.pop("label", None)
        if "name" not in options:
            raise ValueError(f"{argument} mapping needs a 'name' key, got {sorted(options)}")
        return create_schedule(options.pop("name"), **options)
    raise TypeError(f"{argument} must be a schedule name, a YAML path, a mapping with 'name' or a Schedule, "
                    f"got {type(spec).__name__}")


def schedule_label(spec: Any) -> str:
    """The label tables use for a schedule spec: its ``label`` if the mapping gives one, else its description
    (``"none"`` for no schedule)."""
    if isinstance(spec, Mapping) and spec.get("label"):
        return str(spec["label"])
    schedule = resolve_schedule(spec)
    return "none" if schedule is None else schedule.describe()
