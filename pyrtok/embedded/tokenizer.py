"""A word-level tokenizer in HuggingFace format, built offline from a word list.

Tiny VLMs trained from scratch (tests, the embedded default model) need a tokenizer that saves with
``save_pretrained`` and loads with ``AutoTokenizer`` without a download: lower-cased words and
punctuation, one id each, plus the special tokens a LLaVA or a Qwen2-VL-family prompt uses (and Qwen's ChatML
chat template).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")

LLAVA_SPECIAL = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "image": "<image>"}
"""The special tokens of a LLaVA-1.5 prompt, by role; ids follow this order."""


def word_tokenizer(words: Iterable[str], image_token: str = "<image>", special: Mapping[str, str] | None = None,
                   split_digits: bool = False, chat_template: str | None = None):
    """Build a ``PreTrainedTokenizerFast`` whose first ids are the ``special`` tokens (by default LLaVA's: 0-4
    are <pad>, <unk>, <s>, </s>, ``image_token``), then ``words``.

    Text is lower-cased and split on whitespace and punctuation (and into single digits with
    ``split_digits``); the ``bos`` token, where ``special`` names one, is prepended to every encoding (Qwen-style
    tokenizers have none). Roles ``pad``, ``unk``, ``bos``, ``eos`` become the tokenizer's own; ``image``,
    ``video``, ``vision_start``, ``vision_end`` its extra special tokens.

    Example:
        >>> tok = word_tokenizer(["what", "colour", "?", "red"])
        >>> tok("<image> What colour?")["input_ids"]
        [2, 4, 5, 6, 7]
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    special = dict(special) if special is not None else dict(LLAVA_SPECIAL, image=image_token)
    vocab: dict[str, int] = {}
    for token in special.values():
        vocab.setdefault(token, len(vocab))
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    core = Tokenizer(WordLevel(vocab, unk_token=special["unk"]))
    core.normalizer = normalizers.Lowercase()
    splits = [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    if split_digits:
        splits.append(pre_tokenizers.Digits(individual_digits=True))
    core.pre_tokenizer = pre_tokenizers.Sequence(splits)
    if "bos" in special:
        bos = special["bos"]
        core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                            special_tokens=[(bos, vocab[bos])])
    core.add_special_tokens(list(special.values()))
    named = {f"{key}_token": special[key] for key in ("pad", "unk", "bos", "eos") if key in special}
    extra = {f"{key}_token": value for key, value in special.items()
             if key in ("image", "video", "vision_start", "vision_end")}
    return PreTrainedTokenizerFast(tokenizer_object=core, **named, extra_special_tokens=extra, padding_side="left",
                                   chat_template=chat_template)


QWEN_SPECIAL = {"pad": "<|endoftext|>", "unk": "<unk>", "eos": "<|im_end|>", "im_start": "<|im_start|>",
                 "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>", "image": "<|image_pad|>",
                 "video": "<|video_pad|>"}
"""The special tokens of a Qwen2-VL-family prompt, by role; ids follow this order."""


def chatml_template(default_system: str | None) -> str:
    """Qwen's ChatML layout: each image becomes <|vision_start|><|image_pad|><|vision_end|> in place."""
    system = (
        "{%- if messages[0]['role'] != 'system' -%}"
        "{{ '<|im_start|>system\\n" + default_system + "<|im_end|>\\n' }}{%- endif -%}"
        if default_system else ""
    )
    return (
        system
        + "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
        "{%- elif part['type'] == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )
