"""The documentation cannot drift from the code: every ``sweep ...`` line that README.md and
docs/*.md show names a real command and only its options (lines a user would paste are parsed by
click itself), every command and option is shown somewhere, the study-file page shows the shipped
study file, and relative links point to files that exist. Nothing here trains or starts a
process: click introspection only, well under a second."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from sweep.cli import main

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHIPPED_STUDY = ROOT / "studies" / "warmup_vs_plateau.yaml"
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
README_LINES_MAX = 200  # the front door stays short; the rest lives in docs/

_BLOCK = re.compile(r"^```([\w-]*)\n(.*?)^```", re.M | re.S)
_INLINE = re.compile(r"`(sweep [^`]+)`")
_OPTION = re.compile(r"^--?[A-Za-z][\w-]*$")
_ENV_PREFIX = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+(?=sweep\b)")
_COMMENT = re.compile(r"\s+#.*$")  # a shell comment after the command
_REPO_FILE = re.compile(r"(?<![\w/.])((?:scripts|tests|sweep|studies|docs|examples)/[\w/.-]+"
                        r"\.(?:py|yaml|sh|sbatch|md|png))")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _blocks(text: str) -> list[tuple[str, str]]:
    """(info string, body) of every fenced code block."""
    return [(m.group(1), m.group(2)) for m in _BLOCK.finditer(text)]


def _logical_lines(body: str) -> list[str]:
    """Lines of a code block with continuations joined: a trailing backslash, or an indented
    line under a ``sweep`` line (the synopsis in docs/cli.md wraps that way)."""
    lines: list[str] = []
    for raw in body.splitlines():
        if lines and (lines[-1].endswith("\\") or
                      (raw[:1].isspace() and raw.strip() and lines[-1].startswith("sweep"))):
            lines[-1] = lines[-1].rstrip("\\").rstrip() + " " + raw.strip()
        else:
            lines.append(raw.strip())
    return lines


def shown_commands() -> list[tuple[str, bool, str]]:
    """(where, runnable, line) of every ``sweep ...`` line in the pages: code-block lines, and
    inline code spans in the text (checked by name only: they use placeholders)."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for lang, body in _blocks(text):
            for line in _logical_lines(body):
                for part in line.split("&&"):  # `pip install -e . && sweep launch ...`
                    part = _ENV_PREFIX.sub("", part.strip())  # `SWEEP_DATA_DIR=... sweep ...`
                    part = _COMMENT.sub("", part)
                    if part == "sweep" or part.startswith("sweep "):
                        found.append((_rel(page), lang in SHELL_BLOCKS, part))
        prose = _BLOCK.sub("", text)
        found += [(_rel(page), False, span) for span in _INLINE.findall(prose)]
    return found


def _tokens(line: str) -> list[str]:
    return shlex.split(line, comments=True)


def _command_and_options(line: str) -> tuple[str | None, list[str]]:
    """The subcommand (None for ``sweep --version``) and every option the line names (synopsis
    brackets and ``--opt=value`` stripped)."""
    tokens = _tokens(line)[1:]
    name = tokens[0] if tokens and not tokens[0].startswith("-") else None
    command = main if name is None else main.commands.get(name)
    takes_value = _value_options(command) if command is not None else set()
    options = []
    skip = False
    for token in tokens:
        if skip:  # the value of the option before it, e.g. --sbatch-option '--mail-type=FAIL'
            skip = False
            continue
        token = token.strip("[]").split("=", 1)[0]
        if _OPTION.match(token):
            options.append(token)
            skip = token in takes_value
    return name, options


def _value_options(command: click.Command) -> set[str]:
    """The option names of ``command`` that take a value (the next token is that value)."""
    return {opt for param in command.params
            if isinstance(param, click.Option) and not param.is_flag and not param.count
            for opt in param.opts}


def _option_names(command: click.Command) -> set[str]:
    names = {"--help", "-h"}
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(param.opts + param.secondary_opts)
    return names


