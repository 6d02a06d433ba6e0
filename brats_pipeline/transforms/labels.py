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

BraTS 2024 post-treatment glioma (``brats2024``, in :data:`POST_TREATMENT_CONVENTIONS`) adds a fourth label,
``4`` RC (resection cavity), to the 2023 values (1 NETC, 2 SNFH, 3 ET). RC is part of none of TC, WT, ET; that
challenge scores it as a region of its own. Every conversion below leaves RC out (as background) unless asked
with ``include_rc=True``: then regions are ``REGIONS_RC = ("TC", "WT", "ET", "RC")`` and classes run 0..4 with
``4`` the resection cavity (:data:`CLASSES_RC`). For the three pre-treatment conventions nothing changes.

Unlike MONAI's ``ConvertToMultiChannelBasedOnBratsClassesd`` (which silently drops label 3 of BraTS 2023),
every value outside the chosen convention raises :class:`LabelConventionError` naming the file. A value that no
known convention has (e.g. 5, 255 or 0.5: :data:`KNOWN_LABEL_VALUES`) raises :class:`CorruptLabelError`: no choice of
convention fixes such a file, so its message says the file is corrupt instead of advising ``--label_convention``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

REGIONS: tuple[str, ...] = ("TC", "WT", "ET")
CLASSES: tuple[str, ...] = ("background", "necrosis", "edema", "enhancing")
#: regions with the BraTS 2024 resection cavity as a fourth channel (``include_rc=True``)
REGIONS_RC: tuple[str, ...] = (*REGIONS, "RC")
#: contiguous classes with the resection cavity as class 4 (``include_rc=True``)
CLASSES_RC: tuple[str, ...] = (*CLASSES, "resection_cavity")


class LabelConventionError(ValueError):
    """A label map holds values outside its declared convention.

    ``source``, ``convention`` and ``bad_values`` (when set) let a caller word its own advice, e.g. a command line
    naming its flags instead of the config key.
    """

    def __init__(
        self,
        message: str,
        source: str | None = None,
        convention: str | None = None,
        bad_values: tuple[float, ...] = (),
    ) -> None:
        super().__init__(message)
        self.source = source
        self.convention = convention
        self.bad_values = bad_values


class CorruptLabelError(LabelConventionError):
    """A label map holds values that no known convention has (:data:`KNOWN_LABEL_VALUES`): the file is corrupt or is
    not a BraTS label map, whatever convention it is read in."""


@dataclass(frozen=True)
class LabelConvention:
    """Dataset label values of the three tumor sub-compartments (0 is always background)."""

    name: str
    necrosis: int
    edema: int
    enhancing: int
    #: label value of the resection cavity (BraTS 2024 post-treatment), ``None`` where the convention has none
    resection_cavity: int | None = None

    @property
    def values(self) -> tuple[int, ...]:
        base = (0, self.necrosis, self.edema, self.enhancing)
        return base if self.resection_cavity is None else (*base, self.resection_cavity)

    @property
    def has_resection_cavity(self) -> bool:
        return self.resection_cavity is not None

    @property
    def class_to_label(self) -> np.ndarray:
        """Lookup table: contiguous class index (0..3) -> dataset label value."""
        return np.asarray(self.values, dtype=np.uint8)


CONVENTIONS: dict[str, LabelConvention] = {
    "brats2018": LabelConvention("brats2018", necrosis=1, edema=2, enhancing=4),
    "brats2023": LabelConvention("brats2023", necrosis=1, edema=2, enhancing=3),
    "msd": LabelConvention("msd", necrosis=2, edema=1, enhancing=3),
}
#: conventions with a resection cavity label; kept apart from :data:`CONVENTIONS` (the four-class pre-treatment
#: conventions that the synthetic generator and the 4-class losses enumerate). :func:`get_convention` knows both.
POST_TREATMENT_CONVENTIONS: dict[str, LabelConvention] = {
    "brats2024": LabelConvention("brats2024", necrosis=1, edema=2, enhancing=3, resection_cavity=4),
}


