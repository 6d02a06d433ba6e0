"""One rule for case ids and NIfTI names, checked on every layout the datalist builder recognises."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from brats_pipeline.data.datalist import find_cases
from brats_pipeline.data.layouts import (
    LAYOUTS,
    MODALITY_SUFFIXES,
    case_id_from_path,
    entry_case_id,
    is_nifti,
    split_nifti_suffix,
)
from brats_pipeline.tools.synthetic import generate_dataset

ALL_LAYOUTS = (*LAYOUTS, "msd")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("BraTS2021_00001_t1ce.nii.gz", ("BraTS2021_00001_t1ce", ".nii.gz")),
        ("BraTS20_Training_001_flair.nii", ("BraTS20_Training_001_flair", ".nii")),
        ("/data/imagesTr/BRATS_001.NII.GZ", ("BRATS_001", ".NII.GZ")),
        ("x.nii.gz.tmp", ("x.nii.gz.tmp", "")),
        (".c.nii.gz.k2j3.tmp", (".c.nii.gz.k2j3.tmp", "")),
        (".nii.gz", (".nii.gz", "")),
        ("notes.txt", ("notes.txt", "")),
    ],
)
def test_split_nifti_suffix(name, expected):
    assert split_nifti_suffix(name) == expected
    assert split_nifti_suffix(Path(name)) == expected
    assert is_nifti(name) == bool(expected[1])


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    """Two labelled and one unlabelled case of every layout, 24^3."""
    root = tmp_path_factory.mktemp("case_ids")
    out = {}
    for layout in ALL_LAYOUTS:
        generate_dataset(root / layout, 2, layout, (24, 24, 24), seed=0)
        generate_dataset(root / layout, 1, layout, (24, 24, 24), seed=0, with_labels=False, start_index=3)
        out[layout] = root / layout
    return out


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_every_file_of_every_layout_gives_its_case_id(layouts, layout, tmp_path):
    """Image and label files, in their case folder or copied out of it (flat), as ``.nii.gz`` or ``.nii``."""
    cases = find_cases(layouts[layout])
    assert len(cases) == 3
    flat = tmp_path / "flat"
    flat.mkdir()
    for entry in cases:
        files = [entry["image"]] if isinstance(entry["image"], str) else list(entry["image"])
        files += [entry["label"]] if "label" in entry else []
        for path in files:
            assert case_id_from_path(path) == entry["case_id"], path
            copy = flat / Path(path).name
            shutil.copy(path, copy)
            assert case_id_from_path(copy) == entry["case_id"], copy
            assert case_id_from_path(str(copy)[: -len(".gz")]) == entry["case_id"]
        assert entry_case_id({"image": entry["image"]}) == entry["case_id"]
        assert entry_case_id({"image": files[-1:]}) == entry["case_id"]


@pytest.mark.parametrize(
    "path, case_id",
    [
        ("/d/HGG/Brats18_2013_2_1/Brats18_2013_2_1_t1ce.nii.gz", "Brats18_2013_2_1"),
        ("/d/BraTS20_Training_355/W39_1998.09.19_Segm.nii", "BraTS20_Training_355"),  # the folder names the case
        ("/d/BraTS-GLI-00001-000/BraTS-GLI-00001-000-t1c.nii.gz", "BraTS-GLI-00001-000"),
        ("/d/BraTS-MEN-00042-001-T2F.NII.GZ", "BraTS-MEN-00042-001"),
        ("/d/imagesTs/BRATS_485.nii.gz", "BRATS_485"),
        ("/pred/BraTS2021_00001.nii.gz", "BraTS2021_00001"),  # a prediction
        ("/pred/BraTS-GLI-00001-000-t1c/BraTS-GLI-00001-000-t1c_seg.nii.gz", "BraTS-GLI-00001-000"),  # SaveImage
        ("/d/Brats18_2013_2_1_seg.nii.gz", "Brats18_2013_2_1"),
        ("/d/case7.mha", "case7"),
    ],
)
def test_case_id_from_path(path, case_id):
    assert case_id_from_path(path) == case_id


def test_modality_suffixes_cover_every_layout():
    for layout in LAYOUTS.values():
        assert {*layout.suffixes.values(), layout.label_suffix} <= set(MODALITY_SUFFIXES)
    assert entry_case_id({"case_id": "given", "image": ["/d/BraTS2021_00001_t1ce.nii.gz"]}) == "given"
    assert entry_case_id({}) == "?"
