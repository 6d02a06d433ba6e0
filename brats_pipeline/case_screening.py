"""Fault-tolerant inference and evaluation runs: screen the cases first, go on with the good ones, fail at the end.

An Ignite engine (hence MONAI's ``SupervisedEvaluator``) ends its run at the first exception, whether it comes
from the DataLoader (a truncated file, a NaN volume) or from the iteration: there is no "skip this case and go
on". So the bundles check every case *before* the evaluator sees it::

    "case_report": {"_target_": "brats_pipeline.case_screening.CaseFailureReport"},
    "all_cases": "$brats_pipeline.datalist.find_cases(@dataset_dir, check_files=False, keep_bad_cases=True)",
    "cases": "$brats_pipeline.case_screening.screen_cases(@all_cases, strict=@strict, report=@case_report)",
    "dataset": {"_target_": "Dataset", "data": "@cases", ...},
    "val_handlers": ["@case_report", ...],             # first, so it sees an exception before StatsHandler
    "finalize": ["$@case_report.raise_if_failed()"]     # last: ends the command with exit status 1

:func:`screen_cases` runs :func:`brats_pipeline.case_checks.check_case` on every entry (it loads the data and
rejects missing, truncated or unreadable files, NaN/Inf, all-zero images, 2-D or mismatched volumes and label
values outside the convention), logs each bad case with its file and reason, records it in the report, and
returns the good ones. Cases the datalist step could not assemble (a case folder without a modality or with two
files for one, a folder that does not follow the layout) reach it as entries carrying their error
(``keep_bad_cases=True``) and are reported the same way; the evaluator then processes every good case. ``finalize`` turns the recorded failures
into a non-zero exit status with a summary that lists every bad case, so a batch job notices them.

A failure that still happens during the run (out of memory, a disk full while writing) is recorded by the
report's Ignite handler with the case it hit and the cases not reached; Ignite then ends the run as usual, and
the command exits non-zero.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from monai.utils import min_version, optional_import

from brats_pipeline.atomic_files import write_json_atomic
from brats_pipeline.case_checks import CaseError, check_case
from brats_pipeline.layouts import case_id_from_path, entry_case_id

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseFailure:
    """One bad case: its id, the file at fault (when known), the reason and the stage it failed in."""

    case_id: str
    file: str | None
    reason: str
    stage: str = "screening"

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        return f"{self.case_id} [{self.stage}] {where}{self.reason}"


class CasesFailedError(SystemExit):
    """Raised by :meth:`CaseFailureReport.raise_if_failed`.

    A ``SystemExit`` whose code is the summary text: ``python -m monai.bundle run`` prints it and exits with
    status 1 without a traceback (MONAI wraps ``Exception`` raised by config expressions, not ``SystemExit``).
    """

    def __init__(self, failures: Sequence[CaseFailure], summary: str):
        super().__init__(summary)
        self.failures = list(failures)


class CaseFailureReport:
    """Collects the cases that could not be processed and ends the run with a non-zero status if any.

    Use one instance per run: :func:`screen_cases` records the cases rejected before the run, the Ignite
    handler (:meth:`attach`, so the report can sit in ``val_handlers``) records a failure during the run, and
    :meth:`raise_if_failed` (in ``finalize``) reports them all.

    Args:
        summary_file: optional JSON file written by :meth:`raise_if_failed` (also when nothing failed) with the
            number of cases screened, accepted and processed, and every failure.
        case_id_key: data key of the case id in the entries and in the batches.
    """

    def __init__(self, summary_file: str | os.PathLike | None = None, case_id_key: str = "case_id") -> None:
        self.summary_file = None if summary_file is None else Path(summary_file)
        self.case_id_key = case_id_key
        self.failures: list[CaseFailure] = []
        self.screened = 0
        self.accepted: list[Mapping] = []
        self.processed = 0
        self._loading = False
        self._current: list[str] = []
        self._handled: BaseException | None = None

    def record(
        self, case_id: str, reason: str, file: str | os.PathLike | None = None, stage: str = "screening"
    ) -> None:
        """Record (and log at ERROR) one bad case."""
        failure = CaseFailure(str(case_id), None if file is None else str(file), str(reason), stage)
        self.failures.append(failure)
        logger.error("bad case %s", failure)

    def record_exception(self, case_id: str, error: BaseException, stage: str, file: str | None = None) -> None:
        """Record an exception that hit ``case_id``; a :class:`~brats_pipeline.case_checks.CaseError` gives its
        own file and reason. Wrapped errors (MONAI's "applying transform ...") are reported by their root cause."""
        while error.__cause__ is not None:
            error = error.__cause__
        path = getattr(error, "path", None) or file
        reason = getattr(error, "reason", None) or f"{type(error).__name__}: {error}"
        self.record(case_id, reason, path, stage)

    @property
    def failed_cases(self) -> list[str]:
        return list(dict.fromkeys(f.case_id for f in self.failures))

    def summary(self) -> str:
        """Multi-line summary: counts, then one line per bad case."""
        head = (
            f"{len(self.failed_cases)} case(s) failed"
            f" ({self.screened} screened, {len(self.accepted)} accepted, {self.processed} processed):"
        )
        return "\n".join([head, *(f"  - {f}" for f in self.failures)])

    def write_summary(self, path: str | os.PathLike) -> Path:
        """Write the counts and every failure as JSON to ``path`` (atomically)."""
        content = {
            "screened": self.screened,
            "accepted": len(self.accepted),
            "processed": self.processed,
            "failures": [asdict(f) for f in self.failures],
        }
        return write_json_atomic(content, path)

    def raise_if_failed(self) -> None:
        """Raise :class:`CasesFailedError` (exit status 1, summary as message) if any case failed."""
        if self.summary_file is not None:
            self.write_summary(self.summary_file)
        if not self.failures:
            logger.info("all %d accepted case(s) passed (%d processed)", len(self.accepted), self.processed)
            return
        text = self.summary()
        logger.error(text)
        raise CasesFailedError(self.failures, text)

    # --- Ignite handler ---------------------------------------------------------------------------------------

    def attach(self, engine: Engine) -> None:
        """Follow ``engine``'s batches, so a failure during the run is recorded with the case it hit.

        List the report before ``StatsHandler`` in ``val_handlers``: Ignite calls the ``EXCEPTION_RAISED``
        handlers in order and ``StatsHandler`` re-raises. The exception is always re-raised here too, so a run
        that fails never ends with status 0, whether or not ``finalize`` calls :meth:`raise_if_failed`.
        The failing case is named from the batch (``case_id`` or the image file name); a failure in the
        DataLoader (before the batch exists) is attributed to the next accepted case in order, which holds for
        an unshuffled DataLoader with ``batch_size=1`` over the screened cases.
        """
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._batch_started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._batch_completed)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._exception_raised)

    def _batch_started(self, engine: Engine) -> None:
        self._loading = True

    def _batch_completed(self, engine: Engine) -> None:
        self._loading = False
        self._current = _batch_case_ids(engine.state.batch, self.case_id_key)

    def _iteration_completed(self, engine: Engine) -> None:
        self.processed += max(len(self._current), 1)
        self._current = []

    def _exception_raised(self, engine: Engine, error: BaseException) -> None:
        if error is self._handled:  # Ignite fires EXCEPTION_RAISED again as the exception leaves the epoch
            raise error
        self._handled = error
        if not self._loading and not self._current and engine.state.iteration == 0:
            raise error  # before the first case (e.g. the checkpoint cannot be loaded): a run failure, not a case's
        if self._loading:
            index = self.processed
            case = entry_case_id(self.accepted[index], self.case_id_key) if index < len(self.accepted) else "?"
            hit, stage = [case], "loading"
        else:
            hit, stage = self._current or ["?"], "inference"
        for case in hit:
            self.record_exception(case, error, stage)
        not_reached = [entry_case_id(e, self.case_id_key) for e in self.accepted[self.processed + len(hit) :]]
        if not_reached:
            logger.error(
                "the run stops here: %d accepted case(s) not processed: %s", len(not_reached), ", ".join(not_reached)
            )
        logger.error(self.summary())
        raise error


