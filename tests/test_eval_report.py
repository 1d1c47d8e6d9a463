"""The ablation report's plots and units, on hand-made rows: distinct line styles, the legend clear of the data,
readable budget ticks, latency from the cells' medians, FLOPs in the unit their magnitude calls for."""

import itertools
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_rgba
from pyrtok.eval.report import _figure, flops_unit, format_flops, summarize, write_report

FULL = 261  # tokens of the full budget
FRACTIONS = (1.0, 0.33, 0.22, 0.11, 0.05)
ALLOCATORS = ["random", "pool", "coarse", "laplacian", "saliency", "saliency_nonredundant", "cls_attention",
              "difficulty", "foveated", "fastervlm", "visionzip", "visionzip_all", "divprune", "divprune_all"]


def rows_for(models=("tiny",), tasks=("shapes",), samples=6, outlier=True, fractions=FRACTIONS):
    """Rows of a default-like grid; every other cell's timings are steady but for one slow batch (an outlier)."""
    rows = []
    for model in models:
        for task in tasks:
            for a, allocator in enumerate(["all", *ALLOCATORS]):
                for f, fraction in enumerate(fractions if allocator != "all" else (1.0,)):
                    if allocator != "all" and fraction == 1.0:
                        continue
                    tokens = round(FULL * fraction)
                    for i in range(samples):
                        slow = outlier and i == 0 and (a + f) % 2 == 0
                        rows.append({"model": model, "allocator": allocator, "budget": tokens, "task": task,
                                     "id": str(i), "category": "xy"[i % 2], "prediction": "p", "answers": ["p"],
                                     "score": float((i + a) % 3 != 0), "tokens": tokens, "fraction": fraction,
                                     "time_s": (0.02 + 1e-4 * tokens) * (40 if slow else 1),
                                     "prefill_s": 0.004, "tflops": 8.75e-4 * (0.3 + fraction),
                                     "vision_tflops": 2.6e-4, "error": None})
    return rows


def figure(x, **kwargs):
    table, _ = summarize(rows_for(**kwargs), {t: "exact" for t in kwargs.get("tasks", ("shapes",))})
    fig = _figure(table, list(kwargs.get("tasks", ("shapes",))), x)
    fig.canvas.draw()  # the constrained layout places the legend at draw time
    return table, fig


@pytest.mark.parametrize(("value", "text"), [
    (8.75e11, "875 GFLOPs"), (8.75e8, "875 MFLOPs"), (1.234e12, "1.23 TFLOPs"), (999.96e9, "1 TFLOPs"),
    (4.2e3, "4.2 kFLOPs"), (12.0, "12 FLOPs"), (0.0, "0 FLOPs"), (3e18, "3 EFLOPs"), (float("nan"), "-")])
def test_format_flops_picks_the_unit_by_magnitude(value, text):
    assert format_flops(value) == text


def test_flops_unit():
    assert flops_unit(8.75e11) == (1e9, "GFLOPs")
    assert flops_unit(999.0) == (1.0, "FLOPs")
    assert flops_unit(float("nan")) == (1.0, "FLOPs")


def test_report_prints_flops_in_units_and_writes_three_plots(tmp_path):
    paths = write_report(rows_for(samples=2), {"shapes": "exact"}, tmp_path)
    text = paths["report"].read_text()
    assert "| FLOPs | vision FLOPs |" in text
    assert "1.14 GFLOPs" in text and "260 MFLOPs" in text  # the full row: 8.75e-4 * 1.3 TFLOPs; the vision share
    assert "0.00114" not in text and "TFLOPs" not in text
    assert all(paths[k].stat().st_size > 0 for k in ("budget_plot", "latency_plot", "flops_plot"))


