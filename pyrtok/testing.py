"""Tiny random-weight VLMs of every supported family, saved with their own processors, offline.

:func:`save_tiny_vlm` builds a family's ``*ForConditionalGeneration`` from a config (random weights, float32,
eval mode, sdpa attention), builds a word-level tokenizer and the family's own image processor, and saves
model and processor with ``save_pretrained`` into one folder, so that ``AutoModelForImageTextToText`` and
``AutoProcessor`` load both back without a download. Everything the processor must agree on (patch size,
merge size, tower resolution, any-resolution pinpoints, placeholder token ids) is derived from the model
config, so ``overrides`` cannot make the two disagree.

The tokenizer is word-level over the family's special tokens and a few hundred lower-cased English words
(digits split one by one; anything else maps to ``<unk>``). Its chat template writes prompts in the family's
real layout. Per family (test images are given as PIL ``width x height``; "grid" is the tower's patch grid):

``llava``
    LLaVA-1.5: CLIP tower (64 px, patch 8), Llama text. Placeholder ``<image>`` (repeated once per kept
    patch; the [CLS] is dropped). ``CLIPImageProcessor`` resizes the short side to 64 and centre-crops
    64x64, so every image gives an 8x8 grid: 64 ``<image>`` tokens for both 70x100 and 100x60.
    Prompt: ``USER: <image>\\nWhat colour is the shape? ASSISTANT:``.
``llava_next``
    LLaVA-NeXT: CLIP tower (32 px, patch 8), Llama text, pinpoints (height, width) ``[[32, 32], [32, 64],
    [64, 32], [64, 64], [64, 96], [96, 64]]``. Placeholder ``<image>``: a 4x4 base view, then the unpadded
    any-resolution grid with one newline token per row. 70x100 picks 96x64 (h x w): 3x2 tiles, a 12x8 grid,
    16 + 96 + 12 = 124 tokens; 100x60 picks 64x96: 2x3 tiles, an 8x12 grid, 16 + 96 + 8 = 120 tokens.
    Same prompt layout as ``llava``.
``llava_onevision``
    LLaVA-OneVision: SigLIP tower (32 px, patch 8, no [CLS]), Qwen2 text, ``anyres_max_9``, the same
    pinpoints as ``llava_next``, so the same grids and counts (124 and 120 ``<image>`` tokens; ``<video>``
    for videos). Prompt: ``<|im_start|>user <image>\\nWhat colour?<|im_end|>\\n<|im_start|>assistant\\n``.
``qwen2_vl``
    Qwen2-VL: native-resolution ViT, patch 14, 2x2 merge, temporal patch 2. The processor resizes to
    multiples of 28 within 4..64 merged tokens: 70x100 -> 56x112 px (w x h), grid (t, h, w) = (1, 8, 4),
    8 ``<|image_pad|>`` tokens; 100x60 -> 112x56 px, grid (1, 4, 8), 8 tokens. The run is wrapped in
    ``<|vision_start|>`` ... ``<|vision_end|>``. Prompt: ChatML with the default system message.
``qwen2_5_vl``
    Qwen2.5-VL: as ``qwen2_vl`` (same grids and tokens) plus window attention: ``window_size`` 56 px is
    2x2 merged tokens, so the 4x2 merged grid of a 70x100 image splits into 2 windows; block 0 attends
    within windows, block 1 (``fullatt_block_indexes``) over the whole image.
``qwen3_vl``
    Qwen3-VL: patch 16, 2x2 merge, learned position grid interpolated to the image, DeepStack features
    from vision block 0 added to the first text layer. Resize to multiples of 32: 70x100 -> 64x96 px,
    grid (1, 6, 4), 6 ``<|image_pad|>`` tokens; 100x60 -> 96x64 px, grid (1, 4, 6), 6 tokens. Prompt:
    ChatML without a default system message.
``internvl``
    InternVL: InternViT tower (56 px tiles, patch 7, [CLS]), Qwen2 text, pixel shuffle (downsample 0.5) to 4x4
    = 16 ``<IMG_CONTEXT>`` tokens a tile. ``GotOcr2ImageProcessor`` (the processor passes
    ``crop_to_patches=True``) picks the tile grid (cols x rows, 1..6 tiles) closest to the image's aspect ratio
    and adds a thumbnail only when there is more than one tile: 70x100 -> 2x3 tiles + thumbnail, 100x60 -> 3x2
    tiles + thumbnail, 112 tokens each; 64x64 -> one tile, 16 tokens. The run is wrapped in ``<img>`` ...
    ``</img>`` by the processor. Prompt: ChatML without a system message, ``<IMG_CONTEXT>\\n`` per image.
``gemma3``
    Gemma 3: SigLIP tower (64 px, patch 8, no pooling head) resized to the square, the 8x8 grid average-pooled
    2x2 to 16 ``<image_soft_token>`` tokens for any image; the processor expands ``<start_of_image>`` to a blank
    line, the marker, the soft tokens, ``<end_of_image>`` and a blank line, and returns ``token_type_ids``. The
    language model alternates sliding-window (12 tokens) and global layers. Prompt: Gemma's turns
    (``<start_of_turn>user\\n<start_of_image>...<end_of_turn>\\n<start_of_turn>model\\n``).

Example:
    >>> import tempfile
    >>> from transformers import AutoModelForImageTextToText, AutoProcessor
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = save_tiny_vlm("llava", folder)
    ...     model = AutoModelForImageTextToText.from_pretrained(path)
    ...     processor = AutoProcessor.from_pretrained(path)
    ...     type(model).__name__, processor.image_token
    ('LlavaForConditionalGeneration', '<image>')
"""

