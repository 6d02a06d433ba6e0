"""Package a bundle of this repository as a self-contained ``<name>_v<version>.zip`` (the Model Zoo's naming).

The zip unpacks into one ``<name>/`` folder, which is what ``python -m monai.bundle download --url file:///...``
expects::

    <name>/configs/      metadata.json, train.json, inference.json, evaluate.json, multi_gpu_train.json, logging.conf
    <name>/docs/         README.md (model card), data_license.txt
    <name>/models/       model.pt when it is at most ``max_file_mb``; bigger files are listed in large_files.json
    <name>/scripts/      brats_pipeline/ and custom_networks/, copied from this repository
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

Command line::

    python -m brats_pipeline.bundle_packaging bundles/espnet3d --output_dir dist
    python -m brats_pipeline.bundle_packaging bundles/segresnet_vae --weights_url https://host/segresnet_vae/model.pt
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

from brats_pipeline.atomic_files import atomic_write

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
#: our packages that the configs name by ``_target_``; copied under ``scripts/``
VENDORED_PACKAGES = ("brats_pipeline", "custom_networks")
#: folders of a working bundle that never travel (training outputs, logs)
SKIPPED_FOLDERS = ("eval", "logs", "runs", "__pycache__")
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
        if path.is_file() and not any(part in SKIPPED_FOLDERS or part.startswith(".") for part in rel.parts):
            yield path


def _package_files(package: str) -> Iterator[tuple[Path, str]]:
    module = __import__(package)
    root = Path(module.__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" not in path.parts:
            yield path, f"scripts/{package}/{path.relative_to(root).as_posix()}"


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
) -> Path:
    """Write ``<output_dir>/<name>_v<version>.zip`` for the bundle at ``bundle_dir``; return its path.

    Args:
        bundle_dir: a bundle folder (``bundles/espnet3d``): its configs, docs, LICENSE and ``models/`` travel.
        output_dir: where the zip is written (atomically: a half-written zip never carries the final name).
        weights: a checkpoint to ship as ``models/model.pt`` instead of the bundle's own (e.g. a training run's).
        weights_url: where a ``models/`` file bigger than ``max_file_mb`` can be downloaded; written to
            ``large_files.json`` with its SHA-256 so ``python -m monai.bundle download_large_files`` fetches and
            checks it. Required when such a file exists.
        max_file_mb: size limit for a file inside the zip (the Model Zoo's 25 MB).

    Raises:
        BundlePackagingError: metadata without its version in the changelog, a missing required file, or a
            large weight file with no ``weights_url``.
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
        members = [(p, rel) for p, rel in members if rel != "models/model.pt"]
        members.append((Path(weights).resolve(), "models/model.pt"))
    for package in VENDORED_PACKAGES:
        members.extend(_package_files(package))

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
            zf.write(path, f"{name}/{rel}")
        if large:
            zf.writestr(f"{name}/{LARGE_FILES_NAME}", _large_files_json(large))
    logger.info("wrote %s (%d files; %d in %s)", target, len(shipped), len(large), LARGE_FILES_NAME)
    return target


def main(
    bundle_dir: str,
    output_dir: str = "dist",
    weights: str | None = None,
    weights_url: str | None = None,
    max_file_mb: float = MAX_FILE_MB,
) -> str:
    """Command-line entry: the path of the written zip (python-fire prints it)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = package_bundle(bundle_dir, output_dir, weights=weights, weights_url=weights_url, max_file_mb=max_file_mb)
    return str(path)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
