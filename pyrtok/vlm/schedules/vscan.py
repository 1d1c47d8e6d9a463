"""VScan's language-model stage: at one middle layer, the last instruction token's attention keeps a share of the
image tokens, and the kept sequence is renumbered.

As the authors run it on LLaVA-1.5 (Tencent/SelfEvolvingAgent, folder ``VScan/``,
``llava/model/modeling_llama_x.py``: ``LlamaModel.forward_x`` and ``layer_prune``, the PyramidDrop code path with one
stage; ``scripts/llava1_5/*.sh``: ``--layer_list '[16]' --image_token_list '[32]' --visual_token_num 96``):

- after layer 15 (``rank_layer = layer_idx + 1`` in ``layer_list``), layer 16's own input norm, q/k projections
  and rotary embedding at the current positions score the image tokens by the last prompt token's attention,
  averaged over heads; layer 16 and later run on the top ``image_token_list[1]`` of them, in their order;
- positions are renumbered 0 .. T'-1 after the drop (and decoding positions shift by the tokens dropped);
- the count is absolute in the scripts (32 of the 96 the vision side kept: a third). Here ``keep`` is that share
  of the image tokens entering, rounded half up (96 -> 32, 192 -> 64, 288 -> 96, as the published settings).

The authors' Qwen2.5-VL code (``VScan/qwen/model/qwen2_5_vl_custom.py``: ``Qwen2_5_VLModel_X.forward`` and
``layer_prune``; README: ``--layer-list '[14]' --image-token-ratio-list '[0.333]'`` on the 28 layers of
Qwen2.5-VL-7B) runs the same stage with three differences, the variant ``qwen``: the queries and keys are scored
without the rotary embedding (``rotary=False``; its ``apply_multimodal_rotary_pos_emb`` call is commented out),
the kept tokens keep their M-RoPE positions (``positions="keep"``: ``position_ids[:, :, top_rank_index]``), and
the count is ``int(keep * n)`` (``rounding="floor"``, keep 0.333). Its layer is half the depth (14 of 28).

The vision side of VScan is the ``vscan`` allocator (:mod:`pyrtok.allocators.vscan`); VScan as published is that
allocator at 1.5 K tokens with this schedule, an average of K over the 32 layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from pyrtok.vlm.decode import LayerView
from pyrtok.vlm.schedules.base import SCHEDULES, Schedule, Stage, attention_rule, check_choice, check_keep, check_layer

POSITIONS = ("renumber", "keep")
ROUNDINGS = ("half_up", "floor")


def unrotated_attention_rule(view: LayerView, budgets: Tensor) -> Tensor:
    """:func:`attention_rule` with the queries and keys left unrotated (VScan's Qwen code)."""
    plain = dataclasses.replace(view, cos=torch.ones_like(view.cos), sin=torch.zeros_like(view.sin))
    return attention_rule(plain, budgets)

__all__ = ["VScan"]


@SCHEDULES.register("vscan")
class VScan(Schedule):
    """VScan's language-model stage: at ``layer`` (default 16, half of LLaVA-1.5's 32), keep ``keep`` (default
    1/3) of the image tokens by the last instruction token's attention in that layer; positions renumbered.

    Args:
        layer: the first layer that runs on the kept tokens (default 16).
        keep: the share of the image tokens entering that it keeps (default 1/3).
        rotary: score with the layer's rotary embedding applied (default True, the LLaVA code) or not (the
            Qwen code).
        positions: ``"renumber"`` (default, the LLaVA code) or ``"keep"`` (the Qwen code's M-RoPE positions).
        rounding: ``"half_up"`` (default: 96 -> 32 at a third) or ``"floor"`` (the Qwen code's ``int``).

    Example:
        >>> VScan().stage_counts(96), VScan(layer=2, keep=0.5).describe()
        ([96, 32], 'vscan(layer=2, keep=0.5)')
        >>> VScan(layer=4, **VScan.variants["qwen"]).stage_counts(100)
        [100, 33]
    """

    variants: ClassVar[dict[str, dict[str, Any]]] = {
        "qwen": {"keep": 0.333, "rotary": False, "positions": "keep", "rounding": "floor"}}

    def __init__(self, layer: int = 16, keep: float = 1 / 3, rotary: bool = True, positions: str = "renumber",
                 rounding: str = "half_up") -> None:
        self.layer = check_layer(layer, "layer", 0)
        self.keep = check_keep(keep)
        if not isinstance(rotary, bool):
            raise ValueError(f"rotary must be True or False, got {rotary!r}")
        self.rotary = rotary
        self.positions = check_choice(positions, "positions", POSITIONS)
        self.rounding = check_choice(rounding, "rounding", ROUNDINGS)
        rule = attention_rule if rotary else unrotated_attention_rule
        self.stages = [Stage(self.layer, self.layer, self.keep, rule, renumber=self.positions == "renumber")]

    def stage_counts(self, entering: int) -> list[int]:
        kept = math.floor(entering * self.keep + 0.5) if self.rounding == "half_up" else int(self.keep * entering)
        return [entering, min(entering, kept)]

    def describe(self) -> str:
        text = f"vscan(layer={self.layer}, keep={self.keep:.4g}"
        for name, default in (("rotary", True), ("positions", "renumber"), ("rounding", "half_up")):
            if getattr(self, name) != default:
                text += f", {name}={getattr(self, name)!r}"
        return text + ")"
