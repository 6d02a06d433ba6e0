"""Atomic writes: complete file or none, open()'s permissions, no temporary file left, no clobbering."""

from __future__ import annotations

import json
import os
import stat

import pytest

from brats_pipeline.atomic_files import atomic_write, write_json_atomic, write_text_atomic


def _mode_of_open() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def test_writes_with_open_permissions_and_no_leftover(tmp_path):
    target = tmp_path / "sub" / "a.bin"
    with atomic_write(target, "wb") as f:  # the missing folder is created
        f.write(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert stat.S_IMODE(target.stat().st_mode) == _mode_of_open()  # not mkstemp's 0600
    assert write_text_atomic("a,b\r\n", tmp_path / "t.csv", newline="") == tmp_path / "t.csv"
    assert (tmp_path / "t.csv").read_bytes() == b"a,b\r\n"
    write_json_atomic({"ü": [1]}, tmp_path / "j.json")
    assert json.loads((tmp_path / "j.json").read_text(encoding="utf-8")) == {"ü": [1]}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.bin", "j.json", "sub", "t.csv"]


def test_error_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    target = tmp_path / "d.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(target, "w") as f:
            f.write("partial")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["d.json"]


def test_no_overwrite(tmp_path):
    target = tmp_path / "x.nii.gz"
    with atomic_write(target, "wb", overwrite=False) as f:
        f.write(b"first")
    with pytest.raises(FileExistsError, match="exists"):  # refused on entry: the target exists
        with atomic_write(target, "wb", overwrite=False) as f:
            f.write(b"second")
    with pytest.raises(FileExistsError):  # another writer publishes while this one writes
        with atomic_write(target.with_name("y.nii.gz"), "wb", overwrite=False) as f:
            target.with_name("y.nii.gz").write_bytes(b"theirs")
            f.write(b"mine")
    assert target.read_bytes() == b"first" and target.with_name("y.nii.gz").read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.nii.gz", "y.nii.gz"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(target, "a"):
            pass


def test_temporary_name_is_hidden_and_never_a_nifti_name(tmp_path):
    with atomic_write(tmp_path / "c.nii.gz", "wb") as f:
        (name,) = [p.name for p in tmp_path.iterdir()]
        assert name.startswith(".c.nii.gz.") and name.endswith(".tmp")
        f.write(b"x")