#: every label value of a known convention (pre- and post-treatment): a value outside it is a corrupt label
KNOWN_LABEL_VALUES: frozenset[int] = frozenset(
    v for conv in (*CONVENTIONS.values(), *POST_TREATMENT_CONVENTIONS.values()) for v in conv.values
)


def get_convention(name: str | LabelConvention) -> LabelConvention:
    if isinstance(name, LabelConvention):
        return name
    found = CONVENTIONS.get(name) or POST_TREATMENT_CONVENTIONS.get(name)
    if found is None:
        known = sorted({*CONVENTIONS, *POST_TREATMENT_CONVENTIONS})
        raise ValueError(f"unknown label convention {name!r}; choose one of {known}")
    return found


def _rc_convention(convention: str | LabelConvention, include_rc: bool) -> LabelConvention:
    conv = get_convention(convention)
    if include_rc and not conv.has_resection_cavity:
        raise ValueError(
            f"include_rc=True needs a convention with a resection cavity label (e.g. 'brats2024'), got {conv.name!r}"
        )
    return conv


def region_names(convention: str | LabelConvention = "brats2018", include_rc: bool = False) -> tuple[str, ...]:
    """Channel names of :func:`label_to_regions`: :data:`REGIONS`, or :data:`REGIONS_RC` with ``include_rc``."""
    _rc_convention(convention, include_rc)
    return REGIONS_RC if include_rc else REGIONS


def _source_name(label: NdarrayOrTensor, source: str | None) -> str:
    if source:
        return source
    if isinstance(label, MetaTensor):
        return str(label.meta.get("filename_or_obj", "<label>"))
    return "<label>"


def distinct_values(label: NdarrayOrTensor) -> np.ndarray:
    """Sorted distinct values of a label map (array or tensor, any shape).

    A uint8 map (the BraTS files' dtype, and how the pipeline stores labels) is counted with ``bincount``: about 20x
    faster than the sort behind ``unique`` on a training crop. Other dtypes go through ``unique``.
    """
    if isinstance(label, np.ndarray):
        if label.dtype == np.uint8:
            return np.flatnonzero(np.bincount(label.ravel(), minlength=1)).astype(np.uint8)
        return np.unique(label)
    tensor = label.as_tensor() if isinstance(label, MetaTensor) else torch.as_tensor(label)
    if tensor.dtype == torch.uint8:
        return torch.bincount(tensor.reshape(-1), minlength=1).nonzero().flatten().numpy().astype(np.uint8)
    return torch.unique(tensor).cpu().numpy()


def _known_conventions() -> dict[str, LabelConvention]:
    return {**CONVENTIONS, **POST_TREATMENT_CONVENTIONS}


def check_label_values(label: NdarrayOrTensor, convention: str | LabelConvention, source: str | None = None) -> None:
    """Raise :class:`LabelConventionError` if ``label`` holds a value that ``convention`` does not define.

    A value that another known convention has gets the advice to choose the dataset's convention (naming those
    that fit every value found); a value that no known convention has (:data:`KNOWN_LABEL_VALUES`) raises
    :class:`CorruptLabelError`, naming the file and the value, without that advice.
    """
    conv = get_convention(convention)
    found = sorted({float(v) for v in distinct_values(label)})
    bad = [v for v in found if v not in conv.values]
    if not bad:
        return
    name = _source_name(label, source)
    corrupt = [v for v in bad if v not in KNOWN_LABEL_VALUES]
    if corrupt:
        shown = ", ".join(f"{v:g}" for v in corrupt)
        values = "value" if len(corrupt) == 1 else "values"
        known = ", ".join(str(v) for v in sorted(KNOWN_LABEL_VALUES))
        raise CorruptLabelError(
            f"{name}: label {values} {{{shown}}} {'belongs' if len(corrupt) == 1 else 'belong'} to no BraTS label "
            f"convention (theirs are {known}): the file is corrupt or not a label map, and no choice of label "
            "convention fixes it; repair or replace it",
            source=name,
            convention=conv.name,
            bad_values=tuple(corrupt),
        )
    shown = ", ".join(f"{v:g}" for v in bad)
    fitting = [n for n, c in _known_conventions().items() if n != conv.name and all(v in c.values for v in found)]
    fits = f" (these values fit {', '.join(fitting)})" if fitting else ""
    raise LabelConventionError(
        f"{name}: label values {{{shown}}} are not part of the {conv.name!r} convention "
        f"(allowed: {list(conv.values)}; found: {[f'{v:g}' for v in found]}). "
        f"Choose the dataset's convention{fits}: --label_convention on the bundle command line (the config key), "
        "--convention for python -m brats_pipeline.evaluation.scoring.",
        source=name,
        convention=conv.name,
        bad_values=tuple(bad),
    )


