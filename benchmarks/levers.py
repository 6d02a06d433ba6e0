"""The section ``levers``: forward-pass switches on the bundles' networks at the brain-cropped case size.

``torch.inference_mode``, ``channels_last_3d``, bf16 autocast (with the agreement, as Dice, between the fp32 and
bf16 label maps on the real case and synthetic hold-out cases) and ``torch.compile`` (compile time reported
separately).
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.data import single_case_dir
from benchmarks.inference import inference_workflow
from benchmarks.machine import setup_torch
from benchmarks.memory import peak_rss_mib
from benchmarks.tables import dims, format_table, ratio
from benchmarks.timing import median, sync, time_runs
from brats_pipeline.transforms.labels import classes_to_regions

__all__ = ["VARIANTS", "table", "worker"]

#: forward-pass variants; the first is the baseline (what the segresnet_vae bundle runs)
VARIANTS: tuple[str, ...] = (
    "no_grad fp32",
    "inference_mode",
    "channels_last",
    "bf16",
    "bf16 channels_last",
    "compile",
)


def _region_dice(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Dice per channel between two boolean maps ``(C, *spatial)``; 1 where both are empty."""
    out = []
    for x, y in zip(a, b, strict=True):
        denom = int(x.sum()) + int(y.sum())
        out.append(1.0 if denom == 0 else 2.0 * int((x & y).sum()) / denom)
    return out


def _regions_of(pipeline: str, logits: torch.Tensor) -> torch.Tensor:
    """Boolean TC/WT/ET maps ``(3, *spatial)`` from one case's logits ``(1, C, *spatial)``."""
    if pipeline == "segresnet_vae":
        return logits[0].float().sigmoid() > 0.5
    return classes_to_regions(logits[0].float().argmax(0)) > 0


