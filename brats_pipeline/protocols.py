"""The papers' training and evaluation protocols, beyond their networks: epoch definitions, which model is kept,
and which cases an evaluation scores.

Three pieces, each usable from a bundle config by ``_target_``:

- **3D-ESPNet's epoch** (``epoch_passes``): the reference code (sacmehta/3D-ESPNet, ``main.py``) trains every epoch
  on three DataLoaders that resize the whole brain box of each case to 144^3, 96^3 and 128^3 (``ScaleToFixed``:
  linear for the image, nearest for the label), in an order shuffled every epoch after the first; the LR schedule
  and the validation run once per such three-pass epoch. :class:`ResizedPasses` wraps a bundle's training dataset
  so that it holds every case once per size, resized to that size; :class:`PassBatchSampler` batches each pass on
  its own (tensors of one batch must have one size) and shuffles the pass order and the cases within each pass.
  One ``SupervisedTrainer`` epoch is then ``len(sizes)`` passes over the data, as in the reference.
- **Myronenko's model selection** (``train_on_all``): the paper trains on all 285 labelled cases and validates on
  the challenge server, so no local validation chooses the model: the weights after the last epoch are the model.
  :class:`FinalModelSaver` writes them to ``models/model.pt`` when training completes.
- **Honest evaluation**: :func:`evaluation_plan` says which cases ``evaluate.json`` scores and warns when they are
  the cases that chose ``models/model.pt`` (the validation fold of training) or cases it was trained on, and
  :class:`CaseRecord` makes a training run write down which cases it trained on and selected on
  (``models/cases.json``), so that the evaluation can check this exactly instead of inferring it from the fold.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.transforms import Resized
from torch.utils.data import Dataset, Sampler

from brats_pipeline.atomic_files import atomic_write, write_json_atomic
from brats_pipeline.checkpointing import is_main_process
from brats_pipeline.layouts import entry_case_id

__all__ = [
    "ResizedPasses",
    "PassBatchSampler",
    "FinalModelSaver",
    "CaseRecord",
    "EvaluationPlan",
    "evaluation_plan",
    "read_case_record",
    "CASE_RECORD_NAME",
    "EVAL_SPLITS",
]

logger = logging.getLogger(__name__)

#: file a training run writes next to its checkpoints (see :class:`CaseRecord`)
CASE_RECORD_NAME = "cases.json"
#: what ``evaluate.json`` can score (key ``eval_split``), see :func:`evaluation_plan`
EVAL_SPLITS: tuple[str, ...] = ("fold", "validation", "testing", "all")


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ------------------------------------------------------------------------------------------------- epoch passes


def _as_size(size: int | Sequence[int] | None, spatial_dims: int = 3) -> tuple[int, ...] | None:
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        sizes: tuple[int, ...] = (int(size),) * spatial_dims
    else:
        sizes = tuple(size)
    if len(sizes) != spatial_dims or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
        raise ValueError(f"epoch_passes: each size is an int >= 1 or {spatial_dims} of them (or null), got {size!r}")
    return sizes


class ResizedPasses(Dataset):
    """Every item of ``dataset`` once per size of ``sizes``, resized to that size: ``len(sizes)`` passes.

    Index ``i`` is case ``i % len(dataset)`` of pass ``i // len(dataset)``; the item is ``dataset``'s (its transforms,
    random ones included, run as usual) followed by MONAI ``Resized`` of ``keys`` to ``sizes[pass]``. Use
    :class:`PassBatchSampler` so that a batch holds one pass only (tensors of one batch must have one size).

    This is the 3D-ESPNet reference's epoch: ``sizes=[144, 96, 128]`` with the whole brain box as input
    (``train_brain_crop``), image resized linearly and label by nearest neighbour, as its ``ScaleToFixed`` does.

    Args:
        dataset: the training dataset (e.g. ``@train#dataset``, a ``CacheDataset``); items are dicts (or lists of
            dicts from a multi-sample crop, each resized).
        sizes: one entry per pass: an int (a cube), a list of sizes per spatial axis, or ``None`` (the item as it
            is; only for ``batch_size`` 1 or inputs of one size).
        keys: the keys to resize.
        mode: interpolation per key (``"trilinear"`` for the image, ``"nearest"`` for a label map or masks).
        align_corners: per key, for the linear modes (``None`` for the others).
        anti_aliasing: smooth the image before downsampling (MONAI ``Resized``); off by default, as in the
            reference (``skimage`` 0.14's ``resize`` did not anti-alias by default).
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        dataset: Dataset,
        sizes: Sequence[int | Sequence[int] | None],
        keys: Sequence[str] = ("image", "label"),
        mode: Sequence[str] | str = ("trilinear", "nearest"),
        align_corners: Sequence[bool | None] | bool | None = (False, None),
        anti_aliasing: bool = False,
        allow_missing_keys: bool = True,
    ) -> None:
        if isinstance(sizes, (int, str)) or sizes is None or len(sizes) == 0:
            raise ValueError(f"epoch_passes must be a non-empty list of sizes, got {sizes!r}")
        self.dataset = dataset
        self.sizes = [_as_size(s) for s in sizes]
        self._resizers = [
            None
            if size is None
            else Resized(
                keys=list(keys),
                spatial_size=size,
                mode=mode,
                align_corners=align_corners,
                anti_aliasing=anti_aliasing,
                allow_missing_keys=allow_missing_keys,
            )
            for size in self.sizes
        ]

    @property
    def num_cases(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    @property
    def num_passes(self) -> int:
        return len(self.sizes)

    @property
    def transform(self) -> Any:
        """The wrapped dataset's transform (so that :class:`~brats_pipeline.checkpointing.RNGStates` finds the
        random transforms to save and restore)."""
        return getattr(self.dataset, "transform", None)

    def __len__(self) -> int:
        return self.num_cases * self.num_passes

    def locate(self, index: int) -> tuple[int, int]:
        """``(pass, case)`` of flat index ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items ({self.num_passes} passes)")
        return divmod(int(index), self.num_cases)

    def __getitem__(self, index: int) -> Any:
        pass_index, case_index = self.locate(index)
        item = self.dataset[case_index]
        resize = self._resizers[pass_index]
        if resize is None:
            return item
        if isinstance(item, (list, tuple)):
            return [resize(i) for i in item]
        return resize(item)


class PassBatchSampler(Sampler):
    """Batches of :class:`ResizedPasses` indices that never mix two passes (sizes), one epoch = every pass.

    Each epoch (each ``iter``) the order of the passes is shuffled (``shuffle_passes``) and the cases within each
    pass are shuffled independently (``shuffle``), then cut into batches of ``batch_size``. The permutations are
    drawn from a generator seeded from torch's global generator at the start of each epoch (as PyTorch's
    ``RandomSampler`` does), so ``set_determinism`` fixes them and a resumed run, whose torch generator state is
    restored from the checkpoint, continues with the same order.

    Pass it to the DataLoader as ``batch_sampler`` (and no ``batch_size``/``shuffle``/``sampler``).

    Args:
        passes: the :class:`ResizedPasses` dataset (or anything with ``num_cases`` and ``num_passes``).
        batch_size: cases per batch.
        shuffle: shuffle the cases within each pass.
        shuffle_passes: shuffle the order of the passes each epoch (the reference keeps its first epoch in the
            order 144, 96, 128 and shuffles from the second on; here every epoch is shuffled).
        drop_last: drop the last, incomplete batch of each pass.

    Raises:
        RuntimeError: when iterated inside ``torch.distributed`` with more than one process: the passes are not
            split across ranks (``multi_gpu_train.json`` is not supported with ``epoch_passes``).
    """

    def __init__(
        self,
        passes: Any,
        batch_size: int = 1,
        shuffle: bool = True,
        shuffle_passes: bool = True,
        drop_last: bool = False,
    ) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_cases = int(passes.num_cases)
        self.num_passes = int(passes.num_passes)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.shuffle_passes = bool(shuffle_passes)
        self.drop_last = bool(drop_last)

    def batches_per_pass(self) -> int:
        if self.drop_last:
            return self.num_cases // self.batch_size
        return math.ceil(self.num_cases / self.batch_size)

    def __len__(self) -> int:
        return self.num_passes * self.batches_per_pass()

    def __iter__(self) -> Iterator[list[int]]:
        if _is_distributed():
            raise RuntimeError(
                "PassBatchSampler (epoch_passes) does not split its passes across distributed ranks; train with one "
                "process, or without epoch_passes"
            )
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        generator = torch.Generator().manual_seed(seed)
        n = self.num_cases
        order = torch.randperm(self.num_passes, generator=generator).tolist() if self.shuffle_passes else None
        for pass_index in order if order is not None else range(self.num_passes):
            cases = torch.randperm(n, generator=generator).tolist() if self.shuffle else list(range(n))
            for start in range(0, self.batches_per_pass() * self.batch_size, self.batch_size):
                chunk = cases[start : start + self.batch_size]
                if chunk:
                    yield [pass_index * n + j for j in chunk]


# ------------------------------------------------------------------------------------------------- final model


class FinalModelSaver:
    """Trainer handler: when training completes, write ``weights`` (the last epoch's) to ``ckpt_dir/filename``.

    For protocols that keep the final model rather than the best by a validation metric (Myronenko 2018 trains on
    all labelled cases and keeps the model after 300 epochs). The file is what ``TrainingRun``'s best-model saver
    writes: the raw ``state_dict`` of ``weights`` (for segresnet_vae its ``SegmentationWeights``, which load strictly
    into a plain ``SegResNet``), written atomically (temporary file, fsync, rename). Written on rank 0 only, on
    ``COMPLETED`` only: a run that raises (a NaN/Inf loss, a kill) leaves no ``model.pt`` behind, while a run stopped
    early by a handler (``EarlyStopHandler``) does complete and keeps its weights of that epoch.

    Args:
        ckpt_dir: the checkpoint folder (``@ckpt_dir``).
        weights: an object with ``state_dict()``: ``@best_weights`` of the bundle.
        filename: the file name (``model.pt``, what ``inference.json`` and ``evaluate.json`` load).
        enabled: ``False`` attaches nothing (a config switch, e.g. ``"@train_on_all"``).
    """

    def __init__(
        self, ckpt_dir: str | os.PathLike, weights: Any, filename: str = "model.pt", enabled: bool = True
    ) -> None:
        self.path = Path(ckpt_dir) / filename
        self.weights = weights
        self.enabled = bool(enabled)
        self.saved_epoch: int | None = None

    def attach(self, engine: Engine) -> None:
        if self.enabled and not engine.has_event_handler(self, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not is_main_process():
            return
        state = {k: v.detach().cpu() for k, v in self.weights.state_dict().items()}
        with atomic_write(self.path, "wb") as f:
            torch.save(state, f)
        self.saved_epoch = int(engine.state.epoch)
        print(f"final model (weights after epoch {self.saved_epoch}) written to {self.path}", flush=True)


# ------------------------------------------------------------------------------------------------- case record


def _case_ids(items: Sequence[Mapping[str, Any]] | None) -> list[str]:
    return sorted({entry_case_id(item) for item in items or () if isinstance(item, Mapping)})


class StartRecord:
    """Trainer handler: when training starts, write ``self.record`` as JSON to ``self.path`` (rank 0, atomically).

    Subclasses set ``path`` and ``record``: :class:`CaseRecord` here, ``ModelSettingsRecord`` in
    :mod:`brats_pipeline.model_settings`.
    """

    path: Path
    record: dict[str, Any]

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine | None = None) -> Path:
        if is_main_process():
            write_json_atomic(self.record, self.path)
        return self.path


class CaseRecord(StartRecord):
    """Trainer handler: when training starts, write which cases it trains on and which choose the model.

    Writes ``ckpt_dir/cases.json`` (rank 0, atomically)::

        {"trained_on": [case ids], "selected_on": [case ids], "model_selection": "best val_mean_dice" | "final",
         "dataset_dir": ..., "fold": ..., "num_folds": ...}

    :func:`evaluation_plan` reads it to tell exactly which scored cases a model has seen. Only a training run writes
    it (the handler sits on the trainer, which evaluation and inference never run).

    Args:
        ckpt_dir: the checkpoint folder (``@ckpt_dir``).
        train_files: the training cases (``@train_files``).
        val_files: the validation cases whose metric chooses ``model.pt`` (``@val_files``).
        model_selection: ``"best"`` (``model.pt`` is the best epoch by the validation key metric) or ``"final"``
            (the last epoch's weights; the validation cases then choose nothing, but are still recorded as seen by
            the validation when there are any).
        extra: more entries for the file (``dataset_dir``, ``fold``, ``num_folds``, ``seed`` ...).
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        train_files: Sequence[Mapping[str, Any]],
        val_files: Sequence[Mapping[str, Any]] = (),
        model_selection: str = "best",
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if model_selection not in ("best", "final"):
            raise ValueError(f"model_selection must be 'best' or 'final', got {model_selection!r}")
        self.path = Path(ckpt_dir) / CASE_RECORD_NAME
        self.record = {
            "model_selection": "best val_mean_dice" if model_selection == "best" else "final",
            "trained_on": _case_ids(train_files),
            "selected_on": _case_ids(val_files) if model_selection == "best" else [],
            "validated_on": _case_ids(val_files),
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


# ------------------------------------------------------------------------------------------------- evaluation plan


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

    def report(self, output_dir: str | os.PathLike | None = None, print_it: bool = True) -> str:
        """Print :attr:`statement` and each warning (or log them, ``print_it=False``); with ``output_dir`` also write
        ``evaluated_cases.json`` there (statement, warnings, held_out, the scored case ids and the overlap)."""
        text = "\n".join([self.statement, *(f"WARNING: {w}" for w in self.warnings)])
        if print_it:
            print(text, flush=True)
        else:
            logger.info("%s", self.statement)
            for w in self.warnings:
                logger.warning("%s", w)
        if output_dir is not None:
            write_json_atomic(
                {
                    "split": self.split,
                    "statement": self.statement,
                    "warnings": self.warnings,
                    "held_out": self.held_out,
                    "cases": _case_ids(self.cases),
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
      ``fold`` plus the datalist's ``validation`` entries -- exactly the cases whose ``val_mean_dice`` chose
      ``models/model.pt`` during training. Always warned about: it measures the selected model on its selection set.
    - ``"validation"``: the datalist's ``validation`` entries (cases kept out of the folds with
      ``python -m brats_pipeline.datalist --num_validation N``). ``train.json`` adds them to ``val_files``, so they
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
    if split not in EVAL_SPLITS:
        raise ValueError(f"eval_split must be one of {EVAL_SPLITS}, got {split!r}")
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
            "validation": "the datalist has no 'validation' entries (python -m brats_pipeline.datalist --num_validation N)",
            "testing": "the datalist's 'testing' entries have no labels (build_datalist puts unlabelled cases there)",
            "all": "the datalist has no labelled case",
        }[split]
        raise ValueError(f"eval_split '{split}' of {name}: no case to score: {hint}. {_HOW_TO_HOLD_OUT}")

    scored = set(_case_ids(cases))
    if record is not None:
        trained = set(record.get("trained_on", []))
        selected = set(record.get("selected_on", []))
        source = "models/cases.json, written by the training run"
    elif split == "all":
        trained, selected = set(), set()
        source = "unknown: no models/cases.json next to the model"
    else:
        if train_on_all:
            trained, selected = set(_case_ids(training + validation)), set()
        else:
            selected = set(_case_ids(fold_cases + validation))
            trained = set(_case_ids(training)) - selected
        source = (
            "inferred: no models/cases.json; assumes models/model.pt was trained by train.json on this datalist "
            + ("on all labelled cases" if train_on_all else f"with fold {fold}")
        )
    in_selection = sorted(scored & selected)
    in_training = sorted((scored & trained) - selected)
    warnings: list[str] = []
    if in_selection:
        warnings.append(
            f"{len(in_selection)} of the {len(scored)} scored cases are the cases used for model selection (the "
            "validation of training chose models/model.pt by their val_mean_dice): the score is optimistic, not a "
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
