"""BraTS metrics: empty-region rules, Dice/HD95/sensitivity/specificity/volumes by hand, MONAI agreement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric
from scipy import ndimage

from brats_pipeline.evaluation.metrics import HD95_EMPTY_MM, METRICS, NSD_TOLERANCE_MM, hd95, region_metrics, summarize
from brats_pipeline.evaluation.scoring import case_scores
from brats_pipeline.transforms.labels import LabelConventionError, regions_to_label

SHAPE = (12, 12, 12)


def _regions(*masks: np.ndarray) -> np.ndarray:
    return np.stack(masks).astype(np.float32)


def _cube(lo: int, hi: int) -> np.ndarray:
    m = np.zeros(SHAPE, dtype=bool)
    m[lo:hi, lo:hi, lo:hi] = True
    return m


def _plane(axis: int, index: int, side: int = 6) -> np.ndarray:
    """A one-voxel-thick square at ``index`` along ``axis``: every voxel is a surface voxel."""
    m = np.zeros(SHAPE, dtype=bool)
    sl = [slice(3, 3 + side)] * 3
    sl[axis] = slice(index, index + 1)
    m[tuple(sl)] = True
    return m


def _nsd(pred, ref, spacing=1.0, tolerance_mm=NSD_TOLERANCE_MM, mode="surface", empty_rule="count") -> float:
    """The normalised surface Dice of two masks ``(*spatial)`` as :func:`region_metrics` reports it."""
    m = region_metrics(
        pred[None], ref[None], spacing, ("ET",), hd95_mode=mode, nsd_tolerance_mm=tolerance_mm, empty_rule=empty_rule
    )
    return m["ET"]["nsd"]


def _rows(case_id: str, metrics) -> list[dict]:
    """``{region: {metric: value}}`` -> long rows ``{"case_id", "region", *metrics}`` as the scoring tables hold."""
    return [{"case_id": case_id, "region": region, **values} for region, values in metrics.items()]


def _medpy_directed(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """Independent reference (MedPy's construction): distances of a's surface voxels to b's surface, in mm."""
    a_edge = a ^ ndimage.binary_erosion(a)
    b_edge = b ^ ndimage.binary_erosion(b)
    dt = ndimage.distance_transform_edt(~b_edge, sampling=spacing)
    return dt[a_edge]


# --- the challenge's empty-region rules -----------------------------------------------------------------------


def test_both_empty():
    empty = np.zeros(SHAPE, dtype=bool)
    m = region_metrics(_regions(empty, empty, empty), _regions(empty, empty, empty))
    for region in ("TC", "WT", "ET"):
        assert m[region]["dice"] == 1.0
        assert m[region]["hd95"] == 0.0
        assert m[region]["sensitivity"] == 1.0
        assert m[region]["specificity"] == 1.0
        assert m[region]["volume_pred_ml"] == 0.0 and m[region]["volume_ref_ml"] == 0.0


@pytest.mark.parametrize("empty_side", ["pred", "ref"])
def test_exactly_one_empty(empty_side):
    empty, cube = np.zeros(SHAPE, dtype=bool), _cube(2, 6)
    pred, ref = (empty, cube) if empty_side == "pred" else (cube, empty)
    m = region_metrics(_regions(pred, pred, pred), _regions(ref, ref, ref))["ET"]
    assert m["dice"] == 0.0
    assert m["hd95"] == HD95_EMPTY_MM == 373.13
    assert m["sensitivity"] == 0.0  # reference empty: BraTS 2023 toolkit gives 0 for any prediction
    if empty_side == "ref":
        assert m["specificity"] == pytest.approx((12**3 - 64) / 12**3)
    assert hd95(pred, ref, hd95_empty_mm=374.0) == 374.0  # the penalty is an argument
    assert (
        region_metrics(_regions(pred, pred, pred), _regions(ref, ref, ref), hd95_empty_mm=374.0)["TC"]["hd95"] == 374.0
    )


def test_mixed_regions_get_their_own_rule():
    empty, cube = np.zeros(SHAPE, dtype=bool), _cube(2, 6)
    m = region_metrics(_regions(cube, cube, empty), _regions(cube, cube, cube))
    assert m["TC"]["dice"] == 1.0 and m["TC"]["hd95"] == 0.0
    assert m["ET"]["dice"] == 0.0 and m["ET"]["hd95"] == HD95_EMPTY_MM


# --- values by hand -----------------------------------------------------------------------------------------------


def test_dice_by_hand():
    pred = np.zeros(SHAPE, dtype=bool)
    ref = np.zeros(SHAPE, dtype=bool)
    pred[0:2, 0:2, 0:2] = True  # 8 voxels
    ref[1:3, 0:2, 0:3] = True  # 12 voxels, overlap: x=1, y 0..1, z 0..1 -> 4 voxels
    m = region_metrics(_regions(pred, ref, pred & ref), _regions(ref, ref, ref))
    assert m["TC"]["dice"] == pytest.approx(2 * 4 / (8 + 12))
    assert m["WT"]["dice"] == 1.0
    assert m["ET"]["dice"] == pytest.approx(2 * 4 / (4 + 12))


def test_sensitivity_specificity_volumes_by_hand():
    pred = np.zeros(SHAPE, dtype=bool)
    ref = np.zeros(SHAPE, dtype=bool)
    pred[0:2, 0:2, 0:2] = True  # 8
    ref[1:3, 0:2, 0:3] = True  # 12, tp = 4
    tp, fp, fn = 4, 4, 8
    tn = 12**3 - tp - fp - fn
    spacing = (1.0, 1.0, 2.5)
    m = region_metrics(_regions(pred, pred, pred), _regions(ref, ref, ref), spacing)["WT"]
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["volume_pred_ml"] == pytest.approx(8 * 2.5 / 1000)
    assert m["volume_ref_ml"] == pytest.approx(12 * 2.5 / 1000)
    assert set(m) == set(METRICS)


@pytest.mark.parametrize(
    "axis, k, spacing, expected",
    [
        (2, 3, (1.0, 1.0, 1.0), 3.0),
        (2, 2, (1.0, 1.0, 2.5), 5.0),  # offset along the anisotropic axis: 2.5 mm per voxel
        (2, 4, (1, 1, 2.5), 10.0),  # mixed int/float spacing (MONAI alone rejects it)
        (0, 3, (2.0, 0.7, 0.7), 6.0),
        (1, 1, (0.5, 3.0, 1.0), 3.0),
    ],
)
def test_hd95_parallel_planes(axis, k, spacing, expected):
    """Two parallel planes k voxels apart: every surface distance, in both directions, is k * spacing[axis]."""
    a, b = _plane(axis, 2), _plane(axis, 2 + k)
    assert hd95(a, b, spacing) == pytest.approx(expected)
    assert hd95(a, b, spacing, mode="pooled") == pytest.approx(expected)
    assert hd95(a, b, spacing, percentile=100) == pytest.approx(expected)
    m = region_metrics(_regions(a, a, a), _regions(b, b, b), spacing)
    assert m["ET"]["hd95"] == pytest.approx(expected)
    assert m["TC"]["dice"] == 0.0


def test_hd95_identical_masks_is_zero():
    cube = _cube(3, 9)
    assert hd95(cube, cube, (1.0, 2.0, 3.0)) == 0.0


def test_hd95_max_versus_pooled_definitions():
    """pred = 4x4 plane, ref = the plane plus one voxel 4 mm above it.

    pred -> ref: 16 zeros. ref -> pred: 16 zeros and one 4. MONAI / BraTS 2023 ("max"): the 95th percentile of the
    17 ref -> pred distances, linear interpolation at rank 0.95 * 16 = 15.2 -> 0.2 * 4 = 0.8 mm. MedPy ("pooled"):
    the 95th percentile of all 33 distances: rank 0.95 * 32 = 30.4 < 32 -> 0.
    """
    pred = _plane(2, 3, side=4)
    ref = pred.copy()
    ref[5, 5, 7] = True
    assert hd95(pred, ref) == pytest.approx(0.8)
    assert hd95(ref, pred) == pytest.approx(0.8)
    assert hd95(pred, ref, mode="pooled") == pytest.approx(0.0)
    assert hd95(pred, ref, percentile=100) == pytest.approx(4.0)


def test_hd95_matches_independent_reference_on_random_masks():
    rng = np.random.default_rng(0)
    spacing = (1.0, 1.3, 2.5)
    for _ in range(3):
        a = ndimage.binary_opening(rng.random(SHAPE) > 0.5)
        b = ndimage.binary_opening(rng.random(SHAPE) > 0.5)
        d_ab, d_ba = _medpy_directed(a, b, spacing), _medpy_directed(b, a, spacing)
        assert hd95(a, b, spacing) == pytest.approx(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)), rel=1e-5)
        assert hd95(a, b, spacing, mode="pooled") == pytest.approx(np.percentile(np.hstack([d_ab, d_ba]), 95), rel=1e-5)