@pytest.mark.parametrize("x", ["budget", "latency", "flops"])
@pytest.mark.parametrize("models", [("tiny",), ("tiny", "other")])
def test_every_series_has_its_own_style(x, models):
    _, fig = figure(x, models=models)
    legend = fig.legends[0]
    handles, labels = legend.legend_handles, [t.get_text() for t in legend.get_texts()]
    assert len(labels) == len(set(labels)) == len(models) * (len(ALLOCATORS) + 1)
    styles = [(to_rgba(h.get_color()), h.get_marker(), h.get_linestyle()) for h in handles]
    assert len(set(styles)) == len(styles), "two series share a (colour, marker, linestyle)"
    # and each line drawn has the style its legend entry shows
    drawn = {line.get_label(): (to_rgba(line.get_color()), line.get_marker(), line.get_linestyle())
             for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")}
    assert drawn == dict(zip(labels, styles, strict=True))
    plt.close(fig)


@pytest.mark.parametrize("x", ["budget", "latency", "flops"])
@pytest.mark.parametrize("models", [("tiny",), ("tiny", "other"), ("a", "b", "c")])
def test_legend_is_outside_every_panel_and_inside_the_figure(x, models):
    _, fig = figure(x, tasks=("shapes", "pope"), models=models, samples=2)
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        assert not legend.overlaps(ax.get_window_extent(renderer)), f"the legend covers {ax.get_title()}"
    figure_box = fig.bbox
    assert figure_box.x0 <= legend.x0 and legend.x1 <= figure_box.x1 + 1  # nothing cut off in the saved PNG
    assert figure_box.y0 <= legend.y0 and legend.y1 <= figure_box.y1 + 1
    plt.close(fig)


def test_budget_axis_is_labelled_at_the_budgets_run_and_labels_do_not_collide():
    _, fig = figure("budget")
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.get_xticklabels() if t.get_text()]
    assert [t.get_text() for t in labels] == ["5", "11", "22", "33", "100"]
    assert ax.get_xscale() == "log" and not any(t.get_text() for t in ax.get_xticklabels(minor=True))
    assert ax.xaxis.get_ticklocs().tolist() == pytest.approx([5, 11, 22, 33, 100])
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), "tick labels run together"
    plt.close(fig)


def test_budget_labels_that_would_crowd_are_left_off():
    rows = rows_for(samples=2, fractions=(1.0, 0.25, 0.22, 0.11))
    for r in rows:
        r["budget"] = r["fraction"]  # a model with a count per image: budgets are fractions
    table, _ = summarize(rows, {"shapes": "exact"})
    fig = _figure(table, ["shapes"], "budget")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["11", "", "25", "100"]
    plt.close(fig)


def test_latency_plot_uses_each_cells_median_and_follows_the_budgets():
    table, fig = figure("latency")
    line = next(line for line in fig.axes[0].get_lines() if line.get_label() == "laplacian")
    cells = sorted((r for r in table if r["allocator"] == "laplacian"), key=lambda r: -r["fraction"])
    assert line.get_xdata().tolist() == pytest.approx([r["time_ms_median"] for r in cells])
    # one slow batch per cell makes the means zigzag; the medians fall with the budget, as the work does
    means = [r["time_ms"] for r in cells]
    assert any(b > a for a, b in itertools.pairwise(means))
    assert all(b < a for a, b in itertools.pairwise(line.get_xdata()))
    plt.close(fig)


def test_latency_quartiles_in_the_table():
    table, _ = summarize(rows_for(samples=4, outlier=False), {"shapes": "exact"})
    for r in table:
        assert r["time_ms_p25"] == pytest.approx(r["time_ms_median"]) == pytest.approx(r["time_ms_p75"])
        assert r["time_ms_median"] == pytest.approx(r["time_ms"])
    assert all(not math.isnan(r["time_ms_median"]) for r in table)


