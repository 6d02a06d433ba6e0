"""The BraTS 2025+ rules (``--rules brats2025``): the official evaluation package, called as the challenge calls it.

Since 2025 the BraTS challenges rank with ``brats-evaluation`` (0.0.10, on ``panoptica`` 2.1.7). Per case,
``evaluate_single_exam(prediction, reference, case_id, Panoptica_Evaluator.load_from_config(config_path(name)))``
scores every label group of the sub-challenge's config (:data:`PACKAGE_CONFIGS`); the package's
``parse_seg_results`` writes one row per case with an infinite global HD95 as 373 mm, fills a missing case with 0
(373 for HD95) and appends the pandas mean, std (ddof=1) and median of every column. This module calls the package
and does not re-implement it: the numbers are the package's by construction. :class:`ChallengePackage` scores one
case from the two NIfTI files (the package reads them itself, with SimpleITK: shape, spacing and orientation come
from the files), :func:`package_summary` is the parser's statistics. ``docs/scoring.md`` compares the rule sets.

The package is an optional extra (``pip install -e .[challenge]``), imported only when these rules are used; it
pins ``numpy<2.3``. Without it, :class:`ChallengePackage` raises :class:`ChallengePackageError`, one line naming
the extra.

Per case and label group, the columns of ``metrics_per_case.csv`` are the package's keys (:data:`PACKAGE_COLUMNS`):
lesion-wise Dice, NSD and HD95 averaged over the matched lesion pairs (``sq_*``), the detection counts and F1
(``rq``), and the whole-region ("global") Dice, NSD and HD95. A group empty in both masks is NaN (an empty cell),
left out of the statistics as pandas leaves it out; an infinite HD95 (no match, one mask empty) is written as
:data:`HD95_INFINITE_MM`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from typing import Any

from monai.utils import look_up_option

from brats_pipeline.bundle.command_line import UserError
from brats_pipeline.evaluation.metrics import REPORT_ORDER

logger = logging.getLogger("brats_pipeline.evaluation.challenge_package")

#: the rule-set name of the package's rules (``--rules``)
PACKAGE_RULES = "brats2025"
#: the version these rules were written and tested against (the extra ``challenge`` pins it)
PACKAGE_REQUIREMENT = "brats-evaluation==0.0.10"
INSTALL_HINT = "pip install -e .[challenge] (or pip install brats-evaluation==0.0.10)"
#: sub-challenge (``--challenge``) -> the package's bundled config (``configs/config_<name>.yaml``)
PACKAGE_CONFIGS: dict[str, str] = {
    "GLI": "gli",
    "MET": "mets",
    "PED": "ped",
    "MEN-RT": "MenRT",
    "MEN-PRE": "MenPre",
    "GoAT": "GoAT",
}
#: ``BraTS-<SUB>-`` case-id parts that name a sub-challenge under another name (pre-operative meningioma)
CASE_ID_NAMES: dict[str, str] = {"MEN": "MEN-PRE"}
#: our per-case column <- the package's result key (``PanopticaResult.to_dict``)
PACKAGE_COLUMNS: dict[str, str] = {
    "lesion_dice": "sq_dsc",
    "lesion_nsd": "sq_nsd",
    "lesion_hd95": "sq_hd95",
    "lesion_tp": "tp",
    "lesion_fp": "fp",
    "lesion_fn": "fn",
    "lesion_f1": "rq",
    "dice": "global_bin_dsc",
    "nsd": "global_bin_nsd",
    "hd95": "global_bin_hd95",
}
PACKAGE_METRICS: tuple[str, ...] = tuple(PACKAGE_COLUMNS)
_COUNTS = ("lesion_tp", "lesion_fp", "lesion_fn")
#: HD95 written for an infinite one, and for a missing case (``parse_seg_results``: the diameter of the SRI-24 cube)
HD95_INFINITE_MM: float = 373.0
#: the statistics ``parse_seg_results`` appends (pandas, NaN skipped, std with ddof=1)
PACKAGE_STATISTICS: tuple[str, ...] = ("mean", "std", "median")


class ChallengePackageError(UserError):
    """The official package is missing, or failed on a case (the message names the file); one ``error:`` line."""


def package_challenge(name: str) -> str:
    """The sub-challenge of :data:`PACKAGE_CONFIGS` named by ``name`` (case-insensitive, ``BraTS-`` prefix and the
    case-id names of :data:`CASE_ID_NAMES` allowed): ``"men-rt"`` -> ``"MEN-RT"``, ``"BraTS-MEN"`` -> ``"MEN-PRE"``."""
    names = {k.upper(): k for k in PACKAGE_CONFIGS} | CASE_ID_NAMES
    key = str(name).upper().removeprefix("BRATS-")
    try:
        return names[look_up_option(key, sorted(names))]
    except ValueError:  # look_up_option's message spans lines: one line for the command line
        raise ChallengePackageError(
            f"challenge (--challenge) must be one of {', '.join(PACKAGE_CONFIGS)} under --rules {PACKAGE_RULES}; "
            f"got {name!r}"
        ) from None


def package_versions() -> dict[str, str]:
    """Installed versions of ``brats-evaluation`` and ``panoptica`` (empty when they are not installed)."""
    versions = {}
    for name in ("brats-evaluation", "panoptica"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep the command's output clean: the package's prints, its rich log lines (stdout) and its warnings (e.g.
    panoptica's NSD threshold note) go to this module's debug log instead."""
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
        warnings.simplefilter("always")
        yield
    for w in caught:
        logger.debug("brats-evaluation warned: %s", w.message)
    if out.getvalue().strip():
        logger.debug("brats-evaluation printed: %s", out.getvalue().strip())


