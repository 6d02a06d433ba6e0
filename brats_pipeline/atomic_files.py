"""Atomic file writes: a reader sees the old file or the complete new one, never a partial one.

Every file this project writes (datalists, NIfTI outputs, checkpoints, bundle zips, failure summaries, synthetic
cases) goes through :func:`atomic_write`::

    with atomic_write("out/datalist.json", "w") as f:
        json.dump(obj, f)

The bytes go to a hidden temporary file next to the target (``.<name>.<random>.tmp``, so it never matches a
``*.nii.gz`` or ``*.pt`` pattern), are flushed and ``fsync``\\ ed, and only then take the final name with one
rename (:func:`publish`), after which the folder is ``fsync``\\ ed too: the result survives a killed process and a
power cut. On an error the temporary file is removed and an existing target is left untouched; a hard kill can
leave the hidden temporary file behind. The file gets the permissions a plain ``open(path, "w")`` would give
(``0o666 & ~umask``), not ``mkstemp``'s owner-only ``0o600``: datalists, score tables and bundle zips are shared.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename in it) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp: str | os.PathLike, path: str | os.PathLike, overwrite: bool = True) -> None:
    """Give ``tmp`` mode ``0o666 & ~umask`` and atomically rename it to ``path``.

    Args:
        tmp: the finished temporary file, in the same folder (file system) as ``path``.
        path: the final name.
        overwrite: replace an existing ``path``; otherwise raise :class:`FileExistsError` and leave both files as
            they are (atomically where the file system has hard links: a concurrent writer cannot be clobbered).
    """
    os.chmod(tmp, 0o666 & ~_umask())
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails with FileExistsError if another writer got there first
    except FileExistsError:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)") from None
    except OSError:  # no hard links on this file system: check, then rename
        if os.path.exists(path):
            raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)") from None
        os.replace(tmp, path)
    else:
        os.unlink(tmp)


@contextmanager
def atomic_write(
    path: str | os.PathLike,
    mode: str = "wb",
    overwrite: bool = True,
    fsync: bool = True,
    encoding: str | None = None,
    newline: str | None = None,
) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; on success it becomes ``path`` (see the module docstring).

    Args:
        path: the file to write; its folder is created if missing.
        mode: ``"wb"`` or ``"w"`` (text, with ``encoding``, default UTF-8, and ``newline`` as for :func:`open`).
        overwrite: replace an existing ``path``; otherwise :class:`FileExistsError` is raised, on entry when
            ``path`` already exists and at the end if another writer created it meanwhile.
        fsync: flush file and folder to disk (survives a power cut, not only a killed process).

    Yields:
        the open temporary file; do not close it.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes a new file: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode == "w":
            f = os.fdopen(fd, "w", encoding=encoding or "utf-8", newline=newline)
        else:
            f = os.fdopen(fd, "wb")
        with f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        publish(tmp, path, overwrite=overwrite)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def write_text_atomic(
    text: str, path: str | os.PathLike, encoding: str = "utf-8", newline: str | None = None, fsync: bool = True
) -> Path:
    """Write ``text`` to ``path`` with :func:`atomic_write` (``newline=""`` keeps ``"\\r\\n"`` of CSV text as is)."""
    with atomic_write(path, "w", encoding=encoding, newline=newline, fsync=fsync) as f:
        f.write(text)
    return Path(path)


def write_json_atomic(obj: object, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented UTF-8 JSON with a final newline to ``path`` with :func:`atomic_write`."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return Path(path)


__all__ = ["atomic_write", "fsync_dir", "publish", "write_json_atomic", "write_text_atomic"]
