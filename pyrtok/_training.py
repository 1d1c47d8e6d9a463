"""Run plumbing shared by the training commands: YAML configs, seeded per-step RNG, the LR schedule with warm
restarts, the run itself (accelerator, output folder, resume, progress, logs, atomic checkpoints), the CLI.

Both ``pyrtok pretrain`` and ``pyrtok train-vlm`` are seeded, resumable runs driven by one YAML file; this
module holds what they have in common so that each training script is only its config, its model and its step.

A run's folder keeps the config it was started under (``config.yaml``). The command line refuses to resume a
run under a config that differs from it, naming the keys, unless ``--allow-config-change`` is given; a run that
does continue under a changed config (that flag, or the Python API, where passing a new config is explicit)
says so and keeps the old file as ``config.previous-N.yaml``: nothing is overwritten silently.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

__all__ = [
    "RESTART", "Interrupted", "Run", "Steps", "checkpoint_step", "config_changes", "latest_checkpoint", "load_config",
    "lr_factor", "merge_config", "optimizer_step", "restart_at", "restarts", "run_cli", "save_checkpoint",
    "saved_config_changes", "set_override", "step_generator", "trim_log", "turns_at", "warmup_cosine",
]


def merge_config(base: dict[str, Any], override: dict[str, Any], path: str = "") -> dict[str, Any]:
    """``base`` updated by ``override``: nested dicts merged, anything else replaced; unknown keys raise."""
    out = dict(base)
    for key, value in override.items():
        if key not in base:
            raise ValueError(f"unknown config key {path + key!r}; known: {sorted(base)}")
        nested = isinstance(base[key], dict) and isinstance(value, dict)
        out[key] = merge_config(base[key], value, f"{path}{key}.") if nested else value
    return out


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then a cosine down to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def step_generator(seed: int, step: int, rank: int = 0, stream: int = 0) -> torch.Generator:
    """A generator seeded from (seed, step, rank, stream), independent across all four.

    Every random draw of a step comes from such generators, so a batch is a pure function of (seed, step,
    process) and a resumed run draws what an uninterrupted one would have; ``stream`` separates the draws
    of different consumers within one step.
    """
    mixed = np.random.SeedSequence([seed, step, rank, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed) & 0x7FFF_FFFF_FFFF_FFFF)


RESTART: dict[str, Any] = {"steps": 0, "lr": 5e-4, "turns": None}
"""The fields of one warm restart in ``train.restart`` and their defaults."""


def restarts(t: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The warm restarts of ``t["restart"]`` (one mapping or a list of them), each with a ``start`` step.

    ``t`` is a config's ``train`` section. The restarts are the last steps of the run, in order: the final one
    covers the last ``steps`` of ``t["steps"]``, the one before it the ``steps`` before those, and so on.
    Entries with ``steps: 0`` are dropped; a section without ``restart`` has none.
    """
    entries = t.get("restart", [])
    entries = entries if isinstance(entries, list) else [entries]
    phases = []
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"train.restart[{k}] must be a mapping of {sorted(RESTART)}, got {entry!r}")
        phases.append(merge_config(RESTART, entry, f"train.restart[{k}]."))
    phases = [p for p in phases if p["steps"]]
    start = t["steps"] - sum(p["steps"] for p in phases)
    for phase in phases:
        phase["start"], start = start, start + phase["steps"]
    return phases


