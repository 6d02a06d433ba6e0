"""Checks of one BraTS case's files, with errors that name the case, the file and the reason.

Two depths:

* header checks (cheap, used when scanning a whole dataset): the file exists, is a non-empty NIfTI whose header
  reads, its data is complete (for ``.nii.gz`` the gzip trailer's length is compared with what the header
  declares; only when it disagrees is the stream decompressed to tell truncation from trailing bytes), it has
  the expected number of dimensions, and all files of the case agree in shape and affine;
* data checks (``check_data=True``, for a per-case pre-screen before inference): the arrays are loaded and
  NaN/Inf voxels, all-zero images and label values outside the declared convention are reported.

A case the datalist builder could not even assemble (a missing or doubled modality, a folder that does not follow
the layout) can travel as a datalist entry that carries its error under :data:`CASE_ERROR_KEY`
(:meth:`CaseError.as_entry`); :func:`check_case` raises that error again, so screening reports it like any other
bad case. Training instead stops on all bad cases at once with :class:`BadCasesError`.

Screening runs (fault-tolerant inference and evaluation: screen the cases first, go on with the good ones, fail at
the end):

Fault-tolerant inference and evaluation runs: screen the cases first, go on with the good ones, fail at the end.

An Ignite engine (hence MONAI's ``SupervisedEvaluator``) ends its run at the first exception, whether it comes
from the DataLoader (a truncated file, a NaN volume) or from the iteration: there is no "skip this case and go
on". So the bundles check every case *before* the evaluator sees it::

    "case_report": {"_target_": "brats_pipeline.data.screening.CaseFailureReport"},
    "all_cases": "$brats_pipeline.data.datalist.find_cases(@dataset_dir, check_files=False, keep_bad_cases=True)",
    "cases": "$brats_pipeline.data.screening.screen_cases(@all_cases, strict=@strict, report=@case_report)",
    "dataset": {"_target_": "Dataset", "data": "@cases", ...},
    "val_handlers": ["@case_report", ...],             # first, so it sees an exception before StatsHandler
    "finalize": ["$@case_report.raise_if_failed()"]     # last: ends the command with exit status 1

:func:`screen_cases` runs :func:`brats_pipeline.data.screening.check_case` on every entry (it loads the data and
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

import gzip
import logging
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.utils import min_version, optional_import

from brats_pipeline.atomic_files import write_json_atomic
from brats_pipeline.data.layouts import CHANNELS, case_id_from_path, entry_case_id, is_nifti
from brats_pipeline.transforms.labels import LabelConventionError, check_label_values

__all__ = [
    "ScreenedCases",
    "AFFINE_ATOL",
    "CASE_ERROR_KEY",
    "BadCasesError",
    "CaseError",
    "DatasetError",
    "NiftiInfo",
    "check_case",
    "check_label",
    "inspect_nifti",
    "CaseFailure",
    "CaseFailureReport",
    "CasesFailedError",
    "screen_cases",
]

#: tolerance (mm) when comparing the affines of one case's files
AFFINE_ATOL = 1e-3
#: key of a datalist entry that stands for an unusable case: ``{"file": path, "reason": text}``
CASE_ERROR_KEY = "case_error"
_GZIP_CHUNK = 1 << 22


class DatasetError(ValueError):
    """A dataset folder cannot be turned into a datalist (empty, unrecognised, mixed layouts, ...)."""


class CaseError(DatasetError):
    """One case is unusable; the message names the case, the file and the reason."""

    def __init__(self, case_id: str, path: str | os.PathLike, reason: str):
        self.case_id = case_id
        self.path = str(path)
        self.reason = reason
        super().__init__(f"case {case_id!r}: {self.path}: {reason}")

    def as_entry(self, **fields) -> dict:
        """A datalist entry standing for this bad case: ``{"case_id", **fields, CASE_ERROR_KEY: {"file", "reason"}}``."""
        return {"case_id": self.case_id, **fields, CASE_ERROR_KEY: {"file": self.path, "reason": self.reason}}

    @classmethod
    def from_entry(cls, entry: Mapping) -> CaseError | None:
        """The error an entry made by :meth:`as_entry` carries, else None."""
        error = entry.get(CASE_ERROR_KEY)
        if not error:
            return None
        return cls(entry_case_id(entry), error.get("file") or "?", error.get("reason") or "unusable case")


class BadCasesError(DatasetError):
    """Several cases of a dataset are unusable; ``errors`` holds one :class:`CaseError` per case, and the message
    lists every one of them (case, file, reason)."""

    def __init__(self, errors: Sequence[CaseError], where: str | os.PathLike):
        self.errors = list(errors)
        lines = [f"  - {e}" for e in self.errors]
        super().__init__("\n".join([f"{len(self.errors)} unusable cases in {where}; fix or remove them:", *lines]))


@dataclass(frozen=True)
class NiftiInfo:
    """What the header of a NIfTI file says."""

    path: str
    shape: tuple[int, ...]
    affine: np.ndarray
    dtype: np.dtype


def _gzip_length(path: Path, case_id: str) -> int:
    """Decompressed length of a gzip file, reading the whole stream (CRC-checked by :mod:`gzip`)."""
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(_GZIP_CHUNK):
                total += len(chunk)
    except EOFError:
        raise CaseError(case_id, path, "truncated file: the gzip stream ends before its end marker") from None
    except (OSError, zlib.error) as e:
        raise CaseError(case_id, path, f"corrupt gzip data ({e})") from None
    return total


def inspect_nifti(path: str | os.PathLike, case_id: str = "?") -> NiftiInfo:
    """Header-level checks of one file; raises :class:`CaseError` when it is missing, empty, not a readable
    NIfTI, or its data is shorter than the header declares (truncated download or copy)."""
    p = Path(path)
    if not is_nifti(p):
        raise CaseError(case_id, p, "not a NIfTI file (expected .nii or .nii.gz)")
    if not p.exists():
        raise CaseError(case_id, p, "file does not exist")
    if not p.is_file():
        raise CaseError(case_id, p, "not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise CaseError(case_id, p, "empty file (0 bytes)")
    try:
        img = nib.load(p)
        shape = tuple(int(s) for s in img.shape)
        dtype = img.get_data_dtype()
        affine = np.asarray(img.affine, dtype=np.float64)
        offset = int(img.dataobj.offset)
    except Exception as e:  # nibabel raises a zoo of types for garbage input
        raise CaseError(case_id, p, f"not a readable NIfTI file ({type(e).__name__}: {e})") from None
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if str(p).lower().endswith(".gz"):
        # gzip trailer: CRC32 then ISIZE, the decompressed length modulo 2**32
        with open(p, "rb") as f:
            f.seek(-4, os.SEEK_END)
            isize = int.from_bytes(f.read(4), "little")
        if isize != expected % 2**32:
            # not the length we expect: either truncated or a stream with trailing bytes / several members
            total = _gzip_length(p, case_id)
            if total < expected:
                raise CaseError(case_id, p, f"truncated file: {total} bytes of data, the header declares {expected}")
    elif size < expected:
        raise CaseError(case_id, p, f"truncated file: {size} bytes, the header declares {expected}")
    return NiftiInfo(str(p), shape, affine, dtype)


def _check_dims(info: NiftiInfo, case_id: str, channels: int | None) -> None:
    """3-D volume expected when ``channels`` is None, else 4-D with ``channels`` in the last axis (MSD)."""
    ndim = len(info.shape)
    if channels is None:
        if ndim != 3:
            raise CaseError(case_id, info.path, f"{ndim}-D image of shape {info.shape} where a 3-D volume is expected")
        return
    if ndim != 4 or info.shape[3] != channels:
        raise CaseError(
            case_id,
            info.path,
            f"image of shape {info.shape} where a 4-D image with {channels} channels last is expected",
        )


def _odd_one_out(
    infos: Sequence[NiftiInfo], same: Callable[[NiftiInfo, NiftiInfo], bool]
) -> tuple[NiftiInfo, NiftiInfo, list[NiftiInfo]] | None:
    """``(odd, reference, agreeing)`` when the files do not all agree, else None.

    The reference is the file most others agree with (the first on a tie); the odd one out is the first file that
    disagrees with it, so a differing T1c is named rather than blaming the three files that agree with each other.
    """
    agree = [sum(same(a, b) for b in infos) for a in infos]
    ref = infos[agree.index(max(agree))]
    odd = [info for info in infos if not same(info, ref)]
    if not odd:
        return None
    return odd[0], ref, [info for info in infos if same(info, ref)]


def _names(infos: Sequence[NiftiInfo]) -> str:
    return ", ".join(Path(info.path).name for info in infos)


def _check_same_grid(infos: Sequence[NiftiInfo], case_id: str) -> None:
    """All files of a case share shape and affine; the error names the file that differs from the majority."""
    found = _odd_one_out(infos, lambda a, b: a.shape[:3] == b.shape[:3])
    if found is not None:
        odd, ref, agreeing = found
        raise CaseError(
            case_id,
            odd.path,
            f"shape {odd.shape[:3]} differs from {ref.shape[:3]} of {_names(agreeing)} in the same case",
        )
    found = _odd_one_out(infos, lambda a, b: np.allclose(a.affine, b.affine, rtol=0.0, atol=AFFINE_ATOL))
    if found is not None:
        odd, ref, agreeing = found
        raise CaseError(
            case_id,
            odd.path,
            f"affine differs from that of {_names(agreeing)} in the same case "
            f"(max difference {np.abs(odd.affine - ref.affine).max():.4g}); the modalities are not co-registered",
        )


def _load(path: str, case_id: str) -> np.ndarray:
    try:
        return np.asanyarray(nib.load(path).dataobj)
    except Exception as e:
        raise CaseError(case_id, path, f"cannot read the image data ({type(e).__name__}: {e})") from None


def _check_values(data: np.ndarray, path: str, case_id: str, channel_names: Sequence[str] | None = None) -> None:
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            raise CaseError(case_id, path, f"{int(bad.sum())} NaN/Inf voxels")
    if channel_names is None:
        if not data.any():
            raise CaseError(case_id, path, "image is all zero")
        return
    for c, name in enumerate(channel_names):
        if not data[..., c].any():
            raise CaseError(case_id, path, f"channel {c} ({name}) is all zero")


def check_case(entry: Mapping, check_data: bool = True) -> None:
    """Check one datalist entry; raise :class:`CaseError` naming the case, the file and the reason.

    Args:
        entry: ``{"image": [4 paths] | 4-D path, "label"?: path, "case_id"?: str, "channel_order"?: [int],
            "label_convention"?: str}`` as produced by :func:`brats_pipeline.data.datalist.find_cases`; a 4-D image
            (MSD) has its channels in the last axis. An entry carrying :data:`CASE_ERROR_KEY` raises that error.
        check_data: also load the arrays: reject NaN/Inf voxels and all-zero images (or channels), and label
            values outside ``label_convention`` when the entry names one.
    """
    error = CaseError.from_entry(entry)
    if error is not None:
        raise error
    case_id = entry_case_id(entry)
    image = entry.get("image")
    if not image:
        raise CaseError(case_id, "<no image>", "the entry lists no image file")
    if isinstance(image, (str, os.PathLike)):
        channels = len(entry.get("channel_order") or CHANNELS)
        infos = [inspect_nifti(image, case_id)]
        _check_dims(infos[0], case_id, channels)
    else:
        if len(image) != len(CHANNELS):
            raise CaseError(
                case_id, image[0], f"{len(image)} image files listed, expected {len(CHANNELS)} ({', '.join(CHANNELS)})"
            )
        infos = [inspect_nifti(p, case_id) for p in image]
        for info in infos:
            _check_dims(info, case_id, None)
    label = entry.get("label")
    if label:
        label_info = inspect_nifti(label, case_id)
        _check_dims(label_info, case_id, None)
        infos.append(label_info)
    _check_same_grid(infos, case_id)
    if not check_data:
        return
    if isinstance(image, (str, os.PathLike)):
        order = entry.get("channel_order")
        names = [CHANNELS[list(order).index(c)] if order else str(c) for c in range(infos[0].shape[3])]
        _check_values(_load(str(image), case_id), str(image), case_id, names)
    else:
        for path in image:
            _check_values(_load(str(path), case_id), str(path), case_id)
    if label:
        check_label(entry)


def check_label(entry: Mapping) -> None:
    """Check the values of one entry's label file (if it has one): no NaN/Inf, and only values of the entry's
    ``label_convention`` (when it names one); raise :class:`CaseError` naming the case, the file and the reason."""
    label = entry.get("label")
    if not label:
        return
    case_id = entry_case_id(entry)
    data = _load(str(label), case_id)
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise CaseError(case_id, label, f"{int((~np.isfinite(data)).sum())} NaN/Inf voxels in the label")
    if entry.get("label_convention"):
        try:
            check_label_values(data, entry["label_convention"], source=str(label))
        except LabelConventionError as e:
            raise CaseError(case_id, label, str(e).split(": ", 1)[-1]) from None


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
        """Record an exception that hit ``case_id``; a :class:`~brats_pipeline.data.screening.CaseError` gives its
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
        from brats_pipeline.bundle.command_line import InterruptGuard  # here: command_line imports this module

        InterruptGuard().attach(engine)  # a Ctrl-C is no bad case

    def _batch_started(self, engine: Engine) -> None:
        self._loading = True

    def _batch_completed(self, engine: Engine) -> None:
        self._loading = False
        self._current = _batch_case_ids(engine.state.batch, self.case_id_key)

    def _iteration_completed(self, engine: Engine) -> None:
        self.processed += max(len(self._current), 1)
        self._current = []

    def _exception_raised(self, engine: Engine, error: BaseException) -> None:
        if not isinstance(error, Exception):  # an interrupt (Ctrl-C), not the case's failure
            raise error
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
            :func:`brats_pipeline.data.screening.check_case` (loads the data: about one read of the dataset).
        num_workers: threads checking cases concurrently (file reading and gzip release the GIL); 0 checks in
            the calling thread. Order, logging and ``strict`` behave the same.

    Returns:
        The good entries (as dicts), also stored as ``report.accepted``.

    Raises:
        brats_pipeline.data.screening.CaseError: with ``strict=True``, for the first bad case in order (any other
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


class ScreenedCases:
    """A config's cases, screened once (:func:`screen_cases`), with the report of the bad ones: one component for
    the dataset's list, the evaluator's failure handler and the run's exit status::

        "eval_cases": {"_target_": "brats_pipeline.data.screening.ScreenedCases", "entries": "...", "strict": false},
        "validate#dataset#data": "$@eval_cases.cases",
        "validate#handlers": ["$@eval_cases.report", ...],
        "finalize": ["$@eval_cases.report.raise_if_failed()"]

    Args:
        entries: datalist entries, unusable ones with their error (``find_cases(keep_bad_cases=True)``).
        strict: raise the first bad case's error instead of skipping it.
    """

    def __init__(self, entries: Sequence[Mapping], strict: bool = False) -> None:
        self.entries = list(entries)
        self.strict = strict
        self.report = CaseFailureReport()
        self._cases: list[dict] | None = None

    @property
    def cases(self) -> list[dict]:
        """The good entries, in order (screened on first use)."""
        if self._cases is None:
            self._cases = screen_cases(self.entries, strict=self.strict, report=self.report)
        return self._cases
