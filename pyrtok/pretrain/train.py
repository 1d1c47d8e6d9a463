"""``pyrtok pretrain --config configs/pretrain/<name>.yaml``: MAE pretraining with pixel and/or Laplacian loss.

One YAML file sets everything (see ``configs/pretrain/``). The run is seeded; every batch and mask is a
function of (seed, step, process), so an interrupted run resumes from its latest checkpoint and continues
exactly as if it had not stopped. The same code runs on several GPUs or processes (DDP): each process
draws its own batches, gradients are averaged, and the schedule advances once per step. On GPUs:
``accelerate launch --multi_gpu --num_processes N -m pyrtok.pretrain.train --config ...``; on CPU
processes: ``ACCELERATE_USE_CPU=true torchrun --nproc_per_node N -m pyrtok.pretrain.train --config ...``.

Outputs under ``output``: ``config.yaml`` (the run's config; see :mod:`pyrtok._training` for resuming under a
changed one), ``log.jsonl`` (one line after the first step, every ``log_every`` steps and after the last; ``seconds``
is the wall time since the previous line, :meth:`pyrtok._training.Run.lap`),
``checkpoints/step-XXXXXXX`` (written to a temporary folder and renamed, with ``checkpoints/latest`` naming the
newest), ``images/step-XXXXXXX.png`` (labelled rows original | masked | reconstruction; for each preview crop
a pixel column and a column of its finest Laplacian band), and ``encoder/`` (the final encoder,
``save_pretrained``: the CLIP vision tower, or with ``model.type: vitmae`` HF's ``ViTMAEModel``).

Without the photographs of the ``train`` extra (:mod:`pyrtok.samples`), ``data.samples: all`` finds none and the
run says so in one line and trains on the shapes scenes (and ``data.folders``) only.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from pyrtok import _training
from pyrtok._help import description
from pyrtok._training import Run, lr_factor, optimizer_step, step_generator
from pyrtok.pretrain.data import HELD_OUT_SAMPLES, ImagePool
from pyrtok.pretrain.mae import MaskedAutoencoder
from pyrtok.pretrain.objectives import Objective, composite, mask_image
from pyrtok.pretrain.vitmae import HFMaskedAutoencoder
from pyrtok.samples import available_samples, missing_sample_packages

__all__ = ["build_model", "load_config", "main", "train"]

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "model": {"type": "clip", "image_size": 224, "patch_size": 16, "hidden_size": 128, "num_layers": 3,
              "num_heads": 4, "intermediate_size": 512, "decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4,
              "mask_ratio": 0.75},
    "loss": {"pixel": 1.0, "lap": 0.0, "norm_pix": True, "lap_levels": 4, "lap_distance": "l1", "lap_weights": None,
             "lap_composite": False},
    "data": {"samples": "all", "shapes": 512, "folders": [], "crop_scale": [0.2, 1.0], "hflip": True,
             "max_side": 512},
    "train": {"steps": 1000, "batch_size": 32, "lr": 1.5e-3, "weight_decay": 0.05, "warmup_steps": 50,
              "grad_clip": 1.0, "log_every": 10, "checkpoint_every": 100, "keep_checkpoints": 2,
              "image_every": 250, "output": "runs/pretrain/default"},
}


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """:data:`DEFAULTS`, updated by the YAML file at ``path`` and then by ``overrides`` (nested dicts)."""
    return _training.load_config(DEFAULTS, path, overrides)


MODEL_TYPES = ("clip", "vitmae")


def build_model(config: dict[str, Any]) -> MaskedAutoencoder | HFMaskedAutoencoder:
    """A fresh MAE from ``config['model']``, its objective from ``config['loss']``: ``type: clip`` (a HF CLIP
    vision tower and a light decoder) or ``type: vitmae`` (HF's ``ViTMAEForPreTraining``, its own decoder of
    ``decoder_depth`` layers ``decoder_dim`` wide)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    m = config["model"]
    if m["type"] not in MODEL_TYPES:
        raise ValueError(f"model.type must be one of {MODEL_TYPES}, got {m['type']!r}")
    if m["type"] == "vitmae":
        from transformers import ViTMAEConfig, ViTMAEForPreTraining

        mae = ViTMAEForPreTraining(ViTMAEConfig(
            hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"], num_hidden_layers=m["num_layers"],
            num_attention_heads=m["num_heads"], image_size=m["image_size"], patch_size=m["patch_size"],
            decoder_hidden_size=m["decoder_dim"], decoder_num_hidden_layers=m["decoder_depth"],
            decoder_num_attention_heads=m["decoder_heads"], decoder_intermediate_size=4 * m["decoder_dim"],
            mask_ratio=m["mask_ratio"], norm_pix_loss=config["loss"]["norm_pix"],
        ))
        return HFMaskedAutoencoder(mae, objective=Objective(**config["loss"]))
    encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"], num_hidden_layers=m["num_layers"],
        num_attention_heads=m["num_heads"], image_size=m["image_size"], patch_size=m["patch_size"],
    ))
    return MaskedAutoencoder(encoder, decoder_dim=m["decoder_dim"], decoder_depth=m["decoder_depth"],
                             decoder_heads=m["decoder_heads"], mask_ratio=m["mask_ratio"],
                             objective=Objective(**config["loss"]))


