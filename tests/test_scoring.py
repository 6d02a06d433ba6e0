"""Scoring command: folders of synthetic prediction / reference NIfTIs, results checked against hand-computed Dice,
lesion counts, missing-prediction rules, convention detection, rule sets and the summary figure."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest

from brats_pipeline.bundle.command_line import DEBUG_ENV, USER_ERRORS, UserError, user_error_message
from brats_pipeline.evaluation.metrics import HD95_EMPTY_MM
from brats_pipeline.evaluation.scoring import (
    PER_CASE_COLUMNS,
    RULE_SETS,
    ConventionError,
    ScoringError,
    case_scores,
    detect_challenge,
    detect_convention,
    find_references,
    match_predictions,
    score_folders,
)
from brats_pipeline.tools.synthetic import generate_dataset
from brats_pipeline.transforms.labels import CorruptLabelError, LabelConventionError

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
    cmd = [
        sys.executable,
        "-m",
        "brats_pipeline.evaluation.scoring",
        "--pred_dir",
        str(pred_dir),
        "--label_dir",
        str(label_dir),
    ]
    cmd += ["--convention", "brats2023", "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    log = proc.stdout + proc.stderr
    assert "1 of 3 reference case(s) have NO PREDICTION, scored as worst" in log and CASES[2] in log
    assert "WARNING: 1 case(s) without prediction (worst)" in proc.stdout  # loud, in the table too
    assert "BraTS-GLI-00099-000" in log  # the stray prediction is reported
    lines = proc.stdout.splitlines()
    assert lines[0] == "rules: brats2023 (references hold no RC label; --rules to override)"  # the default, said
    assert lines[1].startswith("rules brats2023, challenge GLI (lesions: dilation 3, volume threshold 50 mm^3)")
    assert lines[2].split() == ["region", "n", "Dice", "HD95", "LesionDice", "LesionHD95", "NSD"]
    assert proc.stdout.count("\nET ") == 1  # printed once (by score_folders), not twice

    rows = _read_csv(out / "metrics_per_case.csv")
    assert tuple(rows[0]) == PER_CASE_COLUMNS
    assert {"lesion_dice", "lesion_hd95", "lesion_tp", "lesion_fp", "lesion_fn", "nsd"} <= set(rows[0])
    assert [(r["case_id"], r["region"]) for r in rows] == [(c, g) for c in CASES for g in ("ET", "TC", "WT")]
    for row in rows[:6]:
        expected = _hand_dice(preds[row["case_id"]], refs[row["case_id"]])[row["region"]]
        assert float(row["dice"]) == pytest.approx(expected)
    by_key = {(r["case_id"], r["region"]): r for r in rows}
    shifted = by_key[(CASES[0], "WT")]
    assert float(shifted["hd95"]) == pytest.approx(2.0)  # shifted by 2 voxels of 1 mm along the first axis
    assert float(shifted["volume_ref_ml"]) == pytest.approx(8 * 8 * 8 * 2.0 / 1000)  # spacing from the header
    assert (shifted["lesion_tp"], shifted["lesion_fp"], shifted["lesion_fn"]) == ("1", "0", "0")
    no_et = by_key[(CASES[1], "ET")]  # ET empty in both: BraTS rule
    assert (float(no_et["dice"]), float(no_et["hd95"]), float(no_et["lesion_dice"])) == (1.0, 0.0, 1.0)
    for region in ("ET", "TC", "WT"):  # the missing prediction: the worst value of every ranked metric
        worst = by_key[(CASES[2], region)]
        assert (float(worst["dice"]), float(worst["hd95"])) == (0.0, 374.0)
        assert (float(worst["lesion_dice"]), float(worst["lesion_hd95"]), float(worst["nsd"])) == (0.0, 374.0, 0.0)

    summary = json.loads((out / "metrics_summary.json").read_text())
    assert summary["n_cases"] == 3 and summary["n_missing_predictions"] == 1
    assert summary["missing_predictions"] == [CASES[2]] and summary["missing_predictions_scored_as"] == "worst"
    assert summary["rules"]["name"] == "brats2023" and summary["hd95_empty_mm"] == 374.0
    assert (summary["challenge"], summary["lesion_dilation"], summary["lesion_volume_threshold_mm3"]) == ("GLI", 3, 50)
    assert [Path(p).name for p in summary["unused_predictions"]] == ["BraTS-GLI-00099-000.nii.gz"]
    for region in ("ET", "TC", "WT"):
        hand = [_hand_dice(preds[c], refs[c])[region] for c in CASES[:2]] + [0.0]
        assert summary["metrics"][region]["dice"]["mean"] == pytest.approx(np.mean(hand))
        assert summary["metrics"][region]["dice"]["std"] == pytest.approx(np.std(hand, ddof=1))
        assert summary["metrics"][region]["dice"]["median"] == pytest.approx(np.median(hand))
    assert summary["leaderboard"].startswith("rules brats2023, challenge GLI")
    stats = _read_csv(out / "metrics_summary.csv")
    assert {(r["region"], r["metric"]) for r in stats} >= {("ET", "dice"), ("WT", "lesion_hd95"), ("TC", "nsd")}
    assert {(r["rules"], r["challenge"]) for r in stats} == {("brats2023", "GLI")}  # which leaderboard
    wt_dice = next(r for r in stats if (r["region"], r["metric"]) == ("WT", "dice"))
    assert float(wt_dice["mean"]) == pytest.approx(summary["metrics"]["WT"]["dice"]["mean"])

    png = mpimg.imread(out / "metrics_summary.png")  # the figure reads back: a sizeable, non-blank image
    assert png.ndim == 3 and png.shape[0] >= 300 and png.shape[1] >= 600
    rgb = png[..., :3].reshape(-1, 3)
    assert (rgb.std(axis=0) > 0.05).all() and (np.abs(rgb - 1.0).max(axis=1) > 0.2).mean() > 0.01
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


def test_api_missing_prediction_rules(folders, capsys):
    label_dir, pred_dir, refs, _ = folders
    rows, summary = score_folders(pred_dir, label_dir, "brats2023", on_missing="empty", progress=False, rules="captk")
    assert summary["n_cases"] == 3
    missing = {r["region"]: r for r in rows if r["case_id"] == CASES[2]}
    for region in ("ET", "TC", "WT"):
        assert missing[region]["dice"] == 0.0 and missing[region]["hd95"] == HD95_EMPTY_MM  # captk: 373.13
    for region in ("TC", "WT"):
        assert missing[region]["lesion_fn"] == 1 and missing[region]["lesion_hd95"] == HD95_EMPTY_MM
    # the 8-voxel ET (16 mm^3) is under the 50 mm^3 threshold: left out, so an empty prediction loses nothing there
    assert (missing["ET"]["lesion_fn"], missing["ET"]["lesion_dice"]) == (0, 1.0)
    capsys.readouterr()
    # the API default skips (evaluate.json scores one fold against the whole dataset folder), and says so
    rows, summary = score_folders(pred_dir, label_dir, "brats2023", progress=False, figure=False)
    assert summary["n_cases"] == 2 and summary["n_missing_predictions"] == 1
    assert {r["case_id"] for r in rows} == set(CASES[:2])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "rules: brats2023 (references hold no RC label; --rules to override)"
    assert printed[1].startswith("rules brats2023, challenge GLI") and printed[2].startswith("region")
    assert printed[-1].startswith("WARNING: 1 case(s) without prediction (skip)")
    with pytest.raises(ScoringError, match=CASES[2]):
        score_folders(pred_dir, label_dir, "brats2023", on_missing="error", progress=False)
    with pytest.raises(ScoringError, match="--on_missing"):
        score_folders(pred_dir, label_dir, "brats2023", on_missing="zero", progress=False)


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
    with pytest.raises(ConventionError, match=rf"{CASES[0]}.nii.gz.*\{{4\}}.*--pred_convention") as info:
        score_folders(pred_dir, label_dir, "brats2023", progress=False)  # label 4 is not part of brats2023
    assert isinstance(info.value, LabelConventionError) and "config key" not in str(info.value)


# --- convention and sub-challenge detection -------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "brats_pipeline.evaluation.scoring", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_cli_detects_the_convention_from_the_label_folder(tmp_path):
    """A BraTS 2021 release (label 4 = ET) scored without --convention: detected from the folder layout."""
    label_dir, pred_dir = tmp_path / "BraTS2021", tmp_path / "preds"
    generate_dataset(label_dir, 2, "brats2021", (24, 24, 20), seed=0)
    for case in find_references(label_dir):
        ref = nib.load(str(find_references(label_dir)[case]))
        _save(pred_dir / f"{case}.nii.gz", np.asanyarray(ref.dataobj), spacing=(1.0, 1.0, 1.0))
    assert detect_convention(label_dir) == "brats2018"
    proc = _cli("--pred_dir", str(pred_dir), "--label_dir", str(label_dir), "--output_dir", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "o" / "metrics_summary.json").read_text())
    assert summary["convention"] == "brats2018"
    assert summary["metrics"]["ET"]["dice"]["mean"] == 1.0 and summary["metrics"]["ET"]["lesion_dice"]["mean"] == 1.0


def test_convention_detection_from_label_files_alone(folders, tmp_path):
    label_dir, pred_dir, _, _ = folders
    assert detect_convention(label_dir) == "brats2023"  # case folders with a label but no images: by case id
    flat = tmp_path / "flat"
    _save(flat / "BraTS2021_00001_seg.nii.gz", np.where(_tumor() == 3, 4, _tumor()))
    assert detect_convention(flat) == "brats2018"
    msd = tmp_path / "labelsTr"
    _save(msd / "BRATS_001.nii.gz", _tumor())
    assert detect_convention(msd) == "msd"
    unknown = tmp_path / "unknown"
    _save(unknown / "case1_seg.nii.gz", _tumor())
    with pytest.raises(ScoringError, match="--convention"):
        detect_convention(unknown)
    proc = _cli("--pred_dir", str(pred_dir), "--label_dir", str(unknown), "--output_dir", str(tmp_path / "o"))
    assert proc.returncode != 0 and "--convention" in proc.stderr and "label_convention" not in proc.stderr


def _post_treatment(shift: int = 0) -> np.ndarray:
    """The 2023-style tumor shifted by ``shift`` and a resection cavity (4) beside it, shrunk by ``shift`` too."""
    lab = _tumor(shift)
    cavity = lab[12 + shift : 16, 3:11, 2:10]
    cavity[cavity == 0] = 4
    return lab


def test_brats2024_post_treatment_detected_and_scored_with_rc(tmp_path):
    label_dir, pred_dir = tmp_path / "labels", tmp_path / "preds"
    for i, case in enumerate(CASES[:2]):
        _save(label_dir / case / f"{case}-seg.nii.gz", _post_treatment() if i else _tumor())
        _save(pred_dir / f"{case}.nii.gz", _post_treatment(shift=1) if i else _tumor())
    assert detect_convention(label_dir) == "brats2024"  # the 2023 layout, but a label holds the cavity value 4
    rows, summary = score_folders(
        pred_dir, label_dir, progress=False, label_scores=True, figure=False, rules="brats2023"
    )
    assert summary["convention"] == "brats2024"
    assert [r["region"] for r in rows[:6]] == ["ET", "TC", "WT", "RC", "NETC", "SNFH"]
    by_key = {(r["case_id"], r["region"]): r for r in rows}
    rc = by_key[(CASES[1], "RC")]
    assert rc["volume_ref_ml"] == pytest.approx((_post_treatment() == 4).sum() * 2.0 / 1000)
    assert (rc["lesion_tp"], rc["lesion_fp"], rc["lesion_fn"]) == (1, 0, 0) and 0.0 < rc["dice"] < 1.0
    assert by_key[(CASES[0], "RC")]["dice"] == 1.0  # no cavity on either side: both empty
    netc = by_key[(CASES[1], "NETC")]
    assert netc["volume_ref_ml"] == pytest.approx((_post_treatment() == 1).sum() * 2.0 / 1000)
    wt = by_key[(CASES[1], "WT")]  # the cavity is not tumor
    assert wt["volume_ref_ml"] == pytest.approx(np.isin(_post_treatment(), (1, 2, 3)).sum() * 2.0 / 1000)
    assert set(summary["metrics"]) == {"ET", "TC", "WT", "RC", "NETC", "SNFH"}


def test_detect_challenge_and_presets(tmp_path):
    assert detect_challenge(["BraTS-MET-00001-000", "BraTS-MET-00002-000"]) == "MET"
    assert detect_challenge(["BraTS2021_00001", "BRATS_001"]) == "GLI"
    assert detect_challenge(["BraTS-MEN-RT-0001-1"]) == "GLI"  # no 2023 preset: as before
    # the official package's sub-challenges (--rules brats2025): MEN-RT, pre-operative MEN, GoAT
    assert detect_challenge(["BraTS-MEN-RT-0001-1", "BraTS-MEN-RT-0002-1"], "brats2025") == "MEN-RT"
    assert detect_challenge(["BraTS-MEN-00004-000"], "brats2025") == "MEN-PRE"
    assert detect_challenge(["BraTS-GoAT-00001-000"], "brats2025") == "GoAT"
    assert detect_challenge(["BraTS-PED-00001-000"], "brats2025") == "PED"
    assert detect_challenge(["BraTS-SSA-00001-000"], "brats2025") == "GLI"  # no config of its own
    with pytest.raises(ScoringError, match="--challenge"):
        detect_challenge(["BraTS-MEN-RT-0001-1", "BraTS-MEN-00004-000"], "brats2025")
    with pytest.raises(ScoringError, match="--challenge"):
        detect_challenge(["BraTS-MET-00001-000", "BraTS-MEN-00002-000"])
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[2:12, 2:12, 2:12] = 2
    ref[5:9, 5:9, 5:9] = 3  # 64 voxels of ET
    ref[15:17, 15:17, 15:16] = 3  # 4 voxels of ET: a lesion for MET (threshold 2), not for GLI (50)
    pred = np.where(ref == 3, 2, ref)
    pred[5:9, 5:9, 5:9] = 3
    gli = case_scores(pred, ref, "brats2023", challenge="GLI")["ET"]
    met = case_scores(pred, ref, "brats2023", challenge="MET")["ET"]
    assert (gli["lesion_tp"], gli["lesion_fn"], gli["lesion_dice"]) == (1, 0, 1.0)
    assert (met["lesion_tp"], met["lesion_fn"], met["lesion_dice"]) == (1, 1, 0.5)


def test_rule_sets(folders):
    label_dir, pred_dir, _, _ = folders
    assert set(RULE_SETS) == {"brats2023", "captk", "monai"}
    by_rules = {
        name: {
            (r["case_id"], r["region"]): r
            for r in score_folders(pred_dir, label_dir, "brats2023", rules=name, progress=False, print_table=False)[0]
        }
        for name in RULE_SETS
    }
    no_et = (CASES[1], "ET")  # empty in reference and prediction
    assert by_rules["brats2023"][no_et]["dice"] == by_rules["captk"][no_et]["dice"] == 1.0
    assert np.isnan(by_rules["monai"][no_et]["dice"]) and np.isnan(by_rules["monai"][no_et]["lesion_dice"])
    shifted = (CASES[0], "WT")
    assert {round(r[shifted]["hd95"], 6) for r in by_rules.values()} == {2.0}  # slabs 2 voxels apart agree
    with pytest.raises(ScoringError, match="--rules"):
        score_folders(pred_dir, label_dir, "brats2023", rules="brats2099", progress=False)


def test_case_ids_limit_the_scored_references(folders):
    """``evaluate.json`` scores its fold only: other references are not reported missing; a listed case without a
    prediction is scored as the challenge does; an unknown id is an error."""
    label_dir, pred_dir, _, _ = folders
    rows, summary = score_folders(
        pred_dir,
        label_dir,
        "brats2023",
        case_ids=[CASES[0], CASES[2]],
        on_missing="worst",
        progress=False,
        figure=False,
    )
    assert {r["case_id"] for r in rows} == {CASES[0], CASES[2]} and summary["n_cases"] == 2
    assert summary["missing_predictions"] == [CASES[2]]
    assert all(r["dice"] == 0.0 for r in rows if r["case_id"] == CASES[2])
    with pytest.raises(ScoringError, match="BraTS-GLI-00777-000"):
        score_folders(pred_dir, label_dir, "brats2023", case_ids=["BraTS-GLI-00777-000"], progress=False)


# --- user mistakes: one error line, exit status 1 ---------------------------------------------------------------------

#: the installed console command (pip install -e .), next to this interpreter
BRATS_SCORE = Path(sys.executable).parent / "brats-score"
#: without BRATS_DEBUG, whatever the calling shell set
SCORE_ENV = {k: v for k, v in os.environ.items() if k != DEBUG_ENV} | {"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def _score(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    assert BRATS_SCORE.is_file(), f"{BRATS_SCORE} is not installed (pip install -e .)"
    cmd = [str(BRATS_SCORE), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env or SCORE_ENV, cwd=cwd)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The failed command's stderr: exactly one line, ``error: ...``, and exit status 1."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), (proc.returncode, proc.stderr)
    return lines[0]


def test_scoring_errors_are_user_errors():
    """Every scorer mistake is a UserError, which the one-line handler knows; ConventionError is also what the
    bundles' handler knew already (LabelConventionError)."""
    assert issubclass(ScoringError, UserError) and UserError in USER_ERRORS
    assert issubclass(ConventionError, ScoringError) and issubclass(ConventionError, LabelConventionError)
    assert issubclass(ScoringError, ValueError)  # callers catching ValueError keep working
    assert user_error_message(ScoringError("pred_dir p is not a directory")) == "pred_dir p is not a directory"


