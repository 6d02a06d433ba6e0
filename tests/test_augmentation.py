"""The one-copy training augmentation (``brats_pipeline.transforms.augmentation``) against the MONAI chains it replaces: for the
parameters it drew, the same tensors and affines as MONAI's transforms; the same crop corners as ``RandSpatialCropd``
seeded alike; and the shipped train.json of each bundle uses it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import (
    CropForegroundd,
    Flip,
    RandSpatialCropd,
    ScaleIntensity,
    ShiftIntensity,
    SpatialCropd,
    SpatialPadd,
    Zoomd,
)

from brats_pipeline.transforms.augmentation import (
    RandCropFromBoxd,
    RandFlipAxesd,
    RandShiftScaleIntensityd,
    RestoreFieldOfViewd,
)

REPO = Path(__file__).resolve().parents[1]
KEYS = ["image", "label"]


def brain_case(shape=(40, 36, 30), seed: int = 0) -> dict:
    """A 4-channel volume whose non-zero 'brain' touches the first voxel of axis 0 (so the ``k_divisible`` padding
    reaches outside the volume) and a uint8 label map, both cropped to the brain box by ``CropForegroundd``."""
    from monai.data import MetaTensor

    gen = torch.Generator().manual_seed(seed)
    image = torch.zeros((4, *shape))
    image[:, 0:27, 5:30, 4:25] = torch.rand((4, 27, 25, 21), generator=gen) + 0.1
    label = torch.zeros((1, *shape), dtype=torch.uint8)
    label[:, 8:20, 10:22, 8:18] = torch.randint(0, 5, (1, 12, 12, 10), generator=gen).to(torch.uint8)
    affine = torch.tensor([[-1.0, 0, 0, 10], [0, -1.0, 0, 20], [0, 0, 1.0, -5], [0, 0, 0, 1]], dtype=torch.float64)
    data = {"image": MetaTensor(image, affine=affine), "label": MetaTensor(label, affine=affine)}
    return CropForegroundd(KEYS, source_key="image", k_divisible=8, allow_smaller=True)(data)


def assert_same(ours: dict, reference: dict) -> None:
    for key in KEYS:
        a, b = ours[key], reference[key]
        assert a.shape == b.shape, key
        assert torch.equal(a.as_tensor().to(b.dtype), b.as_tensor()), key
        assert np.allclose(a.affine, b.affine), (key, a.affine, b.affine)


@pytest.mark.parametrize("roi", [(24, 24, 16), (32, 40, 16)])  # the second pads axis 1 (36 < 40)
def test_full_field_of_view_crop_equals_restore_pad_and_crop(roi):
    """segresnet_vae's crop from the cached brain box = MONAI's chain on the restored whole volume, and the corners are
    RandSpatialCropd's for the same seed."""
    case = brain_case()
    assert case["image"].shape[1:] != (40, 36, 30)  # cropped
    restored = RestoreFieldOfViewd(KEYS)(case)
    padded = SpatialPadd(KEYS, spatial_size=roi)(restored)
    corners = set()
    for seed in range(12):
        crop = RandCropFromBoxd(KEYS, roi_size=roi, full_field_of_view=True).set_random_state(seed)
        ours = crop(case)
        reference = SpatialCropd(KEYS, roi_start=crop.corner, roi_end=np.add(crop.corner, roi))(padded)
        assert_same(ours, reference)
        monai_crop = RandSpatialCropd(KEYS, roi_size=roi, random_size=False).set_random_state(seed)
        assert torch.equal(monai_crop(padded)["image"].as_tensor(), ours["image"].as_tensor())
        corners.add(crop.corner)
    assert len(corners) > 6  # the corner is random


def test_full_field_of_view_without_a_crop_record_is_the_whole_input():
    image = torch.arange(4 * 10 * 12 * 8, dtype=torch.float32).reshape(4, 10, 12, 8)
    crop = RandCropFromBoxd("image", roi_size=(6, 6, 6), full_field_of_view=True).set_random_state(3)
    out = crop({"image": image})["image"]
    c = crop.corner
    assert torch.equal(out, image[:, c[0] : c[0] + 6, c[1] : c[1] + 6, c[2] : c[2] + 6])


