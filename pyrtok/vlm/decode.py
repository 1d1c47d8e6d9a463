"""Run a language model layer by layer, dropping image tokens by a :class:`~pyrtok.vlm.schedules.Schedule`.

The loop calls the model's own modules (embedding, decoder layers, final norm, LM head, rotary embedding) on
one model instance; no class is patched and nothing is hooked. Every layer runs with the model's attention
kernel (sdpa; eager and flash get their own mask forms) on an explicit mask: causal over the column order and
blind to padding. A batch is left-padded; when a stage drops tokens, each sample keeps its own columns (in
order) and the batch is re-packed, left-padded to its longest sample, with every kept column's hidden state,
rotary embedding and position carried along, so kept tokens keep their positions (1-D or M-RoPE), unless the
stage renumbers (``Stage.renumber``, PyramidDrop's rule): then each sample that lost a token at that stage gets
positions 0 .. T'-1 over the columns it kept, the same on every M-RoPE axis (as text), and its rotary embedding
is recomputed. For 1-D positions that start at 0 (LLaVA) renumbering a sample that lost nothing is the identity,
so this is PyramidDrop's own rule (``modeling_llama_pdrop.py`` line 1446: ``arange(0, cur_len)`` after every
drop); PyramidDrop released no M-RoPE code, and renumbering the three axes as text is pyrtok's rule for Qwen.

The KV cache is a ``DynamicCache`` whose layer ``l`` holds only the columns layer ``l`` saw; a per-layer mask
marks its padding. Greedy decoding continues from it; a new token's position at layer ``l`` is the position
of the last prompt token as layer ``l`` saw it, + 1, on every axis (with renumbering, the number of prompt
tokens layer ``l`` ran on: PyramidDrop shifts the decoding position down by the tokens each stage dropped,
``modeling_llama_pdrop.py`` lines 1259-1268). Qwen3-VL's DeepStack features are added to the image tokens
still present after each of the first layers, as the model itself does.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

if TYPE_CHECKING:
    from pyrtok.vlm.schedules import Schedule, Stage

__all__ = ["LayerView", "Prefill", "ScheduledGeneration", "attention_to_last", "language_model", "layer_keys",
           "prefill", "scheduled_flops", "scheduled_generate"]

_KERNELS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


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
        previous_hidden: (B, T, D) the input of the layer before ``layer`` as that layer ran on these columns (None
            for layer 0): DART reads that layer's keys.
        previous_layer: that decoder layer module (None for layer 0).
    """

    hidden: Tensor
    layer: nn.Module
    cos: Tensor
    sin: Tensor
    valid: Tensor
    image: Tensor
    final_norm: nn.Module
    previous_hidden: Tensor | None = None
    previous_layer: nn.Module | None = None


def _project(layer: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor, which: str) -> Tensor:
    """(B, H, T, head_dim) rotated queries (``which="q"``) or keys (``"k"``) of ``layer``'s self-attention for its
    input ``hidden`` (B, T, D): the layer's own input norm, projection, q/k norm where it has one, and the
    model's ``apply_rotary_pos_emb`` with ``cos``/``sin`` (B, T, head_dim)."""
    attention = layer.self_attn
    x = rearrange(getattr(attention, f"{which}_proj")(layer.input_layernorm(hidden)), "b t (h d) -> b t h d",
                  d=attention.head_dim)
    if hasattr(attention, f"{which}_norm"):
        x = getattr(attention, f"{which}_norm")(x)
    x = rearrange(x, "b t h d -> b h t d")
    rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb
    return rotate(x, x, cos, sin)[0 if which == "q" else 1]


