"""Smoke run of benchmarks/loader_throughput.py at tiny sizes, so the loader benchmark does not rot: every mode of
both bundles' shipped ``train#dataset`` yields items, and the table and JSON carry the ratios."""

from __future__ import annotations

import json

from benchmarks import loader_throughput


def test_loader_benchmark_runs_every_mode_of_both_bundles(tmp_path, capsys):
    import torch

    threads = torch.get_num_threads()  # the script sets one thread: give the rest of the session its own back
    try:
        out = tmp_path / "rows.json"
        argv = ["--cases", "2", "--shape", "40", "40", "32", "--epochs", "1", "--json", str(out)]
        assert loader_throughput.main(argv) == 0
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
