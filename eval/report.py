"""Reports of an ablation: the papers' table (Markdown + CSV), a per-category breakdown, and plots.

One table row per (model, allocator, budget): the headline metric of every task, the average retention
(each task's metric as a percentage of the same model's full-token metric, averaged over tasks), the mean
kept tokens, the mean prefill and end-to-end times per sample, and TFLOPs per sample (vision + LLM prefill).
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
from pyrtok.eval.config import COARSE
from pyrtok.eval.metrics import get_metric
from pyrtok.eval.rows import failed

__all__ = ["Summary", "summarize", "write_report"]

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


def summarize(rows: Sequence[dict], metrics: dict[str, str]) -> tuple[list[Summary], list[Summary]]:
    """(table, categories) from result rows; ``metrics`` maps each task name to its metric name.

    ``table``: one entry per (model, allocator, budget) with ``tasks`` = {task: headline value}, the
    ``retention`` (%), ``tokens``, ``effective_tokens`` (image tokens averaged over the decoder layers: below
    ``tokens`` under an in-LLM schedule; NaN where no row recorded it), ``prefill_ms``, ``time_ms``, ``tflops``,
    ``vision_tflops`` (the vision tower's share: lower than the full row's where LLaVA-NeXT's lazy tiles skipped
    tiles), ``errors`` (rows with an error, empty answers included), ``failed`` (rows without an answer) and
    ``answered`` = {task: headline value over the rows with an answer} (NaN where every row failed).
    ``categories``: one entry per (model, allocator, budget, task, category) with the headline value.
    """
    rows = [{**r, "allocator": COARSE} if r["allocator"] == "all" and r.get("fraction", 1.0) < 1.0 else r
            for r in rows]  # older runs labelled these "all"
    full: dict[tuple, float] = {}
    cells: dict[tuple, dict[str, Any]] = {}
    categories = []
    for (model, allocator, budget, task), group in _group(rows, "model", "allocator", "budget", "task").items():
        metric = get_metric(metrics[task])
        value = metric.summarize(group)[metric.main]
        cell = cells.setdefault((model, allocator, budget), {"model": model, "allocator": allocator, "budget": budget,
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
        table.append(cell)
    return table, categories


def _fmt(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:.{digits}f}"  # NaN -> "-"


def _markdown(table: list[Summary], categories: list[Summary], tasks: list[str]) -> str:
    # only a run with failed rows gets the answered-only columns: elsewhere they would repeat the headline
    failures = sum(row["failed"] for row in table)
    answered = [f"{t} answered" for t in tasks] if failures else []
    head = ["model", "allocator", "tokens", "effective tokens", *tasks, *answered, "retention %", "prefill ms",
            "time ms", "TFLOPs", "vision TFLOPs", "errors", *(["failed"] if failures else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        cells = [row["model"], row["allocator"], f"{row['budget']} ({100 * row['fraction']:.0f}%)",
                 _fmt(row["effective_tokens"]),
                 *(_fmt(row["tasks"].get(t, float("nan"))) for t in tasks),
                 *(_fmt(row["answered"].get(t, float("nan"))) for t in (tasks if failures else [])),
                 _fmt(row["retention"]), _fmt(row["prefill_ms"], 2), _fmt(row["time_ms"], 2), f"{row['tflops']:.3g}",
                 "-" if row["vision_tflops"] != row["vision_tflops"] else f"{row['vision_tflops']:.3g}",
                 str(row["errors"]), *([str(row["failed"])] if failures else [])]
        lines.append("| " + " | ".join(cells) + " |")
    if failures:
        lines += ["", f"{failures} rows got no answer (`failed`: an unreadable image, a failed batch; each row's "
                  "`error` in `rows/` names the file or the cause). The task columns count them as wrong answers, the "
                  "`answered` columns leave them out. Once the cause is fixed, rerun with `--resume --retry-errors`."]
    out = ["# Token-budget ablation", "", *lines, "", "## Per category", ""]
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


def _plots(table: list[Summary], tasks: list[str], output: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, x_field, x_label in (("accuracy_vs_budget.png", "tokens", "visual tokens kept"),
                                   ("accuracy_vs_latency.png", "time_ms", "time per sample (ms)")):
        fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
        for ax, task in zip(axes[0], tasks, strict=True):
            for (model, allocator), group in sorted(_group(table, "model", "allocator").items()):
                points = sorted((r[x_field], r["tasks"][task]) for r in group if task in r["tasks"])
                if allocator == "all":  # one point per model: the full-token reference
                    ax.axhline(points[0][1], color="black", linestyle="--", linewidth=1, label=f"{model}: all tokens")
                    continue
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=f"{model}: {allocator}" if len({r['model'] for r in table}) > 1
                        else allocator)
            ax.set_title(task)
            ax.set_xlabel(x_label)
            ax.set_ylabel("headline metric")
            if x_field == "tokens":
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = output / name
        fig.savefig(path.with_name(path.name + ".tmp.png"), dpi=110)
        os.replace(path.with_name(path.name + ".tmp.png"), path)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(rows: Sequence[dict], metrics: dict[str, str], output: str | Path) -> dict[str, Path]:
    """Write ``report.md``, ``table.csv``, ``categories.csv`` and the two plots under ``output``."""
    output = Path(output)
    if not rows:
        raise ValueError("rows is empty: there is nothing to report")
    output.mkdir(parents=True, exist_ok=True)
    table, categories = summarize(rows, metrics)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    paths = {"report": output / "report.md", "table": output / "table.csv", "categories": output / "categories.csv"}
    _atomic_write(paths["report"], _markdown(table, categories, tasks))
    flat = [{**{k: v for k, v in r.items() if k not in ("tasks", "answered")}, **r["tasks"],
             **{f"{t}_answered": v for t, v in r["answered"].items()}} for r in table]
    for r in flat:  # rows of runs that did not record it: "-", as in report.md
        if r["effective_tokens"] != r["effective_tokens"]:
            r["effective_tokens"] = "-"
    _csv(paths["table"], flat, ["model", "allocator", "budget", "fraction", "tokens", "effective_tokens", *tasks,
                                *(f"{t}_answered" for t in tasks), "retention", "prefill_ms", "time_ms", "tflops",
                                "vision_tflops", "errors", "failed"])
    _csv(paths["categories"], categories, ["model", "allocator", "budget", "task", "category", "value", "n"])
    paths["budget_plot"], paths["latency_plot"] = _plots(table, tasks, output)
    return paths