@pytest.mark.parametrize("zoom", [(0.7, 1.1), ([0.6, 0.8, 0.7], [1.2, 1.0, 1.3])])
def test_zoomed_box_crop_equals_zoom_pad_and_crop(zoom):
    """espnet3d's zoom + crop of the brain box = MONAI's Zoomd(keep_size=False) + SpatialPadd + crop, bit for bit
    (trilinear image, nearest label), for isotropic and per-axis factors."""
    case = brain_case(seed=1)
    roi = (24, 24, 24)
    seen = set()
    for seed in range(10):
        crop = RandCropFromBoxd(
            KEYS,
            roi_size=roi,
            zoom_prob=1.0,
            min_zoom=zoom[0],
            max_zoom=zoom[1],
            mode=["trilinear", "nearest"],
            align_corners=[False, None],
        ).set_random_state(seed)
        ours = crop(case)
        assert crop.zoom is not None
        zoomed = Zoomd(
            KEYS, zoom=crop.zoom, keep_size=False, mode=["trilinear", "nearest"], align_corners=[False, None]
        )(case)
        padded = SpatialPadd(KEYS, spatial_size=roi)(zoomed)
        reference = SpatialCropd(KEYS, roi_start=crop.corner, roi_end=np.add(crop.corner, roi))(padded)
        assert_same(ours, reference)
        assert ours["label"].dtype == torch.uint8  # stays compact for the label conversion that follows
        seen.add(tuple(round(z, 3) for z in crop.zoom))
    assert len(seen) == 10
    if isinstance(zoom[0], list):
        assert any(len(set(z)) == 3 for z in seen)  # one factor per axis


def test_zoom_probability_and_the_plain_crop():
    case = brain_case(seed=2)
    zoomed = 0
    for seed in range(40):
        crop = RandCropFromBoxd(KEYS, roi_size=(16, 16, 16), zoom_prob=0.5, min_zoom=0.8, max_zoom=1.2)
        out = crop.set_random_state(seed)(case)
        if crop.zoom is None:
            c = crop.corner
            box = case["image"].as_tensor()
            assert torch.equal(out["image"].as_tensor(), box[:, c[0] : c[0] + 16, c[1] : c[1] + 16, c[2] : c[2] + 16])
        zoomed += crop.zoom is not None
    assert 10 < zoomed < 30


def test_shift_then_scale_equals_monai_per_channel():
    image = torch.randn(4, 9, 8, 7)
    tf = RandShiftScaleIntensityd("image", offsets=0.1, factors=0.1).set_random_state(5)
    out = tf({"image": image})["image"]
    assert len(set(tf.offset_values)) == 4 and all(-0.1 <= o <= 0.1 for o in tf.offset_values)
    assert all(-0.1 <= f <= 0.1 for f in tf.factor_values)
    for c in range(4):
        reference = ScaleIntensity(minv=None, maxv=None, factor=tf.factor_values[c])(
            ShiftIntensity(tf.offset_values[c])(image[c])
        )
        assert torch.equal(out[c], torch.as_tensor(reference))
    assert not torch.equal(out, image) and torch.equal(image, image.clone())  # the input is not modified


def test_flips_equal_monai_flips_one_axis_at_a_time():
    case = brain_case(seed=3)
    patterns = set()
    for seed in range(30):
        tf = RandFlipAxesd(KEYS, prob=0.5).set_random_state(seed)
        ours = tf(case)
        reference = dict(case)
        for axis in tf.flipped:
            reference = {k: Flip(spatial_axis=axis)(reference[k]) for k in KEYS}
        assert_same(ours, reference)
        patterns.add(tf.flipped)
    assert len(patterns) == 8  # every subset of the three axes occurs


@pytest.mark.parametrize("bundle", ["segresnet_vae", "espnet3d"])
def test_shipped_train_json_uses_the_one_copy_augmentation(bundle):
    """The paper chains of both bundles are these transforms, with the paper keys wired in, and the label is converted
    after the crop (on the crop's voxels only)."""
    config = json.loads((REPO / "bundles" / bundle / "configs" / "train.json").read_text())
    targets = [t["_target_"].rsplit(".", 1)[-1] for t in config["train"]["random_transforms"]]
    crop = config["train"]["random_transforms"][0]
    assert targets[0] == "RandCropFromBoxd" and crop["roi_size"] == "@roi_size"
    assert crop["full_field_of_view"] == "$not @train_brain_crop"
    assert "RandFlipAxesd" in targets and not any(t.startswith(("RandFlipd", "RandSpatialCropd")) for t in targets)
    assert config["train"]["transforms"] == "$@train#random_transforms + [@label_transform, @as_float]"
    if bundle == "segresnet_vae":
        assert "RandShiftScaleIntensityd" in targets
    else:
        assert crop["zoom_prob"] == "@zoom_prob" and crop["min_zoom"] == "@min_zoom"
