"""README.md runs as written: it opens with the commands CI runs, every python block executes from the repository
root, offline, every documented `pyrtok` command exists and parses with its own parser, and none loses results."""

import argparse
import re
import shlex
import tempfile
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import yaml

from pyrtok.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT.joinpath("README.md").read_text()
# the two lines .ci/run greps and runs verbatim
MAIN_LINE = r"^python3 -m venv .*&& pyrtok ablate .*$"
TESTS_LINE = r"^python3 -m venv .*&& pytest$"
MAIN_OUTPUT = Path("runs/ablation/default")  # the main command's results, which no other command may touch


def _blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.S | re.M)


def _quick_tour() -> str:
    section = README.split("## Quick tour", 1)[1].split("\n## ", 1)[0]
    blocks = _blocks("python", section)
    assert len(blocks) == 1, "the quick tour holds one python block"
    return blocks[0]


def _run(source: str, name: str, tmp_path: Path, monkeypatch) -> dict:
    """Execute ``source`` in a fresh namespace from the repository root; files that it puts in temporary
    folders land under ``tmp_path``."""
    monkeypatch.chdir(ROOT)  # blocks name the embedded model by its path in the repository
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    scope: dict = {"__name__": "readme"}
    exec(compile(source, name, "exec"), scope)
    return scope


def test_quick_tour_runs_for_a_batch_of_two(tmp_path, monkeypatch):
    scope = _run(_quick_tour(), "README.md quick tour", tmp_path, monkeypatch)
    assert scope["images"].shape == (2, 3, 224, 224)
    assert scope["tokens"].num_tokens == 261
    assert scope["selection"].index.shape == (2, 64)
    assert torch.equal(scope["selection"].count, torch.tensor([64, 64]))
    out = scope["out"]
    assert len(out.texts) == 2 and all(out.texts)
    assert torch.equal(out.counts.cpu(), torch.tensor([64, 64]))


def _heading_before(block: str) -> str:
    above = README[: README.index(block)]
    return re.findall(r"^#+ (.*)$", above, flags=re.M)[-1]


# every python block but the quick tour's, which the test above runs with its assertions
OTHER_BLOCKS = [b for b in _blocks("python") if b != _quick_tour()]


def test_every_python_block_is_tested():
    assert len(OTHER_BLOCKS) + 1 == len(_blocks("python")) >= 6


@pytest.mark.parametrize("block", OTHER_BLOCKS, ids=[f"{i}-{_heading_before(b)}" for i, b in enumerate(OTHER_BLOCKS)])
def test_python_block_runs_as_written(block, tmp_path, monkeypatch):
    scope = _run(block, f"README.md block under {_heading_before(block)!r}", tmp_path, monkeypatch)
    if "stage_counts" in block:  # the schedule block: what its comment says
        assert scope["out"].stage_counts.tolist() == [[192, 96, 48], [192, 96, 48]]
    if "clip_query" in block:  # the query block
        assert scope["query"].shape == (2, 16) and scope["selection"].count.tolist() == [32, 32]
        assert scope["out"].counts.tolist() == [32, 32]
    if "encoded.kept" in block:  # the step-by-step block ends on its last budget
        assert scope["encoded"].kept(scope["selections"]) == [16, 128]
        assert scope["inputs"].counts.tolist() == [29, 29] and scope["text_only"].counts.tolist() == [0]


def test_readme_opens_with_what_it_is_then_the_two_commands_ci_runs():
    lines = README.splitlines()
    assert lines[0] == "# pyrtok" and lines[1] == "" and lines[2] and lines[3] == "", "a one-line summary first"
    bash = _blocks("bash")
    assert re.fullmatch(MAIN_LINE + "\n", bash[0], flags=re.M), "the first block is the main command, one line"
    assert re.fullmatch(TESTS_LINE + "\n", bash[1], flags=re.M), "the second block is the test command, one line"
    assert README.index(bash[1]) < README.index("\n## "), "both come before the first section"


