"""The documentation cannot drift from the code: every ``sweep ...`` line that README.md and
docs/*.md show names a real command and only its options (lines a user would paste are parsed by
click itself), every command and option is shown somewhere, the study-file page shows the shipped
study file, and relative links point to files that exist. The tables that drifted before are
compared with their source: the shipped-study count with ``studies/*.yaml``, the "Every key"
table with the spec's sections, the environment index with every ``SWEEP_*`` name in ``sweep/``,
the defaults table with click's, the ``sweep status --json`` table with what ``sweep status
--json`` prints on a real store (that one test is ``slow``: an MLflow store takes seconds), the
lines docs/troubleshooting.md quotes with ``sweep/``'s source. Nothing else trains or starts a
process: well under a second."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import click
import pytest

from sweep.cli import main
from sweep.study.sections import OVERRIDABLE, TOP_KEYS

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


# --- the tables that drifted: each against its source -----------------------------------------

def _table(page: Path, heading: str) -> list[list[str]]:
    """The cells of the first Markdown table under ``heading`` (header and rule rows dropped)."""
    text = page.read_text()
    start = text.rfind("\n", 0, text.index(heading)) + 1  # the heading's line (it may be the header)
    rows = []
    for line in text[start:].splitlines()[1 - text[start:].startswith("|"):]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    return [row for row in rows[2:]]


def _names(cell: str) -> list[str]:
    """Dotted names of a key cell: ``train.epochs``, ``batch_size`` -> train.epochs,
    train.batch_size (a bare name after the first takes the first one's prefix)."""
    names = re.findall(r"`([^`]+)`", cell)
    prefix = names[0].rpartition(".")[0] if names else ""
    return [n if "." in n or not prefix else f"{prefix}.{n}" for n in names]


_NUMBER_WORDS = ("zero one two three four five six seven eight nine ten").split()


def test_the_shipped_study_count_and_names():
    page = ROOT / "docs" / "study-files.md"
    said = re.search(r"sweep ships (\w+):(.*?)\.\n\n", page.read_text(), re.S)
    assert said, f"{_rel(page)} no longer says how many studies sweep ships ('sweep ships N:')"
    shipped = sorted(p.stem for p in (ROOT / "studies").glob("*.yaml"))
    assert said.group(1) == _NUMBER_WORDS[len(shipped)], \
        f"{_rel(page)} says sweep ships {said.group(1)}; studies/ holds {len(shipped)}: {shipped}"
    named = sorted(set(re.findall(r"`(\w+)`", said.group(2))))
    assert named == shipped, \
        f"{_rel(page)} names the shipped studies {named}, studies/ has {shipped}"


def test_every_key_table_has_every_key_of_the_spec():
    """Every key a study file may hold (the spec's sections; the pruner as one row, see
    pruning.md) is a row of study-files.md's "Every key" table, and no row names another."""
    page = ROOT / "docs" / "study-files.md"
    shown = {name for row in _table(page, "## Every key") for name in _names(row[0])}
    sections = {f"{section}.{key}" for section, rules in OVERRIDABLE.items() for key in rules}
    spec = ({k for k in TOP_KEYS if k not in OVERRIDABLE and k != "space"} | sections |
            {"space.warmup_steps", "space.base_lr", "space.scheduler"})
    assert not spec - shown, f"{_rel(page)}'s key table lacks {sorted(spec - shown)}"
    assert not shown - spec, \
        f"{_rel(page)}'s key table names keys the spec lacks: {sorted(shown - spec)}"


_ENV_NAME = re.compile(r"\bSWEEP_[A-Z0-9_]*[A-Z0-9]\b")


def test_every_sweep_variable_read_in_the_source_is_in_the_index():
    page = ROOT / "docs" / "environment.md"
    read = {name for path in (ROOT / "sweep").rglob("*.py")
            for name in _ENV_NAME.findall(path.read_text())}
    assert "SWEEP_STORAGE" in read  # the grep itself works
    indexed = {name for row in _table(page, "| variable |") for name in _names(row[0])}
    assert not read - indexed, f"{_rel(page)} lacks {sorted(read - indexed)}, read in sweep/"
    stale = {n for n in indexed if n.startswith("SWEEP_")} - read
    assert not stale, f"{_rel(page)} lists {sorted(stale)}, which nothing in sweep/ reads"


def _click_default(param: click.Option, command: click.Command):
    """The option's own default, or None when it has none (a flag, unset, computed later)."""
    value = param.get_default(click.Context(command), call=False)
    if param.is_flag or value is None or value is click.core.UNSET or value == ():
        return None
    return value


def test_option_defaults_are_as_documented():
    """docs/cli.md's defaults table against each command's click default: a backticked default
    is the click default of every command named; "none: ..." is an option without one (the
    value is computed); every option that has a click default has a row."""
    page = ROOT / "docs" / "cli.md"
    rows = _table(page, "## Defaults")
    documented = {}
    for option, commands, default in rows:
        option = option.strip("`")
        names = [name for name, command in main.commands.items()
                 if option in _option_names(command)] if commands == "all" else \
            [name.strip() for name in commands.split(",")]
        assert names, f"{_rel(page)}: no command has {option}"
        value = re.match(r"`([^`]*)`", default)
        for name in names:
            documented[(name, option)] = value.group(1) if value else None
    problems = []
    for name, command in main.commands.items():
        for param in command.params:
            if not isinstance(param, click.Option) or param.hidden:
                continue
            default, option = _click_default(param, command), param.opts[-1]
            key = (name, option) if (name, option) in documented else (name, param.opts[0])
            if key not in documented:
                if default is not None:
                    problems.append(f"sweep {name} {option}: default {default!r} not in the table")
            elif documented[key] != (None if default is None else str(default)):
                problems.append(f"sweep {name} {option}: the table says {documented[key]!r}, "
                                f"the command {default!r}")
    assert not problems, f"{_rel(page)}: {problems}"


def _key_paths(value, prefix: str = "") -> set[str]:
    """Every key of a JSON document as a dotted path; the objects in a list share one path."""
    if isinstance(value, dict):
        out = set()
        for key, inner in value.items():
            path = f"{prefix}.{key}" if prefix else key
            out |= {path} | _key_paths(inner, path)
        return out
    if isinstance(value, list):
        return set().union(*(_key_paths(item, prefix) for item in value))
    return set()


def _documented_status_keys() -> tuple[set[str], set[str]]:
    """(rows, every name): the keys docs/scripting.md's status table has a row for, and those
    with every key its meaning column names (the keys of a row's objects)."""
    rows, names = set(), set()
    table = _table(ROOT / "docs" / "scripting.md", "`sweep status --study NAME --json`")
    for key_cell, meaning in table:
        for row in _names(key_cell):
            rows.add(row)
            names |= {row} | {f"{row}.{word}" for word in re.findall(r"`(\w+)`", meaning)}
    return rows, names


@pytest.mark.slow
def test_status_json_keys_are_the_documented_ones(tmp_path, tiny_cifar):
    """``sweep status --json`` on a real store whose lists are not empty (a complete trial, a
    stale RUNNING trial of a gone worker, a finished trial whose MLflow run is still RUNNING,
    points in the spool and set aside), before and after ``--repair``: every key it prints has
    a row or is named in its row, and every row is printed."""
    import dataclasses
    import os
    import subprocess
    import sys

    from click.testing import CliRunner
    from optuna.trial import TrialState

    from helpers import TINY
    from sweep.commands.launch import LaunchOptions, open_study_stores
    from sweep.loop.objective import end_trial, start_trial
    from sweep.record import SpoolWriter, spool_dir
    from sweep.study.spec import load_study
    from sweep.training.train import TrainResult

    storage, tracking = f"sqlite:///{tmp_path}/sweep.db", f"sqlite:///{tmp_path}/mlflow.db"
    spec = dataclasses.replace(load_study(TINY), name="keys")
    stores = open_study_stores(spec, LaunchOptions(storage, tracking, str(tiny_cifar), "cpu"),
                               load_data=False)
    ctx, study, S = stores.worker_context(spec), stores.study, spec.steps_per_epoch
    done = start_trial(study.ask(), ctx)
    metrics = {"val_loss": 2.0, "val_acc": 0.2, "lr_reduced": False, "epoch_seconds": 0.5}
    for listener in done.listeners:
        listener.on_steps(0, [0.1] * S, [2.0] * S)
        listener.on_epoch_end(0, metrics)
    study.tell(done.trial, end_trial(done, result=TrainResult([metrics], test_acc=0.1,
                                                              steps=S)).value)
    finished = start_trial(study.ask(), ctx)  # told PRUNED; its run is left RUNNING
    study.tell(finished.trial, state=TrialState.PRUNED)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = start_trial(study.ask(), ctx)  # RUNNING, its worker's process is gone
    stale.trial.set_user_attr("host", os.uname().nodename)
    stale.trial.set_user_attr("pid", gone.pid)
    stores.tracker.close()
    spool = SpoolWriter(spool_dir(tracking), tracking)
    record = {"run": done.run.run_id, "metrics": [["spooled", 1.0, 1_700_000_000_000, 0]]}
    spool.append([record])
    spool.set_aside([record], "refused for good (a test)")
    spool.close()

    printed = set()
    for repair in ([], ["--repair"]):
        res = CliRunner().invoke(main, ["status", "--study", "keys", "--storage", storage,
                                        "--tracking-uri", tracking, "--json", *repair])
        assert res.exit_code in (3, 4), res.output
        printed |= _key_paths(json.loads(res.stdout))
    assert {"running.pid", "stale_runs.run_id", "mlflow.spool.set_aside.reason",
            "repaired.ended_runs", "mlflow.ended_without_count.run_id"} <= printed  # the store
    rows, names = _documented_status_keys()
    page = "docs/scripting.md"
    assert not printed - names, f"{page}'s status table lacks {sorted(printed - names)}"
    assert not rows - printed, f"{page}'s status table has rows status no longer prints: " \
                               f"{sorted(rows - printed)}"


def _printed_line_patterns() -> list[re.Pattern]:
    """Every string sweep/ can print, as regexes: each string literal and f-string of the
    source, its ``{...}`` fields as groups ``(.+?)``, cut at its newlines; 12 literal characters
    at least."""
    import ast

    patterns = []
    for path in sorted((ROOT / "sweep").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                parts = [re.escape(v.value) if isinstance(v, ast.Constant) else "\0"
                         for v in node.values]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                parts = [re.escape(node.value)]
            else:
                continue
            for line in "".join(parts).split(re.escape("\n")):
                if len(re.sub(r"\\(.)", r"\1", line.replace("\0", ""))) >= 12:
                    patterns.append(re.compile(line.replace("\0", "(.+?)")))
    return patterns


def _literal_coverage(line: str, patterns: list[re.Pattern]) -> tuple[float, float]:
    """(all, best): the share of ``line``'s characters (an elision ``...`` aside) that the
    source strings matching in it hold literally (not through a field), and the largest share
    one of them holds. A line sweep prints as quoted gets most of it; a line that only shares
    phrases with the source, little."""
    covered, best = [False] * len(line), 0
    for pattern in patterns:
        for m in pattern.finditer(line):
            fields = [m.span(g) for g in range(1, (m.lastindex or 0) + 1)]
            literal = [i for i in range(*m.span()) if not any(a <= i < b for a, b in fields)]
            best = max(best, len(literal))
            for i in literal:
                covered[i] = True
    size = max(1, len(line) - 3 * line.count("..."))
    return sum(covered) / size, best / size


def test_troubleshooting_quotes_lines_sweep_prints():
    """Each line docs/troubleshooting.md quotes (its ``text`` blocks) is one sweep's source can
    still print: string literals and f-strings of the source match it and hold at least half of
    its characters literally, one of them a quarter at least (the rest are the example values
    of their fields, or another library's words; ``...`` elides those). A line built from
    several strings (``+``) is why one string need not hold it all."""
    page = ROOT / "docs" / "troubleshooting.md"
    quoted = [line.strip() for lang, body in _blocks(page.read_text()) if lang == "text"
              for line in body.splitlines() if line.strip()]
    assert len(quoted) >= 15, f"{_rel(page)} quotes {len(quoted)} lines"
    patterns = _printed_line_patterns()
    gone = {line: [round(share, 2) for share in shares] for line in quoted
            if (shares := _literal_coverage(line, patterns))[0] < 0.5 or shares[1] < 0.25}
    assert not gone, (f"{_rel(page)} quotes lines sweep/ no longer prints (share of the line "
                      f"found in the source): {gone}")


def test_scheduler_table_lists_every_type_and_its_keys():
    """docs/schedules.md's table has one row per scheduler type sweep accepts, and each row's
    brackets name every parameter the type takes (``sweep.study.schedules``)."""
    from sweep.study.schedules import SCHEDULER_PARAMS

    page = ROOT / "docs" / "schedules.md"
    rows = {re.match(r"`(\w+)`", row[0]).group(1): row[0]
            for row in _table(page, "| type [keys] |")}
    assert sorted(rows) == sorted(SCHEDULER_PARAMS), \
        f"{_rel(page)} lists {sorted(rows)}; sweep accepts {sorted(SCHEDULER_PARAMS)}"
    missing = {name: [key for key in keys if key not in rows[name]]
               for name, keys in SCHEDULER_PARAMS.items()}
    assert not any(missing.values()), f"{_rel(page)}'s rows lack parameters: {missing}"


@pytest.mark.parametrize("page, heading", [
    ("search-space.md", "## What a study searches"),
    ("study-files.md", "## Training fields in the search space")])
def test_searchable_training_fields_are_the_spec_ones(page, heading):
    """The tables of the training fields a search space may hold name exactly
    ``SEARCHABLE_TRAIN``."""
    from sweep.study.specs import SEARCHABLE_TRAIN

    path = ROOT / "docs" / page
    shown = {name for row in _table(path, heading) for name in re.findall(r"`(\w+)`", row[0])}
    assert shown == set(SEARCHABLE_TRAIN), \
        f"{_rel(path)} lists {sorted(shown)}; the space takes {sorted(SEARCHABLE_TRAIN)}"
