"""Figures: overlay PNGs (size, orientation, colors, edge letters), training curves from a real TensorBoard event
file (both loss totals visible, x axes named by what the steps count), atomic PNG writes and overlay file names."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import matplotlib.colors as mcolors
import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from monai.data import MetaTensor

from brats_pipeline.evaluation import figures
from brats_pipeline.evaluation.figures import (
    BRATS_PALETTE,
    SaveOverlayd,
    overlay,
    overlay_figure,
    read_scalars,
    training_curves_figure,
)

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


@pytest.fixture
def drawn(monkeypatch) -> list[Figure]:
    """The figures the functions draw, kept after their PNG is written (to measure what is where)."""
    kept: list[Figure] = []
    save = figures._save_png

    def keep(fig, out_path, dpi):
        kept.append(fig)
        return save(fig, out_path, dpi)

    monkeypatch.setattr(figures, "_save_png", keep)
    return kept


def _overlaps(a, b, tolerance: float = 0.5) -> bool:
    return a.x0 < b.x1 - tolerance and b.x0 < a.x1 - tolerance and a.y0 < b.y1 - tolerance and b.y0 < a.y1 - tolerance


def test_overlay_edge_letters_stay_in_their_panel(tmp_path, drawn):
    """With a reference row, the bottom letter of a panel and the top letter of the panel below used to be drawn
    on top of each other (square axial panels of a BraTS-shaped volume overlapped by a few pixels)."""
    shape = (48, 48, 31)  # 240x240x155 scaled down: square axial panels
    ii, jj, kk = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    t1c = np.where(((ii - 24) / 20) ** 2 + ((jj - 24) / 22) ** 2 + ((kk - 15) / 14) ** 2 <= 1, 300.0 + jj, 0.0)
    label = np.zeros(shape, np.uint8)
    label[26:34, 20:28, 12:18], label[28:32, 22:26, 14:16] = 2, 4
    out = overlay_figure(t1c, label, label, out_path=tmp_path / "two_rows.png", axcodes="LPS", title="two rows")
    png = mpimg.imread(out)
    fig = drawn[-1]
    fig.set_dpi(120)  # the PNG's resolution: display units are then the PNG's pixels
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    panels = [ax.get_window_extent(renderer) for ax in fig.axes]
    assert len(panels) == 6 and png.shape[0] == round(fig.get_size_inches()[1] * 120)
    assert not any(_overlaps(a, b) for n, a in enumerate(panels) for b in panels[n + 1 :])
    letters = []
    for ax, panel in zip(fig.axes, panels, strict=True):
        assert sorted(t.get_text() for t in ax.texts) == sorted(
            figures._EDGE_LETTERS[figures.VIEWS[len(letters) // 4 % 3]]
        )
        for text in ax.texts:
            box = text.get_window_extent(renderer)
            assert panel.x0 - 0.5 <= box.x0 and box.x1 <= panel.x1 + 0.5
            assert panel.y0 - 0.5 <= box.y0 and box.y1 <= panel.y1 + 0.5
            letters.append(box)
    assert not any(_overlaps(a, b) for n, a in enumerate(letters) for b in letters[n + 1 :])
    for box in letters:  # each letter is drawn where it was measured (display y grows upwards, PNG rows down)
        crop = png[png.shape[0] - int(box.y1) - 1 : png.shape[0] - int(box.y0) + 1, int(box.x0) : int(box.x1) + 1]
        assert crop[..., :3].min(axis=-1).max() > 0.6


def _log(log_dir, val_loss: bool = False) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    for it in range(1, 41):
        total = 1.0 / it**0.5
        writer.add_scalar("train_loss", total, it)  # what the trainer optimised ...
        writer.add_scalar("loss_total", total, it)  # ... and the loss's own weighted total: the same values
        writer.add_scalar("loss_dice", 0.8 * total, it)
    for epoch in range(1, 5):
        writer.add_scalar("val_mean_dice", 0.5 + 0.1 * epoch, epoch)
        if val_loss:
            writer.add_scalar("val_loss", 0.9 - 0.1 * epoch, epoch)
    writer.close()


def _near(png: np.ndarray, rgb, tolerance: float = 0.06) -> np.ndarray:
    return np.abs(png[..., :3] - np.asarray(rgb)).max(axis=-1) < tolerance


def test_training_curves_show_both_totals_and_name_the_step(tmp_path, drawn):
    _log(tmp_path / "logs")
    png = mpimg.imread(training_curves_figure(tmp_path / "logs", tmp_path / "curves.png"))
    assert png.shape[0] >= 300 and png.shape[1] >= 800 and png[..., :3].std() > 0.05
    loss_panel = png[:, : png.shape[1] // 2]
    # tags in order loss_dice (C0), loss_total (C1, dashed, on top), train_loss (C2, a wide pale band underneath)
    total = mcolors.to_rgb("C1")
    band = 0.65 * np.ones(3) + 0.35 * np.asarray(mcolors.to_rgb("C2"))  # C2 at alpha 0.35 over white
    assert _near(loss_panel, total).sum() > 150 and _near(loss_panel, band).sum() > 300
    assert _near(png[:, png.shape[1] // 2 :], total).sum() == 0  # the Dice panel has its own colors
    loss_ax, dice_ax = drawn[-1].axes
    assert (loss_ax.get_xlabel(), dice_ax.get_xlabel()) == ("iteration", "epoch")


def test_training_curves_mixed_steps_get_two_x_axes(tmp_path, drawn):
    _log(tmp_path / "logs", val_loss=True)  # val_loss lands in the loss panel but is logged per epoch
    training_curves_figure(tmp_path / "logs", tmp_path / "curves.png")
    loss_ax, dice_ax, epoch_ax = drawn[-1].axes  # the twin axis comes last
    assert loss_ax.get_xlabel() == "iteration" and epoch_ax.get_xlabel() == "epoch"
    assert [line.get_label() for line in epoch_ax.get_lines()] == ["val_loss"]
    assert epoch_ax.get_xlim()[1] < 6 < loss_ax.get_xlim()[1]
    assert "val_loss" in [t.get_text() for t in loss_ax.get_legend().get_texts()]


def test_png_write_is_atomic(tmp_path):
    out = tmp_path / "f.png"
    out.write_bytes(b"old")
    fig = Figure()
    fig.subplots().plot([0, 1])

    def fail(*args, **kwargs):
        raise OSError("disk full")

    fig.savefig = fail
    with pytest.raises(OSError, match="disk full"):
        figures._save_png(fig, out, 50)
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.png"]
    del fig.savefig
    figures._save_png(fig, tmp_path / "sub" / "g.png", 50)
    assert mpimg.imread(tmp_path / "sub" / "g.png").shape[:2] == (240, 320)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "sub" / "g.png").stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize(
    "folder, name, case_id",
    [
        ("BraTS-GLI-00007-000", "BraTS-GLI-00007-000-t1c.nii.gz", "BraTS-GLI-00007-000"),
        ("flat", "BraTS2021_00001_t1ce.nii.gz", "BraTS2021_00001"),
    ],
)
def test_save_overlayd_names_files_by_case_id(tmp_path, folder, name, case_id):
    source = tmp_path / folder / name
    source.parent.mkdir()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(_head(), affine), str(source))
    image = MetaTensor(torch.zeros(4, *SHAPE), meta={"filename_or_obj": str(source)})
    pred = torch.as_tensor(_tumor())[None]
    out_dir = tmp_path / "overlays"
    SaveOverlayd(keys="pred", output_dir=out_dir)({"image": image, "pred": pred})
    assert [p.name for p in out_dir.iterdir()] == [f"{case_id}_overlay.png"]
    SaveOverlayd(keys="pred", output_dir=out_dir)({"image": image, "pred": pred, "case_id": "given"})
    assert (out_dir / "given_overlay.png").is_file()  # a case_id in the data wins, as for SaveLabelMapd


def test_command_line(tmp_path):
    """``curves`` on a real log prints the PNG's path; a folder without a log is one ``error:`` line, status 1."""
    _log(tmp_path / "logs")
    cmd = [sys.executable, "-m", "brats_pipeline.evaluation.figures", "curves"]
    ok = subprocess.run([*cmd, str(tmp_path / "logs"), str(tmp_path / "c.png")], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout == f"{tmp_path / 'c.png'}\n", ok.stderr
    assert mpimg.imread(tmp_path / "c.png").shape[1] >= 800
    bad = subprocess.run([*cmd, str(tmp_path / "nolog"), str(tmp_path / "d.png")], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.splitlines() == [
        f"error: no TensorBoard event files (events.out.tfevents.*) in {tmp_path / 'nolog'}"
    ]


def _score_rows(with_f1: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for case in range(4):
        for region in ("ET", "TC", "WT"):
            row = {"case_id": f"c{case}", "region": region, "dice": rng.uniform(), "hd95": rng.uniform(0, 20)}
            row |= {"lesion_dice": rng.uniform(), "lesion_hd95": 373.0 if case == 3 else rng.uniform(0, 20)}
            rows.append(row | ({"lesion_f1": rng.uniform()} if with_f1 else {}))
    return rows


@pytest.mark.parametrize("rules", ["brats2023", "brats2025"])
def test_scoring_summary_figure_names_its_rules(tmp_path, monkeypatch, rules):
    """The title names the rule set and the sub-challenge (which leaderboard the numbers belong to); brats2025 adds
    the detection F1 panel and calls the whole-region values global."""
    drawn: dict[str, Figure] = {}
    save = figures._save_png

    def keep(fig: Figure, out_path, dpi: int) -> Path:
        drawn["fig"] = fig
        return save(fig, out_path, dpi)

    monkeypatch.setattr(figures, "_save_png", keep)
    challenge = "GLI (package config gli)" if rules == "brats2025" else "GLI"
    out = figures.scoring_summary_figure(
        _score_rows(rules == "brats2025"), tmp_path / "s.png", hd95_penalty_mm=373.0, title="4 cases", rules=rules,
        challenge=challenge,
    )  # fmt: skip
    fig = drawn["fig"]
    assert fig._suptitle.get_text() == f"4 cases, rules {rules}, challenge {challenge}"
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["Dice", "HD95 (mm)"] + (["lesion detection F1"] if rules == "brats2025" else [])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["global" if rules == "brats2025" else "legacy", "lesion-wise"]
    assert mpimg.imread(out).shape[1] >= 800