def label_to_regions(
    label: NdarrayOrTensor, convention: str | LabelConvention, source: str | None = None, include_rc: bool = False
) -> torch.Tensor:
    """Label map ``(1, *spatial)`` or ``(*spatial)`` -> float regions ``(3, *spatial)`` in order TC, WT, ET.

    With ``include_rc`` (conventions with a resection cavity only) a fourth channel RC: ``(4, *spatial)``.
    """
    conv = _rc_convention(convention, include_rc)
    check_label_values(label, conv, source)
    lab = label.as_tensor() if isinstance(label, MetaTensor) else torch.as_tensor(label)
    if lab.ndim == 4:
        lab = lab[0]
    et = lab == conv.enhancing
    tc = (lab == conv.necrosis) | et
    wt = tc | (lab == conv.edema)
    channels = [tc, wt, et] + ([lab == conv.resection_cavity] if include_rc else [])
    out = torch.empty((len(channels), *lab.shape), dtype=torch.float32, device=lab.device)
    for target, channel in zip(out, channels, strict=True):
        target.copy_(channel)  # bool -> float in one pass, without a stacked bool copy
    if isinstance(label, MetaTensor):
        out = MetaTensor(out, meta=label.meta, applied_operations=label.applied_operations)
    return out


def label_to_classes(
    label: NdarrayOrTensor, convention: str | LabelConvention, source: str | None = None, include_rc: bool = False
) -> torch.Tensor:
    """Label map -> float contiguous classes ``(1, *spatial)`` with values 0..3 (see :data:`CLASSES`).

    With ``include_rc`` (conventions with a resection cavity only) the cavity is class 4 (:data:`CLASSES_RC`);
    without it, cavity voxels are background.
    """
    conv = _rc_convention(convention, include_rc)
    check_label_values(label, conv, source)
    lab = label.as_tensor() if isinstance(label, MetaTensor) else torch.as_tensor(label)
    if lab.ndim == 3:
        lab = lab[None]
    out = torch.zeros_like(lab, dtype=torch.float32)
    out[lab == conv.necrosis] = 1
    out[lab == conv.edema] = 2
    out[lab == conv.enhancing] = 3
    if include_rc:
        out[lab == conv.resection_cavity] = 4
    if isinstance(label, MetaTensor):
        out = MetaTensor(out, meta=label.meta, applied_operations=label.applied_operations)
    return out


def regions_to_label(regions: NdarrayOrTensor, convention: str | LabelConvention) -> torch.Tensor:
    """Binary regions ``(3, *spatial)`` (TC, WT, ET) -> uint8 label map ``(1, *spatial)``.

    Nested overwrite, as in the seed paper: WT voxels become edema, TC voxels necrosis, ET voxels enhancing.
    Four channels ``(TC, WT, ET, RC)`` (conventions with a resection cavity) write RC first, so that a voxel
    predicted as both tumor and cavity is tumor.
    """
    reg = torch.as_tensor(regions) > 0.5
    if reg.shape[0] not in (3, 4):
        raise ValueError(f"expected regions (3 or 4, *spatial), got shape {tuple(reg.shape)}")
    conv = _rc_convention(convention, reg.shape[0] == 4)
    out = torch.zeros(reg.shape[1:], dtype=torch.uint8, device=reg.device)
    if reg.shape[0] == 4:
        out[reg[3]] = conv.resection_cavity  # type: ignore[assignment]
    out[reg[1]] = conv.edema
    out[reg[0]] = conv.necrosis
    out[reg[2]] = conv.enhancing
    return out[None]


