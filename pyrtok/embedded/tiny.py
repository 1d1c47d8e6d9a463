"""The tiny LLaVA that ``pyrtok train-vlm`` trains: its construction, its dense heads, and the two as one module.

The model is a HF ``LlavaForConditionalGeneration`` (CLIP vision tower, 2-layer projector, Llama decoder)
with a word-level tokenizer over the shapes benchmark's words (:func:`~pyrtok.data.conversations.vocabulary`);
both save with ``save_pretrained``, so :meth:`PyramidVLM.from_pretrained` and plain transformers load it
offline. :class:`DenseHeads` are linear per-patch classifiers that teach the tower what each patch shows and
where it is, plus a multi-label head on its [CLS] token that teaches [CLS] what the whole scene holds (so that
[CLS] attention means something, as in CLIP-style towers; :func:`cls_focus` measures it); :class:`Trainee`
holds the LLaVA and the heads so that one forward serves both training stages.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyrtok.allocators import Allocator
from pyrtok.data.conversations import answer_labels, conversation, vocabulary
from pyrtok.data.shapes_vqa import SCENE_LABELS, TARGETS
from pyrtok.embedded.tokenizer import word_tokenizer
from pyrtok.vlm.adapter import PyramidVLM

__all__ = ["DenseHeads", "Trainee", "build", "cls_focus"]


def build(config: dict[str, Any]) -> tuple[nn.Module, Any]:
    """A fresh (``LlavaForConditionalGeneration``, tokenizer) pair from ``config['model']``.

    ``config['init']['vision_tower']``, if set, names a saved ``CLIPVisionModel`` folder (a ``pyrtok pretrain``
    encoder) whose weights replace the fresh tower's. ``model.stock_prompts`` adds the words of stock
    lmms-eval prompts to the tokenizer (:func:`~pyrtok.data.conversations.vocabulary`). The initial weights come
    from torch's global RNG: seed it first for a reproducible model.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    m = config["model"]
    tokenizer = word_tokenizer(vocabulary(stock_prompts=bool(m.get("stock_prompts", False))))
    vision = CLIPVisionConfig(hidden_size=m["vision_hidden"], intermediate_size=m["vision_intermediate"],
                              num_hidden_layers=m["vision_layers"], num_attention_heads=m["vision_heads"],
                              image_size=m["image_size"], patch_size=m["patch_size"])
    text = LlamaConfig(hidden_size=m["text_hidden"], intermediate_size=m["text_intermediate"],
                       num_hidden_layers=m["text_layers"], num_attention_heads=m["text_heads"],
                       num_key_value_heads=m["text_heads"], vocab_size=len(tokenizer), max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
                       initializer_range=m["text_init_std"],
                       rope_theta=float(m["text_rope_theta"]))
    model = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=m["feature_layer"], projector_hidden_act="gelu",
    ))
    if config["init"]["vision_tower"]:
        pretrained = CLIPVisionModel.from_pretrained(config["init"]["vision_tower"])
        model.model.vision_tower.load_state_dict(pretrained.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


class DenseHeads(nn.Module):
    """Linear per-patch classifiers on level-0 tokens: what each patch shows and where it is.

    The scene heads predict :data:`~pyrtok.data.shapes_vqa.TARGETS`; the position heads predict the patch's
    row and column in the ``grid`` x ``grid`` patch grid, so the features keep their location even when an
    allocator drops tokens and the language model no longer sees them in grid order. The scene head
    (:meth:`scene_loss`) reads the [CLS] token instead and predicts the scene's
    :data:`~pyrtok.data.shapes_vqa.SCENE_LABELS`.
    """

    def __init__(self, dim: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.heads = nn.ModuleDict({name: nn.Linear(dim, classes) for name, classes in TARGETS.items()})
        self.position = nn.ModuleDict({name: nn.Linear(dim, grid) for name in ("row", "col")})
        # normalised first: [CLS] is read from the residual stream of the feature layer, before any final norm
        self.scene = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, len(SCENE_LABELS)))

    def scene_loss(self, cls: Tensor, labels: Tensor) -> Tensor:
        """Multi-label loss of the scene head for (B, D) [CLS] features and (B, K) multi-hot ``labels``.

        A binary cross-entropy per label, positives and negatives weighing half each per label and batch (most
        labels are absent from most scenes, so an unweighted loss would be won by predicting "absent").
        """
        if cls.dim() != 2 or labels.shape != (cls.shape[0], len(SCENE_LABELS)):
            raise ValueError(f"cls must be (B, D) and labels (B, {len(SCENE_LABELS)}), got {tuple(cls.shape)} and "
                             f"{tuple(labels.shape)}")
        loss = F.binary_cross_entropy_with_logits(self.scene(cls), labels.float(), reduction="none")
        positive = labels.float()
        parts = [(loss * w).sum() / w.sum() for w in (positive, 1 - positive) if w.sum() > 0]
        return sum(parts) / len(parts)

    def forward(self, features: Tensor, targets: dict[str, Tensor]) -> Tensor:
        """Mean loss over the six heads for (B, G*G, D) features and ``{name: (B, G, G)}`` scene targets.

        Scene heads use a class-balanced cross-entropy: patches with content (target > 0) and empty patches
        weigh half each, so a one-patch dot counts.
        """
        if features.shape[1] != self.grid**2:
            raise ValueError(f"features must hold {self.grid}x{self.grid} level-0 tokens, got {features.shape[1]}")
        losses = []
        for name, head in self.heads.items():
            target = targets[name].flatten(1)
            loss = F.cross_entropy(head(features).flatten(0, 1), target.flatten(), reduction="none")
            positive = (target.flatten() > 0).float()
            parts = [(loss * w).sum() / w.sum() for w in (positive, 1 - positive) if w.sum() > 0]
            losses.append(sum(parts) / len(parts))
        cells = torch.arange(self.grid**2, device=features.device)
        for name, target in (("row", cells // self.grid), ("col", cells % self.grid)):
            logits = self.position[name](features)
            losses.append(F.cross_entropy(logits.flatten(0, 1), target.repeat(features.shape[0])))
        return sum(losses) / len(losses)


class Trainee(nn.Module):
    """The LLaVA and the dense heads as one module, so one (DDP-wrapped) forward serves both stages.

    Its state dict is the LLaVA's under ``llava.`` and the heads' under ``heads.`` (the layout of
    ``train-vlm`` checkpoints, which ``pyrtok export-vlm`` reads).
    """

    def __init__(self, llava: nn.Module, tokenizer: Any, levels: int) -> None:
        super().__init__()
        self.llava = llava
        vision = llava.config.vision_config
        self.heads = DenseHeads(vision.hidden_size, vision.image_size // vision.patch_size)
        self.tokenizer, self.levels = tokenizer, levels
        self._vlms: dict[str, PyramidVLM] = {}  # a plain dict: views share the LLaVA, not registered twice

    def vlm(self, allocator: str | Allocator) -> PyramidVLM:
        """A :class:`PyramidVLM` view of the LLaVA with ``allocator`` (a registered name or an allocator instance;
        cached; shares the weights)."""
        key = allocator if isinstance(allocator, str) else f"{type(allocator).__name__}@{id(allocator)}"
        if key not in self._vlms:
            self._vlms[key] = PyramidVLM(self.llava, self.tokenizer, allocator=allocator, levels=self.levels)
        return self._vlms[key]

    def forward(
        self,
        images: Tensor,
        targets: dict[str, Tensor],
        items: list[dict] | None = None,
        allocator: str | Allocator = "all",
        budgets: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(dense loss, scene loss, answer loss, (B,) kept counts) for (B, 3, H, W) images; the last two are None
        without ``items`` (stage 1).

        ``targets``: ``{name: (B, G, G)}`` per-patch targets and, for the scene loss of the [CLS] head,
        ``"scene"``: (B, K) multi-hot scene labels (without them the scene loss is a constant 0); ``items``: one
        question (with its ``"more"`` turns) per image, trained as a
        :func:`~pyrtok.data.conversations.conversation` with the loss on the answers; ``budgets``: (B,) tokens
        each image keeps. The tower encodes once for all losses. While the tower is frozen it runs without
        autograd and the dense and scene losses are constant 0s.
        """
        vlm = self.vlm(allocator)
        tower_trains = any(p.requires_grad for p in self.llava.model.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and tower_trains):
            prepared = vlm.encoder.prepare(images)
            encoded = vlm.encode(prepared)
        tokens = encoded.tokens
        level0 = tokens.features[:, tokens.level_slices[0]]
        dense = self.heads(level0, targets) if tower_trains else level0.new_zeros(())
        scored = tower_trains and "scene" in targets and tokens.cls is not None
        scene = self.heads.scene_loss(tokens.cls[:, 0], targets["scene"]) if scored else level0.new_zeros(())
        if items is None:
            return dense, scene, None, None
        out = vlm(prepared, [conversation(i) for i in items], labels=lambda ids: answer_labels(ids, self.tokenizer),
                  budget=budgets, generator=generator, encoded=encoded)
        return dense, scene, out.loss, out.counts


@torch.no_grad()
def cls_focus(vlm: PyramidVLM, images: Tensor, covered: Tensor) -> dict[str, float]:
    """How much of the tower's [CLS] attention falls on scene content, against the area that content covers.

    Args:
        vlm: the model whose encoder captures [CLS] attention at its feature layer (``tokens.attention``).
        images: (B, 3, H, W) images in [0, 1].
        covered: (B, G, G) bool, the level-0 patches showing content (objects, the label, the dots).

    Returns:
        ``{"mass": share of the level-0 [CLS] attention on covered patches, "area": share of patches covered,
        "lift": mass / area}`` over the batch: a [CLS] that reads the scene has a lift well above 1, one that
        attends anywhere about 1.
    """
    tokens = vlm.encode(vlm.encoder.prepare(images)).tokens
    if tokens.attention is None:
        raise ValueError("vlm's encoder captures no [CLS] attention (tokens.attention is None)")
    attention = tokens.attention[:, tokens.level_slices[0]].float()
    covered = covered.to(attention.device).flatten(1).float()
    if covered.shape != attention.shape:
        raise ValueError(f"covered must be (B, G, G) with B*G*G = {tuple(attention.shape)}, got {tuple(covered.shape)}")
    mass = float(((attention * covered).sum(1) / attention.sum(1)).mean())
    area = float(covered.mean())
    return {"mass": mass, "area": area, "lift": mass / area if area else float(np.nan)}
