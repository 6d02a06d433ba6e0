"""SIGKILL each bundle's shipped ``train.json`` mid-epoch, restart it with ``--resume True``, compare with an
uninterrupted run.

Runs ``python -m monai.bundle run training --config_file bundles/<name>/configs/train.json`` as real subprocesses,
unmodified except for size overrides on the command line, on a synthetic BraTS 2023 dataset (4 cases of 32^3,
2 folds: 2 training and 2 validation cases, batch 1, so 2 iterations per epoch; 4 epochs, killed in epoch 3), with
the default persistent data cache: the resumed run reads the entries the killed run wrote.
Deleting the resume wiring, the RNG/best-metric state, the atomic saver or the label check from the shipped
wiring (``brats_pipeline.training.run.TrainingRun``, named by both ``train.json``) makes this test fail.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from brats_pipeline.tools.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4
ITERS_PER_EPOCH = 2
KILL_EPOCH = 3
#: per bundle: size overrides only (3D-ESPNet's PSP pooling needs crops of at least 24^3 at batch 1)
SIZE_OVERRIDES = {
    "segresnet_vae": ["--network_width", "8", "--roi_size", "[16,16,16]"],
    "espnet3d": ["--network_width", "8", "--roi_size", "[24,24,24]"],
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume_kill_data")
    generate_dataset(root, num_cases=4, layout="brats2023", shape=(32, 32, 32))
    return root


def command(bundle: str, dataset: Path, root: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        str(REPO / "bundles" / bundle / "configs" / "train.json"),
        "--bundle_root",
        str(root),
        "--dataset_dir",
        str(dataset),
        "--num_folds",
        "2",
        "--epochs",
        str(EPOCHS),
        "--batch_size",
        "1",
        "--num_workers",
        "0",
        *SIZE_OVERRIDES[bundle],
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


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ["segresnet_vae", "espnet3d"])
def test_sigkill_mid_epoch_then_resume(bundle, dataset, tmp_path):
    ref_root, run_root = tmp_path / "reference", tmp_path / "killed"
    ref_root.mkdir()
    run_root.mkdir()
    ref_log_file = open(ref_root / "log.txt", "w")
    reference = start(command(bundle, dataset, ref_root), ref_root, stdout=ref_log_file)  # uninterrupted, in parallel

    first = start(command(bundle, dataset, run_root), run_root)
    kill_marker = f"Epoch: {KILL_EPOCH}/{EPOCHS}, Iter: 1/{ITERS_PER_EPOCH}"
    seen: list[str] = []
    deadline = time.monotonic() + 240
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
    assert saved == ["cases.json", f"last_checkpoint_epoch={KILL_EPOCH - 1}.pt", "model.pt", "model_settings.json"], (
        saved
    )
    before_kill = torch.load(run_root / "models" / saved[1], weights_only=True)  # last_checkpoint_epoch=2.pt
    assert set(before_kill) == {"model", "optimizer", "lr_scheduler", "trainer", "rng", "best", "scaler"}
    assert 1 <= before_kill["best"]["best_metric_epoch"] < KILL_EPOCH

    resumed = subprocess.run(
        command(bundle, dataset, run_root, "--resume", "True"),
        cwd=run_root,
        capture_output=True,
        text=True,
        timeout=400,
        env=ENV,
    )
    resumed_log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, resumed_log[-5000:]
    reference.wait(timeout=400)
    ref_log_file.close()
    ref_out = (ref_root / "log.txt").read_text()
    assert reference.returncode == 0, ref_out[-5000:]

    # resumed at the epoch after the last checkpoint: only the killed epoch is lost
    assert f"last_checkpoint_epoch={KILL_EPOCH - 1}.pt at epoch {KILL_EPOCH - 1}" in resumed_log
    resumed_losses = loss_lines(resumed_log)
    assert resumed_losses[0][:2] == (KILL_EPOCH, 1) and resumed_losses[-1][:2] == (EPOCHS, ITERS_PER_EPOCH)
    assert "checked 4 label files against the brats2023 convention" in resumed_log  # check_labels ran first
    assert f"training finished after epoch {EPOCHS}" in resumed_log  # end-of-run summary

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
    assert run_ckpt["best"]["best_metric"] >= before_kill["best"]["best_metric"]
    for k, v in ref_ckpt["model"].items():
        assert torch.equal(run_ckpt["model"][k], v), k
    ref_best = torch.load(ref_root / "models" / "model.pt", weights_only=True)
    run_best = torch.load(run_root / "models" / "model.pt", weights_only=True)
    assert ref_best.keys() == run_best.keys()
    assert all(torch.equal(run_best[k], v) for k, v in ref_best.items())
    assert sorted(p.name for p in (run_root / "models").iterdir()) == [
        "cases.json",
        last,
        "model.pt",
        "model_settings.json",
    ]
    cached = sorted(p.name for p in (run_root / "cache").iterdir())
    assert len(cached) == 4 and all(n.endswith(".pt") for n in cached), cached  # one entry per case, no temp file
    assert cached == sorted(p.name for p in (ref_root / "cache").iterdir())
