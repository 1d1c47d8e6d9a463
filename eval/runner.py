"""The ablation runner: models x allocators x budgets x tasks -> one result row per sample.

For every task the samples are cut into fixed batches (the same batches whatever the number of
processes); batch ``i`` runs on process ``i % world``. A batch is encoded by the vision tower once and
then answered under every (allocator, budget) cell that still lacks rows for it, so the tower's cost is
shared across the grid. Rows are appended to JSONL as each cell finishes a batch; with ``resume`` a
cell's batch is skipped when all its rows exist and redone whole otherwise, with the same per-batch
seed, so a run killed at any moment and resumed gives the same rows as an uninterrupted one. A sample
whose image cannot be read, whose generation fails or whose answer is empty gets a row with ``error``
set (score 0) and the run goes on.

Every task's records are read, and every allocator spec resolved, before any model loads, so a run with a
missing dataset or a bad spec fails at once and leaves nothing behind (a shard is created with its first row).
With ``retry_errors`` a resumed run also recomputes the cells whose rows record errors (once an image is
fixed, say); the new rows carry a higher ``attempt`` and replace the error rows wherever rows are read.

Budgets in the config are token counts (int) or fractions of a model's tokens (float <= 1). The
full-token cell, allocator ``all`` at N tokens, always runs: it is the reference for retention, and any
allocator's budget of N or more is that cell (every allocator keeps every token there). Below N the ``all``
allocator keeps the coarsest tokens first, and its cells are labelled ``coarse``. Random allocations
depend on the batch a sample shares (the allocator draws for the whole batch), which is why the batches
never depend on the number of processes and the batch size is part of a row's fingerprint.
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pyrtok.eval.config import COARSE, AblationConfig, ModelSpec, TaskSpec
from pyrtok.eval.metrics import get_metric
from pyrtok.eval.outputs import hold, set_aside
from pyrtok.eval.rows import EMPTY_ANSWER, RowWriter, failed, read_rows, row_key
from pyrtok.eval.tasks import load_task
from pyrtok.eval.tasks.prompts import format_question
from tqdm.auto import tqdm

from pyrtok._timing import sync
from pyrtok.allocators import budget_tokens, resolve
from pyrtok.images import open_image
from pyrtok.registry import is_yaml_path
from pyrtok.vlm.schedules import resolve_schedule

__all__ = ["EMPTY_ANSWER", "Cell", "LoadedModel", "load_model", "run"]


@dataclass(frozen=True)
class Cell:
    """One point of the grid for one model and task: ``allocator`` labels its rows, ``spec`` names the
    allocator that runs it (a key of the config's ``allocator_specs``; ``coarse`` cells run ``all``)."""

    allocator: str
    budget: int | float
    fraction: float
    spec: str
    schedule: str | None = None  # a key of the config's ``schedule_specs``: in-LLM dropping after the allocator
    # the config's budget entry the cell stands for (tables of several models line up on it); not part of the key
    requested: int | float | None = field(default=None, compare=False)

    @property
    def selection_key(self) -> str:
        """What seeds the allocator's draws: the label without its schedule, so that a scheduled cell keeps
        exactly the tokens its unscheduled twin keeps (a random allocator included) and differs by the
        schedule alone."""
        return self.allocator if self.schedule is None else self.allocator.removesuffix(f"+{self.schedule}")


@dataclass
class LoadedModel:
    """A model ready to answer: one :class:`~pyrtok.vlm.PyramidVLM` view per allocator, sharing weights."""

    spec: ModelSpec
    vlms: dict[str, Any]
    num_tokens: int | None  # None: every image has its own count (native-resolution models)
    fingerprints: dict[tuple, str] = field(default_factory=dict)  # (task, allocator[, schedule]) -> fingerprint
    schedules: dict[str, Any] = field(default_factory=dict)  # label -> resolved in-LLM schedule

    @property
    def base(self) -> Any:
        return next(iter(self.vlms.values()))


def load_model(spec: ModelSpec, allocators: dict[str, Any], device: torch.device) -> LoadedModel:
    """Load ``spec`` once and wrap it with every allocator (label -> any spec :func:`~pyrtok.allocators.resolve`
    takes, or an allocator), each wrapper with the spec's ``options`` (core and family options)."""
    from pyrtok.vlm import PyramidVLM

    resolved = {name: resolve(allocator, f"allocators[{name}]") for name, allocator in allocators.items()}
    first = PyramidVLM.from_pretrained(spec.resolved_path, mode=spec.mode, levels=spec.levels)
    first.model.to(device)
    options = dict(spec.options)
    if "query_encoder" not in options and any("query" in a.needs for a in resolved.values()):
        options["query_encoder"] = "language"  # questions in the model's own input embeddings (pyrtok.vlm.query)
    try:  # a hub model's options are first checked here (a local folder's when the config loaded)
        vlms = {name: PyramidVLM(first.model, first.processor, allocator=allocator, mode=spec.mode,
                                 levels=spec.levels, **options)
                for name, allocator in resolved.items()}
    except (TypeError, ValueError) as error:
        if not spec.options:
            raise
        raise type(error)(f"models[{spec.name}].options = {spec.options!r}: {error}") from None
    n = None
    probe = next(iter(vlms.values()))  # with the spec's options (Gemma 3's pan-and-scan varies the count)
    if probe.family.fixed_resolution:  # every image is resized to the tower's square: one token count
        with torch.no_grad():
            n = probe.encode(torch.zeros(1, 3, 32, 32, device=device)).tokens.num_tokens
    loaded = LoadedModel(spec, vlms, n)
    first.check_prompt(_prompt(loaded, "what is shown?"), argument=f"models[{spec.name}].prompt")
    return loaded


def _cells(config: AblationConfig, n: int | None) -> list[Cell]:
    """The grid for a model with ``n`` tokens per image; always holds the full-token reference ``all``, and
    labels the ``all`` allocator's cells below full ``coarse``. With ``n`` None (each image has its own count),
    a cell's budget is the config's value, turned into each image's count when it runs."""
    if n is None:
        cells = {Cell("all", 1.0, 1.0, "all", requested=1.0)}
        for name in config.allocators:
            for budget in config.budgets:
                if budget == 1.0 and isinstance(budget, float):
                    continue
                fraction = float(budget) if isinstance(budget, float) else 0.0
                cells.add(Cell(COARSE if name == "all" else name, budget, fraction, name, requested=budget))
        return _with_schedules(config, sorted(cells, key=lambda c: (-c.fraction, -c.budget, c.allocator)))
    cells = {Cell("all", n, 1.0, "all", requested=1.0)}
    for name in config.allocators:
        for budget in config.budgets:
            count = budget_tokens(budget, n)
            if count == n:
                cells.add(Cell("all", n, 1.0, "all", requested=1.0))
            else:
                cells.add(Cell(COARSE if name == "all" else name, count, round(count / n, 4), name,
                               requested=budget))
    return _with_schedules(config, sorted(cells, key=lambda c: (-c.budget, c.allocator)))


def _with_schedules(config: AblationConfig, cells: list[Cell]) -> list[Cell]:
    """``cells``, then each of them again under every in-LLM schedule, labelled ``<allocator>+<schedule>``."""
    return cells + [Cell(f"{c.allocator}+{label}", c.budget, c.fraction, c.spec, label, c.requested)
                    for label in config.schedule_specs for c in cells]


def _fingerprint(model: LoadedModel, task: TaskSpec, cell: Cell) -> str:
    return model.fingerprints[(task.name, cell.spec) if cell.schedule is None else
                              (task.name, cell.spec, cell.schedule)]


def fingerprint(config: AblationConfig, model: ModelSpec, task: TaskSpec, allocator: str,
                schedule: str | None = None) -> str:
    """A short hash of everything that shapes a row besides its key: the model and task specs, the allocator
    with every option it resolves to (defaults included, so a method whose default rule changes between
    versions is recomputed, however it is named), the seed and the batch size. Rows of another fingerprint are
    never taken as done, so a resumed run with a changed config recomputes instead of mixing results."""
    method = resolve(config.allocator_specs[allocator], f"allocators[{allocator}]")
    options = method.config()
    if getattr(method, "views", "joint") != "joint":  # how it runs on LLaVA-NeXT's views, a class-level rule
        options = {**options, "views": method.views}
    parts = [asdict(model), asdict(task), options, config.seed, config.batch_size]
    if schedule is not None:
        # "twin-seeded": a scheduled cell draws its allocator's randomness as its unscheduled twin does
        parts += [_content(config.schedule_specs[schedule]), "twin-seeded"]
    payload = json.dumps(parts, sort_keys=True, default=str)
    return f"{zlib.crc32(payload.encode()):08x}"


def _content(spec: Any) -> Any:
    """A spec as it shapes rows: a YAML file by its text, anything else as it is."""
    return Path(spec).read_text() if isinstance(spec, str) and is_yaml_path(spec) and Path(spec).is_file() else spec


def _load_image(record: dict[str, Any]) -> Image.Image:
    """The record's image, RGB (a HF task's :class:`~pyrtok.eval.tasks.hf.DatasetImage` decoded now); the
    model's family turns it into the pixels the model sees."""
    from pyrtok.eval.tasks.hf import DatasetImage

    image = record["image"]
    return open_image(image.open() if isinstance(image, DatasetImage) else image)


class _PrefillClock:
    """Notes when the prefill ended, once the device has finished it (neither generation loop waits for the
    device before calling these): :meth:`criterion` is a stopping criterion that never stops (HF generate calls
    it once the first token exists), :meth:`processor` a logits processor that changes nothing (the scheduled
    loop calls it on the prefill's logits, before the first token is chosen)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.at: float | None = None

    def _mark(self) -> None:
        if self.at is None:
            sync(self.device)
            self.at = time.perf_counter()

    def criterion(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self._mark()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def processor(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._mark()
        return scores


def _question(task: TaskSpec, record: dict[str, Any]) -> str:
    """The user text of a sample: the task's prompt convention, or the bare question with pre/post text."""
    if task.prompt_task:
        return format_question(task.prompt_task, record, task.pre_prompt, task.post_prompt)
    return f"{task.pre_prompt or ''}{record['question']}{task.post_prompt or ''}"


def _prompt(model: LoadedModel, question: str) -> str:
    """The model's prompt for ``question``: the spec's format, or the model's own chat template."""
    if model.spec.prompt is None:
        return model.base.chat_prompt(question)
    return model.spec.prompt.format(question=question)


def _seed(*parts: Any) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def _budgets(model: LoadedModel, cell: Cell, encoded: Any) -> int | torch.Tensor:
    """The cell's budget: its token count, or (native-resolution models) its value, which
    :func:`pyrtok.budget.sample_budgets` turns into each image's own count."""
    return int(cell.budget) if model.num_tokens is not None else cell.budget


def _answer(model: LoadedModel, cell: Cell, encoded: Any, prompts: list[str], questions: list[str],
            generator: torch.Generator
            ) -> tuple[list[str], torch.Tensor, float, float, float, list[int], list[list[int]] | None, list[int],
                       float, list[float]]:
    """Texts, image placeholders per sample, allocation / prefill / total LLM seconds, prompt lengths, (with an
    in-LLM schedule) the tokens each decoder layer ran on, the tokens the allocator kept, the seconds of
    vision work deferred until the selection was known (LLaVA-NeXT's lazy tiles) and the vision FLOPs of each
    sample, for one batch. An allocator that reads the question gets it from the model's query encoder (timed as
    allocation)."""
    from transformers import StoppingCriteriaList

    vlm = model.vlms[cell.spec]
    device = vlm.device
    sync(device)
    start = time.perf_counter()
    query = vlm.encode_query(questions) if "query" in vlm.allocator.needs else None
    selections = vlm.select(encoded, _budgets(model, cell, encoded), query=query, generator=generator)
    sync(device)
    allocated = time.perf_counter()
    encoded = vlm.complete(encoded, selections)  # deferred vision work (LLaVA-NeXT's lazy tiles), timed as vision
    sync(device)
    deferred = time.perf_counter() - allocated
    timer = _PrefillClock(device)
    started = time.perf_counter()
    if cell.schedule is None:
        out = vlm.generate(None, prompts, encoded=encoded, selections=selections,
                           max_new_tokens=model.spec.max_new_tokens,
                           stopping_criteria=StoppingCriteriaList([timer.criterion]))
    else:  # the scheduled loop takes no stopping criteria, but calls logits processors from the prefill's logits
        out = vlm.generate(None, prompts, encoded=encoded, selections=selections,
                           max_new_tokens=model.spec.max_new_tokens, schedule=model.schedules[cell.schedule],
                           logits_processor=[timer.processor])
    sync(device)
    done = time.perf_counter()
    layers = None if out.layer_tokens is None else out.layer_tokens.tolist()
    return (out.texts, out.counts, allocated - start, (timer.at or done) - started, done - started,
            out.prompt_lengths.tolist(), layers, encoded.kept(selections), deferred, encoded.vision_flops())


def _flops(model: LoadedModel, prompt_tokens: int) -> float:
    """LLM prefill FLOPs of one sample."""
    from pyrtok.vlm.flops import llm_prefill_flops

    return llm_prefill_flops(model.base.model.config.text_config, prompt_tokens)


def _rows_for_batch(model: LoadedModel, task: TaskSpec, cell: Cell, records: list[dict], answers: list[str],
                    counts: list[int], timing: dict[str, float], lengths: list[int],
                    score: Callable[[str, dict], float], vision_flops: list[float],
                    image_tokens: list[int], kept: list[int], layer_tokens: list[list[int]] | None = None
                    ) -> list[dict]:
    from pyrtok.vlm.decode import scheduled_flops

    rows = []
    per_layer = layer_tokens or [None] * len(records)
    for record, text, count, length, vision, n, k, layers in zip(records, answers, counts, lengths, vision_flops,
                                                                 image_tokens, kept, per_layer, strict=True):
        llm_flops, effective = _flops(model, length), float(count)
        if layers is not None:  # in-LLM dropping: each layer's cost at its own length
            llm_flops = float(scheduled_flops(model.base.model.config, torch.tensor([layers]))[0])
            text_tokens = length - int(count)
            effective = sum(t - text_tokens for t in layers) / len(layers)
        error, value = (None, 0.0) if text else (EMPTY_ANSWER, 0.0)
        if text:
            try:
                value = float(score(text, record))
            except Exception as failure:  # a malformed record: recorded, the run goes on
                error = f"score: {type(failure).__name__}: {failure}"
        row = _base_row(model, task, cell, record)
        row.update(prediction=text, score=value, tokens=int(count),
                   prompt_tokens=int(length), vision_s=timing["vision"], allocation_s=timing["allocation"],
                   prefill_s=timing["prefill"], llm_s=timing["llm"],
                   time_s=timing["vision"] + timing["allocation"] + timing["llm"],
                   tflops=(vision + llm_flops) / 1e12, llm_tflops=llm_flops / 1e12, vision_tflops=vision / 1e12,
                   effective_tokens=round(effective, 4), error=error)
        if model.num_tokens is None:  # each image has its own count: the fraction this sample kept
            row["fraction"] = round(k / n, 4)
        rows.append(row)
    return rows


def _base_row(model: LoadedModel, task: TaskSpec, cell: Cell, record: dict) -> dict[str, Any]:
    extra = {k: v for k, v in record.items() if k != "image" and _jsonable(v)}
    return {**extra, "model": model.spec.name, "allocator": cell.allocator, "budget": cell.budget,
            "task": task.name, "id": str(record["id"]), "fraction": cell.fraction, "requested": cell.requested,
            "fingerprint": _fingerprint(model, task, cell)}


def _jsonable(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, type(None))) or (
        isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value))


