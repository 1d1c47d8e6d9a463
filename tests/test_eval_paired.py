"""Paired differences between allocators and who leads each budget, on hand-made rows with known answers."""

import math

import pytest
from pyrtok.eval.paired import leaders, paired_difference
from pyrtok.eval.report import write_report


def scored(allocator, scores, budget=29, task="shapes", fraction=0.11, model="tiny"):
    return [{"model": model, "allocator": allocator, "budget": budget, "task": task, "id": f"q{i}",
             "category": "c", "prediction": "p", "answers": ["p"], "score": float(s), "tokens": budget,
             "fraction": fraction, "time_s": 0.01, "prefill_s": 0.001, "tflops": 1e-4, "vision_tflops": 1e-5,
             "error": None} for i, s in enumerate(scores)]


def test_paired_difference_matches_questions_by_id_and_gives_the_standard_error_of_the_mean():
    a = scored("a", [1, 1, 0, 1])
    b = list(reversed(scored("b", [0, 1, 0, 0])))  # order does not matter: rows pair by id
    b.append({**b[0], "id": "only-in-b", "score": 1.0})  # a question a did not answer is left out
    out = paired_difference(a, b)
    # per-question differences 1, 0, 0, 1: mean 0.5, sample sd sqrt(1/3), SE sqrt(1/3) / 2
    assert out["n"] == 4
    assert out["difference"] == pytest.approx(50.0)
    assert out["se"] == pytest.approx(100 * math.sqrt(1 / 3) / 2)
    assert paired_difference(b, a)["difference"] == pytest.approx(-50.0)
    failed = [{**r, "score": None, "error": "image: unreadable"} for r in a]  # a failure counts as wrong
    assert paired_difference(failed, b)["difference"] == pytest.approx(-25.0)
    with pytest.raises(ValueError, match="share no sample id"):
        paired_difference(a, [{**r, "id": "x" + r["id"]} for r in b])


def test_leaders_name_the_best_its_paired_lead_and_the_allocators_it_does_not_clear():
    n = 200
    best = [1] * n
    close = [1] * (n - 3) + [0] * 3  # 1.5 points behind, SE 0.86: within two standard errors
    far = [1] * (n // 2) + [0] * (n // 2)  # 50 points behind
    rows = [*scored("all", [1] * n, budget=261, fraction=1.0), *scored("winner", best), *scored("close", close),
            *scored("far", far), *scored("all", far, fraction=0.11),
            *scored("winner", best, task="pope"), *scored("far", far, task="pope")]
    out = leaders(rows, {"shapes": "exact", "pope": "pope"})
    assert len(out) == 1  # pope's F1 is no mean per question; full-token rows have no leader
    entry = out[0]
    assert (entry["model"], entry["task"], entry["budget"]) == ("tiny", "shapes", 29)
    assert (entry["leader"], entry["value"], entry["runner_up"]) == ("winner", 100.0, "close")
    assert entry["lead"] == pytest.approx(1.5)
    assert entry["se"] == pytest.approx(100 * math.sqrt((3 * 0.985 ** 2 + 197 * 0.015 ** 2) / 199 / n))
    assert entry["ties"] == ["close"]  # `far` and `coarse` (all below full) are behind by far more


def test_an_allocator_that_answers_as_the_leader_ties_and_schedules_compare_among_themselves(tmp_path):
    twin = [1, 1, 0, 1, 0, 1]
    rows = [*scored("all", [1] * 6, budget=261, fraction=1.0), *scored("leader", twin), *scored("twin", twin),
            *scored("worse", [0, 0, 0, 1, 0, 1]),
            # two in-LLM schedules at the full vision budget: each is its own cell, so neither is ranked against
            # the other (they spend different FLOPs); one allocator alone in a cell has nothing to lead
            *scored("all+fastv@33%", twin, budget=261, fraction=1.0),
            *scored("all+dart@22%", [0] * 6, budget=261, fraction=1.0),
            *scored("leader+vscan-llm", [1] * 6), *scored("twin+vscan-llm", [1, 0, 1, 1, 1, 1])]
    out = leaders(rows, {"shapes": "exact"})
    assert [(e["schedule"], e["leader"], e["runner_up"]) for e in out] == [
        (None, "leader", "twin"), ("vscan-llm", "leader+vscan-llm", "twin+vscan-llm")]
    assert (out[0]["lead"], out[0]["se"]) == (0.0, 0.0)
    assert out[0]["ties"] == ["twin", "worse"]  # equal answers tie; `worse` (-33 points, SE 21) is within 2 SE
    report = write_report(rows, {"shapes": "exact"}, tmp_path)["report"].read_text()
    section = report.split("## Who leads, and by how much")[1].split("## Per category")[0]
    assert "| tiny | shapes | 29 | leader | 66.7 | twin | 0.0 (0.0) | twin, worse |" in section
    assert "fastv" not in section and "dart" not in section
