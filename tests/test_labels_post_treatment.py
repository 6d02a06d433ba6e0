"""BraTS 2024 post-treatment labels (``brats2024``: 1 NETC, 2 SNFH, 3 ET, 4 RC): regions, classes, round trips, and
the pre-treatment conventions left exactly as they were."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from brats_pipeline.transforms.labels import (
    CLASSES_RC,
    CONVENTIONS,
    POST_TREATMENT_CONVENTIONS,
    REGIONS,
    REGIONS_RC,
    ClassesToLabel,
    LabelConventionError,
    LabelToClassesd,
    LabelToRegionsd,
    RegionsToLabel,
    check_label_values,
    classes_to_label,
    classes_to_regions,
    get_convention,
    label_to_classes,
    label_to_regions,
    region_names,
    regions_to_label,
)


def _label() -> np.ndarray:
    """Cavity 4 next to a tumor: SNFH 2 around NETC 1 around ET 3."""
    lab = np.zeros((10, 10, 8), dtype=np.uint8)
    lab[1:9, 1:6, 1:7] = 2
    lab[2:7, 2:5, 2:6] = 1
    lab[3:5, 3:4, 3:5] = 3
    lab[1:9, 7:10, 1:7] = 4
    return lab


def test_convention_values_and_registry():
    conv = get_convention("brats2024")
    assert conv is POST_TREATMENT_CONVENTIONS["brats2024"]
    assert conv.values == (0, 1, 2, 3, 4) and conv.has_resection_cavity
    assert list(conv.class_to_label) == [0, 1, 2, 3, 4]
    assert "brats2024" not in CONVENTIONS  # the 4-class pre-treatment registry is unchanged
    for name in CONVENTIONS:
        assert not get_convention(name).has_resection_cavity and len(get_convention(name).values) == 4
    assert region_names("brats2024", include_rc=True) == REGIONS_RC == ("TC", "WT", "ET", "RC")
    assert region_names("brats2024") == REGIONS
    with pytest.raises(ValueError, match="brats2024"):
        get_convention("brats2025")


def test_regions_as_the_challenge_defines_them():
    lab = _label()
    tc, wt, et, rc = (r.numpy().astype(bool) for r in label_to_regions(lab, "brats2024", include_rc=True))
    np.testing.assert_array_equal(et, lab == 3)
    np.testing.assert_array_equal(tc, np.isin(lab, (1, 3)))
    np.testing.assert_array_equal(wt, np.isin(lab, (1, 2, 3)))  # the cavity is not tumor
    np.testing.assert_array_equal(rc, lab == 4)
    three = label_to_regions(lab, "brats2024")  # without the flag: TC, WT, ET only
    assert three.shape == (3, *lab.shape)
    np.testing.assert_array_equal(three.numpy(), np.stack([tc, wt, et]).astype(np.float32))


def test_round_trips():
    lab = _label()
    regions = label_to_regions(lab, "brats2024", include_rc=True)
    back = regions_to_label(regions, "brats2024")
    assert back.dtype == torch.uint8 and back.shape == (1, *lab.shape)
    np.testing.assert_array_equal(back[0].numpy(), lab)
    classes = label_to_classes(lab, "brats2024", include_rc=True)
    assert set(np.unique(classes.numpy())) == {0, 1, 2, 3, 4} and len(CLASSES_RC) == 5
    np.testing.assert_array_equal(classes_to_label(classes, "brats2024")[0].numpy(), lab)
    np.testing.assert_array_equal(classes_to_regions(classes, include_rc=True).numpy(), regions.numpy())
    # without the flag the cavity is background
    no_rc = label_to_classes(lab, "brats2024")
    assert no_rc.max() == 3 and (no_rc[0].numpy()[lab == 4] == 0).all()


def test_tumor_wins_over_cavity_when_regions_overlap():
    regions = torch.zeros(4, 4, 4, 4)
    regions[3] = 1  # cavity everywhere
    regions[1, :2] = 1  # WT in half of it
    regions[0, :1] = 1
    lab = regions_to_label(regions, "brats2024")[0]
    assert set(lab[2:].unique().tolist()) == {4} and set(lab[:1].unique().tolist()) == {1}
    with pytest.raises(ValueError, match="resection cavity"):
        regions_to_label(regions, "brats2023")  # four channels need a convention with a cavity


def test_transforms():
    lab = MetaTensor(torch.as_tensor(_label())[None], meta={"filename_or_obj": "case-seg.nii.gz"})
    regions = LabelToRegionsd("label", "brats2024", include_rc=True)({"label": lab})["label"]
    assert regions.shape[0] == 4 and isinstance(regions, MetaTensor)
    assert LabelToRegionsd("label", "brats2024")({"label": lab})["label"].shape[0] == 3
    classes = LabelToClassesd("label", "brats2024", include_rc=True)({"label": lab})["label"]
    assert classes.max() == 4
    np.testing.assert_array_equal(RegionsToLabel("brats2024")(regions).numpy(), lab.numpy())
    np.testing.assert_array_equal(ClassesToLabel("brats2024")(classes).numpy(), lab.numpy())
    with pytest.raises(ValueError, match="include_rc"):
        LabelToRegionsd("label", "brats2023", include_rc=True)
    with pytest.raises(ValueError, match="include_rc"):
        LabelToClassesd("label", "brats2018", include_rc=True)


def test_existing_conventions_unchanged():
    lab = _label()
    with pytest.raises(LabelConventionError, match="label_convention") as info:  # 4 is not a 2023 label
        label_to_regions(lab, "brats2023", "x-seg.nii.gz")
    assert info.value.source == "x-seg.nii.gz" and info.value.bad_values == (4.0,)
    check_label_values(lab, "brats2024")
    lab18 = np.where(lab == 4, 0, lab)
    lab18 = np.where(lab18 == 3, 4, lab18)  # the same tumor in the 2018 convention
    np.testing.assert_array_equal(label_to_regions(lab18, "brats2018"), label_to_regions(lab, "brats2024"))
    assert label_to_classes(lab18, "brats2018").max() == 3


def test_argmax_classes_equal_monai_asdiscreted_with_ties_and_channels_last():
    """espnet3d's ``discretize``: the same float classes as MONAI's ``AsDiscreted(argmax=True)``, first maximum on
    ties, for a contiguous and a channels-last (the CPU inferer's) layout, metadata kept."""
    from monai.transforms import AsDiscreted

    from brats_pipeline.transforms.labels import ArgmaxClassesd

    probs = torch.rand(4, 12, 10, 8)
    probs[:, :3] = 0.25  # every class tied
    probs[1, 5:7] = probs[3, 5:7] = 2.0  # two classes tied
    layouts = (probs, probs.unsqueeze(0).contiguous(memory_format=torch.channels_last_3d)[0])
    for tensor in layouts:
        img = MetaTensor(tensor, affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
        ours = ArgmaxClassesd("pred")({"pred": img})["pred"]
        theirs = AsDiscreted("pred", argmax=True)({"pred": img})["pred"]
        assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == (1, 12, 10, 8)
        assert torch.equal(ours.as_tensor(), theirs.as_tensor())
        assert torch.equal(ours.affine, img.affine)
    assert set(ours[0, :3].unique().tolist()) == {0.0} and set(ours[0, 5:7].unique().tolist()) == {1.0}
