"""BraTS label conventions and the conversions between label maps, nested regions and contiguous classes.

Three conventions ship in the wild:

============  ===================  =====================  ======================
convention    1                    2                      3 / 4
============  ===================  =====================  ======================
``brats2018`` NCR/NET              ED (edema)             4: ET
``brats2023`` NETC                 SNFH (edema)           3: ET
``msd``       edema                non-enhancing tumor    3: enhancing tumor
============  ===================  =====================  ======================

``brats2018`` also covers the 2019, 2020 and 2021 releases. The nested regions evaluated by BraTS are
TC (tumor core = necrosis/non-enhancing + enhancing), WT (whole tumor = TC + edema) and ET (enhancing),
always in the channel order ``REGIONS = ("TC", "WT", "ET")``. The contiguous classes used by softmax
networks are ``0`` background, ``1`` necrosis/non-enhancing core, ``2`` edema, ``3`` enhancing tumor.

Unlike MONAI's ``ConvertToMultiChannelBasedOnBratsClassesd`` (which silently drops label 3 of BraTS 2023),
every value outside the chosen convention raises :class:`LabelConventionError` naming the file.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

REGIONS: tuple[str, ...] = ("TC", "WT", "ET")
CLASSES: tuple[str, ...] = ("background", "necrosis", "edema", "enhancing")


class LabelConventionError(ValueError):
    """A label map holds values outside its declared convention."""


@dataclass(frozen=True)
class LabelConvention:
    """Dataset label values of the three tumor sub-compartments (0 is always background)."""

    name: str
    necrosis: int
    edema: int
    enhancing: int

    @property
    def values(self) -> tuple[int, ...]:
        return (0, self.necrosis, self.edema, self.enhancing)

    @property
    def class_to_label(self) -> np.ndarray:
        """Lookup table: contiguous class index (0..3) -> dataset label value."""
        return np.asarray(self.values, dtype=np.uint8)


CONVENTIONS: dict[str, LabelConvention] = {
    "brats2018": LabelConvention("brats2018", necrosis=1, edema=2, enhancing=4),
    "brats2023": LabelConvention("brats2023", necrosis=1, edema=2, enhancing=3),
    "msd": LabelConvention("msd", necrosis=2, edema=1, enhancing=3),
}


def get_convention(name: str | LabelConvention) -> LabelConvention:
    if isinstance(name, LabelConvention):
        return name
    try:
        return CONVENTIONS[name]
    except KeyError:
        raise ValueError(f"unknown label convention {name!r}; choose one of {sorted(CONVENTIONS)}") from None


def _source_name(label: NdarrayOrTensor, source: str | None) -> str:
    if source:
        return source
    if isinstance(label, MetaTensor):
        return str(label.meta.get("filename_or_obj", "<label>"))
    return "<label>"


def check_label_values(label: NdarrayOrTensor, convention: str | LabelConvention, source: str | None = None) -> None:
    """Raise :class:`LabelConventionError` if ``label`` holds a value that ``convention`` does not define."""
    conv = get_convention(convention)
    values = np.unique(label) if isinstance(label, np.ndarray) else torch.unique(torch.as_tensor(label)).tolist()
    found = sorted({float(v) for v in values})
    bad = [v for v in found if v not in conv.values]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad)
        raise LabelConventionError(
            f"{_source_name(label, source)}: label values {{{shown}}} are not part of the {conv.name!r} convention "
            f"(allowed: {list(conv.values)}; found: {[f'{v:g}' for v in found]}). "
            "Choose the dataset's convention with the config key 'label_convention'."
        )


def label_to_regions(label: NdarrayOrTensor, convention: str | LabelConvention, source: str | None = None) -> torch.Tensor:
    """Label map ``(1, *spatial)`` or ``(*spatial)`` -> float regions ``(3, *spatial)`` in order TC, WT, ET."""
    conv = get_convention(convention)
    check_label_values(label, conv, source)
    lab = torch.as_tensor(label)
    if lab.ndim == 4:
        lab = lab[0]
    et = lab == conv.enhancing
    tc = (lab == conv.necrosis) | et
    wt = tc | (lab == conv.edema)
    out = torch.stack([tc, wt, et]).float()
    if isinstance(label, MetaTensor):
        out = MetaTensor(out, meta=label.meta, applied_operations=label.applied_operations)
    return out


def label_to_classes(label: NdarrayOrTensor, convention: str | LabelConvention, source: str | None = None) -> torch.Tensor:
    """Label map -> float contiguous classes ``(1, *spatial)`` with values 0..3 (see :data:`CLASSES`)."""
    conv = get_convention(convention)
    check_label_values(label, conv, source)
    lab = torch.as_tensor(label)
    if lab.ndim == 3:
        lab = lab[None]
    out = torch.zeros_like(lab, dtype=torch.float32)
    out[lab == conv.necrosis] = 1
    out[lab == conv.edema] = 2
    out[lab == conv.enhancing] = 3
    if isinstance(label, MetaTensor):
        out = MetaTensor(out, meta=label.meta, applied_operations=label.applied_operations)
    return out


def regions_to_label(regions: NdarrayOrTensor, convention: str | LabelConvention) -> torch.Tensor:
    """Binary regions ``(3, *spatial)`` (TC, WT, ET) -> uint8 label map ``(1, *spatial)``.

    Nested overwrite, as in the seed paper: WT voxels become edema, TC voxels necrosis, ET voxels enhancing.
    """
    conv = get_convention(convention)
    reg = torch.as_tensor(regions) > 0.5
    out = torch.zeros(reg.shape[1:], dtype=torch.uint8, device=reg.device)
    out[reg[1]] = conv.edema
    out[reg[0]] = conv.necrosis
    out[reg[2]] = conv.enhancing
    return out[None]


def classes_to_label(classes: NdarrayOrTensor, convention: str | LabelConvention) -> torch.Tensor:
    """Contiguous class indices ``(1, *spatial)`` (0..3) -> uint8 label map ``(1, *spatial)``."""
    conv = get_convention(convention)
    lut = torch.as_tensor(conv.class_to_label)
    cls = torch.as_tensor(classes).long()
    return lut.to(cls.device)[cls]


def classes_to_regions(classes: NdarrayOrTensor) -> torch.Tensor:
    """Contiguous classes ``(1, *spatial)`` or ``(*spatial)`` -> float regions ``(3, *spatial)`` (TC, WT, ET)."""
    cls = torch.as_tensor(classes)
    if cls.ndim == 4:
        cls = cls[0]
    et = cls == 3
    tc = (cls == 1) | et
    wt = tc | (cls == 2)
    return torch.stack([tc, wt, et]).float()


class LabelToRegionsd(MapTransform):
    """Dictionary transform: dataset label map -> float regions (TC, WT, ET), validated against ``convention``."""

    def __init__(self, keys: KeysCollection, convention: str = "brats2018", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.convention = get_convention(convention)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = label_to_regions(d[key], self.convention)
        return d


class LabelToClassesd(MapTransform):
    """Dictionary transform: dataset label map -> float contiguous classes 0..3, validated against ``convention``."""

    def __init__(self, keys: KeysCollection, convention: str = "brats2018", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.convention = get_convention(convention)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = label_to_classes(d[key], self.convention)
        return d


class RegionsToLabel(Transform):
    """Array transform for outputs: regions ``(3, *spatial)`` -> dataset labels ``(1, *spatial)``, uint8."""

    def __init__(self, convention: str = "brats2018"):
        self.convention = get_convention(convention)

    def __call__(self, img: NdarrayOrTensor) -> torch.Tensor:
        out = regions_to_label(img, self.convention)
        if isinstance(img, MetaTensor):
            out = MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)
        return out


class ClassesToLabel(Transform):
    """Array transform for outputs: class indices ``(1, *spatial)`` -> dataset labels ``(1, *spatial)``, uint8."""

    def __init__(self, convention: str = "brats2018"):
        self.convention = get_convention(convention)

    def __call__(self, img: NdarrayOrTensor) -> torch.Tensor:
        out = classes_to_label(img, self.convention)
        if isinstance(img, MetaTensor):
            out = MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)
        return out


__all__: Sequence[str] = (
    "REGIONS",
    "CLASSES",
    "CONVENTIONS",
    "LabelConvention",
    "LabelConventionError",
    "get_convention",
    "check_label_values",
    "label_to_regions",
    "label_to_classes",
    "regions_to_label",
    "classes_to_label",
    "classes_to_regions",
    "LabelToRegionsd",
    "LabelToClassesd",
    "RegionsToLabel",
    "ClassesToLabel",
)
