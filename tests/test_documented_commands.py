"""Every command that README.md, docs/*.md and the model cards (bundles/*/docs/README.md) show still runs as written.

The commands are read from the fenced ``bash``/``sh``/``console`` blocks (in a block that uses ``$ `` prompts only the
prompt lines are commands, the rest is their output), with ``\\`` continuations joined, ``&&``/``;``/``|`` chains
split, end-of-line comments removed and ``cd`` followed for the rest of the block. Each test is named by the
``file:line`` of the command, so a failure names the line of the doc to fix.

* ``brats-*`` and ``python -m brats_pipeline.<...>``: the console script is declared in ``pyproject.toml`` and its
  target imports; the function python-fire is given (captured by running the module's real ``cli()`` with
  ``fire.Fire`` replaced) takes every ``--flag``, the positional arguments and all required arguments; a flag whose
  default is a boolean gets ``True``/``False``. ``brats-ensemble``'s bundle overrides are checked against the bundle's
  configs like a ``monai.bundle run`` command line.
* ``python -m monai.bundle <command>`` (and ``torchrun ... -m monai.bundle``): the command is one of MONAI's, its
  flags are its parameters, the config and metadata files exist, the run id / network id is a key of the merged
  configs, and ``check_command_line`` accepts the command line (every override names a key, booleans are
  ``True``/``False``). A command documented with an ``error:`` line must fail with that error when the error is a
  command-line one, and must pass the command-line check when the error is raised later by the run.
* ``python benchmarks/x.py`` / ``bash benchmarks/x.sh``: the file exists and every flag is an ``add_argument`` option.
* Everything else (``pip``, ``cd``, ``git``, ...) must be a program this test knows it skips, so a new command kind is
  not silently left unchecked.

Runs (subprocesses of the installed console scripts, at tiny size): the README's "no data yet" and scoring chain
(``brats-synthetic`` -> ``brats-datalist`` -> ``brats-score``, labels copied as predictions: Dice 1), and the documented
error examples of ``brats-synthetic``/``brats-figures`` (status 1 and the documented ``error:`` line).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCS = [
    "README.md",
    *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md")),
    *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "bundles").glob("*/docs/README.md")),
]
BUNDLES = sorted(p.parent.name for p in (REPO / "bundles").glob("*/configs"))
SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "zsh", "shell-session"}
PYTHONS = {"python", "python3"}
#: programs documented for the reader that are not ours: skipped (``pip install -r FILE``: FILE must exist)
OTHER_PROGRAMS = {"cd", "source", "pip", "git", "mkdir", "cp", "find", "ls", "sort", "head", "mlflow", "export"}
#: ``python -m X`` that are not ours (``python -m venv``, ``python -m pytest``)
OTHER_MODULES = {"venv", "pytest", "pip"}
#: console scripts whose documented error examples need no data: run them in an empty folder
RUNNABLE_ERROR_EXAMPLES = {"brats-synthetic", "brats-figures", "brats-datalist", "brats-score"}
#: a config file (``configs/x.json`` or ``bundles/<b>/configs/x.json``) named anywhere in a command
CONFIG_PATH = re.compile(r"(?<![\w./-])(?:\./)?((?:bundles/[\w.-]+/)?configs/[\w.-]+\.json)")
#: a downloaded bundle's config (deployment.md: ``models/<bundle>/configs/...``): checked as the repository's copy
DOWNLOADED_CONFIG = re.compile(r"(?<![\w./-])(?:\./)?models/(" + "|".join(map(re.escape, BUNDLES)) + r")/configs/")


# --- extraction ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DocCommand:
    """One command of a doc: ``argv`` as the shell splits it, run from ``cwd`` (relative to the repository)."""

    doc: str
    line: int
    text: str
    argv: tuple[str, ...]
    cwd: str = "."
    expected_error: str | None = None
    parse_error: str | None = None
    cd_line: int | None = None
    id: str = field(default="", compare=False)

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def from_where(self) -> str:
        """The folder it runs in, and the ``cd`` of the block that put it there."""
        return "the repository root" if self.cd_line is None else f"{self.cwd} (cd at {self.doc}:{self.cd_line})"

    @property
    def env_stripped(self) -> tuple[str, ...]:
        """``argv`` without leading ``NAME=value`` assignments (``BRATS_DEBUG=1 python ...``)."""
        argv = list(self.argv)
        while argv and re.match(r"^[A-Za-z_]\w*=", argv[0]):
            argv.pop(0)
        return tuple(argv)

    @property
    def kind(self) -> str:
        return classify(self.env_stripped)[0]

    @property
    def program_args(self) -> list[str]:
        return classify(self.env_stripped)[1]


def classify(argv: Sequence[str]) -> tuple[str, list[str]]:
    """``(kind, arguments)``: ``brats`` (console script; arguments from the script name on), ``module``
    (``python -m brats_pipeline...``; from the module name on), ``bundle`` (``monai.bundle``; after it), ``script``
    (``python file.py`` / ``bash file.sh``; from the file on), or ``other``."""
    argv = list(argv)
    if not argv:
        return "other", []
    program = argv[0]
    if program.startswith("brats-"):
        return "brats", argv
    if program in PYTHONS and len(argv) > 2 and argv[1] == "-m":
        if argv[2] == "monai.bundle":
            return "bundle", argv[3:]
        if argv[2].split(".")[0] == "brats_pipeline":
            return "module", argv[2:]
        return "other", argv
    if program == "torchrun" and "-m" in argv:
        at = argv.index("-m")
        if argv[at + 1 : at + 2] == ["monai.bundle"]:
            return "bundle", argv[at + 2 :]
        return "other", argv
    if (program in PYTHONS and len(argv) > 1 and argv[1].endswith(".py")) or (
        program == "bash" and len(argv) > 1 and argv[1].endswith(".sh")
    ):
        return "script", argv[1:]
    return "other", argv


def strip_comment(line: str) -> str:
    """``line`` without its shell comment: an unquoted ``#`` that starts a word (``--network_def#x`` is no comment)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _synopsis(text: str) -> str:
    """A usage synopsis' optional groups ``[--flag value]`` as plain ``--flag value`` (docs/scoring.md)."""
    previous = None
    while previous != text:
        previous, text = text, re.sub(r"(^|\s)\[(-[^\[\]]*)\](?=\s|$)", r"\1\2", text)
    return text


