"""Smoke run of the package ``benchmarks`` (``benchmarks/run_benchmarks.py``) at tiny sizes, so the benchmarks do
not rot.

Each section's worker runs in-process on the 32^3 synthetic cases of ``conftest.synthetic_dataset`` with width-8
networks and one timed run; one worker also runs through the subprocess protocol. The numbers are
meaningless at these sizes; the tests check that every section produces complete, consistent results and
that the report renders them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import data, flops, inference, levers, machine, run_benchmarks, tables, timing, training

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run_benchmarks.py"
#: one thread: tiny ops on a machine shared with other jobs spend most of their time in OpenMP barriers
THREADS = 1


def _labelled_cases(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and any(f.name.endswith("-seg.nii.gz") for f in p.iterdir()))


@pytest.fixture(scope="module")
def results(synthetic_dataset, tmp_path_factory):
    """Every worker once, tiny; the collected results as ``run_plan`` would return them."""
    import torch

    threads = torch.get_num_threads()  # the workers set it; give the rest of the session its own back
    work = tmp_path_factory.mktemp("bench")
    cases = _labelled_cases(synthetic_dataset)
    common = {"threads": THREADS, "warmup": 0, "repeats": 1}
    inference_rows = [
        inference.worker(
            {
                **common,
                "pipeline": pipeline,
                "width": 8,
                "tta": pipeline != "model_zoo",
                "case_dir": str(cases[0]),
                "zoo_roi_size": [32, 32, 32],
                "work_dir": str(work / f"inf_{pipeline}"),
            }
        )
        for pipeline in ("model_zoo", "segresnet_vae", "espnet3d")
    ]
    training_rows = [
        training.worker({**common, "model": model, "width": 8, "roi_size": roi, "batch_size": batch})
        for model, roi, batch in (
            ("segresnet_vae", [16, 16, 16], 1),
            ("monai_segresnetvae", [16, 16, 16], 1),
            ("espnet3d", [16, 16, 16], 2),
        )
    ]
    data_rows = [
        data.worker(
            {
                **common,
                "bundle": "segresnet_vae",
                "dataset_dir": str(synthetic_dataset),
                "roi_size": [16, 16, 16],
                "loaders": [
                    {"cache": False, "loader": "DataLoader", "workers": 0},
                    {"cache": True, "loader": "ThreadDataLoader", "workers": 0},
                    {"cache": True, "copy_cache": False, "loader": "ThreadDataLoader", "workers": 0},
                ],
                "num_folds": 2,
                "cache_workers": 1,
            }
        )
    ]
    lever_rows = [
        levers.worker(
            {
                **common,
                "pipeline": "segresnet_vae",
                "width": 8,
                "case_dirs": [str(c) for c in cases[:2]],
                "variants": ["no_grad fp32", "inference_mode", "channels_last", "bf16"],
                "work_dir": str(work / "levers"),
            }
        )
    ]
    peak = flops.peak_worker({"threads": THREADS, "size": 128, "warmup": 0, "repeats": 2})
    torch.set_num_threads(threads)
    return {
        "machine": machine.machine_info(),
        "command": "smoke",
        "case_dir": str(cases[0]),
        "loadavg_end": [0.0, 0.0, 0.0],
        "flops": [peak],
        "inference": inference_rows,
        "training": training_rows,
        "data": data_rows,
        "levers": lever_rows,
    }


def test_inference_rows(results):
    zoo, ours, esp = results["inference"]
    assert list(zoo["phases"]) == ["plain"]  # the Model Zoo recipe has no TTA
    assert list(ours["phases"]) == ["plain", "tta"] and list(esp["phases"]) == ["plain", "tta"]
    for r in results["inference"]:
        plain = r["phases"]["plain"]
        assert len(plain["times_s"]) == 1 and plain["times_s"][0] > 0
        assert plain["forwards_per_case"] == 1 and len(plain["forward_times_s"]) == 1
        assert plain["forward_times_s"][0] < plain["times_s"][0]  # the network is part of the end-to-end time
        assert plain["flops_per_forward"] > 0
        assert plain["peak_rss_mib"] >= plain["rss_after_setup_mib"] > 0
    for r in (ours, esp):
        assert r["phases"]["tta"]["forwards_per_case"] == 8  # 8 mirror flips
    # the Model Zoo window covers the padded volume; the bundles see the brain's bounding box only
    assert zoo["phases"]["plain"]["network_input"] == [1, 4, 32, 32, 32]
    ours_in = ours["phases"]["plain"]["network_input"]
    assert ours_in[:2] == [1, 4] and all(s <= 32 and s % 8 == 0 for s in ours_in[2:])


def test_training_rows(results):
    for r in results["training"]:
        assert r["times_s"][0] > 0
        assert r["flops_per_iteration"] > r["flops_per_forward"] > 0
    ours, theirs, esp = results["training"]
    assert ours["roi_size"] == theirs["roi_size"] == [16, 16, 16]
    assert esp["batch_size"] == 2
    # same encoder/decoder convolutions: forward FLOPs of the segmentation part agree within the VAE branches
    assert abs(ours["flops_per_forward"] - theirs["flops_per_forward"]) / theirs["flops_per_forward"] < 0.5


def test_data_rows(results):
    rows = results["data"][0]["rows"]
    assert [r["cache"] for r in rows] == [False, True, True]
    for r in rows:
        assert r["cases"] >= 1 and r["cases_per_s"] > 0
    assert rows[0]["cache_mib"] is None and rows[1]["fill_s"] > 0 and rows[1]["cache_mib"] > 0
    # the random transforms after the cache point leave the cached items intact without the defensive copy
    assert rows[2]["cache_unchanged"] is True


def test_lever_rows(results):
    lev = results["levers"][0]
    assert [r["variant"] for r in lev["rows"]] == ["no_grad fp32", "inference_mode", "channels_last", "bf16"]
    bf16 = lev["rows"][3]
    assert len(bf16["agreement_dice"]) == 2  # two cases, three regions each
    assert all(0.0 <= d <= 1.0 for case in bf16["agreement_dice"] for d in case)


def test_report_renders_every_section(results):
    text = run_benchmarks.report(results)
    for title in (
        "Machine peak",
        "1. Inference",
        "2. One training iteration",
        "3. Training input",
        "4. FLOPs",
        "5. Levers",
    ):
        assert title in text
    assert "1.00x" in text  # the Model Zoo row is its own reference
    assert "failed" not in text
    assert sum("| 8 flips |" in line for line in text.splitlines()) == 2  # TTA rows of both bundles


def test_format_table_pads_columns():
    table = tables.format_table(["a", "long header"], [[1.234, None], ["x"]])
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert "1.23" in lines[2] and "—" in lines[2]
    # unpadded, as the scripts that print rows as they measure them write their tables
    assert tables.format_table(["a", "b"], [["x", 1.0]], pad=False) == "| a | b |\n| --- | --- |\n| x | 1.00 |"


def test_time_runs_budget():
    calls = []
    warm, times = timing.time_runs(lambda: calls.append(1), warmup=2, repeats=5, budget_s=1e-12)
    assert len(warm) == 2 and len(times) == 1 and len(calls) == 3


def test_worker_subprocess_protocol():
    spec = {"kind": "peak", "threads": THREADS, "size": 64, "warmup": 0, "repeats": 1}
    out = run_benchmarks.run_worker(spec, timeout_s=120)
    assert "error" not in out, out.get("error")
    assert out["float32"]["gflops"] > 0 and out["wall_s"] > 0


def test_script_runs_as_a_file_from_anywhere(tmp_path):
    """``python benchmarks/run_benchmarks.py`` (the documented command) imports its folder as the package."""
    spec = {"kind": "peak", "threads": THREADS, "size": 32, "warmup": 0, "repeats": 1}
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith(run_benchmarks.RESULT_MARKER))
    assert json.loads(line[len(run_benchmarks.RESULT_MARKER) :])["float32"]["gflops"] > 0


def test_model_zoo_recipe_is_the_published_one():
    """The recipe file is a bundle config: ``ConfigParser`` reads it; the published sizes are its defaults."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(inference.MODEL_ZOO_RECIPE)
    assert parser["network_def"]["init_filters"] == 16 and parser["network_def"]["blocks_down"] == [1, 2, 2, 4]
    assert parser["inferer"]["roi_size"] == [240, 240, 160] and parser["inferer"]["overlap"] == 0.5
    assert [t["_target_"] for t in parser["postprocessing"]["transforms"]] == [
        "Activationsd",
        "Invertd",
        "AsDiscreted",
        "Lambdad",
        "SaveImaged",
    ]
