"""Command-line safety for ``python -m monai.bundle run``: overrides are checked before anything runs, and a user
mistake ends the run with one line instead of a traceback.

MONAI's bundle command line accepts any ``--key value``: a typo (``--epoch 1`` for ``--epochs``) adds an unused key
and the run goes on with the default, and python-fire turns only ``True``/``False`` into booleans, so
``--tta false`` is the truthy string ``'false'``. A wrong dataset folder or missing weights, on the other hand,
end in a 30-70 line traceback with the one useful sentence in the middle. Two functions, both meant for the start
of a config's ``initialize`` list, fix this:

* :func:`check_command_line` reads the command line (``sys.argv``, the same in every ``torchrun`` worker), loads the
  config files it names and raises :class:`CommandLineError` for an override the config does not hold (naming the
  nearest keys), a text value given to a boolean key, ``None`` for a key that has a value (MONAI drops a ``None``
  override, so the run would silently keep the config's value), or an overlay listed before the bundle's own config
  (MONAI would take the overlay's folder for the bundle's).
* :func:`install_error_handler` sets ``sys.excepthook`` so that a user mistake (:data:`USER_ERRORS`, found through
  MONAI's "Failed to instantiate/evaluate" wrappers) prints ``error: <one line>`` and exits with status 1; every
  other exception keeps Python's traceback, and ``BRATS_DEBUG=1`` restores the traceback for all of them. A
  ``KeyboardInterrupt`` (Ctrl-C) prints one line instead of its traceback: what the run finished and how to go on
  (:func:`interrupt_message`, from the run objects registered with :func:`report_interrupts_with`: ``TrainingRun``,
  ``PredictionRun``); the process still ends by SIGINT, as Python does (a shell's exit status 130).
* :func:`check_output_folders` refuses an output folder that cannot be written (one ``error:`` line) before any
  data or model is loaded.

Every config runs the first two as its first ``initialize`` step, :func:`guard_bundle_run` (a downloaded bundle has
this package under ``scripts/``, which is on ``sys.path`` only once ``@bundle_code`` ran, hence ``_requires_``), and
the folder check as its second::

    "initialize": [
        {"_target_": "brats_pipeline.bundle.command_line.guard_bundle_run", "_requires_": "@bundle_code"},
        {"_target_": "brats_pipeline.bundle.command_line.check_output_folders", "folders": ["@prediction_dir"]},
        ...
    ]

The first two do nothing in a process that is not ``python -m monai.bundle`` (``ConfigWorkflow`` or
``monai.bundle.run`` called from Python), unless given ``argv`` / ``force=True``; the folder check always runs.

:class:`InterruptGuard` keeps a Ctrl-C from being handled as an error by an Ignite engine's ``EXCEPTION_RAISED``
handlers (MONAI's ``StatsHandler`` logs its traceback, the case report would record it as a bad case), and
:func:`interrupts_deferred` holds a Ctrl-C back while a file and its record are written together.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import re
import signal
import sys
import threading
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle.config_item import ComponentLocator
from monai.bundle.scripts import create_workflow, run, run_workflow
from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS, EXPR_KEY, ID_REF_KEY, ID_SEP_KEY, MACRO_KEY, MERGE_KEY
from monai.utils.module import locate

from brats_pipeline.data.screening import BadCasesError, CaseError, DatasetError
from brats_pipeline.transforms.labels import LabelConventionError

__all__ = [
    "DEBUG_ENV",
    "RUN_PARAMETERS",
    "USER_ERRORS",
    "CommandLineError",
    "InterruptGuard",
    "OutputFolderError",
    "UserError",
    "Override",
    "check_command_line",
    "check_output_folders",
    "fire_command",
    "guard_bundle_run",
    "install_error_handler",
    "interrupt_message",
    "interrupts_deferred",
    "parse_command_line",
    "report_interrupts_with",
    "user_error_message",
]

#: environment variable that restores full tracebacks (any value but "" or "0")
DEBUG_ENV = "BRATS_DEBUG"
#: ``monai.bundle`` commands whose overrides are checked
CHECKED_COMMANDS = ("run", "run_workflow")
#: strings a user may mean as a boolean, and the boolean they mean
_BOOLEAN_WORDS = {
    **dict.fromkeys(("true", "yes", "y", "on", "t", "1"), True),
    **dict.fromkeys(("false", "no", "n", "off", "f", "0"), False),
}
#: texts a user may mean as None (python-fire passes "none" and "null" on as strings, and None as None)
_NONE_WORDS = ("none", "null")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".ts")
#: messages of the RuntimeErrors that MONAI raises ``from`` the real error
_MONAI_WRAPPERS = ("Failed to instantiate component", "Failed to evaluate", "applying transform")
_STATE_DICT_ERROR = "Error(s) in loading state_dict for"
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (?P<name>\S+): copying a param with shape torch\.Size\((?P<ckpt>\[[^\]]*\])\) from "
    r"checkpoint, the shape in current model is torch\.Size\((?P<model>\[[^\]]*\])\)"
)
_KEY_LIST = re.compile(r"(?P<kind>Missing|Unexpected) key\(s\) in state_dict: (?P<keys>.*)")


class UserError(ValueError):
    """Base of the errors a user's own mistake raises (a wrong flag, folder or file), reported as one ``error:`` line
    by :func:`install_error_handler`; e.g. ``brats_pipeline.evaluation.scoring.ScoringError``."""


class CommandLineError(UserError):
    """An override on the ``monai.bundle`` command line that would be ignored or misread."""


class OutputFolderError(UserError):
    """An output folder of the run cannot be created or written (:func:`check_output_folders`)."""


#: exception types reported as one line by :func:`install_error_handler`, with their subclasses (``CaseError`` and
#: ``BadCasesError`` are ``DatasetError``\ s, the scorer's ``ScoringError`` a ``UserError``; a ``RuntimeError`` of
#: ``load_state_dict`` is reported too)
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    CommandLineError,
    DatasetError,
    LabelConventionError,
    FileNotFoundError,
)


def _user_error_names() -> frozenset[str]:
    """Class names of :data:`USER_ERRORS` and of every subclass defined so far (an error re-raised from a DataLoader
    worker survives only as traceback text, ``module.Name: message``)."""
    names: set[str] = set()
    pending: list[type] = [*USER_ERRORS, CaseError, BadCasesError]
    while pending:
        cls = pending.pop()
        if cls.__name__ not in names:
            names.add(cls.__name__)
            pending.extend(cls.__subclasses__())
    return frozenset(names)


def _is_bundle_cli() -> bool:
    """Whether this process is ``python -m monai.bundle`` (also each ``torchrun -m monai.bundle`` worker)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if getattr(spec, "name", None) == "monai.bundle.__main__":
        return True
    return bool(sys.argv) and Path(sys.argv[0]).parts[-3:] == ("monai", "bundle", "__main__.py")


