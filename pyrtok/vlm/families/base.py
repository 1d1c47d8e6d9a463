"""What a model family tells the adapter core, and the registry that picks a family from a model's config.

A family is a small class bound to one loaded model and its processor. It knows only what differs between
VLMs: how an image becomes the pixels the model sees (through the model's own image processor), how those
pixels become :class:`~pyrtok.tokens.MultiScaleTokens` in the language model's input space (or the space its
projector maps from), how the kept tokens reach the language model (``mm_encoder_outputs``), and the position
ids of kept tokens. Everything else (allocation, prompt expansion, left padding, forward, generate) is the
core's (:mod:`pyrtok.vlm.adapter`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor, nn

from pyrtok.tokens import MultiScaleTokens, TokenSelection

__all__ = ["Encoded", "Family", "family_for", "register_family", "supported_architectures"]

_FAMILIES: dict[str, type[Family]] = {}


@dataclass
class Encoded:
    """Images of one pixel size, encoded together.

    Attributes:
        tokens: (G, N, D) multi-scale tokens of the G images.
        pixels: (G, 3, H, W) the pixels the model sees, in [0, 1] (for pixel-based signals).
        extras: family data that follows the tokens (for example Qwen3-VL's DeepStack features (G, N, L, D)).
    """

    tokens: MultiScaleTokens
    pixels: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)


class Family:
    """Base class of a model family bound to ``model`` and its ``processor`` (either may hold the tokenizer).

    Subclasses set ``name``, ``architectures`` (the ``*ForConditionalGeneration`` class names they run),
    ``rope`` (``"1d"`` or ``"mrope"``) and implement :meth:`image_pixels`, :meth:`encode` and
    :meth:`kept_features`; M-RoPE families also implement :meth:`image_positions`.
    """

    name: ClassVar[str] = ""
    architectures: ClassVar[tuple[str, ...]] = ()
    rope: ClassVar[str] = "1d"
    fixed_resolution: ClassVar[bool] = False  # True: every image becomes the same number of tokens

    def __init__(self, model: nn.Module, processor: Any, mode: str = "feature", levels: int = 1,
                 **options: Any) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.mode = mode
        self.levels = levels
        if options:
            raise TypeError(f"{type(self).__name__} got unexpected options {sorted(options)}")
        if self.tokenizer is None or not callable(self.tokenizer):
            raise TypeError(f"processor must be a tokenizer or a processor with a .tokenizer, got {processor!r}")
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token for batched, left-padded prompts")

    # -- what every family defines --------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        """The placeholder id that the prompt repeats once per image token."""
        return int(self.model.config.image_token_id)

    @property
    def image_token(self) -> str:
        return self.tokenizer.convert_ids_to_tokens(self.image_token_id)

    @property
    def image_processor(self) -> Any | None:
        """The model's own image processor, or None when only a tokenizer was saved with it."""
        return getattr(self.processor, "image_processor", None)

    def image_pixels(self, image: Image.Image | Tensor) -> Tensor:
        """(3, H, W) in [0, 1]: one image as the model sees it (a PIL image through the model's processor)."""
        raise NotImplementedError

    def encode(self, pixels: Tensor) -> Encoded:
        """(G, 3, H, W) pixels in [0, 1] from :meth:`image_pixels` (one size) -> :class:`Encoded`."""
        raise NotImplementedError

    @property
    def encoding_extras(self) -> tuple[str, ...]:
        """Keys of :attr:`Encoded.extras` that :meth:`kept_features` needs besides the tokens (none by default:
        the tokens alone suffice, so tokens from ``PyramidVLM.encode`` can be passed back as ``tokens=``)."""
        return ()

    def kept_features(self, encoded: Encoded, selection: TokenSelection) -> tuple[list[Tensor], dict[str, list]]:
        """The language-model inputs of the kept tokens: a list of G (K_g, D_lm) tensors, and family extras
        (lists of G entries) that :meth:`encoder_outputs` consumes."""
        raise NotImplementedError

    def encoder_outputs(self, features: list[Tensor], extras: dict[str, list]) -> dict[str, Any]:
        """``mm_encoder_outputs`` for the language model: one entry per image, in prompt order."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"image": BaseModelOutputWithPooling(pooler_output=tuple(features))}

    def vision_flops(self, encoded: Encoded) -> float:
        """Forward FLOPs of the vision tower for one image of ``encoded`` (every level it encoded)."""
        raise NotImplementedError

    def image_vision_flops(self, encoded: Encoded) -> list[float]:
        """Vision-tower FLOPs of each of the G images of ``encoded`` (families whose cost differs per image,
        such as LLaVA-NeXT's lazy tiles, override it)."""
        return [self.vision_flops(encoded)] * encoded.tokens.batch_size

    def selection_vision_seconds(self, encoded: Encoded) -> float:
        """Seconds of vision-tower work that building the kept tokens of ``encoded``'s latest selection took
        (0 unless a family defers encoding until the selection is known, as LLaVA-NeXT's lazy tiles do), so
        that timing can count it as vision rather than language-model time."""
        return 0.0

    def image_positions(self, tokens: MultiScaleTokens, index: Tensor,
                        merged_boxes: Tensor | None = None) -> tuple[Tensor, int]:
        """M-RoPE families: (3, K + M) (t, h, w) offsets of the kept tokens ``index`` (K,), then of the merged
        tokens with boxes ``merged_boxes`` (M, 4), from the image's start position, and how far the text after
        the image advances (as in the unpruned model)."""
        raise NotImplementedError(f"family {self.name!r} uses 1-D positions")

    # -- shared helpers -------------------------------------------------------------------------------
    @staticmethod
    def _pil(image: Image.Image | Tensor) -> Image.Image | None:
        return image.convert("RGB") if isinstance(image, Image.Image) else None

    @staticmethod
    def _check_tensor(image: Tensor) -> Tensor:
        if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be (3, H, W) in [0, 1], got {getattr(image, 'shape', image)}")
        if not image.is_floating_point() or bool(image.isnan().any()):
            raise ValueError("an image tensor must be floating point in [0, 1] without NaN")
        low, high = float(image.min()), float(image.max())
        # A 0-255 or mean/std-normalised tensor would be normalised again by the model's statistics and
        # silently give wrong answers; the small margin admits resampling overshoot.
        if low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(f"an image tensor must be in [0, 1], got values in [{low:.4g}, {high:.4g}] "
                             "(divide 0-255 images by 255)")
        return image.float()


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: make a family reachable by the architectures it lists."""
    for architecture in cls.architectures:
        if architecture in _FAMILIES:
            raise ValueError(f"{architecture} is already handled by {_FAMILIES[architecture].__name__}")
        _FAMILIES[architecture] = cls
    return cls


def supported_architectures() -> list[str]:
    """The ``*ForConditionalGeneration`` classes pyrtok runs, sorted."""
    return sorted(_FAMILIES)


def family_for(model_or_config: Any) -> type[Family]:
    """The family of a loaded model, or of a config (by ``config.architectures``).

    Raises:
        TypeError (a model) or ValueError (a config): naming the architecture and listing the supported ones.
    """
    if isinstance(model_or_config, nn.Module):
        names = [type(model_or_config).__name__]
    else:
        names = list(getattr(model_or_config, "architectures", None) or [])
    for name in names:
        if name in _FAMILIES:
            return _FAMILIES[name]
    shown = names[0] if names else f"a config of model_type {getattr(model_or_config, 'model_type', None)!r}"
    error = TypeError if isinstance(model_or_config, nn.Module) else ValueError
    raise error(f"pyrtok does not support {shown}; supported architectures: {supported_architectures()}")


def unnormalise(pixel_values: Tensor, mean: Any, std: Any) -> Tensor:
    """(..., 3, H, W) normalised pixels -> [0, 1] pixels, by the processor's mean and std."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=pixel_values.device).view(3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=pixel_values.device).view(3, 1, 1)
    return (pixel_values.float() * std + mean).clamp(0, 1)


Hook = Callable[..., Any]
