"""JSON records a training run writes next to its weights, together with ``model.pt``: which cases it trained and
selected on.

:class:`CaseRecord` makes a training run write down which cases it trained on and selected on (``models/cases.json``),
so that an evaluation can check exactly whether its cases are held out instead of inferring it from the fold.
:class:`~brats_pipeline.training.run.TrainingRun` writes it, and ``model_settings.json``
(:class:`~brats_pipeline.bundle.settings.ModelSettingsRecord`), each time it writes ``model.pt`` (the best-metric save
or the final model), just before the weights take their name: the three files always describe one run, and a run that
writes no ``model.pt`` writes neither.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.utils import look_up_option

from brats_pipeline.atomic_files import write_json_atomic
from brats_pipeline.data.layouts import entry_case_id
from brats_pipeline.training.checkpointing import is_main_process

__all__ = ["JsonRecord", "CaseRecord", "read_case_record", "CASE_RECORD_NAME"]

#: file a training run writes next to its checkpoints (see :class:`CaseRecord`)
CASE_RECORD_NAME = "cases.json"


def case_ids(items: Sequence[Mapping[str, Any]] | None) -> list[str]:
    return sorted({entry_case_id(item) for item in items or () if isinstance(item, Mapping)})


class JsonRecord:
    """A JSON file that describes ``model.pt``: ``record`` written to ``path`` (rank 0, atomically) when called.

    Subclasses set ``path`` and ``record``: :class:`CaseRecord` here, ``ModelSettingsRecord`` in
    :mod:`brats_pipeline.bundle.settings`. ``TrainingRun`` calls them when it writes ``model.pt``.
    """

    path: Path
    record: dict[str, Any]

    def __call__(self, engine: Any = None) -> Path:
        if is_main_process():
            write_json_atomic(self.record, self.path)
        return self.path


class CaseRecord(JsonRecord):
    """Which cases a model was trained on and which chose it: ``ckpt_dir/cases.json``, written (rank 0, atomically)
    when called, which ``TrainingRun`` does each time it writes ``model.pt``::

        {"trained_on": [case ids], "selected_on": [case ids], "model_selection": "best <key metric>" | "final",
         "dataset_dir": ..., "fold": ..., "num_folds": ...}

    :func:`evaluation_plan` reads it to tell exactly which scored cases a model has seen. Only a training run writes
    it, and only with a ``model.pt`` (evaluation and inference never do).

    Args:
        ckpt_dir: the checkpoint folder (``@ckpt_dir``).
        train_files: the training cases (``@train_files``).
        val_files: the validation cases whose metric chooses ``model.pt`` (``@val_files``).
        model_selection: ``"best"`` (``model.pt`` is the best epoch by the validation key metric) or ``"final"``
            (the last epoch's weights; the validation cases then choose nothing, but are still recorded as seen by
            the validation when there are any).
        extra: more entries for the file (``dataset_dir``, ``fold``, ``num_folds``, ``seed`` ...).
        key_metric: the validation key metric that chooses ``model.pt`` (``val_mean_dice``, or ``val_mean_iou`` in
            the 3D-ESPNet protocol overlays).
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        train_files: Sequence[Mapping[str, Any]],
        val_files: Sequence[Mapping[str, Any]] = (),
        model_selection: str = "best",
        extra: Mapping[str, Any] | None = None,
        key_metric: str = "val_mean_dice",
    ) -> None:
        model_selection = look_up_option(model_selection, ("best", "final"))
        self.path = Path(ckpt_dir) / CASE_RECORD_NAME
        self.record = {
            "model_selection": f"best {key_metric}" if model_selection == "best" else "final",
            "trained_on": case_ids(train_files),
            "selected_on": case_ids(val_files) if model_selection == "best" else [],
            "validated_on": case_ids(val_files),
            **{k: v for k, v in (extra or {}).items()},
        }


def read_case_record(path: str | os.PathLike | None) -> dict | None:
    """The content of a ``cases.json`` written by :class:`CaseRecord` (a file or its folder), ``None`` if absent."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        path = path / CASE_RECORD_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())
