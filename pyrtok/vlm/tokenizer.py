"""A word-level tokenizer in HuggingFace format, built offline from a word list.

Tiny VLMs trained from scratch (tests, the embedded default model) need a tokenizer that saves with
``save_pretrained`` and loads with ``AutoTokenizer`` without a download: lower-cased words and
punctuation, one id each, plus the special tokens a LLaVA prompt uses.
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")


def word_tokenizer(words: Iterable[str], image_token: str = "<image>"):
    """Build a ``PreTrainedTokenizerFast``: ids 0-4 are <pad>, <unk>, <s>, </s>, ``image_token``, then ``words``.

    Text is lower-cased and split on whitespace and punctuation; ``<s>`` is prepended to every encoding.

    Example:
        >>> tok = word_tokenizer(["what", "colour", "?", "red"])
        >>> tok("<image> What colour?")["input_ids"]
        [2, 4, 5, 6, 7]
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    special = ("<pad>", "<unk>", "<s>", "</s>", image_token)
    vocab = {token: i for i, token in enumerate(special)}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    core.add_special_tokens(list(special))
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": image_token}, padding_side="left",
    )
