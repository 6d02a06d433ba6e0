"""What a trained model needs to be rebuilt: ``models/model_settings.json``, written next to ``models/model.pt``.

``model.pt`` stays a raw state dict (it loads strictly into the bundle's inference network, MONAI's plain
``SegResNet`` for segresnet_vae: the Model Zoo convention), so everything else a model depends on travels beside it
as JSON. :class:`~brats_pipeline.training.run.TrainingRun` writes the file (rank 0, atomically) each time it writes
``model.pt`` (just before the weights take their name, so the two never describe different runs; a run that writes no
``model.pt`` writes no settings either), from its ``settings`` argument, which ``train.json`` fills from its own
keys::

    {
      "format": 1,
      "channels": ["t1c", "t1", "t2", "flair"],              # brats_pipeline.data.layouts.CHANNELS, added here
      "network_width": 8,
      "network_def": {"_target_": "SegResNetVAE2018 ...", "init_filters": 8, "out_channels": 3, ...},
      "normalize_intensity": {"_target_": "brats_pipeline.transforms.preprocessing.NormalizeNonzeroIntensityd", "keys": "image"},
      "roi_size": [160, 192, 128],
      "brain_crop_margin": 0,
      "brain_crop_k_divisible": 8,
      "label_convention": "brats2023",
      "include_rc": false
    }

Its keys are the config keys they come from, so the inference side reads them back by the same names:

* :class:`TrainedSettings` is the config component (``trained``) of ``inference.json`` and ``evaluate.json``: it
  gives ``network_width``, ``include_rc``, the brain crop (and ``sw_roi_size`` the training crop) the trained value
  when the file exists, the configured default otherwise (a model trained before the file existed); each key reads
  ``$@trained['network_width']``. A command-line override replaces the key, so it is used as given.
* :meth:`TrainedSettings.check` (``initialize``; :func:`check_trained_settings`) compares each such key that the
  command line sets with the trained value and raises :class:`SettingsMismatchError` (a
  :class:`~brats_pipeline.bundle.command_line.CommandLineError`, so the error handler prints it as one ``error:``
  line) naming the setting and both values. It also refuses a model trained with another channel order or
  normalisation than the one the config builds, and, settings file or not, a ``model.pt`` whose tensors do not fit
  the network: one line with the first tensor, both shapes and the fix, said before the engine starts (Ignite would
  otherwise log ``load_state_dict``'s message of one line per tensor).
* :func:`config_arguments` gives the resolved arguments of a config component (``network_def``,
  ``normalize_intensity``) for the file.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from brats_pipeline.bundle.command_line import CommandLineError, Override, parse_command_line
from brats_pipeline.data.layouts import CHANNELS
from brats_pipeline.training.records import JsonRecord

__all__ = [
    "SETTINGS_FORMAT",
    "SETTINGS_NAME",
    "ModelSettingsError",
    "ModelSettingsRecord",
    "SettingsMismatchError",
    "TrainedSettings",
    "check_trained_settings",
    "config_arguments",
    "read_model_settings",
    "settings_record",
    "trained_setting",
]

logger = logging.getLogger(__name__)

#: file name, in the checkpoint folder (``models/``), next to ``model.pt``
SETTINGS_NAME = "model_settings.json"
#: version of the file's layout
SETTINGS_FORMAT = 1
#: keys of a config component that are MONAI's instructions, not arguments
_SPECIAL_KEYS = ("_requires_", "_disabled_", "_desc_", "_mode_")
_EXPRESSION_PREFIXES = ("$", "@", "%")


class ModelSettingsError(CommandLineError):
    """The trained settings forbid this run, or cannot be read (``model_settings.json`` not a JSON object).

    A :class:`~brats_pipeline.bundle.command_line.CommandLineError`, so ``install_error_handler`` reports it as one
    ``error:`` line (status 1): the fix is always the user's (an override to drop, a file to repair).
    """


class SettingsMismatchError(ModelSettingsError):
    """A command-line value (or the config) contradicts what the model in ``models/model.pt`` was trained with."""


# --- writing ---------------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON types: tuples become lists, numpy/torch scalars numbers, anything else its ``str``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(value, "ndim", 1) == 0:
        return _jsonable(item())
    tolist = getattr(value, "tolist", None)  # numpy arrays, tensors
    if callable(tolist):
        return _jsonable(tolist())
    return str(value)


def settings_record(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The content of ``model_settings.json`` for ``settings``: ``format``, the channel order
    (:data:`~brats_pipeline.data.layouts.CHANNELS`) unless given, then ``settings`` as plain JSON values."""
    record: dict[str, Any] = {"format": SETTINGS_FORMAT, "channels": list(CHANNELS)}
    record.update(_jsonable(dict(settings)))
    return record


