"""The benchmarks' cases, and the section ``data``: the training input pipeline of the bundles' ``train.json``.

``train#dataset`` on synthetic full-size cases: cases per second with and without ``CacheDataset`` caching,
``DataLoader`` vs ``ThreadDataLoader``, 0/1/2 workers, and the time it adds to an epoch against the measured
training step.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import DataLoader, ThreadDataLoader

from benchmarks.machine import setup_torch
from benchmarks.memory import peak_rss_mib
from benchmarks.tables import format_table
from benchmarks.timing import time_runs
from brats_pipeline.bundle.workflows import bundle_workflow
from brats_pipeline.tools.synthetic import ensure_dataset

__all__ = ["single_case_dir", "synthetic_dataset", "table", "worker"]


def synthetic_dataset(root: str | os.PathLike, num_cases: int, shape: Sequence[int], with_labels: bool = True) -> Path:
    """Synthetic BraTS 2023 cases of ``shape`` in ``root/<shape>`` (generated once, reused by later runs)."""
    folder = Path(root) / ("x".join(str(int(s)) for s in shape) + ("" if with_labels else "_unlabelled"))
    ensure_dataset(folder, num_cases=num_cases, layout="brats2023", shape=tuple(shape), seed=0, with_labels=with_labels)
    return folder


def single_case_dir(case_dir: str | os.PathLike, work_dir: str | os.PathLike) -> Path:
    """A dataset folder holding only ``case_dir`` (as a symbolic link), for the bundles' ``dataset_dir``."""
    case_dir = Path(case_dir).resolve()
    folder = Path(work_dir) / "dataset"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / case_dir.name
    if not link.exists():
        link.symlink_to(case_dir, target_is_directory=True)
    return folder


def _cache_stats(dataset: Any) -> tuple[float, str]:
    """``(MiB, digest of the bytes)`` of the tensors a ``CacheDataset`` holds (``(0, "")`` for a plain dataset)."""
    total, digest = 0, hashlib.blake2b(digest_size=16)
    for item in getattr(dataset, "_cache", None) or []:
        for value in item.values() if isinstance(item, dict) else ():
            if isinstance(value, torch.Tensor):
                array = torch.as_tensor(value).detach().cpu().contiguous().numpy()
                total += array.nbytes
                digest.update(array.tobytes())
    return total / 2**20, digest.hexdigest() if total else ""


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Cases per second of a bundle's training input pipeline (``train#dataset``) under several loaders.

    Spec keys: ``bundle``, ``dataset_dir``, ``roi_size`` and ``num_folds`` (``None``: the bundle's);
    ``loaders``: a list of ``{"cache": bool, "loader": "DataLoader" | "ThreadDataLoader", "workers": int}``,
    optionally ``"copy_cache": False`` (``CacheDataset`` then hands out its cached items without the default
    deep copy; the worker checks that an epoch leaves the cache unchanged); ``cache_workers`` (CacheDataset's
    fill threads); ``warmup`` (epochs before the first loader of each dataset: warms the page cache) and
    ``repeats`` (timed epochs per loader); ``threads``.
    """
    setup_torch(spec.get("threads", os.cpu_count() or 1))
    rows = []
    for cache in sorted({bool(c["cache"]) for c in spec["loaders"]}):
        values: dict[str, Any] = {
            "dataset_dir": str(spec["dataset_dir"]),
            "cache_rate": 1.0 if cache else 0.0,
            "persistent_cache": False,  # this section compares CacheDataset with none; loader_throughput.py the rest
            "num_workers": int(spec.get("cache_workers", os.cpu_count() or 1)),
            "device": "$torch.device('cpu')",
        }
        if spec.get("roi_size") is not None:
            values["roi_size"] = [int(s) for s in spec["roi_size"]]
        if spec.get("num_folds") is not None:
            values["num_folds"] = int(spec["num_folds"])
        workflow = bundle_workflow(spec["bundle"], "train.json", workflow_type="train", **values)
        t0 = time.perf_counter()
        dataset = workflow.parser.get_parsed_content("train#dataset")
        fill_s = time.perf_counter() - t0
        cache_mib, checksum = _cache_stats(dataset)
        batch_size = int(workflow.parser.get_parsed_content("batch_size"))
        warmup = spec.get("warmup", 1)
        for cfg in spec["loaders"]:
            if bool(cfg["cache"]) != cache:
                continue
            if hasattr(dataset, "copy_cache"):
                dataset.copy_cache = bool(cfg.get("copy_cache", True))
            cls = ThreadDataLoader if cfg["loader"] == "ThreadDataLoader" else DataLoader
            torch.manual_seed(0)
            loader = cls(dataset, batch_size=batch_size, shuffle=True, num_workers=int(cfg["workers"]))

            def epoch(loader: Any = loader) -> None:
                for _ in loader:
                    pass

            _, times = time_runs(epoch, warmup, spec.get("repeats", 3))
            warmup = 0
            row = {
                **cfg,
                "cases": len(dataset),
                "batch_size": batch_size,
                "fill_s": fill_s if cache else None,
                "cache_mib": cache_mib if cache else None,
                "epoch_times_s": times,
                "cases_per_s": len(dataset) * len(times) / sum(times),
            }
            if cache and not cfg.get("copy_cache", True):
                row["cache_unchanged"] = _cache_stats(dataset)[1] == checksum
            rows.append(row)
    return {"bundle": spec["bundle"], "rows": rows, "peak_rss_mib": peak_rss_mib()}


def table(results: list[dict[str, Any]], step_s: dict[str, float | None]) -> str:
    """Loader throughput against the measured training step of the same bundle."""
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r.get("bundle", "?"), "failed", "", "", "", "", "", "", "", r["error"][:80]])
            continue
        step = step_s.get(r["bundle"])
        for row in r["rows"]:
            per_batch = row["batch_size"] / row["cases_per_s"]
            dataset = "no cache (cache_rate 0)"
            if row["cache"]:
                dataset = "CacheDataset (cache_rate 1)"
                if not row.get("copy_cache", True):
                    unchanged = row.get("cache_unchanged")
                    dataset += ", copy_cache=False" + ("" if unchanged else " (CACHE MODIFIED)")
            rows.append(
                [
                    r["bundle"],
                    dataset,
                    row["loader"],
                    row["workers"],
                    row["cases"],
                    row["fill_s"],
                    None if row.get("cache_mib") is None else row["cache_mib"] / row["cases"],
                    row["cases_per_s"],
                    per_batch,
                    step,
                    None if not step else 100 * per_batch / step,
                ]
            )
    headers = [
        "bundle",
        "dataset",
        "loader",
        "workers",
        "cases",
        "cache fill s",
        "cache MiB / case",
        "cases / s",
        "s / batch",
        "train step s",
        "load / step %",
    ]
    return format_table(headers, rows)