def _region(group: str) -> str:
    return group.upper()


def import_package() -> Any:
    """The module ``brats_evaluation`` (and ``panoptica`` with it), imported on first use.

    Raises:
        ChallengePackageError: it cannot be imported; one line naming the extra to install.
    """
    try:
        import brats_evaluation
        import panoptica  # noqa: F401
    except ImportError as e:
        raise ChallengePackageError(
            f"--rules {PACKAGE_RULES} needs the official BraTS evaluation package {PACKAGE_REQUIREMENT}, which "
            f"cannot be imported ({e}): {INSTALL_HINT}"
        ) from None
    return brats_evaluation


class ChallengePackage:
    """The official evaluation of one sub-challenge: scores cases from their NIfTI files as the leaderboard does.

    Args:
        challenge: a sub-challenge of :data:`PACKAGE_CONFIGS` (see :func:`package_challenge`).

    Attributes:
        challenge: its name (``"GLI"``); ``config``: the package's config (``"gli"``); ``regions``: the label groups as
            our tables name them, upper case, in the order ET, TC, WT, RC, NETC, SNFH, then the config's others
            (GLI: ``ET, TC, WT, RC, NETC, SNFH``; PED: ``ET, TC, WT, NETC, CC, ED``; MEN-RT: ``GTV``).

    Raises:
        ChallengePackageError: the package is not installed (the message names the extra), or an unknown challenge.
    """

    def __init__(self, challenge: str = "GLI") -> None:
        self.challenge = package_challenge(challenge)
        self.config = PACKAGE_CONFIGS[self.challenge]
        package = import_package()
        from panoptica import Panoptica_Evaluator

        self.versions = package_versions()
        if self.versions.get("brats-evaluation") != PACKAGE_REQUIREMENT.split("==")[1]:
            logger.warning(
                "brats-evaluation %s is installed; these rules were checked against %s",
                self.versions.get("brats-evaluation", "?"),
                PACKAGE_REQUIREMENT,
            )
        self._evaluate = package.evaluate_single_exam
        with _quiet():  # loading the GLI config prints a note on the labels shared by several groups
            self.evaluator = Panoptica_Evaluator.load_from_config(package.config_path(self.config))
        groups = list(self.evaluator.segmentation_class_groups_names)
        order = [g for r in REPORT_ORDER for g in groups if _region(g) == r]
        self.groups: tuple[str, ...] = tuple(order + [g for g in groups if g not in order])
        self.regions: tuple[str, ...] = tuple(_region(g) for g in self.groups)

    @property
    def name(self) -> str:
        """``"brats-evaluation 0.0.10, config gli"``: what the numbers come from."""
        return f"brats-evaluation {self.versions.get('brats-evaluation', '?')}, config {self.config}"

    def __call__(
        self,
        pred_path: str | os.PathLike,
        ref_path: str | os.PathLike,
        case_id: str,
        pred_source: str | os.PathLike | None = None,
    ) -> dict[str, dict[str, float]]:
        """Scores ``{region: {metric: value}}`` (:data:`PACKAGE_METRICS`) of one case, by ``evaluate_single_exam``.

        Args:
            pred_path: the predicted label map, a NIfTI file in the reference's label convention, same shape,
                spacing and orientation (the package checks them).
            ref_path: the reference label map.
            case_id: the case id (the package's ``subject_identifier``).
            pred_source: the prediction file to name in errors when ``pred_path`` is a converted copy of it.

        Raises:
            ChallengePackageError: the package's ``{"error": ...}`` for this case (unreadable file, geometry or
                label mismatch), naming the prediction and the reference.
        """
        with _quiet():
            result = self._evaluate(str(pred_path), str(ref_path), case_id, self.evaluator)
        if "error" in result:
            raise ChallengePackageError(
                f"{pred_source or pred_path}: the official BraTS evaluation failed on case {case_id} against "
                f"{ref_path}: {result['error']}"
            )
        return {_region(group): package_row(result[group]) for group in self.groups}

    def worst(self) -> dict[str, dict[str, float]]:
        """The parser's row of a missing case: 0 in every column, :data:`HD95_INFINITE_MM` for HD95."""
        row = dict.fromkeys(PACKAGE_METRICS, 0.0) | dict.fromkeys(_COUNTS, 0)
        row |= {"lesion_hd95": HD95_INFINITE_MM, "hd95": HD95_INFINITE_MM}
        return {region: dict(row) for region in self.regions}