class ModelSettingsRecord(JsonRecord):
    """``ckpt_dir/model_settings.json``, written (rank 0, atomically) when called: ``TrainingRun`` calls it each time
    it writes ``model.pt``.

    Args:
        ckpt_dir: the checkpoint folder (``@ckpt_dir``), where ``model.pt`` is written.
        settings: what the model needs to be rebuilt (see the module docstring); made plain JSON by
            :func:`settings_record`.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, settings: Mapping[str, Any]) -> None:
        self.path = Path(ckpt_dir) / SETTINGS_NAME
        self.record = settings_record(settings)


def _config_resolver() -> Any:
    """The MONAI ``ReferenceResolver`` that is resolving the config item being built (found on the call stack)."""
    from monai.bundle import ReferenceResolver

    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, ReferenceResolver):
                return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


def config_arguments(config_id: str) -> dict[str, Any]:
    """The ``_target_`` and resolved arguments of the component ``config_id`` of the config being parsed.

    A config component (``"_target_": "brats_pipeline.bundle.settings.config_arguments"``) for the settings file:
    ``{"config_id": "network_def"}`` gives ``{"_target_": "SegResNet", "init_filters": 8, "out_channels": 3, ...}``,
    every reference and expression evaluated as the component itself gets them, command-line overrides and overlay
    arguments included. It must be built by MONAI's ``ConfigParser`` (``run``, ``ConfigWorkflow``,
    ``get_parsed_content``), whose resolver it asks.

    Raises:
        RuntimeError: when not called while a MONAI config is being resolved.
        KeyError: when the config has no component ``config_id``.
    """
    from monai.bundle.utils import ID_SEP_KEY

    resolver = _config_resolver()
    if resolver is None:
        raise RuntimeError("config_arguments must be built by a MONAI ConfigParser (a bundle config component)")
    config_id = resolver.normalize_id(config_id)
    item = resolver.items.get(config_id)
    config = item.get_config() if item is not None else None
    if not isinstance(config, Mapping):
        raise KeyError(f"the config has no component {config_id!r}")
    arguments: dict[str, Any] = {}
    for key in config:
        if key in _SPECIAL_KEYS:
            continue
        value = resolver.get_resolved_content(f"{config_id}{ID_SEP_KEY}{key}")
        arguments[key] = _jsonable(value)
    return arguments


# --- reading ---------------------------------------------------------------------------------------------------

_cache: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}


def settings_path(ckpt_dir: str | os.PathLike) -> Path:
    """``ckpt_dir/model_settings.json`` (``ckpt_dir`` may also be a settings file itself, of any name)."""
    path = Path(ckpt_dir)
    return path if path.name == SETTINGS_NAME or path.is_file() else path / SETTINGS_NAME


def read_model_settings(ckpt_dir: str | os.PathLike | None) -> dict[str, Any] | None:
    """The settings a model in ``ckpt_dir`` was trained with, or ``None`` when ``ckpt_dir`` has no settings file.

    Raises:
        ModelSettingsError: the file exists but is not a JSON object.
    """
    if ckpt_dir is None:
        return None
    path = settings_path(ckpt_dir)
    try:
        stat = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    key, stamp = str(path.resolve()), (stat.st_mtime_ns, stat.st_size)
    cached = _cache.get(key)
    if cached is not None and cached[0] == stamp:
        return dict(cached[1])
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelSettingsError(f"{path}: not valid JSON ({e}); train again, or delete the file") from e
    if not isinstance(settings, dict):
        raise ModelSettingsError(f"{path}: expected a JSON object, found {type(settings).__name__}")
    _cache[key] = (stamp, settings)
    return dict(settings)


def trained_setting(ckpt_dir: str | os.PathLike | None, key: str, default: Any = None) -> Any:
    """The value of ``key`` that the model in ``ckpt_dir`` was trained with, else ``default``.

    What :class:`TrainedSettings` gives for each of its keys (logged when it differs from ``default``).

    Args:
        ckpt_dir: the checkpoint folder holding ``model.pt`` and ``model_settings.json``.
        key: a key of the settings file (the config key it was written from).
        default: the value when there is no settings file, or it has no ``key`` (a model trained before).
    """
    settings = read_model_settings(ckpt_dir)
    if settings is None or key not in settings:
        return default
    value = settings[key]
    if value != default:
        logger.info("%s = %r, as the model was trained (%s)", key, value, settings_path(ckpt_dir))
    return value


# --- checking --------------------------------------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON values (tuples and lists alike; ``True`` is not ``1``)."""
    a, b = _jsonable(a), _jsonable(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _show(value: Any) -> str:
    """A value as it is typed on the command line: ``True``, ``None``, ``8``, ``[24,24,24]``, ``"trilinear"``."""
    value = _jsonable(value)
    if isinstance(value, bool) or value is None:
        return repr(value)
    return json.dumps(value, separators=(",", ":"))


def _is_bundle_cli() -> bool:
    from brats_pipeline.bundle.command_line import _is_bundle_cli as is_cli

    return is_cli()


def command_line_overrides(argv: Sequence[str] | None = None) -> dict[str, Override]:
    """The config overrides of a ``python -m monai.bundle run`` command line (and its ``--args_file``), by config id
    (``::``-separated). Empty when this process is not ``python -m monai.bundle`` and no ``argv`` is given."""
    if argv is None:
        if not _is_bundle_cli():
            return {}
        argv = sys.argv[1:]
    _, params, overrides = parse_command_line(argv)
    found = {o.key.lstrip("+"): o for o in overrides}
    if params.get("args_file"):
        from monai.bundle import ConfigParser

        from brats_pipeline.bundle.command_line import RUN_PARAMETERS

        for key, value in ConfigParser.load_config_file(str(params["args_file"])).items():
            key = key.replace("#", "::")
            if key not in RUN_PARAMETERS and key not in found:
                found[key] = Override(f"--{key}", key, repr(value), value)
    return found


def _shape(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(int(n)) for n in shape) + "]"


def _load_state_dict(path: Path) -> Mapping[str, Any] | None:
    """The tensors of a ``model.pt`` as ``CheckpointLoader`` would load them into one network, or ``None`` when the
    file is missing or not a plain state dict (``CheckpointLoader`` then reports it itself)."""
    import torch

    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not loadable as plain tensors: CheckpointLoader reports it in its own words
        return None
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]  # a checkpoint dict with the network under "model" (CheckpointLoader takes that)
    if not isinstance(state, Mapping) or not all(hasattr(v, "shape") for v in state.values()):
        return None
    return state


