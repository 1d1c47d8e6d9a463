"""VQA accuracy (VQAv2, TextVQA): the soft, leave-one-annotator-out score of the official VQA evaluation.

A question has ``n`` human answers (ten in VQAv2 and TextVQA). For each annotator left out in turn, the
prediction earns ``min(#matching answers among the other n - 1 / 3, 1)``; the score is the mean over the
``n`` rounds. With ``m`` matches among ten answers that is ``(m * min((m-1)/3, 1) + (10-m) * min(m/3, 1)) / 10``:
0, 0.3, 0.6, 0.9, then 1 from four matches on.

Answer processing follows the official VQA script (``vqaEval.py``):

- newlines and tabs become spaces and the text is stripped (always, on both sides);
- punctuation: each mark of :data:`PUNCTUATION` is deleted when it touches a space anywhere in the text
  (or when the text has a digit-comma-digit, like ``1,000``), otherwise it becomes a space; a period is
  deleted unless a digit follows it;
- words: lower-cased, number words ``none``/``zero`` ... ``ten`` become digits, the articles ``a``, ``an``,
  ``the`` are dropped, and apostrophe-less contractions get their apostrophe (``dont`` -> ``don't``).

VQAv2 processes answers only when the annotators disagree: if the ``n`` answers are all the same string, the
prediction must equal it character for character (after the whitespace clean-up). TextVQA (and lmms-eval's
TextVQA) always processes both sides, with the EvalAI answer processor: the same steps, preceded by
lower-casing, deleting every comma and question mark, and detaching a possessive ``'s``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pyrtok.eval.metrics._records import check_answers, check_prediction, record_answers

__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "NUMBER_WORDS",
    "PUNCTUATION",
    "evalai_normalize",
    "normalize_answer",
    "textvqa_score",
    "vqa_accuracy",
    "vqav2_score",
]

# The official table, including its oddities: the capitalised keys ("Im", "Ive", "Id've") can never match
# because words are lower-cased first, and "somebody'd" maps to "somebodyd".
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip

NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# The period is handled apart; the apostrophe and the colon are not punctuation here, so "don't" and
# "10:30" survive.
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern, "(?!<=\d)(\.)(?!\d)", opens with what reads as a look-behind for a digit but is a
# look-ahead that can never fail, so only the character after the period counts: "3.5" and ".5" keep it,
# "5." loses it.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official script passes re.UNICODE (= 32) where re.sub takes its count, so at most 32 periods go.
_PERIOD_LIMIT = 32
_POSSESSIVE = "'s"


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    # Every decision looks at the text as it came in, not as earlier marks left it.
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        touches_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if touches_space or delete_all else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIOD_LIMIT)


def _process_words(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """The official VQA processing of one answer: whitespace, punctuation, then words.

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    >>> normalize_answer("The man's hat, 1,000 dollars")
    "man's hat 1000 dollars"
    """
    check_prediction(text, "text")
    return _process_words(_process_punctuation(_clean_whitespace(text)))


def evalai_normalize(text: str) -> str:
    """TextVQA's (EvalAI's) processing: lower-case, drop commas and ``?``, detach ``'s``, then :func:`normalize_answer`.

    >>> evalai_normalize("The Coca-Cola's sign?")
    "coca cola 's sign"
    """
    check_prediction(text, "text")
    text = text.lower().replace(",", "").replace("?", "").replace(_POSSESSIVE, " " + _POSSESSIVE)
    return normalize_answer(text.strip())


def _leave_one_out(prediction: str, answers: Sequence[str]) -> float:
    if len(answers) == 1:
        # Leaving the only annotator out leaves nobody to agree with; a single reference is plain exact match.
        return float(prediction == answers[0])
    matches = sum(answer == prediction for answer in answers)
    # Summing the capped match counts as integers and dividing once keeps the score exact (3 matches of 10
    # is 27/30 = 0.9, not a sum of rounded thirds).
    capped = sum(min(matches - (answer == prediction), 3) for answer in answers)
    return capped / (3 * len(answers))


def vqa_accuracy(prediction: str, answers: Sequence[str], always_normalize: bool = False) -> float:
    """Soft VQA accuracy in [0, 1] of ``prediction`` against the human ``answers`` (any number, ten usually).

    ``always_normalize=False`` is VQAv2's rule: answers are processed only when they are not all identical.
    ``always_normalize=True`` is TextVQA's: both sides always go through :func:`evalai_normalize`.

    >>> vqa_accuracy("Two", ["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"])
    0.9
    >>> vqa_accuracy("Yes", ["yes"] * 10)  # unanimous answers: no processing, so case matters
    0.0
    >>> vqa_accuracy("Yes", ["yes"] * 10, always_normalize=True)
    1.0
    """
    prediction = _clean_whitespace(check_prediction(prediction))
    references = [_clean_whitespace(a) for a in check_answers(answers)]
    if always_normalize:
        prediction, references = evalai_normalize(prediction), [evalai_normalize(a) for a in references]
    elif len(set(references)) > 1:
        # The official script trusts unanimous annotators verbatim (meant for text read off the image).
        prediction, references = normalize_answer(prediction), [normalize_answer(a) for a in references]
    return _leave_one_out(prediction, references)


def vqav2_score(prediction: str, record: dict) -> float:
    """VQAv2 accuracy in [0, 1] of ``prediction`` against ``record['answers']``."""
    return vqa_accuracy(prediction, record_answers(record))


def textvqa_score(prediction: str, record: dict) -> float:
    """TextVQA accuracy in [0, 1] of ``prediction`` against ``record['answers']`` (always processed)."""
    return vqa_accuracy(prediction, record_answers(record), always_normalize=True)