def _block_entries(block: list[tuple[int, str]]) -> list[tuple[int, str, list[str]]]:
    """``(line, command with continuations joined, output lines)`` of one shell block."""
    console = any(line.strip().startswith("$ ") for _, line in block)
    entries: list[tuple[int, str, list[str]]] = []
    attached = False  # bash blocks: comments right under a command are its output ("# error: ...")
    i = 0
    while i < len(block):
        number, raw = block[i]
        text = raw.strip()
        i += 1
        if console:
            if not text.startswith("$ "):
                if entries:
                    entries[-1][2].append(text)
                continue
            text = text[2:]
        elif not text:
            attached = False
            continue
        elif text.startswith("#"):
            if entries and attached:
                entries[-1][2].append(text.lstrip("#").strip())
            continue
        text = strip_comment(text)
        while text.endswith("\\") and i < len(block):
            text = text[:-1].rstrip() + " " + strip_comment(block[i][1].strip())
            i += 1
        entries.append((number, text, []))
        attached = True
    return entries


def _split_chain(tokens: list[str]) -> list[list[str]]:
    segments: list[list[str]] = [[]]
    for token in tokens:
        if token in ("&&", "||", ";", "|"):
            segments.append([])
        else:
            segments[-1].append(token)
    return [s for s in segments if s]