def classes_to_label(classes: NdarrayOrTensor, convention: str | LabelConvention) -> torch.Tensor:
    """Contiguous class indices ``(1, *spatial)`` (0..3; 0..4 with a resection cavity) -> uint8 label map
    ``(1, *spatial)``."""
    conv = get_convention(convention)
    lut = torch.as_tensor(conv.class_to_label)
    cls = torch.as_tensor(classes).long()
    return lut.to(cls.device)[cls]


def classes_to_regions(classes: NdarrayOrTensor, include_rc: bool = False) -> torch.Tensor:
    """Contiguous classes ``(1, *spatial)`` or ``(*spatial)`` -> float regions ``(3, *spatial)`` (TC, WT, ET);
    ``(4, *spatial)`` with the resection cavity (class 4) as RC when ``include_rc``."""
    cls = torch.as_tensor(classes)
    if cls.ndim == 4:
        cls = cls[0]
    et = cls == 3
    tc = (cls == 1) | et
    wt = tc | (cls == 2)
    return torch.stack([tc, wt, et] + ([cls == 4] if include_rc else [])).float()


def nest_regions(regions: NdarrayOrTensor) -> torch.Tensor:
    """Binary regions ``(3|4, *spatial)`` (TC, WT, ET[, RC]) -> the regions that the label map written from them
    holds: ``ET``, ``TC | ET``, ``WT | TC | ET`` (and ``RC`` outside them), float.

    Sigmoid networks predict each region on its own channel, so their TC may miss voxels of their ET; the label map
    (:func:`regions_to_label`) nests them, and the challenge scores the regions of that map. This is
    ``label_to_regions(regions_to_label(regions))`` without building the map. Metadata of a ``MetaTensor`` is kept.
    """
    reg = torch.as_tensor(regions) > 0.5
    if reg.shape[0] not in (3, 4):
        raise ValueError(f"expected regions (3 or 4, *spatial), got shape {tuple(reg.shape)}")
    tc = reg[0] | reg[2]
    wt = reg[1] | tc
    channels = [tc, wt, reg[2]] + ([reg[3] & ~wt] if reg.shape[0] == 4 else [])
    out = torch.stack(channels).float()
    if isinstance(regions, MetaTensor):
        out = MetaTensor(out, meta=regions.meta, applied_operations=regions.applied_operations)
    return out


class NestRegionsd(MapTransform):
    """Dictionary transform: each key's binary regions nested as the written label map holds them
    (:func:`nest_regions`), so that validation scores what the challenge scores."""

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = nest_regions(d[key])
        return d


class _LabelTod(MapTransform):
    """Dictionary form of :func:`label_to_regions` / :func:`label_to_classes`: each key's dataset label map converted
    to float targets, validated against ``convention`` (plus RC where ``include_rc``)."""

    convert: Callable[..., torch.Tensor]  # label_to_regions or label_to_classes

    def __init__(
        self,
        keys: KeysCollection,
        convention: str = "brats2018",
        allow_missing_keys: bool = False,
        include_rc: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.convention = _rc_convention(convention, include_rc)
        self.include_rc = include_rc

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.convert(d[key], self.convention, include_rc=self.include_rc)
        return d


class LabelToRegionsd(_LabelTod):
    """Dictionary transform: dataset label map -> float regions (TC, WT, ET), validated against ``convention``.

    ``include_rc=True`` (``brats2024``) adds the resection cavity as a fourth channel RC.
    """

    convert = staticmethod(label_to_regions)


class LabelToClassesd(_LabelTod):
    """Dictionary transform: dataset label map -> float contiguous classes 0..3, validated against ``convention``.

    ``include_rc=True`` (``brats2024``) makes the resection cavity class 4.
    """

    convert = staticmethod(label_to_classes)


class _ToLabel(Transform):
    """Array transform for outputs: the network's regions or classes -> dataset labels ``(1, *spatial)``, uint8,
    metadata kept."""

    convert: Callable[[NdarrayOrTensor, LabelConvention], torch.Tensor]  # regions_to_label or classes_to_label

    def __init__(self, convention: str = "brats2018"):
        self.convention = get_convention(convention)

    def __call__(self, img: NdarrayOrTensor) -> torch.Tensor:
        out = self.convert(img, self.convention)
        if isinstance(img, MetaTensor):
            out = MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)
        return out


