"""Package a bundle of this repository as a self-contained ``<name>_v<version>.zip`` (the Model Zoo's naming).

The zip unpacks into one ``<name>/`` folder, which is what ``python -m monai.bundle download --url file:///...``
expects::

    <name>/configs/      metadata.json, train.json, inference.json, evaluate.json, multi_gpu_train.json, logging.conf
    <name>/docs/         README.md (model card), data_license.txt
    <name>/models/       model.pt when it is at most ``max_file_mb``; bigger files are listed in large_files.json;
                         model_settings.json (how the model was trained: width, crop, label convention, ...) and
                         cases.json, the training run's record, when they exist
    <name>/scripts/      the modules of brats_pipeline/ and custom_networks/ that the configs run (runtime_modules)
    <name>/LICENSE
    <name>/large_files.json  only when a weight file is too big to ship inside the zip

``large_files.json`` is ``{"large_files": [{"path", "url", "hash_val", "hash_type"}]}``, what
``python -m monai.bundle download_large_files --bundle_path <name>`` reads; JSON rather than the Model Zoo's usual
``large_files.yml`` because reading YAML needs PyYAML, which MONAI does not install and a bundle user may lack.

The bundle configs name our code by ``_target_`` only (never ``$import brats_pipeline``), and their
``bundle_code`` item puts ``<bundle_root>/scripts`` on ``sys.path`` before anything of ours is built: during
``initialize`` (which ``run`` and ``monai.bundle.load`` both call) and as ``network_def``'s ``_requires_``
(for ``verify_net_in_out``/``ckpt_export``, which skip ``initialize``). Both bundles ship the same two packages
from the same commit, so loading both in one process resolves to one copy of identical code.

Weights and their settings travel together. The weights are ``--weights FILE`` or the bundle's ``models/model.pt``;
``model_settings.json`` (:mod:`brats_pipeline.bundle.settings`) is the one next to them (or ``--settings FILE``). Its
values become the packaged configs' defaults: every top-level key of ``configs/*.json`` that the settings name and
that holds a plain value (``network_width``, ``include_rc``, ``roi_size``, ``brain_crop_*``), the ``defaults`` of
the ``TrainedSettings`` component, and the plain arguments of ``network_def``. So a bundle trained with
``--network_width 8`` unpacks into configs that say 8 (``monai.bundle.load`` of ``train.json`` included), and its
``inference.json`` also reads ``models/model_settings.json`` itself. Weights without a settings file (trained before
it existed) keep the configs as they are, with a warning. Without any weights the packager refuses, unless
``allow_no_weights`` (then it warns that the zip holds no weights). Training leftovers never travel: ``eval/``,
``logs/``, the persistent ``cache/``, and ``models/*_checkpoint_epoch=N.pt`` (resume checkpoints).

Command line::

    python -m brats_pipeline.tools.packaging bundles/espnet3d --output_dir dist
    python -m brats_pipeline.tools.packaging bundles/segresnet_vae --weights_url https://host/segresnet_vae/model.pt
    python -m brats_pipeline.tools.packaging bundles/espnet3d --weights runs/width8/models/model.pt
    python -m brats_pipeline.tools.packaging bundles/espnet3d --allow_no_weights True   # configs and code only
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import re
import sys
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from brats_pipeline.atomic_files import atomic_write
from brats_pipeline.bundle.settings import SETTINGS_NAME, ModelSettingsError, read_model_settings

logger = logging.getLogger(__name__)

#: the Model Zoo keeps files above this size out of the bundle (``large_files.json``)
MAX_FILE_MB = 25.0
#: what the Model Zoo's CI requires of every bundle, plus what our commands need
REQUIRED_FILES = (
    "configs/metadata.json",
    "configs/inference.json",
    "configs/train.json",
    "configs/evaluate.json",
    "configs/multi_gpu_train.json",
    "configs/logging.conf",
    "docs/README.md",
    "docs/data_license.txt",
    "LICENSE",
)
#: our packages that the configs name by ``_target_``; the modules a bundle runs are copied under ``scripts/``
VENDORED_PACKAGES = ("brats_pipeline", "custom_networks")
_DOTTED_NAME = re.compile(rf"\b(?:{'|'.join(VENDORED_PACKAGES)})(?:\.[A-Za-z_]\w*)*")
#: folders of a working bundle that never travel (training outputs, logs, the persistent data cache, earlier runs)
SKIPPED_FOLDERS = ("eval", "logs", "runs", "cache", "previous", "__pycache__")
#: files of a working bundle that never travel: the resume checkpoints a training run leaves in ``models/``
SKIPPED_FILES = re.compile(r".*_checkpoint_(epoch|iteration)=\d+\.pt")
WEIGHTS = "models/model.pt"
SETTINGS = f"models/{SETTINGS_NAME}"
#: the training run's record of its cases (:class:`~brats_pipeline.training.records.CaseRecord`); travels with its weights
CASE_RECORD = "models/cases.json"
#: ``_target_`` of the config component that reads the trained settings
TRAINED_SETTINGS_TARGET = "brats_pipeline.bundle.settings.TrainedSettings"
LARGE_FILES_NAME = "large_files.json"
#: every name ``download_large_files`` reads (it reads them all): a stale one in a bundle folder never travels
LARGE_FILES_NAMES = (LARGE_FILES_NAME, "large_files.yml", "large_files.yaml")


class BundlePackagingError(ValueError):
    """A bundle folder that cannot be packaged as it is; the message names the file and the fix."""


def bundle_metadata(bundle_dir: str | os.PathLike) -> dict:
    """``configs/metadata.json`` of a bundle, checked for the Model Zoo's rules: ``name``, ``version``, and the
    version present as a key of ``changelog``.

    Raises:
        BundlePackagingError: naming the file and what is missing.
    """
    path = Path(bundle_dir) / "configs" / "metadata.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise BundlePackagingError(f"{path}: missing; a bundle needs configs/metadata.json") from err
    except json.JSONDecodeError as err:
        raise BundlePackagingError(f"{path}: not valid JSON ({err})") from err
    for key in ("name", "version", "changelog"):
        if not meta.get(key):
            raise BundlePackagingError(f"{path}: no '{key}'")
    if meta["version"] not in meta["changelog"]:
        raise BundlePackagingError(
            f"{path}: version {meta['version']!r} has no entry in 'changelog' (keys: {sorted(meta['changelog'])})"
        )
    return meta


def missing_required_files(bundle_dir: str | os.PathLike) -> list[str]:
    """The :data:`REQUIRED_FILES` that ``bundle_dir`` lacks (empty when complete)."""
    root = Path(bundle_dir)
    return [rel for rel in REQUIRED_FILES if not (root / rel).is_file()]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _bundle_files(bundle_dir: Path) -> Iterator[Path]:
    for path in sorted(bundle_dir.rglob("*")):
        rel = path.relative_to(bundle_dir)
        if (
            path.is_file()
            and not any(part in SKIPPED_FOLDERS or part.startswith(".") for part in rel.parts)
            and not SKIPPED_FILES.fullmatch(path.name)
        ):
            yield path


def _module_file(name: str, root: Path) -> Path | None:
    """The source file of module ``name`` (``a.b`` -> ``root/a/b.py`` or ``root/a/b/__init__.py``), if it is one."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _named_modules(text: str, root: Path) -> set[str]:
    """Our modules that a text names (``_target_`` paths, ``$`` expressions, import statements): for each dotted
    name under :data:`VENDORED_PACKAGES`, its longest prefix that is a module."""
    found: set[str] = set()
    for match in _DOTTED_NAME.finditer(text):
        parts = match.group(0).split(".")
        for end in range(len(parts), 0, -1):
            if _module_file(".".join(parts[:end]), root) is not None:
                found.add(".".join(parts[:end]))
                break
    return found


