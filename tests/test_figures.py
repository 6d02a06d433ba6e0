"""Figures: overlay PNGs (size, orientation, colors) and training curves from a real TensorBoard event file."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest

from brats_pipeline.figures import BRATS_PALETTE, overlay, overlay_figure, read_scalars, training_curves_figure

SHAPE = (40, 36, 20)
REAL_CASE = Path(__file__).resolve().parents[1].parent / "shared/data/BraTS-GLI-00001-000"


def _head() -> np.ndarray:
    ii, jj, kk = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    head = ((ii - 20) / 18) ** 2 + ((jj - 18) / 16) ** 2 + ((kk - 10) / 9) ** 2 <= 1
    return np.where(head, 200.0 + ii, 0.0).astype(np.float32)


def _tumor(center=(27, 12, 10), radius=5.0, et_value: int = 4) -> np.ndarray:
    ii, jj, kk = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    r = np.sqrt((ii - center[0]) ** 2 + (jj - center[1]) ** 2 + (kk - center[2]) ** 2)
    lab = np.zeros(SHAPE, dtype=np.uint8)
    lab[r <= radius] = 2
    lab[r <= radius * 0.6] = et_value
    lab[r <= radius * 0.3] = 1
    return lab


def _green_pixels(png: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of overlay-green pixels in the left third (the axial panel), legend rows excluded."""
    rgb = png[..., :3]
    h, w = rgb.shape[:2]
    green = (rgb[..., 1] > 0.3) & (rgb[..., 0] < 0.15) & (rgb[..., 2] < 0.15)
    green[int(0.88 * h) :] = False
    green[:, w // 3 :] = False
    return np.nonzero(green)


def test_overlay_png_with_and_without_reference(tmp_path):
    t1c, pred, ref = _head(), _tumor(), _tumor(center=(26, 12, 10))
    single = overlay_figure(t1c, pred, out_path=tmp_path / "pred.png", spacing=(1.0, 1.0, 2.5), title="pred")
    double = overlay_figure(t1c, pred, ref, "brats2018", (1.0, 1.0, 2.5), tmp_path / "both.png", "pred + ref")
    a, b = mpimg.imread(single), mpimg.imread(double)
    assert a.ndim == 3 and a.shape[2] in (3, 4) and a.shape[1] >= 600 and a.shape[0] >= 250
    assert b.shape[1] == a.shape[1] and b.shape[0] > 1.5 * a.shape[0]  # the reference adds a row
    for png in (a, b):  # all three BraTS colors are drawn, and the gray image too
        rgb = png[..., :3].reshape(-1, 3)
        for color in BRATS_PALETTE.values():
            assert (np.abs(rgb - np.asarray(color)).max(axis=1) < 0.05).any()
        assert (np.abs(rgb[:, 0] - rgb[:, 1]) < 0.01).sum() > 1000
    assert not list(tmp_path.glob("*.tmp"))


def test_overlay_orientation_is_radiological(tmp_path):
    """A tumor on the patient's left and front: right half of the axial panel, upper half."""
    t1c = _head()
    # stored as LPS (as BraTS files are): high first index = patient's left, low second index = anterior
    left_front = _tumor(center=(30, 8, 10))
    png_lps = mpimg.imread(overlay_figure(t1c, left_front, out_path=tmp_path / "lps.png", axcodes="LPS"))
    rows_lps, cols_lps = _green_pixels(png_lps)
    # the same array read as RAS: high first index = patient's right, low second index = posterior
    png_ras = mpimg.imread(overlay_figure(t1c, left_front, out_path=tmp_path / "ras.png", axcodes="RAS"))
    rows_ras, cols_ras = _green_pixels(png_ras)
    assert cols_lps.mean() > cols_ras.mean() + 20  # patient's left drawn on the image's right
    assert rows_lps.mean() < rows_ras.mean() - 20  # anterior drawn up
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # the same LPS orientation given by an affine
    png_aff = mpimg.imread(overlay_figure(t1c, left_front, out_path=tmp_path / "aff.png", affine=affine))
    assert np.array_equal(png_aff, png_lps)


def test_overlay_errors(tmp_path):
    with pytest.raises(ValueError, match="out_path"):
        overlay_figure(_head(), _tumor())
    with pytest.raises(ValueError, match="shape"):
        overlay_figure(_head(), _tumor()[:, :, :10], out_path=tmp_path / "x.png")
    with pytest.raises(ValueError, match="prediction"):  # label 4 is not part of brats2023
        overlay_figure(_head(), _tumor(), convention="brats2023", out_path=tmp_path / "x.png")


def test_overlay_command_from_brats_case_folder(tmp_path):
    case = "BraTS-GLI-00007-000"
    affine = np.diag([-1.0, -1.0, 1.5, 1.0])
    (tmp_path / case).mkdir()
    nib.save(nib.Nifti1Image(_head(), affine), str(tmp_path / case / f"{case}-t1c.nii.gz"))
    nib.save(nib.Nifti1Image(_tumor(et_value=3), affine), str(tmp_path / f"{case}.nii.gz"))
    out = overlay(
        str(tmp_path / case), str(tmp_path / f"{case}.nii.gz"), str(tmp_path / "o.png"), convention="brats2023"
    )
    assert mpimg.imread(out).shape[1] >= 600


def test_overlay_real_case(tmp_path):
    if not REAL_CASE.is_dir():
        pytest.skip(f"real BraTS case not available at {REAL_CASE}")
    img = nib.load(str(REAL_CASE / "BraTS-GLI-00001-000-t1c.nii.gz"))
    t1c = np.asanyarray(img.dataobj)
    label = np.zeros(t1c.shape, dtype=np.uint8)
    label[140:170, 60:90, 80:100] = 2
    label[148:162, 68:82, 85:95] = 3
    out = overlay_figure(t1c, label, label, "brats2023", out_path=tmp_path / "real.png", affine=img.affine)
    png = mpimg.imread(out)
    rows, cols = _green_pixels(png)
    assert cols.size > 0 and cols.mean() > png.shape[1] / 6  # patient's left (high LPS index) on the right


def test_training_curves_from_event_file(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    log_dir = tmp_path / "logs"
    writer = SummaryWriter(str(log_dir))
    for it in range(1, 31):
        writer.add_scalar("train_loss", 1.0 / it, it)
        writer.add_scalar("loss_kl", 0.1 / it, it)
    for epoch in range(1, 5):
        for region, base in (("tc", 0.5), ("wt", 0.7), ("et", 0.4)):
            writer.add_scalar(f"val_{region}_dice", base + 0.05 * epoch, epoch)
        writer.add_scalar("val_mean_dice", 0.55 + 0.05 * epoch, epoch)
    writer.close()

    scalars = read_scalars(log_dir)
    assert set(scalars) == {"train_loss", "loss_kl", "val_tc_dice", "val_wt_dice", "val_et_dice", "val_mean_dice"}
    steps, values = scalars["val_wt_dice"]
    assert steps.tolist() == [1, 2, 3, 4] and values == pytest.approx([0.75, 0.8, 0.85, 0.9])
    assert len(scalars["train_loss"][0]) == 30

    out = training_curves_figure(log_dir, tmp_path / "curves.png", smoothing=0.5)
    png = mpimg.imread(out)
    assert png.shape[0] >= 250 and png.shape[1] >= 700  # two panels: loss and Dice
    event_file = next(log_dir.glob("events.out.tfevents.*"))
    assert mpimg.imread(training_curves_figure(event_file, tmp_path / "one.png")).shape == png.shape
    with pytest.raises(FileNotFoundError):
        training_curves_figure(tmp_path / "empty", tmp_path / "none.png")
