"""The VQA metrics against hand-computed cases, and the metric registry."""

from __future__ import annotations

import dataclasses

import pytest
from pyrtok.eval.metrics import Metric, available_metrics, get_metric, mean_accuracy, register_metric
from pyrtok.eval.metrics.choice import extract_choice
from pyrtok.eval.metrics.exact import first_word_match, gqa_match
from pyrtok.eval.metrics.mme import parse_yes_no
from pyrtok.eval.metrics.pope import extract_yes_no
from pyrtok.eval.metrics.vqa import evalai_normalize, normalize_answer, vqa_accuracy

# ---------------------------------------------------------------------------------------------- VQA accuracy

# With m matches among 10 answers, the 10 leave-one-out rounds are: m rounds that drop a match, each
# min((m-1)/3, 1), and 10-m rounds that drop a non-match, each min(m/3, 1).
#   m=1: (1*0   + 9*1/3) / 10 = 0.3
#   m=2: (2*1/3 + 8*2/3) / 10 = 18/30 = 0.6
#   m=3: (3*2/3 + 7*1)   / 10 = 0.9
#   m=4: (4*1   + 6*1)   / 10 = 1.0


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out_on_ten_answers(matches, expected):
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_with_other_answer_counts():
    # 4 answers, 2 match: the 2 rounds dropping a match give 1/3, the 2 dropping a non-match 2/3 -> 0.5.
    assert vqa_accuracy("cat", ["cat", "cat", "dog", "cow"]) == pytest.approx(0.5)
    # 5 answers, 4 match: every round keeps at least 3 matches -> 1.
    assert vqa_accuracy("cat", ["cat"] * 4 + ["dog"]) == 1.0
    # A single reference has nobody left after leaving one out: plain exact match instead of always 0.
    assert vqa_accuracy("cat", ["cat"]) == 1.0
    assert vqa_accuracy("dog", ["cat"]) == 0.0


def test_vqa_number_words_are_digits_only_when_annotators_disagree():
    mixed = ["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"]
    assert vqa_accuracy("Two", mixed) == pytest.approx(0.9)  # "two" and "Two" both become "2": 3 matches
    assert vqa_accuracy("two", ["2"] * 10) == 0.0  # unanimous: compared verbatim


def test_vqa_unanimous_answers_are_compared_verbatim():
    # The official script processes nothing when all answers are the same string: not even lower-casing.
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("yes.", ["yes"] * 10) == 0.0
    # Whitespace clean-up (newline/tab -> space, strip) is applied on both sides regardless.
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0
    # One differing answer is enough to switch processing on for everybody.
    assert vqa_accuracy("Yes.", ["yes"] * 9 + ["Yes"]) == 1.0


def test_vqa_processing_contractions_articles_and_punctuation():
    assert normalize_answer("dont") == "don't"
    assert normalize_answer("The red one") == "red 1"
    assert normalize_answer("an apple") == "apple"
    assert normalize_answer("yes.") == "yes"
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer("5.") == "5"
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("red,white") == "red white"  # a comma touching no space becomes a space
    assert normalize_answer("red, white") == "red white"  # one touching a space is deleted
    assert normalize_answer("t-shirt") == "t shirt"
    assert normalize_answer("what?!") == "what"
    assert normalize_answer("10:30") == "10:30"  # the colon is not in the list
    assert normalize_answer("a\tb\nc ") == "b c"  # "a" is an article once the tab is a space
    assert vqa_accuracy("Dont", ["don't"] * 4 + ["no"] * 6) == 1.0


def test_vqa_punctuation_quirks_of_the_official_script():
    # The period rule only looks at the next character: ".5" keeps its period, "a.b" loses it.
    assert normalize_answer(".5") == ".5"
    assert normalize_answer("a.b") == "ab"
    # Any digit-comma-digit in the text makes every listed mark vanish instead of becoming a space.
    assert normalize_answer("1,000-2") == "10002"
    assert normalize_answer("1000-2") == "1000 2"
    # re.UNICODE lands in re.sub's count slot: at most 32 periods are removed.
    assert normalize_answer("." * 40) == "." * 8


def test_textvqa_always_normalises_with_the_evalai_processor():
    assert vqa_accuracy("Yes", ["yes"] * 10, always_normalize=True) == 1.0
    assert vqa_accuracy("yes.", ["yes"] * 10, always_normalize=True) == 1.0
    assert evalai_normalize("The Coca-Cola's sign?") == "coca cola 's sign"
    assert evalai_normalize("red,white") == "redwhite"  # commas go before the punctuation rule sees them
    textvqa = get_metric("textvqa")
    assert textvqa.score("STOP", {"answers": ["stop"] * 10}) == 1.0
    assert get_metric("vqav2").score("STOP", {"answers": ["stop"] * 10}) == 0.0


# --------------------------------------------------------------------------------------- GQA and first word


def test_gqa_ignores_case_punctuation_and_surrounding_space():
    assert gqa_match("Yes.", ["yes"]) == 1.0
    assert gqa_match("  Left ", ["left"]) == 1.0
    assert gqa_match("T-shirt", ["t-shirt"]) == 1.0
    assert gqa_match("on the left", ["left"]) == 0.0
    assert gqa_match("blue", ["red", "blue"]) == 1.0


