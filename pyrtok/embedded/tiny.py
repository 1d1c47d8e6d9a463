"""The tiny VLMs that ``pyrtok train-vlm`` trains: their construction, their dense heads, and the two as one module.

Two architectures (``model.architecture``), each a HF model with a word-level tokenizer over the shapes benchmark's
words (:func:`~pyrtok.data.conversations.vocabulary`), saved with ``save_pretrained`` so that
:meth:`PyramidVLM.from_pretrained` and plain transformers load it offline:

``llava``
    ``LlavaForConditionalGeneration``: a CLIP tower, a 2-layer projector, a Llama decoder; LLaVA-1.5's prompt
    ``USER: <image> ... ASSISTANT:`` (no chat template; the tower's square, no image processor). Level-0 tokens
    are the tower's patch states at its feature layer; the scene head reads its [CLS] token there.
``qwen2_5_vl``
    ``Qwen2_5_VLForConditionalGeneration``: the native-resolution ViT (patch 14, temporal patch 2, window
    attention in all blocks but ``model.fullatt_blocks``, 2-D RoPE), the 2x2 patch merger (Qwen's projector), a
    Qwen2 decoder with M-RoPE; saved with its own ``Qwen2_5_VLProcessor``, whose ``Qwen2VLImageProcessor`` has
    its pixel range fixed to one square of ``model.resolution`` pixels (so every shapes scene becomes the same
    merged grid), and Qwen's ChatML template with its default system message. Level-0 tokens are the merged
    tokens (after the merger, at the language model's width), which is what the language model and every
    allocator see; the tower has no [CLS], so the scene head reads the mean of the merged tokens.

What differs between the two is an :class:`Architecture` (:data:`ARCHITECTURES`): how to build the model and
its processor, which modules are the tower, what the level-0 grid and the scene feature are, and how a
conversation is written and its answers found. Everything else (the heads, :class:`Trainee`, the training loop
of :mod:`pyrtok.embedded.train`) is one code path. :class:`DenseHeads` are linear per-patch classifiers that
teach the tower what each level-0 token shows and where it is, plus a multi-label scene head that teaches the
scene feature what the whole scene holds (for [CLS]: so that [CLS] attention means something, as in CLIP-style
towers; :func:`cls_focus` measures it); :class:`Trainee` holds the VLM and the heads so that one forward serves
both training stages.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyrtok.allocators import Allocator
from pyrtok.data.conversations import PROMPT, answer_labels, conversation, vocabulary
from pyrtok.data.shapes_vqa import SCENE_LABELS, TARGETS
from pyrtok.embedded.tokenizer import word_tokenizer
from pyrtok.tokens import MultiScaleTokens
from pyrtok.vlm.adapter import PyramidVLM

__all__ = ["ARCHITECTURES", "Architecture", "DenseHeads", "Trainee", "architecture", "build", "chat_answer_labels",
           "cls_focus"]

QWEN_SYSTEM = "You are a helpful assistant."
"""The default system message of Qwen2.5-VL's chat template (its words are in the tokenizer)."""


def _vocabulary(config: dict[str, Any]) -> list[str]:
    """The words of the tokenizer ``config`` builds: the benchmark's, and those of the prompts and wordings it
    trains on."""
    return vocabulary(stock_prompts=bool(config["model"].get("stock_prompts", False)),
                      wording=config.get("train", {}).get("wording"))


class Architecture:
    """What one trainable architecture does differently; one instance per name in :data:`ARCHITECTURES`.

    Attributes:
        name: the ``model.architecture`` value.
        prefix: the name of the VLM inside :class:`Trainee`, so the prefix of its keys in checkpoints.
        has_cls: whether the tower has a [CLS] token whose attention :func:`cls_focus` can measure.
    """

    name: ClassVar[str] = ""
    prefix: ClassVar[str] = ""
    has_cls: ClassVar[bool] = False

    def build(self, config: dict[str, Any]) -> tuple[nn.Module, Any]:
        """A fresh (model, processor) from ``config['model']``; weights from torch's global RNG."""
        raise NotImplementedError

    def grid(self, m: dict[str, Any]) -> int:
        """The side of the level-0 token grid of a ``model.image_size`` scene, for the ``model`` section ``m``."""
        raise NotImplementedError

    def width(self, model: nn.Module) -> int:
        """The width of level-0 tokens (what the dense heads read)."""
        raise NotImplementedError

    def tower(self, model: nn.Module) -> list[nn.Module]:
        """The modules stage 1 trains and ``train.freeze_vision_steps`` freezes."""
        raise NotImplementedError

    def vision(self, model: nn.Module) -> nn.Module:
        """Everything :meth:`PyramidVLM.encode` runs (it runs with autograd while any of it trains)."""
        raise NotImplementedError

    def scene_features(self, tokens: MultiScaleTokens) -> Tensor | None:
        """(B, D) the feature the scene head reads, or None when the tower gives none."""
        raise NotImplementedError

    def conversation(self, processor: Any, item: dict) -> str:
        """The training text of ``item`` (a question with its ``"more"`` turns), image in the first turn."""
        raise NotImplementedError

    def labels(self, input_ids: Tensor, processor: Any) -> Tensor:
        """(B, T) labels of tokenised :meth:`conversation` texts: the answers kept, the rest -100."""
        raise NotImplementedError

    def prompt(self, vlm: PyramidVLM, question: str) -> str:
        """The evaluation prompt of ``question`` (what the benchmark harness asks the model)."""
        raise NotImplementedError