def _variant(
    name: str,
    network: torch.nn.Module,
    images: list[torch.Tensor],
    reference: list[torch.Tensor],
    spec: dict[str, Any],
    device: torch.device,
    amp_dtype: torch.dtype,
) -> dict[str, Any]:
    """Time one forward-pass variant on ``images[0]``; for bf16 and compile also the label agreement with fp32.

    ``torch.compile`` specialises on the input shape (``dynamic=False``): its first call is the compile time,
    and the first call on a second case's (different) brain-crop shape is reported as the recompile time.
    """
    net = copy.deepcopy(network)
    fmt = torch.channels_last_3d if "channels_last" in name else torch.contiguous_format
    net = net.to(memory_format=fmt)
    grad_ctx = torch.inference_mode if "inference_mode" in name else torch.no_grad
    amp = "bf16" in name
    compiled = "compile" in name

    def ctx() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(grad_ctx())
        if amp:
            stack.enter_context(torch.autocast(device.type, dtype=amp_dtype))
        return stack

    if compiled:
        net = torch.compile(net, dynamic=False)
    inputs = [x.contiguous(memory_format=fmt) for x in images]

    def forward(x: torch.Tensor = inputs[0]) -> torch.Tensor:
        with ctx():
            out = net(x)
        sync(device)
        return out

    row: dict[str, Any] = {"variant": name, "compile_s": None}
    if compiled:
        t0 = time.perf_counter()
        forward()
        row["compile_s"] = time.perf_counter() - t0
    _, row["times_s"] = time_runs(forward, spec.get("warmup", 1), spec.get("repeats", 3), spec.get("budget_s", 0.0))
    if amp or compiled:
        checked = inputs[:1] if compiled else inputs  # each new shape recompiles
        row["agreement_dice"] = [
            _region_dice(ref, _regions_of(spec["pipeline"], forward(x)))
            for x, ref in zip(checked, reference, strict=False)
        ]
    if compiled and spec.get("recompile_check") and len(inputs) > 1 and inputs[1].shape != inputs[0].shape:
        try:
            t0 = time.perf_counter()
            forward(inputs[1])
            row["recompile_s"] = time.perf_counter() - t0
        except Exception as e:  # dynamic-shape lowering bugs show up here
            row["recompile_error"] = f"{type(e).__name__}: {e}"[:300]
    return row


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Forward-pass switches on a bundle's network at the size of its pre-processed (brain-cropped) cases.

    Spec keys: ``pipeline`` (``segresnet_vae``/``espnet3d``), ``width``, ``case_dirs`` (the first is timed, all
    are used for the fp32-vs-bf16 agreement), ``variants`` (names from :data:`VARIANTS`), ``work_dir``,
    ``warmup``, ``repeats``, ``budget_s``, ``threads``.
    """
    device = setup_torch(spec.get("threads", os.cpu_count() or 1))
    work = Path(spec["work_dir"])
    images = []
    for i, case_dir in enumerate(spec["case_dirs"]):
        wf = inference_workflow(
            spec["pipeline"], spec["width"], single_case_dir(case_dir, work / f"case{i}"), work / f"root{i}"
        )
        case = wf.parser.get_parsed_content("dataset")[0]  # the case, pre-processed as the bundle does
        images.append(case["image"].as_tensor()[None].to(device))
        if i == 0:
            network = wf.parser.get_parsed_content("network_def").to(device).eval()
    torch.manual_seed(0)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    with torch.no_grad():
        reference = [_regions_of(spec["pipeline"], network(x)) for x in images]

    rows = []
    for name in spec["variants"]:
        try:
            rows.append(_variant(name, network, images, reference, spec, device, amp_dtype))
        except Exception as e:  # e.g. torch.compile without a working C++ toolchain
            rows.append({"variant": name, "error": f"{type(e).__name__}: {e}"[:300]})
    return {
        "pipeline": spec["pipeline"],
        "width": spec["width"],
        "input": [list(x.shape) for x in images],
        "rows": rows,
        "peak_rss_mib": peak_rss_mib(),
    }


def table(results: list[dict[str, Any]], inference: list[dict[str, Any]]) -> str:
    """Forward time per variant, its speed-up over the first (baseline) variant, agreement of the labels."""
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r.get("label", "?"), "failed", "", "", "", "", "", r["error"][:80]])
            continue
        base = next((median(v["times_s"]) for v in r["rows"] if "times_s" in v), None)
        for v in r["rows"]:
            if "error" in v:
                rows.append([r["pipeline"], v["variant"], "", "", "", "", "", v["error"][:80]])
                continue
            t = median(v["times_s"])
            dice = v.get("agreement_dice")
            rows.append(
                [
                    f"{r['pipeline']} w{r['width']}",
                    v["variant"],
                    dims(r["input"][0][2:]),
                    t,
                    len(v["times_s"]),
                    ratio(base, t),
                    v["compile_s"],
                    v.get("recompile_s") or ("failed" if v.get("recompile_error") else None),
                    None if not dice else f"{min(min(d) for d in dice):.4f}",
                ]
            )
    # brain-bounding-box crop: the same SegResNet (width 16) in the Model Zoo row (whole volume) and ours (crop)
    zoo = next((r for r in inference if r.get("pipeline") == "model_zoo" and "phases" in r), None)
    ours = next(
        (
            r
            for r in inference
            if r.get("pipeline") == "segresnet_vae" and r.get("width") == 16 and "phases" in r and not r.get("label")
        ),
        None,
    )
    if zoo and ours:
        whole = median(zoo["phases"]["plain"]["forward_times_s"])
        for variant, info in (
            ("whole volume (Model Zoo row)", zoo["phases"]["plain"]),
            ("brain bbox crop (segresnet_vae row)", ours["phases"]["plain"]),
        ):
            t = median(info["forward_times_s"])
            rows.append(
                ["SegResNet w16", variant, dims(info["network_input"][2:]), t, len(info["forward_times_s"])]
                + [ratio(whole, t)]
            )
    headers = [
        "network",
        "variant",
        "input",
        "s / forward",
        "n",
        "speed-up",
        "compile s",
        "recompile s (new shape)",
        "min Dice fp32 vs variant",
    ]
    return format_table(headers, rows)
