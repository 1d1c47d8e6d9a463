"""Answer-scoring rules shared by training-time validation and the evaluation harness.

One definition of each rule, so that a model's validation accuracy during ``pyrtok train-vlm`` and its
accuracy in an ablation table mean the same thing. The harness's metric registry
(:mod:`pyrtok.eval.metrics`) wraps these around its sample records.

- :func:`first_word_match`: the first word of the prediction, lower-cased and without the punctuation around
  it, must equal one of the answers (treated the same way). For one-word benchmarks whose models may keep
  talking after the answer (``"Red, the ball is red."``).
"""

from __future__ import annotations

import string
from collections.abc import Sequence

__all__ = ["check_answers", "first_word", "first_word_match"]


def _check_text(text: object, name: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str (the generated text), got {type(text).__name__}")
    return text


def check_answers(answers: object, name: str = "answers") -> list[str]:
    """``answers`` as a list if it is a non-empty list (or tuple) of strings.

    A bare string is refused: iterating it would silently turn ``"yes"`` into the answers ``y, e, s``.
    """
    if isinstance(answers, str) or not isinstance(answers, list | tuple):
        raise TypeError(f"{name} must be a non-empty list of strings, got {type(answers).__name__}")
    if not answers:
        raise ValueError(f"{name} must be a non-empty list of strings, got an empty {type(answers).__name__}")
    bad = [type(a).__name__ for a in answers if not isinstance(a, str)]
    if bad:
        raise TypeError(f"{name} must be a non-empty list of strings, got items of type {sorted(set(bad))}")
    return list(answers)


def first_word(text: str) -> str:
    """The first whitespace-separated word of ``text``, lower-cased, punctuation trimmed from both ends ('' if none).

    Example:
        >>> first_word("Red, the ball is red."), first_word("(Circle)"), first_word("  ")
        ('red', 'circle', '')
    """
    words = _check_text(text, "text").split(maxsplit=1)
    return words[0].strip(string.punctuation).lower() if words else ""


def first_word_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the :func:`first_word` of ``prediction`` equals one of ``answers`` (stripped, lower-cased, trimmed).

    An empty first word (no text, or punctuation only) never matches.

    Example:
        >>> first_word_match("Three.", ["3", "three"]), first_word_match("The red ball", ["red"])
        (1.0, 0.0)
    """
    guess = first_word(_check_text(prediction, "prediction"))
    targets = {a.strip().strip(string.punctuation).lower() for a in check_answers(answers)}
    return float(bool(guess) and guess in targets)