def _parameters(*functions: Callable) -> list[str]:
    names: list[str] = []
    for fn in functions:
        for name, p in inspect.signature(fn).parameters.items():
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name != "self" and name not in names:
                names.append(name)
    return names


#: keyword arguments of ``run``/``run_workflow`` themselves, in python-fire's positional order, and of what they call
_POSITIONAL = {"run": _parameters(run), "run_workflow": _parameters(run_workflow)}
RUN_PARAMETERS: frozenset[str] = frozenset(_parameters(run, run_workflow, create_workflow, ConfigWorkflow.__init__))


@dataclass(frozen=True)
class Override:
    """One ``--key value`` of the command line.

    Attributes:
        flag: the flag as typed, e.g. ``--network_def#init_filters``.
        key: the config id it sets, ``::``-separated (python-fire turns ``-`` into ``_``).
        text: the value as typed (``"True"`` for a flag without value).
        value: the value python-fire passes on (``True`` for ``True``, the string ``'true'`` for ``true``).
    """

    flag: str
    key: str
    text: str
    value: Any


def _is_flag(arg: str) -> bool:
    # python-fire's rule: "--x", "-x", "-x=1"; "-1" is a value
    return arg.startswith("--") or re.match(r"^-[a-zA-Z]", arg) is not None


def _fire_value(text: str) -> Any:
    from fire.parser import DefaultParseValue

    return DefaultParseValue(text)


