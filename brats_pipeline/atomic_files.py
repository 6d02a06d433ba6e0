"""Finishing an atomic write: the temporary file gets the permissions a plain ``open(path, "w")`` would give.

Our writers write to ``tempfile.mkstemp`` files next to the target and :func:`os.replace` them into place, so a
reader never sees a half-written file. ``mkstemp`` creates files readable by their owner only (``0o600``); a
datalist, score table, figure or bundle zip shared with colleagues should not inherit that.
"""

from __future__ import annotations

import os


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Give ``tmp`` mode ``0o666 & ~umask`` and atomically rename it to ``path``."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
