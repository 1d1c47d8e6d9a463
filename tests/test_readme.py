"""README.md's quick tour runs as written and does what its comments say."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _quick_tour() -> str:
    section = ROOT.joinpath("README.md").read_text().split("## Quick tour", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the quick tour holds one python block"
    return blocks[0]


def test_quick_tour_runs_for_a_batch_of_two(monkeypatch):
    monkeypatch.chdir(ROOT)  # the tour names the embedded model by its path in the repository
    scope: dict = {}
    exec(compile(_quick_tour(), "README.md quick tour", "exec"), scope)
    assert scope["images"].shape == (2, 3, 224, 224)
    assert scope["tokens"].num_tokens == 261
    assert scope["selection"].index.shape == (2, 64)
    assert torch.equal(scope["selection"].count, torch.tensor([64, 64]))
    out = scope["out"]
    assert len(out.texts) == 2 and all(out.texts)
    assert torch.equal(out.counts.cpu(), torch.tensor([64, 64]))
