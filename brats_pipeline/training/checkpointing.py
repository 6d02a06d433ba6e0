"""Crash-safe checkpoints and resuming a killed training run where it stopped.

The bundle's trainer saves ``{prefix}_checkpoint_epoch=N.pt`` after every epoch with MONAI's
:class:`~monai.handlers.CheckpointSaver`. Three gaps of MONAI 1.6 / Ignite 0.5.5 are closed here:

* **Atomic writes.** MONAI's ``CheckpointSaver`` builds Ignite ``DiskSaver(atomic=False)``, which writes straight into
  the final file, and Ignite's ``Checkpoint`` deletes the previous file *before* it writes the new one (also for the
  fixed ``model.pt`` of the key-metric saver). A crash while saving therefore leaves no usable checkpoint.
  :class:`AtomicCheckpointSaver` (same arguments as ``CheckpointSaver``) writes to a temporary file in the same folder,
  ``fsync``\\ s it, ``os.replace``\\ s it onto the final name and only then deletes the file it supersedes.
* **What a resume needs beyond model/optimizer/scheduler/trainer:** :class:`RNGStates` (python, numpy, torch CPU and
  CUDA generators and the random states of MONAI ``Randomizable`` transforms), :class:`EvaluatorBestMetric` (the
  evaluator's ``best_metric``/``best_metric_epoch`` and the key-metric saver's record of ``model.pt``) and
  :class:`GradScalerState` (AMP loss scale). All three go into the trainer saver's ``save_dict``.
* **Finding and loading the latest file:** :func:`latest_checkpoint` and the handler :class:`ResumeFromCheckpoint`,
  which wraps MONAI's :class:`~monai.handlers.CheckpointLoader` at ``Events.STARTED``. The loader calls
  ``Engine.load_state_dict`` (iteration, epoch_length), so ``engine.state.epoch`` becomes the saved epoch and the run
  continues with the next one; ``max_epochs`` stays the one of the new run.
* **Runs that never mix:** a run that starts from scratch (no ``--resume True``, or nothing to resume from) first
  moves what an earlier run left in the checkpoint folder (``model.pt`` with ``model_settings.json`` and
  ``cases.json``, its exports, its ``last_*`` checkpoints) into ``previous/<time>/`` (:class:`ArchiveEarlierRun`),
  so nothing of that run is deleted or reported as the new run's. ``model.pt`` and the files that describe it are
  written together: the key-metric saver and :class:`FinalModelSaver` call ``before_publish`` (which writes
  ``model_settings.json`` and ``cases.json``) after the weights are in the temporary file and before it takes the
  name ``model.pt``.

What a resumed run reproduces exactly (single process, same data, same code): weights, optimizer moments, learning
rate, epoch counter, best metric, the data order (``RandomSampler`` draws its seed from the torch CPU generator) and
the random augmentation of ``num_workers=0`` loaders (transform states are restored) and of ``num_workers>0`` loaders
without ``persistent_workers`` (each epoch's worker seeds come from the torch CPU generator). Not restored: the
state of persistent DataLoader workers, cuDNN/atomic-add non-determinism on GPU, and anything that consumed random
numbers after the checkpoint was written within the same ``EPOCH_COMPLETED`` (keep the saver after
``ValidationHandler``). At most the epoch that was running when the process died is lost.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

from brats_pipeline.atomic_files import atomic_write

__all__ = [
    "is_main_process",
    "CheckpointResumeError",
    "AtomicDiskSaver",
    "AtomicCheckpointSaver",
    "RNGStates",
    "EvaluatorBestMetric",
    "GradScalerState",
    "latest_checkpoint",
    "ResumeFromCheckpoint",
    "ArchiveEarlierRun",
    "FinalModelSaver",
    "MODEL_FILES",
]

logger = logging.getLogger(__name__)


def is_main_process() -> bool:
    """``True`` outside ``torch.distributed`` and on rank 0 inside it: the process that writes files and logs."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class CheckpointResumeError(RuntimeError):
    """Resuming was requested but the latest checkpoint cannot be read or does not fit the objects to load."""


