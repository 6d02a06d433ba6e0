"""Lesion-wise Dice / HD95 (BraTS 2023+): hand-built cases whose lesion counts and scores are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from brats_pipeline.evaluation.lesions import CHALLENGES, LESION_METRICS, get_challenge, lesion_wise_metrics
from brats_pipeline.evaluation.metrics import HD95_PENALTY_2023_MM, hd95

SHAPE = (48, 48, 40)
PENALTY = HD95_PENALTY_2023_MM


def _box(mask: np.ndarray, lo: tuple[int, int, int], size: tuple[int, int, int]) -> np.ndarray:
    mask[tuple(slice(a, a + s) for a, s in zip(lo, size, strict=True))] = True
    return mask


def _empty() -> np.ndarray:
    return np.zeros(SHAPE, dtype=bool)


def test_presets():
    assert (CHALLENGES["GLI"].dilation, CHALLENGES["GLI"].volume_threshold_mm3) == (3, 50.0)
    assert get_challenge("BraTS-MET") == CHALLENGES["MET"] and CHALLENGES["MET"].volume_threshold_mm3 == 2.0
    assert get_challenge("men").dilation == 1 and get_challenge("SSA") == get_challenge("PED") == get_challenge("GLI")
    with pytest.raises(ValueError, match="GLI"):
        get_challenge("XYZ")


def test_identical_single_lesion():
    ref = _box(_empty(), (10, 10, 10), (5, 5, 5))
    res = lesion_wise_metrics(ref, ref)
    assert (res.dice, res.hd95, res.tp, res.fp, res.fn) == (1.0, 0.0, 1, 0, 0)
    assert set(res.as_row()) == set(LESION_METRICS)


def test_two_components_merged_by_dilation():
    """Two 125-voxel cubes 3 voxels apart are one lesion for GLI (3 dilations) and two for MEN (1 dilation)."""
    ref = _box(_box(_empty(), (10, 10, 10), (5, 5, 5)), (10, 10, 18), (5, 5, 5))  # gap of 3 voxels along z
    pred = _box(_empty(), (10, 10, 10), (5, 5, 5))  # finds the first cube only
    gli = lesion_wise_metrics(pred, ref, dilation=3)
    assert len(gli.lesions) == 1 and gli.lesions[0].volume_mm3 == 250.0
    assert (gli.tp, gli.fp, gli.fn) == (1, 0, 0)
    assert gli.dice == pytest.approx(2 * 125 / (250 + 125))  # one lesion: the matched cube against both cubes
    assert gli.hd95 == pytest.approx(hd95(pred, ref, mode="surface"))
    men = lesion_wise_metrics(pred, ref, dilation=1)
    assert len(men.lesions) == 2 and (men.tp, men.fp, men.fn) == (1, 0, 1)
    assert men.dice == pytest.approx((1.0 + 0.0) / 2)
    assert men.hd95 == pytest.approx((0.0 + PENALTY) / 2)


def test_prediction_matched_within_the_dilation_but_not_touching():
    """A component 2 voxels from the lesion meets its 3-voxel dilation: a TP with Dice 0, not an FP."""
    ref = _box(_empty(), (10, 10, 10), (5, 5, 5))
    pred = _box(_empty(), (10, 10, 17), (5, 5, 5))
    res = lesion_wise_metrics(pred, ref)
    assert (res.tp, res.fp, res.fn) == (1, 0, 0)
    assert res.dice == 0.0 and 0.0 < res.hd95 < 20.0
    far = lesion_wise_metrics(_box(_empty(), (10, 10, 19), (5, 5, 5)), ref)  # 4 voxels away: outside the dilation
    assert (far.tp, far.fp, far.fn) == (0, 1, 1)
    assert (far.dice, far.hd95) == (0.0, PENALTY)


def test_small_lesion_under_threshold_left_out():
    big = _box(_empty(), (10, 10, 10), (5, 5, 5))  # 125 voxels
    ref = _box(big.copy(), (30, 30, 30), (3, 3, 3))  # + 27 voxels: at most 50, left out
    res = lesion_wise_metrics(big, ref)  # the small lesion is missed: not counted as FN
    assert (res.dice, res.hd95, res.tp, res.fp, res.fn) == (1.0, 0.0, 1, 0, 0)
    assert [les.counted for les in res.lesions] == [True, False]
    small = lesion_wise_metrics(ref, ref)  # predicting it is no false positive either
    assert (small.dice, small.tp, small.fp, small.fn) == (1.0, 1, 0, 0)
    exactly = _box(big.copy(), (30, 30, 30), (5, 5, 2))  # 50 voxels: "at or under" the threshold
    assert lesion_wise_metrics(big, exactly).fn == 0
    assert lesion_wise_metrics(big, exactly, volume_threshold_mm3=49).fn == 1
    # the threshold is a volume: with 2 mm slices the 27-voxel lesion has 54 mm^3 and counts
    assert lesion_wise_metrics(big, ref, spacing=(1.0, 1.0, 2.0)).fn == 1


def test_false_positive_and_missed_lesions():
    ref = _box(_box(_empty(), (5, 5, 5), (6, 6, 6)), (30, 30, 25), (6, 6, 6))
    pred = _box(_box(_empty(), (5, 5, 5), (6, 6, 6)), (30, 5, 25), (4, 4, 4))  # lesion 1 exact, lesion 2 missed, 1 FP
    res = lesion_wise_metrics(pred, ref)
    assert (res.tp, res.fp, res.fn) == (1, 1, 1)
    assert res.dice == pytest.approx((1.0 + 0.0 + 0.0) / 3)
    assert res.hd95 == pytest.approx((0.0 + PENALTY + PENALTY) / 3)
    assert lesion_wise_metrics(pred, ref, hd95_penalty_mm=373.13).hd95 == pytest.approx(2 * 373.13 / 3)


def test_one_component_matching_two_lesions():
    """A bridge over two lesions matches both; each lesion is scored against the whole component."""
    ref = _box(_box(_empty(), (10, 10, 5), (5, 5, 5)), (10, 10, 25), (5, 5, 5))
    pred = _box(_empty(), (10, 10, 5), (5, 5, 25))
    res = lesion_wise_metrics(pred, ref)
    assert (res.tp, res.fp, res.fn) == (2, 0, 0)
    assert res.dice == pytest.approx(2 * 125 / (125 + 625))


@pytest.mark.parametrize("empty_rule, expected", [("count", (1.0, 0.0)), ("exclude", (math.nan, math.nan))])
def test_empty_regions(empty_rule, expected):
    both = lesion_wise_metrics(_empty(), _empty(), empty_rule=empty_rule)
    np.testing.assert_equal((both.dice, both.hd95, both.tp, both.fp, both.fn), (*expected, 0, 0, 0))
    blob = _box(_empty(), (10, 10, 10), (5, 5, 5))
    pred_only = lesion_wise_metrics(blob, _empty(), empty_rule=empty_rule)  # every component is a false positive
    if empty_rule == "count":
        assert (pred_only.dice, pred_only.hd95, pred_only.fp) == (0.0, PENALTY, 1)
    else:  # the reference says nothing about the region
        assert math.isnan(pred_only.dice)
    ref_only = lesion_wise_metrics(_empty(), blob, empty_rule=empty_rule)
    assert (ref_only.dice, ref_only.hd95, ref_only.fn) == (0.0, PENALTY, 1)


def test_only_small_lesions_and_nothing_predicted_scores_as_empty():
    ref = _box(_empty(), (10, 10, 10), (3, 3, 3))
    res = lesion_wise_metrics(_empty(), ref)
    assert (res.dice, res.hd95, res.tp, res.fp, res.fn) == (1.0, 0.0, 0, 0, 0)


def test_anisotropic_spacing():
    """A prediction shifted by 2 slices of 2.5 mm: HD95 5 mm on a flat slab, the dilation counts voxels."""
    ref = _box(_empty(), (10, 10, 10), (12, 12, 1))
    pred = _box(_empty(), (10, 10, 12), (12, 12, 1))
    res = lesion_wise_metrics(pred, ref, spacing=(1.0, 1.0, 2.5))
    assert (res.tp, res.fp, res.fn) == (1, 0, 0)
    assert res.hd95 == pytest.approx(5.0)
    assert res.lesions[0].volume_mm3 == pytest.approx(144 * 2.5)
    iso = lesion_wise_metrics(pred, ref)
    assert iso.hd95 == pytest.approx(2.0)


def test_touching_the_image_border():
    ref = _box(_empty(), (0, 0, 0), (5, 5, 5))
    pred = _box(_empty(), (0, 0, 0), (5, 5, 4))
    res = lesion_wise_metrics(pred, ref)
    assert res.tp == 1 and res.dice == pytest.approx(2 * 100 / 225)


def test_matches_a_brute_force_implementation():
    """Random blobs against a direct transcription of the definition on the full volume (no bounding boxes)."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    struct26, struct18 = ndimage.generate_binary_structure(3, 3), ndimage.generate_binary_structure(3, 2)
    for _ in range(3):
        ref = ndimage.binary_opening(ndimage.gaussian_filter(rng.random(SHAPE), 2) > 0.525)
        pred = ndimage.binary_opening(ndimage.gaussian_filter(rng.random(SHAPE), 2) > 0.525) | (
            ref & (rng.random(SHAPE) > 0.3)
        )
        res = lesion_wise_metrics(pred, ref, dilation=1, hd95_mode="max")
        zones, n = ndimage.label(ndimage.binary_dilation(ref, struct18, iterations=1), struct26)
        comps, n_comp = ndimage.label(pred, struct26)
        dices, dists, used = [], [], set()
        for k in range(1, n + 1):
            lesion = ref & (zones == k)
            hit = set(np.unique(comps[zones == k])) - {0}
            used |= hit
            if lesion.sum() <= 50:
                continue
            matched = np.isin(comps, list(hit))
            dices.append(2 * (lesion & matched).sum() / (lesion.sum() + matched.sum()))
            dists.append(hd95(matched, lesion, mode="max", hd95_empty_mm=PENALTY))
        fp = n_comp - len(used)
        assert len(dices) >= 3 and fp >= 1
        assert res.fp == fp and res.tp + res.fn == len(dices)
        assert res.dice == pytest.approx(sum(dices) / (len(dices) + fp))
        assert res.hd95 == pytest.approx((sum(dists) + fp * PENALTY) / (len(dices) + fp))


def test_input_validation():
    with pytest.raises(ValueError, match="shape"):
        lesion_wise_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))
    with pytest.raises(ValueError, match="'skip'(.|\n)*(count|exclude)"):
        lesion_wise_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), empty_rule="skip")
