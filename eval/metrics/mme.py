"""MME: two yes/no questions per image, scored per category as acc + acc+ (at most 200).

``acc`` is the percentage of questions answered right, ``acc+`` the percentage of images with both
questions right. The perception score sums the ten perception categories present, the cognition score the
four cognition ones (full sets: at most 2000 and 800).

The answer is read as lmms-eval reads it: lower-cased, stripped, periods removed; exactly ``yes``/``no``
(or ``y``/``n``) is that answer; otherwise the first four characters decide, ``yes`` inside them before
``no``; anything else is "other" and wrong.
"""

from __future__ import annotations

from collections import defaultdict

from pyrtok.eval.metrics._records import check_prediction, record_answers, record_field, row_scores

__all__ = ["COGNITION", "PERCEPTION", "mme_score", "mme_summary", "parse_yes_no"]

PERCEPTION: tuple[str, ...] = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
COGNITION: tuple[str, ...] = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_yes_no(prediction: str) -> str:
    """``"yes"``, ``"no"`` or ``"other"`` read from ``prediction``.

    >>> parse_yes_no("Yes."), parse_yes_no("N"), parse_yes_no("No, it is not."), parse_yes_no("Maybe")
    ('yes', 'no', 'no', 'other')
    """
    text = check_prediction(prediction).lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    # Only the opening matters: "yes" wins over "no" there, and a "no" later in a sentence is ignored.
    opening = text[:4]
    if "yes" in opening:
        return "yes"
    return "no" if "no" in opening else "other"


def mme_score(prediction: str, record: dict) -> float:
    """1.0 if the answer read from ``prediction`` equals ``record['answers'][0]`` ('yes' or 'no'), else 0.0."""
    truth = record_answers(record)[0].lower().strip().replace(".", "")
    if truth not in ("yes", "no"):
        raise ValueError(f"record['answers'][0] must be 'yes' or 'no' for MME, got {truth!r}")
    return float(parse_yes_no(prediction) == truth)


def _pairs(rows: list[dict], scores: list[float]) -> dict[str, dict[object, list[float]]]:
    """Scores grouped by category, then by image (``question_id``)."""
    known = set(PERCEPTION) | set(COGNITION)
    grouped: dict[str, dict[object, list[float]]] = defaultdict(lambda: defaultdict(list))
    for i, (row, score) in enumerate(zip(rows, scores, strict=True)):
        category = record_field(row, "category", f"rows[{i}]")
        if category not in known:
            raise ValueError(f"rows[{i}]['category'] must be an MME category, got {category!r}; "
                             f"known: {', '.join(PERCEPTION + COGNITION)}")
        grouped[category][record_field(row, "question_id", f"rows[{i}]")].append(score)
    return grouped


def _category_score(images: dict[object, list[float]], category: str) -> tuple[float, int]:
    """(acc + acc+, questions right) of one category."""
    right = both = 0
    for image, scores in images.items():
        if len(scores) != 2:
            # acc+ is only defined on pairs; a subset that splits an image's pair would change its meaning.
            raise ValueError(f"rows: MME image {image!r} of category {category!r} has {len(scores)} question(s), "
                             f"expected 2 (sample MME subsets by image, keeping both questions)")
        correct = sum(score == 1.0 for score in scores)
        right += correct
        both += correct == 2
    return 100 * right / (2 * len(images)) + 100 * both / len(images), right


def mme_summary(rows: list[dict]) -> dict[str, float]:
    """Perception and cognition totals, overall question accuracy (%) and one score per category present.

    Each row needs ``score``, ``category`` and ``question_id`` (the image shared by its two questions).
    """
    scores = row_scores(rows)
    per_category = {c: _category_score(images, c) for c, images in _pairs(rows, scores).items()}
    summary = {
        "perception": float(sum(per_category[c][0] for c in PERCEPTION if c in per_category)),
        "cognition": float(sum(per_category[c][0] for c in COGNITION if c in per_category)),
        "accuracy": 100 * sum(right for _, right in per_category.values()) / len(rows),
    }
    summary.update({c: per_category[c][0] for c in PERCEPTION + COGNITION if c in per_category})
    return summary
