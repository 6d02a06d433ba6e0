"""BraTS evaluation metrics with the challenge's rules for empty regions.

Per case and per nested region (TC, WT, ET; see :mod:`brats_pipeline.transforms.labels`) the challenge reports Dice,
the 95th-percentile Hausdorff distance (HD95, mm), sensitivity and specificity; we add the predicted and the
reference volume in ml. Every number comes from MONAI's metric functions; only the cases MONAI cannot express
are handled here explicitly:

===============================  ===========================  ======================================
case                             MONAI 1.6 default            BraTS rule (applied here)
===============================  ===========================  ======================================
both masks empty                 Dice NaN, HD NaN             Dice 1, HD95 0
exactly one mask empty           Dice 0 (ref empty: NaN),     Dice 0, HD95 :data:`HD95_EMPTY_MM`
                                 HD NaN / inf
reference empty (sensitivity)    NaN                          1 when the prediction is empty too, else 0
no negatives (specificity)       NaN                          1 (there is no negative voxel to get wrong)
===============================  ===========================  ======================================

Dice uses ``compute_dice(..., ignore_empty=False)``, which already gives exactly the BraTS values (1 when both
masks are empty, 0 when one is), so the same definition holds during training with
``DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=False)`` /
``monai.handlers.MeanDice(ignore_empty=False)``.

``empty_rule="exclude"`` instead gives NaN wherever the reference region is empty (MONAI's ``ignore_empty=True``
view: such a case says nothing about the region); :func:`summarize` then leaves it out of that region's statistics.

HD95 definition (``hd95_mode``). Three symmetric "95th percentile" Hausdorff distances circulate in BraTS code;
all use exact Euclidean distances scaled by the voxel spacing:

* ``"max"``: the larger of the two directed 95th percentiles, ``max(P95(d(pred -> ref)), P95(d(ref -> pred)))``,
  over the boundary voxels (mask XOR its 6-connected erosion), with linearly interpolated percentiles. This is
  ``monai.metrics.compute_hausdorff_distance(percentile=95, directed=False)``.
* ``"pooled"``: the 95th percentile of the union of both directed distance sets of the same boundary voxels: MedPy's
  ``hd95``, which nnU-Net used to reproduce the BraTS 2017-2020 portal numbers (CaPTk era).
* ``"surface"``: DeepMind's ``surface_distance.compute_robust_hausdorff``, used by the BraTS 2023+ toolkit
  (github.com/rachitsaluja/BraTS-2023-Metrics): surface elements sit on the grid of voxel corners, each weighted by
  the area of the marching-cubes surface through it (MONAI's ``get_mask_edges(spacing=...)`` table), and each
  directed percentile is the first distance at which the cumulative area reaches 95 %; the larger direction wins.

The three agree on parallel planes and differ by a fraction of a voxel on curved shapes. The normalised surface Dice
``nsd`` at a tolerance in mm (:func:`nsd_from_distances`) uses the same boundary elements as the HD95 mode: areas
for ``"surface"``, voxel counts otherwise (MONAI's ``compute_surface_dice(use_subvoxels=...)``).

The HD95 penalty when exactly one mask is empty is an argument: 373.13 mm (the diagonal of the 240 x 240 x 155 BraTS
volume, CaPTk era, :data:`HD95_EMPTY_MM`) or 374 mm (BraTS 2023+ toolkit, :data:`HD95_PENALTY_2023_MM`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.metrics import compute_dice
from monai.metrics.confusion_matrix import compute_confusion_matrix_metric, get_confusion_matrix
from monai.metrics.utils import get_edge_surface_distance
from monai.utils import look_up_option

from brats_pipeline.transforms.labels import REGIONS

#: BraTS penalty (mm) when exactly one of prediction and reference is empty: the diagonal of a 240x240x155 volume
HD95_EMPTY_MM: float = 373.13
#: the penalty of the BraTS 2023+ lesion-wise toolkit (missed or false-positive lesion, one empty mask)
HD95_PENALTY_2023_MM: float = 374.0
#: metric names of :func:`region_metrics`, in column order
METRICS: tuple[str, ...] = ("dice", "hd95", "sensitivity", "specificity", "volume_pred_ml", "volume_ref_ml", "nsd")
#: the order in which BraTS papers and leaderboards list the regions (then the 2024 resection cavity and labels)
REPORT_ORDER: tuple[str, ...] = ("ET", "TC", "WT", "RC", "NETC", "SNFH")
#: summary statistics of :func:`summarize`, named as in the BraTS result tables
STATISTICS: tuple[str, ...] = ("mean", "std", "median", "25quantile", "75quantile")
HD95_MODES: tuple[str, ...] = ("max", "pooled", "surface")
#: ``"count"``: both empty scores Dice 1 / HD95 0 and counts (BraTS); ``"exclude"``: empty reference gives NaN
EMPTY_RULES: tuple[str, ...] = ("count", "exclude")
#: default tolerance (mm) of the normalised surface Dice
NSD_TOLERANCE_MM: float = 1.0


def _spacing(spacing: float | Sequence[float], ndim: int) -> tuple[float, ...]:
    # MONAI's prepare_spacing rejects a mixed int/float sequence such as (1, 1, 2.5): normalise to floats
    sp = (float(spacing),) * ndim if np.isscalar(spacing) else tuple(float(s) for s in spacing)  # type: ignore
    if len(sp) != ndim:
        raise ValueError(f"spacing {tuple(sp)} has {len(sp)} values for {ndim} spatial dimensions")
    return sp


def _as_bool(x: NdarrayOrTensor) -> torch.Tensor:
    t = torch.as_tensor(x)
    return t if t.dtype == torch.bool else t > 0.5


@dataclass(frozen=True)
class SurfaceDistances:
    """Both directed boundary-to-boundary distance sets of two non-empty masks, with each element's weight.

    ``pred_to_ref[i]`` is the distance (mm) of the prediction's boundary element ``i`` to the reference boundary,
    ``pred_weights[i]`` its surface area in mm^2 (``"surface"`` mode) or 1 (voxel modes); likewise for the reference.
    """

    pred_to_ref: np.ndarray
    ref_to_pred: np.ndarray
    pred_weights: np.ndarray
    ref_weights: np.ndarray


def surface_distances(
    pred: NdarrayOrTensor, ref: NdarrayOrTensor, spacing: float | Sequence[float] = 1.0, mode: str = "max"
) -> SurfaceDistances:
    """Boundary distances of two non-empty binary masks ``(*spatial)`` from MONAI's ``get_edge_surface_distance``.

    ``mode="surface"`` takes DeepMind's surface elements on the voxel-corner grid weighted by area
    (``use_subvoxels=True``); ``"max"`` and ``"pooled"`` take boundary voxels (mask XOR erosion), weight 1.
    MONAI crops both masks to their joint bounding box first, so a small mask in a large image is cheap.
    """
    mode = look_up_option(mode, HD95_MODES)
    p, r = _as_bool(pred), _as_bool(ref)
    sp = _spacing(spacing, p.ndim)
    subvoxels = mode == "surface"
    with warnings.catch_warnings():
        # MONAI calls its own deprecated `always_return_as_numpy` argument internally
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        edges, distances, areas = get_edge_surface_distance(
            p, r, distance_metric="euclidean", spacing=sp, use_subvoxels=subvoxels, symmetric=True, warn_empty=False
        )
    d_pred, d_ref = (torch.as_tensor(d).double().cpu().numpy().ravel() for d in distances)
    if subvoxels:
        w_pred, w_ref = (
            torch.as_tensor(a)[torch.as_tensor(e)].double().cpu().numpy() for a, e in zip(areas, edges, strict=True)
        )
    else:
        w_pred, w_ref = np.ones_like(d_pred), np.ones_like(d_ref)
    return SurfaceDistances(d_pred, d_ref, w_pred, w_ref)


def _area_percentile(distances: np.ndarray, weights: np.ndarray, percentile: float) -> float:
    """DeepMind's robust percentile: the first sorted distance whose cumulative weight fraction reaches it."""
    order = np.argsort(distances, kind="stable")
    cumulative = np.cumsum(weights[order]) / weights.sum()
    index = int(np.searchsorted(cumulative, percentile / 100.0))
    return float(distances[order][min(index, distances.size - 1)])


