"""A masked autoencoder whose encoder is a HuggingFace CLIP vision tower.

The encoder is an ordinary ``CLIPVisionModel``: after pretraining, its ``state_dict`` loads unchanged
into the vision tower of a ``LlavaForConditionalGeneration`` with the same vision config. During
pretraining it sees the [CLS] token and a random subset of the patch tokens (their position embeddings
included); a light decoder gets the encoded visible tokens back in place, learned mask tokens for the rest,
fixed 2D sine-cosine positions, and predicts every patch's pixels. Like facebookresearch/mae, the model owns
its loss (an :class:`~pyrtok.pretrain.objectives.Objective`): ``forward`` returns it with the prediction and
the mask, and a training loop only calls the model and steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pyrtok.encoders.towers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from pyrtok.pretrain.objectives import Objective, patchify, unpatchify

__all__ = ["MAEOutput", "MaskedAutoencoder", "patchify", "unpatchify"]


def sincos_positions(height: int, width: int, dim: int) -> Tensor:
    """(1 + height * width, dim) fixed 2D sine-cosine embeddings; row 0 (the [CLS] slot) is zero."""
    if dim % 4:
        raise ValueError(f"decoder width must be a multiple of 4 for 2D sine-cosine positions, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for grid in (rows.flatten(), cols.flatten()):
        angles = grid[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    table = torch.cat(parts, dim=1).float()
    return torch.cat([torch.zeros(1, dim), table], dim=0)


@dataclass
class MAEOutput:
    """What :meth:`MaskedAutoencoder.forward` returns.

    Attributes:
        loss: () the objective on the hidden patches, what training minimises.
        pred: (B, P, p*p*3) predicted pixels of every patch (per-patch normalised if the objective's ``norm_pix``).
        mask: (B, P) bool, True where the patch was hidden.
        losses: ``loss`` and its parts (``pixel``, ``lap``), () each, for logging.
    """

    loss: Tensor
    pred: Tensor
    mask: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)


class MaskedAutoencoder(nn.Module):
    """MAE around a HF ``CLIPVisionModel`` encoder.

    Args:
        encoder: the CLIP vision tower to pretrain (any image size / patch size it was configured with).
        decoder_dim, decoder_depth, decoder_heads: the decoder transformer.
        mask_ratio: default fraction of patches hidden from the encoder.
        image_mean, image_std: pixel normalisation applied to [0, 1] inputs before the encoder (the VLM
            must use the same; default OpenAI CLIP's).
        objective: the loss on the hidden patches; default MAE's normalised-pixel MSE (``Objective()``).
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        mask_ratio: float = 0.75,
        image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
        image_std: tuple[float, float, float] = OPENAI_CLIP_STD,
        objective: Objective | None = None,
    ) -> None:
        super().__init__()
        if type(encoder).__name__ != "CLIPVisionModel":
            raise TypeError(f"encoder must be a HF CLIPVisionModel, got {type(encoder).__name__}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        config = encoder.config
        self.encoder = encoder
        self.objective = objective if objective is not None else Objective()
        self.patch_size = config.patch_size
        self.grid = config.image_size // config.patch_size
        self.mask_ratio = mask_ratio
        self.encoder_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder_embed = nn.Linear(config.hidden_size, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("decoder_positions", sincos_positions(self.grid, self.grid, decoder_dim).unsqueeze(0),
                             persistent=False)
        block = nn.TransformerEncoderLayer(decoder_dim, decoder_heads, 4 * decoder_dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.decoder = nn.TransformerEncoder(block, decoder_depth, enable_nested_tensor=False)
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * 3)
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)

    def random_mask(self, batch: int, mask_ratio: float, generator: torch.Generator | None, device) -> Tensor:
        """(B, P) bool, True for hidden patches; exactly round(P * mask_ratio) per sample."""
        patches = self.grid * self.grid
        hidden = round(patches * mask_ratio)
        source = generator.device if generator is not None else device
        noise = torch.rand(batch, patches, generator=generator, device=source).to(device)
        ranks = noise.argsort(1).argsort(1)
        return ranks < hidden

    def forward(
        self, images: Tensor, mask: Tensor | None = None, generator: torch.Generator | None = None
    ) -> MAEOutput:
        """Reconstruct every patch of (B, 3, H, W) images in [0, 1] from the visible ones, and score it.

        Args:
            images: (B, 3, H, W) with H = W = the encoder's image size.
            mask: optional (B, P) bool of hidden patches (same count per sample); random by default.
            generator: random source of the default mask.

        Returns:
            :class:`MAEOutput`: the loss (the model's objective on the hidden patches), the prediction, the mask.
        """
        batch = images.shape[0]
        size = self.grid * self.patch_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"images must have shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
        if mask is None:
            mask = self.random_mask(batch, self.mask_ratio, generator, images.device)
        visible_count = int((~mask[0]).sum())
        if bool(((~mask).sum(1) != visible_count).any()):
            raise ValueError("mask must hide the same number of patches in every sample")
        pixels = (images - self.image_mean) / self.image_std
        embeddings = self.encoder.embeddings(pixels.to(self.decoder_embed.weight.dtype))  # (B, 1 + P, D)
        # Visible patches first, in raster order; the stable sort keeps their order.
        order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
        restore = torch.argsort(order, dim=1)
        patches = embeddings[:, 1:]
        visible = torch.gather(patches, 1, order[:, :visible_count, None].expand(-1, -1, patches.shape[-1]))
        hidden = self.encoder.pre_layrnorm(torch.cat([embeddings[:, :1], visible], dim=1))
        hidden = self.encoder.encoder(inputs_embeds=hidden).last_hidden_state
        tokens = self.decoder_embed(self.encoder_norm(hidden))
        filled = torch.cat([tokens[:, 1:], self.mask_token.expand(batch, mask.shape[1] - visible_count, -1)], dim=1)
        filled = torch.gather(filled, 1, restore[..., None].expand(-1, -1, filled.shape[-1]))
        decoded = self.decoder(torch.cat([tokens[:, :1], filled], dim=1) + self.decoder_positions)
        pred = self.decoder_pred(self.decoder_norm(decoded))[:, 1:]
        # The loss in float32 whatever the caller's autocast: LapLoss's band-pass differences are small.
        with torch.autocast(images.device.type, enabled=False):
            losses = self.objective(pred, mask, images, self.patch_size)
        return MAEOutput(losses["loss"], pred, mask, losses)