def test_local_links_notebooks_and_layout_exist():
    for target in re.findall(r"\]\(([^)#:]+)(?:#([^)]+))?\)", README):
        path, anchor = target
        assert (ROOT / path).exists(), f"README links to {path}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", (ROOT / path).read_text(), flags=re.M)
            slugs = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}
            assert anchor in slugs, f"{path} has no heading for #{anchor}"
    for notebook in sorted(ROOT.glob("notebooks/*.ipynb")):
        assert f"`notebooks/{notebook.name}`" in README, f"README does not list {notebook.name}"
    layout = README.split("## Layout", 1)[1].split("\n## ", 1)[0]
    for name in re.findall(r"`([\w./]+(?:\.py|/))`", layout):
        if "/" in name.rstrip("/"):
            assert (ROOT / name).exists(), f"Layout names {name}, which does not exist"
        else:
            found = [p for top in ("pyrtok", "eval") for p in (ROOT / top).rglob(name.rstrip("/"))]
            assert found or (ROOT / name).exists(), f"Layout names {name}, which does not exist"


# -- the documented commands ---------------------------------------------------------------------------------------
PLUGINS = {ep.name: ep.value.split(":")[0] for ep in entry_points(group="pyrtok.commands")}
MODULES = {module: name for name, (module, _) in COMMANDS.items()} | {m: n for n, m in PLUGINS.items()}


def _commands() -> list[tuple[str, list[str]]]:
    """(line, argv after `pyrtok`) for every pyrtok command in README's bash blocks: `pyrtok ...`, also after
    `&&` or environment assignments, and `python -m` / `torchrun -m` / `accelerate launch -m` of a command's
    module."""
    found = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split, lexer.commenters = True, "#"
            words, segments = list(lexer), [[]]
            for word in words:
                if word in ("&&", "||", ";", "|"):
                    segments.append([])
                else:
                    segments[-1].append(word)
            for words in segments:
                while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                    words = words[1:]
                if words[:1] == ["pyrtok"]:
                    found.append((line, words[1:]))
                elif "-m" in words[:-1] and words[words.index("-m") + 1].startswith("pyrtok"):
                    module = words[words.index("-m") + 1]
                    assert module in MODULES, f"README runs `-m {module}`, which is no pyrtok command: {line}"
                    found.append((line, [MODULES[module], *words[words.index("-m") + 2:]]))
    return found


COMMAND_LINES = _commands()
MAIN_ARGV = next(argv for line, argv in COMMAND_LINES if re.fullmatch(MAIN_LINE, line))


def _parser_of(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The ArgumentParser that ``pyrtok <name>`` builds (caught as it parses, before the command runs)."""
    seen = []

    def catch(self, args=None, namespace=None):
        seen.append(self)
        raise SystemExit(0)

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", catch)
        with pytest.raises(SystemExit):
            main([name])
    return seen[-1]


def test_the_readme_documents_commands():
    assert len(COMMAND_LINES) >= 10 and MAIN_ARGV[0] == "ablate"


@pytest.mark.parametrize(("line", "argv"), COMMAND_LINES, ids=[" ".join(argv)[:60] for _, argv in COMMAND_LINES])
def test_documented_command_parses_and_loses_nothing(line, argv, monkeypatch, capsys):
    if argv[0] in ("--help", "-h", "--version"):
        main(argv)
        return
    name, rest = argv[0], argv[1:]
    assert name in COMMANDS or name in PLUGINS, f"README documents an unknown command: {line}"
    parser = _parser_of(name, monkeypatch)
    try:
        args = parser.parse_args(rest)
    except SystemExit:
        pytest.fail(f"pyrtok {name} does not parse the README's {rest}: {capsys.readouterr().err.strip()}")
    for word in rest:
        if word.endswith((".yaml", ".yml")) and "=" not in word:
            assert (ROOT / word).is_file(), f"README names {word}, which does not exist: {line}"
    assert "--fresh" not in rest, f"a documented command sets the earlier run aside: {line}"
    is_main = argv == MAIN_ARGV
    for word in rest:
        if re.search(r"(^|=)runs/ablation/default/?($|/)", word):
            assert is_main, f"only the main command may write to {MAIN_OUTPUT}: {line}"
    if name == "ablate":
        overrides = dict(item.partition("=")[::2] for item in args.set)
        output = args.output or overrides.get("output") or yaml.safe_load((ROOT / args.config).read_text())["output"]
        assert is_main or Path(output) != MAIN_OUTPUT, f"only the main command may write to {MAIN_OUTPUT}: {line}"
