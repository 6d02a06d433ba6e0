"""Optional post-processing: small-ET relabelling and largest whole-tumor component."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from brats_pipeline.labels import classes_to_regions
from brats_pipeline.postprocessing import (
    EnhancingTumorThreshold,
    EnhancingTumorThresholdd,
    KeepLargestTumorComponent,
    KeepLargestTumorComponentd,
    voxel_volume_ml,
)

SHAPE = (24, 20, 16)


def class_map(et_voxels: int) -> torch.Tensor:
    """(1, *SHAPE) classes: edema block, necrotic core, and an ET blob of exactly ``et_voxels`` voxels."""
    cls = torch.zeros(1, *SHAPE)
    cls[0, 4:16, 4:14, 3:12] = 2
    cls[0, 6:14, 6:12, 5:10] = 1
    flat = torch.zeros(8 * 6 * 5)
    flat[:et_voxels] = 3
    core = cls[0, 6:14, 6:12, 5:10]
    cls[0, 6:14, 6:12, 5:10] = torch.where(flat.reshape(core.shape) == 3, flat.reshape(core.shape), core)
    return cls


def test_et_threshold_on_classes_below_and_above():
    small, large = class_map(10), class_map(40)
    t = EnhancingTumorThreshold(min_size=20, layout="classes")
    out_small, out_large = t(small), t(large)
    assert (out_small == 3).sum() == 0
    assert (out_small == 1).sum() == (small == 1).sum() + 10, "ET voxels become necrosis"
    assert torch.equal(out_small == 2, small == 2)
    assert out_large is large and (out_large == 3).sum() == 40
    assert t(class_map(0)).eq(class_map(0)).all()
    assert (t(class_map(20)) == 3).sum() == 20, "a volume equal to the threshold is kept"


def test_et_threshold_on_label_conventions():
    brats2018 = class_map(10)
    brats2018[brats2018 == 3] = 4
    out = EnhancingTumorThreshold(min_size=20, layout="classes", et_value=4, replacement_value=1)(brats2018)
    assert (out == 4).sum() == 0 and (out == 1).sum() == (brats2018 == 1).sum() + 10
    msd = np.asarray(class_map(10)[0]).copy()
    msd[msd == 1], msd[msd == 2] = 9, 1
    msd[msd == 9] = 2
    out_msd = EnhancingTumorThreshold(min_size=20, layout="classes", et_value=3, replacement_value=2)(msd)
    assert isinstance(out_msd, np.ndarray) and out_msd.shape == SHAPE
    assert (out_msd == 3).sum() == 0 and (out_msd == 2).sum() == (msd == 2).sum() + 10


def test_et_threshold_on_regions_below_and_above():
    for et_voxels, relabelled in ((10, True), (40, False)):
        regions = classes_to_regions(class_map(et_voxels))
        out = EnhancingTumorThreshold(min_size=20)(regions)
        if relabelled:
            assert out[2].sum() == 0
            torch.testing.assert_close(out[0], regions[0])  # the ET voxels were already in TC
            torch.testing.assert_close(out[1], regions[1])
            torch.testing.assert_close(
                out, classes_to_regions(EnhancingTumorThreshold(20, layout="classes")(class_map(10)))
            )
        else:
            torch.testing.assert_close(out, regions)
    # a non-nested network output: ET voxels outside TC/WT end up inside them
    odd = torch.zeros(3, *SHAPE)
    odd[2, 1:3, 1:3, 1:3] = 1
    out = EnhancingTumorThreshold(min_size=20)(odd)
    assert out[2].sum() == 0 and out[0].sum() == 8 and out[1].sum() == 8


def test_et_threshold_in_ml_uses_the_affine():
    spacing = (1.0, 1.0, 2.5)  # 2.5 ul per voxel
    regions = MetaTensor(classes_to_regions(class_map(10)), affine=torch.diag(torch.tensor([*spacing, 1.0])))
    assert voxel_volume_ml(regions) == pytest.approx(0.0025)
    t = EnhancingTumorThresholdd(keys="pred", min_size=0.03, unit="ml")  # 10 voxels = 0.025 ml < 0.03 ml
    out = t({"pred": regions})["pred"]
    assert isinstance(out, MetaTensor) and out[2].sum() == 0
    torch.testing.assert_close(out.affine, regions.affine)
    kept = EnhancingTumorThresholdd(keys="pred", min_size=0.02, unit="ml")({"pred": regions})["pred"]
    assert kept[2].sum() == 10
    assert EnhancingTumorThreshold(min_size=0.02, unit="ml", spacing=(1, 1, 1))(regions)[2].sum() == 0
    with pytest.raises(ValueError, match="MetaTensor"):
        EnhancingTumorThreshold(min_size=1, unit="ml")(torch.zeros(3, *SHAPE))


def two_blobs() -> torch.Tensor:
    """Regions: a big tumor (WT 6x6x6 with TC and ET inside) and a small separate one (WT 2x2x2 with TC, ET)."""
    regions = torch.zeros(3, *SHAPE)
    regions[1, 2:8, 2:8, 2:8] = 1
    regions[0, 3:6, 3:6, 3:6] = 1
    regions[2, 4:5, 4:5, 4:5] = 1
    regions[:, 15:17, 15:17, 12:14] = 1
    return regions


def test_largest_component_on_regions_keeps_biggest_blob_and_nesting():
    regions = two_blobs()
    out = KeepLargestTumorComponent()(regions)
    assert out[1].sum() == 216 and out[0].sum() == 27 and out[2].sum() == 1
    assert out[:, 15:17, 15:17, 12:14].sum() == 0
    torch.testing.assert_close(out[:, :10, :10, :10], regions[:, :10, :10, :10])
    two = KeepLargestTumorComponentd(keys="pred", num_components=2)({"pred": regions})["pred"]
    torch.testing.assert_close(two, regions)


def test_largest_component_on_class_maps():
    cls = torch.zeros(1, *SHAPE, dtype=torch.uint8)
    cls[0, 2:8, 2:8, 2:8] = 2
    cls[0, 4:6, 4:6, 4:6] = 3
    cls[0, 15:17, 15:17, 12:14] = 1
    meta = MetaTensor(cls, affine=torch.eye(4))
    out = KeepLargestTumorComponent(layout="classes")(meta)
    assert isinstance(out, MetaTensor) and out.dtype == torch.uint8
    assert (out > 0).sum() == 216 and (out == 3).sum() == 8 and out[0, 15:17, 15:17, 12:14].sum() == 0
    # a diagonal chain of 3 voxels (corner-connected) and a face-connected pair of 2
    chain = torch.zeros(1, 8, 8, 8)
    chain[0, 1, 1, 1], chain[0, 2, 2, 2], chain[0, 3, 3, 3] = 1, 3, 3
    chain[0, 6, 6, 5:7] = 2
    full = KeepLargestTumorComponent(layout="classes")(chain)
    faces = KeepLargestTumorComponent(layout="classes", connectivity=1)(chain[0])  # (*spatial) input too
    assert (full > 0).sum() == 3 and full[0, 6, 6].sum() == 0
    assert faces.shape == (8, 8, 8) and (faces > 0).sum() == 2 and faces[6, 6, 5:7].tolist() == [2.0, 2.0]