def runtime_modules(bundle_dir: str | os.PathLike) -> list[str]:
    """The modules of :data:`VENDORED_PACKAGES` that a bundle runs: those its ``configs/*.json`` name, everything
    they import (at any depth, function-level imports included), and the packages that hold them (``metadata.json``
    is not read: its changelog names modules in prose). The tools that
    run outside a bundle (synthetic data, ensembles, this packager) and the benchmarks are not among them."""
    root = Path(__file__).resolve().parents[2]
    todo = set()
    for path in sorted((Path(bundle_dir) / "configs").glob("*.json")):
        if path.name == "metadata.json":  # its changelog names modules in prose
            continue
        todo |= _named_modules(path.read_text(encoding="utf-8"), root)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo |= {".".join(parts[:end]) for end in range(1, len(parts))} - seen  # the packages above it
        source = _module_file(name, root)
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):  # type: ignore[union-attr]
            if isinstance(node, ast.Import):
                todo |= _named_modules(" ".join(a.name for a in node.names), root) - seen
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = " ".join(f"{node.module}.{a.name}" for a in node.names)
                todo |= _named_modules(f"{node.module} {names}", root) - seen
    return sorted(seen)


def _package_files(bundle_dir: Path) -> Iterator[tuple[Path, str]]:
    root = Path(__file__).resolve().parents[2]
    for name in runtime_modules(bundle_dir):
        path = _module_file(name, root)
        yield path, f"scripts/{path.relative_to(root).as_posix()}"  # type: ignore[union-attr]


