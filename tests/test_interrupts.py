"""Ctrl-C, runs that never mix, and output folders that cannot be written, in real ``python -m monai.bundle``
processes of the shipped configs at tiny size (32^3 synthetic cases, width 8, 1-3 epochs).

* A SIGINT during training or inference ends the run with one line (after the normal log lines): what was finished,
  what was not and how to go on; no traceback, no "bad case"; the process ends by SIGINT (a shell's status 130), and
  the command it names finishes the work.
* A training run that never validates (``epochs`` < ``val_interval``) after an earlier run reports no model of its
  own: the earlier ``model.pt``, ``model_settings.json``, ``cases.json`` and checkpoint move together to
  ``models/previous/<time>/``, where they still load together.
* An output folder that cannot be written is one ``error:`` line before any data or model is loaded.

In-process: the error handler's line for ``KeyboardInterrupt``, :func:`check_output_folders` (with ``os.access``
patched where the tests run as root, which the kernel lets write anywhere) and :func:`interrupts_deferred`.
"""

from __future__ import annotations

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
from monai.bundle import ConfigParser
from monai.networks.nets import SegResNet

from brats_pipeline.bundle import command_line
from brats_pipeline.bundle.command_line import (
    OutputFolderError,
    check_output_folders,
    interrupt_message,
    interrupts_deferred,
    report_interrupts_with,
    user_error_message,
)
from brats_pipeline.tools.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != command_line.DEBUG_ENV} | {
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}
TINY = ["--network_width", "8", "--roi_size", "[32,32,32]", "--num_workers", "0", "--cache_rate", "1.0"]
TINY += ["--progress", "False", "--tensorboard", "False", "--num_folds", "2"]
#: a log line of the bundle's logging.conf ("2026-01-01 10:00:00,123 - name - LEVEL - text") or MONAI's config notice
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ - .* - (INFO|WARNING) - |^parsing config_file ")


def config(bundle: str, name: str) -> str:
    return str(REPO / "bundles" / bundle / "configs" / f"{name}.json")


def train_command(root: Path, dataset: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", config("segresnet_vae", "train"),
        "--bundle_root", str(root), "--dataset_dir", str(dataset), *TINY, *args,
    ]  # fmt: skip


def inference_command(root: Path, dataset: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", config("segresnet_vae", "inference"),
        "--bundle_root", str(root), "--dataset_dir", str(dataset), "--num_workers", "0", "--progress", "False", *args,
    ]  # fmt: skip


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=ENV)


