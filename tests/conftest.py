"""Fixtures and helpers shared by the test modules: devices, seeded generators, random images, chat prompts,
a logits recorder, and tiny random-weight VLMs of every family saved with their processors (built once per
session and cached by their build options)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

QUESTION = "what colour is the shape?"
LONG_QUESTION = "how many small red circles are there in the picture on the left?"

# With Qwen's rope_theta (1e6, 5e6) and a 16-wide head, the sequential M-RoPE sections give the width axis only
# frequencies of ~1e-4 rad per position, so a wrong column would move the logits by less than the tolerance. A
# small theta makes every axis count, so that position errors on any axis fail the tests.
SMALL_ROPE = {"qwen2_vl": {"rope_type": "default", "rope_theta": 10.0, "mrope_section": [2, 3, 3]},
              "qwen2_5_vl": {"rope_type": "default", "rope_theta": 10.0, "mrope_section": [2, 3, 3]},
              "qwen3_vl": {"rope_type": "default", "rope_theta": 10.0, "mrope_section": [2, 3, 3],
                           "mrope_interleaved": True}}


def _devices() -> list[str]:
    # CUDA is exercised wherever it exists; CPU-only machines run the CPU cases (nothing is skipped).
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


DEVICES = _devices()


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def free_port() -> int:
    """A local TCP port no one listens on now, for a torch.distributed.run rendezvous: a fixed port fails
    when two test runs share the machine."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A (width x height) PIL image of uniform random 8-bit pixels."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def chat(processor, question: str = QUESTION, images: int = 1) -> str:
    """``question`` about ``images`` images in the processor's own chat template."""
    content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


class Recorder(LogitsProcessor):
    """Keeps the logits of every decoding step, unchanged: greedy tokens of a random model hide small errors."""

    def __init__(self) -> None:
        self.scores: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.scores.append(scores.detach().clone())
        return scores

    def stacked(self) -> torch.Tensor:
        """(B, steps, V) logits of every decoding step."""
        return torch.stack(self.scores, dim=1)


def assert_reproduces(model, processor, vlm, images: list, prompt: str, steps: int = 4) -> None:
    """``vlm`` on one sample (``images``, ``prompt``) is the unwrapped ``model`` through its own ``processor``:
    the same input ids, logits equal to float32 rounding (``torch.testing.assert_close``'s float32 tolerance,
    1e-5 + 1.3e-6 x |logit|: the [0, 1] pixels pyrtok reads back from the processor's normalised ``pixel_values``
    differ from them by up to one ulp once normalised again), the same greedy tokens with the same per-step logits,
    and image counts equal to the processor's placeholders."""
    inputs = processor(images=images, text=[prompt], return_tensors="pt")
    with torch.no_grad():
        reference = model(**inputs).logits
        ours = vlm([images], [prompt])
    assert torch.equal(ours.input_ids, inputs["input_ids"])
    torch.testing.assert_close(ours.logits, reference, rtol=1.3e-6, atol=1e-5)
    generated = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    recorder = Recorder()
    out = vlm.generate([images], [prompt], max_new_tokens=steps, logits_processor=LogitsProcessorList([recorder]))
    assert torch.equal(out.sequences, generated.sequences[:, inputs["input_ids"].shape[1]:])
    ours_steps = recorder.stacked()
    torch.testing.assert_close(ours_steps, torch.stack(generated.logits, dim=1)[:, : ours_steps.shape[1]], rtol=1.3e-6,
                               atol=1e-5)
    assert out.counts.tolist() == [int((inputs["input_ids"] == model.config.image_token_id).sum())]


def recorded(recorder: Recorder) -> torch.Tensor:
    """(B, steps, V) logits of every decoding step."""
    return recorder.stacked()


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """``tiny_vlm(family, text_layers=2, hidden=64, small_rope=True, eager=False)`` -> (folder, model, processor):
    a tiny random-weight model of ``family`` (a :data:`pyrtok.testing.FAMILIES` name) saved with its processor,
    built once per session for each set of options (Qwen models with a small rope theta by default)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pyrtok.testing import save_tiny_vlm

    cache: dict[tuple, tuple] = {}

    def load(family: str, text_layers: int = 2, hidden: int = 64, small_rope: bool = True, eager: bool = False):
        key = (family, text_layers, hidden, small_rope, eager)
        if key not in cache:
            overrides = {"text_config": {"rope_parameters": SMALL_ROPE[family]}} \
                if small_rope and family in SMALL_ROPE else {}
            folder = save_tiny_vlm(family, tmp_path_factory.mktemp(family), hidden=hidden, text_layers=text_layers,
                                   **overrides)
            options = {"attn_implementation": "eager"} if eager else {}
            model = AutoModelForImageTextToText.from_pretrained(folder, **options).eval()
            cache[key] = (folder, model, AutoProcessor.from_pretrained(folder))
        return cache[key]

    return load
