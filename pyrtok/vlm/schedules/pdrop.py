"""PyramidDrop (Xing et al., 2024): a stage at each of several layers, each keeping a share of the image tokens.

What the released code does (Cooperx521/PyramidDrop, ``llava/model/modeling_llama_pdrop.py``), and pyrtok with it:

- a stage at layer ``L`` of ``layer_list`` runs after layer ``L - 1`` (``rank_layer = layer_idx + 1``, lines
  1222-1238) and ranks the image tokens by layer ``L``'s own attention (``self.layers[rank_layer]``: its input
  norm, q/k projections and rotary embedding at the current positions, lines 1320-1342): the last instruction
  token's row (``prompt_len + image_tokens - 1``, the last prompt token, line 1390), softmax with the causal mask
  (lines 1395-1397), averaged over heads (line 1399), over the image columns (line 1400); layer ``L`` then runs
  on the top ``keep_length`` (``topk``, line 1405), kept in their original order (``sort``, line 1407);
- counts: stage ``s`` keeps ``int(n0 * ratio[s])`` of the ``n0`` image tokens that *entered* (lines 1306-1307),
  with ``ratio`` the cumulative list the scripts pass (``--image_token_ratio_list "[0.5,0.25,0.125]"``,
  ``llava/eval/model_vqa_loader.py`` lines 94-96, ``scripts/v1_5/pdrop_eval/*.sh``): ``keep`` here is the
  per-stage lambda, so ``ratio[s]`` is ``keep ** s`` (the product of per-stage ``keep`` s), see
  :func:`pyrtok.budget.schedule_counts`;
- positions: after every drop the kept sequence gets positions ``0 .. T'-1`` (line 1446), and the next stage's
  attention is computed at those positions; while decoding, a new token's position at a layer is its original one
  minus the tokens dropped before that layer (lines 1259-1268), i.e. the length of the prompt that layer saw.
  The released code has no M-RoPE (Qwen) port: there pyrtok renumbers all three axes to ``0 .. T'-1``, as text
  (see :mod:`pyrtok.vlm.decode`).

pyrtok's earlier rule (each stage rounds up its share of the tokens *present*, and kept tokens keep their
positions) is the variant ``keep_positions``: ``rounding="per_stage", positions="keep"``. On 196 tokens with
lambda 0.3 the released counts are [196, 58, 17], the variant's [196, 59, 18].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pyrtok.budget import ROUNDINGS, schedule_counts
from pyrtok.vlm.schedules.base import (
    SCHEDULES,
    Schedule,
    Stage,
    attention_rule,
    check_choice,
    check_keep,
    check_layer,
)

__all__ = ["PyramidDrop"]

POSITIONS = ("renumber", "keep")


@SCHEDULES.register("pdrop")
class PyramidDrop(Schedule):
    """PyramidDrop: at each of ``layers`` (increasing), keep a share of the image tokens, ranked by the last
    instruction token's attention in that layer, which already runs on the kept tokens.

    Args:
        layers: PyramidDrop's ``layer_list``; default [8, 16, 24] (LLaVA-1.5's 32 layers).
        keep: lambda, the share each stage keeps of what the one before kept: one fraction, or one per stage;
            default 0.5 (the released scripts' ``[0.5, 0.25, 0.125]``).
        rounding: ``"cumulative"`` (default, the released code): stage ``s`` keeps ``int(n0 * lambda**s)`` of
            the ``n0`` image tokens that entered; ``"per_stage"``: ``keep`` of the tokens present, rounded up.
        positions: ``"renumber"`` (default, the released code): positions 0 .. T'-1 after each drop;
            ``"keep"``: kept tokens keep their positions.

    Example:
        >>> PyramidDrop(layers=[2, 4], keep=0.3).stage_counts(196)
        [196, 58, 17]
        >>> create = SCHEDULES.create
        >>> create("pdrop", layers=[2, 4], keep=0.3, **PyramidDrop.variants["keep_positions"]).stage_counts(196)
        [196, 59, 18]
    """

    variants: ClassVar[dict[str, dict[str, str]]] = {"keep_positions": {"rounding": "per_stage",
                                                                         "positions": "keep"}}

    def __init__(self, layers: Sequence[int] = (8, 16, 24), keep: float | Sequence[float] = 0.5,
                 rounding: str = "cumulative", positions: str = "renumber") -> None:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not len(layers):
            raise ValueError(f"layers must be a non-empty list of decoder layer indices, got {layers!r}")
        self.layers = [check_layer(v, f"layers[{i}]", 0) for i, v in enumerate(layers)]
        if any(b <= a for a, b in zip(self.layers, self.layers[1:], strict=False)):
            raise ValueError(f"layers must be strictly increasing, got {self.layers}")
        if isinstance(keep, Sequence) and not isinstance(keep, (str, bytes)):
            if len(keep) != len(self.layers):
                raise ValueError(f"keep must be one fraction or one per stage ({len(self.layers)}), got {keep!r}")
            self.keep = [check_keep(v, f"keep[{i}]") for i, v in enumerate(keep)]
        else:
            self.keep = [check_keep(keep)] * len(self.layers)
        self.rounding = check_choice(rounding, "rounding", ROUNDINGS)
        self.positions = check_choice(positions, "positions", POSITIONS)
        self.stages = [Stage(layer, layer, k, attention_rule, renumber=self.positions == "renumber")
                       for layer, k in zip(self.layers, self.keep, strict=True)]

    def stage_counts(self, entering: int) -> list[int]:
        return schedule_counts(self.keep, entering, self.rounding)

    def describe(self) -> str:
        keep = self.keep[0] if len(set(self.keep)) == 1 else self.keep
        text = f"pdrop(layers={self.layers}, keep={keep if isinstance(keep, list) else format(keep, 'g')}"
        if self.rounding != "cumulative":
            text += f", rounding={self.rounding!r}"
        if self.positions != "renumber":
            text += f", positions={self.positions!r}"
        return text + ")"
