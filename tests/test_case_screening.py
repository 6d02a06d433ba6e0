"""Case screening and the failure report: bad cases are skipped, listed, and end the run with exit status 1."""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator
from monai.handlers import StatsHandler
from monai.transforms import Compose, EnsureChannelFirstd, Lambdad, LoadImaged

from brats_pipeline.case_checks import CaseError
from brats_pipeline.case_screening import CaseFailureReport, CasesFailedError, screen_cases

SHAPE = (10, 9, 8)
MODALITIES = ("t1c", "t1n", "t2w", "t2f")


def write_case(root, case_id: str, kind: str = "good") -> dict:
    """A 4-modality case; ``kind`` breaks it: missing, truncated, nan, flat (2-D) or zero (all-zero t2w)."""
    folder = root / case_id
    folder.mkdir()
    rng = np.random.default_rng(len(case_id))
    files = []
    for m in MODALITIES:
        data = rng.integers(1, 100, SHAPE).astype(np.float32 if kind == "nan" else np.int16)
        if kind == "nan" and m == "t2f":
            data[1, 2, 3] = np.nan
        if kind == "flat" and m == "t1n":
            data = data[:, :, 0]
        if kind == "zero" and m == "t2w":
            data[:] = 0
        path = folder / f"{case_id}-{m}.nii.gz"
        nib.save(nib.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0])), path)
        files.append(str(path))
    if kind == "missing":
        (folder / f"{case_id}-t2w.nii.gz").unlink()
    if kind == "truncated":
        raw = (folder / f"{case_id}-t1c.nii.gz").read_bytes()
        (folder / f"{case_id}-t1c.nii.gz").write_bytes(raw[: len(raw) // 2])
    return {"image": files, "case_id": case_id}


@pytest.fixture
def cases(tmp_path) -> list[dict]:
    kinds = ["good", "missing", "good", "truncated", "nan", "flat", "zero", "good"]
    return [write_case(tmp_path, f"C{i}-{kind}", kind) for i, kind in enumerate(kinds)]


def test_screen_cases_keeps_good_records_bad(cases, caplog):
    report = CaseFailureReport()
    with caplog.at_level(logging.ERROR, logger="brats_pipeline.case_screening"):
        good = screen_cases(cases, report=report)
    assert [c["case_id"] for c in good] == ["C0-good", "C2-good", "C7-good"]
    assert report.failed_cases == ["C1-missing", "C3-truncated", "C4-nan", "C5-flat", "C6-zero"]
    by_case = {f.case_id: f for f in report.failures}
    assert (
        by_case["C1-missing"].file.endswith("C1-missing-t2w.nii.gz")
        and "does not exist" in by_case["C1-missing"].reason
    )
    assert by_case["C3-truncated"].file.endswith("C3-truncated-t1c.nii.gz")
    assert by_case["C4-nan"].file.endswith("C4-nan-t2f.nii.gz") and "NaN" in by_case["C4-nan"].reason
    assert by_case["C5-flat"].file.endswith("C5-flat-t1n.nii.gz") and "2-D" in by_case["C5-flat"].reason
    assert by_case["C6-zero"].file.endswith("C6-zero-t2w.nii.gz") and "all zero" in by_case["C6-zero"].reason
    for case in report.failed_cases:
        assert case in caplog.text
    assert report.screened == 8 and len(report.accepted) == 3

    threaded = CaseFailureReport()
    assert screen_cases(cases, report=threaded, num_workers=2) == good
    assert [str(f) for f in threaded.failures] == [str(f) for f in report.failures]


def test_strict_raises_at_first_bad_case(cases):
    checked = []

    def check(entry):
        checked.append(entry["case_id"])
        from brats_pipeline.case_checks import check_case

        check_case(entry)

    with pytest.raises(CaseError, match="C1-missing-t2w.nii.gz: file does not exist"):
        screen_cases(cases, strict=True, check=check)
    assert checked == ["C0-good", "C1-missing"]


def test_unexpected_check_errors_are_bad_cases_too(cases):
    def check(entry):
        if entry["case_id"] == "C2-good":
            raise MemoryError("simulated")

    report = CaseFailureReport()
    good = screen_cases(cases[:3], report=report, check=check)
    assert [c["case_id"] for c in good] == ["C0-good", "C1-missing"]
    assert report.failures[0].case_id == "C2-good" and report.failures[0].reason == "MemoryError: simulated"


def test_raise_if_failed_exits_non_zero_with_summary(cases, tmp_path):
    report = CaseFailureReport(summary_file=tmp_path / "out" / "failures.json")
    screen_cases(cases, report=report)
    with pytest.raises(SystemExit) as info:
        report.raise_if_failed()
    assert isinstance(info.value, CasesFailedError)
    text = info.value.code
    assert isinstance(text, str), "a str code makes Python print it and exit with status 1"
    assert text.startswith("5 case(s) failed (8 screened, 3 accepted, 0 processed)")
    for case in report.failed_cases:
        assert case in text
    summary = json.loads((tmp_path / "out" / "failures.json").read_text())
    assert summary["screened"] == 8 and len(summary["failures"]) == 5

    clean = CaseFailureReport(summary_file=tmp_path / "clean.json")
    screen_cases([cases[0]], report=clean)
    clean.raise_if_failed()
    assert json.loads((tmp_path / "clean.json").read_text())["failures"] == []


@pytest.mark.filterwarnings("ignore:parsing config_file")
def test_bundle_run_exits_with_the_summary(cases, tmp_path):
    from monai.bundle import run

    config = {
        "imports": ["$import brats_pipeline", "$import brats_pipeline.case_screening"],
        "all_cases": cases[:2],
        "case_report": {"_target_": "brats_pipeline.case_screening.CaseFailureReport"},
        "cases": "$brats_pipeline.case_screening.screen_cases(@all_cases, report=@case_report)",
        "run": ["$len(@cases)"],
        "finalize": ["$@case_report.raise_if_failed()"],
    }
    (tmp_path / "inference.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as info:
        run(config_file=str(tmp_path / "inference.json"), logging_file=False, meta_file=None)
    assert "C1-missing" in str(info.value.code) and "does not exist" in str(info.value.code)


class FailsOnCall(torch.nn.Module):
    """Returns zeros, but raises on its ``fail_at``-th call (a stand-in for an out-of-memory error)."""

    def __init__(self, fail_at: int = 0):
        super().__init__()
        self.fail_at, self.calls = fail_at, 0
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("CUDA out of memory (simulated)")
        return x[:, :1] * self.w


def evaluator_for(entries, network, report, fail_on=None):
    transforms = [LoadImaged(keys="image"), EnsureChannelFirstd(keys="image")]
    if fail_on is not None:

        def boom(d):
            if d["case_id"] == fail_on:
                raise OSError("Input/output error (simulated)")
            return d

        transforms.append(boom)
    transforms.append(Lambdad(keys="image", func=lambda x: x.float()))
    loader = DataLoader(Dataset(entries, transform=Compose(transforms)), batch_size=1, num_workers=0)
    return SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader,
        network=network,
        val_handlers=[report, StatsHandler(iteration_log=False)],
    )


def test_failure_during_loading_is_recorded_and_fails_the_run(cases, caplog):
    report = CaseFailureReport()
    good = screen_cases(cases, report=report)
    evaluator = evaluator_for(good, FailsOnCall(), report, fail_on="C2-good")
    with caplog.at_level(logging.ERROR, logger="brats_pipeline.case_screening"):
        with pytest.raises(RuntimeError, match="applying transform"):
            evaluator.run()
    assert report.processed == 1
    last = report.failures[-1]
    assert (last.case_id, last.stage) == (
        "C2-good",
        "loading",
    ) and last.reason == "OSError: Input/output error (simulated)"
    assert len(report.failures) == 6, "recorded once, although Ignite fires EXCEPTION_RAISED twice"
    assert "not processed: C7-good" in caplog.text
    with pytest.raises(CasesFailedError, match="C2-good"):
        report.raise_if_failed()


def test_failure_during_inference_names_the_case_from_the_batch(cases, caplog):
    report = CaseFailureReport()
    good = screen_cases([cases[0], cases[2], cases[7]], report=report)
    evaluator = evaluator_for(good, FailsOnCall(fail_at=2), report)
    with caplog.at_level(logging.ERROR, logger="brats_pipeline.case_screening"):
        with pytest.raises(RuntimeError, match="out of memory"):
            evaluator.run()
    assert report.processed == 1
    assert (report.failures[-1].case_id, report.failures[-1].stage) == ("C2-good", "inference")
    assert "out of memory" in report.failures[-1].reason and len(report.failures) == 1
    assert "not processed: C7-good" in caplog.text
