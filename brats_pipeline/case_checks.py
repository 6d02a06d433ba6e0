"""Checks of one BraTS case's files, with errors that name the case, the file and the reason.

Two depths:

* header checks (cheap, used when scanning a whole dataset): the file exists, is a non-empty NIfTI whose header
  reads, its data is complete (for ``.nii.gz`` the gzip trailer's length is compared with what the header
  declares; only when it disagrees is the stream decompressed to tell truncation from trailing bytes), it has
  the expected number of dimensions, and all files of the case agree in shape and affine;
* data checks (``check_data=True``, for a per-case pre-screen before inference): the arrays are loaded and
  NaN/Inf voxels, all-zero images and label values outside the declared convention are reported.

A case the datalist builder could not even assemble (a missing or doubled modality, a folder that does not follow
the layout) can travel as a datalist entry that carries its error under :data:`CASE_ERROR_KEY`
(:meth:`CaseError.as_entry`); :func:`check_case` raises that error again, so screening reports it like any other
bad case. Training instead stops on all bad cases at once with :class:`BadCasesError`.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from brats_pipeline.labels import LabelConventionError, check_label_values
from brats_pipeline.layouts import CHANNELS, entry_case_id
from brats_pipeline.nifti_paths import is_nifti

#: tolerance (mm) when comparing the affines of one case's files
AFFINE_ATOL = 1e-3
#: key of a datalist entry that stands for an unusable case: ``{"file": path, "reason": text}``
CASE_ERROR_KEY = "case_error"
_GZIP_CHUNK = 1 << 22


class DatasetError(ValueError):
    """A dataset folder cannot be turned into a datalist (empty, unrecognised, mixed layouts, ...)."""


class CaseError(DatasetError):
    """One case is unusable; the message names the case, the file and the reason."""

    def __init__(self, case_id: str, path: str | os.PathLike, reason: str):
        self.case_id = case_id
        self.path = str(path)
        self.reason = reason
        super().__init__(f"case {case_id!r}: {self.path}: {reason}")

    def as_entry(self, **fields) -> dict:
        """A datalist entry standing for this bad case: ``{"case_id", **fields, CASE_ERROR_KEY: {"file", "reason"}}``."""
        return {"case_id": self.case_id, **fields, CASE_ERROR_KEY: {"file": self.path, "reason": self.reason}}

    @classmethod
    def from_entry(cls, entry: Mapping) -> CaseError | None:
        """The error an entry made by :meth:`as_entry` carries, else None."""
        error = entry.get(CASE_ERROR_KEY)
        if not error:
            return None
        return cls(entry_case_id(entry), error.get("file") or "?", error.get("reason") or "unusable case")


class BadCasesError(DatasetError):
    """Several cases of a dataset are unusable; ``errors`` holds one :class:`CaseError` per case, and the message
    lists every one of them (case, file, reason)."""

    def __init__(self, errors: Sequence[CaseError], where: str | os.PathLike):
        self.errors = list(errors)
        lines = [f"  - {e}" for e in self.errors]
        super().__init__("\n".join([f"{len(self.errors)} unusable cases in {where}; fix or remove them:", *lines]))


@dataclass(frozen=True)
class NiftiInfo:
    """What the header of a NIfTI file says."""

    path: str
    shape: tuple[int, ...]
    affine: np.ndarray
    dtype: np.dtype


def _gzip_length(path: Path, case_id: str) -> int:
    """Decompressed length of a gzip file, reading the whole stream (CRC-checked by :mod:`gzip`)."""
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(_GZIP_CHUNK):
                total += len(chunk)
    except EOFError:
        raise CaseError(case_id, path, "truncated file: the gzip stream ends before its end marker") from None
    except (OSError, zlib.error) as e:
        raise CaseError(case_id, path, f"corrupt gzip data ({e})") from None
    return total


def inspect_nifti(path: str | os.PathLike, case_id: str = "?") -> NiftiInfo:
    """Header-level checks of one file; raises :class:`CaseError` when it is missing, empty, not a readable
    NIfTI, or its data is shorter than the header declares (truncated download or copy)."""
    p = Path(path)
    if not is_nifti(p):
        raise CaseError(case_id, p, "not a NIfTI file (expected .nii or .nii.gz)")
    if not p.exists():
        raise CaseError(case_id, p, "file does not exist")
    if not p.is_file():
        raise CaseError(case_id, p, "not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise CaseError(case_id, p, "empty file (0 bytes)")
    try:
        img = nib.load(p)
        shape = tuple(int(s) for s in img.shape)
        dtype = img.get_data_dtype()
        affine = np.asarray(img.affine, dtype=np.float64)
        offset = int(img.dataobj.offset)
    except Exception as e:  # nibabel raises a zoo of types for garbage input
        raise CaseError(case_id, p, f"not a readable NIfTI file ({type(e).__name__}: {e})") from None
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if str(p).lower().endswith(".gz"):
        # gzip trailer: CRC32 then ISIZE, the decompressed length modulo 2**32
        with open(p, "rb") as f:
            f.seek(-4, os.SEEK_END)
            isize = int.from_bytes(f.read(4), "little")
        if isize != expected % 2**32:
            # not the length we expect: either truncated or a stream with trailing bytes / several members
            total = _gzip_length(p, case_id)
            if total < expected:
                raise CaseError(case_id, p, f"truncated file: {total} bytes of data, the header declares {expected}")
    elif size < expected:
        raise CaseError(case_id, p, f"truncated file: {size} bytes, the header declares {expected}")
    return NiftiInfo(str(p), shape, affine, dtype)


def _check_dims(info: NiftiInfo, case_id: str, channels: int | None) -> None:
    """3-D volume expected when ``channels`` is None, else 4-D with ``channels`` in the last axis (MSD)."""
    ndim = len(info.shape)
    if channels is None:
        if ndim != 3:
            raise CaseError(case_id, info.path, f"{ndim}-D image of shape {info.shape} where a 3-D volume is expected")
        return
    if ndim != 4 or info.shape[3] != channels:
        raise CaseError(
            case_id,
            info.path,
            f"image of shape {info.shape} where a 4-D image with {channels} channels last is expected",
        )


def _odd_one_out(
    infos: Sequence[NiftiInfo], same: Callable[[NiftiInfo, NiftiInfo], bool]
) -> tuple[NiftiInfo, NiftiInfo, list[NiftiInfo]] | None:
    """``(odd, reference, agreeing)`` when the files do not all agree, else None.

    The reference is the file most others agree with (the first on a tie); the odd one out is the first file that
    disagrees with it, so a differing T1c is named rather than blaming the three files that agree with each other.
    """
    agree = [sum(same(a, b) for b in infos) for a in infos]
    ref = infos[agree.index(max(agree))]
    odd = [info for info in infos if not same(info, ref)]
    if not odd:
        return None
    return odd[0], ref, [info for info in infos if same(info, ref)]


def _names(infos: Sequence[NiftiInfo]) -> str:
    return ", ".join(Path(info.path).name for info in infos)


def _check_same_grid(infos: Sequence[NiftiInfo], case_id: str) -> None:
    """All files of a case share shape and affine; the error names the file that differs from the majority."""
    found = _odd_one_out(infos, lambda a, b: a.shape[:3] == b.shape[:3])
    if found is not None:
        odd, ref, agreeing = found
        raise CaseError(
            case_id,
            odd.path,
            f"shape {odd.shape[:3]} differs from {ref.shape[:3]} of {_names(agreeing)} in the same case",
        )
    found = _odd_one_out(infos, lambda a, b: np.allclose(a.affine, b.affine, rtol=0.0, atol=AFFINE_ATOL))
    if found is not None:
        odd, ref, agreeing = found
        raise CaseError(
            case_id,
            odd.path,
            f"affine differs from that of {_names(agreeing)} in the same case "
            f"(max difference {np.abs(odd.affine - ref.affine).max():.4g}); the modalities are not co-registered",
        )


def _load(path: str, case_id: str) -> np.ndarray:
    try:
        return np.asanyarray(nib.load(path).dataobj)
    except Exception as e:
        raise CaseError(case_id, path, f"cannot read the image data ({type(e).__name__}: {e})") from None


def _check_values(data: np.ndarray, path: str, case_id: str, channel_names: Sequence[str] | None = None) -> None:
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            raise CaseError(case_id, path, f"{int(bad.sum())} NaN/Inf voxels")
    if channel_names is None:
        if not data.any():
            raise CaseError(case_id, path, "image is all zero")
        return
    for c, name in enumerate(channel_names):
        if not data[..., c].any():
            raise CaseError(case_id, path, f"channel {c} ({name}) is all zero")


def check_case(entry: Mapping, check_data: bool = True) -> None:
    """Check one datalist entry; raise :class:`CaseError` naming the case, the file and the reason.

    Args:
        entry: ``{"image": [4 paths] | 4-D path, "label"?: path, "case_id"?: str, "channel_order"?: [int],
            "label_convention"?: str}`` as produced by :func:`brats_pipeline.datalist.find_cases`; a 4-D image
            (MSD) has its channels in the last axis. An entry carrying :data:`CASE_ERROR_KEY` raises that error.
        check_data: also load the arrays: reject NaN/Inf voxels and all-zero images (or channels), and label
            values outside ``label_convention`` when the entry names one.
    """
    error = CaseError.from_entry(entry)
    if error is not None:
        raise error
    case_id = entry_case_id(entry)
    image = entry.get("image")
    if not image:
        raise CaseError(case_id, "<no image>", "the entry lists no image file")
    if isinstance(image, (str, os.PathLike)):
        channels = len(entry.get("channel_order") or CHANNELS)
        infos = [inspect_nifti(image, case_id)]
        _check_dims(infos[0], case_id, channels)
    else:
        if len(image) != len(CHANNELS):
            raise CaseError(
                case_id, image[0], f"{len(image)} image files listed, expected {len(CHANNELS)} ({', '.join(CHANNELS)})"
            )
        infos = [inspect_nifti(p, case_id) for p in image]
        for info in infos:
            _check_dims(info, case_id, None)
    label = entry.get("label")
    if label:
        label_info = inspect_nifti(label, case_id)
        _check_dims(label_info, case_id, None)
        infos.append(label_info)
    _check_same_grid(infos, case_id)
    if not check_data:
        return
    if isinstance(image, (str, os.PathLike)):
        order = entry.get("channel_order")
        names = [CHANNELS[list(order).index(c)] if order else str(c) for c in range(infos[0].shape[3])]
        _check_values(_load(str(image), case_id), str(image), case_id, names)
    else:
        for path in image:
            _check_values(_load(str(path), case_id), str(path), case_id)
    if label:
        data = _load(str(label), case_id)
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise CaseError(case_id, label, f"{int((~np.isfinite(data)).sum())} NaN/Inf voxels in the label")
        if entry.get("label_convention"):
            try:
                check_label_values(data, entry["label_convention"], source=str(label))
            except LabelConventionError as e:
                raise CaseError(case_id, label, str(e).split(": ", 1)[-1]) from None


__all__ = [
    "AFFINE_ATOL",
    "CASE_ERROR_KEY",
    "BadCasesError",
    "CaseError",
    "DatasetError",
    "NiftiInfo",
    "check_case",
    "inspect_nifti",
]
