"""The section ``inference``: one case end to end against the MONAI Model Zoo ``brats_mri_segmentation`` recipe.

One case end to end (load four NIfTI, pre-process, network, invert, write the label map), by running the bundles'
own ``inference.json`` through ``monai.bundle.ConfigWorkflow`` in-process (random weights saved as
``models/model.pt`` of a temporary bundle root), against the Model Zoo inference recipe in
:data:`MODEL_ZOO_RECIPE`. Each pipeline runs with and without 8-flip TTA (the Model Zoo recipe has no TTA). The
network's forward passes are timed by hooks inside the same runs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigWorkflow

from benchmarks.data import single_case_dir
from benchmarks.flops import count_flops, meta_copy
from benchmarks.machine import setup_torch
from benchmarks.memory import gpu_peak_mib, peak_rss_mib, reset_gpu_peak
from benchmarks.tables import dims, format_table, ratio
from benchmarks.timing import ForwardTimer, median, time_runs
from brats_pipeline.bundle.workflows import bundle_workflow
from brats_pipeline.data.datalist import find_cases

__all__ = ["LABELS", "MODEL_ZOO_RECIPE", "inference_workflow", "table", "worker"]

#: The MONAI Model Zoo ``brats_mri_segmentation`` inference recipe (its ``configs/inference.json``), as a bundle
#: config. Same network (SegResNet, blocks (1, 2, 2, 4) / (1, 1, 1), dropout 0.2), pre-processing (``LoadImaged``,
#: ``NormalizeIntensityd(nonzero, channel_wise)``), ``SlidingWindowInferer(roi_size=(240, 240, 160),
#: sw_batch_size=1, overlap=0.5)`` and post-processing (sigmoid, ``Invertd``, threshold 0.5, regions to the BraTS
#: 2018 labels, ``SaveImaged`` uint8). Changes, none of which touches the timed work: an ``EnsureChannelFirstd``
#: (our cases are four 3-D files, the Model Zoo's data one 4-D file), AMP only where CUDA is (the recipe sets
#: ``amp: true``, a no-op with a warning on CPU), ``num_workers`` and ``test_datalist`` set by the caller, and the
#: run list named ``run`` (the recipe's ``evaluating``).
MODEL_ZOO_RECIPE = Path(__file__).resolve().parent / "model_zoo_recipe.json"

LABELS = {
    "model_zoo": "Model Zoo brats_mri_segmentation",
    "segresnet_vae": "segresnet_vae",
    "espnet3d": "espnet3d",
}


def inference_workflow(
    pipeline: str,
    width: int,
    dataset_dir: str | os.PathLike,
    bundle_root: str | os.PathLike,
    tta: bool = False,
    zoo_roi_size: Sequence[int] = (240, 240, 160),
    overrides: dict[str, Any] | None = None,
) -> ConfigWorkflow:
    """An initialised ``ConfigWorkflow`` of one inference pipeline, set to write into ``bundle_root``.

    ``pipeline``: ``"model_zoo"`` (:data:`MODEL_ZOO_RECIPE`, at init filters ``width`` and window
    ``zoo_roi_size``), ``"segresnet_vae"`` or ``"espnet3d"`` (the bundle's own ``configs/inference.json``, with
    ``num_workers=0`` so that a case's loading is timed with it, ``overwrite=True`` so that every repeat writes its
    file, and the width and ``tta`` set).
    """
    bundle_root = Path(bundle_root)
    (bundle_root / "models").mkdir(parents=True, exist_ok=True)
    if pipeline == "model_zoo":
        values: dict[str, Any] = {
            "bundle_root": str(bundle_root),
            "test_datalist": [{"image": c["image"]} for c in find_cases(dataset_dir, check_files=False)],
            "network_def#init_filters": int(width),
            "inferer#roi_size": [int(s) for s in zoo_roi_size],
            **(overrides or {}),
        }
        workflow = ConfigWorkflow(
            config_file=str(MODEL_ZOO_RECIPE), logging_file=False, workflow_type="inference", **values
        )
        workflow.initialize()
        return workflow
    if pipeline not in ("segresnet_vae", "espnet3d"):
        raise ValueError(f"unknown inference pipeline {pipeline!r}")
    width_key = "network_def#init_filters" if pipeline == "segresnet_vae" else "network_width"
    values = {
        "bundle_root": str(bundle_root),
        "dataset_dir": str(dataset_dir),
        "num_workers": 0,
        "overwrite": True,
        "tta": bool(tta),
        width_key: int(width),
        **(overrides or {}),
    }
    return bundle_workflow(pipeline, "inference.json", workflow_type="inference", **values)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One inference pipeline on one case: plain runs (warm-up + timed), then TTA runs in the same process.

    Spec keys: ``pipeline``, ``width``, ``case_dir``, ``work_dir``, ``tta`` (also run the TTA phase),
    ``warmup``, ``repeats``, ``tta_repeats``, ``budget_s``, ``threads``, ``zoo_roi_size``, ``overrides``.
    """
    device = setup_torch(spec.get("threads", os.cpu_count() or 1))
    work = Path(spec["work_dir"])
    dataset_dir = single_case_dir(spec["case_dir"], work)
    phases = [("plain", False, spec.get("warmup", 1), spec.get("repeats", 3))]
    if spec.get("tta"):
        # the plain runs above warmed this process up (same shapes, same kernels)
        phases.append(("tta", True, 0, spec.get("tta_repeats", 1)))
    result: dict[str, Any] = {
        "pipeline": spec["pipeline"],
        "width": spec["width"],
        "label": spec.get("label"),
        "overrides": spec.get("overrides"),
        "phases": {},
    }
    for phase, tta, warmup, repeats in phases:
        root = work / phase
        shutil.rmtree(root, ignore_errors=True)
        workflow = inference_workflow(
            spec["pipeline"],
            spec["width"],
            dataset_dir,
            root,
            tta=tta,
            zoo_roi_size=spec.get("zoo_roi_size", (240, 240, 160)),
            overrides=spec.get("overrides"),
        )
        network = workflow.parser.get_parsed_content("network")
        torch.save(network.state_dict(), root / "models" / "model.pt")  # random weights: no trained model exists
        timer = ForwardTimer(network, device)
        rss_setup = peak_rss_mib()
        reset_gpu_peak(device)
        warm, times = time_runs(workflow.run, warmup, repeats, spec.get("budget_s", 0.0))
        workflow.finalize()  # raises if the case failed (the bundles record failures instead of stopping)
        if not sorted((root / "eval").rglob("*.nii.gz")):
            raise RuntimeError(f"{spec['pipeline']} wrote no label map under {root / 'eval'}")
        runs = len(warm) + len(times)
        per_run = len(timer.times) // runs if runs else 0
        info: dict[str, Any] = {
            "warmup_s": warm,
            "times_s": times,
            "forward_times_s": timer.times[len(warm) * per_run :],
            "forwards_per_case": per_run,
            "network_input": list(timer.shapes[0]) if timer.shapes else None,
            "rss_after_setup_mib": rss_setup,
            "peak_rss_mib": peak_rss_mib(),
            "gpu_peak_mib": gpu_peak_mib(device),
        }
        if phase == "plain" and timer.shapes:
            meta_net = meta_copy(network).eval()
            x = torch.empty(timer.shapes[0], device="meta")
            with torch.no_grad():
                info["flops_per_forward"] = count_flops(lambda m=meta_net, x=x: m(x))
        result["phases"][phase] = info
        timer.remove()
        shutil.rmtree(root / "eval", ignore_errors=True)
    return result


def table(results: list[dict[str, Any]]) -> str:
    """Per case end to end: median seconds, ratio to the Model Zoo recipe, network share, peak memory."""
    zoo = next((r for r in results if r.get("pipeline") == "model_zoo" and "phases" in r), None)
    zoo_t = median(zoo["phases"]["plain"]["times_s"]) if zoo else None
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r.get("label", "?"), "", "", "failed", "", "", "", "", "", "", r["error"][:80]])
            continue
        for phase, info in r["phases"].items():
            t = median(info["times_s"])
            rows.append(
                [
                    r.get("label") or LABELS[r["pipeline"]],
                    r["width"],
                    "8 flips" if phase == "tta" else "no",
                    t,
                    len(info["times_s"]),
                    ratio(t, zoo_t),
                    dims(info["network_input"]),
                    median(info["forward_times_s"]),
                    info["forwards_per_case"],
                    info["peak_rss_mib"],
                    info["gpu_peak_mib"],
                ]
            )
    headers = [
        "pipeline",
        "width",
        "TTA",
        "s / case",
        "n",
        "vs Model Zoo",
        "network input",
        "s / forward",
        "forwards",
        "peak RSS MiB",
        "peak GPU MiB",
    ]
    return format_table(headers, rows)