from __future__ import annotations

import contextvars
import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from pyrtok.embedded.tokenizer import QWEN_SPECIAL as _QWEN_SPECIAL
from pyrtok.embedded.tokenizer import chatml_template as _chatml_template

__all__ = ["ARCHITECTURES", "FAMILIES", "build_vlm", "save_tiny_vlm"]

FAMILIES: tuple[str, ...] = ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_next", "llava_onevision",
                             "internvl", "gemma3")

ARCHITECTURES: dict[str, str] = {
    "LlavaForConditionalGeneration": "llava",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
    "Qwen3VLForConditionalGeneration": "qwen3_vl",
    "LlavaNextForConditionalGeneration": "llava_next",
    "LlavaOnevisionForConditionalGeneration": "llava_onevision",
    "InternVLForConditionalGeneration": "internvl",
    "Gemma3ForConditionalGeneration": "gemma3",
}
"""The tiny build (:func:`save_tiny_vlm`'s ``family``) of each architecture pyrtok runs: the family contract test
builds one model per registered architecture from here, so a new family needs its tiny build listed too."""

_WORDS = """
. , ? ! : ; ' " ( ) - / 0 1 2 3 4 5 6 7 8 9
a an the this that these those there here it its is are was were be been am do does did has have had
what which who whom whose where when why how many much
in on at of to from by with without for about above below under over left right top bottom middle centre
center front back behind near far next between inside outside up down
and or not no yes but if then so than as all any each every some most more less few one two three four
five six seven eight nine ten zero first second third last other same different only also very
colour color shape size number digit letter word words text image picture photo view scene object objects
thing things part side corner edge background foreground
red green blue yellow orange purple pink brown black white grey gray cyan magenta dark light bright
circle square triangle rectangle star cross ring line dot diamond hexagon ellipse oval heart arrow
small big large tiny huge little long short tall wide narrow round flat
answer question using single phrase describe briefly detailed look see show shows shown tell
count find name give read write choose option options
user assistant system you helpful i me my we our they them he she his her
can could would should will may might must please thank thanks
cat dog bird car bus tree house person people man woman child table chair cup book sky water road
""".split()