COMMANDS = shown_commands()


def test_the_pages_show_commands():
    """The extraction itself works: the README's first command and the reference are found."""
    assert ("README.md", True, "sweep launch --study warmup_vs_plateau") in COMMANDS
    assert any(where == "docs/cli.md" and line.startswith("sweep submit --study NAME --array K")
               for where, _, line in COMMANDS)


@pytest.mark.parametrize("where, runnable, line", COMMANDS)
def test_command_and_options_exist(where, runnable, line):
    name, options = _command_and_options(line)
    command = main if name is None else main.commands.get(name)
    assert command is not None, f"{where}: `{line}`: sweep has no command {name!r}"
    unknown = [opt for opt in options if opt not in _option_names(command)]
    assert not unknown, f"{where}: `{line}`: `sweep {name or ''}` has no option {unknown}"
    if runnable and name is not None and "$" not in line:
        # What the shell would pass, parsed by click as `sweep` would (types, values, required
        # options); nothing is run. A `cmd && sweep ...` line keeps only the sweep part.
        args = _tokens(line)[2:]
        try:
            command.make_context(name, args)
        except click.ClickException as err:
            pytest.fail(f"{where}: `{line}` does not parse: {err.format_message()}")


def test_every_command_and_option_is_documented():
    shown: dict[str, set[str]] = {}
    for _, _, line in COMMANDS:
        name, options = _command_and_options(line)
        shown.setdefault(name or "", set()).update(options)
    missing = []
    for name, command in main.commands.items():
        if name not in shown:
            missing.append(f"sweep {name}")
            continue
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden \
                    and not set(param.opts) & shown[name]:
                missing.append(f"sweep {name} {param.opts[-1]}")
    assert not missing, f"not shown in any `sweep ...` line of README.md or docs/: {missing}"


def test_study_file_page_shows_the_shipped_file():
    page = ROOT / "docs" / "study-files.md"
    shipped = SHIPPED_STUDY.read_text()
    shown = [body for lang, body in _blocks(page.read_text())
             if lang == "yaml" and "name: warmup_vs_plateau" in body]
    assert shown, f"{_rel(page)} shows no yaml block of the shipped study"
    assert shown[0] == shipped, (f"{_rel(page)} shows another study file than {_rel(SHIPPED_STUDY)}:"
                                 f" paste the file into the page")


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_point_to_files(page):
    broken = []
    for target in _LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{_rel(page)}: links to missing files {broken}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_named_repository_files_exist(page):
    """`scripts/bench_fused.py`, `sweep/stores/retry.py`, ...: files the text names
    (placeholders such as `studies/NAME.yaml` aside)."""
    named = set(_REPO_FILE.findall(page.read_text()))
    missing = sorted(name for name in named
                     if not (ROOT / name).exists() and not re.search(r"\b[A-Z]{2,}\b", name))
    assert not missing, f"{_rel(page)} names files that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_pages_cite_nothing_users_do_not_have(page):
    """Figures are stated with their machine and date, not cited to notes outside the repository
    or to the issue tracker."""
    text = page.read_text()
    assert "FACTS.md" not in text
    assert not re.search(r"\bissues? \d+", text, re.I), re.search(r"\bissues? \d+", text, re.I)


def test_readme_is_a_front_door_and_ci_runs_its_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_LINES_MAX
    first_block = _blocks(readme)[0][1].splitlines()
    assert first_block[:2] == [
        "pip install -e . && sweep launch --study warmup_vs_plateau",
        "pip install -e '.[test,postgres]' && SWEEP_DATA_DIR=../shared/data/cifar10-subset "
        "python -m pytest -q"]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    install, test = (part.strip() for part in first_block[1].split("&&"))
    assert test in ci, ".ci/run must run the README's test command as written"
    assert any(line.endswith(install.replace("pip install", "pip install -q") +
                             " -c constraints.txt") for line in ci), \
        ".ci/run must install as the README does, with the constraints file"
