"""Smoke run of benchmarks/loader_throughput.py at tiny sizes, so the loader benchmark does not rot: every mode of
both bundles' shipped ``train#dataset`` yields items, and the table and JSON carry the ratios."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "loader_throughput.py"


def test_loader_benchmark_runs_every_mode_of_both_bundles(tmp_path, capsys):
    import torch

    spec = importlib.util.spec_from_file_location("loader_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["loader_throughput"] = module
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()  # the script sets one thread: give the rest of the session its own back
    try:
        out = tmp_path / "rows.json"
        assert module.main(["--cases", "2", "--shape", "40", "40", "32", "--epochs", "1", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = json.loads(out.read_text())["rows"]
    assert {(r["bundle"], r["mode"]) for r in rows} == {
        (b, m) for b in ("segresnet_vae", "espnet3d") for m in ("nifti", "persistent", "memory")
    }
    assert all(r["s_per_case"] > 0 and r["speedup_vs_nifti"] > 0 for r in rows)
    assert all(r["cache_mb_per_case"] > 0 for r in rows if r["mode"] == "persistent")
    table = capsys.readouterr().out
    assert "| segresnet_vae | persistent |" in table and "vs NIfTI" in table
