"""The ablation runner: models x allocators x budgets x tasks -> one result row per sample.

For every task the samples are cut into fixed batches (the same batches whatever the number of
processes); batch ``i`` runs on process ``i % world``. A batch is encoded by the vision tower once and
then answered under every (allocator, budget) cell that still lacks rows for it, so the tower's cost is
shared across the grid. Rows are appended to JSONL as each cell finishes a batch; with ``resume`` a
cell's batch is skipped when all its rows exist and redone whole otherwise, with the same per-batch
seed, so a run killed at any moment and resumed gives the same rows as an uninterrupted one. A sample
whose image cannot be read, whose generation fails or whose answer is empty gets a row with ``error``
set (score 0) and the run goes on.

Budgets in the config are token counts (int) or fractions of a model's tokens (float <= 1). The
full-token cell, allocator ``all`` at N tokens, always runs: it is the reference for retention, and any
allocator's budget of N or more is that cell (every allocator keeps every token there). Random allocations
depend on the batch a sample shares (the allocator draws for the whole batch), which is why the batches
never depend on the number of processes and the batch size is part of a row's fingerprint.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pyrtok.eval.config import AblationConfig, ModelSpec, TaskSpec
from pyrtok.eval.metrics import get_metric
from pyrtok.eval.rows import RowWriter, read_rows, row_key
from pyrtok.eval.tasks import load_task
from pyrtok.eval.tasks.prompts import format_question
from tqdm.auto import tqdm

from pyrtok.images import image_tensor

__all__ = ["Cell", "LoadedModel", "load_model", "run"]


@dataclass(frozen=True)
class Cell:
    """One point of the grid for one model and task."""

    allocator: str
    budget: int
    fraction: float


@dataclass
class LoadedModel:
    """A model ready to answer: one :class:`~pyrtok.vlm.PyramidVLM` view per allocator, sharing weights."""

    spec: ModelSpec
    vlms: dict[str, Any]
    num_tokens: int
    image_size: int
    fingerprints: dict[tuple[str, str], str] = field(default_factory=dict)  # (task, allocator) -> fingerprint

    @property
    def base(self) -> Any:
        return next(iter(self.vlms.values()))


def load_model(spec: ModelSpec, allocators: dict[str, Any], device: torch.device) -> LoadedModel:
    """Load ``spec`` once and wrap it with every allocator (name -> allocator spec)."""
    from pyrtok.vlm import PyramidVLM

    first = PyramidVLM.from_pretrained(spec.resolved_path, mode=spec.mode, levels=spec.levels)
    first.model.to(device)
    vlms = {name: PyramidVLM(first.model, first.tokenizer, allocator=allocator, mode=spec.mode, levels=spec.levels)
            for name, allocator in allocators.items()}
    image_size = int(first.model.config.vision_config.image_size)
    with torch.no_grad():
        n = first.encode(torch.zeros(1, 3, image_size, image_size, device=device)).num_tokens
    return LoadedModel(spec, vlms, n, image_size)


def _cells(config: AblationConfig, n: int) -> list[Cell]:
    """The grid for a model with ``n`` tokens; always holds the full-token reference ``all`` at ``n``."""
    cells = {Cell("all", n, 1.0)}
    for name in config.allocators:
        for budget in config.budgets:
            # the epsilon keeps 0.07 * 100 at 7 tokens, not 8
            count = min(n, budget if isinstance(budget, int) else max(1, math.ceil(budget * n - 1e-9)))
            cells.add(Cell("all" if count == n else name, count, round(count / n, 4)))
    return sorted(cells, key=lambda c: (-c.budget, c.allocator))


def fingerprint(config: AblationConfig, model: ModelSpec, task: TaskSpec, allocator: str) -> str:
    """A short hash of everything that shapes a row besides its key: the model, task and allocator specs
    (an allocator YAML by its content), the seed and the batch size. Rows of another fingerprint are never
    taken as done, so a resumed run with a changed config recomputes instead of mixing results."""
    spec = config.allocator_specs[allocator]
    if isinstance(spec, str) and spec.endswith((".yaml", ".yml")) and Path(spec).is_file():
        spec = Path(spec).read_text()
    payload = json.dumps([asdict(model), asdict(task), spec, config.seed, config.batch_size], sort_keys=True,
                         default=str)
    return f"{zlib.crc32(payload.encode()):08x}"


def _load_image(record: dict[str, Any], size: int) -> torch.Tensor:
    """(3, size, size) float in [0, 1] from a path or a PIL image (LLaVA-1.5 resizes, so do we)."""
    image = record["image"]
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    return image_tensor(image.convert("RGB").resize((size, size), Image.BICUBIC))


class _FirstToken:
    """A stopping criterion that never stops: it notes when the first new token exists (end of prefill)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.at is None:
            self.at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _question(task: TaskSpec, record: dict[str, Any]) -> str:
    """The user text of a sample: the task's prompt convention, or the bare question with pre/post text."""
    if task.prompt_task:
        return format_question(task.prompt_task, record, task.pre_prompt, task.post_prompt)
    return f"{task.pre_prompt or ''}{record['question']}{task.post_prompt or ''}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seed(*parts: Any) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def _answer(model: LoadedModel, cell: Cell, images: torch.Tensor, tokens: Any, prompts: list[str],
            generator: torch.Generator) -> tuple[list[str], torch.Tensor, float, float, float, list[int]]:
    """Texts, kept counts, allocation / prefill / total LLM seconds and prompt lengths for one batch."""
    from transformers import StoppingCriteriaList

    vlm, device = model.vlms[cell.allocator], images.device
    _sync(device)
    start = time.perf_counter()
    selection = vlm.select(tokens, images, cell.budget, generator=generator)
    _sync(device)
    allocated = time.perf_counter()
    timer = _FirstToken()
    out = vlm.generate(images, prompts, tokens=tokens, selection=selection, max_new_tokens=model.spec.max_new_tokens,
                       stopping_criteria=StoppingCriteriaList([timer]))
    _sync(device)
    done = time.perf_counter()
    return (out.texts, out.counts, allocated - start, (timer.at or done) - allocated, done - allocated,
            out.prompt_lengths.tolist())


