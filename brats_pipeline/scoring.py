"""Score a folder of predicted label maps against a folder of reference label maps, BraTS style (no model needed).

Command line::

    python -m brats_pipeline.scoring --pred_dir P --label_dir L --convention brats2023 --output_dir O \\
        [--pred_convention brats2018] [--on_missing skip|empty|error] [--hd95_mode max|pooled]

Matching, by case id:

* references: case folders anywhere under ``label_dir`` holding ``<case_id>/<case_id>-seg.nii.gz`` (or ``_seg``,
  ``.nii``) as the BraTS releases ship them; or flat files directly in ``label_dir``, ``<case_id>[-_]seg.nii.gz``
  (or, when there is neither a case folder nor a ``seg`` file, every ``<case_id>.nii.gz``, as MSD's ``labelsTr``).
* predictions: any NIfTI under ``pred_dir`` named ``<case_id>.nii.gz``, else the one file whose name contains the
  case id (not followed by another digit), e.g. MONAI ``SaveImage``'s ``<case_id>-t1c/<case_id>-t1c_seg.nii.gz``.

References without a prediction and predictions without a reference are reported (log and summary JSON);
``on_missing`` decides whether a missing prediction is skipped, scored as an empty prediction (Dice 0 and
HD95 373.13 mm wherever the reference has tumor: the worst BraTS score) or is an error.

Outputs (written atomically, temp file + ``os.replace``):

* ``metrics_per_case.csv``: long layout, one row per case and region (``case_id, region, dice, hd95,
  sensitivity, specificity, volume_pred_ml, volume_ref_ml``), regions in the BraTS order ET, TC, WT. One row per
  region keeps the file tidy for pandas/R (``pivot`` gives the wide ``Dice_ET, ...`` table of the BraTS portal).
* ``metrics_summary.csv``: one row per region and metric with ``n, mean, std, median, 25quantile, 75quantile``,
  the statistics of the BraTS result tables.
* ``metrics_summary.json``: the same statistics nested ``{region: {metric: {stat: value}}}`` under ``"metrics"``,
  with the settings and the unmatched cases.

Spacing comes from the reference's header (``get_zooms``); HD95 and volumes are in mm and ml.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from brats_pipeline.atomic_files import publish
from brats_pipeline.labels import LabelConvention
from brats_pipeline.metrics import HD95_EMPTY_MM, METRICS, REPORT_ORDER, STATISTICS, case_metrics, summarize

logger = logging.getLogger("brats_pipeline.scoring")

PER_CASE_CSV = "metrics_per_case.csv"
SUMMARY_CSV = "metrics_summary.csv"
SUMMARY_JSON = "metrics_summary.json"
PER_CASE_COLUMNS: tuple[str, ...] = ("case_id", "region", *METRICS)
ON_MISSING: tuple[str, ...] = ("skip", "empty", "error")
_NIFTI = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?$")
_SEG = re.compile(r"^(?P<case>.+?)[-_]seg$")


class ScoringError(ValueError):
    """Prediction and reference files cannot be paired or compared."""


def _nifti_stem(path: Path) -> str | None:
    m = _NIFTI.match(path.name)
    return m.group("stem") if m else None


def find_references(label_dir: str | os.PathLike) -> dict[str, Path]:
    """Reference label files under ``label_dir``, keyed by case id (see the module docstring)."""
    root = Path(label_dir)
    if not root.is_dir():
        raise ScoringError(f"label_dir {root} is not a directory")
    refs: dict[str, Path] = {}

    def add(case_id: str, path: Path) -> None:
        if case_id in refs:
            raise ScoringError(f"two references for case {case_id!r}: {refs[case_id]} and {path}")
        refs[case_id] = path

    for path in sorted(root.rglob("*")):
        stem = _nifti_stem(path)
        m = _SEG.match(stem) if stem else None
        if m and path.parent != root and m.group("case") == path.parent.name:
            add(m.group("case"), path)  # BraTS case folder
    flat = [(p, _nifti_stem(p)) for p in sorted(root.iterdir()) if p.is_file() and _nifti_stem(p)]
    seg_files = [(p, _SEG.match(s)) for p, s in flat if _SEG.match(s)]  # type: ignore[arg-type]
    if seg_files:
        for p, m in seg_files:
            add(m.group("case"), p)  # type: ignore[union-attr]
    elif not refs:  # MSD-style labelsTr: every NIfTI is a label map named after its case
        for p, s in flat:
            add(s, p)  # type: ignore[arg-type]
    return refs


def _case_pattern(case_id: str) -> re.Pattern:
    # the case id as a whole token: "BRATS_001" must not match "BRATS_0012" nor "XBRATS_001"
    return re.compile(rf"(?<![0-9A-Za-z]){re.escape(case_id)}(?![0-9])")


def match_predictions(
    case_ids: Sequence[str], pred_dir: str | os.PathLike
) -> tuple[dict[str, Path], list[str], list[Path]]:
    """Pair each case id with its prediction file under ``pred_dir``.

    Returns:
        ``(matched {case_id: path}, case ids without prediction, prediction files claimed by no case)``.
    """
    root = Path(pred_dir)
    if not root.is_dir():
        raise ScoringError(f"pred_dir {root} is not a directory")
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and _nifti_stem(p)]
    matched: dict[str, Path] = {}
    missing: list[str] = []
    for case_id in case_ids:
        exact = [p for p in files if _nifti_stem(p) == case_id]
        pattern = _case_pattern(case_id)
        candidates = exact or [p for p in files if pattern.search(p.name)]
        if len(candidates) > 1:
            shown = ", ".join(str(p) for p in candidates)
            raise ScoringError(f"case {case_id!r}: several prediction files match ({shown}); keep one per case")
        if candidates:
            matched[case_id] = candidates[0]
        else:
            missing.append(case_id)
    owners: dict[Path, str] = {}
    for case_id, path in matched.items():
        if path in owners:
            raise ScoringError(f"prediction {path} matches both case {owners[path]!r} and case {case_id!r}")
        owners[path] = case_id
    unused = [p for p in files if p not in owners]
    return matched, missing, unused


def _load_label(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[-1] == 1:  # (H, W, D, 1) as some writers store a single channel
        data = data[..., 0]
    if data.ndim != 3:
        raise ScoringError(f"{path}: expected a 3-D label map, got shape {data.shape}")
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    return data, img.affine, spacing


def score_case(
    pred_path: str | os.PathLike | None,
    ref_path: str | os.PathLike,
    convention: str | LabelConvention = "brats2023",
    pred_convention: str | LabelConvention | None = None,
    **metric_kwargs,
) -> dict[str, dict[str, float]]:
    """Metrics ``{region: {metric: value}}`` of one prediction file against one reference file.

    ``pred_path=None`` scores an empty prediction. ``metric_kwargs`` go to :func:`brats_pipeline.metrics.region_metrics`.
    """
    ref, ref_affine, spacing = _load_label(Path(ref_path))
    if pred_path is None:
        pred = np.zeros_like(ref)
    else:
        pred, pred_affine, _ = _load_label(Path(pred_path))
        if pred.shape != ref.shape:
            raise ScoringError(
                f"prediction {pred_path} has shape {pred.shape} but its reference {ref_path} has shape {ref.shape}"
            )
        if not np.allclose(pred_affine, ref_affine, atol=1e-3):
            logger.warning(
                "prediction %s and reference %s have different affines; scoring voxel by voxel", pred_path, ref_path
            )
    return case_metrics(
        pred,
        ref,
        convention,
        spacing,
        pred_convention=pred_convention,
        pred_source=str(pred_path),
        ref_source=str(ref_path),
        **metric_kwargs,
    )


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _csv_text(columns: Sequence[str], rows: Sequence[Mapping]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def score_folders(
    pred_dir: str | os.PathLike,
    label_dir: str | os.PathLike,
    convention: str = "brats2023",
    output_dir: str | os.PathLike | None = None,
    pred_convention: str | None = None,
    on_missing: str = "skip",
    hd95_mode: str = "max",
    hd95_empty_mm: float = HD95_EMPTY_MM,
    progress: bool = True,
) -> tuple[list[dict[str, float | str]], dict]:
    """Score every reference case in ``label_dir`` that has a prediction in ``pred_dir``.

    Args:
        pred_dir: folder (searched recursively) of predicted label NIfTIs.
        label_dir: folder of reference label NIfTIs (flat or BraTS case folders).
        convention: label convention of the references (``brats2018``, ``brats2023``, ``msd``).
        output_dir: where to write the CSV/JSON files; ``None`` writes nothing.
        pred_convention: convention of the predictions, when it differs from ``convention``.
        on_missing: a reference without prediction is ``"skip"``-ped, scored as ``"empty"`` or an ``"error"``.
        hd95_mode: ``"max"`` or ``"pooled"``, see :func:`brats_pipeline.metrics.hd95`.
        hd95_empty_mm: HD95 when exactly one of prediction and reference is empty.
        progress: show a tqdm progress bar.

    Returns:
        ``(rows, summary)``: long rows (``case_id``, ``region``, metrics) and the content of
        ``metrics_summary.json`` (settings, ``n_cases``, unmatched cases, ``"metrics"`` from
        :func:`brats_pipeline.metrics.summarize`).
    """
    if on_missing not in ON_MISSING:
        raise ValueError(f"on_missing must be one of {ON_MISSING}, got {on_missing!r}")
    refs = find_references(label_dir)
    if not refs:
        raise ScoringError(f"no reference label files found in {label_dir}")
    matched, missing, unused = match_predictions(sorted(refs), pred_dir)
    if missing:
        logger.warning("%d reference case(s) without prediction (%s): %s", len(missing), on_missing, ", ".join(missing))
        if on_missing == "error":
            raise ScoringError(f"no prediction in {pred_dir} for case(s): {', '.join(missing)}")
    if unused:
        logger.warning("%d prediction file(s) match no reference: %s", len(unused), ", ".join(map(str, unused)))
    cases = sorted(matched) if on_missing != "empty" else sorted(refs)
    if not cases:
        raise ScoringError(f"no prediction in {pred_dir} matches a reference case in {label_dir}")

    rows: list[dict[str, float | str]] = []
    for case_id in tqdm(cases, desc="scoring", unit="case", disable=not progress):
        metrics = score_case(
            matched.get(case_id),
            refs[case_id],
            convention,
            pred_convention,
            hd95_mode=hd95_mode,
            hd95_empty_mm=hd95_empty_mm,
        )
        rows += [{"case_id": case_id, "region": region, **metrics[region]} for region in REPORT_ORDER]

    summary = {
        "convention": convention,
        "pred_convention": pred_convention or convention,
        "hd95_mode": hd95_mode,
        "hd95_empty_mm": hd95_empty_mm,
        "n_cases": len(cases),
        "missing_predictions": missing,
        "missing_predictions_scored_as": on_missing,
        "unused_predictions": [str(p) for p in unused],
        "metrics": summarize(rows),
    }
    if output_dir is not None:
        out = Path(output_dir)
        _write_atomic(out / PER_CASE_CSV, _csv_text(PER_CASE_COLUMNS, rows))
        stat_rows = [
            {"region": region, "metric": metric, **stats}
            for region, per_metric in summary["metrics"].items()
            for metric, stats in per_metric.items()
        ]
        _write_atomic(out / SUMMARY_CSV, _csv_text(("region", "metric", "n", *STATISTICS), stat_rows))
        _write_atomic(out / SUMMARY_JSON, json.dumps(_json_safe(summary), indent=2) + "\n")
    return rows, summary


def format_table(summary: Mapping) -> str:
    """A short text table of mean/median Dice and HD95 per region from :func:`score_folders`' summary."""
    lines = [f"{'region':<7}{'n':>5}{'Dice mean':>11}{'median':>9}{'HD95 mean':>11}{'median':>9}"]
    for region, m in summary["metrics"].items():
        d, h = m["dice"], m["hd95"]
        lines.append(
            f"{region:<7}{d['n']:>5}{d['mean']:>11.4f}{d['median']:>9.4f}{h['mean']:>11.2f}{h['median']:>9.2f}"
        )
    return "\n".join(lines)


def main(
    pred_dir: str,
    label_dir: str,
    output_dir: str,
    convention: str = "brats2023",
    pred_convention: str | None = None,
    on_missing: str = "skip",
    hd95_mode: str = "max",
    hd95_empty_mm: float = HD95_EMPTY_MM,
) -> None:
    """Command line entry: score, write the files into ``output_dir`` and print the table."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _, summary = score_folders(
        pred_dir,
        label_dir,
        convention=convention,
        output_dir=output_dir,
        pred_convention=pred_convention,
        on_missing=on_missing,
        hd95_mode=hd95_mode,
        hd95_empty_mm=float(hd95_empty_mm),
    )
    print(format_table(summary))
    print(f"wrote {PER_CASE_CSV}, {SUMMARY_CSV} and {SUMMARY_JSON} to {output_dir}")


__all__: Sequence[str] = (
    "ScoringError",
    "PER_CASE_CSV",
    "SUMMARY_CSV",
    "SUMMARY_JSON",
    "PER_CASE_COLUMNS",
    "find_references",
    "match_predictions",
    "score_case",
    "score_folders",
    "format_table",
    "main",
)

if __name__ == "__main__":
    import fire

    fire.Fire(main)
