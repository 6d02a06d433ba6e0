"""Honest evaluation: which cases ``evaluate.json`` scores, and whether the model has seen them.

:func:`evaluation_plan` says which cases ``evaluate.json`` scores and warns when they are the cases that chose
``models/model.pt`` (the validation fold of training) or cases it was trained on, reading the training run's
``models/cases.json`` (:class:`~brats_pipeline.training.records.CaseRecord`) where it exists.
``evaluate.json`` writes each evaluation into a folder of its own, ``<output_dir>/<eval_name>`` (``eval_name``:
``<dataset folder>-fold<k>``, or ``<dataset folder>-<eval_split>``), and its BraTS scores into ``<eval_name>/<rules>``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai.utils import look_up_option

from brats_pipeline.atomic_files import write_json_atomic
from brats_pipeline.bundle.command_line import check_output_folders
from brats_pipeline.evaluation.scoring import check_rules
from brats_pipeline.training.records import case_ids, read_case_record

__all__ = ["EvaluationPlan", "evaluation_plan", "EVAL_SPLITS"]

logger = logging.getLogger(__name__)

#: what ``evaluate.json`` can score (key ``eval_split``), see :func:`evaluation_plan`
EVAL_SPLITS: tuple[str, ...] = ("fold", "validation", "testing", "all")


@dataclass
class EvaluationPlan:
    """Which cases an evaluation scores, and what they are to the model being scored.

    Attributes:
        split: the ``eval_split`` asked for.
        cases: the datalist entries to score (what ``evaluate.json``'s ``eval_cases`` screens and runs).
        statement: one paragraph saying which cases are scored and what the score means.
        warnings: the reasons the score is not a held-out estimate (empty when it is one, or unknown).
        held_out: ``True``: none of the cases was used in training or model selection (known from ``cases.json``
            or from the datalist); ``False``: some were; ``None``: cannot tell (another folder, no record).
        overlap: ``{"selected_on": [...], "trained_on": [...]}``: the scored case ids the model has seen.
    """

    split: str
    cases: list[dict]
    statement: str
    warnings: list[str] = field(default_factory=list)
    held_out: bool | None = None
    overlap: dict[str, list[str]] = field(default_factory=dict)

    def report(
        self, output_dir: str | os.PathLike | None = None, print_it: bool = True, rules: str | None = None
    ) -> str:
        """Print :attr:`statement` and each warning (or log them, ``print_it=False``); with ``output_dir`` also write
        ``evaluated_cases.json`` there (statement, warnings, held_out, the scored case ids and the overlap).

        An ``output_dir`` that cannot be written stops the run here, in one line, before any prediction is made
        (:func:`~brats_pipeline.bundle.command_line.check_output_folders`).

        ``rules``: the rule set the predictions will be scored by (``evaluate.json``'s ``rules``), named in the
        statement and the file, and checked first (:func:`~brats_pipeline.evaluation.scoring.check_rules`): an
        unknown name, or ``brats2025`` without the official package, stops the run before any prediction is made.
        """
        if output_dir is not None:
            check_output_folders(output_dir)
        statement = self.statement
        if rules is not None:
            check_rules(rules)
            statement += f" BraTS scores by the {rules} rules."
        text = "\n".join([statement, *(f"WARNING: {w}" for w in self.warnings)])
        if print_it:
            print(text, flush=True)
        else:
            logger.info("%s", statement)
            for w in self.warnings:
                logger.warning("%s", w)
        if output_dir is not None:
            write_json_atomic(
                {
                    "split": self.split,
                    "rules": rules,
                    "statement": statement,
                    "warnings": self.warnings,
                    "held_out": self.held_out,
                    "cases": case_ids(self.cases),
                    "overlap": self.overlap,
                },
                Path(output_dir) / "evaluated_cases.json",
            )
        return text


_HOW_TO_HOLD_OUT = (
    "For a held-out score, evaluate cases that neither trained nor chose the model: --eval_split testing (a datalist "
    "whose 'testing' entries have labels) or --dataset_dir <a labelled folder training never saw> --eval_split all."
)


def evaluation_plan(
    datalist: Mapping[str, Any],
    fold: int = 0,
    split: str = "fold",
    val_files: Sequence[Mapping[str, Any]] | None = None,
    case_record: str | os.PathLike | Mapping[str, Any] | None = None,
    train_on_all: bool = False,
) -> EvaluationPlan:
    """Which cases ``evaluate.json`` scores for ``split``, and whether they are held out from the model.

    Splits (config key ``eval_split``):

    - ``"fold"`` (the default, what ``evaluate.json`` has always scored): ``val_files``, i.e. the validation fold
      ``fold`` plus the datalist's ``validation`` entries -- exactly the cases whose validation key metric chose
      ``models/model.pt`` during training. Always warned about: it measures the selected model on its selection set.
    - ``"validation"``: the datalist's ``validation`` entries (cases kept out of the folds with
      ``python -m brats_pipeline.data.datalist --num_validation N``). ``train.json`` adds them to ``val_files``, so they
      choose the model too: warned about likewise.
    - ``"testing"``: the labelled entries of the datalist's ``testing`` list (``build_datalist`` puts unlabelled
      cases there; a datalist written by hand may hold labelled held-out cases). Held out.
    - ``"all"``: every labelled case of the datalist (``training``, ``validation``, labelled ``testing``), for a
      separate labelled folder given as ``--dataset_dir`` that training never saw.

    What the model has seen comes from ``case_record`` (the ``models/cases.json`` a training run with
    :class:`CaseRecord` writes) when there is one, which makes the check exact for any split and folder; otherwise
    it is inferred from the datalist under the assumption that the model was trained by ``train.json`` on this
    datalist with this ``fold`` (the statement says so). With ``train_on_all`` (and no record) every labelled case
    of the datalist counts as trained on.

    Args:
        datalist: the datalist (``@datalist``).
        fold: the validation fold (``@fold``).
        split: one of :data:`EVAL_SPLITS`.
        val_files: the validation cases as the config defines them (``@val_files``); default: fold ``fold`` plus
            the datalist's ``validation`` entries, as ``train.json`` defines them.
        case_record: path of ``cases.json`` (or its folder, e.g. ``@ckpt_dir``), or its content.
        train_on_all: the model was trained on all labelled cases (no validation fold).

    Returns:
        An :class:`EvaluationPlan`; call ``report(output_dir)`` to print it and write ``evaluated_cases.json``.

    Raises:
        ValueError: for an unknown split, or when the split holds no labelled case (the message says what to use).
    """
    split = look_up_option(split, EVAL_SPLITS)
    training = [dict(c) for c in datalist.get("training", [])]
    validation = [dict(c) for c in datalist.get("validation", [])]
    testing = [dict(c) for c in datalist.get("testing", []) if c.get("label")]
    fold = int(fold)
    fold_cases = [c for c in training if c.get("fold") == fold]
    if val_files is None:
        val_files = [] if train_on_all else fold_cases + validation
    val_files = [dict(c) for c in val_files]
    name = datalist.get("name") or Path(str(datalist.get("dataset_dir", "the dataset"))).name
    num_folds = datalist.get("num_folds")

    if split == "fold":
        cases = val_files
        what = (
            f"the validation fold {fold} of the {num_folds}-fold split"
            + (f" (seed {datalist.get('seed')})" if "seed" in datalist else "")
            + (f" and the {len(validation)} cases of the datalist's 'validation' list" if validation else "")
        )
    elif split == "validation":
        cases = validation
        what = "the datalist's 'validation' list"
    elif split == "testing":
        cases = testing
        what = "the labelled cases of the datalist's 'testing' list"
    else:
        cases = training + validation + testing
        what = "every labelled case of the datalist"
    record = case_record if isinstance(case_record, Mapping) else read_case_record(case_record)
    if not cases:
        trained_on_all = train_on_all or (record is not None and record.get("model_selection") == "final")
        if trained_on_all:
            fold_hint = "the model was trained on all labelled cases (train_on_all), so no validation fold exists"
        elif not fold_cases:
            fold_hint = f"fold {fold} is empty"
        else:
            fold_hint = "val_files is empty"
        hint = {
            "fold": fold_hint,
            "validation": "the datalist has no 'validation' entries (python -m brats_pipeline.data.datalist --num_validation N)",
            "testing": "the datalist's 'testing' entries have no labels (build_datalist puts unlabelled cases there)",
            "all": "the datalist has no labelled case",
        }[split]
        raise ValueError(f"eval_split '{split}' of {name}: no case to score: {hint}. {_HOW_TO_HOLD_OUT}")

    scored = set(case_ids(cases))
    if record is not None:
        trained = set(record.get("trained_on", []))
        selected = set(record.get("selected_on", []))
        source = "models/cases.json, written by the training run"
    elif split == "all":
        trained, selected = set(), set()
        source = "unknown: no models/cases.json next to the model"
    else:
        if train_on_all:
            trained, selected = set(case_ids(training + validation)), set()
        else:
            selected = set(case_ids(fold_cases + validation))
            trained = set(case_ids(training)) - selected
        source = (
            "inferred: no models/cases.json; assumes models/model.pt was trained by train.json on this datalist "
            + ("on all labelled cases" if train_on_all else f"with fold {fold}")
        )
    chosen_by = str((record or {}).get("model_selection", "best val_mean_dice")).removeprefix("best ")
    in_selection = sorted(scored & selected)
    in_training = sorted((scored & trained) - selected)
    warnings: list[str] = []
    if in_selection:
        warnings.append(
            f"{len(in_selection)} of the {len(scored)} scored cases are the cases used for model selection (the "
            f"validation of training chose models/model.pt by their {chosen_by}): the score is optimistic, not a "
            f"held-out estimate. {_HOW_TO_HOLD_OUT}"
        )
    if in_training:
        warnings.append(
            f"{len(in_training)} of the {len(scored)} scored cases were training cases: the score measures the fit, "
            f"not generalisation. {_HOW_TO_HOLD_OUT}"
        )
    held_out: bool | None
    if warnings:
        held_out = False
    elif record is None and split == "all":
        held_out = None
        warnings.append(
            f"cannot tell whether the model was trained on {name}: there is no models/cases.json (written by "
            "training runs with a CaseRecord). The score is a held-out estimate only if training never saw these "
            "cases."
        )
    else:
        held_out = True
    preview = ", ".join(sorted(scored)[:5]) + (", ..." if len(scored) > 5 else "")
    verdict = {
        True: "None of them trained or chose the model: a held-out score.",
        False: "Not a held-out score (see the warnings).",
        None: "Whether they are held out is unknown.",
    }[held_out]
    statement = (
        f"evaluate.json scores {len(scored)} cases of {name}: {what} (eval_split '{split}'): {preview}. "
        f"{verdict} What the model saw: {source}."
    )
    return EvaluationPlan(
        split=split,
        cases=cases,
        statement=statement,
        warnings=warnings,
        held_out=held_out,
        overlap={"selected_on": in_selection, "trained_on": in_training},
    )
