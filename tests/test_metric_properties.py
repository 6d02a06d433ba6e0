"""Property tests (hypothesis) of the BraTS metrics and of the label conversions."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from brats_pipeline.evaluation.metrics import HD95_EMPTY_MM, hd95, region_metrics
from brats_pipeline.transforms.labels import (
    CONVENTIONS,
    classes_to_label,
    label_to_classes,
    label_to_regions,
    regions_to_label,
)

SETTINGS = settings(max_examples=40, deadline=None)
shapes = st.tuples(st.integers(2, 8), st.integers(2, 8), st.integers(2, 8))
spacings = st.tuples(*[st.floats(0.5, 3.0, allow_nan=False) for _ in range(3)])


@st.composite
def mask_pairs(draw, channels: int = 1):
    shape = (channels, *draw(shapes))
    a = draw(arrays(np.bool_, shape))
    b = draw(arrays(np.bool_, shape))
    return a, b


@st.composite
def region_pairs(draw):
    """Nested TC, WT, ET regions of two random label maps (what a real prediction and reference look like)."""
    shape = draw(shapes)
    labels = [draw(arrays(np.uint8, shape, elements=st.sampled_from([0, 1, 2, 4]))) for _ in range(2)]
    return tuple(label_to_regions(lab, "brats2018").numpy() for lab in labels)


@SETTINGS
@given(region_pairs(), spacings)
def test_metrics_symmetric_and_bounded(pair, spacing):
    pred, ref = pair
    forward = region_metrics(pred, ref, spacing)
    backward = region_metrics(ref, pred, spacing)
    for region in ("TC", "WT", "ET"):
        f, b = forward[region], backward[region]
        assert 0.0 <= f["dice"] <= 1.0
        assert f["dice"] == b["dice"]
        assert f["hd95"] >= 0.0
        assert np.isclose(f["hd95"], b["hd95"], rtol=1e-6)
        assert 0.0 <= f["sensitivity"] <= 1.0 and 0.0 <= f["specificity"] <= 1.0
        assert f["volume_pred_ml"] == b["volume_ref_ml"] and f["volume_ref_ml"] == b["volume_pred_ml"]


@SETTINGS
@given(mask_pairs(), spacings)
def test_hd95_pooled_symmetric(pair, spacing):
    a, b = pair
    assert np.isclose(hd95(a[0], b[0], spacing, mode="pooled"), hd95(b[0], a[0], spacing, mode="pooled"), rtol=1e-6)


@SETTINGS
@given(region_pairs(), spacings)
def test_identical_masks_score_perfectly(pair, spacing):
    pred, _ = pair
    m = region_metrics(pred, pred, spacing)
    for region in m.values():
        assert region["dice"] == 1.0
        assert region["hd95"] == 0.0
        assert region["sensitivity"] == 1.0 and region["specificity"] == 1.0


@SETTINGS
@given(mask_pairs(channels=3), spacings)
def test_empty_rules(pair, spacing):
    a, _ = pair
    empty = np.zeros_like(a)
    both = region_metrics(empty, empty, spacing)
    assert all(m["dice"] == 1.0 and m["hd95"] == 0.0 for m in both.values())
    for pred, ref in ((a, empty), (empty, a)):
        m = region_metrics(pred, ref, spacing)
        for c, region in enumerate(("TC", "WT", "ET")):
            if a[c].any():
                assert m[region]["dice"] == 0.0
                assert m[region]["hd95"] == HD95_EMPTY_MM
            else:
                assert m[region]["dice"] == 1.0 and m[region]["hd95"] == 0.0


@SETTINGS
@given(st.sampled_from(sorted(CONVENTIONS)), shapes, st.data())
def test_labels_regions_labels_round_trip(name, shape, data):
    conv = CONVENTIONS[name]
    label = data.draw(arrays(np.uint8, shape, elements=st.sampled_from(conv.values)))
    regions = label_to_regions(label, name)
    assert regions.shape == (3, *shape)
    back = regions_to_label(regions, name)
    assert back.shape == (1, *shape) and back.dtype == torch.uint8
    assert np.array_equal(back[0].numpy(), label)


@SETTINGS
@given(st.sampled_from(sorted(CONVENTIONS)), shapes, st.data())
def test_classes_labels_classes_round_trip(name, shape, data):
    classes = data.draw(arrays(np.uint8, (1, *shape), elements=st.integers(0, 3)))
    label = classes_to_label(torch.as_tensor(classes), name)
    assert set(np.unique(label.numpy())) <= set(CONVENTIONS[name].values)
    back = label_to_classes(label, name)
    assert np.array_equal(back.numpy(), classes.astype(np.float32))