def interrupt(cmd: list[str], cwd: Path, marker: re.Pattern) -> tuple[int, list[str], list[str]]:
    """Run ``cmd``, send SIGINT once a line matches ``marker``; the exit status, the lines up to the marker and the
    lines after it (stdout and stderr together)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    before: list[str] = []
    deadline = time.monotonic() + 300
    assert proc.stdout is not None
    for line in proc.stdout:
        before.append(line.rstrip("\n"))
        if marker.search(line):
            proc.send_signal(signal.SIGINT)
            break
        assert time.monotonic() < deadline, "\n".join(before[-30:])
    after = [line.rstrip("\n") for line in proc.stdout]
    proc.wait(timeout=120)
    return proc.returncode, before, after


def one_interrupt_line(status: int, before: list[str], after: list[str]) -> str:
    """The interrupt's line: the last one, after normal log lines only; status: ended by SIGINT (shell: 130)."""
    text = "\n".join(before[-20:] + ["--- SIGINT ---"] + after)
    assert status == -signal.SIGINT, text  # Python ends an interrupted process by SIGINT: $? = 130 in a shell
    assert after and after[-1].startswith("interrupted"), text
    assert all(LOG_LINE.match(line) for line in after[:-1]), text  # only normal log lines before it
    for word in ("Traceback", "KeyboardInterrupt", "bad case", "failed", "ERROR"):
        assert word not in "\n".join(after), text
    return after[-1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("interrupts")
    generate_dataset(root / "train", 4, "brats2023", (32, 32, 32), seed=0)
    generate_dataset(root / "infer", 8, "brats2023", (96, 96, 96), seed=1, with_labels=False, start_index=11)
    return {"root": root, "train": root / "train", "infer": root / "infer"}


# --- real processes -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_in_training_is_one_line_and_resume_finishes(data, tmp_path):
    cmd = train_command(tmp_path, data["train"], "--epochs", "3")
    status, before, after = interrupt(cmd, tmp_path, re.compile(r"Epoch: 2/3, Iter: 1/2"))
    line = one_interrupt_line(status, before, after)
    m = re.fullmatch(
        r"interrupted at epoch (\d) \(iteration (\d+)\); last checkpoint: (\S+) \(epoch (\d)\); "
        r"resume with --resume True",
        line,
    )
    assert m, line
    epoch, checkpoint, saved = int(m[1]), Path(m[3]), int(m[4])
    assert checkpoint == tmp_path / "models" / f"last_checkpoint_epoch={saved}.pt" and checkpoint.is_file()
    assert saved in (epoch - 1, epoch)  # epoch 1's checkpoint, or epoch 2's if the signal came after its save

    resumed = run([*cmd, "--resume", "True"], tmp_path)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    assert f"Resumed from {checkpoint} at epoch {saved}" in log and "training finished after epoch 3" in log


@pytest.mark.slow
def test_ctrl_c_in_inference_is_one_line_records_what_was_written_and_rerun_finishes(data, tmp_path):
    parser = ConfigParser()
    parser.read_config(config("segresnet_vae", "inference"))
    parser["network_width"] = 8
    (tmp_path / "models").mkdir()
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "models" / "model.pt")
    cmd = inference_command(tmp_path, data["infer"], "--network_width", "8")
    status, before, after = interrupt(cmd, tmp_path, re.compile(r"case BraTS-GLI-00011-000: .* s "))
    line = one_interrupt_line(status, before, after)
    out_dir = tmp_path / "eval" / "predictions"
    written = sorted(p.name.removesuffix(".nii.gz") for p in out_dir.glob("*.nii.gz"))
    assert 1 <= len(written) < 8, line
    assert line == (
        f"interrupted: {len(written)} of 8 cases written to {out_dir}; rerun the same command to finish the rest"
    )
    # every label map on disk is recorded with the model that wrote it; no partial file
    assert sorted(json.loads((out_dir / "predictions.json").read_text())["cases"]) == written
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]

    rerun = run(cmd, tmp_path)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    assert f"wrote {8 - len(written)} label map(s)" in rerun.stdout
    assert f"kept {len(written)} existing prediction(s)" in rerun.stdout
    assert len(json.loads((out_dir / "predictions.json").read_text())["cases"]) == 8


@pytest.mark.slow
def test_short_run_never_reports_an_earlier_runs_model(data, tmp_path):
    """Run 1 validates at width 8; run 2 (width 16, 1 epoch, val_interval 2) never validates: it reports no model,
    writes none of the three files, and run 1's three files (and checkpoint) are in previous/<time>/, together."""
    first = run(train_command(tmp_path, data["train"], "--epochs", "1"), tmp_path)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    models = tmp_path / "models"
    assert f"best model       {models / 'model.pt'}" in first.stdout
    before = {p.name: p.read_bytes() for p in models.iterdir()}

    args = ["--epochs", "1", "--val_interval", "2", "--network_width", "16"]
    second = run(train_command(tmp_path, data["train"], *args), tmp_path)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    (previous,) = (models / "previous").iterdir()
    assert (
        "best model       none written by this run; it never validated (val_interval 2, 1 epoch(s)): lower "
        "--val_interval or raise --epochs" in second.stdout
    )
    assert f"earlier run      moved to {previous}" in second.stdout and str(models / "model.pt") not in second.stdout
    assert f"moved to {previous}" in log
    assert sorted(p.name for p in models.iterdir()) == ["last_checkpoint_epoch=1.pt", "previous"]
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before  # nothing of run 1 deleted or rewritten
    # run 1's weights still load with the settings next to them
    settings = json.loads((previous / "model_settings.json").read_text())
    net = settings["network_def"]
    SegResNet(
        spatial_dims=3,
        in_channels=4,
        out_channels=net["out_channels"],
        init_filters=settings["network_width"],
        blocks_down=net["blocks_down"],
        blocks_up=net["blocks_up"],
    ).load_state_dict(torch.load(previous / "model.pt", weights_only=True), strict=True)
    assert settings["network_width"] == 8 and json.loads((previous / "cases.json").read_text())["trained_on"]