def hd95_from_distances(sd: SurfaceDistances, percentile: float = 95.0, mode: str = "max") -> float:
    """Symmetric percentile Hausdorff distance (mm) of :func:`surface_distances` in one of :data:`HD95_MODES`."""
    if mode == "surface":
        return max(
            _area_percentile(sd.pred_to_ref, sd.pred_weights, percentile),
            _area_percentile(sd.ref_to_pred, sd.ref_weights, percentile),
        )
    if mode == "max":
        return float(max(np.percentile(sd.pred_to_ref, percentile), np.percentile(sd.ref_to_pred, percentile)))
    return float(np.percentile(np.concatenate([sd.pred_to_ref, sd.ref_to_pred]), percentile))


def nsd_from_distances(sd: SurfaceDistances, tolerance_mm: float = NSD_TOLERANCE_MM) -> float:
    """Normalised surface Dice: the weight of boundary elements within ``tolerance_mm`` of the other boundary, over
    the weight of both boundaries (Nikolov et al. 2021; MONAI's ``compute_surface_dice``)."""
    close = sd.pred_weights[sd.pred_to_ref <= tolerance_mm].sum() + sd.ref_weights[sd.ref_to_pred <= tolerance_mm].sum()
    return float(close / (sd.pred_weights.sum() + sd.ref_weights.sum()))