def _flops(model: LoadedModel, prompt_tokens: int) -> tuple[float, float]:
    """(vision, LLM prefill) FLOPs of one sample."""
    from pyrtok.vlm.flops import llm_prefill_flops, vit_flops

    config = model.base.model.config
    vision = config.vision_config
    patches = (model.image_size // vision.patch_size) ** 2
    tower = vit_flops(vision, patches) if model.spec.mode == "feature" else sum(
        vit_flops(vision, max(1, patches >> (2 * level))) for level in range(model.spec.levels))
    return tower, llm_prefill_flops(config.text_config, prompt_tokens)


def _rows_for_batch(model: LoadedModel, task: TaskSpec, cell: Cell, records: list[dict], answers: list[str],
                    counts: list[int], timing: dict[str, float], lengths: list[int],
                    score: Callable[[str, dict], float]) -> list[dict]:
    rows = []
    for record, text, count, length in zip(records, answers, counts, lengths, strict=True):
        vision_flops, llm_flops = _flops(model, length)
        error, value = (None, 0.0) if text else ("empty answer", 0.0)
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
                   tflops=(vision_flops + llm_flops) / 1e12, llm_tflops=llm_flops / 1e12, error=error)
        rows.append(row)
    return rows


def _base_row(model: LoadedModel, task: TaskSpec, cell: Cell, record: dict) -> dict[str, Any]:
    extra = {k: v for k, v in record.items() if k != "image" and _jsonable(v)}
    return {**extra, "model": model.spec.name, "allocator": cell.allocator, "budget": cell.budget,
            "task": task.name, "id": str(record["id"]), "fraction": cell.fraction,
            "fingerprint": model.fingerprints[(task.name, cell.allocator)]}


def _jsonable(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, type(None))) or (
        isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value))


def _error_rows(model: LoadedModel, task: TaskSpec, cell: Cell, records: list[dict], error: str) -> list[dict]:
    return [{**_base_row(model, task, cell, r), "prediction": "", "score": 0.0, "tokens": None, "error": error}
            for r in records]