class AtomicDiskSaver(DiskSaver):
    """Ignite ``DiskSaver`` that never leaves a half-written or missing checkpoint behind.

    The checkpoint is written with :func:`brats_pipeline.atomic_files.atomic_write`: to ``.<name>.<random>.tmp`` in
    the target folder, flushed and ``fsync``\\ ed, then moved onto ``<name>`` with ``os.replace`` (atomic on POSIX and
    Windows within one file system), with the permissions ``open()`` would give. Removals that Ignite's
    ``Checkpoint`` requests *before* saving (``n_saved`` reached, or a fixed file name) are deferred until the new
    file is in place, and dropped if the save fails.

    Args:
        dirname: folder of the checkpoints (created if missing).
        filename: fixed file name used for every save and removal (MONAI's ``final_filename`` /
            ``key_metric_filename``); ``None`` keeps Ignite's generated names.
        fsync: flush file and folder to disk before returning (survives power loss, not only a killed process).
        before_publish: called once the checkpoint is complete in its temporary file and before it takes its name
            (e.g. to write the files that describe ``model.pt``); if it raises, the new file is dropped and the old
            one kept.
        kwargs: passed to ``torch.save``.
    """

    def __init__(
        self,
        dirname: str | os.PathLike,
        filename: str | None = None,
        fsync: bool = True,
        before_publish: Callable[[], Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__(dirname=dirname, atomic=True, create_dir=True, require_empty=False, **kwargs)
        self.filename = filename
        self.fsync = fsync
        self.before_publish = before_publish
        self._pending_removal: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        filename = self.filename or filename
        try:
            super().__call__(checkpoint, filename, metadata)
        except BaseException:
            self._pending_removal.clear()
            raise
        pending, self._pending_removal = self._pending_removal, []
        if idist.get_rank() != self.save_on_rank:
            return
        for old in pending:
            if old != filename:
                (self.dirname / old).unlink(missing_ok=True)

    def remove(self, filename: str) -> None:
        self._pending_removal.append(self.filename or filename)

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        with atomic_write(path, "wb", fsync=self.fsync) as f:
            func(checkpoint, f, **self.kwargs)
            if self.before_publish is not None:
                self.before_publish()


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI :class:`~monai.handlers.CheckpointSaver` whose files are written by :class:`AtomicDiskSaver`.

    Takes the arguments of ``CheckpointSaver`` (``save_dir``, ``save_dict``, ``file_prefix``, ``save_interval``,
    ``n_saved``, ``save_key_metric``, ``key_metric_filename``, ...) and produces the same file names, e.g.
    ``last_checkpoint_epoch=3.pt`` with ``file_prefix="last"`` and several objects in ``save_dict``.

    Ignite's ``n_saved`` only counts the files written by the current process. With ``prune_stale`` the interval
    checkpoints left by an earlier process in ``save_dir`` (in ``TrainingRun``: the one a resumed run started from;
    a run that starts from scratch has moved an earlier run's files away first, :class:`ArchiveEarlierRun`) and the
    temporary files of a save that was killed mid-write are deleted as soon as this run has written its own
    checkpoint, so ``n_saved`` holds across restarts and :func:`latest_checkpoint` never picks a stale file once the
    new run has saved.

    Args:
        fsync: see :class:`AtomicDiskSaver`.
        prune_stale: delete other ``{file_prefix}_{name}_{epoch|iteration}=N.pt`` files in ``save_dir`` after each
            interval save (only when ``n_saved`` is not ``None``).
        before_publish: for the fixed-name files (``key_metric_filename``, ``final_filename``): called when the
            weights are complete in the temporary file, before it takes the name (see :class:`AtomicDiskSaver`).
            ``TrainingRun`` writes ``model_settings.json`` and ``cases.json`` there, so they change with ``model.pt``.
        args, kwargs: passed to ``CheckpointSaver``.
    """

    def __init__(
        self,
        *args: Any,
        fsync: bool = True,
        prune_stale: bool = True,
        before_publish: Callable[[], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.prune_stale = prune_stale
        # MONAI 1.6 keeps its three ignite Checkpoint objects in these private attributes.
        for attr in ("_final_checkpoint", "_key_metric_checkpoint", "_interval_checkpoint"):
            checkpoint = getattr(self, attr, None)
            if checkpoint is not None:
                fixed = getattr(checkpoint.save_handler, "filename", None)
                hook = before_publish if attr != "_interval_checkpoint" else None
                checkpoint.save_handler = AtomicDiskSaver(
                    self.save_dir, filename=fixed, fsync=fsync, before_publish=hook
                )

    @property
    def key_metric_checkpoint(self):
        """The Ignite ``Checkpoint`` tracking the best key metric (``None`` unless ``save_key_metric=True``)."""
        return self._key_metric_checkpoint

    def interval_completed(self, engine: Engine) -> None:
        super().interval_completed(engine)
        checkpoint = self._interval_checkpoint
        if not self.prune_stale or checkpoint.n_saved is None or not checkpoint._saved:
            return
        if idist.get_rank() != checkpoint.save_handler.save_on_rank:
            return
        kept = {item.filename for item in checkpoint._saved}
        stem = re.escape(checkpoint._saved[-1].filename.rsplit("=", 1)[0])
        stale = re.compile(rf"^{stem}=\d+\.pt$")
        leftover = re.compile(rf"^\.{stem}=\d+\.pt\..+\.tmp$")  # temp file of a save killed mid-write
        for path in Path(self.save_dir).iterdir():
            if (stale.match(path.name) and path.name not in kept) or leftover.match(path.name):
                path.unlink(missing_ok=True)
                self.logger.info(f"Deleted superseded checkpoint file: {path}")


def _numpy_state_to_dict(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached_gaussian = state
    return {
        "name": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _numpy_state_from_dict(d: Mapping[str, Any]) -> tuple:
    keys = torch.as_tensor(d["keys"]).numpy().astype(np.uint32)
    return (d["name"], keys, int(d["pos"]), int(d["has_gauss"]), float(d["cached_gaussian"]))


def _iter_random_states(obj: Any, path: str, seen: set[int]) -> Iterator[tuple[str, np.random.RandomState]]:
    """Yield ``(path, RandomState)`` of every MONAI ``Randomizable`` reachable from a transform, in a fixed order."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _iter_random_states(item, f"{path}{i}.", seen)
        return
    state = getattr(obj, "R", None)
    if isinstance(state, np.random.RandomState):
        yield f"{path}R", state
    for key, value in vars(obj).items() if hasattr(obj, "__dict__") else ():
        if key.startswith("__") or key == "R":
            continue
        if _is_transform_like(value):
            yield from _iter_random_states(value, f"{path}{key}.", seen)


def _is_transform_like(value: Any) -> bool:
    from monai.transforms import Randomizable, Transform

    if isinstance(value, (Transform, Randomizable)):
        return True
    return isinstance(value, (list, tuple)) and any(isinstance(v, (Transform, Randomizable)) for v in value)


def _transform_of(source: Any) -> Any:
    """The transform of a DataLoader / Dataset, or ``source`` itself (never walks cached data)."""
    if isinstance(source, torch.utils.data.DataLoader):
        source = source.dataset
    if isinstance(source, torch.utils.data.Dataset):
        return getattr(source, "transform", None)
    return source


class RNGStates:
    """Stateful bundle of the random generators a training run draws from, for a checkpoint's ``save_dict``.

    ``state_dict()`` captures python ``random``, numpy's global generator, torch's CPU generator, every CUDA
    device's generator (when CUDA is initialised), the generator of ``source`` if it is a DataLoader built with
    ``generator=...``, and the ``R`` (``numpy.random.RandomState``) of every MONAI ``Randomizable`` transform
    reachable from ``source`` (nested ``Compose``/``OneOf``/croppers included). Everything is stored as tensors and
    plain python values, so ``torch.load(weights_only=True)`` (what ``CheckpointLoader`` uses) reads it.

    With ``num_workers=0`` the transforms run in the main process and their states are what makes the augmentation
    of a resumed run identical; with ``num_workers>0`` each epoch's workers are seeded from the torch CPU generator,
    which is restored as well. The states of persistent workers (``persistent_workers=True``) live in the worker
    processes and cannot be captured.

    Args:
        source: the training DataLoader, its Dataset, or a transform (e.g. ``@train#dataloader``); ``None`` to
            capture only the global generators.
        cuda: also capture and restore the CUDA generators.
    """

    def __init__(self, source: Any = None, cuda: bool = True) -> None:
        self.source = source
        self.cuda = cuda

    def transform_states(self) -> dict[str, np.random.RandomState]:
        """``{path: RandomState}`` of the transforms of ``source``; paths like ``transforms.8.cropper.R``."""
        transform = _transform_of(self.source)
        if transform is None:
            return {}
        return dict(_iter_random_states(transform, "", set()))

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss_next = random.getstate()
        state: dict[str, Any] = {
            "python": {
                "version": version,
                "internal": torch.tensor(internal, dtype=torch.int64),
                "gauss_next": gauss_next,
            },
            "numpy": _numpy_state_to_dict(np.random.get_state()),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if self.cuda and torch.cuda.is_initialized() else [],
            "transforms": {k: _numpy_state_to_dict(r.get_state()) for k, r in self.transform_states().items()},
        }
        generator = getattr(self.source, "generator", None)
        if isinstance(generator, torch.Generator):
            state["loader_generator"] = generator.get_state()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        py = state_dict["python"]
        random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
        np.random.set_state(_numpy_state_from_dict(state_dict["numpy"]))
        torch.set_rng_state(torch.as_tensor(state_dict["torch"], dtype=torch.uint8).cpu())
        cuda_states = list(state_dict.get("cuda", []))
        if self.cuda and cuda_states:
            if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_states):
                torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8).cpu() for s in cuda_states])
            else:
                logger.warning(
                    "RNGStates: checkpoint holds %d CUDA generator states but %d devices are visible; "
                    "CUDA random numbers are not restored.",
                    len(cuda_states),
                    torch.cuda.device_count() if torch.cuda.is_available() else 0,
                )
        generator = getattr(self.source, "generator", None)
        if isinstance(generator, torch.Generator) and "loader_generator" in state_dict:
            generator.set_state(torch.as_tensor(state_dict["loader_generator"], dtype=torch.uint8).cpu())
        saved = dict(state_dict.get("transforms", {}))
        current = self.transform_states()
        for key, rs in current.items():
            if key in saved:
                rs.set_state(_numpy_state_from_dict(saved.pop(key)))
        missing = sorted(set(current) - set(state_dict.get("transforms", {})))
        if missing or saved:
            logger.warning(
                "RNGStates: the training transform differs from the checkpoint's (not in checkpoint: %s; "
                "not in transform: %s); those random states were not restored.",
                missing,
                sorted(saved),
            )