def _error_rows(model: LoadedModel, task: TaskSpec, cell: Cell, records: list[dict], error: str) -> list[dict]:
    return [{**_base_row(model, task, cell, r), "prediction": "", "score": 0.0, "tokens": None, "error": error}
            for r in records]


def run(config: AblationConfig, resume: bool = False, fresh: bool = False, progress: bool = True,
        retry_errors: bool = False) -> tuple[Path, list[dict]]:
    """Run the grid ``config`` describes; returns the output folder and, on the main process, all rows.

    ``resume`` keeps earlier rows and runs what is missing; ``fresh`` moves everything the output folder holds
    into a sibling ``<output>.previous-<UTC time>`` first (see :func:`pyrtok.eval.outputs.set_aside`; once the
    tasks and allocators have been checked, so a failing run moves nothing) and says where on stderr; nothing is
    ever deleted. ``retry_errors`` (with ``resume``) also recomputes every cell of a batch where a row records an
    error other than an empty answer. The run holds the output folder's lock from its checks to its last row.

    Raises:
        FileExistsError: rows already exist and neither ``resume`` nor ``fresh`` is set.
        FileNotFoundError, ValueError: a task's records cannot be read or an allocator spec does not resolve;
            raised before any model loads and before anything is written.
        pyrtok.eval.outputs.OutputInUseError: another run holds the output folder (an ``OSError``).
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    if retry_errors and not resume:
        raise ValueError("retry_errors=True recomputes error rows of an earlier run, so it needs resume=True")
    # PartialState only forms a CPU process group when told it runs on CPU (Accelerator reads this flag itself)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    output = config.output
    _check_unclaimed(output, resume or fresh)
    allocators = {label: resolve(spec, f"allocators[{label}]") for label, spec in config.allocator_specs.items()}
    records = {}
    for task in config.tasks:
        with state.main_process_first():  # the shapes benchmark is written to disk on first use: once
            records[task.name] = load_task(task)
    state.wait_for_everyone()
    with hold(output, state):  # created here, after the checks: a run that fails on its config leaves nothing
        _check_unclaimed(output, resume or fresh)  # again: a run that held the folder may have ended meanwhile
        if state.is_main_process and fresh:
            aside = set_aside(output)
            if aside is not None:
                print(f"pyrtok ablate: earlier run set aside in {aside}", file=sys.stderr, flush=True)
        state.wait_for_everyone()
        return _run_grid(config, state, allocators, records, retry_errors, progress)


def _check_unclaimed(output: Path, restart: bool) -> None:
    """Refuse to mix a new run into rows already in ``output`` unless told how (``restart``: resume or fresh)."""
    # an empty shard is what a run that failed before its first row left behind: it holds nothing to protect
    if not restart and any(p.stat().st_size for p in (output / "rows").glob("rows-*.jsonl")):
        raise FileExistsError(f"{output} already holds rows; pass --resume to continue it, or --fresh to set them "
                              f"aside and restart")


def _run_grid(config: AblationConfig, state: Any, allocators: dict[str, Any], records: dict[str, list[dict]],
              retry_errors: bool, progress: bool) -> tuple[Path, list[dict]]:
    """The body of :func:`run` once the output folder is held and cleared as asked."""
    output = config.output
    if state.is_main_process:
        config.save(output / "config.yaml")
    previous = {row_key(r): r for r in read_rows(output)}
    expected: set[tuple] = set()
    writer = RowWriter(output, state.process_index, state.num_processes)
    try:
        for spec in config.models:
            model = load_model(spec, allocators, state.device)
            model.fingerprints = {(t.name, a): fingerprint(config, spec, t, a) for t in config.tasks
                                  for a in config.allocator_specs}
            model.fingerprints.update({(t.name, a, s): fingerprint(config, spec, t, a, s) for t in config.tasks
                                       for a in config.allocator_specs for s in config.schedule_specs})
            model.schedules = {s: resolve_schedule(v, f"schedules[{s}]") for s, v in config.schedule_specs.items()}
            cells = _cells(config, model.num_tokens)
            for task in config.tasks:
                expected |= _run_task(config, model, task, records[task.name], cells, previous, retry_errors,
                                      writer, state, progress)
            del model
    finally:
        writer.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return output, []
    # only this grid's rows: the folder may also hold rows of an earlier, wider or different config
    return output, [r for r in read_rows(output) if row_key(r) in expected]


def _retryable(row: dict[str, Any]) -> bool:
    """Whether a row records a failure that a rerun may not repeat (an empty answer is the model's own)."""
    return failed(row)


def _image_error(record: dict[str, Any], error: Exception) -> str:
    """The error of a sample whose image cannot be opened, naming where the image was to come from (so the
    file to fix is in the row): ``image: <file or dataset row>: <exception>``."""
    from pyrtok.eval.tasks.hf import DatasetImage

    image = record.get("image")
    if isinstance(image, (str, Path)):
        source = str(image)
    elif isinstance(image, DatasetImage):
        files = [f.get("filename") for f in getattr(image.dataset, "cache_files", None) or [] if f.get("filename")]
        name = getattr(getattr(image.dataset, "info", None), "dataset_name", None)
        where = (files[0] if len(files) == 1 else f"the dataset in {Path(files[0]).parent}" if files
                 else f"the dataset {name}" if name else "its dataset")
        source = f"row {image.row} ({image.column!r}) of {where}"
    elif image is None:
        source = "the record has no image"
    else:
        source = f"an in-memory {type(image).__name__}"
    return f"image: {source}: {type(error).__name__}: {error}"


def _run_task(config: AblationConfig, model: LoadedModel, task: TaskSpec, records: list[dict], cells: list[Cell],
              previous: dict[tuple, dict], retry_errors: bool, writer: RowWriter, state: Any,
              progress: bool) -> set[tuple]:
    """Run what is missing of ``task`` on this process's batches; returns the keys of the whole task grid.

    ``previous`` maps keys to the rows an earlier run left; with ``retry_errors`` a cell's batch is redone when
    one of its rows records a retryable error, and every row it writes then carries the next ``attempt``.
    """
    metric = get_metric(task.metric)

    def key(cell: Cell, record: dict) -> tuple:
        return (model.spec.name, cell.allocator, cell.budget, task.name, str(record["id"]),
                _fingerprint(model, task, cell))

    def done(cell: Cell, record: dict) -> bool:
        row = previous.get(key(cell, record))
        return row is not None and not (retry_errors and _retryable(row))

    def write(rows: list[dict], retried: bool) -> None:
        """Append one cell's ``rows``, each stamped with its attempt: one past the earlier row's in a retried
        cell (so it replaces that row when rows are read), the earlier row's own when a batch is redone."""
        for row in rows:
            earlier = previous.get(row_key(row))
            row["attempt"] = 0 if earlier is None else int(earlier.get("attempt", 0)) + retried
        writer.write(rows)

    grid = {key(c, r) for c in cells for r in records}
    size = config.batch_size
    batches = [records[i : i + size] for i in range(0, len(records), size)]
    mine = list(range(state.process_index, len(batches), state.num_processes))
    bar = tqdm(total=len(mine) * len(cells), unit="cell-batch", desc=f"{model.spec.name}/{task.name}, cells x batches",
               disable=not progress or not state.is_local_main_process)
    base = model.base
    for index in mine:
        batch = batches[index]
        todo = [c for c in cells if not all(done(c, r) for r in batch)]
        bar.update(len(cells) - len(todo))
        if not todo:
            continue
        retried = {c for c in todo if retry_errors and any(_retryable(previous.get(key(c, r), {})) for r in batch)}
        images, good, prompts = [], [], []
        for record in batch:
            try:
                image = _load_image(record)
            except Exception as error:
                for c in todo:
                    write(_error_rows(model, task, c, [record], _image_error(record, error)),
                          c in retried)
                continue
            try:
                prompts.append(_prompt(model, _question(task, record)))
            except Exception as error:
                for c in todo:
                    write(_error_rows(model, task, c, [record], f"prompt: {type(error).__name__}: {error}"),
                          c in retried)
                continue
            images.append(image)
            good.append(record)
        if not good:
            bar.update(len(todo))
            continue
        with torch.no_grad():
            try:
                encoded, vision = _encode(base, images)
            except Exception:
                # an image the model cannot take (e.g. an aspect ratio its processor refuses) must not stop the
                # run: find it by encoding one image at a time, record it, go on with the others
                failed = {}
                for i, image in enumerate(images):
                    try:
                        base.encode([image])
                    except Exception as error:
                        failed[i] = f"encode: {type(error).__name__}: {error}"
                for i, message in failed.items():
                    for c in todo:
                        write(_error_rows(model, task, c, [good[i]], message), c in retried)
                kept = [i for i in range(len(images)) if i not in failed]
                images, good, prompts = [images[i] for i in kept], [good[i] for i in kept], [prompts[i] for i in kept]
                if not good:
                    bar.update(len(todo))
                    continue
                encoded, vision = _encode(base, images)
            for cell in todo:
                generator = torch.Generator(device=base.device).manual_seed(
                    _seed(config.seed, model.spec.name, task.name, index, cell.selection_key, cell.budget))
                write(_answer_cell(model, task, cell, good, encoded, prompts, generator, vision,
                                   metric.score, config.seed), cell in retried)
                bar.update(1)
    bar.close()
    return grid


def _encode(base: Any, images: list[Image.Image]) -> tuple[Any, float]:
    """The batch encoded once, and the vision seconds per image."""
    sync(base.device)
    start = time.perf_counter()
    encoded = base.encode(images)
    sync(base.device)
    return encoded, (time.perf_counter() - start) / len(images)


def _answer_cell(model: LoadedModel, task: TaskSpec, cell: Cell, records: list[dict], encoded: Any,
                 prompts: list[str], generator: torch.Generator, vision: float,
                 score: Callable[[str, dict], float], seed: int) -> list[dict]:
    """Rows of one cell on one batch; a failing batch is retried sample by sample to isolate the failure
    (each retry seeded from its sample id, not from the failed batch's generator state)."""
    try:
        # the bare question, without the task's pre/post prompt (CDPruner strips the short-answer suffix)
        questions = [str(record["question"]) for record in records]
        texts, counts, allocation, prefill, llm, lengths, layers, kept, deferred, vision_flops = _answer(
            model, cell, encoded, prompts, questions, generator)
    except Exception as error:
        if len(records) == 1:
            return _error_rows(model, task, cell, records, f"{type(error).__name__}: {error}")
        rows = []
        for i in range(len(records)):
            one = torch.Generator(device=model.base.device).manual_seed(
                _seed(seed, model.spec.name, task.name, records[i]["id"], cell.selection_key, cell.budget))
            rows += _answer_cell(model, task, cell, records[i : i + 1], encoded.subset([i]), prompts[i : i + 1],
                                 one, vision, score, seed)
        return rows
    b = len(records)
    timing = {"vision": vision + deferred / b, "allocation": allocation / b, "prefill": prefill / b, "llm": llm / b}
    return _rows_for_batch(model, task, cell, records, texts, counts.tolist(), timing, lengths, score,
                           vision_flops, encoded.sample_tokens(), kept, layers)