def test_exact_compares_the_first_word():
    assert first_word_match("Red, the ball is red.", ["red"]) == 1.0
    assert first_word_match("(Circle)", ["circle"]) == 1.0
    assert first_word_match("The red ball", ["red"]) == 0.0
    assert first_word_match("", ["red"]) == 0.0
    assert get_metric("exact").score("three.", {"answers": ["Three"]}) == 1.0


# ------------------------------------------------------------------------------------------------------ POPE


def test_pope_reads_yes_and_no_by_the_pope_rule():
    assert extract_yes_no("Yes") == "yes"
    assert extract_yes_no("NO") == "no"
    assert extract_yes_no("There is no cat.") == "no"
    assert extract_yes_no("I do not think so") == "no"
    assert extract_yes_no("Yes. No doubt about it.") == "yes"  # only the first sentence counts
    assert extract_yes_no("Yes, there is no doubt") == "no"  # the rule's known blind spot
    assert extract_yes_no("Nothing") == "yes"  # "nothing" is not the word "no"
    assert extract_yes_no("") is None


POPE_TABLE = [  # (prediction, truth), then how the prediction is read and the outcome
    ("Yes", "yes"),  # yes: TP
    ("No, there is not.", "yes"),  # no: FN
    ("yes, there is a dog.", "no"),  # yes: FP
    ("NO", "no"),  # no: TN
    ("There is no cat.", "no"),  # no: TN
    ("Yes. No doubt.", "yes"),  # yes: TP
    ("", "yes"),  # nothing: FN (a failed generation is wrong, and not a "yes")
    ("I do not think so", "yes"),  # no: FN
]


def _rows(metric: Metric, table: list[tuple], **fields) -> list[dict]:
    return [{"prediction": p, "answers": [t], "category": "c", **fields,
             "score": metric.score(p, {"answers": [t], **fields})} for p, t in table]


def test_pope_summary_on_a_hand_table():
    pope = get_metric("pope")
    summary = pope.summarize(_rows(pope, POPE_TABLE))
    # TP=2, FP=1, FN=3, TN=2; 3 "yes" predictions out of 8; 4 rows right.
    assert summary["precision"] == pytest.approx(100 * 2 / 3)
    assert summary["recall"] == pytest.approx(100 * 2 / 5)
    assert summary["f1"] == pytest.approx(100 * 2 * (2 / 3) * (2 / 5) / (2 / 3 + 2 / 5))  # = 50
    assert summary["f1"] == pytest.approx(50.0)
    assert summary["accuracy"] == pytest.approx(50.0)
    assert summary["yes_ratio"] == pytest.approx(37.5)
    assert pope.main == "f1"