def save_tiny_vlm(family: str, folder: str | Path, *, seed: int = 0, text_layers: int = 2, hidden: int = 64,
                  **overrides: Any) -> Path:
    """Build a tiny random-weight VLM of ``family``, save it and its processor to ``folder``, return the folder.

    Args:
        family: one of :data:`FAMILIES`.
        folder: where ``save_pretrained`` writes the model and the processor (created if missing).
        seed: weights come from ``torch.manual_seed(seed)`` in a forked RNG, so the caller's RNG is untouched
            and two saves with the same seed are identical.
        text_layers: decoder layers of the language model (>= 1).
        hidden: width of the language model, a positive multiple of 16; the vision tower is half as wide.
        **overrides: keyword arguments of the family's top-level config (e.g. ``vision_feature_layer=-1``);
            ``vision_config`` and ``text_config`` take mappings merged into the tiny defaults. The processor
            follows the final config (patch size, merge size, tower resolution, pinpoints).

    Returns:
        ``Path(folder)``, holding ``config.json``, the weights, the tokenizer, the image (and video) processor
        and the chat template.

    Raises:
        ValueError: unknown ``family``, or ``text_layers`` / ``hidden`` out of range.
        TypeError: a ``vision_config`` / ``text_config`` override that is not a mapping.
    """
    model, processor = build_vlm(family, seed=seed, text_layers=text_layers, hidden=hidden, **overrides)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_vlm(family: str, *, seed: int = 0, text_layers: int = 2, hidden: int = 64,
              device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
              **overrides: Any) -> tuple[Any, Any]:
    """A random-weight VLM of ``family`` and its processor, in memory (:func:`save_tiny_vlm` saves one).

    Arguments as :func:`save_tiny_vlm`, and ``device`` / ``dtype``: where and in what the weights are made
    (``"meta"`` builds the shapes without memory, for real sizes on a machine without the room).

    Example:
        >>> model, processor = build_vlm("llava", device="meta", text_layers=1, hidden=32)
        >>> next(model.parameters()).device.type
        'meta'
    """
    if family not in _BUILDERS:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if not isinstance(text_layers, int) or isinstance(text_layers, bool) or text_layers < 1:
        raise ValueError(f"text_layers must be an int >= 1, got {text_layers!r}")
    if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 16 or hidden % 16:
        raise ValueError(f"hidden must be a positive multiple of 16, got {hidden!r}")
    tokenizer = _tokenizer(family)
    token = _BUILD.set((torch.device(device) if device is not None else None, dtype))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, processor = _BUILDERS[family](tokenizer, text_layers, hidden, dict(overrides))
    finally:
        _BUILD.reset(token)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, processor


# -- tokenizers -------------------------------------------------------------------------------------------------

_LLAVA_SPECIAL = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "image": "<image>"}
_ONEVISION_SPECIAL = {"pad": "<|endoftext|>", "unk": "<unk>", "eos": "<|im_end|>", "im_start": "<|im_start|>",
                      "image": "<image>", "video": "<video>"}

_INTERNVL_SPECIAL = {"pad": "<|endoftext|>", "unk": "<unk>", "eos": "<|im_end|>", "im_start": "<|im_start|>",
                     "image": "<IMG_CONTEXT>", "image_start": "<img>", "image_end": "</img>", "video": "<video>"}

# Words a family's chat template writes beyond the shared vocabulary (Gemma's assistant turn is "model").
_EXTRA_WORDS = {"gemma3": ["model"]}

_GEMMA3_SPECIAL = {"pad": "<pad>", "unk": "<unk>", "bos": "<bos>", "eos": "<eos>", "image": "<image_soft_token>",
                   "boi": "<start_of_image>", "eoi": "<end_of_image>", "start_turn": "<start_of_turn>",
                   "end_turn": "<end_of_turn>"}

_SPECIAL = {"llava": _LLAVA_SPECIAL, "llava_next": _LLAVA_SPECIAL, "llava_onevision": _ONEVISION_SPECIAL,
            "qwen2_vl": _QWEN_SPECIAL, "qwen2_5_vl": _QWEN_SPECIAL, "qwen3_vl": _QWEN_SPECIAL,
            "internvl": _INTERNVL_SPECIAL, "gemma3": _GEMMA3_SPECIAL}