def test_input_validation():
    with pytest.raises(ValueError, match="shape"):
        region_metrics(np.zeros((3, 4, 4, 4)), np.zeros((3, 4, 4, 5)))
    with pytest.raises(ValueError, match="TC"):
        region_metrics(np.zeros((2, 4, 4, 4)), np.zeros((2, 4, 4, 4)))
    with pytest.raises(ValueError, match="'mean'(.|\n)*(surface|pooled|max)"):
        hd95(_cube(2, 4), _cube(2, 5), mode="mean")


# --- label maps -----------------------------------------------------------------------------------------------------


def test_case_scores_brats2023_labels():
    ref = np.zeros(SHAPE, dtype=np.uint8)
    ref[2:8, 2:8, 2:8] = 2  # edema
    ref[3:7, 3:7, 3:7] = 1  # necrosis
    ref[4:6, 4:6, 4:6] = 3  # ET (2023 value)
    m = case_scores(ref, ref, "brats2023", (1.0, 1.0, 1.0))
    assert m["ET"]["volume_ref_ml"] == pytest.approx(8 / 1000)
    assert m["TC"]["volume_ref_ml"] == pytest.approx(64 / 1000)
    assert m["WT"]["volume_ref_ml"] == pytest.approx(216 / 1000)
    assert all(m[r]["dice"] == 1.0 and m[r]["hd95"] == 0.0 for r in m)

    pred_2018 = np.where(ref == 3, 4, ref)  # same segmentation in the 2018 convention
    m2 = case_scores(pred_2018, ref, "brats2023", pred_convention="brats2018")
    assert m2 == m
    with pytest.raises(LabelConventionError, match="pred.nii.gz"):
        case_scores(pred_2018, ref, "brats2023", pred_source="pred.nii.gz")