def _empty_case(p_any: bool, r_any: bool, empty_rule: str, both: float, one: float) -> float | None:
    """The value for an empty mask under ``empty_rule``, or None when both masks have voxels."""
    empty_rule = look_up_option(empty_rule, EMPTY_RULES)
    if not r_any and empty_rule == "exclude":
        return float("nan")
    if not p_any and not r_any:
        return both
    if p_any != r_any:
        return one
    return None


def hd95(
    pred: NdarrayOrTensor,
    ref: NdarrayOrTensor,
    spacing: float | Sequence[float] = 1.0,
    percentile: float = 95.0,
    mode: str = "max",
    hd95_empty_mm: float = HD95_EMPTY_MM,
    empty_rule: str = "count",
) -> float:
    """Symmetric percentile Hausdorff distance (mm) of two binary masks ``(*spatial)`` with the BraTS empty rules.

    Args:
        pred: predicted mask, bool or {0, 1} (values > 0.5 count as foreground).
        ref: reference mask of the same shape.
        spacing: voxel size per spatial axis in mm (anisotropic allowed), or one number.
        percentile: 95 for HD95; 100 gives the classic Hausdorff distance.
        mode: ``"max"`` (MONAI), ``"pooled"`` (MedPy / CaPTk era) or ``"surface"`` (BraTS 2023+ toolkit),
            see the module docstring.
        hd95_empty_mm: value when exactly one mask is empty.
        empty_rule: ``"count"`` (BraTS) or ``"exclude"`` (NaN when the reference is empty).

    Returns:
        0.0 when both masks are empty, ``hd95_empty_mm`` when exactly one is, else the distance in mm.
    """
    mode = look_up_option(mode, HD95_MODES)
    p, r = _as_bool(pred), _as_bool(ref)
    if p.shape != r.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} differs from reference shape {tuple(r.shape)}")
    empty = _empty_case(bool(p.any()), bool(r.any()), empty_rule, 0.0, float(hd95_empty_mm))
    if empty is not None:
        return empty
    return hd95_from_distances(surface_distances(p, r, spacing, mode), percentile, mode)


