"""Broken datasets: every defect raises one clear error naming the case and the file; datalists are never
half-written."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_pipeline.data import datalist as datalist_module
from brats_pipeline.data.datalist import build_datalist, find_cases, write_json_atomic
from brats_pipeline.data.screening import BadCasesError, CaseError, DatasetError, check_case, inspect_nifti
from brats_pipeline.tools.synthetic import brats_affine, generate_dataset
from brats_pipeline.training.guards import check_label_files
from brats_pipeline.transforms.labels import CorruptLabelError

CASE = "BraTS-GLI-00002-000"


@pytest.fixture
def dataset(tmp_path, synthetic_dataset) -> Path:
    """A private copy of the session's tiny BraTS 2023 dataset, free to break."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_dataset, root)
    return root


def _file(root: Path, suffix: str, case: str = CASE) -> Path:
    return root / case / f"{case}-{suffix}.nii.gz"


def _raises(root: Path, file_name: str, reason: str, case: str = CASE, exact_path: bool = True) -> CaseError:
    """``find_cases`` and ``build_datalist(output_file=...)`` raise a CaseError naming case and file; nothing is written."""
    out = root.parent / "datalist.json"
    with pytest.raises(CaseError, match=reason) as info:
        build_datalist(root, output_file=out, num_folds=2)
    assert not out.exists()
    err = info.value
    assert case in str(err) and file_name in str(err), str(err)
    assert err.case_id == case and (Path(err.path).name == file_name or not exact_path)
    with pytest.raises(CaseError, match=reason):
        find_cases(root)
    return err


def _save(array: np.ndarray, path: Path, affine: np.ndarray | None = None) -> None:
    nib.save(nib.Nifti1Image(array, brats_affine(array.shape) if affine is None else affine), path)


def test_missing_modality(dataset):
    _file(dataset, "t1c").unlink()
    _raises(dataset, f"{CASE}-t1c.nii.gz", "missing the t1c image")


@pytest.mark.parametrize("copy_name", [f"{CASE}-t1c (1).nii.gz", f"{CASE}-t1c.nii", f"{CASE}-T1C.nii.gz"])
def test_two_files_for_one_modality(dataset, copy_name):
    shutil.copy(_file(dataset, "t1c"), dataset / CASE / copy_name)
    err = _raises(dataset, copy_name, "two files for 't1c'")  # names the copy, not the original
    assert f"{CASE}-t1c.nii.gz" in str(err)


def test_modalities_disagree_in_shape(dataset):
    _save(np.ones((32, 32, 30), np.int16), _file(dataset, "t2w"))
    _raises(dataset, f"{CASE}-t2w.nii.gz", r"shape \(32, 32, 30\) differs from \(32, 32, 32\)")


def test_modalities_disagree_in_affine(dataset):
    img = nib.load(_file(dataset, "t2f"))
    affine = img.affine.copy()
    affine[0, 3] += 2.0
    _save(np.asanyarray(img.dataobj), _file(dataset, "t2f"), affine)
    _raises(dataset, f"{CASE}-t2f.nii.gz", "affine differs .* not co-registered")


def test_label_disagrees_with_images(dataset):
    _save(np.zeros((30, 32, 32), np.uint8), _file(dataset, "seg"))
    _raises(dataset, f"{CASE}-seg.nii.gz", "shape")


def test_empty_file(dataset):
    _file(dataset, "t1n").write_bytes(b"")
    _raises(dataset, f"{CASE}-t1n.nii.gz", r"empty file \(0 bytes\)")


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.02])
def test_truncated_file(dataset, keep):
    path = _file(dataset, "t2w")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    _raises(dataset, f"{CASE}-t2w.nii.gz", "truncated|not a readable NIfTI")


def test_header_checks_can_be_skipped(dataset):
    path = _file(dataset, "t2w")
    path.write_bytes(path.read_bytes()[:100])
    assert len(find_cases(dataset, check_files=False)) == 6
    _raises(dataset, path.name, "truncated|not a readable NIfTI")


def test_unreadable_file(dataset):
    _file(dataset, "t1n").write_bytes(b"this is not a NIfTI file\n" * 20)
    _raises(dataset, f"{CASE}-t1n.nii.gz", "not a readable NIfTI")


def test_4d_where_3d_expected(dataset):
    _save(np.ones((32, 32, 32, 2), np.int16), _file(dataset, "t2f"), brats_affine((32, 32, 32)))
    _raises(dataset, f"{CASE}-t2f.nii.gz", r"4-D image of shape \(32, 32, 32, 2\) where a 3-D volume is expected")


