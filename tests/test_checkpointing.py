"""Crash-safe checkpoints and exact resume on tiny MONAI engines with the shipped TrainingRun wiring attached."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import CheckpointSaver, LrScheduleHandler, MeanDice, ValidationHandler, from_engine
from monai.losses import DiceLoss
from monai.transforms import Compose, RandFlipd, RandScaleIntensityd, RandSpatialCropd
from monai.utils import set_determinism

from brats_pipeline.training import checkpointing
from brats_pipeline.training.checkpointing import (
    AtomicCheckpointSaver,
    CheckpointResumeError,
    EvaluatorBestMetric,
    GradScalerState,
    ResumeFromCheckpoint,
    RNGStates,
    latest_checkpoint,
)
from brats_pipeline.training.run import TrainingRun

EPOCHS = 4


class SimulatedCrash(RuntimeError):
    pass


def build_run(
    ckpt_dir: Path,
    resume: bool = False,
    with_rng: bool = True,
    saver_cls=AtomicCheckpointSaver,
    val_interval: int = 1,
    epochs: int = EPOCHS,
    **run_args,
) -> dict:
    """Tiny engines (16^3 random volumes) with the shipped :class:`TrainingRun` guarantees attached.

    ``with_rng=False`` or another ``saver_cls`` build the counterfactual wiring by hand, to show what each piece of
    the shipped wiring prevents. ``run_args`` go to ``TrainingRun`` (``settings``, ``train_items``, ...).
    """
    set_determinism(seed=0)  # what the bundle's `initialize` does, in every (re)started process
    g = torch.Generator().manual_seed(1234)
    data = [
        {
            "image": torch.rand(4, 16, 16, 16, generator=g),
            "label": (torch.rand(3, 16, 16, 16, generator=g) > 0.6).float(),
        }
        for _ in range(4)
    ]
    train_tf = Compose(
        [
            RandSpatialCropd(["image", "label"], roi_size=(12, 12, 12), random_size=False),
            RandScaleIntensityd("image", factors=0.1, prob=1.0),
            RandFlipd(["image", "label"], prob=0.5, spatial_axis=0),
        ]
    )
    loader = DataLoader(Dataset(data, train_tf), batch_size=2, shuffle=True, num_workers=0)
    net = torch.nn.Sequential(torch.nn.Conv3d(4, 4, 3, padding=1), torch.nn.Dropout(0.2), torch.nn.Conv3d(4, 3, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=epochs, power=0.9)
    evaluator = SupervisedEvaluator(
        device="cpu",
        val_data_loader=DataLoader(Dataset(data[:2]), batch_size=1),
        network=net,
        postprocessing=lambda x: x,
        key_val_metric={"val_mean_dice": MeanDice(output_transform=from_engine(["pred", "label"]))},
    )
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=loader,
        network=net,
        optimizer=opt,
        loss_function=DiceLoss(sigmoid=True),
        decollate=False,
    )
    if with_rng and saver_cls is AtomicCheckpointSaver:
        # the shipped wiring: what both bundles' train.json attach through TrainingRun
        trainer_handlers = [
            LrScheduleHandler(sched, print_lr=False),
            ValidationHandler(validator=evaluator, interval=val_interval),
        ]
        for h in trainer_handlers:
            h.attach(trainer)
        training_run = TrainingRun(
            trainer=trainer,
            evaluator=evaluator,
            network=net,
            optimizer=opt,
            lr_scheduler=sched,
            ckpt_dir=ckpt_dir,
            log_dir=ckpt_dir / "logs",
            resume=resume,
            check_labels=False,
            tensorboard=False,
            progress=False,
            val_interval=val_interval,
            **run_args,
        )
        training_run.attach()
        resume_handler = training_run.resume_from_checkpoint
    else:
        # counterfactuals: the same handlers without RNG state, or with MONAI's non-atomic saver
        best_saver = saver_cls(
            save_dir=str(ckpt_dir), save_dict={"model": net}, save_key_metric=True, key_metric_filename="model.pt"
        )
        best_saver.attach(evaluator)
        save_dict = {"model": net, "optimizer": opt, "lr_scheduler": sched, "trainer": trainer}
        save_dict["best"] = EvaluatorBestMetric(evaluator, best_saver)
        if with_rng:
            save_dict["rng"] = RNGStates(loader)
        resume_handler = ResumeFromCheckpoint(str(ckpt_dir), save_dict, enabled=resume)
        handlers = [
            resume_handler,
            LrScheduleHandler(sched, print_lr=False),
            ValidationHandler(validator=evaluator, interval=1, epoch_level=True),
            saver_cls(
                save_dir=str(ckpt_dir),
                save_dict=save_dict,
                file_prefix="last",
                save_interval=1,
                epoch_level=True,
                n_saved=1,
            ),
        ]
        for h in handlers:
            h.attach(trainer)
    log = {"lr": {}, "loss": [], "start_epoch": None}
    trainer.add_event_handler(Events.STARTED, lambda e: log.update(start_epoch=e.state.epoch + 1))
    trainer.add_event_handler(
        Events.EPOCH_STARTED, lambda e: log["lr"].update({e.state.epoch: opt.param_groups[0]["lr"]})
    )
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: log["loss"].append((e.state.iteration, e.state.output["loss"].item()))
    )
    run = {"trainer": trainer, "evaluator": evaluator, "net": net, "log": log, "resume": resume_handler}
    if with_rng and saver_cls is AtomicCheckpointSaver:
        run["training_run"] = training_run
    return run


def crash_at(run: dict, epoch: int, iteration_in_epoch: int = 1) -> None:
    def _crash(engine: Engine) -> None:
        if (
            engine.state.epoch == epoch
            and (engine.state.iteration - 1) % engine.state.epoch_length + 1 == iteration_in_epoch
        ):
            raise SimulatedCrash(f"simulated crash in epoch {epoch}")

    run["trainer"].add_event_handler(Events.ITERATION_COMPLETED, _crash)


def ckpt_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("uninterrupted")
    run = build_run(folder)
    run["trainer"].run()
    run["weights"] = {k: v.clone() for k, v in run["net"].state_dict().items()}
    run["folder"] = folder
    return run


def test_file_names_and_latest(uninterrupted):
    # n_saved=1 keeps exactly one "last" checkpoint; the key-metric saver writes the fixed model.pt; no temp files
    assert ckpt_files(uninterrupted["folder"]) == [f"last_checkpoint_epoch={EPOCHS}.pt", "model.pt"]
    assert latest_checkpoint(uninterrupted["folder"]) == str(
        uninterrupted["folder"] / f"last_checkpoint_epoch={EPOCHS}.pt"
    )
    ckpt = torch.load(latest_checkpoint(uninterrupted["folder"]), weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "lr_scheduler", "trainer", "best", "rng", "scaler"}
    assert ckpt["trainer"]["iteration"] == EPOCHS * 2 and ckpt["trainer"]["epoch_length"] == 2
    assert ckpt["best"]["best_metric"] == pytest.approx(uninterrupted["evaluator"].state.best_metric)
    assert set(ckpt["rng"]["transforms"]) == {
        "R",
        "transforms.0.R",
        "transforms.0.cropper.R",
        "transforms.1.R",
        "transforms.1.scaler.R",
        "transforms.2.R",
    }


def test_latest_checkpoint_ordering(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for name in [
        "last_checkpoint_epoch=9.pt",
        "last_checkpoint_epoch=10.pt",  # numeric, not lexicographic order
        "last_checkpoint_final_iteration=99.pt",  # save_final file: never resumed from
        ".last_checkpoint_epoch=11.pt.x1y2.tmp",  # leftover of a save killed mid-write
        "model.pt",
        "other_checkpoint_epoch=50.pt",
    ]:
        (tmp_path / name).write_bytes(b"x")
    assert Path(latest_checkpoint(tmp_path)).name == "last_checkpoint_epoch=10.pt"
    assert Path(latest_checkpoint(tmp_path, prefix="other")).name == "other_checkpoint_epoch=50.pt"
    assert latest_checkpoint(tmp_path, score_name="iteration") is None


def test_crash_and_resume_is_exact(tmp_path, uninterrupted):
    first = build_run(tmp_path)
    crash_at(first, epoch=3, iteration_in_epoch=2)  # dies in epoch 3, after epoch 2's checkpoint
    with pytest.raises(SimulatedCrash):
        first["trainer"].run()
    assert ckpt_files(tmp_path) == ["last_checkpoint_epoch=2.pt", "model.pt"]

    leftover = tmp_path / ".last_checkpoint_epoch=3.pt.k1ll3d.tmp"  # what a SIGKILL during torch.save leaves
    leftover.write_bytes(b"partial")
    # "new process": other global RNG states, then the same construction (set_determinism) + resume
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    resumed = build_run(tmp_path, resume=True)
    resumed["trainer"].run()
    ref = uninterrupted["log"]

    assert resumed["resume"].loaded_path == str(tmp_path / "last_checkpoint_epoch=2.pt")
    assert resumed["log"]["start_epoch"] == 3  # at most the interrupted epoch is lost
    assert resumed["trainer"].state.epoch == EPOCHS
    assert resumed["log"]["lr"] == {e: ref["lr"][e] for e in (3, 4)}  # LR curve continues unchanged
    assert resumed["log"]["loss"] == [x for x in ref["loss"] if x[0] > 4]  # same data order, augmentation, dropout
    for k, v in resumed["net"].state_dict().items():
        assert torch.equal(v, uninterrupted["weights"][k]), k
    ev, ref_ev = resumed["evaluator"].state, uninterrupted["evaluator"].state
    assert (ev.best_metric, ev.best_metric_epoch) == (ref_ev.best_metric, ref_ev.best_metric_epoch)
    assert torch.equal(
        torch.load(tmp_path / "model.pt", weights_only=True)["0.weight"],
        torch.load(uninterrupted["folder"] / "model.pt", weights_only=True)["0.weight"],
    )
    # n_saved=1 across the restart: the file the run resumed from was pruned once epoch 3 was saved
    assert ckpt_files(tmp_path) == [f"last_checkpoint_epoch={EPOCHS}.pt", "model.pt"]


def test_resume_without_rng_states_diverges(tmp_path, uninterrupted):
    """Control: model/optimizer/scheduler alone do not reproduce the run; the RNG states are what makes it exact."""
    first = build_run(tmp_path, with_rng=False)
    crash_at(first, epoch=3)
    with pytest.raises(SimulatedCrash):
        first["trainer"].run()
    resumed = build_run(tmp_path, resume=True, with_rng=False)
    resumed["trainer"].run()
    assert resumed["log"]["start_epoch"] == 3
    assert resumed["log"]["lr"] == {e: uninterrupted["log"]["lr"][e] for e in (3, 4)}
    assert resumed["log"]["loss"] != [x for x in uninterrupted["log"]["loss"] if x[0] > 4]


def test_resume_switch_and_missing_checkpoint(tmp_path, caplog):
    run = build_run(tmp_path, resume=True)  # nothing to resume from: log line, train from epoch 1
    crash_at(run, epoch=2)
    with caplog.at_level("INFO"), pytest.raises(SimulatedCrash):
        run["trainer"].run()
    assert run["log"]["start_epoch"] == 1 and run["resume"].loaded_path is None
    assert "no 'last' checkpoint" in caplog.text and "starting from scratch" in caplog.text

    # resume=False with an earlier run's files: they are moved, together, to previous/<time>/ before anything is
    # written, never deleted; the run starts at epoch 1
    stale = tmp_path / "last_checkpoint_epoch=9.pt"
    (tmp_path / "last_checkpoint_epoch=1.pt").rename(stale)
    (tmp_path / "model.pt").write_bytes(b"earlier model")
    (tmp_path / "model_settings.json").write_text('{"network_width": 16}')
    (tmp_path / "cases.json").write_text('{"trained_on": ["x"]}')
    stale_bytes = stale.read_bytes()
    fresh = build_run(tmp_path, resume=False)
    crash_at(fresh, epoch=1)
    with caplog.at_level("WARNING"), pytest.raises(SimulatedCrash):
        fresh["trainer"].run()
    assert fresh["log"]["start_epoch"] == 1 and fresh["resume"].loaded_path is None
    (previous,) = (tmp_path / "previous").iterdir()
    assert ckpt_files(tmp_path) == ["previous"]
    assert ckpt_files(previous) == ["cases.json", "last_checkpoint_epoch=9.pt", "model.pt", "model_settings.json"]
    assert (previous / "last_checkpoint_epoch=9.pt").read_bytes() == stale_bytes
    assert (previous / "model.pt").read_bytes() == b"earlier model"
    assert f"moved to {previous}" in caplog.text and "Not resuming (resume=False)" not in caplog.text
    fresh = build_run(tmp_path, resume=False)
    crash_at(fresh, epoch=2)
    with pytest.raises(SimulatedCrash):
        fresh["trainer"].run()
    assert ckpt_files(tmp_path) == ["last_checkpoint_epoch=1.pt", "model.pt", "previous"]
    assert len(list((tmp_path / "previous").iterdir())) == 1  # the crashed run had written nothing to move


#: what TrainingRun records next to model.pt in these tests: the width of the first convolution, and two cases
SETTINGS = {"network_width": 4}
CASES = {"train_items": [{"case_id": "a"}, {"case_id": "b"}], "val_items": [{"case_id": "c"}]}


def earlier_run(folder: Path, width: int = 16) -> None:
    """What another run left: a model.pt of another width, its settings and cases, its last checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(torch.nn.Conv3d(4, width, 3).state_dict(), folder / "model.pt")
    (folder / "model_settings.json").write_text(json.dumps({"network_width": width}))
    (folder / "cases.json").write_text(json.dumps({"trained_on": ["old"]}))
    torch.save({"trainer": {"epoch": 30}}, folder / "last_checkpoint_epoch=30.pt")


