"""Building a bundle's config as a MONAI ``ConfigWorkflow`` from Python, the way ``python -m monai.bundle run`` does.

Benchmarks, tests and notebooks use :func:`bundle_workflow` to run a shipped config with overrides (sizes, folders)
without rebuilding its wiring.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from monai.bundle import ConfigWorkflow

__all__ = ["BUNDLES_DIR", "bundle_workflow", "config_at_revision"]

#: the bundles of this repository
BUNDLES_DIR = Path(__file__).resolve().parents[2] / "bundles"


def bundle_workflow(
    bundle: str | os.PathLike,
    config: str | os.PathLike = "train.json",
    *extra_configs: str | os.PathLike,
    workflow_type: str | None = None,
    initialize: bool = True,
    **overrides: Any,
) -> ConfigWorkflow:
    """An (initialised) ``ConfigWorkflow`` of ``<bundle>/configs/<config>`` merged with ``extra_configs`` and ``overrides``.

    Args:
        bundle: a bundle folder, or the name of one under :data:`BUNDLES_DIR` (``segresnet_vae``, ``espnet3d``).
        config: file name in the bundle's ``configs/`` (or a path).
        extra_configs: files merged after it, in order (names in the bundle's ``configs/``, or paths).
        workflow_type: ``"train"`` for ``train.json`` and ``multi_gpu_train.json``, else ``"inference"`` (default
            from the file name).
        initialize: call ``initialize()`` (``set_determinism``, ``bundle_code``, ...).
        overrides: config ids and values, as ``--key value`` on the command line (``bundle_root``, ``dataset_dir``,
            ``network_width`` ...); ``logging_file`` defaults to ``False``.
    """
    folder = Path(bundle) if Path(bundle).is_dir() else BUNDLES_DIR / str(bundle)

    def locate(name: str | os.PathLike) -> Path:
        return Path(name) if Path(name).is_file() else folder / "configs" / str(name)

    path = locate(config)
    if workflow_type is None:
        workflow_type = "train" if path.name.endswith("train.json") else "inference"
    overrides.setdefault("logging_file", False)
    workflow = ConfigWorkflow(
        config_file=[str(path), *(str(locate(c)) for c in extra_configs)] if extra_configs else str(path),
        meta_file=str(folder / "configs" / "metadata.json"),
        workflow_type=workflow_type,
        **overrides,
    )
    if initialize:
        workflow.initialize()
    return workflow


def config_at_revision(bundle: str, config: str, revision: str, folder: str | os.PathLike) -> Path:
    """``bundles/<bundle>/configs/<config>`` as it was at git ``revision`` of this repository, written into
    ``folder`` (created); the benchmarks run it side by side with today's file."""
    path = Path(folder) / config
    path.parent.mkdir(parents=True, exist_ok=True)
    text = subprocess.run(
        ["git", "show", f"{revision}:bundles/{bundle}/configs/{config}"],
        cwd=BUNDLES_DIR.parent,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path.write_text(text)
    return path
