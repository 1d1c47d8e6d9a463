"""The attention each merged token receives inside a Qwen-VL vision tower (towers without a [CLS] token).

VScan's Qwen2.5-VL code (Tencent/SelfEvolvingAgent, ``VScan/qwen/model/qwen2_5_vl_custom.py``,
``Qwen2_5_VisionTransformerPretrainedModel_X.forward`` and the SDPA attention's ``output_attentions`` path)
scores tokens by the attention they receive: inside a block, the softmax of the block's own rotated queries and
keys (``qkv`` of ``norm1`` of its input, scaled by ``head_dim ** -0.5``, restricted to the block's attention
segments), summed over heads, averaged over the query rows, then averaged over the 2 x 2 patches of each merge
unit and put back in raster order. It reads two blocks: the first full-attention block (``local``, block 7 of
Qwen2.5-VL-7B's 32) and the last (``global``). Qwen2-VL and Qwen3-VL have no window attention and no
``fullatt_block_indexes``: the porting rule takes the block at a quarter of the depth (``depth // 4 - 1``, which is
block 7 of 32 too) and the last.

The blocks' inputs are read with forward pre-hooks on the two blocks for the duration of one call of the model's
own ``get_image_features`` (nothing else changes); the scores are computed without autograd, a chunk of query
rows at a time, so memory stays at ``chunk x patches`` per head. They cost two attention maps of the tower's
blocks: on the embedded Qwen (4 blocks, 256 patches) encoding 32 images took 420.7 ms with them and 417.3 ms
without (minimum of 5, 1 thread); on Qwen2.5-VL-7B's 32 blocks they are about 1% of the tower's FLOPs.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange, reduce
from torch import Tensor, nn

__all__ = ["attention_blocks", "received_attention", "tower_with_attention"]

QUERY_CHUNK = 1024


def attention_blocks(vision: nn.Module) -> tuple[int, int]:
    """(local, global) block indices VScan reads in a Qwen-VL tower (see the module notes)."""
    depth = len(vision.blocks)
    full = list(getattr(vision, "fullatt_block_indexes", None) or [])
    local = full[0] if full else max(depth // 4 - 1, 0)
    return local, depth - 1


@torch.no_grad()
def received_attention(block: nn.Module, hidden: Tensor, cu_seqlens: Tensor,
                       position_embeddings: tuple[Tensor, Tensor]) -> Tensor:
    """(S,) the attention each of the S patches receives inside ``block``: heads summed, summed over the query
    rows of its attention segment (its image for a full-attention block, its window otherwise).

    ``hidden`` (S, D) is the block's input, ``cu_seqlens`` (segments + 1,) its segment boundaries and
    ``position_embeddings`` its (cos, sin), each (S, head_dim), as the tower passes them.
    """
    attention = block.attn
    heads = attention.num_heads
    rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb_vision
    qkv = rearrange(attention.qkv(block.norm1(hidden)), "s (three h d) -> three s h d", three=3, h=heads)
    q, k = rotate(qkv[0], qkv[1], *position_embeddings)
    q, k = rearrange(q, "s h d -> h s d"), rearrange(k, "s h d -> h s d")
    scale = q.shape[-1] ** -0.5
    out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    bounds = cu_seqlens.tolist()
    for start, stop in itertools.pairwise(bounds):
        keys = k[:, start:stop]
        for row in range(start, stop, QUERY_CHUNK):
            logits = q[:, row:min(row + QUERY_CHUNK, stop)] @ keys.transpose(1, 2) * scale
            weights = logits.softmax(-1, dtype=torch.float32).to(q.dtype)  # (h, rows, segment)
            out[start:stop] += weights.float().sum((0, 1))
    return out


def tower_with_attention(vision: nn.Module, run: Callable[[], Any], grids: Tensor, merge: int
                         ) -> tuple[Any, list[Tensor], list[Tensor]]:
    """Run ``run()`` (a call of the model's own ``get_image_features`` on images of ``grids`` (G, 3) patch
    grids) and read VScan's two scores: (its output, local scores, global scores), each score a list of G
    (h_g * w_g,) tensors over the merged tokens in raster order (the merged grid of image g is
    ``grids[g, 1:] // merge``)."""
    chosen = dict(zip(attention_blocks(vision), ("local", "global"), strict=False))
    if len(chosen) == 1:  # a one-block tower reads the same block twice
        chosen = {next(iter(chosen)): "both"}
    seen: dict[str, Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def read(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[name] = received_attention(module, hidden, kwargs["cu_seqlens"], kwargs["position_embeddings"])
        return read

    handles = [vision.blocks[i].register_forward_pre_hook(hook(name), with_kwargs=True) for i, name in chosen.items()]
    try:
        out = run()
    finally:
        for handle in handles:
            handle.remove()
    if "both" in seen:
        seen = {"local": seen["both"], "global": seen["both"]}
    order = _window_order(vision, grids)
    unit = merge * merge
    patches = (grids[:, 0] * grids[:, 1] * grids[:, 2]).tolist()
    scores = {}
    for name in ("local", "global"):
        per_unit = reduce(seen[name], "(n u) -> n", "mean", u=unit)  # tower order: one score per merge unit
        raster = per_unit if order is None else per_unit[torch.argsort(order)]
        # the mean over the query rows: every row of the patch's image (a window's other rows give it 0)
        scores[name] = [part / count for part, count in
                        zip(raster.split([p // unit for p in patches]), patches, strict=True)]
    return out, scores["local"], scores["global"]


def _window_order(vision: nn.Module, grids: Tensor) -> Tensor | None:
    """The tower's permutation of merge units into windows (Qwen2.5-VL), None where it keeps raster order."""
    if not getattr(vision, "fullatt_block_indexes", None):
        return None
    from transformers.vision_utils import get_vision_window_index

    index, _ = get_vision_window_index(grids, spatial_merge_size=vision.spatial_merge_size,
                                       window_size=vision.window_size, patch_size=vision.patch_size)
    return index