def test_model_settings_and_cases_are_written_with_model_pt(tmp_path, monkeypatch):
    """Not when training starts: a run that dies before its first validation leaves none of the three; the records
    are in place before model.pt takes its name, and describe this run."""
    run = build_run(tmp_path, settings=SETTINGS, **CASES)
    crash_at(run, epoch=1, iteration_in_epoch=2)  # training started, no validation yet
    with pytest.raises(SimulatedCrash):
        run["trainer"].run()
    assert ckpt_files(tmp_path) == []

    seen_at_publish = []
    real_publish = checkpointing.atomic_write

    def spy(path, *args, **kwargs):  # what exists when model.pt is about to take its name
        if Path(path).name == "model.pt":
            seen_at_publish.append(ckpt_files(tmp_path))
        return real_publish(path, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "atomic_write", spy)
    run = build_run(tmp_path, settings=SETTINGS, **CASES)
    crash_at(run, epoch=2, iteration_in_epoch=1)  # epoch 1 validated and saved
    with pytest.raises(SimulatedCrash):
        run["trainer"].run()
    assert ckpt_files(tmp_path) == ["cases.json", "last_checkpoint_epoch=1.pt", "model.pt", "model_settings.json"]
    assert seen_at_publish == [[]]  # the records are written inside model.pt's save, before it is published
    assert json.loads((tmp_path / "model_settings.json").read_text())["network_width"] == 4
    cases = json.loads((tmp_path / "cases.json").read_text())
    assert cases["trained_on"] == ["a", "b"] and cases["selected_on"] == ["c"]
    assert run["training_run"].model_written_epoch == 1


