"""Checks that stop a training run early and loudly instead of silently producing a broken model.

* :class:`NonFiniteLossGuard` stops a MONAI trainer at the first NaN/Inf loss (before ``backward()``) or gradient
  (before ``optimizer.step()``), so the weights in memory and the last epoch checkpoint are still the last good ones.
* :func:`check_label_files` reads every label file once before training and rejects values outside the label
  convention (e.g. BraTS 2023's ET = 3 under ``brats2018``), instead of failing hours later in a worker; one error
  lists every bad file.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents
from tqdm import tqdm

from brats_pipeline.transforms.labels import LabelConvention, LabelConventionError, check_label_values, distinct_values

__all__ = ["NonFiniteLossError", "NonFiniteLossGuard", "batch_case_names", "label_values", "check_label_files"]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; training stopped before the optimizer step."""


def batch_case_names(batch: Any, keys: Sequence[str] = ("case_id", "image", "label")) -> list[str]:
    """Names of the cases in a collated batch, from the first of ``keys`` that provides any.

    A key provides names as plain strings (the datalist's ``case_id``), as the ``filename_or_obj`` meta data of a
    ``MetaTensor`` (the first file of a multi-file image) or through ``{key}_meta_dict``. Returns ``[]`` when the
    batch carries no names.
    """
    if not isinstance(batch, Mapping):
        return []
    for key in keys:
        value = batch.get(key)
        found: Any = None
        if isinstance(value, MetaTensor):
            found = value.meta.get("filename_or_obj")
        elif isinstance(batch.get(f"{key}_meta_dict"), Mapping):
            found = batch[f"{key}_meta_dict"].get("filename_or_obj")
        elif isinstance(value, (str, os.PathLike)) or (
            isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, os.PathLike)) for v in value)
        ):
            found = value
        if found:
            return [str(item) for item in (found if isinstance(found, (list, tuple)) else [found])]
    return []


class NonFiniteLossGuard:
    """Handler: raise :class:`NonFiniteLossError` when a MONAI trainer's loss (or gradient) is NaN or Inf.

    Attached to ``IterationEvents.LOSS_COMPLETED``, which ``SupervisedTrainer`` fires right after the loss and before
    ``backward()``/``optimizer.step()``: the bad batch never reaches the weights. A finite loss can still give
    non-finite gradients (e.g. an Inf voxel in the input saturates the sigmoid of a Dice loss), so with
    ``check_grads`` the gradients are checked too, at ``IterationEvents.BACKWARD_COMPLETED``, which is also before
    ``optimizer.step()``. With AMP the gradient check is skipped: inf gradients are routine there and ``GradScaler``
    already skips those steps.

    The exception goes through Ignite's ``EXCEPTION_RAISED`` (MONAI's ``StatsHandler`` logs it and re-raises), so
    ``trainer.run()`` and the bundle command fail with a non-zero exit status. Epoch-level ``CheckpointSaver``\\ s only
    save at ``EPOCH_COMPLETED``, so the last ``last_checkpoint_epoch=N.pt`` and ``model.pt`` stay untouched; a saver
    with ``save_final=True`` would write the (still finite) weights of the current iteration as
    ``..._final_iteration=K.pt``, which resuming ignores.

    Note:
        Ignite does not re-raise an exception when any ``EXCEPTION_RAISED`` handler is attached; keep a handler that
        re-raises (MONAI ``StatsHandler``) or none, or the run ends "successfully" after the guard fired.

    Args:
        loss_key: key of the loss in ``engine.state.output``.
        name_keys: batch keys naming the cases in the error message (see :func:`batch_case_names`).
        check_grads: also stop on non-finite gradients (non-AMP runs only).
    """

    def __init__(
        self, loss_key: str = "loss", name_keys: Sequence[str] = ("case_id", "image", "label"), check_grads: bool = True
    ) -> None:
        self.loss_key = loss_key
        self.name_keys = tuple(name_keys)
        self.check_grads = check_grads

    def attach(self, engine: Engine) -> None:
        if not engine.has_registered_events(IterationEvents.LOSS_COMPLETED):
            raise ValueError(
                "NonFiniteLossGuard needs an engine that fires IterationEvents.LOSS_COMPLETED (a MONAI trainer)."
            )
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)
        if self.check_grads:
            engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.check_gradients)

    def _where(self, engine: Engine) -> str:
        state = engine.state
        in_epoch = ""
        if state.epoch_length:
            in_epoch = f" ({(state.iteration - 1) % state.epoch_length + 1}/{state.epoch_length} of the epoch)"
        names = batch_case_names(state.batch, self.name_keys)
        cases = f"; cases in the batch: {', '.join(names)}" if names else ""
        return f"at epoch {state.epoch}, iteration {state.iteration}{in_epoch}{cases}"

    def __call__(self, engine: Engine) -> None:
        loss_t = torch.as_tensor(engine.state.output[self.loss_key])
        if bool(torch.isfinite(loss_t).all()):
            return
        value = loss_t.detach().float().cpu()
        shown = f"{value.item():g}" if value.numel() == 1 else str(value.tolist())
        raise NonFiniteLossError(
            f"non-finite training loss {shown} {self._where(engine)}. "
            "Training stopped before the optimizer step; the last checkpoint holds the last good weights."
        )

    def check_gradients(self, engine: Engine) -> None:
        """``BACKWARD_COMPLETED`` callback: raise if any gradient of ``engine.network`` is NaN or Inf (non-AMP)."""
        if getattr(engine, "amp", False) and getattr(engine, "scaler", None) is not None:
            return
        named = [(n, p.grad) for n, p in engine.network.named_parameters() if p.grad is not None]
        if not named or bool(torch.stack([g.isfinite().all() for _, g in named]).all()):
            return
        bad = [n for n, g in named if not bool(g.isfinite().all())]
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        loss = float(torch.as_tensor(engine.state.output[self.loss_key]).detach())
        raise NonFiniteLossError(
            f"non-finite gradients of {shown} (loss {loss:g}) "
            f"{self._where(engine)}. Training stopped before the optimizer step; the last checkpoint holds the last "
            "good weights."
        )


