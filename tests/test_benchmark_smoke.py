"""Smoke run of benchmarks/run_benchmarks.py at tiny sizes, so the benchmark script does not rot.

Each worker runs in-process on the 32^3 synthetic cases of ``conftest.synthetic_dataset`` with width-8
networks and one timed run; one worker also runs through the subprocess protocol. The numbers are
meaningless at these sizes; the tests check that every section produces complete, consistent results and
that the report renders them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run_benchmarks.py"
#: one thread: tiny ops on a machine shared with other jobs spend most of their time in OpenMP barriers
THREADS = 1


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("run_benchmarks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_benchmarks"] = module
    spec.loader.exec_module(module)
    return module


def _labelled_cases(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and any(f.name.endswith("-seg.nii.gz") for f in p.iterdir()))


@pytest.fixture(scope="module")
def results(bench, synthetic_dataset, tmp_path_factory):
    """Every worker once, tiny; the collected results as ``run_plan`` would return them."""
    import torch

    threads = torch.get_num_threads()  # the workers set it; give the rest of the session its own back
    work = tmp_path_factory.mktemp("bench")
    cases = _labelled_cases(synthetic_dataset)
    common = {"threads": THREADS, "warmup": 0, "repeats": 1}
    inference = [
        bench.run_inference_worker(
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
    training = [
        bench.run_training_worker({**common, "model": model, "width": 8, "roi_size": roi, "batch_size": batch})
        for model, roi, batch in (
            ("segresnet_vae", [16, 16, 16], 1),
            ("monai_segresnetvae", [16, 16, 16], 1),
            ("espnet3d", [16, 16, 16], 2),
        )
    ]
    data = [
        bench.run_data_worker(
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
    levers = [
        bench.run_levers_worker(
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
    peak = bench.run_peak_worker({"threads": THREADS, "size": 128, "warmup": 0, "repeats": 2})
    torch.set_num_threads(threads)
    return {
        "machine": bench.machine_info(),
        "command": "smoke",
        "case_dir": str(cases[0]),
        "loadavg_end": [0.0, 0.0, 0.0],
        "flops": [peak],
        "inference": inference,
        "training": training,
        "data": data,
        "levers": levers,
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


def test_report_renders_every_section(bench, results):
    text = bench.report(results)
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


def test_format_table_pads_columns(bench):
    table = bench.format_table(["a", "long header"], [[1.234, None], ["x"]])
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert "1.23" in lines[2] and "—" in lines[2]


def test_time_runs_budget(bench):
    calls = []
    warm, times = bench.time_runs(lambda: calls.append(1), warmup=2, repeats=5, budget_s=1e-12)
    assert len(warm) == 2 and len(times) == 1 and len(calls) == 3


def test_worker_subprocess_protocol(bench):
    out = bench.run_worker({"kind": "peak", "threads": THREADS, "size": 64, "warmup": 0, "repeats": 1}, timeout_s=120)
    assert "error" not in out, out.get("error")
    assert out["float32"]["gflops"] > 0 and out["wall_s"] > 0