def extract_commands(doc: str) -> list[DocCommand]:
    """Every command of the shell blocks of ``doc`` (relative to the repository)."""
    blocks: list[list[tuple[int, str]]] = []
    language, block = None, []
    for number, line in enumerate((REPO / doc).read_text(encoding="utf-8").splitlines(), 1):
        fence = re.match(r"^\s*(?:`{3,}|~{3,})\s*([\w+-]*)", line)
        if fence and language is None:
            language, block = fence.group(1).lower() or "-", []
        elif fence:
            if language in SHELL_LANGUAGES:
                blocks.append(block)
            language = None
        elif language is not None:
            block.append((number, line))
    commands = []
    for block in blocks:
        cwd, cd_line = Path("."), None
        for number, text, output in _block_entries(block):
            errors = [o.removeprefix("error:").strip() for o in output if o.startswith("error:")]
            expected = errors[0] if errors else None
            text = _synopsis(text)
            try:
                tokens = shlex.split(text)
            except ValueError as e:
                commands.append(DocCommand(doc, number, text, (), str(cwd), expected, f"{e}: {text}", cd_line))
                continue
            # a subshell "(cd x && cmd)": its cd ends with it
            subshell = bool(tokens) and tokens[0].startswith("(") and tokens[-1].endswith(")")
            if subshell:
                tokens[0], tokens[-1] = tokens[0][1:], tokens[-1][:-1]
                tokens = [t for t in tokens if t]
            outer, segments = (cwd, cd_line), _split_chain(tokens)
            for k, argv in enumerate(segments):
                last = k == len(segments) - 1
                commands.append(
                    DocCommand(
                        doc, number, shlex.join(argv), tuple(argv), str(cwd), expected if last else None, None, cd_line
                    )
                )
                if argv[0] == "cd" and len(argv) == 2:  # a shell's cd: for the rest of the block, as pasted
                    cwd = Path(os.path.normpath(cwd / argv[1]))
                    cd_line = None if str(cwd) == "." else number
            if subshell:
                cwd, cd_line = outer
    return commands


def _with_ids(commands: list[DocCommand]) -> list[DocCommand]:
    seen: dict[str, int] = {}
    out = []
    for c in commands:
        seen[c.where] = seen.get(c.where, 0) + 1
        out.append(DocCommand(**{**c.__dict__, "id": c.where + (f"+{seen[c.where]}" if seen[c.where] > 1 else "")}))
    return out


COMMANDS = _with_ids([c for doc in DOCS for c in extract_commands(doc)])


def commands_of(*kinds: str) -> list[Any]:
    return [pytest.param(c, id=c.id) for c in COMMANDS if c.kind in kinds and c.parse_error is None]


# --- python-fire --------------------------------------------------------------------------------------------------


def _is_flag(arg: str) -> bool:
    # python-fire's rule (fire.core._IsFlag): "--x", "-x"; "-1" is a value
    return arg.startswith("--") or re.match(r"^-[a-zA-Z]", arg) is not None


@dataclass
class FireCall:
    """How python-fire binds a command line to a function: the flags' values (as typed) and the problems."""

    given: dict[str, str]
    positionals: list[str]
    problems: list[str]


def fire_bind(fn: Callable, args: Sequence[str]) -> FireCall:
    """Bind ``args`` to ``fn`` as python-fire does (``fire.core._ParseKeywordArgs`` and the positional fill)."""
    params = inspect.signature(fn).parameters
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    positional = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_keyword = any(p.kind == p.VAR_KEYWORD for p in params.values())
    var_positional = next((n for n, p in params.items() if p.kind == p.VAR_POSITIONAL), None)
    name = getattr(fn, "__qualname__", repr(fn))
    given: dict[str, str] = {}
    positionals: list[str] = []
    problems: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not _is_flag(arg):
            positionals.append(arg)
            continue
        key, has_value, value = arg.lstrip("-").partition("=")
        key = key.replace("-", "_")
        bool_syntax = not has_value and (i == len(args) or _is_flag(args[i]))
        if key in named or var_keyword:
            keyword = key
        elif bool_syntax and key.startswith("no") and key[2:] in named:
            keyword, value = key[2:], "False"
        else:
            problems.append(f"{name} takes no argument {arg.split('=')[0]} (it takes {', '.join(named)})")
            if not bool_syntax and not has_value:
                i += 1  # its value, so that it is not taken for a positional argument as well
            continue
        if bool_syntax and keyword == key:
            value = "True"
        elif not has_value and not bool_syntax:
            value = args[i]
            i += 1
        given[keyword] = value
    free = [n for n in positional if n not in given]
    extra = positionals[len(free) :]
    if extra:
        into = f"*{var_positional}, which refuses them" if var_positional else "no parameter"
        problems.append(f"positional argument(s) {extra} of {name} go to {into}")
    bound = set(given) | set(free[: len(positionals)])
    missing = [n for n in named if params[n].default is inspect.Parameter.empty and n not in bound]
    if missing:
        problems.append(f"{name} needs {', '.join('--' + n for n in missing)}")
    for key, text in given.items():
        if key in params and isinstance(params[key].default, bool) and text not in ("True", "False"):
            problems.append(f"--{key} {text}: python-fire reads only True/False as booleans")
    return FireCall(given, positionals, problems)