def run(config: AblationConfig, resume: bool = False, fresh: bool = False,
        progress: bool = True) -> tuple[Path, list[dict]]:
    """Run the grid ``config`` describes; returns the output folder and, on the main process, all rows.

    ``resume`` keeps earlier rows and runs what is missing; ``fresh`` deletes earlier rows first.

    Raises:
        FileExistsError: rows already exist and neither ``resume`` nor ``fresh`` is set.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # PartialState only forms a CPU process group when told it runs on CPU (Accelerator reads this flag itself)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    output = config.output
    if not (resume or fresh) and any((output / "rows").glob("rows-*.jsonl")):  # every process sees the same
        raise FileExistsError(f"{output} already holds rows; pass --resume to continue it or --fresh to restart")
    state.wait_for_everyone()
    if state.is_main_process and fresh and (output / "rows").is_dir():
        shutil.rmtree(output / "rows")
    state.wait_for_everyone()
    if state.is_main_process:
        config.save(output / "config.yaml")
    done = {row_key(r) for r in read_rows(output)}
    expected: set[tuple] = set()
    writer = RowWriter(output, state.process_index, state.num_processes)
    try:
        for spec in config.models:
            model = load_model(spec, config.allocator_specs, state.device)
            model.fingerprints = {(t.name, a): fingerprint(config, spec, t, a) for t in config.tasks
                                  for a in config.allocator_specs}
            cells = _cells(config, model.num_tokens)
            for task in config.tasks:
                expected |= _run_task(config, model, task, cells, done, writer, state, progress)
            del model
    finally:
        writer.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return output, []
    # only this grid's rows: the folder may also hold rows of an earlier, wider or different config
    return output, [r for r in read_rows(output) if row_key(r) in expected]


def _run_task(config: AblationConfig, model: LoadedModel, task: TaskSpec, cells: list[Cell], done: set,
              writer: RowWriter, state: Any, progress: bool) -> set[tuple]:
    """Run what is missing of ``task`` on this process's batches; returns the keys of the whole task grid."""
    with state.main_process_first():  # the shapes benchmark is written to disk on first use: once
        records = load_task(task)
    metric = get_metric(task.metric)

    def key(cell: Cell, record: dict) -> tuple:
        return (model.spec.name, cell.allocator, cell.budget, task.name, str(record["id"]),
                model.fingerprints[(task.name, cell.allocator)])

    grid = {key(c, r) for c in cells for r in records}
    size = config.batch_size
    batches = [records[i : i + size] for i in range(0, len(records), size)]
    mine = list(range(state.process_index, len(batches), state.num_processes))
    bar = tqdm(total=len(mine) * len(cells), desc=f"{model.spec.name}/{task.name}",
               disable=not progress or not state.is_local_main_process)
    base = model.base
    for index in mine:
        batch = batches[index]
        todo = [c for c in cells if any(key(c, r) not in done for r in batch)]
        bar.update(len(cells) - len(todo))
        if not todo:
            continue
        images, good, prompts = [], [], []
        for record in batch:
            try:
                image = _load_image(record, model.image_size)
            except Exception as error:
                writer.write(row for c in todo for row in _error_rows(model, task, c, [record],
                                                                      f"image: {type(error).__name__}: {error}"))
                continue
            try:
                prompts.append(model.spec.prompt.format(question=_question(task, record)))
            except Exception as error:
                writer.write(row for c in todo for row in _error_rows(model, task, c, [record],
                                                                      f"prompt: {type(error).__name__}: {error}"))
                continue
            images.append(image)
            good.append(record)
        if not good:
            bar.update(len(todo))
            continue
        with torch.no_grad():
            pixels = base.encoder.prepare(torch.stack(images).to(state.device))
            _sync(pixels.device)
            start = time.perf_counter()
            tokens = base.encode(pixels)
            _sync(pixels.device)
            vision = (time.perf_counter() - start) / len(good)
            for cell in todo:
                generator = torch.Generator(device=pixels.device).manual_seed(
                    _seed(config.seed, model.spec.name, task.name, index, cell.allocator, cell.budget))
                writer.write(_answer_cell(model, task, cell, good, pixels, tokens, prompts, generator, vision,
                                          metric.score, config.seed))
                bar.update(1)
    bar.close()
    return grid


def _answer_cell(model: LoadedModel, task: TaskSpec, cell: Cell, records: list[dict], pixels: torch.Tensor,
                 tokens: Any, prompts: list[str], generator: torch.Generator, vision: float,
                 score: Callable[[str, dict], float], seed: int) -> list[dict]:
    """Rows of one cell on one batch; a failing batch is retried sample by sample to isolate the failure
    (each retry seeded from its sample id, not from the failed batch's generator state)."""
    try:
        texts, counts, allocation, prefill, llm, lengths = _answer(model, cell, pixels, tokens, prompts, generator)
    except Exception as error:
        if len(records) == 1:
            return _error_rows(model, task, cell, records, f"{type(error).__name__}: {error}")
        rows = []
        for i in range(len(records)):
            one = torch.Generator(device=pixels.device).manual_seed(
                _seed(seed, model.spec.name, task.name, records[i]["id"], cell.allocator, cell.budget))
            rows += _answer_cell(model, task, cell, records[i : i + 1], pixels[i : i + 1],
                                 tokens.select_images(slice(i, i + 1)), prompts[i : i + 1], one, vision, score, seed)
        return rows
    b = len(records)
    timing = {"vision": vision, "allocation": allocation / b, "prefill": prefill / b, "llm": llm / b}
    return _rows_for_batch(model, task, cell, records, texts, counts.tolist(), timing, lengths, score)