class RegionsToLabel(_ToLabel):
    """Array transform for outputs: regions ``(3, *spatial)`` -> dataset labels ``(1, *spatial)``, uint8.

    Four channels (TC, WT, ET, RC) write the resection cavity too (conventions that have one).
    """

    convert = staticmethod(regions_to_label)


class ClassesToLabel(_ToLabel):
    """Array transform for outputs: class indices ``(1, *spatial)`` -> dataset labels ``(1, *spatial)``, uint8.

    Class 4 is the resection cavity in conventions that have one (``brats2024``).
    """

    convert = staticmethod(classes_to_label)


class _ToLabeld(MapTransform):
    """Dictionary form of :class:`RegionsToLabel` / :class:`ClassesToLabel`: each key's output converted to dataset
    labels ``(1, *spatial)``, written back to the key, or to ``names`` (one output key per key; ``CopyItemsd``'s
    name), so the regions or classes stay for the metrics."""

    converter: type[Transform]

    def __init__(
        self,
        keys: KeysCollection,
        convention: str = "brats2018",
        names: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.to_label = self.converter(convention)
        self.names = list(self.keys) if names is None else ([names] if isinstance(names, str) else list(names))
        if len(self.names) != len(self.keys):
            raise ValueError(f"{type(self).__name__}: {len(self.keys)} keys but {len(self.names)} names")

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key, name in self.key_iterator(d, self.names):
            d[name] = self.to_label(d[key])
        return d


class RegionsToLabeld(_ToLabeld):
    """Dictionary transform: regions ``(3|4, *spatial)`` -> dataset labels ``(1, *spatial)`` (:class:`RegionsToLabel`)."""

    converter = RegionsToLabel


class ClassesToLabeld(_ToLabeld):
    """Dictionary transform: class indices ``(1, *spatial)`` -> dataset labels (:class:`ClassesToLabel`)."""

    converter = ClassesToLabel


class ArgmaxClassesd(MapTransform):
    """Class probabilities or logits ``(C, *spatial)`` -> float class indices ``(1, *spatial)``.

    MONAI's ``AsDiscreted(argmax=True)`` (same values, float32, first maximum on ties, metadata kept), computed
    from ``torch.max``'s indices: on CPU, torch 2.13's ``argmax`` over the channel axis of a contiguous tensor took
    0.70 s for 4 x 144 x 192 x 144 probabilities, ``max`` 0.03 s.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            tensor = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
            out = torch.max(tensor, dim=0, keepdim=True).indices.to(torch.float32)
            if isinstance(img, MetaTensor):
                out = MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)
            d[key] = out
        return d


__all__: Sequence[str] = (
    "ArgmaxClassesd",
    "REGIONS",
    "CLASSES",
    "REGIONS_RC",
    "CLASSES_RC",
    "CONVENTIONS",
    "POST_TREATMENT_CONVENTIONS",
    "region_names",
    "LabelConvention",
    "LabelConventionError",
    "CorruptLabelError",
    "KNOWN_LABEL_VALUES",
    "get_convention",
    "check_label_values",
    "distinct_values",
    "label_to_regions",
    "label_to_classes",
    "regions_to_label",
    "classes_to_label",
    "classes_to_regions",
    "nest_regions",
    "NestRegionsd",
    "LabelToRegionsd",
    "LabelToClassesd",
    "RegionsToLabel",
    "ClassesToLabel",
    "RegionsToLabeld",
    "ClassesToLabeld",
)