# Tokens the family's processor reads from the tokenizer by name (InternVL's: tokenizer.start_image_token, ...).
_NAMED = {"internvl": {"context_image_token": "<IMG_CONTEXT>", "start_image_token": "<img>",
                       "end_image_token": "</img>", "video_token": "<video>"},
          "gemma3": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                     "image_token": "<image_soft_token>"}}

# Chat templates put every literal inside {{ }} so that whitespace control ({%- -%}) never eats a newline.
# LLaVA-1.5 / LLaVA-NeXT (Vicuna): "USER: <image>\n<text> ASSISTANT:"; images of a turn come before its text.
_VICUNA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] if message['content'] is string"
    " else message['content'] -%}"
    "{%- if message['role'] != 'system' -%}{{ message['role'] | upper + ': ' }}{%- endif -%}"
    "{%- for part in parts if part['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] + ' ' }}{%- endfor -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# LLaVA-OneVision (Qwen2 text): "<|im_start|>user <image>\n<text><|im_end|>\n<|im_start|>assistant\n".
_ONEVISION_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] if message['content'] is string"
    " else message['content'] -%}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{%- for part in parts if part['type'] == 'image' -%}{{ '<image>' }}{%- endfor -%}"
    "{%- for part in parts if part['type'] == 'video' -%}{{ '<video>' }}{%- endfor -%}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ '\\n' + part['text'] }}{%- endfor -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


# InternVL (Qwen2 text): ChatML, each image written as "<IMG_CONTEXT>\n" in place; the processor wraps it in
# <img> ... </img> and repeats it once per token of every tile and the thumbnail.
_INTERNVL_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<IMG_CONTEXT>\\n' }}"
    "{%- elif part['type'] == 'video' -%}{{ '<video>\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Gemma 3: "<start_of_turn>user\n<start_of_image><text><end_of_turn>\n<start_of_turn>model\n" (BOS from the
# tokenizer); the processor expands <start_of_image> to "\n\n<start_of_image>", the soft tokens, "<end_of_image>\n\n".
_GEMMA3_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

_TEMPLATES = {"llava": _VICUNA_TEMPLATE, "llava_next": _VICUNA_TEMPLATE, "llava_onevision": _ONEVISION_TEMPLATE,
              "qwen2_vl": _chatml_template("You are a helpful assistant."),
              "qwen2_5_vl": _chatml_template("You are a helpful assistant."), "qwen3_vl": _chatml_template(None),
              "internvl": _INTERNVL_TEMPLATE, "gemma3": _GEMMA3_TEMPLATE}


def _tokenizer(family: str) -> Any:
    """A word-level tokenizer with the family's special tokens and chat template."""
    from pyrtok.embedded.tokenizer import word_tokenizer

    words = _WORDS + _EXTRA_WORDS.get(family, [])
    tokenizer = word_tokenizer(words, special=_SPECIAL[family], split_digits=True, chat_template=_TEMPLATES[family])
    if family not in _NAMED:
        return tokenizer
    from transformers import PreTrainedTokenizerFast

    # the same vocabulary, with the special tokens that the family's processor reads by name
    named = {f"{key}_token": getattr(tokenizer, f"{key}_token") for key in ("pad", "unk", "bos", "eos")
             if getattr(tokenizer, f"{key}_token", None) is not None}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, **named,
                                   extra_special_tokens=_NAMED[family], padding_side="left",
                                   chat_template=_TEMPLATES[family])


def _id(tokenizer: Any, token: str) -> int:
    return tokenizer.convert_tokens_to_ids(token)


# -- configs ----------------------------------------------------------------------------------------------------

