"""Lesion-wise Dice and HD95 as the BraTS 2023-2024 challenges rank them (``--rules brats2023``; 2025: the official
package, :mod:`brats_pipeline.evaluation.challenge_package`).

Definitions (those of the challenges' toolkit, github.com/rachitsaluja/BraTS-2023-Metrics), for one binary region
(ET, TC, WT, ...) of one case:

1. Reference lesions: 26-connected components of the reference, merged when their dilations touch: the reference
   is dilated ``dilation`` times with the 18-connected 3x3x3 structure, the dilation is split into 26-connected
   components, and each reference voxel belongs to the lesion of the dilated component it lies in.
2. Predicted components: 26-connected components of the prediction. A component is matched to a reference lesion
   when it meets that lesion's dilation (a component may match several lesions); it is a false positive (FP) when
   it matches none.
3. Per lesion: Dice and HD95 between the lesion's voxels and the union of its matched components (whole
   components, not cut at the dilation); a lesion without a match is missed (FN): Dice 0, HD95 the penalty.
4. Lesions of volume at or under ``volume_threshold_mm3`` are left out of the scores and of the TP/FN counts (a
   component matched to them is not a false positive either).
5. Lesion-wise Dice = sum of the lesions' Dice / (lesions + FP); lesion-wise HD95 = (sum of the lesions' HD95 +
   FP x penalty) / (lesions + FP). With no lesion and no FP (both empty): 1 and 0 (``empty_rule="count"``) or NaN
   (``"exclude"``, which also gives NaN whenever the reference region is empty).

The sub-challenge presets (:data:`CHALLENGES`) set the dilation and the volume threshold. The toolkit thresholds
the lesion volume in mm^3 (voxel count x voxel volume); on BraTS data (1 mm isotropic) that is the voxel count.

Speed: everything runs on the bounding box of both masks (grown by the dilation); per lesion only its own
bounding box (``scipy.ndimage.find_objects``) and that of its matched components are touched, and lesions under the
threshold skip the HD95 computation. A 240 x 240 x 155 case with several lesions per region takes well under a
second per region (see ``docs/scoring.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.utils import look_up_option
from scipy import ndimage

from brats_pipeline.evaluation.metrics import EMPTY_RULES, HD95_PENALTY_2023_MM, _spacing, hd95

#: connectivity of lesions and predicted components (26-connected, as ``cc3d.connected_components(connectivity=26)``)
COMPONENT_STRUCTURE: np.ndarray = ndimage.generate_binary_structure(3, 3)
#: structuring element of one dilation step (18-connected, the toolkit's ``generate_binary_structure(3, 2)``)
DILATION_STRUCTURE: np.ndarray = ndimage.generate_binary_structure(3, 2)
#: column names of :meth:`LesionWiseResult.as_row`
LESION_METRICS: tuple[str, ...] = ("lesion_dice", "lesion_hd95", "lesion_tp", "lesion_fp", "lesion_fn")


@dataclass(frozen=True)
class LesionCriteria:
    """How a sub-challenge defines lesions: dilation steps that merge nearby components, and the volume (mm^3) at or
    under which a reference lesion is left out."""

    dilation: int
    volume_threshold_mm3: float


#: BraTS 2023 sub-challenge presets (toolkit: GLI, SSA, PED 3 / 50; MEN 1 / 50; MET 1 / 2)
CHALLENGES: dict[str, LesionCriteria] = {
    "GLI": LesionCriteria(dilation=3, volume_threshold_mm3=50.0),
    "SSA": LesionCriteria(dilation=3, volume_threshold_mm3=50.0),
    "PED": LesionCriteria(dilation=3, volume_threshold_mm3=50.0),
    "MEN": LesionCriteria(dilation=1, volume_threshold_mm3=50.0),
    "MET": LesionCriteria(dilation=1, volume_threshold_mm3=2.0),
}
DEFAULT_CHALLENGE = "GLI"


def get_challenge(name: str | LesionCriteria) -> LesionCriteria:
    """A preset of :data:`CHALLENGES` by name (``"GLI"``, ``"BraTS-MET"``, case-insensitive), or the criteria given."""
    if isinstance(name, LesionCriteria):
        return name
    key = str(name).upper().removeprefix("BRATS-")
    key = look_up_option(key, sorted(CHALLENGES))
    return CHALLENGES[key]


@dataclass(frozen=True)
class Lesion:
    """One reference lesion: its id (1-based, raster order), volume, matched predicted components, scores, and
    whether it counts (volume above the threshold). Dice/HD95 are NaN for lesions that do not count."""

    label: int
    volume_mm3: float
    matched_components: int
    dice: float
    hd95: float
    counted: bool


@dataclass(frozen=True)
class LesionWiseResult:
    """Lesion-wise scores of one region of one case (see the module docstring)."""

    dice: float
    hd95: float
    tp: int
    fp: int
    fn: int
    lesions: tuple[Lesion, ...] = field(default_factory=tuple)

    def as_row(self) -> dict[str, float]:
        """``{"lesion_dice", "lesion_hd95", "lesion_tp", "lesion_fp", "lesion_fn"}`` for the per-case table."""
        return dict(zip(LESION_METRICS, (self.dice, self.hd95, self.tp, self.fp, self.fn), strict=True))


def _as_mask(x: NdarrayOrTensor) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return a if a.dtype == bool else a > 0.5


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Bounding box of a non-empty mask grown by ``margin`` voxels, clipped to the array."""
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, mask.shape, strict=True))