def test_cli_prediction_in_another_convention_is_one_error_line(tmp_path):
    """BraTS 2018 predictions (ET = 4) against BraTS 2023 labels: the advice in one line, no traceback, no files;
    BRATS_DEBUG=1 gives the traceback back."""
    label_dir, pred_dir = tmp_path / "labels", tmp_path / "preds"
    for case in CASES[:2]:
        _save(label_dir / case / f"{case}-seg.nii.gz", _tumor())
        _save(pred_dir / f"{case}.nii.gz", np.where(_tumor() == 3, 4, _tumor()))  # ET in the 2018 convention
    args = ["--pred_dir", str(pred_dir), "--label_dir", str(label_dir), "--output_dir", str(tmp_path / "o")]
    proc = _score(*args, "--convention", "brats2023")
    line = _one_error_line(proc)
    assert line.startswith(f"error: {pred_dir / CASES[0]}.nii.gz: label values {{4}} are not part of the 'brats2023'")
    assert line.endswith(
        "give the predictions' convention with --pred_convention (brats2018, brats2023, brats2024, msd)"
    )
    assert proc.stdout == "" and not (tmp_path / "o").exists()
    # without --convention the detected one is logged (INFO) first; the error is still the one last line
    proc = _score(*args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == line and proc.stderr.count("error: ") == 1
    debug = _score(*args, "--convention", "brats2023", env={**SCORE_ENV, DEBUG_ENV: "1"})
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "ConventionError: " in debug.stderr and "\nerror: " not in debug.stderr


def test_cli_missing_folders_are_one_error_line(folders, tmp_path):
    label_dir, pred_dir, _, _ = folders
    out = ["--output_dir", str(tmp_path / "o"), "--convention", "brats2023"]
    missing = tmp_path / "no_such_predictions"
    proc = _score("--pred_dir", str(missing), "--label_dir", str(label_dir), *out)
    assert _one_error_line(proc) == f"error: pred_dir {missing} is not a directory"
    proc = _score("--pred_dir", str(pred_dir), "--label_dir", str(tmp_path / "no_labels"), *out)
    assert _one_error_line(proc) == f"error: label_dir {tmp_path / 'no_labels'} is not a directory"
    proc = _score("--pred_dir", str(pred_dir), "--label_dir", str(label_dir), *out, "--rules", "brats2099")
    assert _one_error_line(proc) == (
        "error: rules (--rules) must be one of brats2023, brats2025, captk, monai; got 'brats2099'"
    )
    assert not (tmp_path / "o").exists()


def test_cli_nothing_matches_fails(folders, tmp_path):
    """Predictions of other cases (the validation folder's, say) against these labels: no all-worst table with exit
    status 0, but one line naming both folders and what each holds; whatever --on_missing says."""
    label_dir, _, _, _ = folders
    other = tmp_path / "validation_predictions"
    for i in (1, 2):
        _save(other / f"BraTS-GLI-0090{i}-000.nii.gz", _tumor())
    args = ["--pred_dir", str(other), "--label_dir", str(label_dir), "--output_dir", str(tmp_path / "o")]
    proc = _score(*args, "--convention", "brats2023")
    assert _one_error_line(proc) == (
        f"error: no prediction in {other} (2 NIfTI files, e.g. BraTS-GLI-00901-000.nii.gz) matches a reference case "
        f"in {label_dir} (3 reference label files, e.g. case {CASES[0]}); predictions are matched by case id: are "
        "these the predictions of the cases in that label folder?"
    )
    assert proc.stdout == "" and not (tmp_path / "o").exists()
    for on_missing in ("empty", "skip", "error"):
        proc = _score(*args, "--convention", "brats2023", "--on_missing", on_missing)
        assert "no prediction in" in _one_error_line(proc), on_missing
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _score("--pred_dir", str(empty), "--label_dir", str(label_dir), "--output_dir", str(tmp_path / "o"))
    assert f"no prediction in {empty} (0 NIfTI files) matches" in proc.stderr.splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr


def test_nothing_matches_in_python(folders, tmp_path):
    """score_folders raises too; with case_ids (evaluate.json: its own run wrote the predictions, and its failure
    report names the cases that failed) the listed cases are scored by on_missing."""
    label_dir, _, _, _ = folders
    empty = tmp_path / "empty"
    empty.mkdir()
    for on_missing in ("worst", "skip"):
        with pytest.raises(ScoringError, match=rf"no prediction in {empty} \(0 NIfTI files\).*3 reference label files"):
            score_folders(empty, label_dir, "brats2023", on_missing=on_missing, progress=False, print_table=False)
    with pytest.raises(ScoringError, match="no prediction in"):
        score_folders(empty, label_dir, "brats2023", case_ids=[CASES[0]], on_missing="skip", progress=False)
    rows, summary = score_folders(
        empty, label_dir, "brats2023", case_ids=[CASES[0]], on_missing="worst", progress=False, print_table=False
    )
    assert summary["n_missing_predictions"] == 1 and all(r["dice"] == 0.0 for r in rows)


def test_missing_ids_listed_up_to_twenty(tmp_path, capsys):
    """A fold scored against the whole training folder (--on_missing skip): the log and the table name the first 20
    missing cases, metrics_summary.json every one."""
    label_dir, pred_dir = tmp_path / "labels", tmp_path / "preds"
    cases = [f"BraTS-GLI-{i:05d}-000" for i in range(1, 26)]
    for case in cases:
        _save(label_dir / case / f"{case}-seg.nii.gz", _tumor())
    _save(pred_dir / f"{cases[0]}.nii.gz", _tumor())
    _, summary = score_folders(
        pred_dir, label_dir, "brats2023", output_dir=tmp_path / "o", figure=False, progress=False
    )
    assert summary["n_cases"] == 1 and len(summary["missing_predictions"]) == 24
    warning = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING"))
    assert warning.endswith(f"{cases[20]}, ... (4 more)") and cases[21] not in warning
    assert len(json.loads((tmp_path / "o" / "metrics_summary.json").read_text())["missing_predictions"]) == 24


def test_corrupt_label_value_is_not_a_convention_flag(folders):
    """A value no convention has (5) is a corrupt file: named with the value, no advice to change a flag."""
    label_dir, pred_dir, _, preds = folders
    bad = preds[CASES[0]].copy()
    bad[0, 0, 0] = 5
    path = _save(pred_dir / f"{CASES[0]}.nii.gz", bad)
    with pytest.raises(ConventionError) as info:
        score_folders(pred_dir, label_dir, "brats2023", progress=False, print_table=False)
    message = str(info.value)
    assert message.startswith(f"{path}: label value {{5}} belongs to no BraTS label convention")
    assert "corrupt" in message and "--pred_convention" not in message and "--convention" not in message
    assert info.value.bad_values == (5.0,) and info.value.source == str(path)
    with pytest.raises(CorruptLabelError):
        case_scores(bad, preds[CASES[0]], "brats2023")


def test_unreadable_prediction_names_the_file(folders):
    """An empty or truncated prediction is the user's file, not a bug: a ScoringError naming it (one line on the
    command line)."""
    label_dir, pred_dir, _, _ = folders
    empty = pred_dir / f"{CASES[0]}.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(ScoringError, match=rf"{empty}: cannot read it as a NIfTI label map \(ImageFileError"):
        score_folders(pred_dir, label_dir, "brats2023", progress=False, print_table=False)
    truncated = pred_dir / f"{CASES[1]}.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[:120])
    empty.unlink()
    with pytest.raises(ScoringError, match=rf"{truncated}: cannot read it as a NIfTI label map"):
        score_folders(pred_dir, label_dir, "brats2023", progress=False, print_table=False)