def _merged(defaults: dict[str, Any], overrides: dict[str, Any], key: str) -> dict[str, Any]:
    """``defaults`` updated with the mapping ``overrides[key]`` (popped), for nested sub-config overrides."""
    extra = overrides.pop(key, None) or {}
    if not isinstance(extra, Mapping):
        raise TypeError(f"{key} override must be a mapping, got {type(extra).__name__}")
    return {**defaults, **extra}


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim / 2 rotary frequencies over (t, h, w) in Qwen's 2:3:3 proportion."""
    half = head_dim // 2
    spatial = 3 * half // 8
    return [half - 2 * spatial, spatial, spatial]


def _llama_text(tokenizer: Any, text_layers: int, hidden: int) -> dict[str, Any]:
    return {"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": hidden,
            "intermediate_size": 2 * hidden, "num_hidden_layers": text_layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 1024, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}


def _qwen_text(tokenizer: Any, text_layers: int, hidden: int) -> dict[str, Any]:
    return {"vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": text_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 1024, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id}


def _clip_vision(hidden: int, image_size: int, patch_size: int) -> dict[str, Any]:
    width = hidden // 2
    return {"model_type": "clip_vision_model", "hidden_size": width, "intermediate_size": 2 * width,
            "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": image_size, "patch_size": patch_size,
            "projection_dim": width}


_BUILD: contextvars.ContextVar[tuple[torch.device | None, torch.dtype]] = contextvars.ContextVar(
    "build", default=(None, torch.float32))
"""Where :func:`build_vlm` makes the weights, and in what dtype."""


def _finish(model_class: Any, config: Any) -> Any:
    """The model with sdpa attention, weights from the (already seeded) global RNG, made on the device and in the
    dtype :func:`build_vlm` was given (float32 on the CPU by default)."""
    config._attn_implementation = "sdpa"
    device, dtype = _BUILD.get()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if device is None:
            return model_class(config).to(dtype)
        with device:
            return model_class(config)
    finally:
        torch.set_default_dtype(previous)


# (height, width) in pixels, multiples of the 32 px tower; tall and wide images pick the two 2x3 layouts.
_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [64, 96], [96, 64]]


def _llava(tokenizer: Any, text_layers: int, hidden: int, overrides: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    vision = _merged(_clip_vision(hidden, 64, 8), overrides, "vision_config")
    text = _merged(_llama_text(tokenizer, text_layers, hidden), overrides, "text_config")
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=_id(tokenizer, "<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default", **overrides)
    model = _finish(LlavaForConditionalGeneration, config)
    side = config.vision_config.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=config.vision_config.patch_size, num_additional_image_tokens=1,
                               vision_feature_select_strategy=config.vision_feature_select_strategy,
                               chat_template=tokenizer.chat_template)
    return model, processor


def _llava_next(tokenizer: Any, text_layers: int, hidden: int, overrides: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    vision = _merged(_clip_vision(hidden, 32, 8), overrides, "vision_config")
    text = _merged(_llama_text(tokenizer, text_layers, hidden), overrides, "text_config")
    overrides.setdefault("image_grid_pinpoints", copy.deepcopy(_PINPOINTS))
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=_id(tokenizer, "<image>"),
                             vision_feature_layer=-2, vision_feature_select_strategy="default", **overrides)
    model = _finish(LlavaNextForConditionalGeneration, config)
    side = config.vision_config.image_size
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                              image_grid_pinpoints=config.image_grid_pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   patch_size=config.vision_config.patch_size, num_additional_image_tokens=1,
                                   vision_feature_select_strategy=config.vision_feature_select_strategy,
                                   chat_template=tokenizer.chat_template)
    return model, processor