def test_flops_axis_label_names_the_unit():
    _, fig = figure("flops")
    assert "(GFLOPs)" in fig.axes[0].get_xlabel()
    xs = np.concatenate([line.get_xdata() for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")])
    assert xs.max() == pytest.approx(1.1375) and xs.min() == pytest.approx(0.875 * 0.35)  # in that unit
    plt.close(fig)


def test_figure_refuses_an_unknown_axis():
    table, _ = summarize(rows_for(samples=1), {"shapes": "exact"})
    with pytest.raises(ValueError, match="x must be"):
        _figure(table, ["shapes"], "tokens")


def test_styles_stay_distinct_beyond_ten_series():
    from pyrtok.eval.report import _styles

    styles = list(_styles([("m", str(i)) for i in range(90)]).values())
    assert len({(s["color"], s["marker"], s["linestyle"]) for s in styles}) == 90
    assert len({s["color"] for s in styles[:10]}) == 10  # the first ten differ in colour alone already


def test_budget_plot_places_an_allocator_at_the_share_it_kept():
    rows = rows_for(samples=2)
    for r in rows:
        if r["allocator"] == "difficulty":  # keeps half its budget on these images
            r["tokens"] = r["budget"] // 2
    table, _ = summarize(rows, {"shapes": "exact"})
    fig = _figure(table, ["shapes"], "budget")
    kept = {line.get_label(): list(line.get_xdata()) for line in fig.axes[0].get_lines()}
    budgets = [round(FULL * f) for f in FRACTIONS[1:]]
    assert kept["laplacian"] == pytest.approx([100 * b / FULL for b in budgets])
    assert kept["difficulty"] == pytest.approx([100 * (b // 2) / FULL for b in budgets])
    plt.close(fig)


def test_two_models_get_their_agreement_on_the_order(tmp_path):
    """Two models whose allocators score in the same order (rho = tau = 1), then in the reverse order (-1), at one
    budget; the report prints it and writes agreement.csv; one model alone gets no such section."""
    from pyrtok.eval.report import model_agreement

    def rows(order):
        out = []
        for model, ranks in (("a", order[0]), ("b", order[1])):
            full = {"model": model, "allocator": "all", "budget": FULL, "task": "shapes", "id": "0",
                    "category": "x", "prediction": "p", "answers": ["p"], "score": 1.0, "tokens": FULL,
                    "fraction": 1.0, "time_s": 0.1, "prefill_s": 0.01, "tflops": 1e-3, "error": None}
            out.append(full)
            for allocator, rank in zip(["random", "pool", "laplacian", "divprune"], ranks, strict=True):
                for i in range(4):  # rank r: r of 4 answers right; one budget entry, other shares of tokens
                    count, fraction = (29, 0.1111) if model == "a" else (10, 0.119 - 0.01 * (allocator == "pool"))
                    out.append({**full, "allocator": allocator, "budget": count, "tokens": count,
                                "fraction": fraction, "requested": 0.11, "id": str(i), "score": float(i < rank)})
        return out

    same = model_agreement(summarize(rows(([1, 2, 3, 4], [1, 2, 3, 4])), {"shapes": "exact"})[0])
    assert [(e["models"], e["fraction"], e["n"], round(e["rho"], 6), round(e["tau"], 6)) for e in same] == \
        [(("a", "b"), 0.11, 4, 1.0, 1.0)]
    (reverse,) = model_agreement(summarize(rows(([1, 2, 3, 4], [4, 3, 2, 1])), {"shapes": "exact"})[0])
    assert round(reverse["rho"], 6) == round(reverse["tau"], 6) == -1.0
    paths = write_report(rows(([1, 2, 3, 4], [4, 3, 2, 1])), {"shapes": "exact"}, tmp_path / "two")
    assert "Do the models agree on the order?" in paths["report"].read_text()
    assert paths["agreement"].read_text().splitlines()[1].startswith("a,b,0.11,shapes,4,-1.0,-1.0")
    one = write_report(rows_for(), {"shapes": "exact"}, tmp_path / "one")
    assert "agreement" not in one and "agree on the order" not in one["report"].read_text()
