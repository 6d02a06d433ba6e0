"""NIfTI file names: which names are NIfTI files, and a name split into its stem and NIfTI suffix.

Every module that reads or writes NIfTI names goes through :func:`split_nifti_suffix`, so ``.nii.gz`` and ``.nii``
are recognised the same way everywhere, in any letter case (``BRATS_001.NII.GZ``), and a name such as
``x.nii.gz.tmp`` is never taken for a NIfTI file.
"""

from __future__ import annotations

import os

#: NIfTI suffixes, longest first (``.nii.gz`` must be tried before ``.nii``)
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")


def split_nifti_suffix(path: str | os.PathLike) -> tuple[str, str]:
    """``(stem, suffix)`` of the file name of ``path``; ``suffix`` keeps the name's letter case.

    ``BraTS2021_00001_t1ce.nii.gz`` -> ``("BraTS2021_00001_t1ce", ".nii.gz")``; ``BRATS_001.NII`` ->
    ``("BRATS_001", ".NII")``. A name that does not end in a NIfTI suffix (or is nothing but one, ``.nii.gz``)
    gives ``(name, "")``.
    """
    name = os.path.basename(os.fspath(path))
    low = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if low.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], name[-len(suffix) :]
    return name, ""


def is_nifti(path: str | os.PathLike) -> bool:
    """Whether the file name of ``path`` ends in ``.nii.gz`` or ``.nii`` (any letter case)."""
    return bool(split_nifti_suffix(path)[1])


__all__ = ["NIFTI_SUFFIXES", "is_nifti", "split_nifti_suffix"]
