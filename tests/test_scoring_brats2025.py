"""``--rules brats2025``: our tables equal the official package's numbers (``brats-evaluation`` 0.0.10, called
directly here) on hand-built cases, column by column; its summary statistics and missing-case values; the default
rule choice; the one-line error without the package; the issue's example; evaluate.json's rules and folders."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brats_pipeline.bundle.command_line import user_error_message
from brats_pipeline.evaluation.challenge_package import (
    HD95_INFINITE_MM,
    PACKAGE_COLUMNS,
    PACKAGE_METRICS,
    ChallengePackage,
    ChallengePackageError,
)
from brats_pipeline.evaluation.scoring import ScoringError, default_rules, score_folders

brats_evaluation = pytest.importorskip("brats_evaluation")  # the extra ``challenge`` (requirements-dev.txt has it)
from brats_evaluation import config_path, evaluate_single_exam  # noqa: E402
from brats_evaluation.metrics_parser import parse_seg_results  # noqa: E402
from panoptica import Panoptica_Evaluator  # noqa: E402

SHAPE = (40, 40, 40)
#: group -> region of our tables (GLI config)
GROUPS = {"et": "ET", "tc": "TC", "wt": "WT", "rc": "RC", "netc": "NETC", "snfh": "SNFH"}


def _tumor(center: tuple[int, int, int] = (12, 12, 12), radius: int = 6) -> np.ndarray:
    """BraTS 2023 labels: an edema cube (2) around a necrotic core (1) around enhancing tumor (3)."""
    lab = np.zeros(SHAPE, dtype=np.uint8)
    for value, r in ((2, radius), (1, radius - 2), (3, radius - 4)):
        lab[tuple(slice(c - r, c + r) for c in center)] = value
    return lab


def _cases() -> dict[str, tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]]:
    """``{name: (reference, prediction, spacing)}`` of the hand-built cases."""
    ref = _tumor()
    far_fp = ref.copy()
    far_fp[30:34, 30:34, 30:34] = 3  # a false-positive ET blob far from the tumor
    two = np.maximum(_tumor(), _tumor(center=(28, 28, 28), radius=6))
    split = ref.copy()
    split[:, 12, :] = 0  # one lesion cut in two components
    apart = _tumor(center=(12, 12, 12), radius=5)
    apart[7:17, 7:17, 18:28] = apart[7:17, 7:17, 7:17]  # a second copy, 1 voxel apart along z
    merged = apart.copy()
    merged[7:17, 7:17, 17] = 2  # the prediction bridges the gap: one component
    cavity = ref.copy()
    cavity[24:34, 8:16, 8:16] = 4  # resection cavity (2024+ post-treatment labels)
    cavity_pred = np.roll(cavity, 1, axis=0)
    empty = np.zeros(SHAPE, dtype=np.uint8)
    iso = (1.0, 1.0, 1.0)
    return {
        "perfect": (ref, ref.copy(), iso),
        "shift": (ref, np.roll(ref, 2, axis=0), iso),
        "far_fp": (ref, far_fp, iso),
        "missed": (two, ref.copy(), iso),
        "split": (ref, split, iso),
        "merged": (apart, merged, iso),
        "both_empty": (empty, empty.copy(), iso),
        "empty_prediction": (ref, empty.copy(), iso),
        "no_reference": (empty, ref.copy(), iso),
        "anisotropic": (ref, np.roll(ref, 1, axis=2), (1.0, 1.0, 2.5)),
        "rc": (cavity, cavity_pred, iso),
    }


def _save(path: Path, data: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.diag([*spacing, 1.0])), str(path))
    return path


def _case_id(i: int) -> str:
    return f"BraTS-GLI-{i:05d}-000"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """References in BraTS case folders, predictions flat; ``{case id: case name}``."""
    root = tmp_path_factory.mktemp("brats2025")
    label_dir, pred_dir = root / "labels", root / "preds"
    names = {}
    for i, (name, (ref, pred, spacing)) in enumerate(_cases().items(), start=1):
        case = _case_id(i)
        names[case] = name
        _save(label_dir / case / f"{case}-seg.nii.gz", ref, spacing)
        _save(pred_dir / f"{case}.nii.gz", pred, spacing)
    return label_dir, pred_dir, names


def _official(pred: Path, ref: Path, case_id: str, config: str = "gli") -> dict:
    """The package, called directly (its prints and warnings silenced)."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = Panoptica_Evaluator.load_from_config(config_path(config))
        result = evaluate_single_exam(str(pred), str(ref), case_id, evaluator)
    assert "error" not in result, result
    return result


