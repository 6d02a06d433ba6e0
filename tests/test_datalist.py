"""Layout recognition, datalist structure and splits, MONAI loading in the declared channel order, the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor, load_decathlon_datalist
from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged

from brats_pipeline.data.datalist import build_datalist, find_cases
from brats_pipeline.data.layouts import CHANNELS, LAYOUTS, MSD_CHANNELS
from brats_pipeline.data.screening import check_case
from brats_pipeline.tools.synthetic import generate_case, generate_dataset
from brats_pipeline.transforms.labels import CONVENTIONS
from brats_pipeline.transforms.preprocessing import ReorderChannelsd

ALL_LAYOUTS = (*LAYOUTS, "msd")
SHAPE = (32, 32, 32)
TOP_KEYS = {
    "name",
    "dataset_dir",
    "layout",
    "label_convention",
    "channels",
    "num_folds",
    "seed",
    "training",
    "validation",
    "testing",
}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """Each layout: five labelled cases (1-5) and two unlabelled ones (11-12), nested one folder deep as archives
    unpack."""
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for layout in ALL_LAYOUTS:
        base = root / layout
        train, test = (base, base) if layout == "msd" else (base / "TrainingData", base / "ValidationData")
        generate_dataset(train, 5, layout, SHAPE, seed=1)
        generate_dataset(test, 2, layout, SHAPE, seed=1, with_labels=False, start_index=11)
        out[layout] = base
    return out


def _loader(keys=("image", "label")) -> Compose:
    return Compose(
        [
            LoadImaged(keys=list(keys), image_only=True),
            EnsureChannelFirstd(keys=list(keys)),
            ReorderChannelsd(keys="image"),
            EnsureTyped(keys=list(keys), dtype=torch.float32, track_meta=True),
        ]
    )


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_every_layout_gives_the_same_datalist_shape(datasets, layout):
    d = build_datalist(datasets[layout], num_folds=2, num_validation=1, seed=0)
    assert set(d) == TOP_KEYS
    assert d["layout"] == layout and d["channels"] == list(CHANNELS) and d["num_folds"] == 2
    convention = "msd" if layout == "msd" else LAYOUTS[layout].label_convention
    assert d["label_convention"] == convention and convention in CONVENTIONS
    assert (len(d["training"]), len(d["validation"]), len(d["testing"])) == (4, 1, 2)
    base = {"case_id", "image", "label", "layout", "label_convention"} | (
        {"channel_order"} if layout == "msd" else set()
    )
    for e in d["training"]:
        assert set(e) == base | {"fold"}
    for e in d["validation"]:
        assert set(e) == base
    for e in d["testing"]:
        assert set(e) == base - {"label"}
    assert sorted(e["fold"] for e in d["training"]) == [0, 0, 1, 1]
    ids = [e["case_id"] for e in d["training"] + d["validation"] + d["testing"]]
    assert len(set(ids)) == 7
    for e in d["training"] + d["validation"] + d["testing"]:
        assert e["layout"] == layout and e["label_convention"] == convention
        paths = [e["image"]] if layout == "msd" else e["image"]
        for p in paths + ([e["label"]] if "label" in e else []):
            assert Path(p).is_absolute() and Path(p).is_file()
        if layout == "msd":
            assert e["channel_order"] == [2, 1, 3, 0]
        else:  # four files in CHANNELS order
            spec = LAYOUTS[layout]
            assert [Path(p).name for p in e["image"]] == [spec.filename(e["case_id"], m) for m in CHANNELS]
            if "label" in e:
                assert Path(e["label"]).name == spec.filename(e["case_id"], "seg")


def test_brats2020_validation_and_msd_test_cases_land_in_testing(datasets):
    d = build_datalist(datasets["brats2020"], num_folds=5)
    assert [e["case_id"] for e in d["testing"]] == ["BraTS20_Validation_011", "BraTS20_Validation_012"]
    assert all(e["case_id"].startswith("BraTS20_Training_") for e in d["training"])
    assert all("ValidationData" in e["image"][0] for e in d["testing"])
    msd = build_datalist(datasets["msd"], num_folds=5)
    assert [e["case_id"] for e in msd["testing"]] == ["BRATS_011", "BRATS_012"]
    assert all("/imagesTs/" in e["image"] for e in msd["testing"])


def test_brats2018_grade_folders(datasets):
    cases = find_cases(datasets["brats2018"])
    grades = {Path(c["image"][0]).parent.parent.name for c in cases if "label" in c}
    assert grades == {"HGG", "LGG"}
    assert all(c["image"][0].endswith("_t1ce.nii.gz") for c in cases)


def test_folds_cover_training_and_split_is_seeded(datasets):
    root = datasets["brats2021"]
    a = build_datalist(root, num_folds=3, num_validation=0.2, seed=0)
    assert len(a["validation"]) == 1 and len(a["training"]) == 4
    folds = {}
    for e in a["training"]:
        folds.setdefault(e["fold"], []).append(e["case_id"])
    assert sorted(folds) == [0, 1, 2] and sorted(len(v) for v in folds.values()) == [1, 1, 2]
    assert sorted(sum(folds.values(), []) + [e["case_id"] for e in a["validation"]]) == [
        f"BraTS2021_0000{i}" for i in range(1, 6)
    ]
    assert build_datalist(root, num_folds=3, num_validation=0.2, seed=0) == a

    def split(d):
        return [(e["case_id"], e["fold"]) for e in d["training"]], [e["case_id"] for e in d["validation"]]

    assert split(build_datalist(root, num_folds=3, num_validation=0.2, seed=1)) != split(a)


def test_other_brats2023_subchallenge_and_uncompressed_nifti(tmp_path, datasets):
    """A BraTS-MEN case is recognised, and .nii files (as BraTS 2020 ships them) are accepted."""
    src = datasets["brats2023"] / "TrainingData" / "BraTS-GLI-00001-000"
    dst = tmp_path / "BraTS-MEN-00042-001"
    dst.mkdir()
    for f in src.iterdir():
        img = nib.load(f)
        name = f.name.replace("BraTS-GLI-00001-000", dst.name)
        if name.endswith("-t2f.nii.gz"):
            name = name[: -len(".gz")]
        nib.save(img, dst / name)
    (entry,) = find_cases(tmp_path)
    assert entry["case_id"] == "BraTS-MEN-00042-001" and entry["layout"] == "brats2023"
    assert entry["image"][3].endswith("-t2f.nii") and entry["label"].endswith("-seg.nii.gz")
    # a single case folder can be given directly
    assert find_cases(dst) == [entry]


def test_nonstandard_label_name_and_stray_files(tmp_path, synthetic_dataset, caplog):
    """BraTS 2020 ships Training_355 with its label as 'W39_1998.09.19_Segm.nii'; stray NIfTI files are ignored."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_dataset, root)
    case = root / "BraTS-GLI-00003-000"
    (case / "BraTS-GLI-00003-000-seg.nii.gz").rename(case / "W39_1998.09.19_Segm.nii.gz")
    shutil.copy(case / "BraTS-GLI-00003-000-t1c.nii.gz", case / "notes_t1c_registered.nii.gz")
    (case / "readme.txt").write_text("x")
    entry = next(e for e in find_cases(root) if e["case_id"] == "BraTS-GLI-00003-000")
    assert Path(entry["label"]).name == "W39_1998.09.19_Segm.nii.gz"
    assert Path(entry["image"][0]).name == "BraTS-GLI-00003-000-t1c.nii.gz"
    assert "non-standard name" in caplog.text and "ignoring unrecognised NIfTI file" in caplog.text


