"""LLaVA-1.5 prompt conventions per task: the user text a record is asked with.

The defaults are those of lmms-eval's task YAMLs (``lmms_eval_specific_kwargs.default``) and the rules of
their ``doc_to_text`` functions:

- ``vqav2``, ``gqa``: ``{pre}{question}{post}``, post = "\\nAnswer the question using a single word or
  phrase.";
- ``pope``: the same, with the question stripped;
- ``mme``: the question stripped; when pre or post is non-empty, its " Please answer yes or no." is
  removed first (the short-answer instruction replaces it);
- ``textvqa``: the question through ``str.capitalize`` (as lmms-eval does, which also lower-cases the
  rest), then "\\nReference OCR token: a, b, ..." when ``ocr`` is on (off by default), then post;
- ``scienceqa_img``: ``{pre}`` + "Context: {hint}\\n" (only with a hint) + question + "\\n" + the options
  as "A. ...\\nB. ..." + post, post = "\\nAnswer with the option's letter from the given choices
  directly.";
- ``shapes`` (the embedded benchmark): the question alone, as the tiny model was trained on it.

:func:`format_question` returns the user text only; the model's chat template (for example
``"USER: <image>\\n{text} ASSISTANT:"``) is applied by the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["PROMPTS", "format_question"]

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
OPTION_LETTER = "\nAnswer with the option's letter from the given choices directly."
# MME questions end with this; lmms-eval drops it whenever it adds its own instruction.
MME_SUFFIX = " Please answer yes or no."

PROMPTS: dict[str, dict[str, Any]] = {
    "vqav2": {"pre_prompt": "", "post_prompt": SHORT_ANSWER},
    "gqa": {"pre_prompt": "", "post_prompt": SHORT_ANSWER},
    "textvqa": {"pre_prompt": "", "post_prompt": SHORT_ANSWER, "ocr": False},
    "pope": {"pre_prompt": "", "post_prompt": SHORT_ANSWER},
    "mme": {"pre_prompt": "", "post_prompt": SHORT_ANSWER},
    "scienceqa_img": {"pre_prompt": "", "post_prompt": OPTION_LETTER},
    "shapes": {"pre_prompt": "", "post_prompt": ""},
}


def _field(task: str, record: dict[str, Any], key: str) -> Any:
    if key not in record:
        raise ValueError(f"task {task!r} needs the record field {key!r}; record {record.get('id')!r} lacks it")
    return record[key]


def _plain(task: str, record: dict[str, Any], pre: str, post: str, settings: dict[str, Any]) -> str:
    return f"{pre}{_field(task, record, 'question')}{post}"


def _pope(task: str, record: dict[str, Any], pre: str, post: str, settings: dict[str, Any]) -> str:
    return f"{pre}{_field(task, record, 'question').strip()}{post}"


def _mme(task: str, record: dict[str, Any], pre: str, post: str, settings: dict[str, Any]) -> str:
    question = _field(task, record, "question").strip()
    if pre or post:
        question = question.replace(MME_SUFFIX, "")
    return f"{pre}{question}{post}"


def _textvqa(task: str, record: dict[str, Any], pre: str, post: str, settings: dict[str, Any]) -> str:
    ocr = ""
    if settings["ocr"]:
        ocr = f"\nReference OCR token: {', '.join(_field(task, record, 'ocr_tokens'))}"
    return f"{pre}{_field(task, record, 'question').capitalize()}{ocr}{post}"


def _scienceqa(task: str, record: dict[str, Any], pre: str, post: str, settings: dict[str, Any]) -> str:
    options = _field(task, record, "options")
    if not options or len(options) > 26:
        raise ValueError(f"task {task!r}: record {record.get('id')!r} must have 1 to 26 options, got {len(options)}")
    hint = record.get("hint") or ""
    context = f"Context: {hint}\n" if hint else ""
    listed = "\n".join(f"{chr(ord('A') + n)}. {option}" for n, option in enumerate(options))
    return f"{pre}{context}{_field(task, record, 'question')}\n{listed}{post}"


_BUILDERS: dict[str, Callable[[str, dict[str, Any], str, str, dict[str, Any]], str]] = {
    "vqav2": _plain,
    "gqa": _plain,
    "textvqa": _textvqa,
    "pope": _pope,
    "mme": _mme,
    "scienceqa_img": _scienceqa,
    "shapes": _plain,
}


def format_question(
    task: str,
    record: dict[str, Any],
    pre_prompt: str | None = None,
    post_prompt: str | None = None,
    *,
    ocr: bool | None = None,
) -> str:
    """The user text for ``record`` under ``task``'s convention.

    Args:
        task: a key of :data:`PROMPTS`.
        record: a record with at least ``question`` (ScienceQA also ``options`` and ``hint``, TextVQA with
            ``ocr`` also ``ocr_tokens``).
        pre_prompt, post_prompt: replace the task's defaults when not None ("" removes them).
        ocr: TextVQA only: add the reference OCR tokens; None keeps the default (off).

    >>> format_question("gqa", {"question": "Is the cup red?"})
    'Is the cup red?\\nAnswer the question using a single word or phrase.'
    >>> format_question("mme", {"question": "Is there a dog? Please answer yes or no."})
    'Is there a dog?\\nAnswer the question using a single word or phrase.'
    >>> format_question("shapes", {"question": "what colour is the big circle?"})
    'what colour is the big circle?'
    """
    if task not in PROMPTS:
        raise ValueError(f"task must be one of {sorted(PROMPTS)}, got {task!r}")
    settings = dict(PROMPTS[task])
    if ocr is not None:
        if "ocr" not in settings:
            raise ValueError(f"ocr applies to the tasks {[t for t in PROMPTS if 'ocr' in PROMPTS[t]]}, not {task!r}")
        settings["ocr"] = ocr
    pre = settings["pre_prompt"] if pre_prompt is None else pre_prompt
    post = settings["post_prompt"] if post_prompt is None else post_prompt
    return _BUILDERS[task](task, record, pre, post, settings)