# --- MONAI metrics used during training ---------------------------------------------------------------------------


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Four cases covering overlap, both-empty, pred-empty and ref-empty regions; (B, 3, 12, 12, 12)."""
    empty, a, b = np.zeros(SHAPE, dtype=bool), _cube(2, 7), _cube(3, 9)
    preds = [_regions(a, b, a), _regions(empty, b, empty), _regions(empty, a, a), _regions(a, a, b)]
    refs = [_regions(b, b, a & b), _regions(empty, a, empty), _regions(a, a, empty), _regions(empty, b, b)]
    return torch.as_tensor(np.stack(preds)), torch.as_tensor(np.stack(refs))


def test_monai_dice_metric_ignore_empty_false_matches_brats_rule():
    pred, ref = _batch()
    metric = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=False)
    metric(y_pred=pred, y=ref)
    monai_mean = metric.aggregate()
    per_case = [region_metrics(p, r) for p, r in zip(pred, ref, strict=True)]
    ours = torch.tensor([np.mean([m[region]["dice"] for m in per_case]) for region in ("TC", "WT", "ET")])
    assert torch.allclose(monai_mean.double(), ours.double(), atol=1e-6)
    # the default (ignore_empty=True) would drop the empty references instead of scoring them
    default = DiceMetric(include_background=True, reduction="none")
    default(y_pred=pred, y=ref)
    assert torch.isnan(default.aggregate()).any()


def test_region_metrics_on_label_round_trip():
    pred, ref = _batch()
    label = regions_to_label(ref[0], "brats2018")
    assert case_scores(label, label, "brats2018")["WT"]["dice"] == 1.0


# --- summary statistics -------------------------------------------------------------------------------------------


def test_summarize_statistics():
    rows = []
    for case, value in enumerate([0.2, 0.4, 0.6, 1.0]):
        m = {r: {k: value for k in METRICS} for r in ("TC", "WT", "ET")}
        m["ET"]["hd95"] = 10.0 * case
        rows += _rows(f"case{case}", m)
    s = summarize(rows)
    assert list(s) == ["ET", "TC", "WT"]
    d = s["WT"]["dice"]
    assert d["n"] == 4
    assert d["mean"] == pytest.approx(0.55)
    assert d["std"] == pytest.approx(math.sqrt(((0.35**2) + (0.15**2) + (0.05**2) + (0.45**2)) / 3))  # ddof=1
    assert d["median"] == pytest.approx(0.5)
    assert d["25quantile"] == pytest.approx(0.35)
    assert d["75quantile"] == pytest.approx(0.7)
    h = s["ET"]["hd95"]
    assert (h["mean"], h["median"], h["25quantile"], h["75quantile"]) == pytest.approx((15.0, 15.0, 7.5, 22.5))
    assert summarize(rows, ddof=0)["WT"]["dice"]["std"] == pytest.approx(np.std([0.2, 0.4, 0.6, 1.0], ddof=0))


# --- surface-area-weighted HD95 (BraTS 2023+ toolkit), NSD, empty rules --------------------------------------------


def _toolkit_case() -> tuple[np.ndarray, np.ndarray]:
    """BraTS 2023 labels, 40x40x32: a tumor predicted one voxel off, a second tumor missed, one false-positive blob."""
    shape = (40, 40, 32)
    ii, jj, kk = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")

    def ball(c, r):
        return (ii - c[0]) ** 2 + (jj - c[1]) ** 2 + (kk - c[2]) ** 2 <= r * r

    ref = np.zeros(shape, np.uint8)
    ref[ball((14, 14, 14), 9)] = 2
    ref[ball((14, 14, 14), 6)] = 3
    ref[ball((14, 14, 14), 3)] = 1
    ref[ball((30, 30, 22), 5)] = 2
    ref[ball((30, 30, 22), 3)] = 3
    pred = np.roll(ref, 1, axis=0)
    pred[ball((30, 30, 22), 6)] = 0
    pred[ball((32, 8, 6), 4)] = 3
    return ref, pred


@pytest.mark.parametrize(
    "spacing, expected",  # the BraTS 2023 toolkit's Legacy_HD95 of this case (github.com/rachitsaluja/BraTS-2023-Metrics)
    [
        ((1.0, 1.0, 1.0), {"WT": 16.822603841260722, "TC": 18.2208671582886, "ET": 18.027756377319946}),
        ((1.0, 1.0, 2.0), {"WT": 18.547236990991408, "TC": 20.42057785666214, "ET": 20.049937655763422}),
    ],
)
def test_surface_hd95_reproduces_the_2023_toolkit(spacing, expected):
    ref, pred = _toolkit_case()
    m = case_scores(pred, ref, "brats2023", spacing, hd95_mode="surface", hd95_empty_mm=374.0)
    for region, value in expected.items():
        assert m[region]["hd95"] == pytest.approx(value, rel=1e-6)
    # the voxel-based definitions differ on the same masks, by design
    voxels = case_scores(pred, ref, "brats2023", spacing, hd95_mode="max")["WT"]["hd95"]
    assert voxels != pytest.approx(expected["WT"], rel=1e-3)


def test_surface_hd95_parallel_planes_and_identity():
    a, b = _plane(2, 2), _plane(2, 5)
    assert hd95(a, a, (1.0, 2.0, 3.0), mode="surface") == 0.0
    # corner-grid surfaces of two one-voxel plates 3 apart lie 2 and 3 voxels apart (plus the rims): P95 is 3 voxels
    assert hd95(a, b, (1.0, 1.0, 2.5), mode="surface") == pytest.approx(7.5)
    assert hd95(a, b, mode="surface") == hd95(b, a, mode="surface")


def test_nsd_known_cases():
    a, b = _plane(2, 2), _plane(2, 4)  # every boundary voxel 2 slices from the other plate
    spacing = (1.0, 1.0, 2.5)
    assert _nsd(a, a, spacing) == 1.0 and _nsd(a, a, spacing, mode="max") == 1.0
    assert _nsd(a, b, spacing, tolerance_mm=4.9, mode="max") == 0.0  # 2 x 2.5 mm = 5 mm apart: spacing honoured
    assert _nsd(a, b, spacing, tolerance_mm=5.0, mode="max") == 1.0
    assert _nsd(a, b, (2.5, 1.0, 1.0), tolerance_mm=2.0, mode="max") == 1.0  # the shift is along the 1 mm axis
    empty = np.zeros(SHAPE, dtype=bool)
    assert _nsd(empty, empty) == 1.0 and _nsd(a, empty) == 0.0 and _nsd(empty, a) == 0.0
    assert math.isnan(_nsd(empty, empty, empty_rule="exclude"))


@pytest.mark.parametrize("mode, subvoxels", [("surface", True), ("max", False), ("pooled", False)])
def test_nsd_agrees_with_monai(mode, subvoxels):
    from monai.metrics import compute_surface_dice

    rng = np.random.default_rng(1)
    spacing = (1.0, 1.5, 2.0)
    a = ndimage.binary_opening(rng.random(SHAPE) > 0.4)
    b = ndimage.binary_opening(rng.random(SHAPE) > 0.4)
    for tol in (0.5, 1.0, 2.0):
        theirs = compute_surface_dice(
            torch.as_tensor(a)[None, None].float(),
            torch.as_tensor(b)[None, None].float(),
            [tol],
            include_background=True,
            spacing=spacing,
            use_subvoxels=subvoxels,
        )
        assert _nsd(a, b, spacing, tol, mode=mode) == pytest.approx(float(theirs), rel=1e-5)


def test_region_metrics_nsd_and_exclude_rule():
    empty, cube = np.zeros(SHAPE, dtype=bool), _cube(2, 6)
    m = region_metrics(_regions(cube, empty, cube), _regions(cube, empty, empty), nsd_tolerance_mm=1.0)
    assert m["TC"]["nsd"] == 1.0 and m["WT"]["nsd"] == 1.0 and m["ET"]["nsd"] == 0.0
    x = region_metrics(_regions(cube, empty, cube), _regions(cube, empty, empty), empty_rule="exclude")
    assert x["TC"]["dice"] == 1.0 and x["TC"]["hd95"] == 0.0
    for region in ("WT", "ET"):  # empty reference: no score, whatever the prediction
        assert all(math.isnan(x[region][k]) for k in ("dice", "hd95", "nsd"))
    missed = region_metrics(_regions(empty, empty, empty), _regions(cube, cube, cube), empty_rule="exclude")["ET"]
    assert (missed["dice"], missed["hd95"], missed["nsd"]) == (0.0, HD95_EMPTY_MM, 0.0)
    rows = _rows("a", x) + _rows("b", m)
    s = summarize(rows)
    assert s["WT"]["dice"]["n"] == 1 and s["WT"]["dice"]["mean"] == 1.0 and math.isnan(s["WT"]["dice"]["std"])
    assert s["TC"]["dice"]["n"] == 2