def test_empty_or_unrecognisable_dataset(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        find_cases(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="is empty"):
        build_datalist(empty)
    other = tmp_path / "other"
    (other / "patient_1").mkdir(parents=True)
    (other / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="holds no recognisable BraTS case.*BraTS-GLI-00001-000"):
        build_datalist(other, output_file=tmp_path / "d.json")
    assert not (tmp_path / "d.json").exists()


def test_mixed_layouts_and_duplicate_cases(dataset):
    generate_dataset(dataset / "more", 1, "brats2021", (32, 32, 32))
    with pytest.raises(DatasetError, match=r"mixes several datasets/layouts \['brats2021', 'brats2023'\]"):
        find_cases(dataset)
    shutil.rmtree(dataset / "more")
    shutil.copytree(dataset / CASE, dataset / "copy" / CASE)
    with pytest.raises(CaseError, match="the same case id appears twice") as info:
        find_cases(dataset)
    assert CASE in str(info.value)


def test_msd_defects(tmp_path):
    root = tmp_path / "Task01_BrainTumour"
    generate_dataset(root, 2, "msd", (32, 32, 32))
    assert len(find_cases(root)) == 2
    (root / "labelsTr" / "BRATS_002.nii.gz").unlink()
    with pytest.raises(CaseError, match="BRATS_002.*labelsTr/BRATS_002.nii.gz.*does not exist"):
        find_cases(root)
    generate_dataset(root, 1, "msd", (32, 32, 32), start_index=2)
    _save(np.ones((32, 32, 32), np.int16), root / "imagesTr" / "BRATS_001.nii.gz")
    with pytest.raises(CaseError, match=r"BRATS_001.*imagesTr/BRATS_001.nii.gz.*4-D image with 4 channels"):
        find_cases(root)
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="dataset.json"):
        find_cases(root)


def test_data_checks(dataset):
    """Defects only visible in the voxels are found by ``check_case(check_data=True)``, not by the header scan."""
    t1 = _file(dataset, "t1n")
    data = np.asanyarray(nib.load(t1).dataobj).astype(np.float32)
    data[10, 10, 10] = np.nan
    _save(data, t1)
    (entry,) = [e for e in find_cases(dataset) if e["case_id"] == CASE]  # header-level scan passes
    check_case(entry, check_data=False)
    with pytest.raises(CaseError, match=f"{CASE}.*{t1.name}.*1 NaN/Inf voxels"):
        check_case(entry)

    _save(np.zeros((32, 32, 32), np.int16), t1)
    with pytest.raises(CaseError, match=f"{CASE}.*{t1.name}.*all zero"):
        check_case(entry)

    _save(np.ones((32, 32), np.int16), t1)
    with pytest.raises(CaseError, match=f"{t1.name}.*2-D image"):
        check_case(entry, check_data=False)

    shutil.copy(_file(dataset, "t1c"), t1)
    seg = _file(dataset, "seg")
    label = np.asanyarray(nib.load(seg).dataobj).copy()
    label[0, 0, 0] = 4  # BraTS 2018 enhancing tumor in a BraTS 2023 dataset
    _save(label, seg)
    with pytest.raises(CaseError, match=f"{CASE}.*{seg.name}.*label values \\{{4\\}}") as info:
        check_case(entry)
    assert "--label_convention" in str(info.value) and "(these values fit brats2024)" in str(info.value)  # 1-4 do
    check_case({k: v for k, v in entry.items() if k != "label_convention"})  # no convention declared: not checked


@pytest.mark.parametrize("value", [5, 255])
def test_label_value_of_no_convention_is_a_corrupt_file(dataset, value):
    """A value that no BraTS convention has: the file is corrupt, named with the value; no --label_convention
    advice (no convention would accept it)."""
    (entry,) = [e for e in find_cases(dataset) if e["case_id"] == CASE]
    seg = _file(dataset, "seg")
    label = np.asanyarray(nib.load(seg).dataobj).astype(np.uint8)
    label[0, 0, 0] = value
    _save(label, seg)
    with pytest.raises(CaseError) as info:
        check_case(entry)
    message = str(info.value)
    assert info.value.case_id == CASE and Path(info.value.path) == seg
    assert f"{seg}: label value {{{value}}} belongs to no BraTS label convention" in message, message
    assert "corrupt" in message and "--label_convention" not in message and "--convention" not in message
    assert "\n" not in message


