"""Interrupting a training run: the step in progress finishes, a checkpoint of it is saved, and the rerun resumes
from it exactly; a second interrupt stops at once; the signal handlers are the run's only while it runs."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from test_pretrain import TINY, tiny_config

import pyrtok.pretrain.train as pretrain
from pyrtok import _training
from pyrtok._training import Interrupted, Run


def bare_run(folder):
    run = Run({"seed": 0, "train": {"output": str(folder), "steps": 10, "keep_checkpoints": 2}})
    run.resume(True)
    return run


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_ends_the_steps_at_the_next_boundary_with_a_checkpoint(tmp_path, name):
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    run, seen = bare_run(tmp_path / "run"), []
    with pytest.raises(Interrupted) as info:
        for step in run.steps(10, progress=False):
            seen.append(step)
            if step == 3:
                os.kill(os.getpid(), getattr(signal, name))
            seen.append(f"{step} done")  # the step in progress runs to its end
    assert seen == [0, "0 done", 1, "1 done", 2, "2 done", 3, "3 done"]
    assert (info.value.step, info.value.total) == (4, 10)
    assert isinstance(info.value, KeyboardInterrupt)
    assert (tmp_path / "run/checkpoints/latest").read_text() == "step-0000004"
    assert json.loads((info.value.checkpoint / "step.json").read_text()) == {"step": 4}
    assert {number: signal.getsignal(number) for number in before} == before
    assert bare_run(tmp_path / "run").start == 4  # the rerun starts after the last step done


def test_a_later_second_signal_stops_at_once_and_a_repeat_at_once_is_the_same_request(tmp_path, capsys):
    before = signal.getsignal(signal.SIGINT)
    run = bare_run(tmp_path / "run")
    steps = run.steps(10, progress=False)
    steps.REPEAT_S = 0.0  # any second signal counts as a second request
    with pytest.raises(KeyboardInterrupt, match="SIGINT again: stopping without a checkpoint") as info:
        for step in steps:
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
    assert not isinstance(info.value, Interrupted)
    assert not (tmp_path / "run/checkpoints/latest").exists()
    assert signal.getsignal(signal.SIGINT) is before
    assert "SIGINT: finishing this step and saving a checkpoint" in capsys.readouterr().err
    # a signal sent to a process both directly and through its launcher arrives twice at once: one request
    with pytest.raises(Interrupted) as info:
        for step in run.steps(10, progress=False):
            if step == 5:
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)
    assert info.value.step == 6 and (tmp_path / "run/checkpoints/latest").read_text() == "step-0000006"


def test_a_step_that_saved_its_own_checkpoint_is_not_saved_twice(tmp_path):
    run = bare_run(tmp_path / "run")
    with pytest.raises(Interrupted) as info:
        for step in run.steps(10, progress=False):
            if step == 3:
                os.kill(os.getpid(), signal.SIGINT)
                run.checkpoint(4, 2)  # the step's own checkpoint, as a training loop saves every k steps
                (tmp_path / "run/checkpoints/step-0000004/mark").write_text("the step's own")
    assert info.value.step == 4
    assert (tmp_path / "run/checkpoints/step-0000004/mark").read_text() == "the step's own"


def interrupt_at(monkeypatch, call):
    """Send SIGINT to this process during the ``call``-th optimizer step of pretraining."""
    calls = []

    def step(*args, **kwargs):
        _training.optimizer_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(pretrain, "optimizer_step", step)


def test_an_interrupted_pretraining_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    straight = pretrain.train(tiny_config(tmp_path / "straight"), progress=False)
    config = tiny_config(tmp_path / "cut")
    interrupt_at(monkeypatch, 3)  # step 3 of 4 is between the checkpoints at 2 and 4
    with pytest.raises(Interrupted) as info:
        pretrain.train(config, progress=False)
    assert info.value.step == 3
    assert (tmp_path / "cut/checkpoints/latest").read_text() == "step-0000003"
    monkeypatch.undo()
    cut = pretrain.train(config, progress=False)
    a = load_file(str(straight / "checkpoints/step-0000004/model.safetensors"))
    b = load_file(str(cut / "checkpoints/step-0000004/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_the_command_line_says_where_it_stopped_and_exits_130(tmp_path, monkeypatch, capsys):
    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    interrupt_at(monkeypatch, 1)
    with pytest.raises(SystemExit) as exit:
        pretrain.main(["--config", str(config), "--output", str(tmp_path / "run")])
    assert exit.value.code == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("pyrtok pretrain: interrupted; stopped at step 1 of 4 with a checkpoint (resume with: ")
    assert (tmp_path / "run/checkpoints/latest").read_text() == "step-0000001"