class Llava(Architecture):
    """LLaVA-1.5: a CLIP tower, a 2-layer projector, a Llama decoder (see the module notes)."""

    name, prefix, has_cls = "llava", "llava", True

    def build(self, config: dict[str, Any]) -> tuple[nn.Module, Any]:
        from transformers import (
            CLIPVisionConfig,
            CLIPVisionModel,
            LlamaConfig,
            LlavaConfig,
            LlavaForConditionalGeneration,
        )

        m = config["model"]
        tokenizer = word_tokenizer(_vocabulary(config))
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
        return model, tokenizer

    def grid(self, m: dict[str, Any]) -> int:
        return m["image_size"] // m["patch_size"]

    def width(self, model: nn.Module) -> int:
        return model.config.vision_config.hidden_size

    def tower(self, model: nn.Module) -> list[nn.Module]:
        return [model.model.vision_tower]

    def vision(self, model: nn.Module) -> nn.Module:
        return model.model.vision_tower  # the projector runs after selection, outside encode

    def scene_features(self, tokens: MultiScaleTokens) -> Tensor | None:
        return None if tokens.cls is None else tokens.cls[:, 0]

    def conversation(self, processor: Any, item: dict) -> str:
        return conversation(item)

    def labels(self, input_ids: Tensor, processor: Any) -> Tensor:
        return answer_labels(input_ids, processor)

    def prompt(self, vlm: PyramidVLM, question: str) -> str:
        return PROMPT.format(question=question)