def label_values(path: str | os.PathLike) -> np.ndarray:
    """Sorted distinct voxel values of a NIfTI label file, read unscaled in its stored dtype
    (:func:`brats_pipeline.transforms.labels.distinct_values`)."""
    return distinct_values(np.asanyarray(nib.load(str(path)).dataobj))


def _label_paths(items: Iterable[Any], label_key: str, base_dir: str | os.PathLike | None) -> list[str]:
    paths = []
    for item in items:
        path = item.get(label_key) if isinstance(item, Mapping) else item
        if path is None:
            continue
        if isinstance(path, (list, tuple)):
            raise TypeError(f"expected one label file per case, got {path!r}")
        path = Path(path)
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        paths.append(str(path))
    return paths


def check_label_files(
    items: Iterable[Mapping[str, Any] | str | os.PathLike],
    convention: str | LabelConvention,
    label_key: str = "label",
    base_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> None:
    """Check every label file's values against ``convention`` before training starts.

    Args:
        items: datalist entries (dicts; entries without ``label_key`` are skipped) or label file paths.
        convention: ``"brats2018"``, ``"brats2023"``, ``"msd"`` or a :class:`~brats_pipeline.transforms.labels.LabelConvention`.
        label_key: key of the label path in each entry.
        base_dir: folder that relative paths are relative to.
        num_workers: threads reading files in parallel (gzip inflation releases the GIL); 0 reads in this thread.
        progress: show a tqdm progress bar.

    Raises:
        LabelConventionError: naming the file holding values outside the convention; when several files do, one
            error lists every one of them (the first file's error type: a value no convention has is corrupt).
        FileNotFoundError: a label file is missing.
    """
    paths = _label_paths(items, label_key, base_dir)
    logger = logging.getLogger(__name__)
    bar = tqdm(
        total=len(paths), desc="checking label files", unit="file", disable=not progress or not sys.stderr.isatty()
    )
    errors: list[LabelConventionError] = []

    def check(path: str, values: np.ndarray) -> None:
        try:
            check_label_values(values, convention, source=path)
        except LabelConventionError as e:
            errors.append(e)
        bar.update()

    try:
        if num_workers > 0:
            pool = ThreadPoolExecutor(num_workers)
            try:
                for path, values in zip(paths, pool.map(label_values, paths), strict=True):
                    check(path, values)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            for path in paths:
                check(path, label_values(path))
    finally:
        bar.close()
    if len(errors) == 1:
        raise errors[0]
    if errors:
        lines = [f"{len(errors)} label files hold values outside the convention; fix or remove them:"]
        raise type(errors[0])("\n".join(lines + [f"  - {e}" for e in errors]), source=errors[0].source)
    logger.info("checked %d label files against the %s convention", len(paths), getattr(convention, "name", convention))
