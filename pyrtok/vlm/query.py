"""Query encoders: a question as a vector, and the tokens in the same space, for allocators that read the query.

An encoder has two methods: ``encode(texts) -> (B, D_q)`` and ``align(tokens) -> tokens`` (the tokens with
``aligned`` set: every token in the query's space, what :func:`pyrtok.signals.query_relevance` and CDPruner compare
the query with). Two kinds:

- :class:`~pyrtok.encoders.text.ClipQueryEncoder`: a CLIP model's text tower and joint space (``"clip:<path or
  hub id>"``). For LLaVA-1.5 this is the CLIP the tower came from, as CDPruner's authors load it.
- :class:`LanguageQueryEncoder` (``"language"``): the VLM's own language model: the mean of the question's unit-norm
  input embeddings, against every token's language-model input (``tokens.embeddings``). The rule for models with
  no CLIP text tower (the embedded models, Qwen, InternVL).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyrtok.tokens import MultiScaleTokens

__all__ = ["SHORT_ANSWER", "LanguageQueryEncoder", "QueryEncoder", "bare_question", "resolve_query_encoder"]

SHORT_ANSWER = "Answer the question using a single word or phrase."
"""LLaVA-1.5's short-answer instruction (stock lmms-eval tasks' post_prompt), which CDPruner's scripts strip."""


def bare_question(text: str) -> str:
    """``text`` without LLaVA-1.5's short-answer instruction (and the whitespace before it), as CDPruner's
    evaluation scripts pass questions to the text tower; other text stays.

    Example:
        >>> bare_question("What is it? Answer the question using a single word or phrase.")
        'What is it?'
    """
    stripped = text.rstrip()
    return stripped[: -len(SHORT_ANSWER)].rstrip() if stripped.endswith(SHORT_ANSWER) else text


class QueryEncoder(Protocol):
    def encode(self, texts: Sequence[str]) -> Tensor: ...

    def align(self, tokens: MultiScaleTokens) -> MultiScaleTokens: ...


class LanguageQueryEncoder:
    """A question as the language model reads it: the mean of its tokens' unit-norm input embeddings.

    Args:
        model: the VLM (anything with ``get_input_embeddings()``).
        tokenizer: its tokenizer; special tokens (BOS) are left out.
    """

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> Tensor:
        """``texts`` -> (B, D_lm) the mean of each text's unit-norm input embeddings (zeros for an empty text)."""
        if isinstance(texts, str) or not texts:
            raise ValueError(f"texts must be a non-empty list of strings, got {texts!r}")
        table = self.model.get_input_embeddings()
        out = []
        for text in texts:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                out.append(torch.zeros(table.embedding_dim, device=table.weight.device))
                continue
            embeds = table(torch.tensor(ids, device=table.weight.device)).float()
            out.append(F.normalize(embeds, dim=-1).mean(0))
        return torch.stack(out)

    def align(self, tokens: MultiScaleTokens) -> MultiScaleTokens:
        """The tokens with ``aligned`` = their language-model inputs (``embeddings``, else the features)."""
        return tokens.with_aligned(tokens.embeddings if tokens.embeddings is not None else tokens.features)


def resolve_query_encoder(spec: Any, model: nn.Module, tokenizer: Any) -> QueryEncoder | None:
    """None, ``"language"``, ``"clip:<path or hub id>"`` (a HF ``CLIPModel`` and its tokenizer; loading from the
    hub needs a network) or an encoder object -> the encoder (None: no query space)."""
    if spec is None or (hasattr(spec, "encode") and hasattr(spec, "align")):
        return spec
    if spec == "language":
        return LanguageQueryEncoder(model, tokenizer)
    if isinstance(spec, str) and spec.startswith("clip:") and len(spec) > 5:
        from transformers import AutoTokenizer, CLIPModel

        from pyrtok.encoders.text import ClipQueryEncoder

        path = spec[5:]
        clip = CLIPModel.from_pretrained(path).to(next(model.parameters()).device).eval()
        return ClipQueryEncoder(clip, AutoTokenizer.from_pretrained(path))
    raise ValueError(f"query_encoder must be None, 'language', 'clip:<path or hub id>' or an object with encode() "
                     f"and align(), got {spec!r}")
