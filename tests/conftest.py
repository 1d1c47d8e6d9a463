import pytest
import torch


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