def restart_at(step: int, phases: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The warm restart of ``phases`` (from :func:`restarts`) that ``step`` is in, or None before the first."""
    return next((p for p in reversed(phases) if step >= p["start"]), None)


def lr_factor(step: int, t: Mapping[str, Any]) -> float:
    """The LR factor of ``step`` for the ``train`` section ``t`` (``steps``, ``warmup_steps``, optionally
    ``dense_steps`` and ``restart``).

    A first stage of ``dense_steps`` (default 0) warms up and then stays flat; the main stage warms up and
    follows a cosine to 0 at its end; each warm restart of :func:`restarts` warms up to its ``lr`` (relative
    to ``t["lr"]``) and follows a new cosine to 0 over its ``steps``. The factors before a restart do not
    depend on it, so a finished run can be extended by resuming it under a config with one more restart.
    With neither a first stage nor restarts this is :func:`warmup_cosine` over ``steps``.
    """
    dense = t.get("dense_steps", 0)
    if step < dense:
        return min(1.0, (step + 1) / max(1, t["warmup_steps"]))
    phases = restarts(t)
    phase = restart_at(step, phases)
    if phase is None:
        end = phases[0]["start"] if phases else t["steps"]
        return warmup_cosine(step - dense, t["warmup_steps"], end - dense)
    return phase["lr"] / t["lr"] * warmup_cosine(step - phase["start"], t["warmup_steps"], phase["steps"])


def turns_at(step: int, t: Mapping[str, Any]) -> int | dict[str, int]:
    """Questions per image at ``step`` (a count or per-family counts) for the ``train`` section ``t``: 1 in the
    first ``dense_steps``, ``t["turns"]`` after them, and the ``turns`` of the warm restart ``step`` is in,
    if that restart sets them."""
    if step < t.get("dense_steps", 0):
        return 1
    phase = restart_at(step, restarts(t))
    return phase["turns"] or t["turns"] if phase is not None else t["turns"]


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The checkpoint folder ``checkpoints/latest`` names, if it exists."""
    pointer = checkpoints / "latest"
    if not pointer.is_file():
        return None
    target = checkpoints / pointer.read_text().strip()
    return target if target.is_dir() else None


def checkpoint_step(checkpoints: Path) -> int | None:
    """The step of the latest checkpoint under ``checkpoints``, or None when there is none."""
    latest = latest_checkpoint(checkpoints)
    return None if latest is None else json.loads((latest / "step.json").read_text())["step"]


def _flat(config: Mapping[str, Any], path: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):  # an empty section adds no key
            out.update(_flat(value, f"{path}{key}."))
        else:
            out[f"{path}{key}"] = value
    return out


_ABSENT = object()


def _short(value: Any, width: int = 40) -> str:
    text = "(absent)" if value is _ABSENT else json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The entries in which two configs differ, as dotted keys with both values, e.g. ``"train.steps (4 -> 8)"``.

    Values are compared as YAML stores them (tuples as lists); a key only one of them has counts as a change.

    Example:
        >>> config_changes({"train": {"steps": 4, "lr": 0.1}}, {"train": {"steps": 8, "lr": 0.1}})
        ['train.steps (4 -> 8)']
    """
    a, b = (_flat(yaml.safe_load(yaml.safe_dump(dict(c), sort_keys=False)) or {}) for c in (old, new))
    keys = list(a) + [k for k in b if k not in a]
    return [f"{k} ({_short(a.get(k, _ABSENT))} -> {_short(b.get(k, _ABSENT))})" for k in keys
            if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def saved_config_changes(path: Path, config: Mapping[str, Any],
                         defaults: Mapping[str, Any] | None = None) -> list[str]:
    """:func:`config_changes` from the config saved at ``path`` (a run's ``config.yaml``) to ``config``; [] when
    there is no such file, one entry saying so when it holds no readable config. With ``defaults``, a key that a
    later version added (absent from the saved config) counts as its default, what the run used."""
    if not path.is_file():
        return []
    try:
        old = yaml.safe_load(path.read_text()) or {}
        if defaults is not None:
            try:
                old = merge_config(dict(defaults), old)
            except ValueError:  # a key this version no longer knows: compare as saved
                pass
        return config_changes(old, config)
    except (yaml.YAMLError, TypeError, ValueError):
        return [f"({path.name} holds no readable config)"]


def _set_aside(path: Path) -> Path:
    """Move ``path`` to the first free ``<stem>.previous-N<suffix>`` beside it; returns where it went."""
    n = 1
    while (kept := path.with_name(f"{path.stem}.previous-{n}{path.suffix}")).exists():
        n += 1
    os.replace(path, kept)
    return kept


def trim_log(path: Path, step: int) -> None:
    """Drop the JSONL rows of ``path`` logged after ``step``, the step a run (re)starts from, so that a resumed
    run logs each step once. Rewritten atomically; a missing file is left missing."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) == len(lines):
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def save_checkpoint(accelerator: Any, checkpoints: Path, step: int, keep: int) -> None:
    """Save the accelerator state as ``checkpoints/step-XXXXXXX`` (temporary folder, then a rename), point
    ``checkpoints/latest`` at it, and keep the newest ``keep`` checkpoints."""
    name = f"step-{step:07d}"
    tmp = checkpoints / f"{name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank writes its own random state into tmp
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "step.json").write_text(json.dumps({"step": step}))
        shutil.rmtree(checkpoints / name, ignore_errors=True)
        os.replace(tmp, checkpoints / name)
        pointer = checkpoints / "latest.tmp"
        pointer.write_text(name)
        os.replace(pointer, checkpoints / "latest")
        for old in sorted(p for p in checkpoints.glob("step-*") if p.is_dir() and not p.suffix)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def optimizer_step(accelerator: Any, model: Any, optimizer: Any, scheduler: Any, loss: Any, grad_clip: float) -> None:
    """Backward, optional gradient-norm clipping, one optimizer and one scheduler step, gradients cleared."""
    accelerator.backward(loss)
    if grad_clip:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


class Interrupted(KeyboardInterrupt):
    """A run that an interrupt ended at a step boundary, after saving a checkpoint there.

    A ``KeyboardInterrupt``, so code that lets Ctrl-C through lets this through too; ``step`` is the step the
    checkpoint holds and ``total`` the run's last step. ``pyrtok train-vlm`` and ``pyrtok pretrain`` end on it
    with one line that says how to resume, and exit status 130.
    """

    def __init__(self, step: int, total: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted after step {step} of {total}; the checkpoint is {checkpoint}")
        self.step, self.total, self.checkpoint = step, total, checkpoint


class Steps:
    """The steps of one invocation of a :class:`Run` (from :meth:`Run.steps`): iterate it as a range.

    While it is iterated, the first SIGINT (Ctrl-C) or SIGTERM lets the step in progress finish; then a
    checkpoint of the steps done is saved (unless that step's own was just saved) and :class:`Interrupted` is
    raised. A signal more than :attr:`REPEAT_S` seconds after the first stops at once, with a plain
    ``KeyboardInterrupt``; one sooner is taken as the same request (a scheduler may signal a process both
    directly and through its launcher). With several processes, every step ends by asking whether any process
    was signalled, so that all stop after the same step (torchrun's agent kills its workers 30 s after it is
    signalled: a step and a checkpoint must fit in that). The handlers are this iteration's: they are installed
    when it starts (in the main thread only) and the previous ones come back when it ends, however it ends.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_S = 1.0

    def __init__(self, run: Run, bar: Any) -> None:
        self.run, self.bar = run, bar
        self.caught: str | None = None  # the name of the signal that asked to stop
        self._caught_at = 0.0

    def set_postfix(self, **values: Any) -> None:
        """Show ``values`` beside the progress bar."""
        self.bar.set_postfix(**values)

    def _handle(self, number: int, frame: Any) -> None:
        name = signal.Signals(number).name
        if self.caught is not None:
            if time.monotonic() - self._caught_at <= self.REPEAT_S:
                return  # the same request, delivered twice
            raise KeyboardInterrupt(f"{name} again: stopping without a checkpoint")
        self.caught, self._caught_at = name, time.monotonic()
        if self.run.is_main:
            print(f"\n{self.run.output}: {name}: finishing this step and saving a checkpoint (send it again to "
                  f"stop at once)", file=sys.stderr, flush=True)

    def __iter__(self) -> Iterator[int]:
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                previous[number] = signal.signal(number, self._handle)
        try:
            for step in self.bar:
                yield step
                if self.run.stop_requested(self.caught is not None):
                    done = step + 1
                    if checkpoint_step(self.run.checkpoints) != done:
                        self.run.checkpoint(done, self.run.config["train"].get("keep_checkpoints", 2))
                    self.bar.close()
                    raise Interrupted(done, self.run.total, self.run.checkpoints / f"step-{done:07d}")
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


class Run:
    """The plumbing of one seeded, resumable training run; the training script brings its model and its step.

    Creating a run makes the accelerator, seeds every library's RNG with ``config["seed"]`` (before the script
    builds its model, so the initial weights are seeded too) and creates ``config["train"]["output"]`` with the
    run's ``config.yaml``, ``checkpoints/`` and the extra ``folders``. Then, in the script::

        model, optimizer, scheduler = run.accelerator.prepare(model, optimizer, scheduler)
        run.resume(resume, scheduler, logs=("log.jsonl",))   # latest checkpoint, logs trimmed to it
        for step in run.steps(t["steps"], stop_after, progress):   # a tqdm bar over run.start .. run.end
            ...
            run.log("log.jsonl", row)
            if done % t["checkpoint_every"] == 0 or done == run.end:
                run.checkpoint(done, t["keep_checkpoints"])
        if run.is_main and run.finished:
            ...  # save the final model
        run.accelerator.wait_for_everyone()

    Attributes:
        accelerator: the ``accelerate.Accelerator`` (DDP when launched on several processes).
        output, checkpoints: the run's folder and its ``checkpoints/``.
        start, end, total: the first step of this invocation, the step it stops at, the run's last step.
    """

    def __init__(self, config: Mapping[str, Any], folders: Sequence[str] = ()) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        # Parts of a model get no gradient in some steps (MAE never uses the tower's [CLS] pooling; train-vlm's
        # first stage leaves the language model out). Every process runs every step, so the LR schedule must
        # advance once per optimizer step, not once per process.
        self.accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
                                       step_scheduler_with_optimizer=False)
        set_seed(config["seed"])
        self.config = config
        self.output = Path(config["train"]["output"])
        self.checkpoints = self.output / "checkpoints"
        if self.is_main:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            for folder in folders:
                (self.output / folder).mkdir(exist_ok=True)
            self._write_config()
        self.accelerator.wait_for_everyone()
        self.start = self.end = self.total = 0

    def _write_config(self) -> None:
        """Write ``config.yaml``; one that differs is first kept as ``config.previous-N.yaml``, and said so."""
        path = self.output / "config.yaml"
        changes = saved_config_changes(path, self.config)
        if changes:
            kept = _set_aside(path)
            print(f"{self.output}: the config differs from the run's config.yaml in {'; '.join(changes)}; "
                  f"the old one is kept as {kept.name}", flush=True)
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(dict(self.config), sort_keys=False))
        os.replace(tmp, path)

    @property
    def is_main(self) -> bool:
        """Whether this is the process that writes logs, images and the final model."""
        return self.accelerator.is_main_process

    @property
    def finished(self) -> bool:
        """Whether this invocation ran to the run's last step (not stopped early by ``stop_after``)."""
        return self.end == self.total

    def resume(self, resume: bool = True, scheduler: Any = None, logs: Sequence[str] = ("log.jsonl",)) -> int:
        """Load the latest checkpoint (if ``resume`` and there is one) into the prepared objects; return its step.

        ``scheduler`` (the ``LambdaLR`` before ``accelerator.prepare`` wrapped it): the checkpoint holds the LR
        of the schedule it was saved under; the LR of this config's schedule at the resumed step replaces it, so
        a run resumed under a longer schedule or one more warm restart continues on the new one. The JSONL
        ``logs`` under the output folder lose their rows after the resumed step, so each step is logged once.
        A run that starts over (``resume=False``) in a folder with checkpoints first moves them aside to
        ``checkpoints.previous-N`` and says so: they would otherwise mix with the new run's.
        """
        if not resume and self.is_main and any(self.checkpoints.iterdir()):
            kept = _set_aside(self.checkpoints)
            self.checkpoints.mkdir()
            print(f"{self.output}: starting over; the previous checkpoints are kept in {kept.name}", flush=True)
        self.accelerator.wait_for_everyone()
        latest = latest_checkpoint(self.checkpoints) if resume else None
        if latest is not None:
            self.accelerator.load_state(str(latest))
            self.start = json.loads((latest / "step.json").read_text())["step"]
            if self.is_main:
                print(f"resuming from step {self.start} of {self.config['train']['steps']} ({latest})", flush=True)
            if scheduler is not None:
                groups = scheduler.optimizer.param_groups
                for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
                    group["lr"] = base * factor(self.start)
        if self.is_main:
            for name in logs:
                trim_log(self.output / name, self.start)
        return self.start

    def steps(self, total: int, stop_after: int | None = None, progress: bool = True) -> Steps:
        """The steps of this invocation: :attr:`start` up to ``total``, or ``stop_after`` steps (a :class:`Steps`,
        iterated like a range, with a tqdm bar on the main process when ``progress`` is set).

        Sets :attr:`end` and :attr:`total`. An interrupt (Ctrl-C, SIGTERM) while iterating ends the invocation at
        the next step boundary with a checkpoint (see :class:`Steps`).
        """
        if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int)
                                       or stop_after < 1):
            raise ValueError(f"stop_after must be None or an int >= 1 (steps to run now), got {stop_after!r}")
        from tqdm.auto import tqdm

        self.total = total
        self.end = total if stop_after is None else min(total, self.start + stop_after)
        self._lap = time.perf_counter()
        bar = tqdm(range(self.start, self.end), initial=self.start, total=total,
                   disable=not progress or not self.is_main, desc=self.output.name)
        return Steps(self, bar)

    def stop_requested(self, local: bool) -> bool:
        """Whether any process asks to stop (``local``: this one does); a collective call with several
        processes, so that every process stops after the same step."""
        if self.accelerator.num_processes == 1:
            return local
        flag = torch.tensor([float(local)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def lap(self) -> float:
        """Wall seconds since the previous call, or since this invocation's steps began (:meth:`steps`).

        A training script logs it with each row, so that the sum over a finished run's log is the time the run
        spent in its training loop (steps, evaluations, checkpoints), across every resume and without the
        time between invocations.
        """
        now = time.perf_counter()
        seconds, self._lap = now - self._lap, now
        return seconds

    def log_due(self, done: int, every: int) -> bool:
        """Whether to log after ``done`` steps: after the first step (early feedback), every ``every`` steps
        and after the run's last step. A function of ``done`` alone, so a resumed run logs the same steps."""
        return done == 1 or done % every == 0 or done == self.total

    def log(self, name: str, *rows: Mapping[str, Any]) -> None:
        """Append ``rows`` to the JSONL file ``name`` under the output folder (on the main process only)."""
        if self.is_main:
            with (self.output / name).open("a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)

    def checkpoint(self, step: int, keep: int) -> None:
        """Save the state after ``step`` steps and keep the newest ``keep`` checkpoints (see
        :func:`save_checkpoint`); every process must call it."""
        save_checkpoint(self.accelerator, self.checkpoints, step, keep)


def load_config(
    defaults: dict[str, Any], path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``defaults``, updated by the YAML file at ``path`` and then by ``overrides`` (nested dicts)."""
    config = defaults
    if path is not None:
        config = merge_config(config, yaml.safe_load(Path(path).read_text()) or {})
    return merge_config(config, overrides) if overrides else config


def set_override(overrides: dict[str, Any], item: str) -> dict[str, Any]:
    """Add one ``dotted.key=value`` to the nested ``overrides`` (value parsed as YAML); returns ``overrides``.

    ``"train.restart.steps=2000"`` sets ``overrides["train"]["restart"]["steps"] = 2000``; whether the key
    exists is checked when the overrides are merged into the config.
    """
    key, sep, value = item.partition("=")
    path = key.strip().split(".")
    if not sep or not all(path):
        raise ValueError(f"--set expects KEY=VALUE with a dotted KEY (e.g. train.steps=100), got {item!r}")
    node = overrides
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {item!r}: {part!r} was already set to a value, not a section")
    node[path[-1]] = yaml.safe_load(value)
    return overrides


def _resume_command(prog: str, argv: Sequence[str]) -> str:
    """The command line that continues a run: ``argv`` without the flags that start over or allow a change."""
    kept = [a for a in argv if a not in ("--no-resume", "--allow-config-change")]
    return " ".join([prog, *map(shlex.quote, kept)])


def run_cli(
    prog: str,
    description: str,
    train: Callable[..., Path],
    load: Callable[[str | Path | None, dict[str, Any] | None], dict[str, Any]],
    argv: list[str] | None = None,
) -> None:
    """The common command line: --config (required), --set, --steps, --output, --no-resume,
    --allow-config-change, --stop-after."""
    from pyrtok._help import plain

    parser = argparse.ArgumentParser(prog=prog, description=plain(description), allow_abbrev=False)
    parser.add_argument("--config", required=True, help="the run's YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                        help="override one config entry, e.g. --set train.lr=1e-3 (KEY is dotted, VALUE is read "
                             "as YAML; repeatable)")
    parser.add_argument("--steps", type=int, help="override train.steps, the run's total number of steps")
    parser.add_argument("--output", help="override train.output, the run's folder")
    parser.add_argument("--no-resume", action="store_true",
                        help="start over even if the output folder holds checkpoints (they are moved aside "
                             "to checkpoints.previous-N)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume even though the config differs from the run's config.yaml (which is kept "
                             "as config.previous-N.yaml), e.g. to extend a finished run")
    parser.add_argument("--stop-after", type=int, metavar="N",
                        help="end this invocation after N steps, with a checkpoint (run the same command again "
                             "to resume)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {"train": {}}
    for item in args.sets:
        try:
            set_override(overrides, item)
        except ValueError as error:
            parser.error(str(error))
    if args.steps is not None:
        overrides["train"]["steps"] = args.steps
    if args.output is not None:
        overrides["train"]["output"] = args.output
    config = load(args.config, overrides)
    output = Path(config["train"]["output"])
    if not args.no_resume and checkpoint_step(output / "checkpoints") is not None:
        changes = saved_config_changes(output / "config.yaml", config, defaults=load(None, None))
        if changes and not args.allow_config_change:
            raise ValueError(f"{output} holds a run started under another config: {'; '.join(changes)}; pass "
                             f"--allow-config-change to resume under this one (the old config.yaml is kept), or "
                             f"--no-resume to start over")
    try:
        output = train(config, resume=not args.no_resume, stop_after=args.stop_after)
    except Interrupted as interrupted:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{prog}: interrupted; stopped at step {interrupted.step} of {interrupted.total} with a "
                  f"checkpoint (resume with: {_resume_command(prog, argv)})", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun / accelerate: the main process reports
        return
    step, total = checkpoint_step(Path(output) / "checkpoints"), config["train"]["steps"]
    if step is not None and step < total:
        print(f"{prog}: stopped at step {step} of {total} (resume with: {_resume_command(prog, argv)}); "
              f"outputs in {output}")
    else:
        print(f"{prog}: finished {total} steps, outputs in {output}")
