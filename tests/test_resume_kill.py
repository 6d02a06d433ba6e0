"""SIGKILL a segresnet_vae bundle training run mid-epoch, restart it with ``--resume True``, compare with an
uninterrupted run.

Runs ``python -m monai.bundle run training`` on ``bundles/segresnet_vae/configs/train.json`` as real subprocesses on
a synthetic BraTS 2023 dataset (4 cases of 32^3, 2 folds: 2 training and 2 validation cases, 2 iterations per epoch,
4 epochs, killed in epoch 3, width 8, 16^3 crops). The reliability wiring (resume, atomic checkpoints, RNG and
best-metric state, NaN guard, label check) is applied as an overlay by :func:`reliability_overlay`, so the test does
not depend on it being wired into ``train.json`` yet; applied to a ``train.json`` that already has it, the overlay
changes nothing.
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
BUNDLE_CONFIG = REPO / "bundles" / "segresnet_vae" / "configs" / "train.json"
EPOCHS = 4
ITERS_PER_EPOCH = 2
KILL_EPOCH = 3

ATOMIC_SAVER = "brats_pipeline.checkpointing.AtomicCheckpointSaver"
NAN_GUARD = "brats_pipeline.training_guards.NonFiniteLossGuard"
#: New keys of the reliability wiring of train.json; reliability_overlay adds the edits of existing entries.
RELIABILITY_KEYS: dict = {
    "resume": False,
    "check_labels": True,
    "train#resume_from_checkpoint": {
        "_target_": "brats_pipeline.checkpointing.ResumeFromCheckpoint",
        "ckpt_dir": "@ckpt_dir",
        "load_dict": "@train#checkpoint_dict",
        "enabled": "@resume",
    },
    "label_check": {
        "_target_": "brats_pipeline.training_guards.check_label_files",
        "_mode_": "callable",
        "items": "$@train_files + @val_files",
        "convention": "@label_convention",
    },
    "run": [
        "$@label_check() if @check_labels else None",
        "$@train#resume_from_checkpoint.attach(@train#trainer)",
        "$@train#last_checkpoint.attach(@train#trainer)",
        "$@train#trainer.run()",
    ],
}
#: What the trainer checkpoint holds besides model, optimizer, lr_scheduler and trainer.
EXTRA_STATE: dict = {
    "rng": {"_target_": "brats_pipeline.checkpointing.RNGStates", "source": "@train#dataloader"},
    "best": {
        "_target_": "brats_pipeline.checkpointing.EvaluatorBestMetric",
        "evaluator": "@validate#evaluator",
        "saver": "@validate#best_checkpoint",
    },
    "scaler": {"_target_": "brats_pipeline.checkpointing.GradScalerState", "trainer": "@train#trainer"},
}


def reliability_overlay(base: dict) -> dict:
    """The reliability wiring as an overlay of ``base`` (train.json), following its current savers:

    * :data:`RELIABILITY_KEYS`;
    * ``train#checkpoint_dict`` = the ``save_dict`` of ``train#last_checkpoint`` + :data:`EXTRA_STATE`, and
      ``train#last_checkpoint`` itself as an ``AtomicCheckpointSaver`` saving ``@train#checkpoint_dict``;
    * ``validate#best_checkpoint`` = the evaluator's ``CheckpointSaver`` entry as an ``AtomicCheckpointSaver``,
      referenced from ``validate#handlers`` in its place;
    * the NaN/Inf guard first in ``train#handlers``.

    Parts that ``base`` already has are left as they are.
    """

    def is_saver(h) -> bool:
        return isinstance(h, dict) and str(h.get("_target_", "")).endswith("CheckpointSaver")

    overlay = copy.deepcopy(RELIABILITY_KEYS)
    train, validate = base["train"], base["validate"]
    if "checkpoint_dict" not in train:
        overlay["train#checkpoint_dict"] = {**train["last_checkpoint"]["save_dict"], **EXTRA_STATE}
        overlay["train#last_checkpoint"] = {
            **train["last_checkpoint"],
            "_target_": ATOMIC_SAVER,
            "save_dict": "@train#checkpoint_dict",
        }
    if "best_checkpoint" not in validate:
        (entry,) = [h for h in validate["handlers"] if is_saver(h)]
        overlay["validate#best_checkpoint"] = {**entry, "_target_": ATOMIC_SAVER}
        overlay["validate#handlers"] = ["@validate#best_checkpoint" if h is entry else h for h in validate["handlers"]]
    if not any(isinstance(h, dict) and h.get("_target_") == NAN_GUARD for h in train["handlers"]):
        overlay["train#handlers"] = [{"_target_": NAN_GUARD}] + train["handlers"]
    return overlay


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("resume_kill")
    generate_dataset(tmp / "data", num_cases=4, layout="brats2023", shape=(32, 32, 32))
    tiny = {
        "dataset_dir": str(tmp / "data"),
        "num_folds": 2,
        "network_width": 8,  # init_filters; GroupNorm(8 groups) needs a multiple of 8
        "roi_size": [16, 16, 16],  # crops for training; validation runs on the whole 32^3 volumes
        "epochs": EPOCHS,
        "num_workers": 0,
        "cache_rate": 1.0,
        "val_interval": 1,
    }
    overlays = {"reliability.json": reliability_overlay(json.loads(BUNDLE_CONFIG.read_text())), "tiny.json": tiny}
    for name, content in overlays.items():
        (tmp / name).write_text(json.dumps(content, indent=1))
    return {"tmp": tmp, "config_files": [str(BUNDLE_CONFIG), str(tmp / "reliability.json"), str(tmp / "tiny.json")]}


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


def start(cmd: list[str], cwd: Path, stdout=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, stdout=stdout, stderr=subprocess.STDOUT, text=True, env=ENV)


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
    ref_log_file = open(ref_root / "log.txt", "w")
    reference = start(command(bundle, ref_root), ref_root, stdout=ref_log_file)  # uninterrupted, in parallel

    first = start(command(bundle, run_root), run_root)
    kill_marker = f"Epoch: {KILL_EPOCH}/{EPOCHS}, Iter: 1/{ITERS_PER_EPOCH}"
    seen: list[str] = []
    deadline = time.monotonic() + 150
    for line in first.stdout:
        seen.append(line)
        if kill_marker in line:  # epoch 2 saved; epoch 3 running, its last iteration, validation and save to come
            assert (run_root / "models" / f"last_checkpoint_epoch={KILL_EPOCH - 1}.pt").is_file()
            os.kill(first.pid, signal.SIGKILL)
            break
        assert time.monotonic() < deadline, "".join(seen[-30:])
    first.wait(timeout=60)
    first_log = "".join(seen)
    assert first.returncode == -signal.SIGKILL, first_log[-3000:]
    saved = sorted(p.name for p in (run_root / "models").iterdir())
    assert saved == [f"last_checkpoint_epoch={KILL_EPOCH - 1}.pt", "model.pt"], saved
    best_before_kill = torch.load(run_root / "models" / saved[0], weights_only=True)["best"]
    assert 1 <= best_before_kill["best_metric_epoch"] < KILL_EPOCH

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
    reference.wait(timeout=300)
    ref_log_file.close()
    ref_out = (ref_root / "log.txt").read_text()
    assert reference.returncode == 0, ref_out[-5000:]

    # resumed at the epoch after the last checkpoint: only the killed epoch is lost
    assert f"last_checkpoint_epoch={KILL_EPOCH - 1}.pt at epoch {KILL_EPOCH - 1}" in resumed_log
    resumed_losses = loss_lines(resumed_log)
    assert resumed_losses[0][:2] == (KILL_EPOCH, 1) and resumed_losses[-1][:2] == (EPOCHS, ITERS_PER_EPOCH)
    assert "checked 4 label files against the brats2023 convention" in resumed_log  # check_labels ran first

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
    assert run_ckpt["best"] == ref_ckpt["best"]  # best metric, its epoch and model.pt's record carried over
    assert run_ckpt["best"]["best_metric"] >= best_before_kill["best_metric"]
    for k, v in ref_ckpt["model"].items():
        assert torch.equal(run_ckpt["model"][k], v), k
    ref_best = torch.load(ref_root / "models" / "model.pt", weights_only=True)
    run_best = torch.load(run_root / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(run_best[k], v) for k, v in ref_best.items())
    assert sorted(p.name for p in (run_root / "models").iterdir()) == [last, "model.pt"]