ROW_LABELS = ("original", "masked", "reconstruction")


def _write_png(model: MaskedAutoencoder, images: torch.Tensor, path: Path, seed: int) -> None:
    """A labelled grid: rows original | masked | reconstruction (the composite); for each image a column in
    pixels and one of its finest Laplacian band, where a pyramid loss and the patch seams show."""
    from pyrtok.pyramid import laplacian_pyramid
    from pyrtok.viz import band_to_image, labelled_grid, save_png

    with torch.no_grad():
        out = model(images, generator=step_generator(seed, 0, 0, stream=2))
        patch = model.patch_size
        weights = mask_image(out.mask, patch, images.shape[-2], images.shape[-1])
        masked = images * (1 - weights) + 0.5 * weights
        filled = composite(out.pred, out.mask, images, patch, model.objective.norm_pix)
    rows = []
    for batch in (images, masked, filled):
        finest = laplacian_pyramid(batch.float().cpu(), 2)[0]
        rows.append([view for image, band in zip(batch.cpu(), finest, strict=True)
                     for view in (image, band_to_image(band))])
    columns = [name for _ in range(images.shape[0]) for name in ("pixel", "laplacian")]
    save_png(labelled_grid(rows, ROW_LABELS, columns), str(path))


def _warn_without_photographs(samples: Any, folders: Any) -> None:
    """One line when ``samples: all`` finds none or only some of the bundled photographs."""
    missing, line = missing_sample_packages()
    if samples != "all" or not missing:
        return
    found = len([n for n in available_samples() if n not in HELD_OUT_SAMPLES])
    own = " and data.folders" if folders else ""
    what = f"shapes scenes{own} only" if not found else f"{found} photographs, shapes scenes{own}"
    print(f"pyrtok pretrain: warning: {', '.join(missing)} not installed, so training on {what}; the "
          f"photographs come with the train extra: {line}", file=sys.stderr, flush=True)


def train(
    config: dict[str, Any], resume: bool = True, progress: bool = True, stop_after: int | None = None
) -> Path:
    """Run (or resume) the pretraining that ``config`` describes; returns the output folder.

    ``stop_after`` ends this invocation after that many steps (with a checkpoint), for time-sliced jobs;
    the next call resumes where it stopped.
    """
    t, d, m = config["train"], config["data"], config["model"]
    for key in ("steps", "batch_size", "keep_checkpoints", "checkpoint_every", "log_every", "image_every"):
        if isinstance(t[key], bool) or not isinstance(t[key], int) or t[key] < 1:
            raise ValueError(f"train.{key} must be an int >= 1, got {t[key]!r}")
    run = Run(config, folders=("images",))
    accelerator = run.accelerator
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"],
                                  betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, t))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, schedule)
    run.resume(resume, schedule, logs=("log.jsonl",))
    if run.is_main:
        _warn_without_photographs(d["samples"], d["folders"])
    pool = ImagePool(d["samples"], d["folders"], max_side=d["max_side"], shapes=d["shapes"], seed=config["seed"])
    device, rank = accelerator.device, accelerator.process_index
    preview = pool.batch(4, m["image_size"], config["seed"], step=10**9).to(device)
    bar = run.steps(t["steps"], stop_after, progress)
    for step in bar:
        images = pool.batch(t["batch_size"], m["image_size"], config["seed"], step, rank,
                            scale=tuple(d["crop_scale"]), hflip=d["hflip"]).to(device)
        with accelerator.autocast():
            out = model(images, generator=step_generator(config["seed"], step, rank, stream=1))
        optimizer_step(accelerator, model, optimizer, scheduler, out.loss, t["grad_clip"])
        done = step + 1
        if run.log_due(done, t["log_every"]):
            values = {k: accelerator.gather(v.detach().reshape(1)).mean().item() for k, v in out.losses.items()}
            bar.set_postfix(loss=f"{values['loss']:.4f}")
            run.log("log.jsonl", {"step": done, "lr": scheduler.get_last_lr()[0], **values,
                                  "seconds": round(run.lap(), 3)})
        if done % t["image_every"] == 0 and run.is_main:
            _write_png(accelerator.unwrap_model(model), preview, run.output / "images" / f"step-{done:07d}.png",
                       config["seed"])
        if done % t["checkpoint_every"] == 0 or done == run.end:
            run.checkpoint(done, t["keep_checkpoints"])
    if run.is_main and run.finished:
        accelerator.unwrap_model(model).encoder.save_pretrained(run.output / "encoder")
    accelerator.wait_for_everyone()
    return run.output


def main(argv: list[str] | None = None) -> None:
    """``pyrtok pretrain`` with ``argv`` (default: the command line)."""
    _training.run_cli("pyrtok pretrain", description(__doc__), train, load_config, argv)


if __name__ == "__main__":
    main()
