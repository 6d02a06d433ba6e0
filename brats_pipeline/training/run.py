"""The training guarantees both bundles share, wired once: ``train.json`` names :class:`TrainingRun` and calls ``run()``.

A bundle's ``train.json`` builds what differs by paper (network, loss, transforms, optimizer, LR schedule) and the
two MONAI engines: a ``SupervisedTrainer`` whose ``train_handlers`` are the paper's own (LR schedule, validation,
anything an overlay adds under ``train#handlers#<id>``) and a ``SupervisedEvaluator`` with ``validate#handlers#<id>``.
:class:`TrainingRun` then adds, identically for every bundle, everything a run must guarantee:

=========================  ===============================================================  ===============
guarantee                  how                                                              ranks (DDP)
=========================  ===============================================================  ===============
label pre-check            :func:`~brats_pipeline.training.guards.check_label_files`        0
non-finite loss/gradients  :class:`~brats_pipeline.training.guards.NonFiniteLossGuard`      all
resume (``--resume True``) :class:`~brats_pipeline.training.checkpointing.ResumeFromCheckpoint`      all
Ctrl-C is no error         :class:`~brats_pipeline.bundle.command_line.InterruptGuard` on   all
                           both engines; one line (:meth:`TrainingRun.interrupt_message`)
runs never mix             :class:`~brats_pipeline.training.checkpointing.ArchiveEarlierRun`   0
                           (a run from scratch moves an earlier run's files to
                           ``previous/<time>/``)
atomic last checkpoint     :class:`~brats_pipeline.training.checkpointing.AtomicCheckpointSaver`     0
  with RNG/best/AMP state  :class:`RNGStates`, :class:`EvaluatorBestMetric`,                0
                           :class:`GradScalerState` in the saved dict
atomic ``model.pt``        best key metric: ``AtomicCheckpointSaver(save_key_metric=True)``  0
                           on the evaluator; ``keep_model="final"``: :class:`FinalModelSaver`
record of the cases        :class:`~brats_pipeline.training.records.CaseRecord`             0
                           (``models/cases.json``), written with ``model.pt``
how the model was built    :class:`~brats_pipeline.bundle.settings.ModelSettingsRecord`       0
                           (``models/model_settings.json``, from ``settings``), written
                           with ``model.pt``
loss and metric logs       MONAI ``StatsHandler`` on both engines                           0
TensorBoard                MONAI ``TensorBoardStatsHandler`` (``tensorboard=False``: off)   0
progress bar               Ignite ``ProgressBar`` (``progress=False``: off)                 0
end-of-run summary         :meth:`TrainingRun.summary` (the model this run wrote, or none)  0
=========================  ===============================================================  ===============

Everything is attached in :meth:`TrainingRun.attach`, after the engines' own handlers, so the last checkpoint is
written after ``ValidationHandler`` and ``LrScheduleHandler`` have run for the epoch (what a resume needs).
Determinism (``set_determinism``) stays in each config's ``initialize``, where it runs before any network or
transform is built.

``model.pt``, ``model_settings.json`` and ``cases.json`` are one unit: the two records are written each time
``model.pt`` is (the best-metric save, or :class:`FinalModelSaver` at the end), just before the weights take their
name, never when training starts. A run from scratch first moves an earlier run's unit and checkpoints to
``models/previous/<time>/``; a run that then ends without validating (``val_interval`` > ``epochs``) writes none of
the three, and its summary says so instead of naming a file it did not write. :meth:`TrainingRun.evaluate_model`
runs a held-out evaluator only on a model this run wrote.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.handlers import StatsHandler, TensorBoardStatsHandler
from monai.utils import look_up_option

from brats_pipeline.bundle.command_line import InterruptGuard, check_output_folders, report_interrupts_with
from brats_pipeline.bundle.settings import ModelSettingsRecord
from brats_pipeline.training.checkpointing import (
    ArchiveEarlierRun,
    AtomicCheckpointSaver,
    EvaluatorBestMetric,
    FinalModelSaver,
    GradScalerState,
    ResumeFromCheckpoint,
    RNGStates,
    is_main_process,
    latest_checkpoint,
)
from brats_pipeline.training.guards import NonFiniteLossGuard, check_label_files
from brats_pipeline.training.records import CaseRecord

__all__ = ["TrainingRun", "parameter_groups"]

logger = logging.getLogger(__name__)


def _loss_value(output: Mapping[str, Any]) -> float:
    return float(output["loss"].item())


def parameter_groups(network: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: ``weight_decay`` on the convolution kernels (5-D tensors), none on biases
    and normalisation weights, the usual rule (Myronenko 2018's L2 of 1e-5 on the weights)::

        "optimizer": {"_target_": "torch.optim.Adam", "lr": "@learning_rate", "params": {
            "_target_": "brats_pipeline.training.run.parameter_groups", "network": "@network",
            "weight_decay": "@weight_decay"}}
    """
    params = list(network.parameters())
    return [
        {"params": [p for p in params if p.ndim == 5], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim != 5], "weight_decay": 0.0},
    ]


