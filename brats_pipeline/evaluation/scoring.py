"""Score a folder of predicted label maps against a folder of reference label maps, the way BraTS ranks (no model).

Command line::

    python -m brats_pipeline.evaluation.scoring --pred_dir P --label_dir L --output_dir O \\
        [--convention brats2023] [--pred_convention brats2018] [--challenge GLI|SSA|MEN|MET|PED|MEN-RT|MEN-PRE|GoAT] \\
        [--rules brats2023|brats2025|captk|monai] [--on_missing worst|empty|skip|error] [--nsd_tolerance_mm 1.0] \\
        [--label_scores True] [--hd95_mode surface|max|pooled] [--hd95_empty_mm 374]

Per case and region (ET, TC, WT; plus RC for BraTS 2024 post-treatment labels; plus the single labels NETC and
SNFH with ``--label_scores True``) the table holds the legacy metrics of :mod:`brats_pipeline.evaluation.metrics` (Dice,
HD95, sensitivity, specificity, volumes, normalised surface Dice ``nsd`` at ``--nsd_tolerance_mm``) and the
lesion-wise metrics of :mod:`brats_pipeline.evaluation.lesions` that the 2023-2024 challenges rank by (``lesion_dice``,
``lesion_hd95``, ``lesion_tp``, ``lesion_fp``, ``lesion_fn``). Under ``--rules brats2025`` the official package
scores every label group of the sub-challenge's config instead (:mod:`brats_pipeline.evaluation.challenge_package`):
``lesion_dice, lesion_nsd, lesion_hd95, lesion_tp, lesion_fp, lesion_fn, lesion_f1, dice, nsd, hd95``.
``docs/scoring.md`` describes every rule.

* Label convention: ``--convention``, else detected from ``label_dir`` as the datalist builder does (the release's
  folder layout; a 2023-style layout whose labels hold the value 4 is BraTS 2024 post-treatment, ``brats2024``).
* Sub-challenge (lesion dilation and volume threshold; under ``brats2025`` the package's config): ``--challenge``,
  else from the ``BraTS-<SUB>-`` case ids (``BraTS-MEN-RT-``: MEN-RT), else GLI.
* Rule set (``--rules``, :data:`RULE_NAMES`): ``brats2023`` reproduces the BraTS 2023-2024 toolkit (area-weighted
  HD95, both-empty 1 / 0, penalty 374 mm); ``brats2025`` calls the official 2025 package (``pip install -e
  .[challenge]``); ``captk`` and ``monai`` (:data:`RULE_SETS`) the older definitions. The default follows the data
  (:func:`default_rules`): ``brats2025`` for references holding RC labels (the ``brats2024`` convention), else
  ``brats2023``; the choice is printed in one line.
* Missing predictions: the command line scores them as the challenge does, with the worst value of every metric
  (``--on_missing worst``), and warns with their count; ``empty`` scores an empty prediction, ``skip`` leaves
  them out, ``error`` stops. :func:`score_folders` keeps ``skip`` as its default: the bundles' ``evaluate.json``
  scores one fold's predictions against the whole dataset folder. When no prediction matches any reference (two
  folders that do not belong together) scoring stops with an error naming both folders and their file counts.
* User mistakes (a missing folder, nothing to match, a wrong flag, label values outside the convention) end the
  command with one ``error:`` line and exit status 1 (:class:`ScoringError` is a
  :class:`~brats_pipeline.bundle.command_line.UserError`); ``BRATS_DEBUG=1`` shows the traceback.

Matching, by case id:

* references: case folders anywhere under ``label_dir`` holding ``<case_id>/<case_id>-seg.nii.gz`` (or ``_seg``,
  ``.nii``) as the BraTS releases ship them; or flat files directly in ``label_dir``, ``<case_id>[-_]seg.nii.gz``
  (or, when there is neither a case folder nor a ``seg`` file, every ``<case_id>.nii.gz``, as MSD's ``labelsTr``).
* predictions: any NIfTI under ``pred_dir`` named ``<case_id>.nii.gz``, else the one file whose name contains the
  case id (not followed by another digit), e.g. MONAI ``SaveImage``'s ``<case_id>-t1c/<case_id>-t1c_seg.nii.gz``.

Outputs (written atomically), in ``output_dir``:

* ``metrics_per_case.csv``: long layout, one row per case and region (:data:`PER_CASE_COLUMNS`), regions in the
  BraTS order ET, TC, WT (RC, NETC, SNFH after them). ``pivot`` gives the wide ``Dice_ET, ...`` portal table.
  A NaN (a region empty in both masks under ``monai`` and ``brats2025``) is an empty cell, as pandas writes it.
* ``metrics_summary.csv``: one row per region and metric with the rule set, the sub-challenge, ``n, mean, std
  (ddof=1), median, 25quantile, 75quantile`` (``brats2025``: the package's ``mean, std, median``).
* ``metrics_summary.json``: the same statistics nested ``{region: {metric: {stat: value}}}`` under ``"metrics"``,
  with the settings (``"leaderboard"``: the rule set and sub-challenge in words) and the unmatched cases.
* ``metrics_summary.png``: the per-case distribution of whole-region and lesion-wise Dice and HD95 per region, the
  rule set and sub-challenge in its title.

The summary table (means per region), headed by its rule set and sub-challenge, is printed at the end. Spacing comes
from the reference's header (``get_zooms``); HD95 and volumes are in mm and ml.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import re
import sys
import tempfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.config import NdarrayOrTensor
from tqdm import tqdm

from brats_pipeline.atomic_files import write_json_atomic, write_text_atomic
from brats_pipeline.bundle.command_line import UserError, fire_command
from brats_pipeline.data.datalist import find_cases
from brats_pipeline.data.layouts import MSD_CASE_PATTERN, MSD_LABEL_CONVENTION, layout_of_case, split_nifti_suffix
from brats_pipeline.data.screening import DatasetError
from brats_pipeline.evaluation.challenge_package import (
    CASE_ID_NAMES,
    HD95_INFINITE_MM,
    PACKAGE_CONFIGS,
    PACKAGE_METRICS,
    PACKAGE_RULES,
    PACKAGE_STATISTICS,
    ChallengePackage,
    import_package,
    package_summary,
)
from brats_pipeline.evaluation.lesions import (
    CHALLENGES,
    DEFAULT_CHALLENGE,
    LESION_METRICS,
    LesionCriteria,
    get_challenge,
    lesion_wise_metrics,
)
from brats_pipeline.evaluation.metrics import (
    HD95_EMPTY_MM,
    HD95_MODES,
    HD95_PENALTY_2023_MM,
    METRICS,
    NSD_TOLERANCE_MM,
    REPORT_ORDER,
    STATISTICS,
    region_metrics,
    summarize,
)
from brats_pipeline.transforms.labels import (
    POST_TREATMENT_CONVENTIONS,
    CorruptLabelError,
    LabelConvention,
    LabelConventionError,
    check_label_values,
    classes_to_label,
    get_convention,
    label_to_classes,
    label_to_regions,
    region_names,
)

logger = logging.getLogger("brats_pipeline.evaluation.scoring")

PER_CASE_CSV = "metrics_per_case.csv"
SUMMARY_CSV = "metrics_summary.csv"
SUMMARY_JSON = "metrics_summary.json"
SUMMARY_PNG = "metrics_summary.png"
#: every scored metric: the legacy ones, then the lesion-wise ones
SCORE_METRICS: tuple[str, ...] = (*METRICS, *LESION_METRICS)
PER_CASE_COLUMNS: tuple[str, ...] = ("case_id", "region", *SCORE_METRICS)
ON_MISSING: tuple[str, ...] = ("worst", "empty", "skip", "error")
#: single-label rows added by ``label_scores=True``: name -> :class:`LabelConvention` field
LABEL_REGIONS: dict[str, str] = {"NETC": "necrosis", "SNFH": "edema"}
_SEG = re.compile(r"^(?P<case>.+?)[-_]seg$")
#: the conventions the scoring flags accept (see :mod:`brats_pipeline.transforms.labels`)
CONVENTION_NAMES: tuple[str, ...] = ("brats2018", "brats2023", "brats2024", "msd")
#: ``BraTS-GLI-00001-000``, ``BraTS-MEN-RT-0001-1``, ``BraTS-GoAT-00001-000``: the sub-challenge's part of a case id
_SUB_CHALLENGE = re.compile(r"^BraTS-(?P<sub>[A-Za-z]+(?:-[A-Za-z]+)?)-\d+")


@dataclass(frozen=True)
class RuleSet:
    """How a leaderboard turned masks into numbers (see ``docs/scoring.md`` for the sources).

    Args:
        name: key in :data:`RULE_SETS`.
        hd95_mode: HD95 definition, one of :data:`brats_pipeline.evaluation.metrics.HD95_MODES`.
        empty_rule: ``"count"`` (both empty: Dice 1, HD95 0, counted) or ``"exclude"`` (empty reference: NaN).
        hd95_penalty_mm: HD95 when exactly one mask is empty, of a missed lesion and of a false-positive lesion.
        description: who used it.
    """

    name: str
    hd95_mode: str
    empty_rule: str
    hd95_penalty_mm: float
    description: str = ""


RULE_SETS: dict[str, RuleSet] = {
    "brats2023": RuleSet(
        "brats2023",
        hd95_mode="surface",
        empty_rule="count",
        hd95_penalty_mm=HD95_PENALTY_2023_MM,
        description="BraTS 2023-2024 (Synapse / MedPerf): the lesion-wise toolkit, DeepMind surface distance",
    ),
    "captk": RuleSet(
        "captk",
        hd95_mode="pooled",
        empty_rule="count",
        hd95_penalty_mm=HD95_EMPTY_MM,
        description="BraTS 2017-2022 (CBICA portal / Synapse, CaPTk), as nnU-Net reproduced it (MedPy hd95)",
    ),
    "monai": RuleSet(
        "monai",
        hd95_mode="max",
        empty_rule="exclude",
        hd95_penalty_mm=HD95_EMPTY_MM,
        description="MONAI's metric defaults (ignore_empty=True, percentile 95, directed=False)",
    ),
}
#: the rule set that reproduces the BraTS 2023-2024 leaderboard numbers (the default of the array functions)
DEFAULT_RULES = "brats2023"
#: every ``--rules``: those of :data:`RULE_SETS`, and ``brats2025`` (the official package, 2025+ leaderboards)
RULE_NAMES: tuple[str, ...] = tuple(sorted((*RULE_SETS, PACKAGE_RULES)))


class ScoringError(UserError):
    """Prediction and reference files cannot be paired or compared (a missing folder, no prediction matching any
    reference, a bad flag). A :class:`~brats_pipeline.bundle.command_line.UserError` (a ``ValueError``): the command
    line reports it as one ``error:`` line with exit status 1 (``BRATS_DEBUG=1``: the traceback)."""


class ConventionError(ScoringError, LabelConventionError):
    """A label file does not fit the convention it is scored in; the message names the scoring flags."""


def _flag(name: str, value: bool | str) -> bool:
    """A command-line switch: python-fire passes ``True``/``False``, but ``--x false`` arrives as a string."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ScoringError(f"{name} takes True or False, got {value!r}")


