"""SIGKILL a bundle training run mid-epoch, restart it with ``--resume True``, compare with an uninterrupted run.

Runs ``python -m monai.bundle run training`` as real subprocesses on a synthetic BraTS 2023 dataset (6 cases of
32^3, 3 folds: 4 training and 2 validation cases, 4 iterations per epoch, 6 epochs). The base config is a tiny copy
of the structure of ``bundles/segresnet_vae/configs/train.json`` (same keys and handlers, MONAI SegResNet of width 4,
Dice loss, 16^3 crops); the reliability wiring is applied on top by :func:`reliability_overlay`, the same keys and
handler entries that ``train.json`` gets.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from brats_pipeline.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 6
ITERS_PER_EPOCH = 4
KILL_EPOCH = 3

#: Keys of the reliability wiring (what bundles/segresnet_vae/configs/train.json gets); see reliability_overlay.
RELIABILITY_KEYS: dict = {
    "+imports": [
        "$import brats_pipeline",
        "$import brats_pipeline.checkpointing",
        "$import brats_pipeline.training_guards",
    ],
    "resume": False,
    "check_labels": True,
    "checkpoint_dict": {
        "model": "@network",
        "optimizer": "@optimizer",
        "lr_scheduler": "@lr_scheduler",
        "trainer": "@train#trainer",
        "rng": {"_target_": "brats_pipeline.checkpointing.RNGStates", "source": "@train#dataloader"},
        "best": {
            "_target_": "brats_pipeline.checkpointing.EvaluatorBestMetric",
            "evaluator": "@validate#evaluator",
            "saver": "@validate#best_saver",
        },
        "scaler": {"_target_": "brats_pipeline.checkpointing.GradScalerState", "trainer": "@train#trainer"},
    },
    "train#checkpointing": [
        {
            "_target_": "brats_pipeline.checkpointing.ResumeFromCheckpoint",
            "ckpt_dir": "@ckpt_dir",
            "load_dict": "@checkpoint_dict",
            "enabled": "@resume",
        },
        {
            "_target_": "brats_pipeline.checkpointing.AtomicCheckpointSaver",
            "save_dir": "@ckpt_dir",
            "save_dict": "@checkpoint_dict",
            "file_prefix": "last",
            "save_interval": 1,
            "epoch_level": True,
            "n_saved": 1,
        },
    ],
    "validate#best_saver": {
        "_target_": "brats_pipeline.checkpointing.AtomicCheckpointSaver",
        "save_dir": "@ckpt_dir",
        "save_dict": {"model": "@network"},
        "save_key_metric": True,
        "key_metric_filename": "model.pt",
    },
    "run": [
        "$brats_pipeline.training_guards.check_label_files(@train_files + @val_files, @label_convention) "
        "if @check_labels else None",
        "$[h.attach(@train#trainer) for h in @train#checkpointing]",
        "$@train#trainer.run()",
    ],
}
NAN_GUARD = {"_target_": "brats_pipeline.training_guards.NonFiniteLossGuard"}


def reliability_overlay(base: dict) -> dict:
    """The wiring as an overlay of ``base``: :data:`RELIABILITY_KEYS`, plus the handler lists with every
    ``CheckpointSaver`` entry taken out (the trainer's goes to ``train#checkpointing``, attached in ``run``, because a
    save_dict holding ``@train#trainer`` inside ``train#handlers`` is a circular reference; the evaluator's becomes
    ``@validate#best_saver``) and the NaN/Inf guard added to ``train#handlers``."""

    def is_saver(h) -> bool:
        return isinstance(h, dict) and str(h.get("_target_", "")).endswith("CheckpointSaver")

    overlay = copy.deepcopy(RELIABILITY_KEYS)
    overlay["train#handlers"] = [NAN_GUARD] + [h for h in base["train"]["handlers"] if not is_saver(h)]
    overlay["validate#handlers"] = [h for h in base["validate"]["handlers"] if not is_saver(h)] + [
        "@validate#best_saver"
    ]
    return overlay


def tiny_base_config() -> dict:
    """train.json's structure at toy size (until the segresnet_vae bundle runs end to end on synthetic data)."""
    image_label = ["image", "label"]
    return {
        "imports": ["$import torch", "$import brats_pipeline", "$import brats_pipeline.datalist"],
        "bundle_root": ".",
        "ckpt_dir": "$@bundle_root + '/models'",
        "dataset_dir": None,
        "num_folds": 3,
        "fold": 0,
        "seed": 0,
        "datalist": "$brats_pipeline.datalist.build_datalist(@dataset_dir, num_folds=@num_folds, seed=@seed)",
        "label_convention": "$@datalist['label_convention']",
        "train_files": "$[c for c in @datalist['training'] if c['fold'] != @fold]",
        "val_files": "$[c for c in @datalist['training'] if c['fold'] == @fold]",
        "device": "$torch.device('cpu')",
        "epochs": EPOCHS,
        "val_interval": 1,
        "learning_rate": 0.01,
        "lr_decay_power": 0.9,
        "roi_size": [16, 16, 16],
        "network_def": {
            "_target_": "SegResNet",
            "spatial_dims": 3,
            "in_channels": 4,
            "out_channels": 3,
            "init_filters": 4,
            "norm": ["GROUP", {"num_groups": 2}],
            "blocks_down": [1, 1],
            "blocks_up": [1],
            "dropout_prob": 0.2,
        },
        "network": "$@network_def.to(@device)",
        "loss": {"_target_": "DiceLoss", "sigmoid": True},
        "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": "@learning_rate"},
        "lr_scheduler": {
            "_target_": "torch.optim.lr_scheduler.PolynomialLR",
            "optimizer": "@optimizer",
            "total_iters": "@epochs",
            "power": "@lr_decay_power",
        },
        "preprocessing_transforms": [
            {"_target_": "LoadImaged", "keys": image_label, "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": image_label},
            {"_target_": "brats_pipeline.labels.LabelToRegionsd", "keys": "label", "convention": "@label_convention"},
            {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True},
            {"_target_": "EnsureTyped", "keys": image_label, "dtype": "$torch.float32"},
        ],
        "train": {
            "random_transforms": [
                {"_target_": "RandSpatialCropd", "keys": image_label, "roi_size": "@roi_size", "random_size": False},
                {"_target_": "RandScaleIntensityd", "keys": "image", "factors": 0.1, "prob": 1.0},
                {"_target_": "RandFlipd", "keys": image_label, "prob": 0.5, "spatial_axis": 0},
            ],
            "preprocessing": {
                "_target_": "Compose",
                "transforms": "$@preprocessing_transforms + @train#random_transforms",
            },
            "dataset": {
                "_target_": "CacheDataset",
                "data": "@train_files",
                "transform": "@train#preprocessing",
                "cache_rate": 1.0,
                "num_workers": 0,
            },
            "dataloader": {
                "_target_": "DataLoader",
                "dataset": "@train#dataset",
                "batch_size": 1,
                "shuffle": True,
                "num_workers": 0,
            },
            "inferer": {"_target_": "SimpleInferer"},
            "handlers": [
                {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "print_lr": True},
                {
                    "_target_": "ValidationHandler",
                    "validator": "@validate#evaluator",
                    "epoch_level": True,
                    "interval": "@val_interval",
                },
                {
                    "_target_": "StatsHandler",
                    "tag_name": "train_loss",
                    "output_transform": "$lambda output: output['loss'].item()",
                },
            ],
            "trainer": {
                "_target_": "SupervisedTrainer",
                "max_epochs": "@epochs",
                "device": "@device",
                "train_data_loader": "@train#dataloader",
                "network": "@network",
                "loss_function": "@loss",
                "optimizer": "@optimizer",
                "inferer": "@train#inferer",
                "train_handlers": "@train#handlers",
                "decollate": False,
            },
        },
        "validate": {
            "preprocessing": {"_target_": "Compose", "transforms": "@preprocessing_transforms"},
            "dataset": {
                "_target_": "CacheDataset",
                "data": "@val_files",
                "transform": "@validate#preprocessing",
                "cache_rate": 1.0,
                "num_workers": 0,
            },
            "dataloader": {"_target_": "DataLoader", "dataset": "@validate#dataset", "batch_size": 1, "num_workers": 0},
            "inferer": {"_target_": "SimpleInferer"},
            "postprocessing": {
                "_target_": "Compose",
                "transforms": [
                    {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
                    {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
                ],
            },
            "handlers": [
                {"_target_": "StatsHandler", "iteration_log": False},
                {
                    "_target_": "CheckpointSaver",
                    "save_dir": "@ckpt_dir",
                    "save_dict": {"model": "@network"},
                    "save_key_metric": True,
                    "key_metric_filename": "model.pt",
                },
            ],
            "key_metric": {
                "val_mean_dice": {
                    "_target_": "MeanDice",
                    "include_background": True,
                    "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
                }
            },
            "evaluator": {
                "_target_": "SupervisedEvaluator",
                "device": "@device",
                "val_data_loader": "@validate#dataloader",
                "network": "@network",
                "inferer": "@validate#inferer",
                "postprocessing": "@validate#postprocessing",
                "key_val_metric": "@validate#key_metric",
                "val_handlers": "@validate#handlers",
            },
        },
        "initialize": ["$monai.utils.set_determinism(seed=@seed)"],
        "run": ["$@train#trainer.run()"],
        "training": "$@run",
        "finalize": [],
    }


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("resume_kill")
    generate_dataset(tmp / "data", num_cases=6, layout="brats2023", shape=(32, 32, 32))
    configs = tmp / "bundle" / "configs"
    configs.mkdir(parents=True)
    base = tiny_base_config()
    base["dataset_dir"] = str(tmp / "data")
    files = {"train.json": base, "reliability.json": reliability_overlay(base)}
    for name, content in files.items():
        (configs / name).write_text(json.dumps(content, indent=1))
    (configs / "logging.conf").write_text((REPO / "bundles/segresnet_vae/configs/logging.conf").read_text())
    return {"tmp": tmp, "config_files": [str(configs / "train.json"), str(configs / "reliability.json")]}


def command(bundle: dict, root: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        str(bundle["config_files"]),
        "--bundle_root",
        str(root),
        *extra,
    ]


#: one thread per run: the reference and the killed run share the CI machine's cores (and oversubscribed threads
#: make a 0.3 s epoch take 3 s); the same setting in every run keeps the runs bit-comparable
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = ENV
    return subprocess.Popen(cmd, cwd=log.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def lr_lines(log: str) -> list[str]:
    return re.findall(r"Current learning rate: (\S+)", log)


def loss_lines(log: str) -> list[tuple[int, int, str]]:
    return [
        (int(e), int(i), v) for e, i, v in re.findall(r"Epoch: (\d+)/\d+, Iter: (\d+)/\d+ -- train_loss: (\S+)", log)
    ]


def test_sigkill_mid_epoch_then_resume(bundle):
    tmp = bundle["tmp"]
    ref_root, run_root = tmp / "reference", tmp / "killed"
    ref_root.mkdir()
    run_root.mkdir()
    reference = start(command(bundle, ref_root), ref_root / "log.txt")  # uninterrupted, in parallel

    first = start(command(bundle, run_root), run_root / "log.txt")
    kill_marker = f"Epoch: {KILL_EPOCH}/{EPOCHS}, Iter: 1/{ITERS_PER_EPOCH}"
    seen: list[str] = []
    deadline = time.monotonic() + 150
    for line in first.stdout:
        seen.append(line)
        if kill_marker in line:  # epoch 2 fully saved, epoch 3 running (3 more iterations + validation to go)
            assert (run_root / "models" / f"last_checkpoint_epoch={KILL_EPOCH - 1}.pt").is_file()
            os.kill(first.pid, signal.SIGKILL)
            break
        assert time.monotonic() < deadline, "".join(seen[-30:])
    first.wait(timeout=60)
    first_log = "".join(seen)
    assert first.returncode == -signal.SIGKILL, first_log[-3000:]
    saved = sorted(p.name for p in (run_root / "models").iterdir())
    assert saved == [f"last_checkpoint_epoch={KILL_EPOCH - 1}.pt", "model.pt"], saved

    resumed = subprocess.run(
        command(bundle, run_root, "--resume", "True"),
        cwd=run_root,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    resumed_log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, resumed_log[-5000:]
    ref_out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_out[-5000:]

    # resumed at the epoch after the last checkpoint: only the killed epoch is lost
    assert f"last_checkpoint_epoch={KILL_EPOCH - 1}.pt at epoch {KILL_EPOCH - 1}" in resumed_log
    resumed_losses = loss_lines(resumed_log)
    assert resumed_losses[0][:2] == (KILL_EPOCH, 1) and resumed_losses[-1][:2] == (EPOCHS, ITERS_PER_EPOCH)
    assert "checked 6 label files against the brats2023 convention" in resumed_log  # check_labels ran first

    # LR after resuming equals the uninterrupted run's (one line per completed epoch, full float repr)
    ref_lr = lr_lines(ref_out)
    assert len(ref_lr) == EPOCHS
    assert lr_lines(resumed_log) == ref_lr[KILL_EPOCH - 1 :]
    assert lr_lines(first_log) == ref_lr[: KILL_EPOCH - 1]
    # same losses, epoch by epoch, and bit-identical final weights, best metric and model.pt
    assert resumed_losses == [x for x in loss_lines(ref_out) if x[0] >= KILL_EPOCH]
    last = f"last_checkpoint_epoch={EPOCHS}.pt"
    ref_ckpt = torch.load(ref_root / "models" / last, weights_only=True)
    run_ckpt = torch.load(run_root / "models" / last, weights_only=True)
    assert run_ckpt["trainer"]["iteration"] == EPOCHS * ITERS_PER_EPOCH
    assert run_ckpt["best"] == ref_ckpt["best"]
    assert ref_ckpt["best"]["best_metric_epoch"] >= 1
    for k, v in ref_ckpt["model"].items():
        assert torch.equal(run_ckpt["model"][k], v), k
    ref_best = torch.load(ref_root / "models" / "model.pt", weights_only=True)
    run_best = torch.load(run_root / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(run_best[k], v) for k, v in ref_best.items())
    assert sorted(p.name for p in (run_root / "models").iterdir()) == [last, "model.pt"]
