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
    assert "--debug" in out and "`" not in out


def test_no_command_prints_the_usage_and_fails(capsys):
    main(["--help"])
    usage = capsys.readouterr().out
    for argv in ([], ["--debug"]):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code == 2 and capsys.readouterr().err.strip() == usage.strip()


def test_version(capsys):
    from importlib.metadata import version

    main(["--version"])
    assert capsys.readouterr().out.strip() == f"pyrtok {version('pyrtok')}"
    done = subprocess.run([sys.executable, "-m", "pyrtok.cli", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("pyrtok ")


def test_unknown_command_fails_with_the_command_list(capsys):
    code, err = fails(["nope"], capsys)
    assert code == "pyrtok: unknown command 'nope'" and "  ablate" in "\n".join(err)


@pytest.mark.parametrize(("typed", "meant"), [("pretrian", "'pretrain'"), ("abalte", "'ablate'"),
                                              ("make-shape", "'make-shapes'"), ("trainvlm", "'train-vlm'")])
def test_a_misspelled_command_gets_the_closest_names(capsys, typed, meant):
    code, _ = fails([typed], capsys)
    assert code.startswith(f"pyrtok: unknown command {typed!r}; did you mean {meant}")


def _parser_of(name, monkeypatch):
    """The ArgumentParser that ``pyrtok <name>`` builds (caught as it parses, before the command runs)."""
    import argparse

    seen = []

    def catch(self, args=None, namespace=None):
        seen.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)  # this test only, undone after it
    with pytest.raises(SystemExit):
        main([name])
    return seen[-1]


COMMAND_NAMES = [*COMMANDS, "ablate"]


@pytest.mark.parametrize("name", COMMAND_NAMES)
def test_every_option_of_every_command_is_described_in_plain_text(name, monkeypatch):
    import argparse

    parser = _parser_of(name, monkeypatch)
    assert parser.prog == f"pyrtok {name}" and parser.description and "`" not in parser.description
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        what = action.option_strings or [action.dest]
        assert action.help and action.help != argparse.SUPPRESS, f"pyrtok {name} {what[0]}: no help text"
        assert "`" not in action.help, f"pyrtok {name} {what[0]}: backticks in {action.help!r}"


def test_help_of_a_command_is_plain_text(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0 and "`" not in out and "--allow-config-change" in out


def test_a_missing_optional_package_is_one_line_that_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # as after the main install, in this test only
    code, err = fails(["make-shapes", "--format", "pope", "--splits", "test", "--questions", "2",
                       "--out", str(tmp_path / "pope")], capsys)
    assert code == 2 and err == [
        'pyrtok make-shapes: needs lmms-eval; pip install -e ".[lmms]" && pip install --no-deps lmms-eval==0.7.3']
    assert not (tmp_path / "pope").exists()
    monkeypatch.setitem(sys.modules, "accelerate", None)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"train": {"steps": 1, "output": str(tmp_path / "run")}}))
    code, err = fails(["pretrain", "--config", str(config)], capsys)
    assert code == 2 and err == ['pyrtok pretrain: needs accelerate; pip install -e ".[train]"']
    with pytest.raises(ModuleNotFoundError):  # --debug keeps the traceback
        main(["pretrain", "--config", str(config), "--debug"])


def test_a_missing_module_that_no_extra_provides_keeps_its_traceback():
    from pyrtok.cli import run_command

    def broken(argv):
        import pyrtok.no_such_module  # noqa: F401  (a bug, not a missing extra)

    with pytest.raises(ModuleNotFoundError, match="no_such_module"):
        run_command("x", broken, [])

    def old_transformers(argv):  # a submodule missing from an installed package: a version mismatch
        raise ModuleNotFoundError("No module named 'transformers.nope'", name="transformers.nope")

    with pytest.raises(ModuleNotFoundError):
        run_command("x", old_transformers, [])


def test_the_extras_table_matches_pyproject():
    import re
    import tomllib
    from pathlib import Path

    from pyrtok._extras import OPTIONAL

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(extra):
        return {re.split(r"[<>=\[ ]", spec)[0].lower() for spec in extras[extra]}

    for module, (distribution, extra) in OPTIONAL.items():
        if module == "lmms_eval":  # installed with --no-deps after the lmms extra (README)
            assert extra == "lmms"
            continue
        assert distribution.lower() in names(extra), f"{module}: {distribution} is not in the {extra} extra"
    assert "pyrtok[lmms]" in extras["dev"] and names("lmms") >= {"evaluate", "loguru", "filelock", "pytablewriter"}
    assert {"scikit-image", "matplotlib", "scikit-learn", "pywavelets"} <= names("train")  # the photographs


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
