"""POPE: yes/no object-hallucination probing, scored as binary classification with "yes" the positive class.

The answer is read with the rule of the POPE evaluation script (also LLaVA's): keep the text before the
first period, drop commas, split into words; any word ``no`` or ``not`` makes it "no", anything else "yes".
The text is lower-cased and stripped first, so ``"No"`` and ``"NOT"`` count as well. That rule reads
``"Yes, there is no doubt"`` as "no" and ``"Maybe"`` as "yes"; it is kept for comparability. An empty
prediction (a failed generation) is neither answer: wrong, and not a "yes".
"""

from __future__ import annotations

from pyrtok.eval.metrics._records import check_prediction, record_answers, row_scores

__all__ = ["NEGATIONS", "extract_yes_no", "pope_score", "pope_summary"]

NEGATIONS: frozenset[str] = frozenset({"no", "not"})


def extract_yes_no(prediction: str) -> str | None:
    """``"yes"`` or ``"no"`` read from ``prediction`` by the POPE rule; ``None`` for empty text.

    >>> extract_yes_no("No, there is not."), extract_yes_no("Yes. No doubt."), extract_yes_no("  ")
    ('no', 'yes', None)
    """
    text = check_prediction(prediction).lower().strip()
    if not text:
        return None
    first_sentence = text.split(".", 1)[0]
    words = first_sentence.replace(",", "").split()
    return "no" if NEGATIONS.intersection(words) else "yes"


def _truth(record: dict, name: str) -> str:
    truth = record_answers(record, name)[0].lower().strip()
    if truth not in ("yes", "no"):
        raise ValueError(f"{name}['answers'][0] must be 'yes' or 'no' for POPE, got {truth!r}")
    return truth


def pope_score(prediction: str, record: dict) -> float:
    """1.0 if the answer read from ``prediction`` equals ``record['answers'][0]`` ('yes' or 'no'), else 0.0."""
    return float(extract_yes_no(prediction) == _truth(record, "record"))


def _ratio(numerator: int, denominator: int) -> float:
    # An empty class gives 0 rather than a crash: no "yes" predicted means no precision to claim.
    return numerator / denominator if denominator else 0.0


def pope_summary(rows: list[dict]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and the share of "yes" predictions, all in percent, from scored rows.

    Each row needs ``prediction``, ``answers`` and ``score``; accuracy is the mean score.
    """
    scores = row_scores(rows)
    said_yes = [extract_yes_no(check_prediction(row.get("prediction"), f"rows[{i}]['prediction']")) == "yes"
                for i, row in enumerate(rows)]
    is_yes = [_truth(row, f"rows[{i}]") == "yes" for i, row in enumerate(rows)]
    true_positives = sum(p and t for p, t in zip(said_yes, is_yes, strict=True))
    precision = _ratio(true_positives, sum(said_yes))
    recall = _ratio(true_positives, sum(is_yes))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100 * sum(scores) / len(scores),
        "precision": 100 * precision,
        "recall": 100 * recall,
        "f1": 100 * f1,
        "yes_ratio": 100 * sum(said_yes) / len(rows),
    }