def parse_command_line(argv: Sequence[str]) -> tuple[str, dict[str, Any], list[Override]]:
    """Split ``monai.bundle`` arguments (``sys.argv[1:]``) the way python-fire does.

    Returns:
        the command (``"run"``), the arguments of ``run`` itself (``run_id``, ``config_file``, ...: positional or
        ``--name value``) and the config overrides, in order.
    """
    args = list(argv)
    if "--" in args:  # python-fire's own flags follow the last "--"
        args = args[: len(args) - 1 - args[::-1].index("--")]
    if not args:
        return "", {}, []
    command, args = args[0].replace("-", "_"), args[1:]
    params: dict[str, Any] = {}
    overrides: list[Override] = []
    positional: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if not _is_flag(arg):
            positional.append(arg)
            continue
        key, has_value, text = arg.lstrip("-").partition("=")
        key = key.replace("-", "_")
        if not has_value:
            if index < len(args) and not _is_flag(args[index]):
                text = args[index]
                index += 1
            elif key.startswith("no") and key not in RUN_PARAMETERS:  # python-fire: a lone --noX sets X=False
                key, text = key[2:], "False"
            else:
                text = "True"
        value = _fire_value(text)
        if key in RUN_PARAMETERS:
            params[key] = value
        else:
            overrides.append(Override(arg.split("=", 1)[0], key.replace("#", ID_SEP_KEY), text, value))
    for name in _POSITIONAL.get(command, []):
        if positional and name not in params:
            params[name] = _fire_value(positional.pop(0))
    return command, params, overrides


