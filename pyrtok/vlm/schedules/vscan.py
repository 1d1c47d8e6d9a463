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

The vision side of VScan is the ``vscan`` allocator (:mod:`pyrtok.allocators.vscan`); VScan as published is that
allocator at 1.5 K tokens with this schedule, an average of K over the 32 layers.
"""

from __future__ import annotations

import math

from pyrtok.vlm.schedules.base import SCHEDULES, Schedule, Stage, attention_rule, check_keep, check_layer

__all__ = ["VScan"]


@SCHEDULES.register("vscan")
class VScan(Schedule):
    """VScan's language-model stage: at ``layer`` (default 16, half of LLaVA-1.5's 32), keep ``keep`` (default
    1/3) of the image tokens by the last instruction token's attention in that layer; positions renumbered.

    Example:
        >>> VScan().stage_counts(96), VScan(layer=2, keep=0.5).describe()
        ([96, 32], 'vscan(layer=2, keep=0.5)')
    """

    def __init__(self, layer: int = 16, keep: float = 1 / 3) -> None:
        self.layer = check_layer(layer, "layer", 0)
        self.keep = check_keep(keep)
        self.stages = [Stage(self.layer, self.layer, self.keep, attention_rule, renumber=True)]

    def stage_counts(self, entering: int) -> list[int]:
        return [entering, min(entering, math.floor(entering * self.keep + 0.5))]

    def describe(self) -> str:
        return f"vscan(layer={self.layer}, keep={self.keep:.4g})"