def test_real_case_found_and_loaded_in_channel_order(real_case):
    d = build_datalist(real_case.parent, num_folds=5)
    assert d["training"] == [] and d["validation"] == []
    (entry,) = [e for e in d["testing"] if e["case_id"] == "BraTS-GLI-00001-000"]
    assert entry["layout"] == "brats2023" and entry["label_convention"] == "brats2023" and "label" not in entry
    suffixes = [Path(p).name.split("-")[-1] for p in entry["image"]]
    assert suffixes == ["t1c.nii.gz", "t1n.nii.gz", "t2w.nii.gz", "t2f.nii.gz"]
    out = _loader(keys=("image",))(entry)
    image = out["image"]
    assert isinstance(image, MetaTensor) and image.dtype == torch.float32
    assert tuple(image.shape) == (4, 240, 240, 155)
    for c, path in enumerate(entry["image"]):
        np.testing.assert_array_equal(image[c].numpy(), np.asanyarray(nib.load(path).dataobj).astype(np.float32))
    np.testing.assert_allclose(image.affine.numpy(), nib.load(entry["image"][0]).affine)


def test_msd_case_loaded_in_channels_order(datasets):
    d = build_datalist(datasets["msd"], num_folds=2)
    entry = next(e for e in d["training"] if e["case_id"] == "BRATS_003")
    out = _loader()(entry)
    images, label = generate_case(SHAPE, seed=(1, 3), convention="msd")
    assert tuple(out["image"].shape) == (4, *SHAPE) and tuple(out["label"].shape) == (1, *SHAPE)
    for c, m in enumerate(CHANNELS):
        np.testing.assert_array_equal(out["image"][c].numpy(), images[m].astype(np.float32))
    np.testing.assert_array_equal(out["label"][0].numpy(), label)
    # the same case written as BraTS 2023 loads to the same tensor
    twin = next(
        e for e in build_datalist(datasets["brats2023"], num_folds=2)["training"] if e["case_id"].endswith("3-000")
    )
    torch.testing.assert_close(_loader()(twin)["image"].as_tensor(), out["image"].as_tensor())
    assert MSD_CHANNELS != CHANNELS


