"""``pyrtok export-vlm``: write a ``train-vlm`` checkpoint as a plain HF model folder (model + its processor).

The final step of ``train-vlm`` does this by itself; exporting is for an intermediate checkpoint (the one
with the best validation accuracy, or the latest of a run still going), e.g.::

    pyrtok export-vlm --run runs/embedded/tiny_llava --out pyrtok/assets/tiny_llava
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pyrtok._help import description
from pyrtok._training import latest_checkpoint

__all__ = ["export_checkpoint", "main"]


def export_checkpoint(run: str | Path, out: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Save the VLM of ``checkpoint`` (default: the run's latest) and its processor under ``out``.

    The run's ``config.yaml`` rebuilds the architecture and its processor (a LLaVA's is its tokenizer; a
    Qwen2.5-VL's holds the tokenizer, chat template, image and video processors), so ``out`` loads with
    ``PyramidVLM.from_pretrained`` and with transformers' ``AutoModelForImageTextToText`` and ``AutoProcessor``;
    the dense heads of stage 1 are left out. Writes
    ``out/training_step.json`` with the step the weights come from and ``out/training_config.yaml``, the
    run's config.
    """
    from safetensors.torch import load_file

    from pyrtok.embedded.tiny import Trainee, build
    from pyrtok.embedded.train import load_config

    run = Path(run)
    config = load_config(run / "config.yaml")
    checkpoint = Path(checkpoint) if checkpoint else latest_checkpoint(run / "checkpoints")
    if checkpoint is None or not (checkpoint / "model.safetensors").is_file():
        raise FileNotFoundError(f"no checkpoint with model.safetensors under {run / 'checkpoints'}")
    model, processor = build({**config, "init": {"vision_tower": None}})
    trainee = Trainee(model, processor, config)
    missing, unexpected = trainee.load_state_dict(load_file(str(checkpoint / "model.safetensors")), strict=False)
    # lm_head is tied to the embeddings; the dense heads are not exported (older runs lack some of them)
    tied = f"{trainee.arch.prefix}.lm_head.weight"
    if unexpected or any(k != tied and not k.startswith("heads.") for k in missing):
        raise ValueError(f"{checkpoint} does not match the run's config: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    step = json.loads((checkpoint / "step.json").read_text())["step"]
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training_step.json").write_text(json.dumps({"run": str(run), "step": step}) + "\n")
    (out / "training_config.yaml").write_text((run / "config.yaml").read_text())
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pyrtok export-vlm", description=description(__doc__))
    parser.add_argument("--run", required=True, help="a train-vlm output folder")
    parser.add_argument("--out", required=True, help="where to write the model folder")
    parser.add_argument("--checkpoint", help="a checkpoint folder (default: the run's latest)")
    args = parser.parse_args(argv)
    print(export_checkpoint(args.run, args.out, args.checkpoint))
