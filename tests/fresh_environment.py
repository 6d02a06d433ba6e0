"""Run ``python -m MODULE ...`` (or ``-c CODE``) as in a fresh environment where this repository is neither
installed nor on ``sys.path``: only its requirements are importable.

Usage: ``python tests/fresh_environment.py REPO_DIR [--block NAME]... -m monai.bundle download ...`` or
``... REPO_DIR -c CODE``. The editable install's import hook and every ``sys.path`` entry under ``REPO_DIR`` are
removed first, and the run stops at once if ``brats_pipeline`` or ``custom_networks`` could still be imported.
Each ``--block NAME`` makes ``import NAME`` (and its submodules) fail with ``ModuleNotFoundError``, as where that
package is not installed: a package this machine happens to have but the requirements do not declare (PyYAML).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import runpy
import sys


class BlockedModules(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` finder, first in line, that refuses the named top-level packages."""

    def __init__(self, names: list[str]):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by {__file__})", name=fullname)
        return None


def isolate(repo: str, blocked: list[str] | None = None) -> None:
    """Drop what makes this repository importable (the setuptools editable finder, paths under ``repo``) and make
    the ``blocked`` packages unimportable."""
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
    # a virtual environment inside the repository (.venv, as the README suggests) is the interpreter's, not the repo's
    own = (sys.prefix, sys.exec_prefix)
    sys.path[:] = [p for p in sys.path if p and (not p.startswith(repo) or p.startswith(own))]
    sys.path_importer_cache.clear()
    if blocked:
        for name in [m for m in sys.modules if m.split(".")[0] in blocked]:
            del sys.modules[name]
        sys.meta_path.insert(0, BlockedModules(blocked))
    for name in ("brats_pipeline", "custom_networks"):
        if importlib.util.find_spec(name) is not None:
            raise SystemExit(f"{name} is still importable: this is not a fresh environment")


if __name__ == "__main__":
    repo, rest = sys.argv[1], sys.argv[2:]
    blocked = []
    while rest[:1] == ["--block"] and len(rest) > 1:
        blocked.append(rest[1])
        rest = rest[2:]
    isolate(repo, blocked)
    mode, rest = (rest[0], rest[1:]) if rest else ("", [])
    if mode == "-c":
        sys.argv = ["-c"]
        exec(compile(rest[0], "<fresh-environment>", "exec"), {"__name__": "__main__"})
    elif mode == "-m":
        sys.argv = [rest[0], *rest[1:]]
        runpy.run_module(rest[0], run_name="__main__", alter_sys=True)
    else:
        raise SystemExit(f"usage: {sys.argv[0]} REPO_DIR [--block NAME]... (-m MODULE ARGS... | -c CODE)")
