"""Ablation configs: one YAML file describes the whole grid.

.. code-block:: yaml

    name: default
    output: runs/ablation/default      # rows/, report.md, table.csv, plots
    seed: 0
    batch_size: 32
    models:
      - name: tiny-llava
        path: embedded                 # a folder, a hub id, or a shipped model: embedded, embedded-qwen
        prompt: "USER: <image> {question} ASSISTANT:"
        levels: 3                      # pyramid levels; mode: feature (pooled) or image (per level)
        max_new_tokens: 3
        options: {}                    # PyramidVLM / family options, e.g. {lazy_tiles: true, newlines: none}
    allocators: [random, pool, laplacian, configs/allocators/saliency.yaml]
    budgets: [1.0, 0.25, 0.11]         # floats <= 1: fractions of the tokens; ints: token counts
    schedules: [{name: fastv, layer: 2, keep: 0.25}, {name: pdrop, label: pdrop}]  # optional, in-LLM dropping
    tasks:
      - {name: shapes, source: shapes, split: test, questions: 1000, limit: 500, stratify: category,
         metric: exact}

Task ``source`` is ``shapes`` (the embedded benchmark, generated on demand under ``root``), ``local``
(``root`` holds ``<split>.jsonl``) or ``hf`` (``path``: a hub id or a ``save_to_disk`` folder, loaded
with the field mapping of ``hf_task``). ``prompt_task`` picks a task's LLaVA-1.5 prompt convention
(default: ``hf_task``; none: the question as it is); ``pre_prompt`` / ``post_prompt`` override it.
``metric`` defaults to the HF task's own metric, else the first-word exact match. ``group`` keeps records
sharing a field together in subsets (``limit`` then counts groups); MME defaults to its image id.

A model's ``options`` go to :class:`~pyrtok.vlm.PyramidVLM` as they are: core options (``share_budget``) and
the options of the model's family (LLaVA-NeXT / OneVision: ``lazy_tiles``, ``newlines``; Qwen:
``coarse_positions``). The allocator, budget, mode, levels and schedules have their own places and are refused
there. Where the model's config is on disk (a local folder, the embedded model), the option names and values
are checked when the config loads, by building the wrapper on the model's empty (meta-device) shell with its
processor, so a bad option fails before any weights load or any row is written; otherwise they are checked
when the model loads. The options are part of every row's fingerprint.

``schedules`` (optional) lists in-LLM dropping schedules (:func:`pyrtok.vlm.schedules.resolve_schedule` specs:
a name, a YAML path, a mapping with ``name`` and an optional ``label``). Each one runs after every allocator at
every budget, in cells labelled ``<allocator>+<schedule label>``; their rows report ``effective_tokens`` (image
tokens averaged over the decoder layers) and FLOPs from the per-layer counts, so they sit in one table with the
vision-side allocators at matched FLOPs.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pyrtok.embedded.models import embedded_model, resolve_model

__all__ = ["COARSE", "AblationConfig", "ModelSpec", "TaskSpec", "check_model_options", "embedded_model", "load_config"]

SOURCES = ("shapes", "local", "hf")
# the metric each HF task is scored with unless a task config names another
HF_METRICS = {"vqav2": "vqav2", "gqa": "gqa", "textvqa": "textvqa", "pope": "pope", "mme": "mme",
              "scienceqa_img": "scienceqa"}
# what tables, rows and plots call the `all` allocator below the full budget: it keeps the coarsest tokens first
COARSE = "coarse"
# PyramidVLM arguments that an ablation sets elsewhere (allocators, budgets, schedules, a model's mode/levels)
RESERVED_OPTIONS = frozenset({"allocator", "budget", "mode", "levels", "schedule", "encoder", "config"})
KEYS = ("name", "output", "seed", "batch_size", "models", "allocators", "budgets", "tasks", "schedules")


@dataclass
class ModelSpec:
    name: str
    path: str
    prompt: str | None = None  # None: the model's own chat template (LLaVA-1.5's format without one)
    mode: str = "feature"
    levels: int = 3
    max_new_tokens: int = 8
    options: dict[str, Any] = field(default_factory=dict)  # PyramidVLM / family options (see the module notes)

    @property
    def resolved_path(self) -> str:
        return str(resolve_model(self.path))

    def __post_init__(self) -> None:
        if self.prompt is not None and (not isinstance(self.prompt, str) or "{question}" not in self.prompt):
            raise ValueError(f"models[{self.name}].prompt must be a string holding '{{question}}' (and the "
                             f"model's image marker), or omitted for the model's chat template, got {self.prompt!r}")
        if self.mode not in ("feature", "image"):
            raise ValueError(f"models[{self.name}].mode must be 'feature' or 'image', got {self.mode!r}")
        if not isinstance(self.options, dict) or not all(isinstance(k, str) for k in self.options):
            raise ValueError(f"models[{self.name}].options must be a mapping of option names to values, "
                             f"got {self.options!r}")
        reserved = sorted(set(self.options) & RESERVED_OPTIONS)
        if reserved:
            raise ValueError(f"models[{self.name}].options cannot set {reserved}: the allocator, budget, mode, "
                             "levels and schedules have their own places in the ablation config")


def check_model_options(spec: ModelSpec) -> None:
    """Raise a ValueError/TypeError naming ``models[<name>].options`` unless :class:`~pyrtok.vlm.PyramidVLM`
    takes ``spec.options`` for this model. Needs the model's config on disk (a local folder or the embedded
    model; a hub id is left to load time): the wrapper is built on the model's meta-device shell, so no weight
    is read or allocated."""
    if not spec.options:
        return
    try:
        folder = Path(spec.resolved_path)
    except FileNotFoundError:
        return
    if not (folder / "config.json").is_file():
        return
    import torch
    import transformers

    from pyrtok.vlm import PyramidVLM, family_for
    from pyrtok.vlm.hub import load_processor

    model_config = transformers.AutoConfig.from_pretrained(folder)
    family_for(model_config)
    with torch.device("meta"):
        shell = getattr(transformers, model_config.architectures[0])(model_config)
    processor = load_processor(folder)
    try:
        PyramidVLM(shell, processor, mode=spec.mode, levels=spec.levels, **spec.options)
    except (TypeError, ValueError) as error:
        PyramidVLM(shell, processor, mode=spec.mode, levels=spec.levels)  # a mode or levels error is not the options'
        raise type(error)(f"models[{spec.name}].options = {spec.options!r}: {error}") from None


@dataclass
class TaskSpec:
    name: str
    source: str = "shapes"
    metric: str | None = None
    split: str | None = None
    root: str | None = None
    path: str | None = None
    hf_task: str | None = None
    questions: int = 1000
    limit: int | None = None
    stratify: str | None = None
    group: str | None = None
    seed: int = 0
    prompt_task: str | None = None
    pre_prompt: str | None = None
    post_prompt: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"tasks[{self.name}].source must be one of {SOURCES}, got {self.source!r}")
        if self.source == "hf" and not (self.path and self.hf_task):
            raise ValueError(f"tasks[{self.name}] with source 'hf' needs 'path' and 'hf_task'")
        if self.source == "local" and not self.root:
            raise ValueError(f"tasks[{self.name}] with source 'local' needs 'root'")
        if self.prompt_task is None:
            self.prompt_task = self.hf_task
        if self.metric is None:
            self.metric = HF_METRICS.get(self.hf_task or "", "exact")
        if self.group is None and self.metric == "mme":
            self.group = "question_id"  # MME scores pairs of questions per image: subsets keep both


@dataclass
class AblationConfig:
    name: str
    output: Path
    models: list[ModelSpec]
    allocators: list[str]
    budgets: list[int | float]
    tasks: list[TaskSpec]
    allocator_specs: dict[str, Any]
    seed: int = 0
    batch_size: int = 32
    raw_allocators: list[Any] = field(default_factory=list)
    schedule_specs: dict[str, Any] = field(default_factory=dict)  # label -> schedule spec

    def save(self, path: Path) -> None:
        """Write the config as YAML that :func:`load_config` reads back to an equal config."""
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"name": self.name, "output": str(self.output), "seed": self.seed, "batch_size": self.batch_size,
                "models": [asdict(m) for m in self.models], "allocators": self.raw_allocators,
                "budgets": self.budgets, "tasks": [asdict(t) for t in self.tasks]}
        if self.schedule_specs:
            data["schedules"] = [dict(spec, label=label) if isinstance(spec, dict) else {"name": spec, "label": label}
                                 for label, spec in self.schedule_specs.items()]
        path.write_text(yaml.safe_dump(data, sort_keys=False))


def _budget(value: Any, n: int) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"budgets[{n}] must be an int token count or a float fraction in (0, 1], got {value!r}")
    if isinstance(value, float) and not 0 < value <= 1:
        raise ValueError(f"budgets[{n}] is a float, so it must be a fraction in (0, 1], got {value}")
    if isinstance(value, int) and value < 1:
        raise ValueError(f"budgets[{n}] must be a positive token count, got {value}")
    return value


def _entry(cls: type, value: Any, argument: str) -> Any:
    """A :class:`ModelSpec` or :class:`TaskSpec` from one mapping of the config, its errors naming the entry."""
    if not isinstance(value, dict):
        raise ValueError(f"{argument} must be a mapping, got {value!r}")
    unknown = sorted(set(value) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"{argument} has unknown keys {unknown}; expected some of {[f.name for f in fields(cls)]}")
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
               and f.name not in value]
    if missing:
        raise ValueError(f"{argument} needs the keys {missing}, got {value!r}")
    return cls(**value)


def load_config(source: str | Path | dict[str, Any], overrides: dict[str, Any] | None = None) -> AblationConfig:
    """An :class:`AblationConfig` from a YAML path or a mapping, updated by top-level ``overrides``."""
    if isinstance(source, dict):
        data = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"the ablation config {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"the ablation config must be a mapping, got {type(data).__name__}")
    data.update(overrides or {})
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ValueError(f"the ablation config has unknown keys {unknown}; expected some of {list(KEYS)}")
    for key in ("models", "allocators", "budgets", "tasks"):
        if not data.get(key) or not isinstance(data[key], list):
            raise ValueError(f"the ablation config needs a non-empty list '{key}'")
    from pyrtok.allocators import resolve, spec_label

    specs: dict[str, Any] = {}
    labels = []
    for n, spec in enumerate(data["allocators"]):
        argument = f"allocators[{n}]"
        label = spec_label(spec, argument)
        try:  # a bad name, YAML path or option fails here, before any model loads
            allocator = resolve(spec, argument)
        except TypeError as error:  # an unknown option: the allocator's constructor does not name the entry
            raise error if argument in str(error) else TypeError(f"{argument} = {spec!r}: {error}") from None
        if label == COARSE:
            raise ValueError(f"{argument}: the label {COARSE!r} is reserved for the 'all' allocator below the full "
                             f"budget; list 'all' instead, or give {spec!r} another label")
        if label == "all" and allocator.name != "all":
            raise ValueError(f"{argument}: the label 'all' is reserved for the full-token reference, "
                             f"but {spec!r} is the {allocator.name!r} allocator; give it another label")
        if label in specs:
            raise ValueError(f"{argument}: the label {label!r} appears twice")
        specs[label] = {k: v for k, v in spec.items() if k != "label"} if isinstance(spec, dict) else spec
        labels.append(label)
    specs.setdefault("all", "all")
    models = [_entry(ModelSpec, m, f"models[{n}]") for n, m in enumerate(data["models"])]
    if len({m.name for m in models}) != len(models):
        raise ValueError("models must have distinct names")
    for model in models:  # a bad family option fails here, before any weights load or any row is written
        check_model_options(model)
    tasks = [_entry(TaskSpec, t, f"tasks[{n}]") for n, t in enumerate(data["tasks"])]
    if len({t.name for t in tasks}) != len(tasks):
        raise ValueError("tasks must have distinct names")
    from pyrtok.eval.metrics import get_metric
    from pyrtok.eval.tasks.prompts import PROMPTS

    for task in tasks:  # fail before any model loads
        get_metric(task.metric)
        if task.prompt_task and task.prompt_task not in PROMPTS:
            raise ValueError(
                f"tasks[{task.name}].prompt_task must be one of {sorted(PROMPTS)}, got {task.prompt_task!r}"
            )
    if not isinstance(data.get("batch_size", 32), int) or data.get("batch_size", 32) < 1:
        raise ValueError(f"batch_size must be a positive int, got {data.get('batch_size')!r}")
    schedules: dict[str, Any] = {}
    from pyrtok.vlm.schedules import resolve_schedule, schedule_label

    for n, spec in enumerate(data.get("schedules") or []):
        resolve_schedule(spec, f"schedules[{n}]")  # a bad name or option fails before any model loads
        label = schedule_label(spec)
        if label in schedules:
            raise ValueError(f"schedules[{n}]: the label {label!r} appears twice")
        schedules[label] = {k: v for k, v in spec.items() if k != "label"} if isinstance(spec, dict) else spec
    return AblationConfig(
        name=str(data.get("name", "ablation")), output=Path(data.get("output", f"runs/ablation/{data.get('name')}")),
        models=models, allocators=labels,
        budgets=[_budget(b, n) for n, b in enumerate(data["budgets"])], tasks=tasks, allocator_specs=specs,
        seed=int(data.get("seed", 0)), batch_size=int(data.get("batch_size", 32)),
        raw_allocators=list(data["allocators"]), schedule_specs=schedules,
    )