def _union_box(boxes: Sequence[tuple[slice, ...]]) -> tuple[slice, ...]:
    return tuple(slice(min(b[i].start for b in boxes), max(b[i].stop for b in boxes)) for i in range(len(boxes[0])))


def lesion_wise_metrics(
    pred: NdarrayOrTensor,
    ref: NdarrayOrTensor,
    spacing: float | Sequence[float] = (1.0, 1.0, 1.0),
    dilation: int = 3,
    volume_threshold_mm3: float = 50.0,
    hd95_mode: str = "surface",
    hd95_penalty_mm: float = HD95_PENALTY_2023_MM,
    percentile: float = 95.0,
    empty_rule: str = "count",
) -> LesionWiseResult:
    """Lesion-wise Dice, HD95 and TP/FP/FN lesion counts of one binary region.

    Args:
        pred: predicted mask ``(H, W, D)``, bool, {0, 1} or probabilities (> 0.5 is foreground).
        ref: reference mask, same shape.
        spacing: voxel size in mm per axis (HD95 in mm, volumes in mm^3).
        dilation: dilation steps (18-connected) that merge nearby reference components into one lesion and define
            the neighbourhood in which a predicted component matches it; see :data:`CHALLENGES`.
        volume_threshold_mm3: reference lesions of at most this volume are left out.
        hd95_mode: HD95 definition per lesion, see :func:`brats_pipeline.evaluation.metrics.hd95` (``"surface"``: the toolkit).
        hd95_penalty_mm: HD95 of a missed lesion and of each false positive.
        percentile: 95 for HD95.
        empty_rule: ``"count"``: no lesion and no false positive scores 1 / 0; ``"exclude"``: NaN there, and
            whenever the reference is empty.

    Returns:
        :class:`LesionWiseResult`; ``lesions`` lists every reference lesion (also those under the threshold).
    """
    empty_rule = look_up_option(empty_rule, EMPTY_RULES)
    p, r = _as_mask(pred), _as_mask(ref)
    if p.shape != r.shape or p.ndim != 3:
        raise ValueError(f"expected two masks of one 3-D shape, got {p.shape} and {r.shape}")
    sp = _spacing(spacing, 3)
    voxel_mm3 = math.prod(sp)
    nan = float("nan")
    if empty_rule == "exclude" and not r.any():
        return LesionWiseResult(nan, nan, 0, 0, 0)
    if not p.any() and not r.any():
        return LesionWiseResult(1.0, 0.0, 0, 0, 0) if empty_rule == "count" else LesionWiseResult(nan, nan, 0, 0, 0)

    # work on the joint bounding box, grown by the dilation so that it holds every dilated voxel
    box = _bounding_box(p | r, int(dilation))
    p, r = p[box], r[box]
    pred_cc, n_pred = ndimage.label(p, structure=COMPONENT_STRUCTURE)
    dilated = ndimage.binary_dilation(r, structure=DILATION_STRUCTURE, iterations=int(dilation)) if dilation else r
    # a dilated component is exactly the dilation of the lesion it holds: it is the lesion's matching zone
    zone_cc, n_lesions = ndimage.label(dilated, structure=COMPONENT_STRUCTURE)
    lesion_cc = np.where(r, zone_cc, 0)

    lesion_size = np.bincount(lesion_cc.ravel(), minlength=n_lesions + 1)
    component_size = np.bincount(pred_cc.ravel(), minlength=n_pred + 1)
    overlap = np.bincount(lesion_cc[pred_cc > 0], minlength=n_lesions + 1)  # lesion voxels inside any component
    meets = (zone_cc > 0) & (pred_cc > 0)
    pairs = np.unique(zone_cc[meets].astype(np.int64) * (n_pred + 1) + pred_cc[meets])  # sorted by lesion
    pair_lesion, pair_component = np.divmod(pairs, n_pred + 1)
    matched = np.zeros(n_pred + 1, dtype=bool)
    matched[pair_component] = True
    n_fp = int(n_pred - matched[1:].sum())
    zone_boxes, component_boxes = ndimage.find_objects(zone_cc), ndimage.find_objects(pred_cc)
    starts = np.searchsorted(pair_lesion, np.arange(n_lesions + 2))

    lesions: list[Lesion] = []
    for k in range(1, n_lesions + 1):
        components = pair_component[starts[k] : starts[k + 1]]
        volume = float(lesion_size[k]) * voxel_mm3
        if volume <= volume_threshold_mm3:
            lesions.append(Lesion(k, volume, len(components), nan, nan, False))
            continue
        if components.size == 0:
            lesions.append(Lesion(k, volume, 0, 0.0, float(hd95_penalty_mm), True))
            continue
        dice = 2.0 * overlap[k] / (lesion_size[k] + component_size[components].sum())
        sub = _union_box([zone_boxes[k - 1], *(component_boxes[c - 1] for c in components)])
        lesion_mask, pred_mask = lesion_cc[sub] == k, np.isin(pred_cc[sub], components)
        dist = hd95(pred_mask, lesion_mask, sp, percentile, hd95_mode, hd95_penalty_mm)
        lesions.append(Lesion(k, volume, int(components.size), float(dice), dist, True))

    counted = [les for les in lesions if les.counted]
    tp = sum(1 for les in counted if les.matched_components > 0)
    denominator = len(counted) + n_fp
    if denominator == 0:
        score = (1.0, 0.0) if empty_rule == "count" else (nan, nan)
    else:
        score = (
            sum(les.dice for les in counted) / denominator,
            (sum(les.hd95 for les in counted) + n_fp * float(hd95_penalty_mm)) / denominator,
        )
    return LesionWiseResult(score[0], score[1], tp, n_fp, len(counted) - tp, tuple(lesions))


__all__: Sequence[str] = (
    "CHALLENGES",
    "COMPONENT_STRUCTURE",
    "DEFAULT_CHALLENGE",
    "DILATION_STRUCTURE",
    "LESION_METRICS",
    "Lesion",
    "LesionCriteria",
    "LesionWiseResult",
    "get_challenge",
    "lesion_wise_metrics",
)