def _is_plain(value: Any) -> bool:
    """A literal config value (not a ``$`` expression, ``@`` reference, ``%`` macro or component)."""
    if isinstance(value, str):
        return not value.startswith(("$", "@", "%"))
    if isinstance(value, list):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float))


def apply_trained_settings(config: dict[str, Any], settings: Mapping[str, Any]) -> list[str]:
    """Make the trained values ``config``'s defaults, in place; return the ids changed (``network_width``,
    ``network_def#init_filters``, ``trained#defaults#roi_size`` ...).

    Changed: a top-level key named in ``settings`` that holds a plain value; the ``defaults`` of a top-level
    :class:`~brats_pipeline.bundle.settings.TrainedSettings` component (whatever its id);
    a plain argument of ``network_def`` that the trained ``network_def`` has. References, expressions and other
    components are left alone (they follow the keys they name).
    """
    changed: list[str] = []
    for key, value in config.items():
        if isinstance(value, Mapping):
            if value.get("_target_") == TRAINED_SETTINGS_TARGET and isinstance(value.get("defaults"), dict):
                defaults = value["defaults"]
                for name, default in defaults.items():
                    if name in settings and _is_plain(default) and default != settings[name]:
                        defaults[name] = settings[name]
                        changed.append(f"{key}#defaults#{name}")
            continue
        if key in settings and key != "network_def" and _is_plain(value) and value != settings[key]:
            config[key] = settings[key]
            changed.append(key)
    network, trained_network = config.get("network_def"), settings.get("network_def")
    if isinstance(network, dict) and isinstance(trained_network, Mapping):
        for arg, value in network.items():
            if arg.startswith("_") or arg not in trained_network or not _is_plain(value):
                continue
            if value != trained_network[arg]:
                network[arg] = trained_network[arg]
                changed.append(f"network_def#{arg}")
    return changed


def _packaged_configs(bundle_dir: Path, settings: Mapping[str, Any]) -> dict[str, str]:
    """``{"configs/x.json": new text}`` for the config files whose defaults the trained settings change."""
    texts: dict[str, str] = {}
    for path in sorted((bundle_dir / "configs").glob("*.json")):
        if path.name == "metadata.json":
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise BundlePackagingError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(config, dict):
            continue
        changed = apply_trained_settings(config, settings)
        if changed:
            texts[f"configs/{path.name}"] = json.dumps(config, indent=4) + "\n"
            logger.info("configs/%s: trained values for %s", path.name, ", ".join(changed))
    return texts