def layer_keys(layer: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """(B, H_kv, T, head_dim) the keys ``layer``'s self-attention computes from its input ``hidden`` (B, T, D),
    after the rotary embedding (``cos``, ``sin``: (B, T, head_dim)), as they enter its KV cache."""
    return _project(layer, hidden, cos, sin, "k")


def attention_to_last(view: LayerView) -> Tensor:
    """(B, T) attention probabilities of the last column (the last prompt token) over every column, averaged
    over heads, in ``view.layer``'s self-attention: from the layer's own input norm, q/k projections (q/k norms
    where it has them) and rotary embedding, for that one query row. Padding gets 0.
    """
    attention = view.layer.self_attn
    q = _project(view.layer, view.hidden[:, -1:], view.cos[:, -1:], view.sin[:, -1:], "q")
    k = layer_keys(view.layer, view.hidden, view.cos, view.sin)
    k = repeat(k, "b h t d -> b (h g) t d", g=q.shape[1] // k.shape[1])
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k)[:, :, 0] * attention.scaling
    logits = logits.masked_fill(~view.valid[:, None], float("-inf"))
    return logits.float().softmax(-1).to(q.dtype).mean(1)


@dataclass
class Prefill:
    """A scheduled prompt pass.

    Attributes:
        logits: (B, T', V) logits of the columns the last layer saw (T' = T when nothing was dropped), or
            (B, 1, V) of the last column only.
        columns: (B, T') prompt column of each of those columns (meaningless where ``valid`` is False).
        valid: (B, T') False on padding.
        stage_counts: (B, S + 1) image tokens of each sample entering the language model and after each stage.
        layer_tokens: (B, L) tokens (text and image) each decoder layer ran on.
        layer_image_tokens: (B, L) image tokens each decoder layer ran on.
        cache: the per-layer KV cache; ``key_valid[l]`` (B, T_l) marks its padding.
        next_positions: (B,) or (3, B) the position of the first generated token at the last layer.
        layer_positions: L tensors like ``next_positions``: the position of the first generated token at each
            decoder layer (they differ only where a stage renumbered positions).
    """

    logits: Tensor
    columns: Tensor
    valid: Tensor
    stage_counts: Tensor
    layer_tokens: Tensor
    layer_image_tokens: Tensor
    cache: Any
    key_valid: list[Tensor]
    next_positions: Tensor
    layer_positions: list[Tensor] = field(default_factory=list)

    @property
    def effective_image_tokens(self) -> Tensor:
        """(B,) image tokens per layer, averaged over the layers."""
        return self.layer_image_tokens.double().mean(-1)


@dataclass
class ScheduledGeneration:
    """What :func:`scheduled_generate` returns: ``sequences`` (B, T_new) new tokens (pad after EOS), the
    :class:`Prefill`, and ``scores`` (B, T_new, V) the logits of every step when asked for."""

    sequences: Tensor
    prefill: Prefill
    scores: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def language_model(model: nn.Module) -> nn.Module:
    """The decoder stack of ``model`` (a ``*ForConditionalGeneration`` or a ``*ForCausalLM``): the module with
    ``layers``, ``norm`` and ``rotary_emb``."""
    for candidate in (getattr(getattr(model, "model", None), "language_model", None), getattr(model, "model", None),
                      model):
        if candidate is not None and all(hasattr(candidate, k) for k in ("layers", "norm", "rotary_emb")):
            return candidate
    raise TypeError(f"cannot find the decoder layers of {type(model).__name__}: in-LLM schedules run Llama-, "
                    "Qwen2-, Mistral- and Qwen-VL-style language models (layers, norm, rotary_emb)")


def _embeds(model: nn.Module, input_ids: Tensor, image: Tensor,
            mm_encoder_outputs: dict[str, Any] | None) -> tuple[Tensor, list[Tensor] | None]:
    """(B, T, D) input embeddings with the image features in place, and DeepStack features (one (N, D) per
    layer, N image tokens of the batch in row order) when the vision outputs carry them."""
    embeds = model.get_input_embeddings()(input_ids)
    output = (mm_encoder_outputs or {}).get("image")
    if output is None:
        if bool(image.any()):
            raise ValueError("input_ids hold image tokens but mm_encoder_outputs has no 'image' entry")
        return embeds, None
    pooled = output.pooler_output  # a tuple of (N_i, D), or one tensor of every image's tokens (... , N, D)
    features = pooled.reshape(-1, pooled.shape[-1]) if isinstance(pooled, Tensor) else torch.cat(list(pooled))
    features = features.to(embeds.device, embeds.dtype)
    if features.shape[0] != int(image.sum()):
        raise ValueError(f"mm_encoder_outputs holds {features.shape[0]} image tokens but input_ids has "
                         f"{int(image.sum())} image placeholders")
    embeds = embeds.masked_scatter(repeat(image, "b t -> b t d", d=embeds.shape[-1]), features)
    deep = getattr(output, "deepstack_features", None)
    if not deep:
        return embeds, None
    return embeds, [torch.cat(list(layer)).to(embeds.device, embeds.dtype) for layer in deep]


def _mask(key_valid: Tensor, queries: int, kernel: str, dtype: torch.dtype, window: int | None = None,
          blocks: Tensor | None = None) -> Tensor:
    """The attention mask of ``queries`` new columns over (B, T_k) keys (the new ones last): causal over the
    column order, or within one image's run of ``blocks`` (B, T_k) (its id, -1 elsewhere: Gemma 3's
    bidirectional image attention), limited to the last ``window`` columns for sliding-window layers (HF's rule:
    the window and the union of the two), blind to padded keys; a padded query sees itself so that no row is
    empty."""
    if kernel.startswith("flash"):
        return key_valid.long()  # flash kernels take the 2-D padding mask and are causal themselves
    keys = key_valid.shape[1]
    key_index = torch.arange(keys, device=key_valid.device)
    query_index = key_index[keys - queries:]
    allowed = (key_index[None, :] <= query_index[:, None])[None]  # (1 or B, Q, T_k)
    if blocks is not None:
        query_blocks = blocks[:, keys - queries:]
        allowed = allowed | ((query_blocks[:, :, None] == blocks[:, None, :]) & (query_blocks[:, :, None] >= 0))
    if window is not None:
        allowed = allowed & (key_index[None, :] > query_index[:, None] - window)[None]
    allowed = (allowed & key_valid[:, None, :]) | (key_index[None, :] == query_index[:, None])[None]
    allowed = allowed[:, None]
    if kernel == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                      torch.finfo(dtype).min)