class TrainingRun:
    """Attach the shared training guarantees to a bundle's trainer and evaluator, then train.

    Args:
        trainer: the bundle's ``SupervisedTrainer`` (``train#trainer``).
        evaluator: the validation ``SupervisedEvaluator`` (``validate#evaluator``), run by the trainer's
            ``ValidationHandler``; its key metric chooses ``model.pt``.
        network: the trained module (``@network``, possibly DDP-wrapped).
        optimizer: its optimizer.
        lr_scheduler: its LR scheduler (stepped by the paper's ``LrScheduleHandler``).
        ckpt_dir: folder of ``last_checkpoint_epoch=N.pt``, ``model.pt``, ``model_settings.json`` and ``cases.json``;
            a run that does not resume first moves an earlier run's files to ``ckpt_dir/previous/<time>/``
            (:class:`~brats_pipeline.training.checkpointing.ArchiveEarlierRun`).
        log_dir: TensorBoard folder.
        best_weights: what ``model.pt`` holds (an object with ``state_dict``/``load_state_dict``), e.g.
            segresnet_vae's ``SegmentationWeights`` view; ``None`` saves ``network`` itself.
        keep_model: ``"best"``: ``model.pt`` is the epoch with the best validation key metric (a run that never
            validates writes none); ``"final"``: the weights after the last epoch (the papers' protocol when training
            on all labelled cases).
        train_items, val_items: the training and validation cases, recorded in ``models/cases.json`` each time
            ``model.pt`` is written (which cases trained and which chose the model; ``evaluate.json`` reads it to say
            whether its score is held out).
        record_extra: more entries for ``models/cases.json`` (dataset folder, fold, seed ...).
        resume: continue from the latest ``last`` checkpoint in ``ckpt_dir`` (config key ``resume``).
        check_labels: check every label file's values before training (config key ``check_labels``).
        label_items: datalist entries whose ``label`` files are checked; ``None``: ``train_items`` + ``val_items``.
        label_convention: the dataset's label convention (``brats2018``, ``brats2023``, ...).
        loss: the loss module; when it has ``last_terms`` (a ``{name: float}`` of its terms), each term is logged to
            TensorBoard as ``loss_<name>`` per iteration.
        tensorboard: write TensorBoard event files.
        progress: show a progress bar per epoch.
        save_interval: epochs between two ``last`` checkpoints.
        settings: what the model needs to be rebuilt (network arguments, width, crop, normalisation, label
            convention, ``include_rc``; the channel order is added), written to ``models/model_settings.json`` each
            time ``model.pt`` is written; ``inference.json`` and ``evaluate.json`` read it
            (:mod:`brats_pipeline.bundle.settings`). ``None``: no file.
        val_interval: epochs between two validations (config key ``val_interval``), only to say why a run that
            never validated wrote no model.
    """

    def __init__(
        self,
        trainer: Engine,
        evaluator: Engine,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        ckpt_dir: str | os.PathLike,
        log_dir: str | os.PathLike,
        best_weights: Any = None,
        keep_model: str = "best",
        train_items: Iterable[Mapping[str, Any]] | None = None,
        val_items: Iterable[Mapping[str, Any]] = (),
        record_extra: Mapping[str, Any] | None = None,
        resume: bool = False,
        check_labels: bool = True,
        label_items: Iterable[Mapping[str, Any]] | None = None,
        label_convention: str | None = None,
        loss: Any = None,
        tensorboard: bool = True,
        progress: bool = True,
        save_interval: int = 1,
        settings: Mapping[str, Any] | None = None,
        val_interval: int | None = None,
    ) -> None:
        for name, value in (("resume", resume), ("check_labels", check_labels), ("tensorboard", tensorboard)):
            if not isinstance(value, bool):
                raise TypeError(f"'{name}' must be true or false, got {value!r} ({type(value).__name__}).")
        train_items = None if train_items is None else list(train_items)
        val_items = list(val_items or ())
        self.trainer = trainer
        self.evaluator = evaluator
        #: the validation metric that chooses model.pt (the evaluator's key metric)
        self.key_metric = getattr(evaluator.state, "key_metric_name", None) or "val_mean_dice"
        self.network = network
        self.ckpt_dir = str(ckpt_dir)
        self.log_dir = str(log_dir)
        self.check_labels = check_labels
        self.label_items = list(label_items) if label_items is not None else [*(train_items or ()), *val_items]
        self.label_convention = label_convention
        self.loss = loss
        self.tensorboard = tensorboard
        self.progress = progress
        self.main = is_main_process()
        self.keep_model = look_up_option(keep_model, ("best", "final"))
        self.has_validation = bool(val_items)
        self.val_interval = val_interval
        self.save_interval = save_interval
        weights = network if best_weights is None else best_weights
        self.case_record = (
            CaseRecord(self.ckpt_dir, train_items, val_items, keep_model, record_extra, self.key_metric)
            if train_items is not None
            else None
        )
        self.settings_record = ModelSettingsRecord(self.ckpt_dir, settings) if settings is not None else None
        self.final_model = FinalModelSaver(
            self.ckpt_dir, weights, enabled=keep_model == "final", before_publish=self.write_model_records
        )
        self.best_checkpoint = AtomicCheckpointSaver(
            save_dir=self.ckpt_dir,
            save_dict={"model": weights},
            save_key_metric=True,
            key_metric_filename="model.pt",
            before_publish=self.write_model_records,
        )
        self.checkpoint_dict: dict[str, Any] = {
            "model": network,
            "optimizer": optimizer,
            "lr_scheduler": lr_scheduler,
            "trainer": trainer,
            "rng": RNGStates(source=trainer.data_loader),
            "best": EvaluatorBestMetric(evaluator, self.best_checkpoint),
            "scaler": GradScalerState(trainer),
        }
        self.last_checkpoint = AtomicCheckpointSaver(
            save_dir=self.ckpt_dir,
            save_dict=self.checkpoint_dict,
            file_prefix="last",
            save_interval=save_interval,
            epoch_level=True,
            n_saved=1,
        )
        self.resume_from_checkpoint = ResumeFromCheckpoint(
            ckpt_dir=self.ckpt_dir, load_dict=self.checkpoint_dict, enabled=resume, warn_unused=False
        )
        self.archive = ArchiveEarlierRun(self.ckpt_dir, resume=self.resume_from_checkpoint)
        self.interrupt_guard = InterruptGuard()
        self._attached = False
        self._phase = "built"  # then "labels", "training", "finished"
        self.best_metrics: dict[str, float] = {}
        #: the trainer's epoch when this process last wrote ``model.pt`` (``None``: it wrote none)
        self.model_written_epoch: int | None = None

    def write_model_records(self) -> None:
        """Write ``model_settings.json`` and ``cases.json`` (rank 0): called by the savers of ``model.pt`` with the
        weights complete in their temporary file, just before it takes the name ``model.pt``."""
        for record in (self.settings_record, self.case_record):
            if record is not None:
                record()
        self.model_written_epoch = int(self.trainer.state.epoch)

    def handlers(self) -> dict[str, list[Callable[[Engine], Any]]]:
        """``{"trainer": [...], "evaluator": [...]}``: the handlers :meth:`attach` adds on this rank, in order."""
        trainer: list[Any] = [NonFiniteLossGuard(), self.resume_from_checkpoint, self.interrupt_guard]
        evaluator: list[Any] = [self.interrupt_guard]
        if self.main:
            trainer += [self.archive, StatsHandler(tag_name="train_loss", output_transform=_loss_value)]
            evaluator += [StatsHandler(iteration_log=False)]
            if self.tensorboard:
                trainer += [
                    TensorBoardStatsHandler(log_dir=self.log_dir, tag_name="train_loss", output_transform=_loss_value)
                ]
                if hasattr(self.loss, "last_terms"):
                    trainer += [
                        TensorBoardStatsHandler(
                            log_dir=self.log_dir,
                            iteration_log=True,
                            epoch_log=False,
                            output_transform=lambda _: {f"loss_{k}": v for k, v in self.loss.last_terms.items()},
                        )
                    ]
                evaluator += [TensorBoardStatsHandler(log_dir=self.log_dir, iteration_log=False)]
            if self.progress:
                trainer += [ProgressBar(persist=True)]
            trainer += [self.last_checkpoint]
            if self.keep_model == "final":
                trainer += [self.final_model]
            else:
                evaluator += [self.best_checkpoint]
            evaluator += [_RecordBestMetrics(self)]
        return {"trainer": trainer, "evaluator": evaluator}

    def attach(self) -> None:
        """Attach :meth:`handlers` to the two engines (once)."""
        if self._attached:
            return
        for engine_name, handlers in self.handlers().items():
            engine = getattr(self, engine_name)
            for handler in handlers:
                handler.attach(engine)
        self._attached = True

    def check_label_files(self) -> None:
        """The label pre-check (rank 0; the other ranks wait at the first collective and fail with it)."""
        if self.check_labels and self.main and self.label_items:
            check_label_files(self.label_items, self.label_convention, progress=self.progress)

    def run(self) -> dict[str, Any]:
        """Check the output folders and the labels, attach the guarantees, train, and print and return
        :meth:`summary`. A Ctrl-C prints :meth:`interrupt_message` (through the bundle's error handler)."""
        report_interrupts_with(self.interrupt_message)
        check_output_folders([self.ckpt_dir, self.log_dir if self.tensorboard else None])
        self._phase = "labels"
        self.check_label_files()
        self.attach()
        self._phase = "training"
        self.trainer.run()
        self._phase = "finished"
        summary = self.summary()
        if self.main:
            print(self.format_summary(summary), flush=True)
        return summary

    def model_file(self) -> str | None:
        """``ckpt_dir/model.pt`` when this run wrote it (or, resumed, the run it continues), else ``None``: a file of
        another run is never reported as this run's."""
        path = os.path.join(self.ckpt_dir, "model.pt")
        if not os.path.isfile(path):
            return None
        if self.model_written_epoch is not None:
            return path
        resumed = self.resume_from_checkpoint.loaded_path is not None
        if resumed and self.keep_model == "best" and int(getattr(self.evaluator.state, "best_metric_epoch", -1)) > 0:
            return path  # written by the run this one continues, at its best epoch
        return None

    def summary(self) -> dict[str, Any]:
        """Best key metric, its epoch and all validation metrics of that epoch, and where this run's model and logs
        are (``model`` is ``None`` when this run wrote none: ``no_model`` then says why).

        The metrics of the best epoch are those seen by this process: after a resume, until the first new best,
        only the best value and its epoch (from the checkpoint) are known.
        """
        state = self.evaluator.state
        model = self.model_file()
        epochs_run = int(self.trainer.state.epoch)
        return {
            "epochs_run": epochs_run,
            "best_metric": float(getattr(state, "best_metric", -1)),
            "best_metric_epoch": int(getattr(state, "best_metric_epoch", -1)),
            "best_metrics": dict(self.best_metrics),
            "model": model,
            "no_model": None if model else self._no_model_reason(epochs_run),
            "keep_model": self.keep_model,
            "earlier_run_moved_to": None if self.archive.moved_to is None else str(self.archive.moved_to),
            "log_dir": self.log_dir if self.tensorboard else None,
        }

    def _no_model_reason(self, epochs_run: int) -> str:
        if self.keep_model == "final":
            return "training did not complete"
        if not self.has_validation:
            return "no validation cases choose a model (--keep_model final keeps the last epoch's weights)"
        if int(getattr(self.evaluator.state, "best_metric_epoch", -1)) <= 0:
            if self.val_interval is not None and self.val_interval > epochs_run:
                return (
                    f"it never validated (val_interval {self.val_interval}, {epochs_run} epoch(s)): lower "
                    "--val_interval or raise --epochs"
                )
            return "it never validated"
        return "model.pt is missing"

    @staticmethod
    def format_summary(summary: Mapping[str, Any]) -> str:
        """Human-readable lines of :meth:`summary`."""
        lines = [f"training finished after epoch {summary['epochs_run']}"]
        if summary["best_metric_epoch"] > 0:
            lines.append(f"  best key metric  {summary['best_metric']:.4f} at epoch {summary['best_metric_epoch']}")
        for name, value in sorted(summary["best_metrics"].items()):
            lines.append(f"    {name:<14} {value:.4f}")
        which = "final model" if summary.get("keep_model") == "final" else "best model "
        model = summary["model"] or f"none written by this run; {summary.get('no_model') or 'no validation ran'}"
        lines.append(f"  {which}      {model}")
        if summary.get("earlier_run_moved_to"):
            lines.append(f"  earlier run      moved to {summary['earlier_run_moved_to']}")
        if summary["log_dir"]:
            lines.append(f"  TensorBoard      {summary['log_dir']}")
        return "\n".join(lines)

    def evaluate_model(self, evaluator: Engine, report: Callable[[Engine], Any] | None = None) -> Any:
        """Run ``evaluator`` (e.g. a held-out evaluator that loads ``models/model.pt``) only on a model this run
        wrote, then ``report(evaluator)``; otherwise print one line saying why it is skipped and return ``None``.

        For a config's ``training`` list after ``$@run`` (the quickstart's held-out score)::

            "training": ["$@run", "$@training_run.evaluate_model(@holdout#evaluator, @holdout#report)"]
        """
        model = self.model_file()
        if model is None:
            if self.main:
                reason = self._no_model_reason(int(self.trainer.state.epoch))
                print(f"held-out evaluation skipped: no model written by this run; {reason}", flush=True)
            return None
        self.interrupt_guard.attach(evaluator)
        evaluator.run()
        return report(evaluator) if report is not None else evaluator.state.metrics

    def interrupt_message(self) -> str:
        """The line a Ctrl-C prints (:func:`~brats_pipeline.bundle.command_line.install_error_handler`): what was
        finished, what was not, and how to go on."""
        state = self.trainer.state
        if self._phase in ("built", "labels"):
            return "interrupted before training started (checking the labels); rerun the same command to start it"
        if self._phase == "finished":
            model = self.model_file()
            return f"interrupted after training finished (epoch {state.epoch}); " + (
                f"its model is {model}" if model else "it wrote no model"
            )
        where = f"interrupted at epoch {state.epoch} (iteration {state.iteration})"
        path = latest_checkpoint(self.ckpt_dir) if self.archive.started or not self.main else None
        if path is None:
            return (
                f"{where}; no checkpoint written yet (one every {self.save_interval} epoch(s)); rerun the same "
                "command to start again"
            )
        epoch = Path(path).stem.rsplit("=", 1)[-1]
        return f"{where}; last checkpoint: {path} (epoch {epoch}); resume with --resume True"


class _RecordBestMetrics:
    """Evaluator handler: keep a copy of all metrics of the validation that set a new best key metric."""

    def __init__(self, run: TrainingRun) -> None:
        self.run = run

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        state = engine.state
        if getattr(state, "best_metric_epoch", -1) == state.epoch:
            self.run.best_metrics = {k: float(v) for k, v in state.metrics.items() if isinstance(v, (int, float))}