def _config_files(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    value = str(value)
    if not Path(value).is_file() and "," in value:  # as ConfigParser.load_config_files splits it
        return value.split(",")
    return [value]


def _flatten(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(id, value)`` of every item of a config, nested ids joined by ``::``."""
    items = config.items() if isinstance(config, Mapping) else enumerate(config)
    for k, v in items:
        key = f"{prefix}{str(k).removeprefix(MERGE_KEY).replace('#', ID_SEP_KEY)}"
        yield key, v
        if isinstance(v, (Mapping, list)):
            yield from _flatten(v, key + ID_SEP_KEY)


def _target_signature(component: Mapping) -> inspect.Signature | None:
    """The signature of a component's ``_target_``, or None when it cannot be located or inspected."""
    target = component.get("_target_")
    if not isinstance(target, str) or target.startswith((EXPR_KEY, ID_REF_KEY, MACRO_KEY)):
        return None
    try:
        module = ComponentLocator().get_component_module_name(target)
        if isinstance(module, list):
            module = module[0]
        obj = locate(f"{module}.{target}" if module else target)
        return None if obj is None else inspect.signature(obj)
    except Exception:  # an unimportable target fails later with its own error; nothing to check here
        return None


def _display(key: str, like: str) -> str:
    """``--key`` written with the separator the user typed (``#`` unless they typed ``::``)."""
    return "--" + (key if ID_SEP_KEY in like else key.replace(ID_SEP_KEY, "#"))


def _check_boolean(override: Override, expects_bool: bool) -> str | None:
    """The problem with a value that python-fire does not turn into the boolean the user meant, else None."""
    value, flag, text = override.value, override.flag, override.text
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str) and value.startswith((EXPR_KEY, ID_REF_KEY, MACRO_KEY)):
        return None
    word = str(value).strip().lower()
    # the string 'false' is truthy whatever the key expects: never what was meant
    if not (expects_bool or (isinstance(value, str) and word in ("true", "false"))):
        return None
    what = f"the string {value!r}" if isinstance(value, str) else f"the {type(value).__name__} {value!r}"
    meant = _BOOLEAN_WORDS.get(word)
    fix = f"write {flag} {meant}" if meant is not None else f"write {flag} True or {flag} False"
    return f"{flag} {text} is {what}; {fix} (python-fire turns only True/False into booleans)"


def _closest(word: str, candidates: Sequence[str], cutoff: float = 0.7, n: int = 3) -> list[str]:
    """The candidates nearest to ``word`` by their last level (difflib's ratio): the best and those almost as near."""
    last = word.rpartition(ID_SEP_KEY)[2]
    ratio = {c: difflib.SequenceMatcher(None, last, c.rpartition(ID_SEP_KEY)[2]).ratio() for c in candidates}
    scored = sorted(((r, c) for c, r in ratio.items()), reverse=True)
    scored = [(r, c) for r, c in scored if r >= cutoff]
    return [c for r, c in scored[:n] if r >= scored[0][0] - 0.05]


def _check_override(override: Override, ids: Mapping[str, Any], extra: Sequence[str], where: str) -> str | None:
    """The problem with one override (unknown key, or text for a boolean), else None."""
    key = override.key.removeprefix(MERGE_KEY)
    if key in ids or key in extra or key.split(ID_SEP_KEY)[0] == "_meta_":
        return _check_boolean(override, isinstance(ids.get(key), bool))
    levels = key.split(ID_SEP_KEY)
    depth = next(i for i in range(len(levels)) if ID_SEP_KEY.join(levels[: i + 1]) not in ids)  # first unknown level
    parent, missing = ID_SEP_KEY.join(levels[:depth]), ID_SEP_KEY.join(levels[: depth + 1])
    candidates = [k for k in ids if k.rpartition(ID_SEP_KEY)[0] == parent] + ([] if parent else list(extra))
    problem = ""
    if depth == len(levels) - 1 and isinstance(ids.get(parent), Mapping):  # a new argument of an existing item
        signature = _target_signature(ids[parent])
        params = {} if signature is None else signature.parameters
        if signature is None or levels[-1] in params or any(p.kind == p.VAR_KEYWORD for p in params.values()):
            default = params[levels[-1]].default if levels[-1] in params else None
            return _check_boolean(override, isinstance(default, bool))
        problem = f"{str(ids[parent]['_target_']).rsplit('.', 1)[-1]} takes no argument {levels[-1]!r}"
        candidates += [f"{parent}{ID_SEP_KEY}{p}" for p in params]
    rest = key[len(missing) :]
    valid = [c for c in set(candidates) if not rest or isinstance(ids.get(c), (Mapping, list))]
    close = _closest(missing, valid)
    if close:
        hint = "did you mean " + " or ".join(_display(c + rest, override.flag) for c in close) + "?"
    elif not problem:
        hint = f"{where} {'have' if ',' in where else 'has'} no key {_display(missing, override.flag)[2:]!r}"
    else:
        hint = ""
    return f"unknown override {override.flag}: " + "; ".join(p for p in (problem, hint) if p)


def _none_problem(override: Override, ids: Mapping[str, Any]) -> str | None:
    """The problem with ``None`` (or the text ``none``/``null``) for a config key whose value is not null, else None.

    python-fire turns ``None`` into None and MONAI drops every None override, so ``--dataset_dir None`` silently runs
    on the config's default folder. The text ``none``/``null`` arrives as that string: refused for a folder or file
    key and for a key whose value is not a string (a string key may take ``"none"`` as a choice, e.g. an activation).
    """
    value, flag, text = override.value, override.flag, override.text
    key = override.key.removeprefix(MERGE_KEY)
    if key not in ids or ids[key] is None:
        return None
    current = ids[key]
    last = key.rpartition(ID_SEP_KEY)[2]
    is_folder, is_file = last.endswith(("dir", "root")), last.endswith(("file", "path"))
    is_text = isinstance(value, str) and value.strip().lower() in _NONE_WORDS
    if is_text and isinstance(current, str) and not (is_folder or is_file or "/" in current):
        return None
    if not (value is None or is_text):
        return None
    if is_folder:
        give = f"give a folder: {flag} /path/to/folder"
    elif is_file:
        give = f"give a file: {flag} /path/to/file"
    elif isinstance(current, bool):
        give = f"write {flag} True or {flag} False"
    else:
        give = f"give a value: {flag} VALUE"
    if isinstance(current, Mapping) and isinstance(current.get("_target_"), str):
        shown = f"{current['_target_'].rsplit('.', 1)[-1]}(...)"
    else:
        shown = repr(current) if len(repr(current)) <= 80 else repr(current)[:77] + "..."
    if is_text:
        return f"{flag} {text} is the string {value!r}, not a null value; {give} (the config's value is {shown})"
    return (
        f"{flag} {text} is ignored: MONAI drops an override whose value is None and the run would use the config's "
        f"value {shown}; {give}"
    )


def _is_bundle_config(path: str) -> bool:
    """Whether ``path`` is a bundle's own config: a file in a ``configs/`` folder that holds ``metadata.json``."""
    folder = Path(path).parent
    return folder.name == "configs" and (folder / "metadata.json").is_file()


def _config_order_problem(files: Sequence[str]) -> str | None:
    """The problem with an overlay listed before the bundle's own config in ``--config_file``, else None.

    MONAI takes the first config file's folder as the bundle's ``configs/`` folder: with ``configs/quickstart.json``
    first, the run reads the wrong ``metadata.json`` and writes ``models/`` and ``eval/`` beside the overlay's folder.
    """
    if len(files) < 2 or not Path(files[0]).is_file() or _is_bundle_config(files[0]):
        return None
    bundle = [f for f in files if _is_bundle_config(f)]
    if not bundle:
        return None
    order = "[" + ",".join(f"'{f}'" for f in [*bundle, *(f for f in files if f not in bundle)]) + "]"
    return (
        f"--config_file lists {files[0]} before the bundle's config {bundle[0]}: MONAI takes the first file's folder "
        f"for the bundle's configs/ folder (metadata.json, models/, eval/); list the bundle's config first: "
        f'--config_file "{order}"'
    )


def _tracking_keys(tracking: Any) -> list[str]:
    """Override keys a ``--tracking`` setting adds (e.g. ``experiment_name`` for ``mlflow``)."""
    if tracking is None:
        return []
    try:
        if isinstance(tracking, str) and tracking in DEFAULT_EXP_MGMT_SETTINGS:
            settings = DEFAULT_EXP_MGMT_SETTINGS[tracking]
        else:
            settings = ConfigParser.load_config_files(tracking)
    except Exception:  # MONAI reports an unreadable tracking file itself
        return []
    return list(settings.get("configs", {}))


def check_command_line(argv: Sequence[str] | None = None) -> None:
    """Refuse overrides of a ``python -m monai.bundle run`` command line that would be ignored or misread.

    The config files are those of ``--config_file`` (one path, a list ``"['a.json','b.json']"`` merged in order as
    MONAI merges them, or from ``--args_file``). An override is accepted when it is one of ``run``'s own arguments
    (``run_id``, ``meta_file``, ``logging_file``, ``tracking``, ``workflow_type``, ...), an id of the merged config
    (``epochs``, ``network_def#init_filters``, ``train::dataloader::batch_size``, list indices), a metadata id
    (``_meta_#...``), or a new argument of an existing component whose ``_target_`` takes it. A value for a key
    that is a JSON boolean (or a boolean argument) must be ``True``/``False`` (or an ``$``/``@`` expression); the
    strings ``true``/``false`` are refused for every key. ``None`` (and the text ``none``/``null``) is refused for a
    key whose config value is not null: MONAI drops None overrides, so ``--dataset_dir None`` would run on the
    config's default folder. When a later config file is a bundle's own config (a file in a ``configs/`` folder
    holding ``metadata.json``), the first must be one too: MONAI takes the first file's folder for the bundle's.

    Args:
        argv: the arguments after the program, as ``sys.argv[1:]`` (``["run", "training", "--config_file", ...]``).
            Default: ``sys.argv[1:]`` when this process is ``python -m monai.bundle``, else nothing is checked.

    Raises:
        CommandLineError: one message for every problem, e.g. ``unknown override --epoch: did you mean --epochs?``.
    """
    if argv is None:
        if not _is_bundle_cli():
            return
        argv = sys.argv[1:]
    command, params, overrides = parse_command_line(argv)
    if command not in CHECKED_COMMANDS:
        return
    if params.get("args_file"):
        for key, value in ConfigParser.load_config_file(str(params["args_file"])).items():
            if key in RUN_PARAMETERS:
                params.setdefault(key, value)
            elif all(o.key != key.replace("#", ID_SEP_KEY) for o in overrides):
                overrides.append(Override(f"--{key}", key.replace("#", ID_SEP_KEY), repr(value), value))
    if not params.get("config_file"):
        return  # MONAI refuses a run without config
    files = _config_files(params["config_file"])
    order_problem = _config_order_problem(files)
    if order_problem:
        raise CommandLineError(order_problem)
    with warnings.catch_warnings():  # MONAI warns again about "+key" merges when it reads the files itself
        warnings.simplefilter("ignore")
        try:
            config = ConfigParser.load_config_files(files)
        except (OSError, ValueError) as e:
            raise CommandLineError(f"cannot read --config_file {params['config_file']!r}: {e}") from e
    ids = dict(_flatten(config))
    extra = sorted(RUN_PARAMETERS | set(_tracking_keys(params.get("tracking"))))
    where = ", ".join(Path(f).name for f in files)
    problems = [_none_problem(o, ids) or _check_override(o, ids, extra, where) for o in overrides]
    problems += [_check_boolean(Override(f"--{k}", k, str(v), v), False) for k, v in params.items()]
    problems = [p for p in problems if p]
    if len(problems) == 1:
        raise CommandLineError(problems[0])
    if problems:
        raise CommandLineError(
            f"{len(problems)} problems: " + " ".join(f"({n}) {p}" for n, p in enumerate(problems, 1))
        )


# --- one-line errors ---------------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    """A multi-line message (a list of bad cases) as one line: ``head item; item; ...``."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return f"{lines[0]} " + "; ".join(line.removeprefix("- ") for line in lines[1:])


def _shape(text: str) -> str:
    return text.replace(" ", "")


def _checkpoint_path(error: BaseException) -> str | None:
    """``load_path`` of the MONAI ``CheckpointLoader`` in whose call ``error`` was raised, if any."""
    for frame, _ in traceback.walk_tb(error.__traceback__):
        path = getattr(frame.f_locals.get("self"), "load_path", None)
        if isinstance(path, (str, os.PathLike)):
            return str(path)
    return None


def _state_dict_message(error: BaseException, text: str) -> str:
    """``load_state_dict``'s error as one line: the first mismatching tensor and both shapes, or the missing keys."""
    network = text.removeprefix(_STATE_DICT_ERROR).split(":", 1)[0].strip()
    path = _checkpoint_path(error)
    head = f"checkpoint {path} does not fit {network}" if path else f"the checkpoint does not fit {network}"
    mismatches = list(_SIZE_MISMATCH.finditer(text))
    if mismatches:
        m = mismatches[0]
        more = f" (and {len(mismatches) - 1} more tensors)" if len(mismatches) > 1 else ""
        return (
            f"{head}: {m['name']} has shape {_shape(m['ckpt'])} in the checkpoint but {_shape(m['model'])} in the "
            f"network{more}; set --network_width (and any other network override) to the values it was trained with"
        )
    parts = []
    for m in _KEY_LIST.finditer(text):
        keys = [k.strip(' "') for k in m["keys"].rstrip(". ").split(",") if k.strip(' ".')]
        parts.append(f"{len(keys)} {m['kind'].lower()} tensors (e.g. {keys[0]!r})")
    return f"{head}: {', '.join(parts) or _one_line(text)}; is it a checkpoint of this bundle's network?"


def _file_not_found_message(error: FileNotFoundError) -> str:
    name = error.filename
    if name is None:
        return _one_line(str(error))
    if str(name).endswith(_CHECKPOINT_SUFFIXES):
        hint = "; train the bundle first, or put its weights there" if Path(str(name)).name == "model.pt" else ""
        return f"checkpoint {name} does not exist{hint}"
    return f"no such file or folder: {name}"


def _message(error: BaseException) -> str | None:
    """The one-line message of a user mistake, else None."""
    text = str(error)
    if "Original Traceback (most recent call last):" in text:
        # re-raised from a DataLoader worker: the original exception survives only as traceback text
        for line in text.splitlines():
            m = re.match(r"^(?:[\w.]+\.)?(?P<name>\w+): (?P<message>.+)$", line)
            if m and m["name"] in _user_error_names():
                return m["message"]
        return None
    if isinstance(error, FileNotFoundError):
        return _file_not_found_message(error)
    if isinstance(error, USER_ERRORS):
        return _one_line(text)
    if isinstance(error, RuntimeError) and text.startswith(_STATE_DICT_ERROR):
        return _state_dict_message(error, text)
    return None


def user_error_message(error: BaseException) -> str | None:
    """One line for a user mistake, looking through MONAI's wrappers (``RuntimeError("Failed to instantiate
    component ...")`` raised from the real error); None for anything else, which deserves its traceback."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        message = _message(current)
        if message is not None:
            return message
        if not (isinstance(current, RuntimeError) and str(current).startswith(_MONAI_WRAPPERS)):
            return None
        current = current.__cause__ or current.__context__
    return None


_previous_hook: Callable[[type[BaseException], BaseException, TracebackType | None], Any] | None = None


def _excepthook(exc_type: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if issubclass(exc_type, KeyboardInterrupt) and not debug:
        sys.stdout.flush()
        sys.stderr.write(f"{interrupt_message()}\n")
        sys.stderr.flush()
        return  # Python then ends the process by SIGINT (status 130 in a shell), as for any unhandled Ctrl-C
    message = None if debug else user_error_message(error)
    if message is None:
        (_previous_hook or sys.__excepthook__)(exc_type, error, tb)
        return
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def install_error_handler(force: bool = False) -> None:
    """Report user mistakes as ``error: <message>`` on one line of stderr (exit status 1, as for any uncaught
    exception); keep Python's traceback for everything else.

    User mistakes are :data:`USER_ERRORS` (a dataset folder that is missing, empty or holds bad cases, label values
    outside the convention, a missing file or checkpoint, a refused override) and a checkpoint whose tensors do not
    fit the network (``load_state_dict``'s size mismatch: the first tensor and both shapes are named). A
    ``KeyboardInterrupt`` (Ctrl-C) is one line too, :func:`interrupt_message` (what was finished, what was not, how
    to go on); Python then ends the process by SIGINT, which a shell reports as exit status 130. Setting the
    environment variable ``BRATS_DEBUG=1`` restores full tracebacks. ``SystemExit`` (e.g.
    :class:`~brats_pipeline.data.screening.CasesFailedError`) never reaches the hook and keeps its own behaviour.

    Args:
        force: install even when this process is not ``python -m monai.bundle`` (by default a workflow run from
            Python leaves its caller's ``sys.excepthook`` alone).
    """
    global _previous_hook
    if sys.excepthook is _excepthook or not (force or _is_bundle_cli()):
        return
    _previous_hook = sys.excepthook
    sys.excepthook = _excepthook


def fire_command(component: Any) -> None:
    """Run ``component`` as a python-fire command line (the console commands ``brats-*`` and ``python -m``), with
    user mistakes as one ``error:`` line (:func:`install_error_handler`)."""
    import fire

    install_error_handler(force=True)
    fire.Fire(component)


def guard_bundle_run() -> None:
    """The first step of every bundle config's ``initialize``: :func:`install_error_handler`, then
    :func:`check_command_line` (both do nothing outside ``python -m monai.bundle``)::

        "initialize": [{"_target_": "brats_pipeline.bundle.command_line.guard_bundle_run", "_requires_": "@bundle_code"},
                       {"_target_": "brats_pipeline.bundle.command_line.check_output_folders",
                        "folders": ["@prediction_dir"]},
                       ...]

    The second step, :func:`check_output_folders`, refuses an output folder that cannot be written before any data
    or model is loaded.
    """
    install_error_handler()
    check_command_line()


# --- output folders ----------------------------------------------------------------------------------------------


def check_output_folders(folders: Iterable[str | os.PathLike | None] | str | os.PathLike) -> None:
    """Refuse, in one line, an output folder that this process cannot create or write into.

    An existing folder must be a folder with write and search permission (``os.access``; it also reports a read-only
    file system); a folder that does not exist yet must be creatable: its nearest existing parent must be a writable
    folder. Nothing is created. ``None`` entries are skipped. (``os.access`` grants everything to root, as the
    kernel does: a root process can write a folder of mode ``0o555``.)

    The configs run it as the second ``initialize`` step (``train.json``: ``ckpt_dir``, ``log_dir`` and the
    persistent cache; ``inference.json``: ``prediction_dir``).

    Raises:
        OutputFolderError: ``output folder X is not writable``, with the reason when the folder does not exist yet.
    """
    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]
    for folder in folders:
        if folder is None or str(folder) == "":
            continue
        path = Path(os.path.abspath(os.fspath(folder)))
        existing = path
        while not os.path.exists(existing) and existing.parent != existing:
            existing = existing.parent
        if not existing.is_dir():
            raise OutputFolderError(f"output folder {folder} is not writable ({existing} is a file, not a folder)")
        if not os.access(existing, os.W_OK | os.X_OK):
            where = "" if existing == path else f" (cannot create it in {existing})"
            raise OutputFolderError(f"output folder {folder} is not writable{where}")


# --- interrupts (Ctrl-C) -----------------------------------------------------------------------------------------

#: the run objects' reporters, oldest first (weak references: a finished run's objects may be freed)
_interrupt_reporters: list[Callable[[], Callable[[], str | None] | None]] = []
#: what an interrupt says when no run object has anything to say (during parsing or data preparation, or a workflow
#: without one, e.g. ``evaluate.json``)
DEFAULT_INTERRUPT_MESSAGE = "interrupted; rerun the same command to run it again"


def report_interrupts_with(reporter: Callable[[], str | None]) -> None:
    """Register ``reporter``, which returns the line an interrupt (Ctrl-C) prints, or ``None`` to leave it to an
    earlier one. The latest registered reporter speaks first. A bound method is held weakly (its object is not kept
    alive by this registry)."""
    if inspect.ismethod(reporter):
        ref: Callable[[], Callable[[], str | None] | None] = weakref.WeakMethod(reporter)
    else:
        ref = lambda: reporter  # noqa: E731
    _interrupt_reporters[:] = [r for r in _interrupt_reporters if r() is not None]  # forget freed runs
    _interrupt_reporters.append(ref)


def interrupt_message() -> str:
    """The one line a Ctrl-C prints: the latest registered reporter's (:func:`report_interrupts_with`), else
    :data:`DEFAULT_INTERRUPT_MESSAGE`. A reporter that fails is skipped: the line must always be printed."""
    for ref in reversed(_interrupt_reporters):
        reporter = ref()
        if reporter is None:
            continue
        try:
            message = reporter()
        except Exception:  # a broken reporter must not hide the interrupt behind a traceback
            continue
        if message:
            return _one_line(message)
    return DEFAULT_INTERRUPT_MESSAGE


def _is_interrupt(error: BaseException | None) -> bool:
    """A Ctrl-C (``KeyboardInterrupt``) or another ``BaseException`` that is no error of the work (``SystemExit``,
    ``GeneratorExit``): never a failed case, never logged as an engine failure."""
    return isinstance(error, BaseException) and not isinstance(error, Exception)


class _InterruptLogFilter(logging.Filter):
    """Drops Ignite's ``Engine run is terminating due to exception: `` line while an interrupt is handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_is_interrupt(sys.exc_info()[1]) and "terminating due to exception" in record.getMessage())


_INTERRUPT_LOG_FILTER = _InterruptLogFilter()


class InterruptGuard:
    """Ignite handler: an interrupt (Ctrl-C) leaves the engine at once, untouched by its other ``EXCEPTION_RAISED``
    handlers (MONAI's ``StatsHandler`` would log its traceback, a ``CaseFailureReport`` record it as a bad case), and
    without Ignite's ``Engine run is terminating due to exception`` log line. Errors (``Exception``) go on to those
    handlers as before. The handler puts itself first among the engine's ``EXCEPTION_RAISED`` handlers, whenever it
    is attached; the one line the interrupt prints comes from :func:`install_error_handler`.
    """

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if not engine.has_event_handler(self, Events.EXCEPTION_RAISED):
            engine.add_event_handler(Events.EXCEPTION_RAISED, self)
            handlers = getattr(engine, "_event_handlers", {}).get(Events.EXCEPTION_RAISED)
            if isinstance(handlers, list) and len(handlers) > 1 and handlers[-1][0] is self:
                handlers.insert(0, handlers.pop())  # Ignite calls them in order: first, whenever attached
        engine.logger.addFilter(_INTERRUPT_LOG_FILTER)

    def __call__(self, engine: Any, error: BaseException) -> None:
        from ignite.engine import Events

        if _is_interrupt(error):
            raise error
        handlers = getattr(engine, "_event_handlers", {}).get(Events.EXCEPTION_RAISED, [])
        if not any(entry[0] is not self for entry in handlers):
            raise error  # no other handler: Ignite would have raised it itself


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold back a Ctrl-C (SIGINT) until the block has finished: for writes that must happen together (a label map
    and its line in ``predictions.json``). The ``KeyboardInterrupt`` is raised when the block ends. Only in the main
    thread and while Python's own SIGINT handler is installed; elsewhere the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt
