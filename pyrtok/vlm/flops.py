"""Forward-pass FLOP estimates for ViT towers and decoder-only language models.

Counting convention: a multiply-add is 2 FLOPs. A transformer layer over T tokens of width d costs
2 * (its weight count) * T for the projections and MLP, plus 4 * d * T^2 for attention scores and the
weighted sum of values (full T x T; a causal kernel that skips the masked half does about half of it).
Embedding lookups are free; the LM head is counted for the positions whose logits are produced.
"""

from __future__ import annotations

from typing import Any

__all__ = ["llm_prefill_flops", "qwen_vision_flops", "vit_flops"]


def _layer_weights(hidden: int, intermediate: int, heads: int, kv_heads: int, gated: bool) -> int:
    head_dim = hidden // heads
    attention = hidden * hidden * 2 + 2 * hidden * kv_heads * head_dim  # q, o and k, v
    mlp = (3 if gated else 2) * hidden * intermediate
    return attention + mlp


def vit_flops(config: Any, num_patches: int, num_layers: int | None = None, has_cls: bool = True) -> float:
    """FLOPs of one image through ``num_layers`` (default all) layers of a CLIP/SigLIP vision config.

    ``has_cls``: whether a [CLS] token joins the patches (CLIP: yes; SigLIP: no).
    """
    tokens = num_patches + int(has_cls)
    layers = config.num_hidden_layers if num_layers is None else num_layers
    weights = _layer_weights(config.hidden_size, config.intermediate_size, config.num_attention_heads,
                             config.num_attention_heads, gated=False)
    patch_embed = 2 * 3 * config.patch_size**2 * config.hidden_size * num_patches
    return float(patch_embed + layers * (2 * weights * tokens + 4 * config.hidden_size * tokens**2))


def qwen_vision_flops(config: Any, num_patches: int) -> float:
    """FLOPs of one image of ``num_patches`` 14- or 16-pixel patches through a Qwen2-VL / Qwen2.5-VL / Qwen3-VL
    vision tower (vision config) and its 2x2 patch merger. Attention is counted over the whole image (an upper
    bound for Qwen2.5-VL's windowed blocks); the MLP is gated where the config says so (Qwen2.5-VL).

    Example:
        >>> from types import SimpleNamespace
        >>> cfg = SimpleNamespace(hidden_size=8, intermediate_size=16, depth=1, num_heads=2, patch_size=2,
        ...                       temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=4, hidden_act="silu")
        >>> qwen_vision_flops(cfg, num_patches=4)
        9472.0
    """
    hidden = getattr(config, "embed_dim", None) or config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or int(hidden * getattr(config, "mlp_ratio", 4))
    gated = type(config).__name__.startswith("Qwen2_5") or getattr(config, "hidden_act", "") == "silu"
    weights = _layer_weights(hidden, intermediate, config.num_heads, config.num_heads, gated=gated)
    patch_embed = 2 * 3 * config.temporal_patch_size * config.patch_size**2 * hidden * num_patches
    blocks = config.depth * (2 * weights * num_patches + 4 * hidden * num_patches**2)
    merged, width = num_patches // config.spatial_merge_size**2, hidden * config.spatial_merge_size**2
    out = getattr(config, "out_hidden_size", None) or getattr(config, "hidden_size", hidden)
    merger = 2 * merged * (width * width + width * out)
    return float(patch_embed + blocks + merger)


def llm_prefill_flops(config: Any, tokens: int, logits_positions: int = 1) -> float:
    """FLOPs of a decoder-only LM (Llama-style config) over a ``tokens``-long prompt.

    Example:
        >>> from types import SimpleNamespace
        >>> cfg = SimpleNamespace(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        ...                       num_attention_heads=2, num_key_value_heads=2, vocab_size=10)
        >>> llm_prefill_flops(cfg, tokens=4)
        5792.0
    """
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    weights = _layer_weights(config.hidden_size, config.intermediate_size, config.num_attention_heads, kv_heads,
                             gated=True)
    per_layer = 2 * weights * tokens + 4 * config.hidden_size * tokens**2
    head = 2 * config.hidden_size * config.vocab_size * logits_positions
    return float(config.num_hidden_layers * per_layer + head)
