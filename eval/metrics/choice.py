"""Multiple choice (ScienceQA-IMG): read an option letter out of free text and compare it with the key.

Records carry ``options`` (the choices, lettered A, B, C, ... in order) and ``answers`` = [the correct
letter]. A letter is read from the prediction in this order:

1. the whole text is a letter: ``B``, ``b``, ``B.``, ``(B)``, ``B)``, ``B:``;
2. the whole text is one option's text (case-insensitive, a trailing period ignored): ``"a dog"``;
3. the text opens with a marked letter: ``(B) ...``, ``B) ...``, ``B. ...``, ``B: ...``;
4. the same three after an answer phrase (``"The answer is B."``, ``"Answer: b"``), where an upper-case
   letter followed by a space also counts (``"The answer is B because ..."``).

A bare lower-case ``a`` followed by more words is never read as a letter, since it is far more often the
article. A letter outside the options, or no letter at all, scores 0.
"""

from __future__ import annotations

import re

from pyrtok.eval.metrics._records import check_prediction, record_answers, record_field

__all__ = ["choice_score", "extract_choice", "letter_of"]

_BARE_LETTER = re.compile(r"\(?([A-Za-z])\)?[.:)]?")
_MARKED_LETTER = re.compile(r"(?:\(([A-Za-z])\)|([A-Za-z])[.):])\s")
_CAPITAL_THEN_SPACE = re.compile(r"([A-Z])\s")
_ANSWER_PHRASE = re.compile(r"\banswer\b(?:\s+is)?\s*:?\s*", re.IGNORECASE)


def letter_of(index: int) -> str:
    """The letter of the option at ``index`` (0 -> ``"A"``)."""
    if not isinstance(index, int) or not 0 <= index < 26:
        raise ValueError(f"index must be an int in [0, 26), got {index!r}")
    return chr(ord("A") + index)


def _check_options(options: object, name: str = "options") -> list[str]:
    if isinstance(options, str) or not isinstance(options, list | tuple):
        raise TypeError(f"{name} must be a non-empty list of option strings, got {type(options).__name__}")
    if not all(isinstance(o, str) for o in options):
        raise TypeError(f"{name} must hold only strings, got {options!r}")
    if not 0 < len(options) <= 26:
        raise ValueError(f"{name} must hold 1 to 26 options (letters A-Z), got {len(options)}")
    return list(options)


def _plain(text: str) -> str:
    return " ".join(text.split()).casefold().rstrip(".").rstrip()


def _valid(letter: str | None, options: list[str]) -> str | None:
    if letter is None:
        return None
    letter = letter.upper()
    return letter if 0 <= ord(letter) - ord("A") < len(options) else None


def _read(text: str, options: list[str], after_phrase: bool) -> str | None:
    """The letter ``text`` names by rules 1-3 (and rule 4's capital-then-space when ``after_phrase``)."""
    if match := _BARE_LETTER.fullmatch(text):
        return _valid(match[1], options)
    plain = _plain(text)
    for index, option in enumerate(options):
        if plain and plain == _plain(option):
            return letter_of(index)
    if match := _MARKED_LETTER.match(text):
        return _valid(match[1] or match[2], options)
    if after_phrase and (match := _CAPITAL_THEN_SPACE.match(text)):
        return _valid(match[1], options)
    return None


def extract_choice(prediction: str, options: list[str]) -> str | None:
    """The option letter (upper case) that ``prediction`` names among ``options``, or ``None``.

    >>> options = ["a cat", "a dog", "a bird"]
    >>> [extract_choice(p, options) for p in ["B", "(b)", "C) a bird", "The answer is B.", "Answer: c", "A dog", "D"]]
    ['B', 'B', 'C', 'B', 'C', 'B', None]
    """
    text = check_prediction(prediction).strip()
    options = _check_options(options)
    if letter := _read(text, options, after_phrase=False):
        return letter
    for phrase in _ANSWER_PHRASE.finditer(text):
        if letter := _read(text[phrase.end() :].strip(), options, after_phrase=True):
            return letter
    return None


def choice_score(prediction: str, record: dict) -> float:
    """1.0 if the letter read from ``prediction`` is ``record['answers'][0]``, else 0.0; needs ``record['options']``."""
    options = _check_options(record_field(record, "options"), "record['options']")
    key = record_answers(record)[0].strip().upper()
    if len(key) != 1 or _valid(key, options) is None:
        raise ValueError(f"record['answers'][0] must be one of the option letters "
                         f"{[letter_of(i) for i in range(len(options))]}, got {record_answers(record)[0]!r}")
    return float(extract_choice(prediction, options) == key)