def _llava_onevision(tokenizer: Any, text_layers: int, hidden: int, overrides: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    width = hidden // 2
    vision = _merged({"model_type": "siglip_vision_model", "hidden_size": width, "intermediate_size": 2 * width,
                      "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                     overrides, "vision_config")
    text = _merged({"model_type": "qwen2", **_qwen_text(tokenizer, text_layers, hidden)}, overrides, "text_config")
    overrides.setdefault("image_grid_pinpoints", copy.deepcopy(_PINPOINTS))
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=_id(tokenizer, "<image>"),
                                  video_token_id=_id(tokenizer, "<video>"), vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                  **overrides)
    model = _finish(LlavaOnevisionForConditionalGeneration, config)
    side = config.vision_config.image_size
    square = {"height": side, "width": side}
    image_processor = LlavaOnevisionImageProcessor(size=square, image_grid_pinpoints=config.image_grid_pinpoints)
    video_processor = LlavaOnevisionVideoProcessor(size=square)
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        num_image_tokens=(side // config.vision_config.patch_size) ** 2,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio, chat_template=tokenizer.chat_template)
    return model, processor


def _qwen_ids(tokenizer: Any) -> dict[str, int]:
    return {"image_token_id": _id(tokenizer, "<|image_pad|>"), "video_token_id": _id(tokenizer, "<|video_pad|>"),
            "vision_start_token_id": _id(tokenizer, "<|vision_start|>"),
            "vision_end_token_id": _id(tokenizer, "<|vision_end|>")}


def _qwen_processor(config: Any, tokenizer: Any, processor_class: Any, video_class: Any,
                    norm: dict[str, Any]) -> Any:
    """Image/video processors whose patch, temporal patch and merge sizes are the vision config's."""
    from transformers import Qwen2VLImageProcessor

    vision = config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    # 4..64 merged tokens per image keeps every test image to a few dozen patches.
    size = {"shortest_edge": 4 * factor**2, "longest_edge": 64 * factor**2}
    sizes = {"patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
             "merge_size": vision.spatial_merge_size, **norm}
    image_processor = Qwen2VLImageProcessor(size=size, **sizes)
    video_processor = video_class(size=size, **sizes)
    return processor_class(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                           chat_template=tokenizer.chat_template)


def _qwen2_vl(tokenizer: Any, text_layers: int, hidden: int, overrides: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, Qwen2VLVideoProcessor

    width = hidden // 2
    vision = _merged({"depth": 2, "embed_dim": width, "hidden_size": hidden, "mlp_ratio": 2, "num_heads": 2,
                      "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}, overrides, "vision_config")
    text = _merged({**_qwen_text(tokenizer, text_layers, hidden),
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                        "mrope_section": _mrope_section(hidden // 4)}}, overrides, "text_config")
    config = Qwen2VLConfig(vision_config=vision, text_config=text, **_qwen_ids(tokenizer), **overrides)
    model = _finish(Qwen2VLForConditionalGeneration, config)
    return model, _qwen_processor(config, tokenizer, Qwen2VLProcessor, Qwen2VLVideoProcessor, {})


def _qwen2_5_vl(tokenizer: Any, text_layers: int, hidden: int, overrides: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLVideoProcessor,
    )

    width = hidden // 2
    # window_size is in pixels: 56 px = 2x2 merged tokens (patch 14, merge 2), so a tiny grid splits into windows.
    vision = _merged({"depth": 2, "hidden_size": width, "intermediate_size": 2 * width, "num_heads": 2,
                      "out_hidden_size": hidden, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "window_size": 56, "fullatt_block_indexes": [1]}, overrides, "vision_config")
    text = _merged({**_qwen_text(tokenizer, text_layers, hidden),
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                        "mrope_section": _mrope_section(hidden // 4)}}, overrides, "text_config")
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **_qwen_ids(tokenizer), **overrides)
    model = _finish(Qwen2_5_VLForConditionalGeneration, config)
    return model, _qwen_processor(config, tokenizer, Qwen2_5_VLProcessor, Qwen2VLVideoProcessor, {})


def _qwen3_vl(tokenizer: Any, text_layers: int, hidden: int, overrides: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor

    width = hidden // 2
    vision = _merged({"depth": 2, "hidden_size": width, "intermediate_size": 2 * width, "num_heads": 2,
                      "out_hidden_size": hidden, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "num_position_embeddings": 64, "deepstack_visual_indexes": [0]}, overrides, "vision_config")
    text = _merged({**_qwen_text(tokenizer, text_layers, hidden), "head_dim": hidden // 4,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_interleaved": True,
                                        "mrope_section": _mrope_section(hidden // 4)}}, overrides, "text_config")
    text.pop("bos_token_id")
    config = Qwen3VLConfig(vision_config=vision, text_config=text, **_qwen_ids(tokenizer), **overrides)
    model = _finish(Qwen3VLForConditionalGeneration, config)
    # Qwen3-VL normalises to [-1, 1] (mean = std = 0.5), unlike Qwen2-VL's CLIP statistics.
    norm = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    return model, _qwen_processor(config, tokenizer, Qwen3VLProcessor, Qwen3VLVideoProcessor, norm)


def _internvl(tokenizer: Any, text_layers: int, hidden: int, overrides: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    width = hidden // 2
    # 56 px tiles of 7 px patches: an 8x8 patch grid, pixel-shuffled (downsample 0.5) to 4x4 = 16 tokens a tile.
    vision = _merged({"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "image_size": 56, "patch_size": 7}, overrides, "vision_config")
    text = _merged({"model_type": "qwen2", **_qwen_text(tokenizer, text_layers, hidden)}, overrides, "text_config")
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=_id(tokenizer, "<IMG_CONTEXT>"),
                            downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
                            **overrides)
    model = _finish(InternVLForConditionalGeneration, config)
    side = config.vision_config.image_size[0]
    patch = config.vision_config.patch_size[0]
    square = {"height": side, "width": side}
    # 1..6 tiles: a 70x100 image takes 2x3 tiles (w x h) and a thumbnail; 64x64 a single tile and no thumbnail.
    image_processor = GotOcr2ImageProcessor(size=square, crop_to_patches=False, min_patches=1, max_patches=6)
    video_processor = InternVLVideoProcessor(size=square)
    seq = int((side // patch) ** 2 * config.downsample_ratio**2)
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  video_processor=video_processor, image_seq_length=seq,
                                  chat_template=tokenizer.chat_template)
    return model, processor


def _gemma3(tokenizer: Any, text_layers: int, hidden: int, overrides: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    width = hidden // 2
    # 64 px at 8 px patches: an 8x8 SigLIP grid, pooled 2x2 to 4x4 = 16 soft tokens (Gemma 3: 64x64 pooled 4x4).
    vision = _merged({"model_type": "siglip_vision_model", "hidden_size": width, "intermediate_size": 2 * width,
                      "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 64, "patch_size": 8,
                      "vision_use_head": False}, overrides, "vision_config")
    # local and global layers alternate, with a 12-token window that the test prompts overrun
    text = _merged({"vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 2 * hidden,
                    "num_hidden_layers": text_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "head_dim": hidden // 4, "query_pre_attn_scalar": hidden // 4, "sliding_window": 12,
                    "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention"
                                    for i in range(text_layers)],
                    "max_position_embeddings": 1024, "pad_token_id": tokenizer.pad_token_id,
                    "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id},
                   overrides, "text_config")
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=16,
                          boi_token_index=_id(tokenizer, "<start_of_image>"),
                          eoi_token_index=_id(tokenizer, "<end_of_image>"),
                          image_token_index=_id(tokenizer, "<image_soft_token>"), **overrides)
    model = _finish(Gemma3ForConditionalGeneration, config)
    side = config.vision_config.image_size
    image_processor = Gemma3ImageProcessor(size={"height": side, "width": side}, image_mean=[0.5] * 3,
                                           image_std=[0.5] * 3)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                image_seq_length=config.mm_tokens_per_image, chat_template=tokenizer.chat_template)
    return model, processor


_BUILDERS: dict[str, Callable[[Any, int, int, dict[str, Any]], tuple[Any, Any]]] = {
    "llava": _llava, "llava_next": _llava_next, "llava_onevision": _llava_onevision,
    "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl, "qwen3_vl": _qwen3_vl, "internvl": _internvl,
    "gemma3": _gemma3,
}
