"""Atomic NIfTI writing, no-overwrite rule, label/probability files in the input geometry."""

from __future__ import annotations

import gzip
import logging
import multiprocessing
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from brats_pipeline.inference.writers import SaveLabelMapd, write_nifti_atomic
from brats_pipeline.transforms.preprocessing import RecordStartTimed

REAL_CASE = Path(__file__).resolve().parents[1].parent / "shared/data/BraTS-GLI-00001-000"

AFFINE = np.array(
    [
        [-0.9, 0.0, 0.0, 20.0],
        [0.0, -1.1, 0.0, 31.5],
        [0.0, 0.0, 2.5, -7.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
SHAPE = (12, 10, 8)


def label_volume() -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[2:8, 3:7, 2:6] = 2
    lab[3:6, 4:6, 3:5] = 1
    lab[4, 4, 4] = 4
    return lab


def label_metatensor(filename: str = "/data/BraTS-GLI-00007-000/BraTS-GLI-00007-000-t1c.nii.gz") -> MetaTensor:
    meta = {
        "affine": torch.as_tensor(AFFINE),
        "original_affine": AFFINE.copy(),
        "spatial_shape": np.asarray(SHAPE),
        "filename_or_obj": filename,
    }
    return MetaTensor(torch.as_tensor(label_volume()[None]), meta=meta)


def read(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img


def test_write_nifti_atomic_round_trip(tmp_path):
    lab = label_volume()
    for name in ("case.nii.gz", "case.nii"):
        out = write_nifti_atomic(torch.as_tensor(lab), AFFINE, tmp_path / "sub" / name)
        data, img = read(out)
        assert data.dtype == np.uint8 and img.get_data_dtype() == np.uint8
        assert data.shape == SHAPE
        np.testing.assert_array_equal(data, lab)
        np.testing.assert_allclose(img.affine, AFFINE, atol=1e-6)
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    with gzip.open(tmp_path / "sub" / "case.nii.gz") as f:
        assert len(f.read()) > 0
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["case.nii", "case.nii.gz"]
    with pytest.raises(ValueError, match="must end with"):
        write_nifti_atomic(lab, AFFINE, tmp_path / "case.nrrd")


def test_no_overwrite_unless_asked(tmp_path, caplog):
    path = write_nifti_atomic(label_volume(), AFFINE, tmp_path / "c.nii.gz")
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_nifti_atomic(np.zeros(SHAPE, np.uint8), AFFINE, path)
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime

    saver = SaveLabelMapd(keys="pred", output_dir=tmp_path)
    data = {"pred": MetaTensor(torch.zeros(1, *SHAPE), meta=label_metatensor().meta), "case_id": "c"}
    with caplog.at_level(logging.INFO, logger="brats_pipeline.inference.writers"):
        saver(data)
    assert "not overwritten" in caplog.text
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime

    SaveLabelMapd(keys="pred", output_dir=tmp_path, overwrite=True)(data)
    assert read(path)[0].max() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.nii.gz"]


def _crash_after_some_bytes(original):
    def write(self, payload):
        original(self, bytes(payload)[: len(payload) // 2])
        self.fileobj.flush()
        raise OSError("No space left on device (simulated)")

    return write


def test_crash_during_write_leaves_no_partial_file(tmp_path, monkeypatch):
    out = tmp_path / "c.nii.gz"
    monkeypatch.setattr(gzip.GzipFile, "write", _crash_after_some_bytes(gzip.GzipFile.write))
    with pytest.raises(OSError, match="simulated"):
        write_nifti_atomic(label_volume(), AFFINE, out)
    assert list(tmp_path.iterdir()) == [], "neither the output nor the temporary file may remain"

    saver = SaveLabelMapd(keys="pred", output_dir=tmp_path)
    with pytest.raises(OSError, match="simulated"):
        saver({"pred": label_metatensor(), "case_id": "c"})
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    write_nifti_atomic(label_volume(), AFFINE, out)
    before = out.read_bytes()
    monkeypatch.setattr(gzip.GzipFile, "write", _crash_after_some_bytes(gzip.GzipFile.write))
    with pytest.raises(OSError, match="simulated"):
        write_nifti_atomic(np.zeros(SHAPE, np.uint8), AFFINE, out, overwrite=True)
    assert out.read_bytes() == before, "a failed overwrite keeps the previous file whole"
    assert [p.name for p in tmp_path.iterdir()] == ["c.nii.gz"]


def _write_and_die(path: Path) -> None:
    original = gzip.GzipFile.write

    def write(self, payload):
        original(self, bytes(payload)[: len(payload) // 2])
        self.fileobj.flush()
        os._exit(3)  # like SIGKILL: no exception handler, no finally block runs

    gzip.GzipFile.write = write
    write_nifti_atomic(np.ones((16, 16, 16), np.uint8), np.eye(4), path)


def test_killed_writer_leaves_no_file_under_the_output_name(tmp_path):
    proc = multiprocessing.get_context("fork").Process(target=_write_and_die, args=(tmp_path / "c.nii.gz",))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 3
    assert not (tmp_path / "c.nii.gz").exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert leftovers and all(n.startswith(".c.nii.gz.") and n.endswith(".tmp") for n in leftovers)
    assert list(tmp_path.glob("*.nii.gz")) == []


def test_save_label_map_geometry_case_id_and_probabilities(tmp_path, caplog):
    prob = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    saver = SaveLabelMapd(keys="pred", output_dir=tmp_path / "out", save_probabilities=True, prob_key="prob")
    data = RecordStartTimed()({"pred": label_metatensor(), "prob": prob})  # no case_id: from the file name
    with caplog.at_level(logging.INFO, logger="brats_pipeline.inference.writers"):
        out = saver(data)
    assert out["pred"] is data["pred"]
    assert "for this case" in caplog.text

    data_lab, img = read(tmp_path / "out" / "BraTS-GLI-00007-000.nii.gz")
    assert data_lab.dtype == np.uint8 and data_lab.shape == SHAPE
    np.testing.assert_array_equal(data_lab, label_volume())
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-6)

    data_prob, pimg = read(tmp_path / "out" / "BraTS-GLI-00007-000_prob.nii.gz")
    assert data_prob.shape == (*SHAPE, 3) and data_prob.dtype == np.float32
    np.testing.assert_allclose(data_prob, np.moveaxis(prob.numpy(), 0, -1))
    np.testing.assert_allclose(pimg.affine, AFFINE, atol=1e-6)

    small = SaveLabelMapd(keys="pred", output_dir=tmp_path / "u8", save_probabilities=True, prob_dtype="uint8")
    small({"pred": label_metatensor(), "prob": prob, "case_id": "x"})
    p8 = nib.load(tmp_path / "u8" / "x_prob.nii.gz")
    assert p8.get_data_dtype() == np.uint8
    assert np.abs(p8.get_fdata() - np.moveaxis(prob.numpy(), 0, -1)).max() <= 1 / 510 + 1e-6

    with caplog.at_level(logging.INFO, logger="brats_pipeline.inference.writers"):
        SaveLabelMapd(keys="pred", output_dir=tmp_path / "t", output_postfix="_seg")(
            {"pred": label_metatensor(), "case_id": "y"}
        )
    assert (tmp_path / "t" / "y_seg.nii.gz").exists()
    assert "since the previous case" in caplog.text


def test_save_label_map_rejects_wrong_inputs(tmp_path):
    saver = SaveLabelMapd(keys="pred", output_dir=tmp_path)
    cropped = label_metatensor()[:, 1:, :, :]  # e.g. Invertd forgotten: still the cropped grid
    with pytest.raises(ValueError, match="Invertd"):
        saver({"pred": cropped, "case_id": "a"})
    regions = MetaTensor(torch.zeros(3, *SHAPE), meta=label_metatensor().meta)
    with pytest.raises(ValueError, match="one channel"):
        saver({"pred": regions, "case_id": "a"})
    probs = MetaTensor(torch.full((1, *SHAPE), 0.3), meta=label_metatensor().meta)
    with pytest.raises(ValueError, match="integers"):
        saver({"pred": probs, "case_id": "a"})
    with pytest.raises(ValueError, match="float16"):
        SaveLabelMapd(output_dir=tmp_path, prob_dtype="float16")
    assert list(tmp_path.iterdir()) == []


def test_real_case_prediction_written_in_input_geometry(tmp_path):
    if not REAL_CASE.is_dir():
        pytest.skip(f"real BraTS case not available at {REAL_CASE}")
    from monai.transforms import (
        AsDiscreted,
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        EnsureTyped,
        Invertd,
        Lambdad,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
    )

    from brats_pipeline.inference.inferer import BratsInferer
    from brats_pipeline.transforms.labels import RegionsToLabel

    files = [str(REAL_CASE / f"BraTS-GLI-00001-000-{m}.nii.gz") for m in ("t1c", "t1n", "t2w", "t2f")]
    pre = Compose(
        [
            RecordStartTimed(),
            LoadImaged(keys="image"),
            EnsureChannelFirstd(keys="image"),
            EnsureTyped(keys="image", dtype=torch.float32),
            Orientationd(keys="image", axcodes="RAS"),
            CropForegroundd(keys="image", source_key="image", margin=4, k_divisible=16),
            NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        ]
    )
    d = pre({"image": files})
    assert d["image"].shape[1:] != (240, 240, 155), "cropped to the brain"

    class BrightT1c(torch.nn.Module):  # "tumour" = bright contrast-enhanced voxels
        def forward(self, x):
            return (10 * (x[:, :1] - 2.5)).expand(-1, 3, -1, -1, -1)

    with torch.no_grad():
        d["pred"] = BratsInferer(activation="sigmoid")(d["image"][None], BrightT1c())[0]
    post = Compose(
        [
            Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False),
            AsDiscreted(keys="pred", threshold=0.5),
            Lambdad(keys="pred", func=RegionsToLabel("brats2023")),
            SaveLabelMapd(keys="pred", output_dir=tmp_path),
        ]
    )
    post(d)
    written, img = read(tmp_path / "BraTS-GLI-00001-000.nii.gz")
    source = nib.load(files[0])
    assert written.shape == source.shape == (240, 240, 155)
    assert written.dtype == np.uint8
    np.testing.assert_allclose(img.affine, source.affine, atol=1e-5)
    t1c = np.asanyarray(source.dataobj).astype(np.float32)
    brain = t1c[t1c > 0]
    bright = t1c > brain.mean() + 2.5 * brain.std()
    assert set(np.unique(written)) == {0, 3}
    predicted = written == 3
    dice = 2 * (predicted & bright).sum() / (predicted.sum() + bright.sum())
    assert bright.sum() > 1000
    assert dice > 0.99, "labels land on the bright voxels of the input file's own grid"


class RecordingRun:
    """Stands for ``PredictionRun``: its output folder and overwrite rule, and the cases recorded as written."""

    def __init__(self, prediction_dir: Path, overwrite: bool = False) -> None:
        self.prediction_dir, self.overwrite, self.recorded = prediction_dir, overwrite, []

    def record_written(self, case_id: str) -> None:
        # the label map is in place when its record is written
        assert (self.prediction_dir / f"{case_id}.nii.gz").is_file()
        self.recorded.append(case_id)


def test_each_written_label_map_is_recorded_at_once(tmp_path):
    run = RecordingRun(tmp_path / "preds")
    saver = SaveLabelMapd(prediction_run=run)
    assert saver.output_dir == tmp_path / "preds" and saver.overwrite is False
    saver({"pred": label_metatensor(), "case_id": "c1"})
    assert run.recorded == ["c1"]
    saver({"pred": label_metatensor(), "case_id": "c1"})  # exists, not overwritten: nothing new to record
    assert run.recorded == ["c1"]
    assert SaveLabelMapd(prediction_run=RecordingRun(tmp_path, overwrite=True)).overwrite is True  # the run's rule
    assert SaveLabelMapd(output_dir=tmp_path / "x", prediction_run=run).output_dir == tmp_path / "x"


def test_ctrl_c_while_writing_waits_for_the_record(tmp_path, monkeypatch):
    """A SIGINT that arrives while the label map is being written is raised once the file and its record are both
    done: never a label map without its line in predictions.json."""
    import signal

    from brats_pipeline.inference import writers

    real = writers.write_nifti_atomic

    def write_then_interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the write
        return real(*args, **kwargs)

    monkeypatch.setattr(writers, "write_nifti_atomic", write_then_interrupted)
    run = RecordingRun(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        SaveLabelMapd(prediction_run=run)({"pred": label_metatensor(), "case_id": "c2"})
    assert (tmp_path / "c2.nii.gz").is_file() and run.recorded == ["c2"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's handler is back
