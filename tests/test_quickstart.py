"""The documented quickstart commands, end to end, for both bundles, at reduced size: a Dice floor that a broken
pipeline cannot pass.

The command is read from the docs (the README's for segresnet_vae, ``docs/quickstart.md``'s for espnet3d) and run as
a subprocess; only size keys are overridden on its command line (fewer and smaller synthetic cases, fewer epochs).
An untrained network scores a held-out mean Dice of about 0.03-0.09 on these cases (measured); the floors sit well
above that and well below what the reduced runs reach (segresnet_vae: mean 0.46, WT 0.73 after 12 epochs;
espnet3d: mean 0.36 after 60 epochs, measured on 2 cores).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: bundle -> (document holding the command, size overrides, floors on the held-out Dice)
CASES = {
    "segresnet_vae": (
        "README.md",
        {
            "quickstart_shape": "[32,32,32]",
            "quickstart_train_cases": "8",
            "quickstart_holdout_cases": "4",
            "roi_size": "[32,32,32]",
            "epochs": "12",
            "val_interval": "4",
        },
        {"holdout_mean_dice": 0.3, "holdout_WT_dice": 0.5},
    ),
    "espnet3d": (
        "docs/quickstart.md",
        {"quickstart_train_cases": "12", "quickstart_holdout_cases": "4", "epochs": "60", "val_interval": "10"},
        {"holdout_mean_dice": 0.2},
    ),
}


def documented_command(doc: str, bundle: str) -> list[str]:
    """The ``python -m monai.bundle run training`` command of ``bundle``'s quickstart, as written in ``doc``."""
    for line in (REPO / doc).read_text().splitlines():
        if (
            "monai.bundle run training" in line
            and f"bundles/{bundle}/configs/train.json" in line
            and "quickstart" in line
        ):
            command = line.split("&&")[-1].strip()
            return shlex.split(command)
    raise AssertionError(f"{doc} documents no quickstart command for {bundle}")


def with_overrides(argv: list[str], overrides: dict[str, str]) -> list[str]:
    """``argv`` with ``--key value`` pairs replaced or appended (python-fire takes one value per key)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i].startswith("--") and argv[i][2:] in overrides:
            i += 2
            continue
        out.append(argv[i])
        i += 1
    for key, value in overrides.items():
        out += [f"--{key}", value]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("bundle", CASES)
def test_documented_quickstart_trains_past_the_floor(bundle, tmp_path):
    doc, sizes, floors = CASES[bundle]
    argv = documented_command(doc, bundle)
    assert argv[:4] == ["python", "-m", "monai.bundle", "run"]
    overrides = {**sizes, "quickstart_dir": str(tmp_path / "data"), "bundle_root": str(tmp_path / "bundle")}
    cmd = [sys.executable, *with_overrides(argv, overrides)[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    scores = {k: float(v) for k, v in re.findall(r"^(holdout_\w+_dice)\s+([0-9.]+)$", proc.stdout, re.MULTILINE)}
    assert set(scores) == {"holdout_mean_dice", "holdout_TC_dice", "holdout_WT_dice", "holdout_ET_dice"}, log[-3000:]
    for name, floor in floors.items():
        assert scores[name] >= floor, f"{name} {scores[name]:.3f} < {floor}: {scores}"
    assert "training finished after epoch" in proc.stdout  # the end-of-run summary
    assert (tmp_path / "bundle" / "models" / "model.pt").is_file()
    assert (tmp_path / "data" / "train").is_dir() and (tmp_path / "data" / "holdout").is_dir()
