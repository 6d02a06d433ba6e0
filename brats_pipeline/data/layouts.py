"""The folder layouts in which the BraTS releases (and MSD Task01) ship, and the project's channel order.

Every layout is described by a :class:`BratsLayout`: how a case folder is named, how each modality file
inside it is named, and which suffix holds the label. The datalist builder recognises a layout from the
folder names alone; the synthetic generator writes cases with the same definitions, so the two can never
drift apart.

Channel order: whatever the layout, images are stacked as ``CHANNELS = ("t1c", "t1", "t2", "flair")``
(the order of the Model Zoo's ``brats_mri_segmentation`` bundle).

Case ids: :func:`case_id_from_path` is the one rule that turns a file path into a case id, whatever the layout
(see its docstring); :func:`entry_case_id` applies it to a datalist entry that has no ``case_id``.

NIfTI names: every module that reads or writes NIfTI names goes through :func:`split_nifti_suffix`, so ``.nii.gz``
and ``.nii`` are recognised the same way everywhere, in any letter case (``BRATS_001.NII.GZ``), and a name such as
``x.nii.gz.tmp`` is never taken for a NIfTI file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

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


#: the project's fixed channel order (canonical modality names)
CHANNELS: tuple[str, ...] = ("t1c", "t1", "t2", "flair")

#: human-readable names, for metadata and model cards
CHANNEL_DESCRIPTIONS: dict[str, str] = {
    "t1c": "T1-weighted, contrast enhanced (T1c / T1ce / T1Gd)",
    "t1": "T1-weighted, native (T1 / T1n)",
    "t2": "T2-weighted (T2 / T2w)",
    "flair": "T2-FLAIR (FLAIR / T2f)",
}


@dataclass(frozen=True)
class BratsLayout:
    """One release's naming scheme.

    Args:
        name: layout id (``brats2018``, ``brats2020``, ``brats2021``, ``brats2023``, ``msd``).
        case_pattern: regular expression a case folder name must match in full.
        suffixes: canonical modality -> file suffix in this release (``"t1c" -> "t1ce"``).
        separator: between the case id and the suffix (``_`` up to 2021, ``-`` from 2023).
        label_convention: default label convention of the release (see :mod:`brats_pipeline.transforms.labels`).
        parent_dirs: optional grade folders that hold the cases (``HGG``, ``LGG`` in 2018/2019).
    """

    name: str
    case_pattern: str
    suffixes: dict[str, str]
    separator: str = "_"
    label_suffix: str = "seg"
    label_convention: str = "brats2018"
    parent_dirs: tuple[str, ...] = field(default_factory=tuple)

    def matches(self, case_name: str) -> bool:
        return re.fullmatch(self.case_pattern, case_name) is not None

    def filename(self, case_name: str, modality: str) -> str:
        """File name of ``modality`` (canonical name or ``"seg"``) in case ``case_name``."""
        suffix = self.label_suffix if modality == "seg" else self.suffixes[modality]
        return f"{case_name}{self.separator}{suffix}.nii.gz"


_LEGACY_SUFFIXES = {"t1c": "t1ce", "t1": "t1", "t2": "t2", "flair": "flair"}

LAYOUTS: dict[str, BratsLayout] = {
    "brats2018": BratsLayout(
        name="brats2018",  # also BraTS 2019 (BraTS19_...)
        case_pattern=r"Bra[Tt]s1[89]_.+|BraTS19_.+",
        suffixes=_LEGACY_SUFFIXES,
        parent_dirs=("HGG", "LGG"),
    ),
    "brats2020": BratsLayout(
        name="brats2020",
        case_pattern=r"BraTS20_(Training|Validation|Testing)_\d+",
        suffixes=_LEGACY_SUFFIXES,
    ),
    "brats2021": BratsLayout(
        name="brats2021",
        case_pattern=r"BraTS2021_\d+",
        suffixes=_LEGACY_SUFFIXES,
    ),
    "brats2023": BratsLayout(
        name="brats2023",
        # GLI, MEN, MET, PED, SSA, ... sub-challenges share the scheme
        case_pattern=r"BraTS-[A-Z]+-\d+-\d+",
        suffixes={"t1c": "t1c", "t1": "t1n", "t2": "t2w", "flair": "t2f"},
        separator="-",
        label_convention="brats2023",
    ),
}

#: Medical Segmentation Decathlon Task01_BrainTumour: one 4-D image per case, channels in this order
MSD_CHANNELS: tuple[str, ...] = ("flair", "t1", "t1c", "t2")
MSD_CASE_PATTERN = r"BRATS_\d+"
MSD_LABEL_CONVENTION = "msd"

#: every modality or label suffix of any layout, plus the canonical names; stripped from file names by
#: :func:`case_id_from_path`. Case ids of every layout end in a digit, so stripping never eats into one.
MODALITY_SUFFIXES: tuple[str, ...] = tuple(
    sorted(
        {*CHANNELS, *(s for layout in LAYOUTS.values() for s in (*layout.suffixes.values(), layout.label_suffix))},
        key=lambda s: (-len(s), s),
    )
)
_MODALITY_TAIL = re.compile(rf"(?P<case>.+)[-_](?:{'|'.join(map(re.escape, MODALITY_SUFFIXES))})", re.IGNORECASE)


def layout_of_case(case_name: str) -> BratsLayout | None:
    """The layout whose case-folder naming ``case_name`` follows, or None."""
    for layout in LAYOUTS.values():
        if layout.matches(case_name):
            return layout
    return None


def case_id_from_path(path: str | os.PathLike) -> str:
    """The case id of an image or label file, for every layout.

    * A file inside a case folder named by a BraTS layout belongs to that case, whatever the file is called:
      ``BraTS-GLI-00001-000/BraTS-GLI-00001-000-t1c.nii.gz`` -> ``BraTS-GLI-00001-000``,
      ``BraTS20_Training_355/W39_1998.09.19_Segm.nii`` -> ``BraTS20_Training_355``.
    * Otherwise the file name without its NIfTI suffix (any other extension for other formats) and without
      trailing modality or label suffixes (``_t1ce``, ``-t2f``, ``_seg``, ... of :data:`MODALITY_SUFFIXES`):
      ``BraTS2021_00001_t1ce.nii.gz`` -> ``BraTS2021_00001``, MSD ``imagesTr/BRATS_001.nii.gz`` -> ``BRATS_001``,
      a prediction ``BraTS-GLI-00001-000.nii.gz`` -> itself, MONAI ``SaveImage``'s
      ``BraTS-GLI-00001-000-t1c_seg.nii.gz`` -> ``BraTS-GLI-00001-000``.
    """
    p = Path(path)
    if layout_of_case(p.parent.name) is not None:
        return p.parent.name
    stem, suffix = split_nifti_suffix(p)
    if not suffix:
        stem = os.path.splitext(p.name)[0] or p.name
    while (m := _MODALITY_TAIL.fullmatch(stem)) is not None:
        stem = m.group("case")
    return stem


def entry_case_id(entry: Mapping, key: str = "case_id") -> str:
    """``entry[key]`` when set, else :func:`case_id_from_path` of the entry's (first) image file, else ``"?"``."""
    if entry.get(key):
        return str(entry[key])
    image = entry.get("image")
    first = image if isinstance(image, (str, os.PathLike)) else (image[0] if image else None)
    return case_id_from_path(first) if first else "?"


__all__ = [
    "CHANNELS",
    "CHANNEL_DESCRIPTIONS",
    "LAYOUTS",
    "MODALITY_SUFFIXES",
    "MSD_CASE_PATTERN",
    "MSD_CHANNELS",
    "MSD_LABEL_CONVENTION",
    "BratsLayout",
    "case_id_from_path",
    "entry_case_id",
    "layout_of_case",
]
