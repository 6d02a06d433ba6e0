"""Multi-process training with torchrun (2 ranks, gloo on CPU) for each bundle: one epoch on tiny synthetic data.

Checks what a user of ``multi_gpu_train.json`` relies on: the run finishes on both ranks, only rank 0 writes
checkpoints, the saved weights equal what rank 0 holds at the end, and the validation metrics are logged once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("bundle", sorted(TINY_OVERRIDES))
def test_torchrun_two_ranks_gloo(bundle: str, synthetic_dataset: Path, tmp_path: Path) -> None:
    rank0_state = tmp_path / "rank0_state.pt"
    overlay = {
        **TINY_OVERRIDES[bundle],
        "dataset_dir": str(synthetic_dataset),
        "bundle_root": str(tmp_path),
        "batch_size": 1,  # one case per rank and step
        "finalize": [
            f"$torch.save(@network.module.state_dict(), {str(rank0_state)!r}) if dist.get_rank() == 0 else None",
            "$dist.is_initialized() and dist.destroy_process_group()",
        ],
    }
    overlay_file = tmp_path / "overlay.json"
    overlay_file.write_text(json.dumps(overlay))
    configs = [
        str(REPO / "bundles" / bundle / "configs" / "train.json"),
        str(REPO / "bundles" / bundle / "configs" / "multi_gpu_train.json"),
        str(overlay_file),
    ]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "training", "--config_file", repr(configs),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    checkpoints = sorted((tmp_path / "models").glob("last_checkpoint_epoch=*.pt"))
    assert [c.name for c in checkpoints] == ["last_checkpoint_epoch=1.pt"]
    assert (tmp_path / "models" / "model.pt").is_file()

    saved = torch.load(checkpoints[0], map_location="cpu", weights_only=True)["model"]
    held = torch.load(rank0_state, map_location="cpu", weights_only=True)
    assert saved.keys() == held.keys(), "checkpoint keys must be the unwrapped module's (no 'module.' prefix)"
    for key in held:
        assert torch.equal(saved[key], held[key]), key

    # validation metrics are computed over both ranks' cases but reported once, by rank 0
    assert log.count("Metrics -- ") == 1, log[-4000:]