def _large_files_json(entries: list[dict[str, str]]) -> str:
    """The ``large_files.json`` that ``monai.bundle download_large_files`` reads (each item's keys other than
    ``path`` are passed to ``monai.apps.download_url``)."""
    return json.dumps({"large_files": entries}, indent=4) + "\n"


def package_bundle(
    bundle_dir: str | os.PathLike,
    output_dir: str | os.PathLike = "dist",
    weights: str | os.PathLike | None = None,
    weights_url: str | None = None,
    max_file_mb: float = MAX_FILE_MB,
    settings: str | os.PathLike | None = None,
    allow_no_weights: bool = False,
) -> Path:
    """Write ``<output_dir>/<name>_v<version>.zip`` for the bundle at ``bundle_dir``; return its path.

    Args:
        bundle_dir: a bundle folder (``bundles/espnet3d``): its configs, docs, LICENSE and ``models/`` travel.
        output_dir: where the zip is written (atomically: a half-written zip never carries the final name).
        weights: a checkpoint to ship as ``models/model.pt`` instead of the bundle's own (e.g. a training run's
            ``models/model.pt``); the ``model_settings.json`` and ``cases.json`` next to it travel with it (the
            bundle's own are then left out).
        weights_url: where a ``models/`` file bigger than ``max_file_mb`` can be downloaded; written to
            ``large_files.json`` with its SHA-256 so ``python -m monai.bundle download_large_files`` fetches and
            checks it. Required when such a file exists.
        max_file_mb: size limit for a file inside the zip (the Model Zoo's 25 MB).
        settings: the ``model_settings.json`` of the weights (default: the one next to them); its values become
            the packaged configs' defaults (:func:`apply_trained_settings`).
        allow_no_weights: package a bundle that has no weights (configs and code only) instead of refusing.

    Raises:
        BundlePackagingError: metadata without its version in the changelog, a missing required file, no weights
            (without ``allow_no_weights``), missing or unreadable weights/settings files, or a large weight file
            with no ``weights_url``.
    """
    bundle_dir = Path(bundle_dir).resolve()
    meta = bundle_metadata(bundle_dir)
    missing = missing_required_files(bundle_dir)
    if missing:
        raise BundlePackagingError(f"{bundle_dir}: missing required file(s) {missing}")
    name, version = meta["name"], meta["version"]

    members: list[tuple[Path, str]] = [
        (p, p.relative_to(bundle_dir).as_posix())
        for p in _bundle_files(bundle_dir)
        if p.name not in LARGE_FILES_NAMES and p.name != ".gitkeep"
    ]
    if weights is not None:
        weights = Path(weights).resolve()
        if not weights.is_file():
            raise BundlePackagingError(f"--weights {weights}: no such file")
        # the weights come with their own run's records; the bundle's (from another run) stay behind
        members = [(p, rel) for p, rel in members if rel not in (WEIGHTS, SETTINGS, CASE_RECORD)]
        members.append((weights, WEIGHTS))
        cases = weights.parent / Path(CASE_RECORD).name
        if cases.is_file():
            members.append((cases, CASE_RECORD))
        settings_file = weights.parent / SETTINGS_NAME
    else:
        settings_file = bundle_dir / SETTINGS
    has_weights = any(rel == WEIGHTS for _, rel in members)
    if not has_weights:
        members = [(p, rel) for p, rel in members if rel not in (SETTINGS, CASE_RECORD)]  # records of no weights
        if not allow_no_weights:
            raise BundlePackagingError(
                f"{bundle_dir}: no weights to package ({WEIGHTS} does not exist); train the bundle, pass --weights "
                "FILE, or pass --allow_no_weights True for a zip of configs and code only"
            )
    if settings is not None:
        settings_file = Path(settings).resolve()
        if not settings_file.is_file():
            raise BundlePackagingError(f"--settings {settings_file}: no such file")
    trained: dict[str, Any] | None = None
    if has_weights:
        members = [(p, rel) for p, rel in members if rel != SETTINGS]
        try:
            trained = read_model_settings(settings_file) if settings_file.is_file() else None
        except ModelSettingsError as err:
            raise BundlePackagingError(str(err)) from err
        if trained is not None:
            members.append((settings_file, SETTINGS))
        else:
            logger.warning(
                "warning: no %s next to the weights (%s): the packaged configs keep their defaults "
                "(network_width, include_rc, ...); a model trained with other values will not load from them",
                SETTINGS_NAME,
                settings_file.parent,
            )
    config_texts = _packaged_configs(bundle_dir, trained) if trained is not None else {}
    members.extend(_package_files(bundle_dir))

    large: list[dict[str, str]] = []
    shipped: list[tuple[Path, str]] = []
    for path, rel in members:
        size_mb = path.stat().st_size / 2**20
        if size_mb <= max_file_mb:
            shipped.append((path, rel))
            continue
        if not weights_url:
            raise BundlePackagingError(
                f"{path}: {size_mb:.1f} MB is over the {max_file_mb:g} MB a bundle zip may hold; upload it and pass "
                f"--weights_url URL (recorded in {LARGE_FILES_NAME} with its SHA-256)"
            )
        large.append({"path": rel, "url": weights_url, "hash_val": _sha256(path), "hash_type": "sha256"})

    target = Path(output_dir) / f"{name}_v{version}.zip"
    with atomic_write(target, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path, rel in shipped:
            if rel in config_texts:
                zf.writestr(f"{name}/{rel}", config_texts[rel])
            else:
                zf.write(path, f"{name}/{rel}")
        if large:
            zf.writestr(f"{name}/{LARGE_FILES_NAME}", _large_files_json(large))
    logger.info("wrote %s (%d files; %d in %s)", target, len(shipped), len(large), LARGE_FILES_NAME)
    if trained is not None:
        shown = {k: trained[k] for k in ("network_width", "include_rc", "roi_size", "label_convention") if k in trained}
        logger.info("trained settings packaged (%s): %s", SETTINGS, ", ".join(f"{k} {v}" for k, v in shown.items()))
    if not has_weights:
        logger.warning(
            "WARNING: %s HAS NO WEIGHTS (no %s): it holds configs and code only; put a trained model.pt into "
            "<bundle>/models/ after downloading, or package again with --weights",
            target,
            WEIGHTS,
        )
    return target


def main(
    bundle_dir: str,
    output_dir: str = "dist",
    weights: str | None = None,
    weights_url: str | None = None,
    max_file_mb: float = MAX_FILE_MB,
    settings: str | None = None,
    allow_no_weights: bool = False,
) -> str:
    """Command-line entry: the path of the written zip (python-fire prints it)."""
    if not isinstance(allow_no_weights, bool):  # python-fire reads "--allow_no_weights true" as the string 'true'
        raise BundlePackagingError(
            f"--allow_no_weights {allow_no_weights} is not a boolean; write --allow_no_weights True or "
            "--allow_no_weights False (python-fire turns only True/False into booleans)"
        )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = package_bundle(
        bundle_dir,
        output_dir,
        weights=weights,
        weights_url=weights_url,
        max_file_mb=max_file_mb,
        settings=settings,
        allow_no_weights=allow_no_weights,
    )
    return str(path)


def cli() -> None:
    """Console command ``brats-package`` (also ``python -m brats_pipeline.tools.packaging``): a bundle or argument
    that cannot be packaged ends with one ``error:`` line and status 1."""
    import fire

    try:
        fire.Fire(main)
    except BundlePackagingError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli()
