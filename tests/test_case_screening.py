"""Case screening and the failure report: bad cases are skipped, listed, and end the run with exit status 1."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator
from monai.handlers import StatsHandler
from monai.transforms import Compose, EnsureChannelFirstd, Lambdad, LoadImaged

from brats_pipeline.data.datalist import build_datalist, find_cases
from brats_pipeline.data.screening import BadCasesError, CaseError, CaseFailureReport, CasesFailedError, screen_cases
from brats_pipeline.tools.synthetic import generate_dataset

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
    with caplog.at_level(logging.ERROR, logger="brats_pipeline.data.screening"):
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
        from brats_pipeline.data.screening import check_case

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
        "imports": ["$import brats_pipeline", "$import brats_pipeline.data.screening"],
        "all_cases": cases[:2],
        "case_report": {"_target_": "brats_pipeline.data.screening.CaseFailureReport"},
        "cases": "$brats_pipeline.data.screening.screen_cases(@all_cases, report=@case_report)",
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
    with caplog.at_level(logging.ERROR, logger="brats_pipeline.data.screening"):
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
    with caplog.at_level(logging.ERROR, logger="brats_pipeline.data.screening"):
        with pytest.raises(RuntimeError, match="out of memory"):
            evaluator.run()
    assert report.processed == 1
    assert (report.failures[-1].case_id, report.failures[-1].stage) == ("C2-good", "inference")
    assert "out of memory" in report.failures[-1].reason and len(report.failures) == 1
    assert "not processed: C7-good" in caplog.text


# --- a dataset folder with bad cases, written by brats_pipeline.tools.synthetic ------------------------------------------

TINY = (24, 24, 24)


def _case(root: Path, index: int) -> Path:
    return root / f"BraTS-GLI-{index:05d}-000"


def _file(root: Path, index: int, suffix: str) -> Path:
    return _case(root, index) / f"{_case(root, index).name}-{suffix}.nii.gz"


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """BraTS 2023, 24^3: good cases 1, 3 and 6; case 2 lacks its T2w; case 4 holds two T1c files; case 5's T1c has
    another shape than its other files; ``BraTS-GLI-00007`` (no ``-000``) is a folder of NIfTI files next to them
    that follows no layout."""
    root = tmp_path / "cases"
    generate_dataset(root, 6, "brats2023", TINY, seed=0)
    _file(root, 2, "t2w").unlink()
    shutil.copy(_file(root, 4, "t1c"), _case(root, 4) / f"{_case(root, 4).name}-t1c (1).nii.gz")
    t1c = nib.load(_file(root, 5, "t1c"))
    nib.save(nib.Nifti1Image(np.asanyarray(t1c.dataobj)[:, :, :20], t1c.affine), _file(root, 5, "t1c"))
    shutil.copytree(_case(root, 6), root / "BraTS-GLI-00007")
    return root


def _expected_failures(root: Path) -> dict[str, tuple[str, str]]:
    """case id -> (file, pattern of the reason)."""
    return {
        "BraTS-GLI-00002-000": (str(_file(root, 2, "t2w")), r"missing the t2 image \(no file BraTS-GLI-00002-000-t2w"),
        "BraTS-GLI-00004-000": (
            str(_case(root, 4) / "BraTS-GLI-00004-000-t1c (1).nii.gz"),
            r"two files for 't1c' in one case folder",
        ),
        # the odd file out is the T1c, not the T1n that the old first-file rule would have blamed
        "BraTS-GLI-00005-000": (
            str(_file(root, 5, "t1c")),
            r"shape \(24, 24, 20\) differs from \(24, 24, 24\) of BraTS-GLI-00005-000-t1n.nii.gz, "
            r"BraTS-GLI-00005-000-t2w.nii.gz, BraTS-GLI-00005-000-t2f.nii.gz, BraTS-GLI-00005-000-seg.nii.gz",
        ),
        "BraTS-GLI-00007": (
            str(root / "BraTS-GLI-00007"),
            r"folder name does not follow the brats2023 case naming .*\(e.g. BraTS-GLI-00001-000\)",
        ),
    }


def test_inference_datalist_keeps_bad_cases_for_screening(mixed_folder, tmp_path):
    """The inference path: ``find_cases(check_files=False, keep_bad_cases=True)``, then :func:`screen_cases`."""
    entries = find_cases(mixed_folder, check_files=False, keep_bad_cases=True)
    assert len(entries) == 7
    report = CaseFailureReport(summary_file=tmp_path / "failures.json")
    good = screen_cases(entries, report=report)
    assert [c["case_id"] for c in good] == [f"BraTS-GLI-0000{i}-000" for i in (1, 3, 6)]
    expected = _expected_failures(mixed_folder)
    assert report.failed_cases == sorted(expected)
    for failure in report.failures:
        file, reason = expected[failure.case_id]
        assert failure.file == file and failure.stage == "screening"
        assert re.search(reason, failure.reason), failure.reason
    with pytest.raises(CasesFailedError) as info:
        report.raise_if_failed()
    assert str(info.value.code).startswith("4 case(s) failed (7 screened, 3 accepted, 0 processed)")
    assert all(case in str(info.value.code) for case in expected)
    assert len(json.loads((tmp_path / "failures.json").read_text())["failures"]) == 4

    with pytest.raises(CaseError, match="BraTS-GLI-00002-000.*missing the t2 image"):
        screen_cases(entries, strict=True)  # the first bad case in order
    # header checks in find_cases itself: the odd-shaped case is kept as a bad case too, with the same error
    checked = find_cases(mixed_folder, keep_bad_cases=True)
    assert [c["case_id"] for c in checked if "case_error" in c] == sorted(expected)
    assert screen_cases(checked, check=lambda entry: None) == good  # a custom check never sees a bad entry


def test_training_datalist_names_every_bad_case_in_one_error(mixed_folder, tmp_path):
    out = tmp_path / "datalist.json"
    with pytest.raises(BadCasesError) as info:
        build_datalist(mixed_folder, output_file=out, num_folds=2)
    assert not out.exists()
    text = str(info.value)
    assert text.startswith(f"4 unusable cases in {mixed_folder}")
    expected = _expected_failures(mixed_folder)
    assert [e.case_id for e in info.value.errors] == sorted(expected)
    for error in info.value.errors:
        file, reason = expected[error.case_id]
        assert error.path == file and re.search(reason, error.reason)
        assert f"case {error.case_id!r}: {file}: " in text
    with pytest.raises(BadCasesError):
        find_cases(mixed_folder, check_files=False)  # the assembly errors alone are three

    # an evaluation can keep them aside: the split is made of the good cases only
    d = build_datalist(mixed_folder, num_folds=2, num_validation=1, keep_bad_cases=True)
    assert sorted(c["case_id"] for c in d["training"] + d["validation"]) == [
        f"BraTS-GLI-0000{i}-000" for i in (1, 3, 6)
    ]
    assert [c["case_id"] for c in d["bad_cases"]] == sorted(expected)


def test_odd_file_out_by_affine_and_single_bad_case(tmp_path):
    """One bad case raises its own CaseError; a T1c whose affine differs from the other four files is named."""
    root = tmp_path / "cases"
    generate_dataset(root, 2, "brats2021", TINY, seed=1)
    case = root / "BraTS2021_00002"
    t1c = nib.load(case / "BraTS2021_00002_t1ce.nii.gz")
    affine = t1c.affine.copy()
    affine[0, 3] += 3.0
    nib.save(nib.Nifti1Image(np.asanyarray(t1c.dataobj), affine), case / "BraTS2021_00002_t1ce.nii.gz")
    with pytest.raises(CaseError, match=r"BraTS2021_00002_t1ce.nii.gz: affine differs from that of BraTS2021_00002_t1"):
        build_datalist(root, num_folds=1)


@pytest.mark.filterwarnings("ignore:parsing config_file")
def test_bundle_inference_writes_the_good_cases_and_exits_with_the_bad_ones(mixed_folder, tiny_workflow, tmp_path):
    """espnet3d's inference.json (untrained, width 8) over the mixed folder: three label maps, then exit status 1
    with the four bad cases."""
    from custom_networks.espnet3d import ESPNet3D

    (tmp_path / "models").mkdir()
    torch.manual_seed(0)
    torch.save(ESPNet3D(channels=(4, 8, 32, 64)).state_dict(), tmp_path / "models" / "model.pt")
    wf = tiny_workflow("espnet3d", "inference.json", dataset_dir=str(mixed_folder))
    wf.run()
    with pytest.raises(CasesFailedError) as info:
        wf.finalize()
    written = sorted(p.name for p in (tmp_path / "eval" / "predictions").glob("*.nii.gz"))
    assert written == [f"BraTS-GLI-0000{i}-000.nii.gz" for i in (1, 3, 6)]
    assert str(info.value.code).startswith("4 case(s) failed (7 screened, 3 accepted, 3 processed)")
    for case, (file, _) in _expected_failures(mixed_folder).items():
        assert f"{case} [screening] {file}: " in str(info.value.code)


def test_failure_before_the_first_case_is_not_a_case_failure():
    """A checkpoint that cannot be loaded fails the run at ``STARTED``: re-raised as it is, no case blamed."""
    from ignite.engine import Engine, Events

    report = CaseFailureReport()
    report.accepted.extend([{"case_id": "BraTS-GLI-00001-000"}])
    engine = Engine(lambda e, b: b)
    report.attach(engine)

    def missing_weights(_):
        raise FileNotFoundError("models/model.pt")

    engine.add_event_handler(Events.STARTED, missing_weights)
    with pytest.raises(FileNotFoundError):
        engine.run([{"case_id": "BraTS-GLI-00001-000"}], max_epochs=1)
    assert report.failures == []