def region_metrics(
    pred_regions: NdarrayOrTensor,
    ref_regions: NdarrayOrTensor,
    spacing: float | Sequence[float] = (1.0, 1.0, 1.0),
    regions: Sequence[str] = REGIONS,
    hd95_empty_mm: float = HD95_EMPTY_MM,
    hd_percentile: float = 95.0,
    hd95_mode: str = "max",
    nsd_tolerance_mm: float = NSD_TOLERANCE_MM,
    empty_rule: str = "count",
) -> dict[str, dict[str, float]]:
    """BraTS metrics of one case.

    Args:
        pred_regions: binary regions ``(C, H, W, D)`` in the channel order of ``regions`` (default TC, WT, ET),
            bool, {0, 1} or probabilities (thresholded at 0.5).
        ref_regions: reference regions, same shape.
        spacing: voxel size in mm per spatial axis (e.g. the NIfTI header zooms).
        regions: channel names.
        hd95_empty_mm: HD95 when exactly one of the two masks is empty.
        hd_percentile: percentile of the Hausdorff distance (95 for BraTS).
        hd95_mode: one of :data:`HD95_MODES`, see :func:`hd95`; also picks the boundary elements of ``nsd``.
        nsd_tolerance_mm: tolerance of the normalised surface Dice.
        empty_rule: ``"count"`` (BraTS: both empty is Dice 1, HD95 0, NSD 1) or ``"exclude"`` (Dice, HD95 and NSD
            are NaN where the reference region is empty).

    Returns:
        ``{region: {metric: value}}`` with the metrics of :data:`METRICS`.
    """
    p, r = _as_bool(pred_regions), _as_bool(ref_regions)
    if p.shape != r.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} differs from reference shape {tuple(r.shape)}")
    if p.ndim < 2 or p.shape[0] != len(regions):
        raise ValueError(
            f"expected regions of shape ({len(regions)}, *spatial) for {tuple(regions)}, got {tuple(p.shape)}"
        )
    sp = _spacing(spacing, p.ndim - 1)
    voxel_ml = math.prod(sp) / 1000.0

    pf, rf = p[None].double(), r[None].double()  # float64: exact ratios of voxel counts
    dice = compute_dice(pf, rf, include_background=True, ignore_empty=False)[0]
    confusion = get_confusion_matrix(
        pf, rf, include_background=True
    ).double()  # float32 counts: exact below 2**24 voxels
    sensitivity = compute_confusion_matrix_metric("sensitivity", confusion)[0]
    specificity = compute_confusion_matrix_metric("specificity", confusion)[0]

    out: dict[str, dict[str, float]] = {}
    for c, name in enumerate(regions):
        n_pred, n_ref = int(p[c].sum()), int(r[c].sum())
        sens = float(sensitivity[c])
        if n_ref == 0:  # MONAI: NaN (no positives); BraTS 2023 toolkit: 1 if both are empty, else 0
            sens = 1.0 if n_pred == 0 else 0.0
        spec = float(specificity[c])
        if math.isnan(spec):  # the reference fills the whole image: no negative voxel can be misclassified
            spec = 1.0
        empty = _empty_case(n_pred > 0, n_ref > 0, empty_rule, 1.0, 0.0)
        if empty is None:  # both masks have voxels: one boundary computation serves HD95 and NSD
            sd = surface_distances(p[c], r[c], sp, hd95_mode)
            dist, surface_dice = (
                hd95_from_distances(sd, hd_percentile, hd95_mode),
                nsd_from_distances(sd, nsd_tolerance_mm),
            )
        else:
            dist = _empty_case(n_pred > 0, n_ref > 0, empty_rule, 0.0, float(hd95_empty_mm))
            surface_dice = empty
        out[name] = {
            "dice": float(dice[c]) if not (n_ref == 0 and empty_rule == "exclude") else float("nan"),
            "hd95": float(dist),  # type: ignore[arg-type]
            "sensitivity": sens,
            "specificity": spec,
            "volume_pred_ml": n_pred * voxel_ml,
            "volume_ref_ml": n_ref * voxel_ml,
            "nsd": surface_dice,
        }
    return out


def summarize(
    rows: Iterable[Mapping[str, float | str]],
    metrics: Sequence[str] = METRICS,
    ddof: int = 1,
) -> dict[str, dict[str, dict[str, float]]]:
    """Statistics over cases, as in the BraTS result tables.

    Args:
        rows: long rows with a ``"region"`` key and one key per metric, one row per case and region (as in
            :func:`brats_pipeline.evaluation.scoring.score_folders`); metrics a row lacks are skipped for it.
        metrics: which metrics to summarise.
        ddof: delta degrees of freedom of the standard deviation: 1 (sample standard deviation), as the BraTS
            leaderboards compute it (pandas ``describe``); 0 for the population value.

    Returns:
        ``{region: {metric: {"n", "mean", "std", "median", "25quantile", "75quantile"}}}``, regions in
        :data:`REPORT_ORDER` first; ``n`` is the number of cases with a value (NaN, e.g. an empty reference under
        the ``"exclude"`` rule, is left out).
    """
    values: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        per_region = values.setdefault(str(row["region"]), {m: [] for m in metrics})
        for m in metrics:
            if m in row:
                per_region[m].append(float(row[m]))
    ordered = [r for r in REPORT_ORDER if r in values] + [r for r in values if r not in REPORT_ORDER]
    summary: dict[str, dict[str, dict[str, float]]] = {}
    nan = float("nan")
    for region in ordered:
        summary[region] = {}
        for m in metrics:
            v = np.asarray(values[region][m], dtype=np.float64)
            v = v[~np.isnan(v)]
            q25, q50, q75 = np.percentile(v, [25, 50, 75]) if v.size else (nan, nan, nan)
            summary[region][m] = {
                "n": int(v.size),
                "mean": float(v.mean()) if v.size else nan,
                "std": float(v.std(ddof=ddof)) if v.size > ddof else nan,
                "median": float(q50),
                "25quantile": float(q25),
                "75quantile": float(q75),
            }
    return summary


__all__: Sequence[str] = (
    "HD95_EMPTY_MM",
    "HD95_PENALTY_2023_MM",
    "HD95_MODES",
    "EMPTY_RULES",
    "METRICS",
    "NSD_TOLERANCE_MM",
    "REPORT_ORDER",
    "STATISTICS",
    "SurfaceDistances",
    "surface_distances",
    "hd95_from_distances",
    "nsd_from_distances",
    "hd95",
    "region_metrics",
    "summarize",
)
