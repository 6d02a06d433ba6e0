"""What an inference run did to its output folder: cases kept, written and failed, and which model wrote them.

``inference.json`` never recomputes a case whose label map is already in ``prediction_dir`` (unless ``overwrite``):
:class:`ExistingPredictions` drops those cases before screening and loading. It also keeps a record,
``prediction_dir/predictions.json``, of the model that wrote each case (SHA-256 of the checkpoint files), updated
(atomically) as each label map is written (``SaveLabelMapd(prediction_run=...)`` calls
:meth:`PredictionRun.record_written`, with Ctrl-C held back until both are done), so a run that is interrupted or
killed leaves no label map without its record. A second run with another model then says how many kept files came
from a different model, or from a model it has no record of, instead of mixing two models' outputs silently.
:class:`InferenceSummary` prints the end-of-run line: written, kept, failed, and the label convention and
enhancing-tumor value of the written maps. :class:`PredictionRun` wires the three for ``inference.json``; a Ctrl-C
prints its :meth:`PredictionRun.interrupt_message` (``interrupted: K of N cases written to ...``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from brats_pipeline.atomic_files import write_json_atomic
from brats_pipeline.bundle.command_line import InterruptGuard, report_interrupts_with
from brats_pipeline.data.datalist import find_cases
from brats_pipeline.data.layouts import entry_case_id
from brats_pipeline.data.screening import ScreenedCases
from brats_pipeline.transforms.labels import get_convention

__all__ = ["ExistingPredictions", "InferenceSummary", "PredictionRun", "RECORD_NAME", "file_sha256"]

logger = logging.getLogger(__name__)

#: the record of which model wrote which prediction, inside ``prediction_dir``
RECORD_NAME = "predictions.json"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


class ExistingPredictions:
    """The cases whose label map already exists in ``prediction_dir``: kept, not recomputed, unless ``overwrite``.

    Args:
        prediction_dir: the output folder (``@prediction_dir``).
        overwrite: recompute and replace existing outputs (config key ``overwrite``).
        model_files: the checkpoint files of this run's model (``models/model.pt`` and ensemble members); files
            that do not exist are ignored. Their SHA-256 identifies the model in ``predictions.json``.
        output_ext: the label maps' extension (``SaveLabelMapd``'s).
    """

    def __init__(
        self,
        prediction_dir: str | os.PathLike,
        overwrite: bool = False,
        model_files: Iterable[str | os.PathLike] = (),
        output_ext: str = ".nii.gz",
    ) -> None:
        if not isinstance(overwrite, bool):
            raise TypeError(f"'overwrite' must be true or false, got {overwrite!r}")
        self.prediction_dir = Path(prediction_dir)
        self.overwrite = overwrite
        self.output_ext = output_ext
        self.model = {str(p): file_sha256(p) for p in model_files if Path(p).is_file()}
        self.kept: list[str] = []
        self.kept_from_other_model: list[str] = []
        #: kept cases that ``predictions.json`` has no entry for (written before the record, or by a writer
        #: without it): their model is unknown
        self.kept_unrecorded: list[str] = []
        #: the cases this run wrote and recorded, in order (:meth:`record_written`)
        self.recorded: list[str] = []
        self.started = time.time()

    def output_of(self, case_id: str) -> Path:
        return self.prediction_dir / f"{case_id}{self.output_ext}"

    def record(self) -> dict[str, Any]:
        """``predictions.json`` as it is on disk (``{"cases": {case_id: {"model": {...}}}}``), or empty."""
        path = self.prediction_dir / RECORD_NAME
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {"cases": {}}

    def pending(self, entries: Sequence[Mapping[str, Any]]) -> list[dict]:
        """``entries`` without the cases whose output exists (all of them with ``overwrite``); bad-case entries
        (``case_error``) always pass, so that screening reports them."""
        if self.overwrite:
            return [dict(e) for e in entries]
        previous = self.record().get("cases", {})
        out = []
        for entry in entries:
            case_id = entry_case_id(entry)
            if "case_error" not in entry and self.output_of(case_id).is_file():
                self.kept.append(case_id)
                model = (previous.get(case_id) or {}).get("model")
                if self.model and model is None:
                    self.kept_unrecorded.append(case_id)
                elif self.model and model != self.model:
                    self.kept_from_other_model.append(case_id)
                continue
            out.append(dict(entry))
        if self.kept:
            logger.info(
                "%d case(s) already have a prediction in %s: kept, not recomputed (--overwrite True to replace)",
                len(self.kept),
                self.prediction_dir,
            )
        return out

    def written(self, case_ids: Iterable[str]) -> list[str]:
        """The cases of ``case_ids`` whose output was written by this run (recorded as written, or newer than the
        run's start)."""
        recorded = set(self.recorded)
        return [
            c
            for c in case_ids
            if c in recorded or (self.output_of(c).is_file() and self.output_of(c).stat().st_mtime >= self.started)
        ]

    def record_written(self, case_id: str) -> None:
        """Record in ``predictions.json`` (atomically) that this run's model wrote ``case_id``'s label map, as soon as
        it is written."""
        self.update_record([case_id])
        if case_id not in self.recorded:
            self.recorded.append(case_id)

    def update_record(self, written: Sequence[str]) -> None:
        """Add this run's model to ``predictions.json`` for the ``written`` cases."""
        if not written:
            return
        record = self.record()
        cases = record.setdefault("cases", {})
        for case_id in written:
            cases[case_id] = {"model": self.model, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json_atomic(record, self.prediction_dir / RECORD_NAME)


class InferenceSummary:
    """The end-of-run lines of ``inference.json``: written, kept and failed cases, and what the files hold.

    Args:
        existing: the run's :class:`ExistingPredictions`.
        report: the run's :class:`~brats_pipeline.data.screening.CaseFailureReport`.
        label_convention: the convention of the written label maps.
        include_rc: whether the resection cavity (label 4) is written.
    """

    def __init__(self, existing: ExistingPredictions, report: Any, label_convention: str, include_rc: bool = False):
        self.existing = existing
        self.report = report
        self.label_convention = label_convention
        self.include_rc = include_rc

    def __call__(self) -> dict[str, Any]:
        accepted = [entry_case_id(e) for e in self.report.accepted]
        written = self.existing.written(accepted)
        self.existing.update_record([c for c in written if c not in self.existing.recorded])  # a writer without it
        conv = get_convention(self.label_convention)
        labels = f"label convention {conv.name}: enhancing tumor = {conv.enhancing}" + (
            ", resection cavity = 4" if self.include_rc else ""
        )
        lines = [f"inference: wrote {len(written)} label map(s) to {self.existing.prediction_dir} ({labels})"]
        if self.existing.kept:
            lines.append(
                f"  kept {len(self.existing.kept)} existing prediction(s) without recomputing them;"
                " --overwrite True to replace"
            )
        if self.existing.kept_from_other_model:
            lines.append(
                f"  WARNING: {len(self.existing.kept_from_other_model)} kept prediction(s) were written by another"
                f" model ({', '.join(self.existing.kept_from_other_model[:5])}"
                f"{' ...' if len(self.existing.kept_from_other_model) > 5 else ''}); --overwrite True to replace them"
            )
        if self.existing.kept_unrecorded:
            unknown = self.existing.kept_unrecorded
            lines.append(
                f"  WARNING: {len(unknown)} kept prediction(s) have no record of the model that wrote them in "
                f"{RECORD_NAME} ({', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}); --overwrite True "
                "to replace them"
            )
        if self.report.failures:
            lines.append(f"  {len(self.report.failed_cases)} case(s) failed: see the list below")
        print("\n".join(lines), flush=True)
        return {
            "written": written,
            "kept": list(self.existing.kept),
            "kept_from_other_model": list(self.existing.kept_from_other_model),
            "kept_unrecorded": list(self.existing.kept_unrecorded),
            "failed": self.report.failed_cases,
        }


class PredictionRun:
    """The cases of one ``inference.json`` run and what became of them, wired once for both bundles.

    The cases of ``dataset_dir`` (every layout :func:`~brats_pipeline.data.datalist.find_cases` recognises, unusable
    case folders included) less those already predicted (:class:`ExistingPredictions`), screened
    (:func:`~brats_pipeline.data.screening.screen_cases`): :attr:`cases` is what the evaluator runs; :attr:`report`
    is the Ignite handler that records a case failing during the run; :attr:`interrupt_guard` keeps a Ctrl-C from
    being recorded as a failed case; ``SaveLabelMapd(prediction_run=...)`` writes into :attr:`prediction_dir` and
    records each label map in ``predictions.json`` as it is written (:meth:`record_written`); :meth:`finish` prints
    the summary (:class:`InferenceSummary`) and ends a run with bad cases with a non-zero exit status. A Ctrl-C prints
    :meth:`interrupt_message`::

        "prediction_run": {"_target_": "brats_pipeline.inference.runs.PredictionRun", "dataset_dir": "@dataset_dir",
                           "prediction_dir": "@prediction_dir", "overwrite": "@overwrite", "strict": "@strict",
                           "model_files": "$[@ckpt_dir + '/model.pt'] + list(@ensemble_checkpoints)"},
        "dataset": {"_target_": "Dataset", "data": "$@prediction_run.cases", ...},
        "postprocessing": ..., {"_target_": "...SaveLabelMapd", "keys": "pred", "prediction_run": "@prediction_run"}
        "handlers": [..., "$@prediction_run.report", ..., "$@prediction_run.interrupt_guard"],
        "finalize": ["$@prediction_run.finish(@include_rc)"]

    Args:
        dataset_dir: the folder of cases to segment.
        prediction_dir: the output folder of the label maps.
        overwrite: recompute and replace existing label maps.
        model_files: this run's checkpoint files (recorded by SHA-256 next to the label maps they write).
        strict: raise the first bad case's error instead of skipping it.
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        prediction_dir: str | os.PathLike,
        overwrite: bool = False,
        model_files: Iterable[str | os.PathLike] = (),
        strict: bool = False,
    ) -> None:
        self.existing = ExistingPredictions(prediction_dir, overwrite, model_files)
        self.all_cases = find_cases(dataset_dir, check_files=False, keep_bad_cases=True)
        #: the convention of the dataset's labels, where it has any (else BraTS 2018's): the written maps use it
        self.label_convention = next(
            (c["label_convention"] for c in self.all_cases if "label_convention" in c), "brats2018"
        )
        # labels are ignored at inference: a missing, corrupt or mismatched label file does not reject a case
        pending = [{k: v for k, v in c.items() if k != "label"} for c in self.existing.pending(self.all_cases)]
        self.screened = ScreenedCases(pending, strict)
        self.report = self.screened.report
        #: Ignite handler for the evaluator: a Ctrl-C is no failed case (it goes first among the exception handlers)
        self.interrupt_guard = InterruptGuard()
        report_interrupts_with(self.interrupt_message)

    @property
    def prediction_dir(self) -> Path:
        """The output folder of the label maps."""
        return self.existing.prediction_dir

    @property
    def overwrite(self) -> bool:
        """Whether existing label maps are recomputed and replaced."""
        return self.existing.overwrite

    @property
    def cases(self) -> list[dict]:
        """The good cases without a label map yet, in order (screened once)."""
        return self.screened.cases

    def record_written(self, case_id: str) -> None:
        """Record that this run's model wrote ``case_id``'s label map (``predictions.json``, atomically); called by
        ``SaveLabelMapd`` right after the file is in place."""
        self.existing.record_written(case_id)

    def interrupt_message(self) -> str:
        """The line a Ctrl-C prints: how many of this run's cases were written, and how to finish the rest."""
        todo = len(self.screened._cases) if self.screened._cases is not None else len(self.screened.entries)
        kept = f" ({len(self.existing.kept)} kept from before)" if self.existing.kept else ""
        return (
            f"interrupted: {len(self.existing.recorded)} of {todo} cases written to {self.prediction_dir}{kept}; "
            "rerun the same command to finish the rest"
        )

    def finish(self, include_rc: bool = False) -> dict[str, Any]:
        """Print the run's summary and return it; raise (exit status 1) when cases failed."""
        summary = InferenceSummary(self.existing, self.report, self.label_convention, include_rc)()
        self.report.raise_if_failed()
        return summary