def _choice(flag: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ScoringError(f"{flag} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def default_rules(convention: str | LabelConvention) -> str:
    """The rule set whose leaderboard ranks references in ``convention``: ``brats2025`` (the official package) for the
    2024+ post-treatment labels with a resection cavity (RC = 4, ``brats2024``), else ``brats2023``."""
    return PACKAGE_RULES if get_convention(convention).has_resection_cavity else DEFAULT_RULES


def check_rules(rules: str) -> str:
    """``rules`` if it is one of :data:`RULE_NAMES` and can run: ``brats2025`` needs the official package.
    ``evaluate.json`` calls it before predicting, so that a missing package stops the run before the work.

    Raises:
        ScoringError: an unknown name; :class:`~brats_pipeline.evaluation.challenge_package.ChallengePackageError`
            (one line naming the extra to install): ``brats2025`` without the package.
    """
    _choice("rules (--rules)", rules, RULE_NAMES)
    if rules == PACKAGE_RULES:
        import_package()
    return rules


def _nifti_stem(path: Path) -> str | None:
    stem, suffix = split_nifti_suffix(path)
    return stem if suffix else None


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
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as e:
        # an empty, truncated or foreign file: the user's file, not a bug (gzip: EOFError, BadGzipFile, zlib.error)
        raise ScoringError(f"{path}: cannot read it as a NIfTI label map ({type(e).__name__}: {e})") from e
    if data.ndim == 4 and data.shape[-1] == 1:  # (H, W, D, 1) as some writers store a single channel
        data = data[..., 0]
    if data.ndim != 3:
        raise ScoringError(f"{path}: expected a 3-D label map, got shape {data.shape}")
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    return data, img.affine, spacing


def detect_convention(label_dir: str | os.PathLike, references: Mapping[str, Path] | None = None) -> str:
    """The label convention of the reference labels in ``label_dir``, recognised as the datalist builder does.

    The release comes from :func:`brats_pipeline.data.datalist.find_cases` (folder layout, MSD ``dataset.json``); for a
    folder of label files alone, from the case ids of ``references`` (:func:`brats_pipeline.data.layouts.layout_of_case`,
    MSD ``BRATS_NNN``). BraTS 2024 post-treatment glioma ships in the 2023 layout: when a reference of a 2023-style
    folder holds the resection-cavity value 4, the convention is ``brats2024`` (this reads the labels once).

    Raises:
        ScoringError: nothing recognisable, or several releases mixed; the message names ``--convention``.
    """
    refs = dict(references) if references is not None else find_references(label_dir)
    try:
        conventions = {case["label_convention"] for case in find_cases(label_dir, check_files=False)}
    except DatasetError:  # e.g. case folders holding only the label files: fall back to the case ids
        conventions = set()
        for case_id in refs:
            layout = layout_of_case(case_id)
            if layout is not None:
                conventions.add(layout.label_convention)
            elif re.fullmatch(MSD_CASE_PATTERN, case_id):
                conventions.add(MSD_LABEL_CONVENTION)
            else:
                conventions.add("?")
    if len(conventions) != 1 or "?" in conventions:
        found = ", ".join(sorted(conventions)) or "no case"
        raise ScoringError(
            f"cannot tell the label convention of {label_dir} (found: {found}); pass --convention "
            f"({', '.join(CONVENTION_NAMES)})"
        )
    convention = conventions.pop()
    if convention == "brats2023":
        cavity = POST_TREATMENT_CONVENTIONS["brats2024"].resection_cavity
        for path in refs.values():
            if np.any(np.asanyarray(nib.load(str(path)).dataobj) == cavity):
                logger.info("%s holds label %d (resection cavity): BraTS 2024 post-treatment labels", path, cavity)
                return "brats2024"
    return convention


def detect_challenge(case_ids: Sequence[str], rules: str = DEFAULT_RULES) -> str:
    """The sub-challenge named by ``BraTS-<SUB>-NNNNN-NNN`` case ids (``BraTS-MEN-RT-NNNN-N``: MEN-RT) among those of
    the rule set, else :data:`DEFAULT_CHALLENGE`: the presets of :data:`CHALLENGES`; under ``brats2025`` the package's
    configs (:data:`~brats_pipeline.evaluation.challenge_package.PACKAGE_CONFIGS`; ``BraTS-MEN-``: MEN-PRE)."""
    if rules == PACKAGE_RULES:
        names = {k.upper(): k for k in PACKAGE_CONFIGS} | CASE_ID_NAMES
    else:
        names = {k: k for k in CHALLENGES}
    subs = {m.group("sub").upper() for c in case_ids if (m := _SUB_CHALLENGE.match(c))}
    known = {names[sub] for sub in subs if sub in names}
    if len(known) > 1:
        raise ScoringError(f"the case ids mix sub-challenges {sorted(known)}; pass --challenge")
    return known.pop() if known else DEFAULT_CHALLENGE


def _region_masks(
    label: NdarrayOrTensor, conv: LabelConvention, source: str | None, with_rc: bool, label_scores: bool
) -> tuple[tuple[str, ...], np.ndarray]:
    """Region names and boolean masks ``(C, H, W, D)``: TC, WT, ET (+ RC) (+ NETC, SNFH)."""
    include_rc = with_rc and conv.has_resection_cavity
    masks = label_to_regions(label, conv, source, include_rc=include_rc).numpy() > 0.5
    names = region_names(conv, include_rc)
    lab = np.asarray(label)
    lab = lab[0] if lab.ndim == 4 else lab
    extra = []
    if with_rc and not include_rc:  # a prediction without a cavity label predicts no cavity
        names, extra = (*names, "RC"), [np.zeros(lab.shape, dtype=bool)]
    if label_scores:
        names = (*names, *LABEL_REGIONS)
        extra += [lab == getattr(conv, field) for field in LABEL_REGIONS.values()]
    return names, np.concatenate([masks, np.stack(extra)]) if extra else masks


def case_scores(
    pred_label: NdarrayOrTensor,
    ref_label: NdarrayOrTensor,
    convention: str | LabelConvention = "brats2023",
    spacing: float | Sequence[float] = (1.0, 1.0, 1.0),
    pred_convention: str | LabelConvention | None = None,
    rules: str | RuleSet = DEFAULT_RULES,
    challenge: str | LesionCriteria = DEFAULT_CHALLENGE,
    nsd_tolerance_mm: float = NSD_TOLERANCE_MM,
    label_scores: bool = False,
    hd95_mode: str | None = None,
    hd95_empty_mm: float | None = None,
    pred_source: str | None = None,
    ref_source: str | None = None,
) -> dict[str, dict[str, float]]:
    """Legacy and lesion-wise BraTS scores of one case from two label maps ``(H, W, D)`` or ``(1, H, W, D)``.

    Args:
        pred_label: predicted label map, in ``pred_convention`` (default: ``convention``).
        ref_label: reference label map, in ``convention``.
        convention: label convention of the reference; one with a resection cavity (``brats2024``) adds RC.
        spacing: voxel size in mm.
        pred_convention: convention of the prediction when it differs.
        rules: a rule set of :data:`RULE_SETS` (HD95 definition, empty rule, penalty).
        challenge: sub-challenge preset of :data:`brats_pipeline.evaluation.lesions.CHALLENGES` (or the criteria).
        nsd_tolerance_mm: tolerance of the normalised surface Dice.
        label_scores: also score the single labels NETC and SNFH (ET and RC are regions already).
        hd95_mode, hd95_empty_mm: override the rule set's HD95 definition and penalty.
        pred_source, ref_source: file names for error messages.

    Returns:
        ``{region: {metric: value}}`` with the metrics of :data:`SCORE_METRICS`.
    """
    rule = RULE_SETS[rules] if isinstance(rules, str) else rules
    mode = hd95_mode or rule.hd95_mode
    penalty = float(rule.hd95_penalty_mm if hd95_empty_mm is None else hd95_empty_mm)
    criteria = get_challenge(challenge)
    ref_conv = get_convention(convention)
    pred_conv = get_convention(pred_convention or convention)
    names, ref = _region_masks(ref_label, ref_conv, ref_source, ref_conv.has_resection_cavity, label_scores)
    _, pred = _region_masks(pred_label, pred_conv, pred_source, ref_conv.has_resection_cavity, label_scores)
    legacy = region_metrics(
        pred, ref, spacing, names, penalty, 95.0, mode, nsd_tolerance_mm=nsd_tolerance_mm, empty_rule=rule.empty_rule
    )
    out: dict[str, dict[str, float]] = {}
    for c, name in enumerate(names):
        lesion = lesion_wise_metrics(
            pred[c],
            ref[c],
            spacing,
            criteria.dilation,
            criteria.volume_threshold_mm3,
            hd95_mode=mode,
            hd95_penalty_mm=penalty,
            empty_rule=rule.empty_rule,
        )
        out[name] = {**legacy[name], **lesion.as_row()}
    return out


def worst_scores(scores: Mapping[str, Mapping[str, float]], hd95_penalty_mm: float) -> dict[str, dict[str, float]]:
    """The challenge's score of a missing prediction: the worst value of every ranked metric in every region (Dice,
    sensitivity, specificity, NSD, lesion-wise Dice 0; HD95 and lesion-wise HD95 the penalty). ``scores`` are those
    of an empty prediction, whose volumes and lesion counts are kept."""
    worst = {"dice": 0.0, "hd95": hd95_penalty_mm, "sensitivity": 0.0, "specificity": 0.0, "nsd": 0.0}
    worst |= {"lesion_dice": 0.0, "lesion_hd95": hd95_penalty_mm}
    return {region: {**values, **worst} for region, values in scores.items()}


def score_case(
    pred_path: str | os.PathLike | None,
    ref_path: str | os.PathLike,
    convention: str | LabelConvention = "brats2023",
    pred_convention: str | LabelConvention | None = None,
    **score_kwargs,
) -> dict[str, dict[str, float]]:
    """Scores ``{region: {metric: value}}`` of one prediction file against one reference file.

    ``pred_path=None`` scores an empty prediction. ``score_kwargs`` go to :func:`case_scores` (``rules``,
    ``challenge``, ``nsd_tolerance_mm``, ``label_scores``, ``hd95_mode``, ``hd95_empty_mm``).
    """
    ref, ref_affine, spacing = _load_label(Path(ref_path))
    if pred_path is None:
        pred = np.zeros_like(ref)
    else:
        pred, pred_affine, _ = _load_label(Path(pred_path))
        _check_shape(pred, ref, pred_path, ref_path)
        if not np.allclose(pred_affine, ref_affine, atol=1e-3):
            logger.warning(
                "prediction %s and reference %s have different affines; scoring voxel by voxel", pred_path, ref_path
            )
    with _label_errors(ref_path, convention):
        return case_scores(
            pred,
            ref,
            convention,
            spacing,
            pred_convention=pred_convention,
            pred_source=str(pred_path),
            ref_source=str(ref_path),
            **score_kwargs,
        )


def _check_shape(pred: np.ndarray, ref: np.ndarray, pred_path, ref_path) -> None:
    if pred.shape != ref.shape:
        raise ScoringError(
            f"prediction {pred_path} has shape {pred.shape} but its reference {ref_path} has shape {ref.shape}"
        )


@contextlib.contextmanager
def _label_errors(ref_path: str | os.PathLike, convention: str | LabelConvention) -> Iterator[None]:
    """Label values outside a convention, as a :class:`ConventionError` naming the file and the flag to set."""
    try:
        yield
    except CorruptLabelError as e:  # no convention fixes it: no flag to advise
        raise ConventionError(str(e), source=e.source, convention=e.convention, bad_values=e.bad_values) from None
    except LabelConventionError as e:
        is_ref = e.source == str(ref_path)
        flag = "--convention" if is_ref else "--pred_convention"
        whose = "references" if is_ref else "predictions"
        shown = ", ".join(f"{v:g}" for v in e.bad_values)
        allowed = list(get_convention(e.convention or convention).values)
        raise ConventionError(
            f"{e.source}: label values {{{shown}}} are not part of the {e.convention!r} convention (allowed: "
            f"{allowed}); give the {whose}' convention with {flag} ({', '.join(CONVENTION_NAMES)})",
            source=e.source,
            convention=e.convention,
            bad_values=e.bad_values,
        ) from None


def package_case_scores(
    package: ChallengePackage,
    pred_path: str | os.PathLike | None,
    ref_path: str | os.PathLike,
    case_id: str,
    convention: str | LabelConvention = "brats2023",
    pred_convention: str | LabelConvention | None = None,
) -> dict[str, dict[str, float]]:
    """Scores ``{region: {metric: value}}`` of one case by the official package (``--rules brats2025``).

    Both label maps are checked against their conventions first (a prediction in another convention is an error
    naming ``--pred_convention``, as under the other rules); the package then reads the two files itself. It gets a
    temporary copy of the prediction instead, written with the prediction's header (the reference's for
    ``pred_path=None``, an empty prediction), when the prediction is converted into the reference's convention
    (``pred_convention``) or has another NIfTI suffix than the reference (the package wants the same).

    Args:
        package: the sub-challenge's :class:`~brats_pipeline.evaluation.challenge_package.ChallengePackage`.
        pred_path: the predicted label map, or ``None`` for an empty prediction.
        ref_path: the reference label map.
        case_id: the case id.
        convention: the references' label convention.
        pred_convention: the prediction's, when it differs.
    """
    ref, _, _ = _load_label(Path(ref_path))
    ref_conv, pred_conv = get_convention(convention), get_convention(pred_convention or convention)
    suffix = split_nifti_suffix(Path(ref_path))[1]
    with _label_errors(ref_path, convention):
        check_label_values(ref, ref_conv, str(ref_path))
        if pred_path is None:
            data = np.zeros(ref.shape, dtype=np.uint8)
        else:
            data, _, _ = _load_label(Path(pred_path))
            _check_shape(data, ref, pred_path, ref_path)
            check_label_values(data, pred_conv, str(pred_path))
            if pred_conv == ref_conv and split_nifti_suffix(Path(pred_path))[1] == suffix:
                return package(pred_path, ref_path, case_id)
            include_rc = pred_conv.has_resection_cavity and ref_conv.has_resection_cavity
            classes = label_to_classes(data, pred_conv, str(pred_path), include_rc=include_rc)
            data = classes_to_label(classes, ref_conv)[0].numpy()
    header_of = nib.load(str(ref_path if pred_path is None else pred_path))
    with tempfile.TemporaryDirectory(prefix="brats-score-") as tmp:
        copy = Path(tmp) / f"{case_id}{suffix}"
        data = data.astype(header_of.get_data_dtype())
        nib.save(type(header_of)(data, header_of.affine, header_of.header), str(copy))
        return package(copy, ref_path, case_id, pred_source=pred_path or "the empty prediction")


def _some(names: Sequence[str], limit: int = 20) -> str:
    """``names`` joined by commas, the first ``limit`` of them (``metrics_summary.json`` keeps every one)."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names) - limit} more)"


def _nothing_matches(pred_dir, label_dir, pred_files: Sequence[Path], case_ids: Sequence[str]) -> str:
    """The message of a scoring run in which no prediction matches any reference: both folders, their file counts and
    an example name of each (predictions are matched by case id)."""
    preds = f"{len(pred_files)} NIfTI file{'' if len(pred_files) == 1 else 's'}"
    if pred_files:
        preds += f", e.g. {Path(pred_files[0]).name}"
    refs = f"{len(case_ids)} reference label file{'' if len(case_ids) == 1 else 's'}, e.g. case {case_ids[0]}"
    return (
        f"no prediction in {pred_dir} ({preds}) matches a reference case in {label_dir} ({refs}); predictions are "
        "matched by case id: are these the predictions of the cases in that label folder?"
    )


def _csv_text(columns: Sequence[str], rows: Sequence[Mapping]) -> str:
    """CSV of ``rows``; a NaN is an empty cell, as pandas writes (and reads) it."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows)
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
    convention: str | None = None,
    output_dir: str | os.PathLike | None = None,
    pred_convention: str | None = None,
    on_missing: str = "skip",
    hd95_mode: str | None = None,
    hd95_empty_mm: float | None = None,
    progress: bool = True,
    rules: str | None = None,
    challenge: str | None = None,
    nsd_tolerance_mm: float | None = None,
    label_scores: bool = False,
    figure: bool = True,
    print_table: bool = True,
    case_ids: Sequence[str] | None = None,
) -> tuple[list[dict[str, float | str]], dict]:
    """Score every reference case in ``label_dir`` against its prediction in ``pred_dir``.

    Args:
        pred_dir: folder (searched recursively) of predicted label NIfTIs.
        label_dir: folder of reference label NIfTIs (flat or BraTS case folders).
        convention: label convention of the references (``brats2018``, ``brats2023``, ``brats2024``, ``msd``);
            ``None`` detects it (:func:`detect_convention`).
        output_dir: where to write the CSV/JSON/PNG files; ``None`` writes nothing.
        pred_convention: convention of the predictions, when it differs from ``convention``.
        on_missing: a reference without prediction is scored ``"worst"`` (the challenge's rule), as an ``"empty"``
            prediction, ``"skip"``-ped (the default here, for ``evaluate.json``) or an ``"error"``.
        hd95_mode: override the rule set's HD95 definition (``"surface"``, ``"max"``, ``"pooled"``).
        hd95_empty_mm: override the rule set's HD95 penalty.
        progress: show a tqdm progress bar.
        rules: one of :data:`RULE_NAMES`; ``None`` follows the data (:func:`default_rules`: ``brats2025`` for
            references with RC labels, else ``brats2023``) and says so in one line.
        challenge: sub-challenge (``GLI``, ``SSA``, ``MEN``, ``MET``, ``PED``; under ``brats2025`` the package's
            ``GLI``, ``MET``, ``PED``, ``MEN-RT``, ``MEN-PRE``, ``GoAT``); ``None``: from the case ids.
        nsd_tolerance_mm: tolerance of the normalised surface Dice (default 1 mm; not under ``brats2025``).
        label_scores: add rows for the single labels NETC and SNFH (``brats2025`` scores its config's groups).
        figure: write ``metrics_summary.png`` next to the tables.
        print_table: print the summary table to stdout at the end.
        case_ids: score only these reference cases (``evaluate.json``: its validation fold); every one must have a
            reference in ``label_dir``. Without ``case_ids`` (the command line), a ``pred_dir`` none of whose files
            matches a reference is an error, whatever ``on_missing`` says; with them, the listed cases are scored by
            ``on_missing`` (``evaluate.json``: cases that failed in the run itself, which its failure report names).

    Raises:
        ScoringError: a folder is missing, no prediction matches a reference (see ``case_ids``), a flag is wrong;
            :class:`ConventionError` for label values outside the convention;
            :class:`~brats_pipeline.evaluation.challenge_package.ChallengePackageError` under ``brats2025``: the
            package is not installed, or it failed on a case.

    Returns:
        ``(rows, summary)``: long rows (``case_id``, ``region``, metrics) and the content of
        ``metrics_summary.json`` (settings, ``n_cases``, unmatched cases, ``"metrics"`` from
        :func:`brats_pipeline.evaluation.metrics.summarize`, or under ``brats2025`` from
        :func:`~brats_pipeline.evaluation.challenge_package.package_summary`).
    """
    _choice("on_missing (--on_missing)", on_missing, ON_MISSING)
    if rules is not None:
        check_rules(rules)
    if hd95_mode is not None:
        _choice("hd95_mode (--hd95_mode)", hd95_mode, HD95_MODES)
    refs = find_references(label_dir)
    if not refs:
        raise ScoringError(f"no reference label files found in {label_dir}")
    if case_ids is not None:
        unknown = sorted(set(case_ids) - set(refs))
        if unknown:
            raise ScoringError(f"no reference label in {label_dir} for case(s): {', '.join(unknown)}")
        refs = {k: v for k, v in refs.items() if k in set(case_ids)}
    if convention is None:
        convention = detect_convention(label_dir, refs)
        logger.info("label convention of %s: %s (detected; --convention overrides)", label_dir, convention)
    for flag, name in (
        ("convention (--convention)", convention),
        ("pred_convention (--pred_convention)", pred_convention),
    ):
        if name is not None:
            try:
                get_convention(name)
            except ValueError:
                _choice(flag, name, CONVENTION_NAMES)
    choice = None
    if rules is None:
        rules = check_rules(default_rules(convention))  # no silent fallback when the package is missing
        held = "hold RC labels" if rules == PACKAGE_RULES else "hold no RC label"
        choice = f"rules: {rules} (references {held}; --rules to override)"
    if challenge is None:
        challenge = detect_challenge(sorted(refs), rules)
    package, rule, criteria = None, None, None
    if rules == PACKAGE_RULES:
        flags = {"--hd95_mode": hd95_mode, "--hd95_empty_mm": hd95_empty_mm, "--nsd_tolerance_mm": nsd_tolerance_mm}
        given = [flag for flag, value in flags.items() if value is not None] + ["--label_scores"] * bool(label_scores)
        if given:
            raise ScoringError(f"{', '.join(given)}: not under --rules {PACKAGE_RULES}, whose package config is fixed")
        package = ChallengePackage(str(challenge))
        challenge, penalty, metrics = package.challenge, HD95_INFINITE_MM, PACKAGE_METRICS
        leaderboard = f"rules {rules} ({package.name}), challenge {challenge}"
    else:
        rule = RULE_SETS[rules]
        penalty = float(rule.hd95_penalty_mm if hd95_empty_mm is None else hd95_empty_mm)
        try:
            criteria = get_challenge(challenge)
        except ValueError:
            raise ScoringError(
                f"challenge (--challenge) must be one of {', '.join(CHALLENGES)}; got {challenge!r}"
            ) from None
        metrics = SCORE_METRICS
        leaderboard = (
            f"rules {rules}, challenge {challenge if isinstance(challenge, str) else 'custom'} (lesions: dilation "
            f"{criteria.dilation}, volume threshold {criteria.volume_threshold_mm3:g} mm^3)"
        )
    matched, missing, unused = match_predictions(sorted(refs), pred_dir)
    if not matched and (case_ids is None or on_missing == "skip"):
        # two folders that do not belong together: an all-worst table would pass for a result
        raise ScoringError(_nothing_matches(pred_dir, label_dir, unused, sorted(refs)))
    if missing:
        worst = f"Dice 0, HD95 {penalty:g} mm" if package is None else f"0, HD95 {penalty:g} mm, as the package does"
        what = {"worst": f"scored as worst ({worst})", "empty": "scored as empty predictions"}
        logger.warning(
            "%d of %d reference case(s) have NO PREDICTION, %s: %s",
            len(missing),
            len(refs),
            what.get(on_missing, on_missing),
            _some(missing),
        )
        if on_missing == "error":
            raise ScoringError(f"no prediction in {pred_dir} for case(s): {', '.join(missing)}")
    if unused:
        logger.warning("%d prediction file(s) match no reference: %s", len(unused), _some(list(map(str, unused))))
    cases = sorted(matched) if on_missing == "skip" else sorted(refs)

    score_kwargs = dict(
        rules=rule,
        challenge=criteria,
        nsd_tolerance_mm=float(NSD_TOLERANCE_MM if nsd_tolerance_mm is None else nsd_tolerance_mm),
        label_scores=bool(label_scores),
        hd95_mode=hd95_mode,
        hd95_empty_mm=penalty,
    )
    rows: list[dict[str, float | str]] = []
    for case_id in tqdm(cases, desc="scoring", unit="case", disable=not progress or not sys.stderr.isatty()):
        pred_path = matched.get(case_id)
        if package is not None:
            if pred_path is None and on_missing == "worst":
                scores = package.worst()
            else:
                scores = package_case_scores(package, pred_path, refs[case_id], case_id, convention, pred_convention)
        else:
            scores = score_case(pred_path, refs[case_id], convention, pred_convention, **score_kwargs)
            if pred_path is None and on_missing == "worst":
                scores = worst_scores(scores, penalty)
        order = [r for r in REPORT_ORDER if r in scores] + [r for r in scores if r not in REPORT_ORDER]
        rows += [{"case_id": case_id, "region": region, **scores[region]} for region in order]

    summary: dict = {
        "leaderboard": leaderboard,
        "convention": convention,
        "pred_convention": pred_convention or convention,
    }
    if package is not None:
        summary |= {
            "rules": {"name": rules, "package": package.versions, "config": package.config},
            "challenge": challenge,
            "package_config": package.config,
            "hd95_infinite_mm": HD95_INFINITE_MM,
        }
        statistics, stats = PACKAGE_STATISTICS, package_summary(rows, metrics)
    else:
        summary |= {
            "rules": asdict(rule),  # type: ignore[arg-type]
            "hd95_mode": hd95_mode or rule.hd95_mode,  # type: ignore[union-attr]
            "hd95_empty_mm": penalty,
            "challenge": challenge if isinstance(challenge, str) else None,
            "lesion_dilation": criteria.dilation,  # type: ignore[union-attr]
            "lesion_volume_threshold_mm3": criteria.volume_threshold_mm3,  # type: ignore[union-attr]
            "nsd_tolerance_mm": score_kwargs["nsd_tolerance_mm"],
        }
        statistics, stats = STATISTICS, summarize(rows, metrics, ddof=1)
    summary |= {
        "n_cases": len(cases),
        "n_missing_predictions": len(missing),
        "missing_predictions": missing,
        "missing_predictions_scored_as": on_missing,
        "unused_predictions": [str(p) for p in unused],
        "statistics": list(statistics),
        "metrics": stats,
    }
    if output_dir is not None:
        out = Path(output_dir)
        write_text_atomic(_csv_text(("case_id", "region", *metrics), rows), out / PER_CASE_CSV, newline="")
        named = {"rules": rules, "challenge": summary["challenge"]}
        stat_rows = [
            {**named, "region": region, "metric": metric, **values}
            for region, per_metric in stats.items()
            for metric, values in per_metric.items()
        ]
        columns = (*named, "region", "metric", "n", *statistics)
        write_text_atomic(_csv_text(columns, stat_rows), out / SUMMARY_CSV, newline="")
        write_json_atomic(_json_safe(summary), out / SUMMARY_JSON)
        if figure:
            from brats_pipeline.evaluation.figures import scoring_summary_figure

            scoring_summary_figure(
                rows,
                out / SUMMARY_PNG,
                hd95_penalty_mm=penalty,
                title=f"{len(cases)} cases",
                rules=rules,
                challenge=str(challenge) if package is None else f"{challenge} (package config {package.config})",
            )
    if print_table:
        print("\n".join(([choice] if choice else []) + [format_table(summary)]), flush=True)
    elif choice:
        logger.info("%s", choice)
    return rows, summary


#: columns of :func:`format_table`: (header, metric, width, decimals), per rule set family
_TABLE_COLUMNS: dict[str, tuple[tuple[str, str, int, int], ...]] = {
    "toolkit": (
        ("Dice", "dice", 9, 4),
        ("HD95", "hd95", 9, 2),
        ("LesionDice", "lesion_dice", 12, 4),
        ("LesionHD95", "lesion_hd95", 12, 2),
        ("NSD", "nsd", 8, 4),
    ),
    PACKAGE_RULES: (
        ("LesionDSC", "lesion_dice", 11, 4),
        ("LesionHD95", "lesion_hd95", 12, 2),
        ("F1", "lesion_f1", 8, 4),
        ("DSC", "dice", 8, 4),
        ("HD95", "hd95", 9, 2),
        ("NSD", "nsd", 8, 4),
    ),
}


def format_table(summary: Mapping) -> str:
    """The BraTS summary table of :func:`score_folders`' summary: a line naming the rule set and sub-challenge, then per
    region the means (legacy and lesion-wise Dice and HD95, and NSD; under ``brats2025`` lesion-wise Dice and HD95 of
    the matched lesions, detection F1, global Dice, HD95 and NSD), with a warning line when predictions were missing.
    ``n`` counts the cases with a value (``brats2025``: those not empty in both masks)."""
    family = PACKAGE_RULES if summary["rules"]["name"] == PACKAGE_RULES else "toolkit"
    columns = _TABLE_COLUMNS[family]
    lines = [
        f"{summary.get('leaderboard', summary['rules']['name'])}: means over {summary.get('n_cases', '?')} cases",
        f"{'region':<7}{'n':>5}" + "".join(f"{header:>{width}}" for header, _, width, _ in columns),
    ]
    for region, m in summary["metrics"].items():
        n = m[columns[0][1]]["n"]
        cells = "".join(f"{m[metric]['mean']:>{width}.{digits}f}" for _, metric, width, digits in columns)
        lines.append(f"{region:<7}{n:>5}{cells}")
    n_missing = summary.get("n_missing_predictions", 0)
    if n_missing:
        lines.append(
            f"WARNING: {n_missing} case(s) without prediction ({summary['missing_predictions_scored_as']}): "
            + _some(summary["missing_predictions"])
        )
    return "\n".join(lines)


def main(
    pred_dir: str,
    label_dir: str,
    output_dir: str,
    convention: str | None = None,
    pred_convention: str | None = None,
    on_missing: str = "worst",
    rules: str | None = None,
    challenge: str | None = None,
    nsd_tolerance_mm: float | None = None,
    label_scores: bool | str = False,
    hd95_mode: str | None = None,
    hd95_empty_mm: float | None = None,
    figure: bool | str = True,
) -> None:
    """Command line entry: score, write the files into ``output_dir`` and print the table. Without ``--rules`` the
    rule set follows the references (:func:`default_rules`), printed in one line."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    score_folders(
        pred_dir,
        label_dir,
        convention=convention,
        output_dir=output_dir,
        pred_convention=pred_convention,
        on_missing=on_missing,
        hd95_mode=hd95_mode,
        hd95_empty_mm=None if hd95_empty_mm is None else float(hd95_empty_mm),
        rules=rules,
        challenge=challenge,
        nsd_tolerance_mm=None if nsd_tolerance_mm is None else float(nsd_tolerance_mm),
        label_scores=_flag("--label_scores", label_scores),
        figure=_flag("--figure", figure),
    )
    written = [PER_CASE_CSV, SUMMARY_CSV, SUMMARY_JSON] + ([SUMMARY_PNG] if _flag("--figure", figure) else [])
    print(f"wrote {', '.join(written)} to {output_dir}")


__all__: Sequence[str] = (
    "ScoringError",
    "ConventionError",
    "RuleSet",
    "RULE_SETS",
    "RULE_NAMES",
    "DEFAULT_RULES",
    "ON_MISSING",
    "PER_CASE_CSV",
    "SUMMARY_CSV",
    "SUMMARY_JSON",
    "SUMMARY_PNG",
    "PER_CASE_COLUMNS",
    "SCORE_METRICS",
    "default_rules",
    "check_rules",
    "find_references",
    "match_predictions",
    "detect_convention",
    "detect_challenge",
    "case_scores",
    "worst_scores",
    "score_case",
    "package_case_scores",
    "score_folders",
    "format_table",
    "main",
)


def cli() -> None:
    """Console command ``brats-score`` (also ``python -m brats_pipeline.evaluation.scoring``)."""
    fire_command(main)


if __name__ == "__main__":
    cli()
