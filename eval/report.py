"""Reports of an ablation: the papers' table (Markdown + CSV), a per-category breakdown, and plots.

One table row per (model, allocator, budget): the headline metric of every task, the average retention
(each task's metric as a percentage of the same model's full-token metric, averaged over tasks), the mean
kept tokens, the mean prefill and end-to-end times per sample, and FLOPs per sample (vision + LLM prefill), each
printed in the unit its magnitude calls for (:func:`format_flops`: ``875 GFLOPs``, ``1.2 MFLOPs``).
A row that records a failure instead of an answer (an unreadable image, a failed batch: see
:func:`pyrtok.eval.rows.failed`) counts as a wrong answer in the headline metric, as it always has; beside it, every
task also gets its metric over the answered questions only (``<task> answered``), and ``failed`` counts the rows
without an answer (``errors`` counts every row with an error, empty answers included).
``all`` is the full-token reference only; the ``all`` allocator below the full budget (the coarsest tokens first)
is ``coarse``, in rows the runner writes and in rows of older runs alike. Each (model, allocator, budget, task,
id) counts once: give these functions the latest row per key, as :func:`pyrtok.eval.rows.read_rows` does.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pyrtok.eval.metrics import get_metric
from pyrtok.eval.paired import leaders
from pyrtok.eval.rows import failed, reported_allocator

__all__ = ["Summary", "flops_unit", "format_flops", "summarize", "write_report"]

Summary = dict[str, Any]


def _group(rows: Sequence[dict], *fields: str) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[f] for f in fields)].append(row)
    return groups


def _mean(rows: Sequence[dict], field: str) -> float:
    """Mean of ``field`` over the rows that ran (rows whose image could not be read carry no measurements)."""
    values = [r[field] for r in rows if r.get(field) is not None and not str(r.get("error") or "").startswith("image")]
    return float(np.mean(values)) if values else float("nan")


def _quantiles(rows: Sequence[dict], field: str, qs: Sequence[float]) -> list[float]:
    """Quantiles of ``field`` over the rows that ran, as :func:`_mean` picks them; NaNs where none did."""
    values = [r[field] for r in rows if r.get(field) is not None and not str(r.get("error") or "").startswith("image")]
    return [float(v) for v in np.quantile(values, qs)] if values else [float("nan")] * len(qs)


_FLOP_UNITS = ("FLOPs", "kFLOPs", "MFLOPs", "GFLOPs", "TFLOPs", "PFLOPs", "EFLOPs")


def flops_unit(value: float) -> tuple[float, str]:
    """(scale, unit) for FLOPs of the magnitude of ``value``: the largest unit in which it is at least 1.

    >>> flops_unit(8.75e11)
    (1000000000.0, 'GFLOPs')
    """
    if not np.isfinite(value) or value <= 0:
        return 1.0, _FLOP_UNITS[0]
    power = min(max(int(np.floor(np.log10(value) / 3)), 0), len(_FLOP_UNITS) - 1)
    return 1000.0 ** power, _FLOP_UNITS[power]


def format_flops(value: float, digits: int = 3) -> str:
    """``value`` FLOPs with ``digits`` significant digits in the unit its magnitude calls for; NaN -> ``-``.

    >>> format_flops(8.75e11), format_flops(1.234e6), format_flops(999.96e9)
    ('875 GFLOPs', '1.23 MFLOPs', '1 TFLOPs')
    """
    if value != value:
        return "-"
    rounded = float(f"{value:.{digits}g}")  # 999.96e9 rounds to 1e12: its unit is then TFLOPs, not GFLOPs
    scale, unit = flops_unit(rounded)
    return f"{rounded / scale:.{digits}g} {unit}"


def summarize(rows: Sequence[dict], metrics: dict[str, str]) -> tuple[list[Summary], list[Summary]]:
    """(table, categories) from result rows; ``metrics`` maps each task name to its metric name.

    ``table``: one entry per (model, allocator, budget) with ``tasks`` = {task: headline value}, the
    ``retention`` (%), ``tokens``, ``effective_tokens`` (image tokens averaged over the decoder layers: below
    ``tokens`` under an in-LLM schedule; NaN where no row recorded it), ``prefill_ms``, ``time_ms``, ``tflops``,
    ``vision_tflops`` (the vision tower's share: lower than the full row's where LLaVA-NeXT's lazy tiles skipped
    tiles), ``errors`` (rows with an error, empty answers included), ``failed`` (rows without an answer),
    ``answered`` = {task: headline value over the rows with an answer} (NaN where every row failed),
    ``kept`` (the share of the model's visual tokens the rows kept, on average: below ``fraction`` where an
    allocator keeps fewer tokens than its budget), and
    ``time_ms_p25``, ``time_ms_median``, ``time_ms_p75``: quartiles of the per-sample time over the cell's rows (each
    batch is timed once, so these spread over its batches; the plots use them, one timing being too noisy).
    ``categories``: one entry per (model, allocator, budget, task, category) with the headline value.
    """
    rows = [{**r, "allocator": reported_allocator(r)} for r in rows]
    full: dict[tuple, float] = {}
    cells: dict[tuple, dict[str, Any]] = {}
    categories = []
    for (model, allocator, budget, task), group in _group(rows, "model", "allocator", "budget", "task").items():
        metric = get_metric(metrics[task])
        value = metric.summarize(group)[metric.main]
        cell = cells.setdefault((model, allocator, budget), {"model": model, "allocator": allocator, "budget": budget,
                                                             "requested": group[0].get("requested"),
                                                             "tasks": {}, "answered": {}, "rows": []})
        cell["tasks"][task] = value
        answered = [r for r in group if not failed(r)]
        cell["answered"][task] = metric.summarize(answered)[metric.main] if answered else float("nan")
        cell["rows"] += group
        if allocator == "all":
            full[(model, task)] = value  # the full-token reference
        for (category,), sub in sorted(_group(group, "category").items()):
            summary = metric.summarize(sub)  # a category's own key where the metric has one (MME's scores)
            categories.append({"model": model, "allocator": allocator, "budget": budget, "task": task,
                               "category": category, "value": summary.get(category, summary[metric.main]),
                               "n": len(sub)})
    # a model with one token count per image runs its full cell at that count (an int budget); the share an
    # allocator kept is then its tokens over that count, which falls below the cell's fraction where an allocator
    # keeps fewer tokens than its budget (difficulty). Where each image has its own count, rows carry their own share.
    counts = {model: budget for (model, allocator, budget) in cells
              if allocator == "all" and isinstance(budget, int) and not isinstance(budget, bool)}
    table = []
    for (model, _, _), cell in sorted(cells.items(), key=lambda kv: (kv[0][0], -kv[0][2], kv[0][1])):
        group = cell.pop("rows")
        ratios = [100 * v / full[(model, t)] for t, v in cell["tasks"].items() if full.get((model, t))]
        cell.update(retention=float(np.mean(ratios)) if ratios else float("nan"), tokens=_mean(group, "tokens"),
                    effective_tokens=_mean(group, "effective_tokens"),
                    prefill_ms=1e3 * _mean(group, "prefill_s"), time_ms=1e3 * _mean(group, "time_s"),
                    tflops=_mean(group, "tflops"), vision_tflops=_mean(group, "vision_tflops"),
                    errors=sum(1 for r in group if r.get("error")), failed=sum(1 for r in group if failed(r)),
                    fraction=_mean(group, "fraction"))
        cell["kept"] = cell["tokens"] / counts[model] if model in counts else cell["fraction"]
        quartiles = _quantiles(group, "time_s", (0.25, 0.5, 0.75))
        cell.update({f"time_ms_{name}": 1e3 * q for name, q in zip(("p25", "median", "p75"), quartiles, strict=True)})
        table.append(cell)
    return table, categories


def model_agreement(table: Sequence[Summary]) -> list[dict[str, Any]]:
    """How far each pair of models agrees on the order of the allocators: one entry per (model pair, budget below
    full, task) with ``n`` (the allocators both ran at that budget), Spearman's ``rho`` and Kendall's ``tau``
    (tau-b) of their headline values (NaN with fewer than 3 allocators or a constant column).

    Cells line up on the config's budget entry they stand for (``requested``: 0.11 is 29 of the LLaVA's 261
    tokens and 10 of another model's 84), or, in rows of runs that did not record it, on the fraction kept
    (rounded to 3 decimals); allocators match by name, so an in-LLM schedule's rows (``allocator+schedule``)
    pair up across models too. ``fraction`` in each entry is the budget entry.
    """
    from itertools import combinations

    from scipy.stats import kendalltau, spearmanr

    values: dict[tuple[str, float, str], dict[str, float]] = {}
    for row in table:
        requested = row.get("requested")
        fraction = round(float(requested if requested is not None else row["fraction"]), 3)
        if fraction >= 1.0 or row["allocator"] == "all":
            continue
        for task, value in row["tasks"].items():
            values.setdefault((row["model"], fraction, task), {})[row["allocator"]] = value
    models = sorted({model for model, _, _ in values})
    out = []
    for a, b in combinations(models, 2):
        for fraction, task in sorted({(f, t) for m, f, t in values if m == a} & {(f, t) for m, f, t in values
                                                                                  if m == b}):
            left, right = values[(a, fraction, task)], values[(b, fraction, task)]
            names = sorted(set(left) & set(right))
            x, y = [left[n] for n in names], [right[n] for n in names]
            usable = len(names) >= 3 and len(set(x)) > 1 and len(set(y)) > 1
            rho = float(spearmanr(x, y).statistic) if usable else float("nan")
            tau = float(kendalltau(x, y).statistic) if usable else float("nan")
            out.append({"models": (a, b), "fraction": fraction, "task": task, "n": len(names), "rho": rho,
                        "tau": tau})
    return out


def _fmt(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:.{digits}f}"  # NaN -> "-"


def _markdown(table: list[Summary], categories: list[Summary], tasks: list[str],
              agreement: list[dict[str, Any]] | None = None, leads: list[dict[str, Any]] | None = None) -> str:
    # only a run with failed rows gets the answered-only columns: elsewhere they would repeat the headline
    failures = sum(row["failed"] for row in table)
    answered = [f"{t} answered" for t in tasks] if failures else []
    head = ["model", "allocator", "tokens", "effective tokens", *tasks, *answered, "retention %", "prefill ms",
            "time ms", "FLOPs", "vision FLOPs", "errors", *(["failed"] if failures else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        cells = [row["model"], row["allocator"], f"{row['budget']} ({100 * row['fraction']:.0f}%)",
                 _fmt(row["effective_tokens"]),
                 *(_fmt(row["tasks"].get(t, float("nan"))) for t in tasks),
                 *(_fmt(row["answered"].get(t, float("nan"))) for t in (tasks if failures else [])),
                 _fmt(row["retention"]), _fmt(row["prefill_ms"], 2), _fmt(row["time_ms"], 2),
                 format_flops(1e12 * row["tflops"]), format_flops(1e12 * row["vision_tflops"]),
                 str(row["errors"]), *([str(row["failed"])] if failures else [])]
        lines.append("| " + " | ".join(cells) + " |")
    if failures:
        lines += ["", f"{failures} rows got no answer (`failed`: an unreadable image, a failed batch; each row's "
                  "`error` in `rows/` names the file or the cause). The task columns count them as wrong answers, the "
                  "`answered` columns leave them out. Once the cause is fixed, rerun with `--resume --retry-errors`."]
    out = ["# Token-budget ablation", "", *lines, ""]
    if agreement:
        out += ["## Do the models agree on the order?", "",
                "Rank correlation of the allocators' scores between two models at one budget (Spearman's rho, "
                "Kendall's tau; 1: the same order, 0: unrelated, -1: reversed).", "",
                "| models | budget | task | allocators | Spearman rho | Kendall tau |", "|---|---|---|---|---|---|"]
        out += [f"| {a} / {b} | {100 * e['fraction']:.0f}% | {e['task']} | {e['n']} | {_fmt(e['rho'], 2)} | "
                f"{_fmt(e['tau'], 2)} |" for e in agreement for a, b in [e["models"]]]
        out.append("")
    if leads:
        out += ["## Who leads, and by how much", "",
                "Per budget, the most accurate allocator and its lead over the runner-up: the mean paired difference "
                "over the same questions, in points, with its standard error (`pyrtok.eval.paired`; rows under an "
                "in-LLM schedule are compared with the same schedule's only). The last column lists the allocators "
                "it does not lead by more than two standard errors.", "",
                "| model | task | budget | leader | accuracy | runner-up | lead (SE) | within 2 SE |",
                "|---|---|---|---|---|---|---|---|"]
        out += [f"| {e['model']} | {e['task']} | {e['budget']} | {e['leader']} | {_fmt(e['value'])} | "
                f"{e['runner_up'] or '-'} | {_fmt(e['lead'])} ({_fmt(e['se'])}) | {', '.join(e['ties']) or '-'} |"
                for e in leads]
        out.append("")
    out += ["## Per category", ""]
    for (model, task), group in _group(categories, "model", "task").items():
        names = sorted({c["category"] for c in group})
        out += [f"### {model} / {task}", "", "| allocator | tokens | " + " | ".join(names) + " |",
                "|" + "---|" * (len(names) + 2)]
        for (allocator, budget), sub in sorted(_group(group, "allocator", "budget").items(), key=lambda kv: -kv[0][1]):
            values = {c["category"]: c["value"] for c in sub}
            out.append(f"| {allocator} | {budget} | " + " | ".join(_fmt(values.get(n, float('nan'))) for n in names)
                       + " |")
        out.append("")
    return "\n".join(out)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _csv(path: Path, records: list[dict], fields: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    os.replace(tmp, path)


# Every series gets its own (colour, marker, linestyle): tab10's colours in turn, a marker from a list whose length
# (9) is coprime to theirs, and the next linestyle after each round of colours, so no two of the first 90 series
# share a style (nor, in practice, a look: colour alone repeats only every 10 series, and then on another linestyle).
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<")
_LINESTYLES = ("-", "--", "-.", ":")
# the full-token line of each model: black, in one of 20 (linestyle, marker) pairs
_REFERENCE_STYLES = ("--", ":", "-.", "-")
_REFERENCE_MARKERS = ("*", "p", "h", "8", "d")
_LEGEND_ROWS = 16  # entries in one legend column of a 4-inch-high figure
# (file name, what goes on x); the budget plot is on a log axis of the percentage of tokens kept
_PLOTS = (("accuracy_vs_budget.png", "budget"), ("accuracy_vs_latency.png", "latency"),
          ("accuracy_vs_flops.png", "flops"))


def _styles(keys: Sequence[tuple]) -> dict[tuple, dict[str, Any]]:
    """A distinct line style for each (model, allocator) key, in the order given."""
    import matplotlib

    colours = matplotlib.colormaps["tab10"].colors
    return {key: {"color": colours[i % len(colours)], "marker": _MARKERS[i % len(_MARKERS)],
                  "linestyle": _LINESTYLES[(i // len(colours)) % len(_LINESTYLES)]} for i, key in enumerate(keys)}


def _percent_label(percent: float) -> str:
    return f"{percent:.0f}" if percent >= 10 else f"{percent:.2g}"


def _budget_ticks(table: list[Summary]) -> tuple[list[float], list[str]]:
    """Tick positions (% of the visual tokens) at the budgets that were run, and their labels: plain numbers, a
    label left off where it would crowd the next larger one on the log axis (within ~17%)."""
    by_budget: dict[tuple, list[float]] = defaultdict(list)
    for row in table:
        if row["fraction"] == row["fraction"]:
            by_budget[(row["model"], row["budget"])].append(100 * row["fraction"])
    positions = sorted({round(100 * b if isinstance(b, float) and b <= 1 else float(np.median(f)), 1)
                        for (_, b), f in by_budget.items()}, reverse=True)
    labels, last = [], None
    for position in positions:  # from the full budget down: 100 is always labelled
        crowded = last is not None and np.log10(last / position) < 0.07
        labels.append("" if crowded else _percent_label(position))
        last = last if crowded else position
    return positions[::-1], labels[::-1]


def _figure(table: list[Summary], tasks: list[str], x: str) -> Any:
    """One figure, one panel per task, the headline metric against ``x``: ``"budget"`` (the % of the visual tokens
    the cell kept, on a log axis ticked at the budgets run), ``"latency"`` (the median time per sample over the
    cell's rows, a bar across their quartiles) or ``"flops"`` (FLOPs per sample, in the unit their magnitude calls
    for). The legend sits outside the panels, on the right. Each line joins one allocator's budgets in order; each
    model's full-token result is a black horizontal line through its own point."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    if x not in ("budget", "latency", "flops"):
        raise ValueError(f"x must be 'budget', 'latency' or 'flops', got {x!r}")
    groups = sorted(_group(table, "model", "allocator").items())
    models = list(dict.fromkeys(model for (model, _), _ in groups))
    styles = _styles([key for key, _ in groups if key[1] != "all"])
    scale, unit = flops_unit(max((r["tflops"] * 1e12 for r in table if r["tflops"] == r["tflops"]), default=1.0))

    def xs(rows: list[Summary]) -> np.ndarray:
        if x == "budget":
            return np.array([100 * r["kept"] for r in rows])
        if x == "latency":
            return np.array([r["time_ms_median"] for r in rows])
        return np.array([1e12 * r["tflops"] / scale for r in rows])

    columns = -(-len(groups) // _LEGEND_ROWS)  # the legend's columns: it must not run off the figure's height
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks) + 2.4 * columns, 4), squeeze=False,
                             layout="constrained")
    for ax, task in zip(axes[0], tasks, strict=True):
        for (model, allocator), group in groups:
            rows = sorted((r for r in group if task in r["tasks"]), key=lambda r: -r["fraction"])
            if not rows:
                continue
            name = f"{model}: {allocator}" if len(models) > 1 else allocator
            ys = np.array([r["tasks"][task] for r in rows])
            if allocator == "all":  # one point per model: the full-token reference
                i = models.index(model)
                style = {"color": "black", "linestyle": _REFERENCE_STYLES[i % len(_REFERENCE_STYLES)]}
                ax.axhline(ys[0], linewidth=1, **style)
                ax.plot(xs(rows)[:1], ys[:1], marker=_REFERENCE_MARKERS[i % len(_REFERENCE_MARKERS)], markersize=9,
                        label=f"{model}: all tokens" if len(models) > 1 else "all tokens", **style)
                continue
            style = styles[(model, allocator)]
            if x == "latency":  # the spread of the cell's timings: its quartiles
                ax.hlines(ys, [r["time_ms_p25"] for r in rows], [r["time_ms_p75"] for r in rows],
                          color=style["color"], alpha=0.25, linewidth=2, zorder=1)
            ax.plot(xs(rows), ys, markersize=5, linewidth=1.3, label=name, **style)
        ax.set_title(task)
        ax.set_ylabel("headline metric")
        ax.grid(alpha=0.3)
        if x == "budget":
            ax.set_xscale("log")
            positions, labels = _budget_ticks(table)
            ax.set_xticks(positions, labels)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(False, which="minor")
            ax.set_xlabel("visual tokens kept (% of all, log scale)")
        elif x == "latency":
            ax.set_xlabel("time per sample (ms): median, bar = quartiles")
        else:
            ax.set_xlabel(f"FLOPs per sample ({unit}): vision + LLM prefill")
    handles: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right center", fontsize=8, frameon=False,
                   ncols=columns)
    return fig


