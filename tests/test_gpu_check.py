"""``benchmarks/gpu_check.sh --dry-run``: the standing GPU check runs end to end on CPU at tiny sizes (as CI runs
it), so the script is ready for the next GPU machine; its JSON and Markdown reports hold every measurement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    # gpu_check.sh runs the `python` of an activated environment: this test's own
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["mode"].startswith("dry run") and set(report["bundles"]) == {"segresnet_vae", "espnet3d"}
    for bundle, rows in report["bundles"].items():
        assert rows["train_step"]["s_per_iteration"] > 0, bundle
        run = rows["train_run"]
        assert run["cases"] == 2 and run["cases_per_s"] > 0 and 0.0 <= run["data_wait_share"] <= 1.0, bundle
        assert set(rows["inference"]) == {"plain", "tta"}, bundle
        assert all(r["network_s"] <= r["end_to_end_s"] for r in rows["inference"].values()), bundle
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert table in proc.stdout and table.count("| segresnet_vae |") == 4 and table.count("| espnet3d |") == 4
