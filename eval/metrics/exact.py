"""Exact-match scores for short-answer benchmarks: GQA's rule and a first-word rule.

- ``gqa``: lmms-eval scores GQA with its ``exact_match`` metric, ``ignore_case`` and ``ignore_punctuation``
  set: both sides are lower-cased and lose every ASCII punctuation character (``string.punctuation``), so
  ``"Yes."`` matches ``yes`` and ``"t-shirt"`` matches ``tshirt``. Surrounding whitespace is stripped as well.
- ``exact``: the first word of the prediction, lower-cased and without the punctuation around it, must equal
  one of the answers (treated the same way). For one-word benchmarks whose models may keep talking after
  the answer (``"Red, the ball is red."``). The rule is :func:`pyrtok.metrics.first_word_match`, the one
  ``pyrtok train-vlm`` validates with.
"""

from __future__ import annotations

import string

from pyrtok.eval.metrics._records import check_answers, check_prediction, record_answers

from pyrtok.metrics import first_word, first_word_match

__all__ = ["exact_score", "first_word", "first_word_match", "gqa_match", "gqa_normalize", "gqa_score"]

_DROP_PUNCTUATION = str.maketrans("", "", string.punctuation)


def gqa_normalize(text: str) -> str:
    """``text`` lower-cased, without ASCII punctuation, stripped: ``"The bag."`` -> ``"the bag"``."""
    return check_prediction(text, "text").lower().translate(_DROP_PUNCTUATION).strip()


def gqa_match(prediction: str, answers: list[str]) -> float:
    """1.0 if ``prediction`` equals one of ``answers`` after :func:`gqa_normalize`, else 0.0."""
    guess = gqa_normalize(check_prediction(prediction))
    return float(any(guess == gqa_normalize(a) for a in check_answers(answers)))


def gqa_score(prediction: str, record: dict) -> float:
    """GQA exact match in {0, 1} of ``prediction`` against ``record['answers']``."""
    return gqa_match(prediction, record_answers(record))


def exact_score(prediction: str, record: dict) -> float:
    """First-word exact match in {0, 1} of ``prediction`` against ``record['answers']``."""
    return first_word_match(prediction, record_answers(record))