def _width_from_shapes(mismatched: list[tuple[str, tuple, tuple]], width: Any) -> int | None:
    """The ``network_width`` the checkpoint's shapes imply, when every mismatching dimension scales by one ratio."""
    if not isinstance(width, int) or isinstance(width, bool) or width <= 0:
        return None
    ratio = None
    for _, ckpt, own in mismatched:
        if len(ckpt) != len(own):
            return None
        for a, b in zip(ckpt, own, strict=True):
            if a == b:
                continue
            if b == 0:
                return None
            r = a / b
            if ratio is None:
                ratio = r
            elif not math.isclose(r, ratio):
                return None
    if ratio is None:
        return None
    implied = width * ratio
    return int(round(implied)) if math.isclose(implied, round(implied)) and round(implied) != width else None


def _checkpoint_problem(
    network: Any, model: Path, settings: Mapping[str, Any] | None, values: Mapping[str, Any], where: Path
) -> str | None:
    """One line when the tensors of ``model`` do not fit ``network``: the first tensor, both shapes and the fix."""
    state = _load_state_dict(model)
    own_state = getattr(network, "state_dict", None)
    if state is None or not callable(own_state):
        return None
    own = own_state()
    mismatched = [
        (k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape
    ]
    name = type(network).__name__
    head = f"checkpoint {model} does not fit {name}"
    if not mismatched:
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if not (missing or unexpected):
            return None
        parts = [f"{len(keys)} {kind} tensors (e.g. {keys[0]!r})" for kind, keys in (("missing", missing),
                 ("unexpected", unexpected)) if keys]  # fmt: skip
        return f"{head}: {', '.join(parts)}; is it a checkpoint of this bundle's network?"
    key, ckpt, own_shape = mismatched[0]
    more = f" (and {len(mismatched) - 1} more tensors)" if len(mismatched) > 1 else ""
    text = f"{head}: {key} has shape {_shape(ckpt)} in the checkpoint but {_shape(own_shape)} in the network{more}"
    if settings is not None:
        differ = [
            f"{k} {_show(settings[k])} (not {_show(v)})"
            for k, v in values.items()
            if k in settings and not _same(v, settings[k])
        ]
        if differ:
            return f"{text}; it was trained with {', '.join(differ)}: leave out the overrides of these ({where})"
        return f"{text}; set --network_width (and any other network override) to the values it was trained with"
    implied = _width_from_shapes(mismatched, values.get("network_width"))
    if implied is not None:
        return (
            f"{text}; by its shapes it was trained with --network_width {implied}: add --network_width {implied} "
            "(set any other network override to the values it was trained with)"
        )
    return f"{text}; set --network_width (and any other network override) to the values it was trained with"


def check_trained_settings(
    ckpt_dir: str | os.PathLike | None,
    values: Mapping[str, Any] | None = None,
    normalize_intensity: Any = None,
    network: Any = None,
    enabled: bool = True,
    argv: Sequence[str] | None = None,
) -> None:
    """Refuse settings that contradict how the model in ``ckpt_dir`` was trained, before anything runs.

    The configs run it as ``$@trained.check(@network, @normalize_intensity, @load_bundle_model)``
    (:meth:`TrainedSettings.check`, which passes the values of its keys).

    Checked, with ``models/model_settings.json``:

    * each key of ``values`` that the command line sets (``--network_width 16``; also ``--args_file``): its value in
      the config must be the trained one. Keys the command line leaves alone hold the trained value already
      (:func:`trained_setting`), or a configured value the user did not type, and are not compared.
    * ``--network_def#<argument>`` on the command line, against the trained network's argument of that name.
    * the channel order of this code (:data:`~brats_pipeline.data.layouts.CHANNELS`) against the trained one.
    * ``normalize_intensity`` (the built transform) against the trained normalisation's ``_target_`` (by class name).

    With or without it (a model trained before the file existed), when ``network`` is given: the shapes of
    ``model.pt``'s tensors against the network's. A mismatch is one line naming the first tensor, both shapes and the
    fix (the trained values, from the file or, for the width, from the shapes), said before the engine starts, so
    Ignite does not log the hundreds of lines of ``load_state_dict``'s message.

    Args:
        ckpt_dir: the checkpoint folder holding ``model.pt`` and ``model_settings.json``.
        values: config key -> its value in this config (``"@network_width"``).
        normalize_intensity: the config's normalisation transform (``"@normalize_intensity"``), or ``None``.
        network: the network ``model.pt`` is loaded into (``"@network"``), or ``None`` (no shape check).
        enabled: ``False`` skips every check (``@load_bundle_model``: no trained model is loaded).
        argv: the command line after the program (default: ``sys.argv[1:]`` under ``python -m monai.bundle``).

    Raises:
        SettingsMismatchError: one line naming each contradicting setting, both values and the fix.
    """
    if not enabled or ckpt_dir is None:
        return
    settings = read_model_settings(ckpt_dir)
    where = settings_path(ckpt_dir)
    model = where.parent / "model.pt"
    if settings is None:
        problem = None if network is None else _checkpoint_problem(network, model, None, values or {}, where)
        if problem:
            raise SettingsMismatchError(problem)
        return
    problems: list[str] = []
    overrides = command_line_overrides(argv)
    # the architecture's truth is whether model.pt fits the network: a width that differs from the recorded
    # network_width but builds the trained shapes (the run overrode network_def#init_filters itself) is no conflict
    fits = network is not None and _checkpoint_problem(network, model, settings, values or {}, where) is None
    for key, value in (values or {}).items():
        key = key.replace("#", "::")
        if key == "network_width" and fits:
            continue
        if key in overrides and key in settings and not _same(value, settings[key]):
            flag = overrides[key].flag
            problems.append(
                f"{flag} {_show(value)} does not match the trained model: {model} was trained with {key} "
                f"{_show(settings[key])}; leave out {flag} to use the trained value"
            )
    trained_network = settings.get("network_def")
    if isinstance(trained_network, Mapping):
        for key, override in overrides.items():
            parts = key.split("::")
            if (
                len(parts) != 2
                or parts[0] != "network_def"
                or parts[1] not in trained_network
                or parts[1] == "_target_"
            ):
                continue
            value = override.value
            if isinstance(value, str) and value.startswith(_EXPRESSION_PREFIXES):
                continue  # evaluated later; a wrong size shows as the checkpoint not fitting the network
            if not _same(value, trained_network[parts[1]]):
                problems.append(
                    f"{override.flag} {_show(value)} does not match the trained model: {model} was trained with "
                    f"network_def#{parts[1]} {_show(trained_network[parts[1]])}; leave out {override.flag} to use the "
                    "trained network"
                )
    channels = settings.get("channels")
    if channels is not None and not _same(channels, list(CHANNELS)):
        problems.append(
            f"{model} was trained on channels {_show(channels)} but this code stacks {_show(list(CHANNELS))}; "
            "use the code version the model was trained with"
        )
    trained_norm = settings.get("normalize_intensity")
    if normalize_intensity is not None and isinstance(trained_norm, Mapping) and trained_norm.get("_target_"):
        trained_name = str(trained_norm["_target_"]).rsplit(".", 1)[-1]
        name = type(normalize_intensity).__name__
        if name != trained_name:
            problems.append(
                f"normalize_intensity {name} does not match the trained model: {model} was trained with "
                f"{trained_norm['_target_']}; use the trained normalisation"
            )
    if not problems and network is not None:
        problem = _checkpoint_problem(network, model, settings, values or {}, where)
        if problem:
            raise SettingsMismatchError(problem)
    if problems:
        suffix = f" (trained settings: {where})"
        if len(problems) == 1:
            raise SettingsMismatchError(problems[0] + suffix)
        raise SettingsMismatchError(
            f"{len(problems)} settings do not match the trained model: "
            + " ".join(f"({n}) {p}" for n, p in enumerate(problems, 1))
            + suffix
        )


class TrainedSettings(Mapping[str, Any]):
    """The settings the model in ``ckpt_dir`` was trained with (``models/model_settings.json``), each falling back to
    its entry in ``defaults`` (no settings file, or a key it lacks: a model trained before the key was recorded).

    One component per config reads them all, and the settings the model depends on are keys that name it::

        "trained": {"_target_": "brats_pipeline.bundle.settings.TrainedSettings", "_requires_": "@bundle_code",
                    "ckpt_dir": "@ckpt_dir", "defaults": {"network_width": 32, "include_rc": false, ...}},
        "network_width": "$@trained['network_width']",
        "initialize": [..., "$@trained.check(@network, @normalize_intensity, @load_bundle_model)"]

    ``--network_width 16`` on the command line replaces the key as usual; :meth:`check` refuses it when it
    contradicts the trained value. The packager (:mod:`brats_pipeline.tools.packaging`) writes the trained values
    into ``defaults``, so a packaged bundle's configs say what its weights need.

    Args:
        ckpt_dir: the checkpoint folder holding ``model.pt`` and ``model_settings.json``.
        defaults: setting name -> the value without a settings file (the config's own default).
    """

    def __init__(self, ckpt_dir: str | os.PathLike | None, defaults: Mapping[str, Any]) -> None:
        self.ckpt_dir = ckpt_dir
        self.defaults = dict(defaults)

    def __getitem__(self, key: str) -> Any:
        return trained_setting(self.ckpt_dir, key, self.defaults[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self.defaults)

    def __len__(self) -> int:
        return len(self.defaults)

    def check(
        self,
        network: Any = None,
        normalize_intensity: Any = None,
        enabled: bool = True,
        argv: Sequence[str] | None = None,
    ) -> None:
        """:func:`check_trained_settings` for every setting of :attr:`defaults`: a command-line value is compared
        with the trained one, ``model.pt``'s tensor shapes with ``network``'s, before the engine starts.

        Args:
            network: the network ``model.pt`` is loaded into, or ``None`` (no shape check).
            normalize_intensity: the config's normalisation transform, or ``None``.
            enabled: ``False`` skips every check (``@load_bundle_model``: no trained model is loaded).
            argv: the command line after the program (default: ``sys.argv[1:]`` under ``python -m monai.bundle``).
        """
        overrides = command_line_overrides(argv)
        values = {}
        for key in self.defaults:
            value = overrides[key].value if key in overrides else None
            values[key] = value if key in overrides and not _is_expression(value) else self[key]
        check_trained_settings(self.ckpt_dir, values, normalize_intensity, network, enabled, argv)


def _is_expression(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(_EXPRESSION_PREFIXES)