def _official_row(group_result: dict) -> dict[str, float]:
    """Our columns from the package's keys, with the parser's rule: an infinite HD95 is 373 (the parser applies it
    to the global HD95; the brief applies it to the lesion-wise mean too, whose inf the parser leaves as it is)."""
    row = {}
    for column, key in PACKAGE_COLUMNS.items():
        value = group_result.get(key)
        value = math.nan if value is None else float(value)
        row[column] = HD95_INFINITE_MM if column.endswith("hd95") and math.isinf(value) else value
    return row


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cell(text: str) -> float:
    return math.nan if text == "" else float(text)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.fixture(scope="module")
def scored(folders, tmp_path_factory):
    label_dir, pred_dir, _ = folders
    out = tmp_path_factory.mktemp("scores")
    rows, summary = score_folders(
        pred_dir, label_dir, "brats2024", out, rules="brats2025", progress=False, print_table=False
    )
    return out, rows, summary


def test_every_column_equals_the_package(folders, scored):
    """Every case, every label group, every column of metrics_per_case.csv: the package's number, exactly."""
    label_dir, pred_dir, names = folders
    out, _, summary = scored
    assert summary["rules"]["name"] == "brats2025" and summary["package_config"] == "gli"
    assert summary["rules"]["package"]["brats-evaluation"] == "0.0.10"
    table = _read_csv(out / "metrics_per_case.csv")
    assert list(table[0]) == ["case_id", "region", *PACKAGE_METRICS]
    assert [r["region"] for r in table[:6]] == ["ET", "TC", "WT", "RC", "NETC", "SNFH"]
    ours = {(r["case_id"], r["region"]): r for r in table}
    assert len(ours) == len(names) * len(GROUPS)
    for case, name in names.items():
        official = _official(pred_dir / f"{case}.nii.gz", label_dir / case / f"{case}-seg.nii.gz", case)
        for group, region in GROUPS.items():
            expected = _official_row(official[group])
            got = ours[(case, region)]
            for column in PACKAGE_METRICS:
                assert _same(_cell(got[column]), expected[column]), (name, region, column, got[column], expected)


def test_the_cases_cover_what_they_say(folders, scored):
    """The hand-built cases are the situations they are named for (so the column check above covers them)."""
    _, _, names = folders
    _, rows, _ = scored
    by = {(names[r["case_id"]], r["region"]): r for r in rows}
    assert by[("perfect", "ET")]["lesion_dice"] == 1.0 and by[("perfect", "WT")]["hd95"] == 0.0
    assert (by[("far_fp", "ET")]["lesion_fp"], by[("far_fp", "ET")]["lesion_dice"]) == (1, 1.0)
    assert (by[("missed", "WT")]["lesion_tp"], by[("missed", "WT")]["lesion_fn"]) == (1, 1)
    assert by[("split", "WT")]["lesion_tp"] == 1 and by[("split", "WT")]["lesion_fp"] >= 1
    assert (by[("merged", "WT")]["lesion_tp"], by[("merged", "WT")]["lesion_fn"]) == (1, 1)
    assert all(math.isnan(by[("both_empty", "ET")][m]) for m in ("lesion_dice", "lesion_f1", "dice", "hd95"))
    assert by[("empty_prediction", "ET")]["hd95"] == HD95_INFINITE_MM == by[("empty_prediction", "ET")]["lesion_hd95"]
    assert by[("no_reference", "TC")]["lesion_fp"] == 1 and by[("no_reference", "TC")]["hd95"] == HD95_INFINITE_MM
    assert by[("rc", "RC")]["lesion_tp"] == 1 and 0.0 < by[("rc", "RC")]["dice"] < 1.0


