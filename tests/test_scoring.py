"""Scoring command: folders of synthetic prediction / reference NIfTIs, results checked against hand-computed Dice."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_pipeline.metrics import HD95_EMPTY_MM
from brats_pipeline.scoring import (
    PER_CASE_COLUMNS,
    ScoringError,
    find_references,
    match_predictions,
    score_folders,
)

SHAPE = (16, 16, 12)
SPACING = (1.0, 1.0, 2.0)
CASES = ("BraTS-GLI-00001-000", "BraTS-GLI-00002-000", "BraTS-GLI-00003-000")


def _save(path: Path, data: np.ndarray, spacing=SPACING) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.diag([*spacing, 1.0])), str(path))
    return path


def _tumor(shift: int = 0, et: bool = True) -> np.ndarray:
    """BraTS 2023 labels: edema 2 around necrosis 1 around ET 3, shifted along the first axis."""
    lab = np.zeros(SHAPE, dtype=np.uint8)
    lab[3 + shift : 11 + shift, 3:11, 2:10] = 2
    lab[5 + shift : 9 + shift, 5:9, 4:8] = 1
    if et:
        lab[6 + shift : 8 + shift, 6:8, 5:7] = 3
    return lab


def _hand_dice(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    regions = {"ET": (3,), "TC": (1, 3), "WT": (1, 2, 3)}
    out = {}
    for name, values in regions.items():
        p, r = np.isin(pred, values), np.isin(ref, values)
        out[name] = 1.0 if p.sum() + r.sum() == 0 else 2.0 * (p & r).sum() / (p.sum() + r.sum())
    return out


@pytest.fixture
def folders(tmp_path):
    """References in BraTS 2023 case folders; flat predictions for cases 1 and 2, none for 3, one stray file."""
    refs = {CASES[0]: _tumor(), CASES[1]: _tumor(et=False), CASES[2]: _tumor()}
    preds = {CASES[0]: _tumor(shift=2), CASES[1]: _tumor(et=False)}
    label_dir, pred_dir = tmp_path / "labels", tmp_path / "preds"
    for case, lab in refs.items():
        _save(label_dir / case / f"{case}-seg.nii.gz", lab)
        _save(label_dir / case / f"{case}-t1c.nii.gz", np.ones(SHAPE))  # images next to the label are ignored
    for case, lab in preds.items():
        _save(pred_dir / f"{case}.nii.gz", lab)
    _save(pred_dir / "BraTS-GLI-00099-000.nii.gz", _tumor())
    return label_dir, pred_dir, refs, preds


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_writes_per_case_and_summary(folders, tmp_path):
    label_dir, pred_dir, refs, preds = folders
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "brats_pipeline.scoring", "--pred_dir", str(pred_dir), "--label_dir", str(label_dir)]
    cmd += ["--convention", "brats2023", "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    log = proc.stdout + proc.stderr
    assert CASES[2] in log and "without prediction" in log  # the unmatched reference is reported
    assert "BraTS-GLI-00099-000" in log  # and so is the stray prediction
    assert "Dice mean" in proc.stdout and "ET" in proc.stdout

    rows = _read_csv(out / "metrics_per_case.csv")
    assert tuple(rows[0]) == PER_CASE_COLUMNS
    assert [(r["case_id"], r["region"]) for r in rows] == [(c, g) for c in CASES[:2] for g in ("ET", "TC", "WT")]
    for row in rows:
        expected = _hand_dice(preds[row["case_id"]], refs[row["case_id"]])[row["region"]]
        assert float(row["dice"]) == pytest.approx(expected)
    by_key = {(r["case_id"], r["region"]): r for r in rows}
    shifted = by_key[(CASES[0], "WT")]
    assert float(shifted["hd95"]) == pytest.approx(2.0)  # shifted by 2 voxels of 1 mm along the first axis
    assert float(shifted["volume_ref_ml"]) == pytest.approx(8 * 8 * 8 * 2.0 / 1000)  # spacing from the header
    no_et = by_key[(CASES[1], "ET")]  # ET empty in both: BraTS rule
    assert (float(no_et["dice"]), float(no_et["hd95"])) == (1.0, 0.0)

    summary = json.loads((out / "metrics_summary.json").read_text())
    assert summary["n_cases"] == 2
    assert summary["missing_predictions"] == [CASES[2]]
    assert [Path(p).name for p in summary["unused_predictions"]] == ["BraTS-GLI-00099-000.nii.gz"]
    for region in ("ET", "TC", "WT"):
        hand = [_hand_dice(preds[c], refs[c])[region] for c in CASES[:2]]
        assert summary["metrics"][region]["dice"]["mean"] == pytest.approx(np.mean(hand))
        assert summary["metrics"][region]["dice"]["median"] == pytest.approx(np.median(hand))
    stats = _read_csv(out / "metrics_summary.csv")
    assert {(r["region"], r["metric"]) for r in stats} >= {("ET", "dice"), ("WT", "hd95"), ("TC", "specificity")}
    wt_dice = next(r for r in stats if (r["region"], r["metric"]) == ("WT", "dice"))
    assert float(wt_dice["mean"]) == pytest.approx(summary["metrics"]["WT"]["dice"]["mean"])
    assert not list(out.glob("*.tmp"))  # atomic writes leave no temp files


def test_api_missing_prediction_scored_as_empty(folders):
    label_dir, pred_dir, refs, _ = folders
    rows, summary = score_folders(pred_dir, label_dir, "brats2023", on_missing="empty", progress=False)
    assert summary["n_cases"] == 3
    missing = {r["region"]: r for r in rows if r["case_id"] == CASES[2]}
    for region in ("ET", "TC", "WT"):
        assert missing[region]["dice"] == 0.0 and missing[region]["hd95"] == HD95_EMPTY_MM
    with pytest.raises(ScoringError, match=CASES[2]):
        score_folders(pred_dir, label_dir, "brats2023", on_missing="error", progress=False)


def test_shape_mismatch_names_the_file(tmp_path):
    label_dir, pred_dir = tmp_path / "labels", tmp_path / "preds"
    _save(label_dir / f"{CASES[0]}-seg.nii.gz", _tumor())
    bad = _save(pred_dir / f"{CASES[0]}.nii.gz", np.zeros((16, 16, 10)))
    with pytest.raises(ScoringError, match=rf"{bad}.*\(16, 16, 10\)"):
        score_folders(pred_dir, label_dir, "brats2023", progress=False)


def test_matching_layouts(tmp_path):
    """Flat ``<case>-seg`` references; MONAI SaveImage-style predictions in sub-folders; whole-token case ids."""
    label_dir, pred_dir = tmp_path / "labels", tmp_path / "preds"
    for case in CASES:
        _save(label_dir / f"{case}-seg.nii.gz", _tumor())
        _save(label_dir / f"{case}-t1c.nii.gz", np.ones(SHAPE))
        _save(pred_dir / f"{case}-t1c" / f"{case}-t1c_seg.nii.gz", _tumor())
    refs = find_references(label_dir)
    assert sorted(refs) == list(CASES)
    matched, missing, unused = match_predictions(sorted(refs), pred_dir)
    assert sorted(matched) == list(CASES) and missing == [] and unused == []

    msd_labels, msd_preds = tmp_path / "labelsTr", tmp_path / "msd_preds"
    _save(msd_labels / "BRATS_001.nii.gz", _tumor())
    _save(msd_preds / "BRATS_0010.nii.gz", _tumor())  # another case id: must not match BRATS_001
    _save(msd_preds / "pred_BRATS_001.nii.gz", _tumor())
    matched, missing, unused = match_predictions(sorted(find_references(msd_labels)), msd_preds)
    assert matched["BRATS_001"].name == "pred_BRATS_001.nii.gz"
    assert [p.name for p in unused] == ["BRATS_0010.nii.gz"]


def test_prediction_in_another_convention(folders):
    label_dir, pred_dir, refs, preds = folders
    pred_2018 = np.where(preds[CASES[0]] == 3, 4, preds[CASES[0]])
    _save(pred_dir / f"{CASES[0]}.nii.gz", pred_2018)
    _save(pred_dir / f"{CASES[1]}.nii.gz", preds[CASES[1]])
    rows, _ = score_folders(pred_dir, label_dir, "brats2023", pred_convention="brats2018", progress=False)
    et = next(r for r in rows if r["case_id"] == CASES[0] and r["region"] == "ET")
    assert et["dice"] == pytest.approx(_hand_dice(preds[CASES[0]], refs[CASES[0]])["ET"])
    with pytest.raises(ValueError, match=f"{CASES[0]}.nii.gz"):  # label 4 is not part of brats2023
        score_folders(pred_dir, label_dir, "brats2023", progress=False)