def test_check_case_entry_defects(dataset, tmp_path):
    (entry,) = [e for e in find_cases(dataset) if e["case_id"] == CASE]
    image = list(entry["image"])
    with pytest.raises(CaseError, match="not a NIfTI file"):
        check_case({**entry, "image": [*image[:3], str(tmp_path / "flair.mha")]})
    with pytest.raises(CaseError, match="does not exist"):
        check_case({**entry, "image": [*image[:3], str(tmp_path / "gone.nii.gz")]})
    with pytest.raises(CaseError, match="3 image files listed, expected 4"):
        check_case({**entry, "image": image[:3]})
    # an entry without case_id is named after its first file's case (brats_pipeline.data.layouts.case_id_from_path)
    with pytest.raises(CaseError, match=f"case '{CASE}':"):
        check_case({"image": [*image[:3], str(tmp_path / "gone.nii.gz")]})


def test_msd_all_zero_channel_named(tmp_path):
    root = tmp_path / "msd"
    generate_dataset(root, 1, "msd", (32, 32, 32))
    path = root / "imagesTr" / "BRATS_001.nii.gz"
    img = nib.load(path)
    data = np.asanyarray(img.dataobj).copy()
    data[..., 2] = 0  # T1gd
    _save(data, path, img.affine)
    (entry,) = find_cases(root)
    with pytest.raises(CaseError, match=r"BRATS_001.*channel 2 \(t1c\) is all zero"):
        check_case(entry)


def test_gzip_stream_check(tmp_path):
    """Trailer mismatch falls back to a full stream read: multi-member gzip is fine, a cut one is not."""
    data = np.arange(32**3, dtype=np.int16).reshape(32, 32, 32)
    plain = tmp_path / "x.nii"
    _save(data, plain)
    raw = plain.read_bytes()
    multi = tmp_path / "multi.nii.gz"
    multi.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    assert inspect_nifti(multi).shape == (32, 32, 32)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:])[:-100])
    with pytest.raises(CaseError, match="truncated"):
        inspect_nifti(cut, "c1")
    short = tmp_path / "short.nii"
    short.write_bytes(raw[:-10])
    with pytest.raises(CaseError, match=r"case 'c1'.*short.nii: truncated file"):
        inspect_nifti(short, "c1")


def test_datalist_write_is_atomic(tmp_path, synthetic_dataset, monkeypatch):
    out = tmp_path / "datalist.json"
    out.write_text('{"old": true}\n')

    def failing_dump(obj, f, **kwargs):
        f.write('{"training": [')  # a partial document, then a crash mid-serialisation
        raise RuntimeError("disk full")

    monkeypatch.setattr(datalist_module.json, "dump", failing_dump)
    with pytest.raises(RuntimeError, match="disk full"):
        build_datalist(synthetic_dataset, output_file=out, num_folds=2)
    assert json.loads(out.read_text()) == {"old": True}
    with pytest.raises(RuntimeError):
        write_json_atomic({"a": 1}, tmp_path / "new.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["datalist.json"]  # no temporary files left behind
    monkeypatch.undo()
    build_datalist(synthetic_dataset, output_file=out, num_folds=2)
    assert json.loads(out.read_text())["layout"] == "brats2023"


@pytest.mark.parametrize("bundle", ["segresnet_vae", "espnet3d"])
def test_training_reports_every_bad_case_at_once(bundle, dataset, tiny_workflow):
    """A case missing t2w and another whose label holds 5: the shipped train.json stops before training with one
    error that names both (the label was once reported only on the next run, after the first was fixed)."""
    _file(dataset, "t2w").unlink()
    seg = _file(dataset, "seg", "BraTS-GLI-00003-000")
    label = np.asanyarray(nib.load(seg).dataobj).astype(np.uint8)
    label[0, 0, 0] = 5
    _save(label, seg)
    with pytest.raises(RuntimeError) as info:  # MONAI's instantiation wraps it; the command line shows the cause
        tiny_workflow(bundle, dataset_dir=str(dataset)).run()
    error = info.value.__cause__
    assert isinstance(error, BadCasesError), repr(error)
    assert sorted(e.case_id for e in error.errors) == [CASE, "BraTS-GLI-00003-000"]
    message = str(error)
    assert "t2w" in message and f"{seg}: label value {{5}} belongs to no BraTS label convention" in message


def test_label_check_lists_every_bad_file(dataset):
    """Training's label pre-check (a user's own datalist) names every bad file in one error, not the first."""
    bad = [_file(dataset, "seg", case) for case in (CASE, "BraTS-GLI-00004-000")]
    for seg in bad:
        label = np.asanyarray(nib.load(seg).dataobj).astype(np.uint8)
        label[0, 0, 0] = 255
        _save(label, seg)
    with pytest.raises(CorruptLabelError) as info:
        check_label_files(find_cases(dataset), "brats2023")
    message = str(info.value)
    assert message.startswith("2 label files hold values outside the convention") and all(
        str(p) in message for p in bad
    )
