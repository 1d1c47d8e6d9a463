"""Training steps with the data worker against building each batch in the training process.

``pyrtok train-vlm`` builds every step's scenes (rendering, patch targets, the conversations) on the CPU. With
``train.data_workers: 1`` a spawned worker builds the next step's batch while this one computes; with 0 the
training process builds it between steps (the baseline). Both make the same batches (tests/test_prefetch.py).

For each stage of ``--config`` (default: the tiny Qwen's open-form recipe), a run of ``--steps`` steps from
nothing is timed end to end (building the model, starting the worker, the steps, the final checkpoint: what a user
waits for), with evaluations off:

- ``tower``: stage 1 (the dense heads on the vision tower, ``train.dense_batch_size`` scenes per step);
- ``lm``: stage 2 at the heaviest turns of the config (its last warm restart's, or ``train.turns``), with the
  tower frozen and the token mix on, as in the recipe's last steps.

Rounds alternate the two settings, and the minimum over ``--rounds`` is kept (robust to background load on a
shared machine). The ratio is worker time / in-process time; below 1 the worker helps.

    python benchmarks/bench_train_data.py [--config configs/embedded/tiny_qwen_open.yaml] [--steps 30]
                                          [--rounds 2] [--stages tower lm] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pyrtok._training import restarts
from pyrtok.embedded.train import load_config, train

ROOT = Path(__file__).resolve().parents[1]


def stage_config(config: dict[str, Any], stage: str, steps: int, workers: int, output: Path) -> dict[str, Any]:
    """``config`` cut to ``steps`` steps of one stage, evaluations off, ``data_workers`` = ``workers``."""
    t = dict(config["train"])
    phases = restarts(t)
    heaviest = phases[-1]["turns"] if phases and phases[-1]["turns"] else t["turns"]
    t.update(restart=[], eval_every=10 ** 9, checkpoint_every=10 ** 9, keep_checkpoints=1,
             data_workers=workers, output=str(output))
    allocation = dict(config["allocation"])
    # The schedule runs past the timed steps (the run stops after them: ``stop_after``), so that neither the end of
    # stage 1 ([CLS] focus) nor the end of the run (an evaluation) falls among them.
    if stage == "tower":
        t.update(steps=steps + 2, dense_steps=steps + 1)
    else:
        t.update(steps=steps + 1, dense_steps=0, turns=heaviest, freeze_vision_steps=steps + 1)
        allocation.update(coarse_steps=0, full_steps=0)
    return {**config, "train": t, "allocation": allocation}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs/embedded/tiny_qwen_open.yaml"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stages", nargs="+", choices=["tower", "lm"], default=["tower", "lm"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    print(f"{Path(args.config).name}: {args.steps} steps per run, min of {args.rounds} rounds, "
          f"{args.threads} threads")
    print(f"{'stage':<6} {'in-process s':>13} {'worker s':>9} {'ratio':>6} {'s/step (worker)':>16}")
    with tempfile.TemporaryDirectory() as folder:
        for stage in args.stages:
            best = {0: float("inf"), 1: float("inf")}
            for r in range(args.rounds):
                for workers in ((0, 1) if r % 2 == 0 else (1, 0)):
                    out = Path(folder) / f"{stage}-{workers}-{r}"
                    run = stage_config(config, stage, args.steps, workers, out)
                    start = time.perf_counter()
                    train(run, resume=False, progress=False, stop_after=args.steps)
                    best[workers] = min(best[workers], time.perf_counter() - start)
            print(f"{stage:<6} {best[0]:>13.1f} {best[1]:>9.1f} {best[1] / best[0]:>6.2f} "
                  f"{best[1] / args.steps:>16.2f}", flush=True)


if __name__ == "__main__":
    main()