def test_summary_is_the_parsers(folders, tmp_path):
    """mean, std (ddof=1) and median per column: those ``parse_seg_results`` appends, on the package's own JSON; a
    missing case is its row of 0 (373 for HD95), counted loudly."""
    label_dir, pred_dir, names = folders
    missing = _case_id(len(names) + 1)  # sorts last, as the parser appends missing subjects last
    _save(label_dir.parent / "labels_missing" / missing / f"{missing}-seg.nii.gz", _tumor())
    labels = tmp_path / "labels"
    for case in [*names, missing]:
        source = label_dir if case in names else label_dir.parent / "labels_missing"
        (labels / case).mkdir(parents=True)
        os.symlink(source / case / f"{case}-seg.nii.gz", labels / case / f"{case}-seg.nii.gz")
    rows, summary = score_folders(
        pred_dir, labels, "brats2024", tmp_path / "o", on_missing="worst", rules="brats2025", progress=False
    )
    assert summary["missing_predictions"] == [missing] and summary["n_missing_predictions"] == 1
    for row in (r for r in rows if r["case_id"] == missing):
        assert {m: row[m] for m in PACKAGE_METRICS} == {
            m: HD95_INFINITE_MM if "hd95" in m else 0 for m in PACKAGE_METRICS
        }
    # the package's own pipeline: evaluate_single_exam per case, its JSON, parse_seg_results
    results = [_official(pred_dir / f"{c}.nii.gz", labels / c / f"{c}-seg.nii.gz", c) for c in names]
    with open(tmp_path / "panoptica.json", "w") as f:
        json.dump({"metrics": results, "missings": [missing]}, f)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # pandas on the all-NaN std columns of an empty group
        parse_seg_results(str(tmp_path / "panoptica.json"), str(tmp_path / "parsed.csv"))
    parsed = pd.read_csv(tmp_path / "parsed.csv", float_precision="round_trip").set_index("subject_id")
    keys = {
        "lesion_dice": "lesionwise_dsc_mean",
        "lesion_nsd": "lesionwise_nsd_mean",
        "lesion_hd95": "lesionwise_hd95_mean",
        "lesion_tp": "all_instance_tp",
        "lesion_fp": "all_instance_fp",
        "lesion_fn": "all_instance_fn",
        "lesion_f1": "all_instance_f1",
        "dice": "global_dsc",
        "nsd": "global_nsd",
        "hd95": "global_hd95",
    }
    stats = summary["metrics"]
    for group, region in GROUPS.items():
        for metric, key in keys.items():
            column = parsed[f"{key}_{group}"]
            subjects = column.drop(["mean", "std", "median"]).astype(float)
            if np.isinf(subjects).any():  # the parser keeps an infinite lesion-wise HD95: the 373 rule, then pandas
                assert metric == "lesion_hd95"
                subjects = subjects.replace(np.inf, HD95_INFINITE_MM)
                expected = {"mean": subjects.mean(), "std": subjects.std(), "median": subjects.median()}
            else:
                expected = {stat: float(column[stat]) for stat in ("mean", "std", "median")}
            for stat, value in expected.items():
                got = stats[region][metric][stat]
                assert _same(math.nan if got is None else got, float(value)), (region, metric, stat, got, value)
    # the same statistics from pandas on our own table, and in metrics_summary.csv and .json
    table = pd.read_csv(tmp_path / "o" / "metrics_per_case.csv", float_precision="round_trip")
    for region, part in table.groupby("region", sort=False):
        for metric in PACKAGE_METRICS:
            values = part[metric].astype(float)
            for stat in ("mean", "std", "median"):
                assert _same(stats[region][metric][stat], float(getattr(values, stat)())), (region, metric, stat)
    written = json.loads((tmp_path / "o" / "metrics_summary.json").read_text())
    assert written["statistics"] == ["mean", "std", "median"] and written["n_cases"] == len(names) + 1
    stat_rows = _read_csv(tmp_path / "o" / "metrics_summary.csv")
    assert list(stat_rows[0]) == ["rules", "challenge", "region", "metric", "n", "mean", "std", "median"]
    assert {(r["rules"], r["challenge"]) for r in stat_rows} == {("brats2025", "GLI")}


def test_issue_example_far_false_positive(tmp_path):
    """One extra far false-positive ET blob: lesion-wise ET Dice halved under brats2023 (the FP counts as a lesion
    of Dice 0), but sq_dsc 1.0 (matched pairs only) and F1 2/3 under brats2025."""
    ref = _tumor(radius=8)  # ET 8^3 = 512 voxels: over the 2023 volume threshold
    pred = ref.copy()
    pred[32:36, 32:36, 32:36] = 3
    case = _case_id(1)
    _save(tmp_path / "l" / case / f"{case}-seg.nii.gz", ref)
    _save(tmp_path / "p" / f"{case}.nii.gz", pred)
    args = (tmp_path / "p", tmp_path / "l", "brats2023")
    old = {r["region"]: r for r in score_folders(*args, rules="brats2023", progress=False, print_table=False)[0]}
    new = {r["region"]: r for r in score_folders(*args, rules="brats2025", progress=False, print_table=False)[0]}
    assert old["ET"]["lesion_dice"] == pytest.approx(0.5) and old["ET"]["lesion_fp"] == 1
    assert new["ET"]["lesion_dice"] == 1.0 and new["ET"]["lesion_f1"] == pytest.approx(2 / 3)
    assert (new["ET"]["lesion_tp"], new["ET"]["lesion_fp"], new["ET"]["lesion_fn"]) == (1, 1, 0)