class Qwen25VL(Architecture):
    """Qwen2.5-VL: the native-resolution ViT with window attention, the 2x2 merger, a Qwen2 decoder with M-RoPE,
    its own processor and ChatML template (see the module notes)."""

    name, prefix, has_cls = "qwen2_5_vl", "qwen", False

    def build(self, config: dict[str, Any]) -> tuple[nn.Module, Any]:
        from transformers import (
            Qwen2_5_VLConfig,
            Qwen2_5_VLForConditionalGeneration,
            Qwen2_5_VLProcessor,
            Qwen2VLImageProcessor,
            Qwen2VLVideoProcessor,
        )

        from pyrtok.embedded.tokenizer import QWEN_SPECIAL, chatml_template

        m = config["model"]
        if config["init"]["vision_tower"]:
            raise ValueError("init.vision_tower (a pretrained CLIP tower) applies to model.architecture 'llava' only")
        # the default system message and the ChatML role names are words of every Qwen prompt
        words = _vocabulary(config) + sorted(
            {"system", "user", "assistant", *QWEN_SYSTEM.lower().replace(".", " .").split()})
        tokenizer = word_tokenizer(words, special=QWEN_SPECIAL, split_digits=True,
                                   chat_template=chatml_template(QWEN_SYSTEM))
        ids = {key: tokenizer.convert_tokens_to_ids(QWEN_SPECIAL[role]) for key, role in
               (("image_token_id", "image"), ("video_token_id", "video"), ("vision_start_token_id", "vision_start"),
                ("vision_end_token_id", "vision_end"))}
        head_dim = m["text_hidden"] // m["text_heads"]
        half, spatial = head_dim // 2, 3 * (head_dim // 2) // 8  # Qwen's 2:3:3 split of (t, h, w) frequencies
        vision = {"depth": m["vision_layers"], "hidden_size": m["vision_hidden"],
                  "intermediate_size": m["vision_intermediate"], "num_heads": m["vision_heads"],
                  "out_hidden_size": m["text_hidden"], "patch_size": m["patch_size"],
                  "spatial_merge_size": m["merge_size"], "temporal_patch_size": m["temporal_patch_size"],
                  "window_size": m["window_size"], "fullatt_block_indexes": list(m["fullatt_blocks"]),
                  "initializer_range": m["text_init_std"]}
        text = {"vocab_size": len(tokenizer), "hidden_size": m["text_hidden"],
                "intermediate_size": m["text_intermediate"], "num_hidden_layers": m["text_layers"],
                "num_attention_heads": m["text_heads"], "num_key_value_heads": m["text_kv_heads"] or m["text_heads"],
                "max_position_embeddings": 2048, "initializer_range": m["text_init_std"],
                "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id,
                "rope_parameters": {"rope_type": "default", "rope_theta": float(m["text_rope_theta"]),
                                    "mrope_section": [half - 2 * spatial, spatial, spatial]}}
        qwen = Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=True, **ids)
        qwen._attn_implementation = "sdpa"
        model = Qwen2_5_VLForConditionalGeneration(qwen)
        pixels = m["resolution"] ** 2  # min = max: every square image maps to one grid
        sizes = {"size": {"shortest_edge": pixels, "longest_edge": pixels}, "patch_size": m["patch_size"],
                 "temporal_patch_size": m["temporal_patch_size"], "merge_size": m["merge_size"]}
        processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tokenizer,
                                        video_processor=Qwen2VLVideoProcessor(**sizes),
                                        chat_template=tokenizer.chat_template)
        return model, processor

    def grid(self, m: dict[str, Any]) -> int:
        return m["resolution"] // (m["patch_size"] * m["merge_size"])

    def width(self, model: nn.Module) -> int:
        return model.config.vision_config.out_hidden_size

    def tower(self, model: nn.Module) -> list[nn.Module]:
        # the merger is Qwen's projector: like LLaVA's, it trains with the language model when the tower is frozen
        visual = model.model.visual
        return [visual.patch_embed, visual.blocks]

    def vision(self, model: nn.Module) -> nn.Module:
        return model.model.visual

    def scene_features(self, tokens: MultiScaleTokens) -> Tensor | None:
        return tokens.features[:, tokens.level_slices[0]].mean(1)

    def conversation(self, processor: Any, item: dict) -> str:
        messages = []
        for k, turn in enumerate([item, *item.get("more", [])]):
            text = turn.get("text", turn["question"])
            content = [{"type": "image"}, {"type": "text", "text": text}] if k == 0 else text
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": turn["answer"]}]
        return processor.apply_chat_template(messages, tokenize=False)

    def labels(self, input_ids: Tensor, processor: Any) -> Tensor:
        return chat_answer_labels(input_ids, processor.tokenizer)

    def prompt(self, vlm: PyramidVLM, question: str) -> str:
        return vlm.chat_prompt(question)


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (Llava(), Qwen25VL())}
"""The trainable architectures by their ``model.architecture`` name."""


def architecture(config: dict[str, Any]) -> Architecture:
    """The :class:`Architecture` of ``config['model']['architecture']``."""
    name = config["model"]["architecture"]
    if name not in ARCHITECTURES:
        raise ValueError(f"model.architecture must be one of {sorted(ARCHITECTURES)}, got {name!r}")
    return ARCHITECTURES[name]


def build(config: dict[str, Any]) -> tuple[nn.Module, Any]:
    """A fresh (model, processor) pair of ``config['model']['architecture']`` from ``config['model']``.

    For ``llava`` the processor is the tokenizer alone (the model takes the tower's square); for ``qwen2_5_vl``
    it is the model's ``Qwen2_5_VLProcessor``. ``config['init']['vision_tower']`` (``llava`` only), if set, names
    a saved ``CLIPVisionModel`` folder (a ``pyrtok pretrain`` encoder) whose weights replace the fresh tower's.
    ``model.stock_prompts`` adds the words of stock lmms-eval prompts to the tokenizer, and a ``train.wording``
    that asks open spatial forms adds their words (:func:`~pyrtok.data.conversations.vocabulary`). The initial
    weights come from torch's global RNG: seed it first for a reproducible model.
    """
    model, processor = architecture(config).build(config)
    tokenizer = getattr(processor, "tokenizer", processor)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor


def chat_answer_labels(input_ids: Tensor, tokenizer: Any) -> Tensor:
    """(B, T) labels of tokenised ChatML conversations that keep every assistant answer and mask the rest (-100).

    An answer is the tokens after each ``<|im_start|> assistant`` up to and including its ``<|im_end|>`` (the
    tokenizer's eos); padding, the system and user turns and image placeholders are masked.
    """
    return answer_labels(input_ids, tokenizer, opening=("<|im_start|>", "assistant"))