class EvaluatorBestMetric:
    """Stateful view of an evaluator's best key metric, for the trainer checkpoint's ``save_dict`` (key ``"best"``).

    Restores ``evaluator.state.best_metric`` and ``best_metric_epoch`` and, when ``saver`` is given, the key-metric
    saver's record of the file it wrote (priority and name). Without that record a resumed run would overwrite
    ``model.pt`` at its first validation even with a worse score.

    Args:
        evaluator: the MONAI ``SupervisedEvaluator`` run by ``ValidationHandler``.
        saver: the evaluator's ``CheckpointSaver(save_key_metric=True, ...)`` that writes ``model.pt``.
    """

    def __init__(self, evaluator: Engine, saver: CheckpointSaver | None = None) -> None:
        self.evaluator = evaluator
        self.saver = saver
        if saver is not None and getattr(saver, "_key_metric_checkpoint", None) is None:
            raise ValueError("EvaluatorBestMetric: `saver` must be a CheckpointSaver with save_key_metric=True.")

    def state_dict(self) -> dict[str, Any]:
        state = self.evaluator.state
        out: dict[str, Any] = {
            "best_metric": float(getattr(state, "best_metric", -1)),
            "best_metric_epoch": int(getattr(state, "best_metric_epoch", -1)),
        }
        if self.saver is not None:
            saved = self.saver._key_metric_checkpoint.state_dict()["_saved"]
            out["saver_saved"] = [[float(p), str(f)] for p, f in saved]
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.evaluator.state.best_metric = float(state_dict["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state_dict["best_metric_epoch"])
        if self.saver is not None and "saver_saved" in state_dict:
            self.saver.load_state_dict({"_saved": [(p, f) for p, f in state_dict["saver_saved"]]})


class GradScalerState:
    """Stateful view of a MONAI trainer's AMP ``GradScaler`` (empty when the trainer runs without AMP).

    Putting ``trainer.scaler`` in a ``save_dict`` directly fails when ``amp=False`` (it is ``None``); this adapter
    works in both cases, so one config serves CPU and GPU.
    """

    def __init__(self, trainer: Engine) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        scaler = getattr(self.trainer, "scaler", None)
        return dict(scaler.state_dict()) if scaler is not None else {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        scaler = getattr(self.trainer, "scaler", None)
        if scaler is not None and state_dict:
            scaler.load_state_dict(dict(state_dict))


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "last", score_name: str = "epoch") -> str | None:
    """Path of the newest ``{prefix}_{name}_{score_name}=N.pt`` in ``ckpt_dir`` (largest ``N``), or ``None``.

    ``name`` is ``checkpoint`` when the saver's ``save_dict`` has several objects (MONAI's file names look like
    ``last_checkpoint_epoch=3.pt``), else the single key. Temporary files of an interrupted save and
    ``save_final`` files (``..._final_iteration=N.pt``) are ignored.
    """
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    head = f"{re.escape(prefix)}_" if prefix else ""
    pattern = re.compile(rf"^{head}[^=]+(?<!_final)_{re.escape(score_name)}=(\d+)\.pt$")
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_file() and (m := pattern.match(p.name))]
    if not found:
        return None
    return str(max(found, key=lambda item: (item[0], item[1].stat().st_mtime))[1])


class ResumeFromCheckpoint:
    """Handler: at ``Events.STARTED`` load the latest ``{prefix}_..._epoch=N.pt`` of ``ckpt_dir`` into ``load_dict``.

    Wraps MONAI's :class:`~monai.handlers.CheckpointLoader` (``torch.load(weights_only=True)`` +
    ``Checkpoint.load_objects``); a ``"trainer"`` entry restores the epoch and iteration counters, so the run continues
    at epoch ``N + 1`` and keeps the ``max_epochs`` it was started with. Attach it to the trainer (e.g. as the first
    entry of ``train#handlers``).

    Args:
        ckpt_dir: folder of the checkpoints.
        load_dict: the objects to restore, normally the trainer saver's ``save_dict``.
        enabled: resume switch (config key ``resume``); ``False`` makes the handler a no-op.
        prefix: ``file_prefix`` of the trainer's saver.
        score_name: ``"epoch"`` for an epoch-level saver, ``"iteration"`` for an iteration-level one.
        map_location: ``torch.load`` ``map_location``; ``"cpu"`` reads GPU checkpoints anywhere (``load_state_dict``
            moves the values onto the model's and optimizer's devices).
        strict: require the checkpoint to hold exactly the keys of every object in ``load_dict``.
        name: logger name, ``engine.logger`` if ``None``.
        warn_unused: with ``enabled=False``, warn that a checkpoint in ``ckpt_dir`` is not resumed from
            (``TrainingRun`` says instead where :class:`ArchiveEarlierRun` moved it).

    Raises:
        CheckpointResumeError: at ``STARTED``, when the latest checkpoint cannot be read or loaded.
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        load_dict: Mapping[str, Any],
        enabled: bool = True,
        prefix: str = "last",
        score_name: str = "epoch",
        map_location: Any = "cpu",
        strict: bool = True,
        name: str | None = None,
        warn_unused: bool = True,
    ) -> None:
        if not load_dict:
            raise ValueError("ResumeFromCheckpoint needs a non-empty load_dict.")
        self.warn_unused = warn_unused
        self.ckpt_dir = str(ckpt_dir)
        self.load_dict = dict(load_dict)
        self.enabled = bool(enabled)
        self.prefix = prefix
        self.score_name = score_name
        self.map_location = map_location
        self.strict = strict
        self._name = name
        self.logger = logging.getLogger(name)
        self.loaded_path: str | None = None

    def attach(self, engine: Engine) -> None:
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        path = latest_checkpoint(self.ckpt_dir, self.prefix, self.score_name)
        if not self.enabled:
            if path is not None and self.warn_unused:
                self.logger.warning(
                    f"Not resuming (resume=False): training starts from scratch although {path} exists; the "
                    "checkpoint saver replaces it with this run's checkpoints."
                )
            return
        if path is None:
            self.logger.info(
                f"Resume requested but no '{self.prefix}' checkpoint ({self.score_name}-level) in {self.ckpt_dir}: "
                "starting from scratch."
            )
            return
        loader = CheckpointLoader(
            load_path=path,
            load_dict=self.load_dict,
            name=self._name,
            map_location=self.map_location,
            strict=self.strict,
        )
        loader.logger = self.logger
        try:
            loader(engine)
        except Exception as e:
            raise CheckpointResumeError(
                f"cannot resume from {path}: {type(e).__name__}: {e}. Delete or move the file to resume from an "
                "older checkpoint, or start without resuming (resume=False)."
            ) from e
        self.loaded_path = path
        self.logger.info(f"Resumed from {path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}.")


class FinalModelSaver:
    """Trainer handler: when training completes, write ``weights`` (the last epoch's) to ``ckpt_dir/filename``.

    For protocols that keep the final model rather than the best by a validation metric (Myronenko 2018 trains on
    all labelled cases and keeps the model after 300 epochs). The file is what ``TrainingRun``'s best-model saver
    writes: the raw ``state_dict`` of ``weights`` (for segresnet_vae its ``SegmentationWeights``, which load strictly
    into a plain ``SegResNet``), written atomically (temporary file, fsync, rename). Written on rank 0 only, on
    ``COMPLETED`` only: a run that raises (a NaN/Inf loss, a kill, Ctrl-C) writes no ``model.pt``, while a run
    stopped early by a handler (``EarlyStopHandler``) does complete and keeps its weights of that epoch.

    Args:
        ckpt_dir: the checkpoint folder (``@ckpt_dir``).
        weights: an object with ``state_dict()``: ``@best_weights`` of the bundle.
        filename: the file name (``model.pt``, what ``inference.json`` and ``evaluate.json`` load).
        enabled: ``False`` attaches nothing (a config switch, e.g. ``"@train_on_all"``).
        before_publish: called when the weights are complete in the temporary file, before it takes the name
            (``TrainingRun`` writes ``model_settings.json`` and ``cases.json`` there); if it raises, no ``model.pt``.
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        weights: Any,
        filename: str = "model.pt",
        enabled: bool = True,
        before_publish: Callable[[], Any] | None = None,
    ) -> None:
        self.path = Path(ckpt_dir) / filename
        self.weights = weights
        self.enabled = bool(enabled)
        self.before_publish = before_publish
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
            if self.before_publish is not None:
                self.before_publish()
        self.saved_epoch = int(engine.state.epoch)
        print(f"final model (weights after epoch {self.saved_epoch}) written to {self.path}", flush=True)


#: the files that make up a trained model in the checkpoint folder: the weights, what they were trained with and on,
#: and the exports made from them (``ckpt_export`` / ``onnx_export``); an earlier run's are moved together
MODEL_FILES = ("model.pt", "model_settings.json", "cases.json", "model.ts", "model.onnx")


class ArchiveEarlierRun:
    """Trainer handler (rank 0, ``Events.STARTED``, after :class:`ResumeFromCheckpoint`): a run that starts from
    scratch first moves what an earlier run left in ``ckpt_dir`` into ``ckpt_dir/previous/<time>/``, with one log
    line.

    Moved together: :data:`MODEL_FILES` (``model.pt`` with its ``model_settings.json`` and ``cases.json``, so the
    three never describe two runs) and the earlier run's ``{prefix}_*.pt`` checkpoints. ``<time>`` is when the
    earlier run last wrote one of them (``YYYYmmdd-HHMMSS``). Nothing is deleted: ``previous/`` is the user's to
    clean. A resumed run (``resume`` loaded a checkpoint) moves nothing: the files are its own.

    Without this, a fresh run that never validates (``val_interval`` > ``epochs``) would leave the earlier run's
    ``model.pt`` in place under this run's name, with this run's settings next to it.

    Args:
        ckpt_dir: the checkpoint folder (``@ckpt_dir``).
        resume: the run's :class:`ResumeFromCheckpoint` (nothing is moved once it has loaded a checkpoint), or
            ``None``.
        prefix: ``file_prefix`` of the trainer's checkpoint saver.
        names: the model files to move with the checkpoints.
        folder: the sub-folder of ``ckpt_dir`` that receives them.
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        resume: ResumeFromCheckpoint | None = None,
        prefix: str = "last",
        names: Sequence[str] = MODEL_FILES,
        folder: str = "previous",
    ) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.resume = resume
        self.prefix = prefix
        self.names = tuple(names)
        self.folder = folder
        self.started = False
        #: where this run moved the earlier run's files (``None``: nothing to move, or resumed)
        self.moved_to: Path | None = None
        self.moved: list[str] = []

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self)

    def earlier_files(self) -> list[Path]:
        """The files an earlier run left in ``ckpt_dir`` (model files first, then its checkpoints)."""
        if not self.ckpt_dir.is_dir():
            return []
        checkpoint = re.compile(rf"^{re.escape(self.prefix)}_.+\.pt$")
        found = [self.ckpt_dir / n for n in self.names if (self.ckpt_dir / n).is_file()]
        found += sorted(p for p in self.ckpt_dir.iterdir() if p.is_file() and checkpoint.match(p.name))
        return found

    def __call__(self, engine: Engine) -> None:
        self.started = True
        if not is_main_process() or (self.resume is not None and self.resume.loaded_path is not None):
            return
        files = self.earlier_files()
        if not files:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(max(p.stat().st_mtime for p in files)))
        target = self.ckpt_dir / self.folder / stamp
        n = 1
        while target.exists():
            n += 1
            target = self.ckpt_dir / self.folder / f"{stamp}-{n}"
        target.mkdir(parents=True)
        for path in files:
            os.replace(path, target / path.name)
        self.moved_to, self.moved = target, [p.name for p in files]
        engine.logger.warning(
            f"This run starts from scratch: the earlier run's {', '.join(self.moved)} moved to {target} "
            "(--resume True continues a run instead of starting a new one)"
        )