def package_row(result: Mapping[str, Any]) -> dict[str, float]:
    """Our columns (:data:`PACKAGE_COLUMNS`) of one label group's ``PanopticaResult.to_dict()``: a key the package
    left out (a metric it could not compute) is NaN, as in its parser; an infinite HD95 is :data:`HD95_INFINITE_MM`;
    the counts are ints."""
    row: dict[str, float] = {}
    for column, key in PACKAGE_COLUMNS.items():
        value = result.get(key)
        value = float("nan") if value is None else float(value)
        if column.endswith("hd95") and math.isinf(value):
            value = HD95_INFINITE_MM
        row[column] = int(value) if column in _COUNTS and math.isfinite(value) else value
    return row


def package_summary(
    rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = PACKAGE_METRICS
) -> dict[str, dict[str, dict[str, float]]]:
    """``parse_seg_results``' statistics of the per-case table, per region and metric: pandas ``mean``, ``std``
    (ddof=1) and ``median`` of the column, NaN left out, and ``n`` the values counted.

    Args:
        rows: long rows ``{"case_id", "region", metric: value}``, one per case and region, in case order.
        metrics: the columns to summarise.

    Returns:
        ``{region: {metric: {"n", "mean", "std", "median"}}}``, regions in the order they first appear.
    """
    import pandas as pd  # a dependency of the package

    summary: dict[str, dict[str, dict[str, float]]] = {}
    for region in dict.fromkeys(str(r["region"]) for r in rows):
        part = [r for r in rows if r["region"] == region]
        summary[region] = {}
        for m in metrics:
            # a column as the parser's DataFrame types it (counts int64, the rest float64): pandas' std of an int64
            # column can differ from that of the same numbers as float64 in the last bit
            column = pd.Series([r[m] for r in part])
            with warnings.catch_warnings():  # a column of NaN only (empty in every case): NaN, said by numpy
                warnings.simplefilter("ignore", RuntimeWarning)
                summary[region][m] = {
                    "n": int(column.count()),
                    "mean": float(column.mean()),
                    "std": float(column.std()),
                    "median": float(column.median()),
                }
    return summary


__all__: Sequence[str] = (
    "CASE_ID_NAMES",
    "ChallengePackage",
    "ChallengePackageError",
    "HD95_INFINITE_MM",
    "INSTALL_HINT",
    "PACKAGE_COLUMNS",
    "PACKAGE_CONFIGS",
    "PACKAGE_METRICS",
    "PACKAGE_REQUIREMENT",
    "PACKAGE_RULES",
    "PACKAGE_STATISTICS",
    "import_package",
    "package_challenge",
    "package_row",
    "package_summary",
    "package_versions",
)