def test_pope_without_yes_predictions_scores_zero_instead_of_crashing():
    pope = get_metric("pope")
    summary = pope.summarize(_rows(pope, [("no", "yes"), ("no", "no")]))
    assert summary == {"accuracy": 50.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope.score("yes", {"answers": ["maybe"]})


# ------------------------------------------------------------------------------------------------------- MME


def test_mme_parse():
    assert [parse_yes_no(p) for p in ("Yes", "yes.", "Y", "n", "No, it is not", "Not sure")] == [
        "yes", "yes", "yes", "no", "no", "no"]
    assert parse_yes_no("The answer is yes") == "other"  # only the first four characters are read
    assert parse_yes_no("") == "other"


def _mme_rows(table: list[tuple[str, str, str, str]]) -> list[dict]:
    mme = get_metric("mme")
    rows = []
    for category, image, prediction, truth in table:
        record = {"answers": [truth], "category": category, "question_id": image}
        rows.append({**record, "prediction": prediction, "score": mme.score(prediction, record)})
    return rows


def test_mme_summary_on_two_categories_of_two_images():
    rows = _mme_rows([
        ("existence", "e1.jpg", "Yes", "yes"), ("existence", "e1.jpg", "No", "no"),  # both right
        ("existence", "e2.jpg", "Yes", "yes"), ("existence", "e2.jpg", "Yes", "no"),  # one right
        ("code_reasoning", "c1.png", "No", "yes"), ("code_reasoning", "c1.png", "Yes", "no"),  # none right
        ("code_reasoning", "c2.png", "yes.", "yes"), ("code_reasoning", "c2.png", "no", "no"),  # both right
    ])
    summary = get_metric("mme").summarize(rows)
    # existence: acc 3/4 = 75, acc+ 1/2 = 50 -> 125; code_reasoning: acc 2/4 = 50, acc+ 1/2 = 50 -> 100.
    assert summary["existence"] == pytest.approx(125.0)
    assert summary["code_reasoning"] == pytest.approx(100.0)
    assert summary["perception"] == pytest.approx(125.0)
    assert summary["cognition"] == pytest.approx(100.0)
    assert summary["accuracy"] == pytest.approx(100 * 5 / 8)
    assert set(summary) == {"perception", "cognition", "accuracy", "existence", "code_reasoning"}
    # A second perception category adds to the perception total: count with one perfect image -> 200.
    more = rows + _mme_rows([("count", "n1.jpg", "Yes", "yes"), ("count", "n1.jpg", "No", "no")])
    assert get_metric("mme").summarize(more)["perception"] == pytest.approx(325.0)


def test_mme_refuses_broken_pairs_and_unknown_categories():
    mme = get_metric("mme")
    with pytest.raises(ValueError, match="1 question"):
        mme.summarize(_mme_rows([("color", "x.jpg", "Yes", "yes")]))
    with pytest.raises(ValueError, match="MME category"):
        mme.summarize(_mme_rows([("colour", "x.jpg", "Yes", "yes"), ("colour", "x.jpg", "No", "no")]))


# ------------------------------------------------------------------------------------------------- ScienceQA

OPTIONS = ["Mercury", "Venus", "Earth", "Mars"]


@pytest.mark.parametrize("prediction", [
    "B", "b", "B.", "(B)", "B)", "B) Venus", "(B) Venus", "B. Venus", "The answer is B.", "Answer: b",
    "the answer is (B)", "The answer is B because it is hot.", "venus", "Venus.", "The answer is Venus.",
])
def test_scienceqa_reads_the_letter(prediction):
    assert extract_choice(prediction, OPTIONS) == "B"
    assert get_metric("scienceqa").score(prediction, {"options": OPTIONS, "answers": ["B"]}) == 1.0


@pytest.mark.parametrize("prediction", ["", "E", "(F)", "I think so", "Answer: I don't know", "Pluto"])
def test_scienceqa_without_a_letter_scores_zero(prediction):
    assert extract_choice(prediction, OPTIONS) is None
    assert get_metric("scienceqa").score(prediction, {"options": OPTIONS, "answers": ["B"]}) == 0.0


def test_scienceqa_does_not_read_the_article_as_a_letter():
    options = ["a cat", "a dog"]
    assert extract_choice("a dog", options) == "B"
    assert extract_choice("A", options) == "A"
    assert extract_choice("C", options) is None
    with pytest.raises(ValueError, match="option letters"):
        get_metric("scienceqa").score("A", {"options": options, "answers": ["C"]})


# ------------------------------------------------------------------------------------------ registry, input


def test_registry_lists_every_metric_and_each_main_key_is_summarised():
    assert available_metrics() == ["exact", "gqa", "mme", "pope", "scienceqa", "textvqa", "vqav2"]
    records = {
        "mme": [{"answers": ["yes"], "category": "OCR", "question_id": 1},
                {"answers": ["no"], "category": "OCR", "question_id": 1}],
        "scienceqa": [{"answers": ["A"], "options": ["x", "y"]}],
        "pope": [{"answers": ["yes"]}],
    }
    for name in available_metrics():
        metric = get_metric(name)
        rows = [{**r, "prediction": "yes", "category": r.get("category", "c"), "score": metric.score("yes", r)}
                for r in records.get(name, [{"answers": ["yes"] * 10}])]
        summary = metric.summarize(rows)
        assert metric.main in summary and all(isinstance(v, float) for v in summary.values()), name


def test_registry_errors():
    with pytest.raises(ValueError, match="already registered"):
        register_metric(Metric("gqa", lambda p, r: 0.0, mean_accuracy, "accuracy"))
    with pytest.raises(ValueError, match=r"name: unknown metric 'vqa'.*available: exact, gqa"):
        get_metric("vqa")
    with pytest.raises(TypeError, match="callable"):
        Metric("x", "not a function", mean_accuracy, "accuracy")
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_metric("gqa").main = "f1"
    assert "x" not in available_metrics()


def test_mean_accuracy_and_bad_rows():
    assert mean_accuracy([{"score": 1.0}, {"score": 0.0}, {"score": 0.5}, {"score": 1}]) == {"accuracy": 62.5}
    with pytest.raises(ValueError, match="non-empty"):
        mean_accuracy([])
    with pytest.raises(ValueError, match=r"rows\[1\]\['score'\] must be a number in \[0, 1\]"):
        mean_accuracy([{"score": 1.0}, {"score": 2.0}])
    with pytest.raises(ValueError, match=r"rows\[0\] must have the field 'score'"):
        mean_accuracy([{"prediction": "x"}])


def test_bad_answers_and_predictions_name_the_argument():
    with pytest.raises(TypeError, match="answers must be a non-empty list of strings, got str"):
        vqa_accuracy("yes", "yes")
    with pytest.raises(ValueError, match="answers must be a non-empty list"):
        vqa_accuracy("yes", [])
    with pytest.raises(TypeError, match="prediction must be a str"):
        vqa_accuracy(None, ["yes"])
    with pytest.raises(ValueError, match="record must have the field 'answers'"):
        get_metric("vqav2").score("yes", {"question": "?"})
    with pytest.raises(TypeError, match=r"record\['answers'\] must be a non-empty list of strings"):
        get_metric("gqa").score("yes", {"answers": [1, 2]})
    with pytest.raises(TypeError, match="record must be a dict"):
        get_metric("exact").score("yes", ["yes"])