def _batch_case_ids(batch: Any, key: str) -> list[str]:
    if not isinstance(batch, Mapping):
        return []
    ids = batch.get(key)
    if ids is not None:
        return [str(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]
    image = batch.get("image")
    meta = getattr(image, "meta", {}) or {}
    names = meta.get("filename_or_obj")
    if names is None:
        return []
    return [case_id_from_path(str(n)) for n in (names if isinstance(names, (list, tuple)) else [names])]


def screen_cases(
    entries: Sequence[Mapping],
    strict: bool = False,
    report: CaseFailureReport | None = None,
    check: Callable[[Mapping], Any] | None = None,
    num_workers: int = 0,
) -> list[dict]:
    """Check every entry and return the good ones, in order.

    Args:
        entries: datalist entries (``{"image": ..., "label"?: ..., "case_id"?: ...}``), including the unusable
            cases that ``find_cases(keep_bad_cases=True)`` returns with their error (reported without ``check``).
        strict: raise the first bad case's error instead of skipping it.
        report: where the bad cases are recorded (a new one when omitted; then only the log tells).
        check: the check of one entry, raising on a bad case; default
            :func:`brats_pipeline.case_checks.check_case` (loads the data: about one read of the dataset).
        num_workers: threads checking cases concurrently (file reading and gzip release the GIL); 0 checks in
            the calling thread. Order, logging and ``strict`` behave the same.

    Returns:
        The good entries (as dicts), also stored as ``report.accepted``.

    Raises:
        brats_pipeline.case_checks.CaseError: with ``strict=True``, for the first bad case in order (any other
            exception from ``check`` likewise).
    """
    report = CaseFailureReport() if report is None else report
    check = check_case if check is None else check

    def run(entry: Mapping) -> BaseException | None:
        error = CaseError.from_entry(entry)  # a case the datalist could not assemble
        if error is not None:
            return error
        try:
            check(entry)
        except Exception as e:  # every failure is a bad case; unexpected ones keep their type in the reason
            return e
        return None

    if num_workers > 0:
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            outcomes = list(pool.map(run, entries))
    else:
        outcomes = []
        for entry in entries:
            outcomes.append(run(entry))
            if strict and outcomes[-1] is not None:
                break

    good: list[dict] = []
    for entry, error in zip(entries, outcomes, strict=False):
        report.screened += 1
        if error is None:
            good.append(dict(entry))
            continue
        if strict:
            raise error
        if not hasattr(error, "reason"):
            logger.error("unexpected error while checking %s", entry_case_id(entry), exc_info=error)
        report.record_exception(getattr(error, "case_id", None) or entry_case_id(entry), error, "screening")
    report.accepted.extend(good)
    logger.info("screened %d case(s): %d accepted, %d rejected", len(entries), len(good), len(entries) - len(good))
    return good


__all__ = ["CaseFailure", "CaseFailureReport", "CasesFailedError", "screen_cases"]