def test_run_that_never_validates_reports_no_model(tmp_path, capsys, caplog):
    """epochs < val_interval after an earlier run: the earlier model.pt, its settings, cases and checkpoint move
    together to previous/<time>/ (nothing deleted), nothing is written under "best", and neither the summary nor a
    held-out evaluation presents the earlier model as this run's."""
    earlier_run(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    run = build_run(tmp_path, val_interval=10, epochs=2, settings=SETTINGS, **CASES)
    with caplog.at_level("WARNING"):
        summary = run["training_run"].run()
    out = capsys.readouterr().out
    (previous,) = (tmp_path / "previous").iterdir()
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before  # moved as they were, together
    assert ckpt_files(tmp_path) == ["last_checkpoint_epoch=2.pt", "previous"]
    assert f"moved to {previous}" in caplog.text
    assert summary["model"] is None and summary["earlier_run_moved_to"] == str(previous)
    assert "best model       none written by this run; it never validated (val_interval 10, 2 epoch(s))" in out
    assert str(tmp_path / "model.pt") not in out

    holdout, ran = run["evaluator"], []  # stands for a held-out evaluator that loads model.pt
    holdout.add_event_handler(Events.STARTED, lambda e: ran.append(1))
    assert run["training_run"].evaluate_model(holdout, lambda e: ran.append("report")) is None
    assert ran == [] and "held-out evaluation skipped: no model written by this run" in capsys.readouterr().out

    # the next run that validates writes its own three files, which agree with each other
    run = build_run(tmp_path, val_interval=1, epochs=1, settings=SETTINGS, **CASES)
    summary = run["training_run"].run()
    assert summary["model"] == str(tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    width = json.loads((tmp_path / "model_settings.json").read_text())["network_width"]
    assert state["0.weight"].shape[0] == width == 4
    assert json.loads((tmp_path / "cases.json").read_text())["trained_on"] == ["a", "b"]
    holdout = run["evaluator"]
    holdout.add_event_handler(Events.STARTED, lambda e: ran.append(1))
    assert run["training_run"].evaluate_model(holdout, lambda e: "scored") == "scored" and ran == [1]
    assert len(list((tmp_path / "previous").iterdir())) == 2  # the never-validated run's checkpoint moved too


def test_resumed_run_keeps_its_files_and_reports_its_model(tmp_path):
    run = build_run(tmp_path, settings=SETTINGS, **CASES)
    crash_at(run, epoch=2, iteration_in_epoch=2)
    with pytest.raises(SimulatedCrash):
        run["trainer"].run()
    resumed = build_run(tmp_path, resume=True, settings=SETTINGS, **CASES)
    summary = resumed["training_run"].run()
    assert not (tmp_path / "previous").exists()
    assert summary["model"] == str(tmp_path / "model.pt")
    assert resumed["training_run"].model_file() == str(tmp_path / "model.pt")


def test_interrupt_message_names_the_last_checkpoint(tmp_path):
    run = build_run(tmp_path)
    training_run = run["training_run"]
    assert training_run.interrupt_message().startswith("interrupted before training started")
    messages = []

    def interrupt(engine):
        if engine.state.epoch == 3 and engine.state.iteration == 5:
            messages.append(training_run.interrupt_message())
            raise KeyboardInterrupt

    run["trainer"].add_event_handler(Events.ITERATION_COMPLETED, interrupt)
    training_run._phase = "training"
    with pytest.raises(KeyboardInterrupt):
        run["trainer"].run()
    assert messages == [
        f"interrupted at epoch 3 (iteration 5); last checkpoint: {tmp_path / 'last_checkpoint_epoch=2.pt'} "
        "(epoch 2); resume with --resume True"
    ]


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "last_checkpoint_epoch=3.pt").write_bytes(b"PK\x03\x04 truncated")
    run = build_run(tmp_path, resume=True)
    with pytest.raises(CheckpointResumeError, match=r"cannot resume from .*last_checkpoint_epoch=3\.pt"):
        run["trainer"].run()


def test_checkpoint_from_other_model_is_a_clear_error(tmp_path):
    torch.save({"model": {"weight": torch.zeros(1)}}, tmp_path / "last_checkpoint_epoch=1.pt")
    run = build_run(tmp_path, resume=True)
    with pytest.raises(CheckpointResumeError, match="resume=False"):
        run["trainer"].run()


def _failing_save_after(real_save, should_fail):
    """torch.save replacement: writes half of the serialised bytes, then fails like a full disk or a kill."""

    def save(obj, f, *args, **kwargs):
        if not should_fail(obj):
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        if isinstance(f, (str, Path)):
            Path(f).write_bytes(data[: len(data) // 2])
        else:
            f.write(data[: len(data) // 2])
            f.flush()
        raise OSError("simulated: no space left on device")

    return save


def _is_epoch_checkpoint(epoch):
    return lambda obj: isinstance(obj, dict) and "trainer" in obj and obj["trainer"]["iteration"] == 2 * epoch


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save
    monkeypatch.setattr(torch, "save", _failing_save_after(real_save, _is_epoch_checkpoint(3)))
    run = build_run(tmp_path)
    with pytest.raises(OSError, match="simulated"):
        run["trainer"].run()
    monkeypatch.setattr(torch, "save", real_save)
    # previous checkpoint still there, complete and loadable; the half-written temp file was removed
    assert ckpt_files(tmp_path) == ["last_checkpoint_epoch=2.pt", "model.pt"]
    ckpt = torch.load(tmp_path / "last_checkpoint_epoch=2.pt", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 4
    resumed = build_run(tmp_path, resume=True)
    resumed["trainer"].run()
    assert resumed["log"]["start_epoch"] == 3 and resumed["trainer"].state.epoch == EPOCHS


def test_monai_checkpoint_saver_is_not_atomic(tmp_path, monkeypatch):
    """Documents why AtomicCheckpointSaver exists: MONAI 1.6's saver (DiskSaver(atomic=False), remove-then-write)
    loses the previous checkpoint when a save fails. If this test starts failing, MONAI/Ignite fixed it upstream."""
    monkeypatch.setattr(torch, "save", _failing_save_after(torch.save, _is_epoch_checkpoint(3)))
    run = build_run(tmp_path, saver_cls=CheckpointSaver)
    with pytest.raises(OSError, match="simulated"):
        run["trainer"].run()
    assert "last_checkpoint_epoch=2.pt" not in ckpt_files(tmp_path)
    with pytest.raises(Exception):  # noqa: B017 - only the truncated file is left
        torch.load(tmp_path / "last_checkpoint_epoch=3.pt", weights_only=True)


def _metric_engine(saver, metrics: list[float]) -> Engine:
    engine = Engine(lambda e, b: None)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(dice=metrics[e.state.epoch - 1]))
    saver.attach(engine)
    return engine


def test_failed_save_keeps_best_model(tmp_path, monkeypatch):
    """Fixed-name model.pt: Ignite removes it before writing the better one; the atomic saver defers the removal."""
    weight = torch.nn.Parameter(torch.zeros(2))
    saver = AtomicCheckpointSaver(
        str(tmp_path),
        {"model": torch.nn.ParameterList([weight])},
        save_key_metric=True,
        key_metric_name="dice",
        key_metric_filename="model.pt",
    )
    engine = _metric_engine(saver, [0.5, 0.7])

    def bump(_):
        with torch.no_grad():
            weight.add_(1.0)

    engine.add_event_handler(Events.EPOCH_STARTED, bump)
    monkeypatch.setattr(torch, "save", _failing_save_after(torch.save, lambda obj: float(obj["0"][0]) == 2.0))
    with pytest.raises(OSError, match="simulated"):
        engine.run([0], max_epochs=2)
    assert ckpt_files(tmp_path) == ["model.pt"]
    assert torch.load(tmp_path / "model.pt", weights_only=True)["0"].tolist() == [1.0, 1.0]


def test_best_model_not_overwritten_by_worse_after_resume(tmp_path):
    net = torch.nn.Linear(1, 1)
    saver = AtomicCheckpointSaver(
        str(tmp_path), {"model": net}, save_key_metric=True, key_metric_name="dice", key_metric_filename="model.pt"
    )
    engine = _metric_engine(saver, [0.8, 0.9])
    engine.state.best_metric, engine.state.best_metric_epoch = -1, -1
    engine.run([0], max_epochs=2)
    engine.state.best_metric, engine.state.best_metric_epoch = 0.9, 2
    state = EvaluatorBestMetric(engine, saver).state_dict()
    assert state["saver_saved"] == [[0.9, "model_key_metric=0.9000.pt"]]
    before = (tmp_path / "model.pt").read_bytes()

    # resumed process: fresh saver and evaluator state; the next validation scores worse (0.6)
    with torch.no_grad():
        net.weight.fill_(123.0)
    saver2 = AtomicCheckpointSaver(
        str(tmp_path), {"model": net}, save_key_metric=True, key_metric_name="dice", key_metric_filename="model.pt"
    )
    engine2 = _metric_engine(saver2, [0.6])
    EvaluatorBestMetric(engine2, saver2).load_state_dict(state)
    assert (engine2.state.best_metric, engine2.state.best_metric_epoch) == (0.9, 2)
    engine2.run([0], max_epochs=1)
    assert (tmp_path / "model.pt").read_bytes() == before

    saver3 = AtomicCheckpointSaver(
        str(tmp_path), {"model": net}, save_key_metric=True, key_metric_name="dice", key_metric_filename="model.pt"
    )
    _metric_engine(saver3, [0.6]).run([0], max_epochs=1)  # control: without the restored record it is overwritten
    assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"].item() == 123.0


def test_rng_states_round_trip(tmp_path):
    tf = Compose([RandSpatialCropd("image", roi_size=(4, 4, 4), random_size=False), RandFlipd("image", prob=0.5)])
    tf.set_random_state(seed=7)
    loader = DataLoader(
        Dataset([{"image": torch.rand(1, 8, 8, 8)}], tf), generator=torch.Generator().manual_seed(3), shuffle=True
    )
    rng = RNGStates(loader)
    torch.save(rng.state_dict(), tmp_path / "rng.pt")

    def draw():
        return (
            random.random(),
            float(np.random.rand()),
            torch.rand(3).tolist(),
            torch.rand(2, generator=loader.generator).tolist(),
            [float(t.R.rand()) for t in tf.transforms],
            float(tf.transforms[0].cropper.R.rand()),
        )

    first = draw()
    assert draw() != first
    rng.load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draw() == first


def test_rng_states_warns_on_changed_transform(caplog):
    state = RNGStates(Compose([RandFlipd("image", prob=0.5)])).state_dict()
    with caplog.at_level("WARNING"):
        RNGStates(Compose([RandFlipd("image", prob=0.5), RandFlipd("image", prob=0.5)])).load_state_dict(state)
    assert "transforms.1.R" in caplog.text


def test_grad_scaler_state_without_amp(uninterrupted):
    adapter = GradScalerState(uninterrupted["trainer"])
    assert adapter.state_dict() == {}
    adapter.load_state_dict({})
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    holder = type("T", (), {"scaler": scaler})()
    state = GradScalerState(holder).state_dict()
    assert state["scale"] == 8.0
    scaler2 = torch.amp.GradScaler("cpu", init_scale=1.0)
    GradScalerState(type("T", (), {"scaler": scaler2})()).load_state_dict(state)
    assert scaler2.get_scale() == 8.0