def test_converted_and_renamed_predictions_are_scored_as_their_copies(tmp_path):
    """A prediction in another convention (--pred_convention) or with another suffix reaches the package as a copy in
    the reference's convention with the prediction's header: the numbers are the package's on that copy."""
    ref = _tumor()
    pred = np.roll(ref, 1, axis=1)
    case = _case_id(1)
    ref_path = _save(tmp_path / "l" / case / f"{case}-seg.nii.gz", ref, (1.0, 1.0, 2.0))
    _save(tmp_path / "p" / f"{case}.nii", np.where(pred == 3, 4, pred), (1.0, 1.0, 2.0))  # BraTS 2018 ET = 4, .nii
    rows, _ = score_folders(
        tmp_path / "p", tmp_path / "l", "brats2023", pred_convention="brats2018", rules="brats2025", progress=False
    )
    expected = _official(_save(tmp_path / "copy" / f"{case}.nii.gz", pred, (1.0, 1.0, 2.0)), ref_path, case)
    for row in rows:
        group = row["region"].lower()
        assert all(_same(row[m], _official_row(expected[group])[m]) for m in PACKAGE_METRICS), row


def test_package_failure_names_the_file(tmp_path):
    """A per-case error of the package ({"error": ...}, here: spacing that differs) is our error naming the file."""
    case = _case_id(1)
    _save(tmp_path / "l" / case / f"{case}-seg.nii.gz", _tumor(), (1.0, 1.0, 1.0))
    bad = _save(tmp_path / "p" / f"{case}.nii.gz", _tumor(), (1.0, 1.0, 1.5))
    with pytest.raises(ChallengePackageError, match=rf"{bad}: the official BraTS evaluation failed on case {case}"):
        score_folders(tmp_path / "p", tmp_path / "l", "brats2023", rules="brats2025", progress=False)


def _post_treatment_folders(root: Path) -> tuple[Path, Path]:
    cavity = _tumor()
    cavity[24:34, 8:16, 8:16] = 4
    case = _case_id(1)
    _save(root / "l" / case / f"{case}-seg.nii.gz", cavity)
    _save(root / "p" / f"{case}.nii.gz", cavity)
    return root / "p", root / "l"


def test_default_rules_follow_the_references(tmp_path, capsys):
    """References with RC labels (detected brats2024) get brats2025, said in one line; others keep brats2023;
    --rules overrides."""
    assert [default_rules(c) for c in ("brats2024", "brats2023", "brats2018", "msd")] == ["brats2025"] + [
        "brats2023"
    ] * 3
    preds, labels = _post_treatment_folders(tmp_path)
    _, summary = score_folders(preds, labels, progress=False, figure=False)
    printed = capsys.readouterr().out.splitlines()
    assert summary["convention"] == "brats2024" and summary["rules"]["name"] == "brats2025"
    assert printed[0] == "rules: brats2025 (references hold RC labels; --rules to override)"
    assert printed[1].startswith("rules brats2025 (brats-evaluation 0.0.10, config gli), challenge GLI: means over 1")
    assert printed[2].split() == ["region", "n", "LesionDSC", "LesionHD95", "F1", "DSC", "HD95", "NSD"]
    _, summary = score_folders(preds, labels, rules="brats2023", progress=False, figure=False)
    assert summary["rules"]["name"] == "brats2023" and "rules: brats2023 (" not in capsys.readouterr().out
    case = _case_id(1)
    _save(tmp_path / "l23" / case / f"{case}-seg.nii.gz", _tumor())
    _save(tmp_path / "p23" / f"{case}.nii.gz", _tumor())
    _, summary = score_folders(tmp_path / "p23", tmp_path / "l23", progress=False, figure=False, print_table=False)
    assert summary["convention"] == "brats2023" and summary["rules"]["name"] == "brats2023"
    with pytest.raises(ScoringError, match="--nsd_tolerance_mm, --label_scores: not under --rules brats2025"):
        score_folders(preds, labels, progress=False, nsd_tolerance_mm=2.0, label_scores=True)


