"""Run ``python -m MODULE ...`` (or ``-c CODE``) as in a fresh environment where this repository is neither
installed nor on ``sys.path``: only its requirements are importable.

Usage: ``python tests/fresh_environment.py REPO_DIR -m monai.bundle download ...`` or ``... REPO_DIR -c CODE``.
The editable install's import hook and every ``sys.path`` entry under ``REPO_DIR`` are removed first, and the run
stops at once if ``brats_pipeline`` or ``custom_networks`` could still be imported.
"""

from __future__ import annotations

import importlib.util
import runpy
import sys


def isolate(repo: str) -> None:
    """Drop what makes this repository importable (the setuptools editable finder, paths under ``repo``)."""
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
    sys.path[:] = [p for p in sys.path if p and not p.startswith(repo)]
    sys.path_importer_cache.clear()
    for name in ("brats_pipeline", "custom_networks"):
        if importlib.util.find_spec(name) is not None:
            raise SystemExit(f"{name} is still importable: this is not a fresh environment")


if __name__ == "__main__":
    isolate(sys.argv[1])
    mode, rest = sys.argv[2], sys.argv[3:]
    if mode == "-c":
        sys.argv = ["-c"]
        exec(compile(rest[0], "<fresh-environment>", "exec"), {"__name__": "__main__"})
    elif mode == "-m":
        sys.argv = [rest[0], *rest[1:]]
        runpy.run_module(rest[0], run_name="__main__", alter_sys=True)
    else:
        raise SystemExit(f"usage: {sys.argv[0]} REPO_DIR (-m MODULE ARGS... | -c CODE)")