def _fire_value(text: str) -> Any:
    from fire.parser import DefaultParseValue

    return DefaultParseValue(text)


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


class _FireCalled(Exception):
    """Raised by the stand-in for ``fire.Fire``: what a ``cli()`` would have run is captured."""


def fire_component(module_name: str, function: str, program: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """What ``module_name.function()`` (a ``cli()``) passes to ``fire.Fire``, without running it."""
    import fire

    from brats_pipeline.bundle import command_line

    captured: list[Any] = []

    def fake_fire(component: Any = None, *args: Any, **kwargs: Any) -> None:
        captured.append(component)
        raise _FireCalled

    monkeypatch.setattr(fire, "Fire", fake_fire)
    monkeypatch.setattr(sys, "argv", [program])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # fire_command installs the one-line error handler
    monkeypatch.setattr(command_line, "_previous_hook", command_line._previous_hook)
    module = importlib.import_module(module_name)
    entry = getattr(module, function, None)
    assert callable(entry), f"{module_name} has no function {function}"
    with pytest.raises(_FireCalled):
        entry()
    return captured[0]


def console_scripts() -> dict[str, str]:
    """``pyproject.toml``'s ``[project.scripts]`` (read without ``tomllib``, which Python 3.10 lacks)."""
    text = (REPO / "pyproject.toml").read_text()
    table = re.search(r"^\[project\.scripts\]\s*$(.*?)(?=^\[|\Z)", text, re.MULTILINE | re.DOTALL)
    assert table, "pyproject.toml has no [project.scripts]"
    return dict(re.findall(r'^\s*"?([\w.-]+)"?\s*=\s*"([^"]+)"', table.group(1), re.MULTILINE))


# --- checks shared by the command kinds -----------------------------------------------------------------------------


def missing_repo_files(args: Sequence[str], cwd: Path) -> list[str]:
    """Config files (``[bundles/<b>/]configs/*.json``) and bundle folders a command names that do not exist."""
    missing = []
    for arg in args:
        for path in CONFIG_PATH.findall(arg):
            if not (cwd / path).is_file():
                missing.append(path)
        if re.fullmatch(r"(?:\./)?bundles/[\w.-]+/?", arg) and not (cwd / arg).is_dir():
            missing.append(arg)
    return missing


def downloaded_as_repository(args: Sequence[str]) -> list[str]:
    """``models/<bundle>/configs/...`` (a bundle downloaded as deployment.md shows) as the repository's
    ``bundles/<bundle>/configs/...``: the zip holds these configs."""
    return [DOWNLOADED_CONFIG.sub(r"bundles/\1/configs/", a) for a in args]


def matches_documented(message: str, documented: str) -> bool:
    """Whether ``message`` is the documented one; ``...`` in the doc stands for any text."""
    pattern = ".*".join(re.escape(part.strip()) for part in documented.split("..."))
    return re.fullmatch(pattern, message.strip(), re.DOTALL) is not None


# --- the tests -----------------------------------------------------------------------------------------------------


def test_commands_are_found():
    """The extraction finds the documented commands (a broken extractor would check nothing)."""
    kinds: dict[str, int] = {}
    for c in COMMANDS:
        kinds[c.kind] = kinds.get(c.kind, 0) + 1
    assert kinds.get("bundle", 0) >= 60, kinds
    assert kinds.get("brats", 0) >= 25, kinds
    assert kinds.get("script", 0) >= 5, kinds
    readme = [c.env_stripped[:2] for c in COMMANDS if c.doc == "README.md"]
    for program in ("brats-synthetic", "brats-datalist", "brats-score", "brats-figures"):
        assert any(argv[0] == program for argv in readme), f"README.md documents no {program} command"
    # prompts, continuations, chains, comments, cd, synopses
    tools_curves = [c for c in COMMANDS if c.doc == "docs/tools.md" and "--cache_rate" in c.argv]
    assert tools_curves and tools_curves[0].argv[-2:] == ("--cache_rate", "1.0"), tools_curves
    assert any(c.argv[0] == "pip" for c in COMMANDS if c.doc == "README.md")
    assert any(c.cwd != "." and c.kind == "bundle" for c in COMMANDS), "no command after a cd"
    assert any("--network_def#upsample" in c.argv for c in COMMANDS), "a '#' inside a word was taken for a comment"
    assert any(c.expected_error for c in COMMANDS if c.kind == "bundle"), "no documented error example found"
    assert all(not any(a.startswith("#") for a in c.argv) for c in COMMANDS), "a comment was kept"
    assert not [c.where for c in COMMANDS if c.parse_error], [c.parse_error for c in COMMANDS if c.parse_error]
    synopsis = [c for c in COMMANDS if c.doc == "docs/scoring.md" and c.argv[:1] == ("brats-score",)]
    assert synopsis and "--figure" in synopsis[0].argv and not any("[" in a for a in synopsis[0].argv), synopsis


@pytest.mark.parametrize("command", [pytest.param(c, id=c.id) for c in COMMANDS if c.kind == "other"])
def test_other_command_is_known(command: DocCommand):
    """A command this test does not check is one it knowingly skips (and a ``pip -r`` file / ``python -c`` code
    is right)."""
    argv = list(command.env_stripped)
    program = argv[0]
    cwd = REPO / command.cwd
    if program in PYTHONS:
        if argv[1:2] == ["-c"]:
            compile(argv[2], f"{command.where} python -c", "exec")
            return
        assert argv[1:2] == ["-m"] and argv[2] in OTHER_MODULES, (
            f"{command.where}: {command.text!r} is not checked by this test; teach it this program"
        )
        return
    assert program in OTHER_PROGRAMS, f"{command.where}: {command.text!r} is not checked by this test"
    if program == "pip":
        for flag, value in zip(argv, argv[1:], strict=False):
            if flag in ("-r", "--requirement"):
                assert (cwd / value).is_file(), f"{command.where}: {value} does not exist"
    if program == "cd":
        assert (cwd / argv[1]).is_dir(), f"{command.where}: no folder {argv[1]} in {command.from_where}"


@pytest.mark.parametrize("command", commands_of("brats", "module"))
def test_brats_command_matches_its_function(command: DocCommand, monkeypatch: pytest.MonkeyPatch):
    args = command.program_args
    if command.kind == "brats":
        scripts = console_scripts()
        program = args[0]
        assert program in scripts, f"{command.where}: {program} is not declared in pyproject.toml [project.scripts]"
        module_name, _, function = scripts[program].partition(":")
    else:
        module_name, function, program = args[0], "cli", f"python -m {args[0]}"
        source = inspect.getsource(importlib.import_module(module_name))
        assert re.search(r'if __name__ == "__main__":\s+cli\(\)', source), f"{module_name} does not run cli()"
    component = fire_component(module_name, function, program, monkeypatch)
    monkeypatch.chdir(REPO / command.cwd)
    rest = list(args[1:])
    if isinstance(component, dict):
        assert rest and rest[0] in component, (
            f"{command.where}: {program} needs a subcommand, one of {sorted(component)}; got {rest[:1]}"
        )
        fn = component[rest[0]]
        rest = rest[1:]
    else:
        fn = component
    assert callable(fn), f"{program}: python-fire is given {fn!r}"
    call = fire_bind(fn, rest)
    problems = list(call.problems)
    problems += [f"{p} does not exist (run from {command.from_where})" for p in missing_repo_files(rest, Path("."))]
    if not problems and module_name == "brats_pipeline.tools.ensembles" and fn.__name__ in ("train", "predict"):
        problems += ensemble_override_problems(fn, call, command)
    if command.expected_error:
        # an error example: what this check finds must be what the doc says goes wrong
        for p in problems:
            flag = re.search(r"--\w+", p)
            assert flag and flag.group(0) in command.expected_error, f"{command.where}: {p}"
    else:
        assert not problems, f"{command.where}: {command.text}\n" + "\n".join(problems)


def _train_of(output_dir: str, doc: str) -> DocCommand | None:
    """The ``brats-ensemble train`` of the same doc that wrote ``output_dir`` (``predict`` reads its bundle there)."""
    for c in COMMANDS:
        argv = c.env_stripped
        if c.doc == doc and argv[:2] == ("brats-ensemble", "train") and output_dir in argv:
            return c
    return None


def ensemble_override_problems(fn: Callable, call: FireCall, command: DocCommand) -> list[str]:
    """``brats-ensemble``'s bundle overrides (everything but its own flags) against the configs they go to."""
    from brats_pipeline.bundle.command_line import check_command_line

    params = inspect.signature(fn).parameters
    overrides = [a for k, v in call.given.items() if k not in params for a in (f"--{k}", v)]
    if fn.__name__ == "train":
        bundle = call.given.get("bundle")
        configs = [f"{bundle}/configs/train.json", *_as_list(_fire_value(call.given.get("config", "None")))]
        argv = ["run", "training"]
    else:
        train = _train_of(call.given.get("output_dir", ""), command.doc)
        if train is None:
            return []
        bundle = fire_bind(fn.__globals__["train"], train.env_stripped[2:]).given.get("bundle")
        configs = [f"{bundle}/configs/inference.json", "configs/ensemble.json"]
        configs += ["configs/tta.json"] if call.given.get("tta") == "True" else []
        argv = ["run"]
    missing = [f"{f} does not exist (run from {command.from_where})" for f in configs if not Path(f).is_file()]
    if missing:
        return missing
    try:
        check_command_line([*argv, "--config_file", repr(configs), *overrides])
    except ValueError as e:
        return [f"bundle override refused ({', '.join(configs)}): {e}"]
    return []


def _monai_bundle_commands() -> dict[str, Callable]:
    import monai.bundle.__main__ as main  # what `python -m monai.bundle` gives python-fire: its module's functions

    return {k: v for k, v in vars(main).items() if inspect.isfunction(v) and not k.startswith("_")}


@pytest.mark.parametrize("command", commands_of("bundle"))
def test_monai_bundle_command_line_is_accepted(command: DocCommand, monkeypatch: pytest.MonkeyPatch):
    from monai.bundle import ConfigParser

    from brats_pipeline.bundle.command_line import CommandLineError, check_command_line

    monkeypatch.chdir(REPO / command.cwd)
    args = downloaded_as_repository(command.program_args)
    functions = _monai_bundle_commands()
    assert args and args[0] in functions, (
        f"{command.where}: monai.bundle has no command {args[:1]}: {sorted(functions)}"
    )
    fn = functions[args[0]]
    call = fire_bind(fn, args[1:])
    problems = [p for p in call.problems if "needs --" not in p]  # MONAI's own parameters all have defaults
    problems += [f"{p} does not exist (run from {command.from_where})" for p in missing_repo_files(args[1:], Path("."))]
    files = _as_list(_fire_value(call.given["config_file"])) if "config_file" in call.given else []
    files = [f for f in files if Path(f).is_file()]
    meta = call.given.get("meta_file")
    if meta is not None and not Path(meta).is_file():
        problems.append(f"--meta_file {meta} does not exist (run from {command.from_where})")
    if files and not problems:
        config = ConfigParser.load_config_files(files)
        positional = [n for n in inspect.signature(fn).parameters if n not in call.given]
        bound = dict(zip(positional, call.positionals, strict=False)) | call.given
        for key in ("run_id", "net_id"):
            if key in inspect.signature(fn).parameters:
                default = inspect.signature(fn).parameters[key].default
                target = bound.get(key, default)
                if target is not None and str(target) not in config:
                    problems.append(f"{key} {target!r} is not a key of {', '.join(files)}")
    assert not problems, f"{command.where}: {command.text}\n" + "\n".join(problems)

    try:
        check_command_line(args)
    except CommandLineError as e:
        assert command.expected_error, f"{command.where}: {command.text}\nrefused: {e}"
        assert matches_documented(str(e), command.expected_error), (
            f"{command.where}: the documented error is not the one given\n  doc:  {command.expected_error}\n  real: {e}"
        )
    else:
        documented = command.expected_error or ""
        command_line_errors = ("unknown override", "problems:", "python-fire turns only", "cannot read --config_file")
        assert not any(s in documented for s in command_line_errors), (
            f"{command.where}: documented as refused on the command line ({documented}), but it is accepted"
        )


def _argparse_options(script: Path) -> set[str]:
    """Option strings of every ``add_argument(...)`` call of a Python file (a shell script: of the Python files or
    modules it runs)."""
    if script.suffix == ".sh":
        text = script.read_text()
        targets = [REPO / (m.replace(".", "/") + ".py") for m in re.findall(r"python3? -m ([\w.]+)", text)]
        targets += [REPO / p for p in re.findall(r"python3? ([\w./-]+\.py)", text)]
        return set().union(*(_argparse_options(t) for t in targets if t.is_file()))
    options = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            options |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return options | {"-h", "--help"}


@pytest.mark.parametrize("command", commands_of("script"))
def test_script_exists_and_takes_its_flags(command: DocCommand):
    args = command.program_args
    script = REPO / command.cwd / args[0]
    assert script.is_file(), f"{command.where}: {args[0]} does not exist"
    options = _argparse_options(script)
    assert len(options) > 2, f"{command.where}: no add_argument found in {args[0]} (or what it runs)"
    unknown = [a for a in args[1:] if a.startswith("-") and a.split("=")[0] not in options]
    assert not unknown, f"{command.where}: {args[0]} takes no {unknown}; it takes {sorted(options)}"


def _run(argv: Sequence[str], cwd: Path) -> subprocess.CompletedProcess:
    program = BIN / argv[0]
    assert program.is_file(), f"{argv[0]} is not installed in {BIN} (pip install -e .)"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run(
        [str(program), *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def _readme_command(program: str) -> DocCommand:
    found = [c for c in COMMANDS if c.doc == "README.md" and c.env_stripped[:1] == (program,)]
    assert found, f"README.md documents no {program} command"
    return found[0]


def _replace(argv: Sequence[str], flags: dict[str, str], paths: dict[str, str]) -> list[str]:
    """``argv`` with the values of ``flags`` and the arguments in ``paths`` replaced."""
    out = [paths.get(a, a) for a in argv]
    for flag, value in flags.items():
        assert flag in out, f"{flag} is no longer in the documented command {shlex.join(argv)}"
        out[out.index(flag) + 1] = value
    return out


def test_readme_synthetic_datalist_and_scoring_run(tmp_path: Path):
    """The README's "no data yet" command, its datalist command and its scoring command, as written but at tiny
    size, each in the folder the README's relative paths resolve in; labels copied as predictions score Dice 1.

    5 cases, not 2: the documented ``brats-datalist`` command makes 5 folds, which needs 5 labelled cases."""
    synthetic, datalist, score = (_readme_command(p) for p in ("brats-synthetic", "brats-datalist", "brats-score"))
    data = synthetic.argv[1]
    proc = _run(_replace(synthetic.argv, {"--num_cases": "5", "--shape": "32"}, {}), tmp_path)
    assert proc.returncode == 0, f"{synthetic.where}: {proc.stderr[-3000:]}"
    layout = synthetic.argv[synthetic.argv.index("--layout") + 1]
    assert f"wrote 5 synthetic {layout} cases of shape (32, 32, 32)" in proc.stdout, proc.stdout
    cases = sorted(p for p in (tmp_path / data).iterdir() if p.is_dir())
    assert len(cases) == 5 and (tmp_path / data / ".synthetic.json").is_file(), cases

    # the datalist of that folder (the README's /data/... folder is the one just written)
    labelled = {a: data for a in datalist.argv if a.startswith("/data/")}
    proc = _run(_replace(datalist.argv, {}, labelled), tmp_path)
    assert proc.returncode == 0, f"{datalist.where}: {proc.stderr[-3000:]}"
    output_file = tmp_path / datalist.argv[datalist.argv.index("--output_file") + 1]
    written = json.loads(output_file.read_text())
    training = written["training"]
    assert {e["case_id"] for e in training} == {c.name for c in cases}, training
    assert written["layout"] == layout and written["num_folds"] == 5, {k: written[k] for k in ("layout", "num_folds")}
    assert sorted(e["fold"] for e in training) == [0, 1, 2, 3, 4]
    assert all(Path(e["label"]).is_file() and len(e["image"]) == 4 for e in training)

    # predictions = the labels, where the README's --pred_dir points (relative to tmp_path)
    pred_dir = tmp_path / score.argv[score.argv.index("--pred_dir") + 1]
    pred_dir.mkdir(parents=True)
    for entry in training:
        shutil.copyfile(entry["label"], pred_dir / f"{entry['case_id']}.nii.gz")
    proc = _run(_replace(score.argv, {}, {a: data for a in score.argv if a.startswith("/data/")}), tmp_path)
    assert proc.returncode == 0, f"{score.where}: {proc.stderr[-3000:]}"
    out = tmp_path / score.argv[score.argv.index("--output_dir") + 1]
    documented = {"metrics_per_case.csv", "metrics_summary.csv", "metrics_summary.json", "metrics_summary.png"}
    assert documented <= {p.name for p in out.iterdir()}, sorted(p.name for p in out.iterdir())
    summary = json.loads((out / "metrics_summary.json").read_text())
    assert summary["n_cases"] == 5 and summary["n_missing_predictions"] == 0, summary
    for region in ("ET", "TC", "WT"):
        assert summary["metrics"][region]["dice"]["mean"] == pytest.approx(1.0), (region, summary["metrics"][region])
    rows = (out / "metrics_per_case.csv").read_text().splitlines()
    assert len(rows) == 1 + 5 * 3, rows[:3]  # header + 5 cases x ET, TC, WT


ERROR_EXAMPLES = [
    pytest.param(c, id=c.id)
    for c in COMMANDS
    if c.kind == "brats" and c.expected_error and c.env_stripped[0] in RUNNABLE_ERROR_EXAMPLES
]


@pytest.mark.parametrize("command", ERROR_EXAMPLES)
def test_documented_error_example(command: DocCommand, tmp_path: Path):
    """A documented mistake ends with status 1 and the documented one-line error (run in an empty folder)."""
    proc = _run(command.env_stripped, tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, f"{command.where}: status {proc.returncode}\n{proc.stderr[-3000:]}"
    assert lines and lines[-1].startswith("error: "), f"{command.where}: {proc.stderr[-3000:]}"
    assert matches_documented(lines[-1].removeprefix("error: "), command.expected_error), (
        f"{command.where}:\n  doc:  error: {command.expected_error}\n  real: {lines[-1]}"
    )