def test_without_the_package_one_error_line_naming_the_extra(tmp_path, monkeypatch):
    """No fallback: --rules brats2025, and the default on RC labels, fail with one line naming the extra."""
    preds, labels = _post_treatment_folders(tmp_path)
    monkeypatch.setitem(sys.modules, "brats_evaluation", None)  # import brats_evaluation now raises ImportError
    for rules in ("brats2025", None):
        with pytest.raises(ChallengePackageError) as info:
            score_folders(preds, labels, rules=rules, progress=False, figure=False)
        message = user_error_message(info.value)
        assert (
            "\n" not in message and "pip install -e .[challenge] (or pip install brats-evaluation==0.0.10)" in message
        )
        assert message.startswith("--rules brats2025 needs the official BraTS evaluation package")
    with pytest.raises(ChallengePackageError, match=r"pip install -e \.\[challenge\]"):
        ChallengePackage("GLI")
    assert score_folders(preds, labels, rules="brats2023", progress=False, print_table=False, figure=False)[1]


def test_cli_without_the_package(tmp_path):
    """The console command: exit status 1 and one ``error:`` line on stderr, nothing on stdout."""
    preds, labels = _post_treatment_folders(tmp_path)
    hidden = tmp_path / "hide" / "brats_evaluation"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('No module named brats_evaluation')\n")
    env = {k: v for k, v in os.environ.items() if k != "BRATS_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "hide"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "brats_pipeline.evaluation.scoring", "--pred_dir", str(preds), "--label_dir"]
    cmd += [str(labels), "--output_dir", str(tmp_path / "o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    assert lines[-1].startswith("error: --rules brats2025 needs") and "pip install -e .[challenge]" in lines[-1]
    assert sum(line.startswith("error: ") for line in lines) == 1 and "Traceback" not in proc.stderr


def test_sub_challenge_configs(tmp_path):
    """--challenge picks the package's config; its groups become our regions (upper case, ET, TC, WT first)."""
    assert ChallengePackage("ped").regions == ("ET", "TC", "WT", "NETC", "CC", "ED")
    assert ChallengePackage("BraTS-MEN-RT").regions == ("GTV",)
    men = ChallengePackage("MEN")
    assert (men.challenge, men.config, men.regions) == ("MEN-PRE", "MenPre", ("ET", "TC", "WT"))
    assert ChallengePackage("goat").config == "GoAT" and ChallengePackage("MET").config == "mets"
    with pytest.raises(ChallengePackageError, match="must be one of GLI, MET, PED, MEN-RT, MEN-PRE, GoAT"):
        ChallengePackage("SSA")


def test_figure_and_table_name_the_leaderboard(scored):
    """The PNG is written with the rule set and the package config in its title."""
    out, _, summary = scored
    assert (out / "metrics_summary.png").stat().st_size > 10_000
    assert summary["leaderboard"] == "rules brats2025 (brats-evaluation 0.0.10, config gli), challenge GLI"


def test_evaluate_json_rules_and_folders():
    """evaluate.json: ``rules`` follows the labels (brats2025 for the post-treatment convention), every evaluation
    gets a folder named for what it scored, the scores a sub-folder named for the rules."""
    from brats_pipeline.bundle.workflows import bundle_workflow

    for bundle in ("segresnet_vae", "espnet3d"):
        wf = bundle_workflow(bundle, "train.json", "evaluate.json", bundle_root="/b", initialize=False)
        assert wf.parser.get_parsed_content("eval_dir") == "/b/eval/BraTS2021_TrainingData-fold0"
        assert wf.parser.get_parsed_content("prediction_dir") == "/b/eval/BraTS2021_TrainingData-fold0/predictions"
        wf = bundle_workflow(
            bundle, "train.json", "evaluate.json", bundle_root="/b", initialize=False, dataset_dir="/d/heldout/",
            eval_split="all", fold=2, label_convention="brats2024",
        )  # fmt: skip
        assert wf.parser.get_parsed_content("rules") == "brats2025"
        assert wf.parser.get_parsed_content("eval_dir") == "/b/eval/heldout-all"
        assert wf.parser.get_parsed_content("score_predictions#output_dir") == "/b/eval/heldout-all/brats2025"
        wf = bundle_workflow(
            bundle, "train.json", "evaluate.json", bundle_root="/b", initialize=False, label_convention="brats2023"
        )
        assert wf.parser.get_parsed_content("rules") == "brats2023"