@pytest.mark.slow
def test_output_folder_that_cannot_be_written_is_one_line_before_any_work(data, tmp_path):
    """An output folder under a regular file (cannot be created, even by root): one error line, before the model or
    any case is read."""
    (tmp_path / "models").mkdir()
    torch.save({"not": torch.zeros(1)}, tmp_path / "models" / "model.pt")  # would fail to load: it is never read
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = run(inference_command(tmp_path, data["infer"], "--output_dir", str(blocker / "eval")), tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert proc.returncode == 1 and lines == [
        f"error: output folder {blocker}/eval/predictions is not writable ({blocker} is a file, not a folder)"
    ], proc.stderr[-3000:]
    assert "does not fit" not in proc.stderr and "screened" not in proc.stdout + proc.stderr

    proc = run(train_command(tmp_path / "t", data["train"], "--ckpt_dir", str(blocker / "models")), tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert proc.returncode == 1 and lines == [
        f"error: output folder {blocker}/models is not writable ({blocker} is a file, not a folder)"
    ], proc.stderr[-3000:]
    assert not (tmp_path / "t").exists()  # no cache, no logs: nothing ran


# --- in-process ---------------------------------------------------------------------------------------------------


def test_check_output_folders(tmp_path, monkeypatch):
    check_output_folders([tmp_path, tmp_path / "new" / "deeper", None])  # writable, or creatable: nothing created
    check_output_folders(str(tmp_path / "new"))  # one folder
    assert not (tmp_path / "new").exists()
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputFolderError, match=r"output folder .*/f/out is not writable \(.*/f is a file"):
        check_output_folders([tmp_path / "f" / "out"])
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    real_access = os.access
    if os.geteuid() == 0:  # root may write a 0o555 folder: let os.access answer as for any other user
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != read_only and real_access(p, mode))
    with pytest.raises(OutputFolderError) as info:
        check_output_folders([read_only])
    assert user_error_message(info.value) == f"output folder {read_only} is not writable"
    with pytest.raises(OutputFolderError, match=rf"^output folder {read_only}/x is not writable \(cannot create it in"):
        check_output_folders([read_only / "x"])
    read_only.chmod(0o755)


class _Run:
    def __init__(self, text):
        self.text = text

    def message(self):
        return self.text


def test_keyboard_interrupt_prints_the_runs_line(monkeypatch, capsys):
    monkeypatch.setattr(command_line, "_interrupt_reporters", [])
    monkeypatch.delenv(command_line.DEBUG_ENV, raising=False)
    assert interrupt_message() == command_line.DEFAULT_INTERRUPT_MESSAGE
    older, newer = _Run("interrupted: older"), _Run(None)
    report_interrupts_with(older.message)
    report_interrupts_with(newer.message)  # has nothing to say: the older one speaks
    error = KeyboardInterrupt()
    command_line._excepthook(KeyboardInterrupt, error, None)
    assert capsys.readouterr().err == "interrupted: older\n"
    newer.text = "interrupted: newer"
    assert interrupt_message() == "interrupted: newer"
    del newer  # held weakly: a freed run says nothing
    assert interrupt_message() == "interrupted: older"
    calls = []
    monkeypatch.setattr(command_line, "_previous_hook", lambda *a: calls.append(a))
    monkeypatch.setenv(command_line.DEBUG_ENV, "1")  # BRATS_DEBUG=1: the traceback, as for any error
    command_line._excepthook(KeyboardInterrupt, error, None)
    assert calls == [(KeyboardInterrupt, error, None)] and capsys.readouterr().err == ""


def test_interrupts_deferred_raises_after_the_block():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("rest of the block")
    assert done == ["rest of the block"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with interrupts_deferred():
        pass  # no signal: nothing raised