def _repack(keep: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T) bool -> (B, T') indices of each row's kept columns, in order, right-aligned (left padding), and
    the (B, T') mask of real entries; T' is the largest row count."""
    length = max(int(keep.sum(-1).max()), 1)
    index = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    key = torch.where(keep, index, torch.full_like(index, -1))
    sorted_key, order = key.sort(dim=-1, stable=True)
    return order[:, -length:], sorted_key[:, -length:] >= 0


def _take(tensor: Tensor, index: Tensor, dim: int) -> Tensor:
    """Gather ``index`` (B, T') along the column axis ``dim`` of a tensor whose batch axis is ``dim - 1``."""
    shape = list(tensor.shape)
    view = [1] * len(shape)
    view[dim - 1], view[dim] = index.shape
    expanded = index.reshape(view).expand(*shape[: dim - 1], index.shape[0], index.shape[1], *shape[dim + 1:])
    return tensor.gather(dim, expanded)


def _renumbered(positions: Tensor, valid: Tensor, dropped: Tensor) -> Tensor:
    """Positions 0 .. T'-1 over each row's valid columns (padding 0), on every axis of (3, B, T') M-RoPE
    positions, for the rows where ``dropped`` (B,) is True; the other rows keep ``positions``."""
    fresh = (valid.long().cumsum(-1) - 1).clamp_min(0).to(positions.dtype)
    if positions.dim() == 3:
        fresh = repeat(fresh, "b t -> a b t", a=positions.shape[0])
    return torch.where(dropped[:, None], fresh, positions)


def _targets(schedule: Schedule, entering: Tensor) -> Tensor:
    """(B, S + 1) image tokens each sample keeps after each stage, from the schedule's own counting rule."""
    rows = [schedule.stage_counts(int(n)) for n in entering.tolist()]
    if any(len(row) != len(schedule.stages) + 1 for row in rows):
        raise ValueError(f"{schedule.describe()}: stage_counts must give {len(schedule.stages) + 1} counts "
                         f"(entering, then one per stage), got {rows[0]}")
    return torch.tensor(rows, dtype=torch.long, device=entering.device)


def _layer_types(lm: nn.Module) -> list[str]:
    """Each decoder layer's attention type (``config.layer_types``; all ``"full_attention"`` without them)."""
    types = getattr(lm.config, "layer_types", None)
    return list(types[: len(lm.layers)]) if types else ["full_attention"] * len(lm.layers)


def _windows(lm: nn.Module) -> dict[str, int | None]:
    """The key window of each layer type: ``sliding_window`` for ``"sliding_attention"`` layers, else None."""
    return {kind: lm.config.sliding_window if kind == "sliding_attention" else None for kind in _layer_types(lm)}


@functools.cache
def _typed_rotary(rotary_class: type) -> bool:
    """Whether a rotary embedding class takes the layer type (Gemma 3's local and global layers differ)."""
    return "layer_type" in inspect.signature(rotary_class.forward).parameters


def _rotary(lm: nn.Module, hidden: Tensor, positions: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """(cos, sin) of every layer type at ``positions`` (Gemma 3's local and global layers rotate differently)."""
    kinds = set(_layer_types(lm))
    if _typed_rotary(type(lm.rotary_emb)):
        return {kind: lm.rotary_emb(hidden, positions, kind) for kind in kinds}
    pair = lm.rotary_emb(hidden, positions)
    return dict.fromkeys(kinds, pair)


def _image_blocks(image: Tensor) -> Tensor:
    """(B, T) long: each column's run of consecutive image columns (0, 1, ... per row), -1 for text."""
    start = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
    return torch.where(image, start.long().cumsum(-1) - 1, torch.full_like(image, -1, dtype=torch.long))


def _logits(model: nn.Module, hidden: Tensor) -> Tensor:
    """The LM head on final-norm'd ``hidden``, with the model's final logit soft-capping where it has one."""
    logits = model.get_output_embeddings()(hidden)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _check(lm: nn.Module, schedule: Schedule | None, length: int, image_blocks: bool = False) -> str:
    config = lm.config
    kernel = getattr(config, "_attn_implementation", None) or "sdpa"
    if kernel not in _KERNELS:
        raise ValueError(f"in-LLM schedules run with attention kernels {_KERNELS}, the model uses {kernel!r}")
    window = getattr(config, "sliding_window", None)
    typed = "sliding_attention" in (getattr(config, "layer_types", None) or [])
    untyped = window is not None and getattr(config, "use_sliding_window", True) and config.model_type == "mistral"
    if untyped and length > window:
        raise ValueError(f"this model uses sliding-window attention ({window} tokens) and the sequence has {length}; "
                         "in-LLM schedules run full attention only")
    if kernel.startswith("flash") and ((typed and length > window) or image_blocks):
        raise ValueError("in-LLM schedules build sliding-window and bidirectional image masks for sdpa or eager "
                         f"attention; the model uses {kernel!r}")
    if schedule is not None:
        schedule.check_layers(len(lm.layers))
    return kernel


@torch.no_grad()
def prefill(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    image_token_id: int,
    schedule: Schedule | None,
    mm_encoder_outputs: dict[str, Any] | None = None,
    last_only: bool = False,
    image_blocks: bool = False,
) -> Prefill:
    """Run the prompt through the language model layer by layer, dropping image tokens by ``schedule``.

    Args:
        model: a HF VLM (or causal LM) whose language model is Llama-, Qwen2-, Mistral-, Qwen-VL- or Gemma-3-style.
        input_ids, attention_mask: (B, T) left-padded prompts with ``image_token_id`` placeholders.
        position_ids: (B, T), or (3, B, T) for M-RoPE.
        schedule: the stages (None: every layer sees every token, the plain model).
        mm_encoder_outputs: the precomputed vision outputs (``{"image": ...}``) of the placeholders.
        last_only: keep only the last column's logits (generation).
        image_blocks: the tokens of one image attend to each other both ways (Gemma 3, as its token type ids
            make the model do); otherwise attention is causal.

    Returns:
        A :class:`Prefill` (logits, kept columns, per-stage and per-layer counts, the per-layer cache).
    """
    from transformers import DynamicCache

    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must be (B, T) alike, got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    if tuple(position_ids.shape[-2:]) != tuple(input_ids.shape) or position_ids.dim() not in (2, 3):
        raise ValueError(f"position_ids must be (B, T) or (3, B, T) for input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(position_ids.shape)}")
    lm = language_model(model)
    kernel = _check(lm, schedule, input_ids.shape[1], image_blocks)
    types, windows = _layer_types(lm), _windows(lm)
    valid = attention_mask.bool()
    image = (input_ids == image_token_id) & valid
    hidden, deep = _embeds(model, input_ids, input_ids == image_token_id, mm_encoder_outputs)
    ordinal = ((input_ids == image_token_id).flatten().cumsum(0) - 1).view_as(input_ids)
    rotary = _rotary(lm, hidden, position_ids)
    masks: dict[str, Tensor] = {}
    positions = position_ids
    columns = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    stages: list[Stage] = [] if schedule is None else list(schedule.stages)
    targets = _targets(schedule, image.sum(-1)) if stages else None
    pending: dict[int, Tensor] = {}
    stage_counts = [image.sum(-1)]
    layer_tokens, layer_image, key_valid, layer_positions = [], [], [], []
    next_positions = positions[..., -1] + 1
    previous: tuple[Tensor | None, nn.Module | None] = (None, None)
    cache = DynamicCache()
    for index, layer in enumerate(lm.layers):
        for s, stage in enumerate(stages):
            if stage.observe == index:
                view = LayerView(hidden, layer, *rotary[types[index]], valid, image, lm.norm, *previous)
                pending[s] = stage.rule(view, targets[:, s + 1]) & image
        for s, stage in enumerate(stages):
            if stage.layer == index:
                keep = valid & (~image | pending.pop(s))
                dropped = keep.sum(-1) < valid.sum(-1)
                order, valid = _repack(keep)
                hidden = _take(hidden, order, 1)
                rotary = {kind: (_take(cos, order, 1), _take(sin, order, 1)) for kind, (cos, sin) in rotary.items()}
                positions = _take(positions, order, positions.dim() - 1)
                image, columns, ordinal = (_take(image, order, 1) & valid, _take(columns, order, 1),
                                           _take(ordinal, order, 1))
                masks = {}
                if stage.renumber and bool(dropped.any()):
                    positions = _renumbered(positions, valid, dropped)
                    fresh = _rotary(lm, hidden, positions)
                    rotary = {kind: (torch.where(dropped[:, None, None], fresh[kind][0], cos),
                                     torch.where(dropped[:, None, None], fresh[kind][1], sin))
                              for kind, (cos, sin) in rotary.items()}
                    next_positions = positions[..., -1] + 1
                stage_counts.append(image.sum(-1))
        layer_tokens.append(valid.sum(-1))
        layer_image.append(image.sum(-1))
        layer_positions.append(next_positions)
        key_valid.append(valid)
        previous = (hidden, layer)
        kind = types[index]
        if kind not in masks:
            masks[kind] = _mask(valid, valid.shape[1], kernel, hidden.dtype, windows[kind],
                                _image_blocks(image) if image_blocks else None)
        hidden = layer(hidden, attention_mask=masks[kind], position_embeddings=rotary[kind], cache=cache,
                       use_cache=True)
        if deep is not None and index < len(deep) and bool(image.any()):
            hidden = hidden.clone()
            hidden[image] = hidden[image] + deep[index][ordinal[image]]
    logits = _logits(model, lm.norm(hidden[:, -1:] if last_only else hidden))
    return Prefill(logits, columns, valid, torch.stack(stage_counts, -1), torch.stack(layer_tokens, -1),
                   torch.stack(layer_image, -1), cache, key_valid, next_positions, layer_positions)


@torch.no_grad()
def scheduled_generate(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    image_token_id: int,
    schedule: Schedule | None,
    mm_encoder_outputs: dict[str, Any] | None = None,
    max_new_tokens: int = 20,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    logits_processor: Sequence[Any] | None = None,
    output_scores: bool = False,
    image_blocks: bool = False,
) -> ScheduledGeneration:
    """Greedy decoding after a scheduled prefill, from the per-layer cache.

    Args: those of :func:`prefill`, and ``max_new_tokens``; ``eos_token_id`` (default: the model's generation
    config) ends a sample, which then gets ``pad_token_id``; ``logits_processor``: callables
    ``(ids (B, T + t), scores (B, V)) -> scores`` applied before the argmax, as in HF ``generate``.

    Returns:
        :class:`ScheduledGeneration` with ``sequences`` (B, T_new).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    lm = language_model(model)
    kernel = _check(lm, schedule, input_ids.shape[1] + max_new_tokens, image_blocks)
    types, windows = _layer_types(lm), _windows(lm)
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops = torch.tensor([] if eos_token_id is None else
                         list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id],
                         device=input_ids.device, dtype=torch.long)
    pad = pad_token_id if pad_token_id is not None else (int(stops[0]) if stops.numel() else 0)
    state = prefill(model, input_ids, attention_mask, position_ids, image_token_id, schedule, mm_encoder_outputs,
                    last_only=True, image_blocks=image_blocks)
    ids, logits = input_ids, state.logits[:, -1]
    starts = state.layer_positions or [state.next_positions] * len(lm.layers)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    new, scores = [], []
    for step in range(max_new_tokens):
        for processor in logits_processor or ():
            logits = processor(ids, logits)
        if output_scores:
            scores.append(logits)
        token = logits.argmax(-1)
        token = torch.where(unfinished, token, torch.full_like(token, pad))
        new.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        unfinished = unfinished & ~torch.isin(token, stops)
        if step == max_new_tokens - 1 or not bool(unfinished.any()):
            break
        hidden = model.get_input_embeddings()(token[:, None])
        start = None
        for index, layer in enumerate(lm.layers):
            if starts[index] is not start:  # a new rotary embedding only where a stage renumbered positions
                start = starts[index]
                rotary = _rotary(lm, hidden, (start + step)[..., None])
            keys = torch.cat([state.key_valid[index], torch.ones_like(token[:, None], dtype=torch.bool)], dim=1)
            state.key_valid[index] = keys
            kind = types[index]  # a new token is text: causal, within its layer's window
            hidden = layer(hidden, attention_mask=_mask(keys, 1, kernel, hidden.dtype, windows[kind]),
                           position_embeddings=rotary[kind], cache=state.cache, use_cache=True)
        logits = _logits(model, lm.norm(hidden))[:, -1]
    sequences = torch.stack(new, dim=1)
    return ScheduledGeneration(sequences, state, torch.stack(scores, dim=1) if output_scores else None)


def scheduled_flops(config: Any, layer_tokens: Tensor, logits_positions: int = 1) -> Tensor:
    """(B,) prefill FLOPs of each sample from its (B, L) per-layer token counts (the convention of
    :func:`pyrtok.vlm.flops.llm_prefill_flops`: projections, MLP and full T x T attention per layer, plus the LM
    head for ``logits_positions`` positions).

    Example:
        >>> from types import SimpleNamespace
        >>> cfg = SimpleNamespace(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
        ...                       num_attention_heads=2, num_key_value_heads=2, vocab_size=10)
        >>> scheduled_flops(cfg, torch.tensor([[4, 4]])).tolist()  # equals llm_prefill_flops(cfg, 4)
        [11424.0]
    """
    from pyrtok.vlm.flops import llm_prefill_flops

    if layer_tokens.dim() != 2:
        raise ValueError(f"layer_tokens must be (B, L), got {tuple(layer_tokens.shape)}")
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layers = text.num_hidden_layers
    per_layer = [[llm_prefill_flops(text, int(t), 0) / layers for t in row] for row in layer_tokens.tolist()]
    head = 2.0 * text.hidden_size * text.vocab_size * logits_positions
    return torch.tensor([sum(row) + head for row in per_layer], dtype=torch.float64)
