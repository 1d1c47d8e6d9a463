"""The ``pyrtok`` console script: the command list, one-line user errors with exit status 2, ``--debug``."""

import subprocess
import sys

import pytest
import yaml

from pyrtok.cli import COMMANDS, main


def fails(argv, capsys):
    """Exit status and stderr lines of ``pyrtok <argv>`` run in this process."""
    with pytest.raises(SystemExit) as exit:
        main(argv)
    return exit.value.code, capsys.readouterr().err.strip().splitlines()


def test_help_lists_every_command_with_a_description(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines() if line.startswith("  ")}
    assert set(COMMANDS) | {"ablate"} <= set(lines)
    assert lines["ablate"].startswith("run a token-budget ablation") and "(from" not in out
    assert all(len(description) > 10 for description in lines.values())
    assert "--debug" in out
    main([])
    assert capsys.readouterr().out == out


def test_unknown_command_fails_with_the_command_list(capsys):
    code, err = fails(["nope"], capsys)
    assert code == "pyrtok: unknown command 'nope'" and "  ablate" in "\n".join(err)


@pytest.mark.parametrize(("content", "message"), [
    (None, "the ablation config '{path}' does not exist"),
    ("budgets: [1, 2\n", "invalid YAML: while parsing a flow sequence"),
    ("- just\n- a list\n", "the ablation config must be a mapping"),
    ({"models": [{"name": "m", "path": "p"}], "allocators": ["pool"], "budgets": [0],
      "tasks": [{"name": "t"}]}, "budgets[0] must be a positive token count"),
    ({"models": [{"name": "m", "path": "p"}], "allocators": ["pool", "nope"], "budgets": [1],
      "tasks": [{"name": "t"}]}, "allocators[1] must be a registered allocator"),
])
def test_ablate_config_errors_are_one_line_with_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "config.yaml"
    if content is not None:
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    code, err = fails(["ablate", "--config", str(path), "--no-progress"], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("pyrtok ablate: ") and message.format(path=path) in err[0]


def test_built_in_commands_report_missing_files_the_same_way(tmp_path, capsys):
    code, err = fails(["train-vlm", "--config", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and err == [f"pyrtok train-vlm: No such file or directory: '{tmp_path / 'missing.yaml'}'"]


def test_debug_before_or_after_the_command_shows_the_exception(tmp_path):
    missing = str(tmp_path / "missing.yaml")
    for argv in (["--debug", "ablate", "--config", missing], ["ablate", "--config", missing, "--debug"]):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            main(argv)


def test_ablate_flag_combinations_are_usage_errors(tmp_path, capsys):
    for flags, message in ((["--retry-errors"], "pass it with --resume"), (["--resume", "--fresh"], "one of them"),
                           (["--set", "budgets=[1"], "not valid YAML")):
        code, err = fails(["ablate", "--config", str(tmp_path / "c.yaml"), *flags], capsys)
        assert code == 2 and message in err[-1]


def test_console_script_prints_no_traceback(tmp_path):
    command = [sys.executable, "-m", "pyrtok.cli", "ablate", "--config", str(tmp_path / "missing.yaml")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"pyrtok ablate: the ablation config '{tmp_path / 'missing.yaml'}' does not exist"]
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr
