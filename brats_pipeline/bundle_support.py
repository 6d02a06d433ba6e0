"""Small pieces the bundle configs call that MONAI's bundle runner does not provide.

``python -m monai.bundle run --config_file bundles/x/configs/train.json`` treats ``bundle_root`` as an ordinary
config key: with the Model Zoo's ``"."`` and another working directory, checkpoints land in the working
directory. :func:`derive_bundle_root` recovers the bundle folder from the command line instead, so the same
command works from the repository root and from inside the bundle.
"""

from __future__ import annotations

import ast
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def _config_files_from_argv(argv: Sequence[str]) -> list[str]:
    for i, arg in enumerate(argv):
        value = None
        if arg == "--config_file" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config_file="):
            value = arg.split("=", 1)[1]
        if value is None:
            continue
        value = value.strip()
        if value.startswith("["):
            try:
                return [str(v) for v in ast.literal_eval(value)]
            except (ValueError, SyntaxError):
                return []
        return [value]
    return []


def bundle_root_of(config_file: str | os.PathLike) -> str:
    """Bundle folder of a config file: the parent of its ``configs/`` folder, else the file's own folder."""
    parent = Path(config_file).resolve().parent
    return str(parent.parent if parent.name == "configs" else parent)


def derive_bundle_root(default: str = ".", argv: Sequence[str] | None = None) -> str:
    """The bundle folder of the first ``--config_file`` on the command line, or ``default``.

    Args:
        default: returned when no config file is named on the command line (e.g. ``monai.bundle.load`` or
            ``ConfigWorkflow`` used from Python, where callers pass ``bundle_root`` themselves).
        argv: command line to inspect; ``sys.argv`` when omitted.
    """
    files = _config_files_from_argv(sys.argv if argv is None else argv)
    if files and Path(files[0]).is_file():
        return bundle_root_of(files[0])
    return default


def report_metrics(engine, title: str = "Dice per region", prefix: str = "") -> dict[str, float]:
    """Print the metrics an Ignite engine computed (``engine.state.metrics``) as a small table and return them.

    Args:
        engine: an evaluator after ``run()``.
        title: heading of the table.
        prefix: only metrics whose name starts with it are shown (all when empty).
    """
    metrics = {k: float(v) for k, v in engine.state.metrics.items() if k.startswith(prefix) and _is_number(v)}
    width = max((len(k) for k in metrics), default=10)
    lines = [title, "-" * (width + 10)] + [f"{k:<{width}}  {v:.4f}" for k, v in sorted(metrics.items())]
    print("\n".join(lines), flush=True)
    return metrics


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