def test_reorder_channels_transform():
    img = MetaTensor(torch.arange(4.0)[:, None, None, None].expand(4, 2, 2, 2), meta={"filename_or_obj": "x.nii.gz"})
    t = ReorderChannelsd(keys="image")
    out = t({"image": img, "channel_order": [2, 1, 3, 0]})["image"]
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "x.nii.gz"
    assert out[:, 0, 0, 0].tolist() == [2.0, 1.0, 3.0, 0.0]
    same = t({"image": img})["image"]
    assert same is img
    arr = np.arange(3)[:, None] * np.ones((3, 5))
    assert t({"image": arr, "channel_order": np.array([2, 0, 1])})["image"][:, 0].tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="x.nii.gz.*not a permutation"):
        t({"image": img, "channel_order": [0, 1, 2]})


def test_datalist_json_round_trip_and_cli(tmp_path, synthetic_dataset):
    out = tmp_path / "lists" / "datalist.json"
    d = build_datalist(synthetic_dataset, output_file=out, num_folds=2, seed=3)
    assert json.loads(out.read_text()) == d
    assert [p.name for p in out.parent.iterdir()] == ["datalist.json"]
    training = load_decathlon_datalist(out, data_list_key="training")
    assert [e["image"] for e in training] == [e["image"] for e in d["training"]]

    cli_out = tmp_path / "cli.json"
    cmd = [sys.executable, "-m", "brats_pipeline.data.datalist", str(synthetic_dataset), "--output_file", str(cli_out)]
    result = subprocess.run(
        [*cmd, "--num_folds", "2", "--seed", "3"], capture_output=True, text=True, timeout=300, check=True
    )
    assert "4 training (2 folds), 0 validation, 2 testing cases" in result.stdout
    assert json.loads(cli_out.read_text()) == d


def test_dataset_copy_with_spaces_and_unicode(tmp_path, synthetic_dataset):
    root = tmp_path / "my data" / "BraTS ünïcode"
    shutil.copytree(synthetic_dataset, root)
    d = build_datalist(root, num_folds=2)
    entry = d["training"][0]
    assert "ünïcode" in entry["image"][0] and " " in entry["image"][0]
    check_case(entry, check_data=True)
    assert tuple(_loader()(entry)["image"].shape) == (4, *SHAPE)