class DenseHeads(nn.Module):
    """Linear per-patch classifiers on level-0 tokens: what each patch shows and where it is.

    The scene heads predict :data:`~pyrtok.data.shapes_vqa.TARGETS`; the position heads predict the patch's
    row and column in the ``grid`` x ``grid`` patch grid, so the features keep their location even when an
    allocator drops tokens and the language model no longer sees them in grid order. The scene head
    (:meth:`scene_loss`) reads one feature per image instead ([CLS], or the mean of the merged tokens: see
    :meth:`Architecture.scene_features`) and predicts the scene's :data:`~pyrtok.data.shapes_vqa.SCENE_LABELS`.
    """

    def __init__(self, dim: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.heads = nn.ModuleDict({name: nn.Linear(dim, classes) for name, classes in TARGETS.items()})
        self.position = nn.ModuleDict({name: nn.Linear(dim, grid) for name in ("row", "col")})
        # normalised first: [CLS] is read from the residual stream of the feature layer, before any final norm
        self.scene = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, len(SCENE_LABELS)))

    def scene_loss(self, cls: Tensor, labels: Tensor) -> Tensor:
        """Multi-label loss of the scene head for (B, D) scene features and (B, K) multi-hot ``labels``.

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
    """The VLM and the dense heads as one module, so one (DDP-wrapped) forward serves both stages.

    Its state dict is the VLM's under its architecture's prefix (``llava.`` or ``qwen.``) and the heads' under
    ``heads.`` (the layout of ``train-vlm`` checkpoints, which ``pyrtok export-vlm`` reads).

    Args:
        model, processor: from :func:`build` (the processor of a LLaVA is its tokenizer).
        config: the run's config: ``model.architecture``, the level-0 grid and ``model.levels`` (the pyramid
            levels of the :class:`PyramidVLM` views).
    """

    def __init__(self, model: nn.Module, processor: Any, config: dict[str, Any]) -> None:
        super().__init__()
        self.arch = architecture(config)
        self.add_module(self.arch.prefix, model)
        self.heads = DenseHeads(self.arch.width(model), self.arch.grid(config["model"]))
        self.processor, self.levels = processor, config["model"]["levels"]
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self._vlms: dict[str, PyramidVLM] = {}  # a plain dict: views share the model, not registered twice

    @property
    def model(self) -> nn.Module:
        """The VLM (registered under the architecture's prefix)."""
        return getattr(self, self.arch.prefix)

    def vlm(self, allocator: str | Allocator) -> PyramidVLM:
        """A :class:`PyramidVLM` view of the model with ``allocator`` (a registered name or an allocator instance;
        cached; shares the weights)."""
        key = allocator if isinstance(allocator, str) else f"{type(allocator).__name__}@{id(allocator)}"
        if key not in self._vlms:
            self._vlms[key] = PyramidVLM(self.model, self.processor, allocator=allocator, levels=self.levels)
        return self._vlms[key]

    def tower_trains(self) -> bool:
        """Whether any tower parameter trains (stage 1, or stage 2 after ``train.freeze_vision_steps``)."""
        return any(p.requires_grad for module in self.arch.tower(self.model) for p in module.parameters())

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

        ``targets``: ``{name: (B, G, G)}`` per-patch targets at the level-0 grid and, for the scene head,
        ``"scene"``: (B, K) multi-hot scene labels (without them the scene loss is a constant 0); ``items``: one
        question (with its ``"more"`` turns) per image, trained as the architecture's conversation with the loss
        on the answers; ``budgets``: (B,) tokens each image keeps. The images go through the model's own pixel
        path (:meth:`PyramidVLM.encode`) once for all losses. While the tower is frozen the dense and scene
        losses are constant 0s, and encoding runs without autograd unless part of it (Qwen's merger) trains.
        """
        vlm = self.vlm(allocator)
        tower_trains = self.tower_trains()
        vision_trains = any(p.requires_grad for p in self.arch.vision(self.model).parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and vision_trains):
            encoded = vlm.encode(images)
        tokens = encoded.tokens
        level0 = tokens.features[:, tokens.level_slices[0]]
        dense = self.heads(level0, targets) if tower_trains else level0.new_zeros(())
        scene_features = self.arch.scene_features(tokens) if tower_trains and "scene" in targets else None
        scene = self.heads.scene_loss(scene_features, targets["scene"]) if scene_features is not None \
            else level0.new_zeros(())
        if items is None:
            return dense, scene, None, None
        out = vlm(None, [self.arch.conversation(self.processor, i) for i in items],
                  labels=lambda ids: self.arch.labels(ids, self.processor), budget=budgets, generator=generator,
                  encoded=encoded)
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
