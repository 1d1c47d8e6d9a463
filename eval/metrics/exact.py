"""Exact-match scores for short-answer benchmarks: GQA's rule and a first-word rule.

- ``gqa``: lmms-eval scores GQA with its ``exact_match`` metric, ``ignore_case`` and ``ignore_punctuation``
  set: both sides are lower-cased and lose every ASCII punctuation character (``string.punctuation``), so
  ``"Yes."`` matches ``yes`` and ``"t-shirt"`` matches ``tshirt``. Surrounding whitespace is stripped as well.
- ``exact``: the first word of the prediction, lower-cased and without the punctuation around it, must equal
  one of the answers (treated the same way). For one-word benchmarks whose models may keep talking after
  the answer (``"Red, the ball is red."``).
"""

from __future__ import annotations

import string

from pyrtok.eval.metrics._records import check_answers, check_prediction, record_answers

__all__ = ["exact_score", "first_word", "first_word_match", "gqa_match", "gqa_normalize", "gqa_score"]

_DROP_PUNCTUATION = str.maketrans("", "", string.punctuation)


def gqa_normalize(text: str) -> str:
    """``text`` lower-cased, without ASCII punctuation, stripped: ``"The bag."`` -> ``"the bag"``."""
    return check_prediction(text, "text").lower().translate(_DROP_PUNCTUATION).strip()


def gqa_match(prediction: str, answers: list[str]) -> float:
    """1.0 if ``prediction`` equals one of ``answers`` after :func:`gqa_normalize`, else 0.0."""
    guess = gqa_normalize(check_prediction(prediction))
    return float(any(guess == gqa_normalize(a) for a in check_answers(answers)))


def first_word(text: str) -> str:
    """The first whitespace-separated word of ``text``, lower-cased, punctuation trimmed from both ends ('' if none)."""
    words = check_prediction(text, "text").split(maxsplit=1)
    return words[0].strip(string.punctuation).lower() if words else ""


def first_word_match(prediction: str, answers: list[str]) -> float:
    """1.0 if the :func:`first_word` of ``prediction`` equals one of ``answers`` (stripped, lower-cased, trimmed)."""
    guess = first_word(check_prediction(prediction))
    targets = {a.strip().strip(string.punctuation).lower() for a in check_answers(answers)}
    return float(bool(guess) and guess in targets)


def gqa_score(prediction: str, record: dict) -> float:
    """GQA exact match in {0, 1} of ``prediction`` against ``record['answers']``."""
    return gqa_match(prediction, record_answers(record))


def exact_score(prediction: str, record: dict) -> float:
    """First-word exact match in {0, 1} of ``prediction`` against ``record['answers']``."""
    return first_word_match(prediction, record_answers(record))