def _plots(table: list[Summary], tasks: list[str], output: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, x in _PLOTS:
        fig = _figure(table, tasks, x)
        path = output / name
        fig.savefig(path.with_name(path.name + ".tmp.png"), dpi=110)
        os.replace(path.with_name(path.name + ".tmp.png"), path)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(rows: Sequence[dict], metrics: dict[str, str], output: str | Path) -> dict[str, Path]:
    """Write ``report.md`` (with who leads at each budget: :func:`pyrtok.eval.paired.leaders`), ``table.csv``,
    ``categories.csv``, with several models ``agreement.csv``
    (:func:`model_agreement`), and the plots (``accuracy_vs_budget.png``, ``accuracy_vs_latency.png``,
    ``accuracy_vs_flops.png``) under ``output``."""
    output = Path(output)
    if not rows:
        raise ValueError("rows is empty: there is nothing to report")
    output.mkdir(parents=True, exist_ok=True)
    table, categories = summarize(rows, metrics)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    paths = {"report": output / "report.md", "table": output / "table.csv", "categories": output / "categories.csv"}
    agreement = model_agreement(table)
    _atomic_write(paths["report"], _markdown(table, categories, tasks, agreement, leaders(rows, metrics)))
    flat = [{**{k: v for k, v in r.items() if k not in ("tasks", "answered")}, **r["tasks"],
             **{f"{t}_answered": v for t, v in r["answered"].items()}} for r in table]
    for r in flat:  # rows of runs that did not record it: "-", as in report.md
        if r["effective_tokens"] != r["effective_tokens"]:
            r["effective_tokens"] = "-"
    _csv(paths["table"], flat, ["model", "allocator", "budget", "fraction", "tokens", "effective_tokens", *tasks,
                                *(f"{t}_answered" for t in tasks), "retention", "prefill_ms", "time_ms", "tflops",
                                "vision_tflops", "errors", "failed"])
    _csv(paths["categories"], categories, ["model", "allocator", "budget", "task", "category", "value", "n"])
    if agreement:
        paths["agreement"] = output / "agreement.csv"
        _csv(paths["agreement"], [{**e, "model_a": e["models"][0], "model_b": e["models"][1]} for e in agreement],
             ["model_a", "model_b", "fraction", "task", "n", "rho", "tau"])
    paths["budget_plot"], paths["latency_plot"], paths["flops_plot"] = _plots(table, tasks, output)
    return paths
