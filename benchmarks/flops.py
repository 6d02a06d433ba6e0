"""FLOP counting, and the section ``flops``: the machine's measured peak and the achieved FLOP/s of the networks.

The peak is a large matmul in fp32 and bf16; the networks' FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode`` on a meta-device copy (convolutions and matmuls only), giving the
achieved FLOP/s of the measured forward passes and training iterations as % of that peak.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.machine import setup_torch
from benchmarks.tables import dims, format_table
from benchmarks.timing import median, sync, time_runs
from brats_pipeline.inference.inferer import cpu_has_native_bf16

__all__ = ["count_flops", "meta_copy", "peak_table", "peak_worker", "table"]


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the convolutions and matmuls run by ``fn`` (``FlopCounterMode``; elementwise ops, norms and
    interpolations are not counted). Run it on meta tensors to count without computing."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def meta_copy(network: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``network`` on the meta device (shapes only), for counting FLOPs at no compute cost."""
    return copy.deepcopy(network).to("meta")


def peak_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The machine's measured matmul peak: ``size``-square matmuls in fp32 (and bf16 where supported)."""
    device = setup_torch(spec.get("threads", os.cpu_count() or 1))
    n = int(spec.get("size", 4096))
    dtypes = [torch.float32]
    if device.type == "cuda" or cpu_has_native_bf16():
        dtypes.append(torch.bfloat16)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    out: dict[str, Any] = {"size": n, "flops_per_matmul": 2 * n**3}
    for dtype in dtypes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)

        def mm(a: torch.Tensor = a, b: torch.Tensor = b) -> None:
            torch.mm(a, b)
            sync(device)

        _, times = time_runs(mm, spec.get("warmup", 1), spec.get("repeats", 5))
        name = str(dtype).removeprefix("torch.")
        out[name] = {"times_s": times, "gflops": 2 * n**3 / median(times) / 1e9}
    return out


def peak_table(peak: dict[str, Any] | None) -> str:
    """The measured matmul peak per dtype."""
    rows = []
    for dtype in ("float32", "bfloat16"):
        if peak and dtype in peak:
            rows.append([dtype, f"{peak['size']}^2", median(peak[dtype]["times_s"]), peak[dtype]["gflops"]])
    return format_table(["dtype", "matmul", "s (median)", "GFLOP/s"], rows)


def table(inference: list[dict[str, Any]], training: list[dict[str, Any]], peak: dict[str, Any] | None) -> str:
    """FLOPs per forward pass and achieved FLOP/s of the measured forward passes / iterations."""
    # imported here: both sections count their FLOPs with this module
    from benchmarks import inference as inference_section
    from benchmarks import training as training_section

    peaks = {k: peak[k]["gflops"] for k in ("float32", "bfloat16") if peak and k in peak}

    def of_peak(gflops: float | None, dtype: str) -> str:
        short = "bf16" if dtype == "bfloat16" else "fp32"
        return "—" if not gflops or dtype not in peaks else f"{100 * gflops / peaks[dtype]:.1f} ({short})"

    rows = []
    for r in inference:
        info = r.get("phases", {}).get("plain")
        if not info or "flops_per_forward" not in info:
            continue
        gflop = info["flops_per_forward"] / 1e9
        fwd = median(info["forward_times_s"])
        dtype = "bfloat16" if (r.get("overrides") or {}).get("inferer#amp") else "float32"
        rows.append(
            [
                f"{r.get('label') or inference_section.LABELS[r['pipeline']]} w{r['width']}",
                "inference forward",
                dims(info["network_input"]),
                gflop,
                fwd,
                None if not fwd else gflop / fwd,
                of_peak(None if not fwd else gflop / fwd, dtype),
            ]
        )
    for r in training:
        if "times_s" not in r:
            continue
        t = median(r["times_s"])
        crop = dims([r["batch_size"], *r["roi_size"]])
        name = f"{training_section.LABELS[r['model']]} w{r['width']}"
        rows.append([name, "training forward", crop, r["flops_per_forward"] / 1e9, None, None, None])
        gflop = r["flops_per_iteration"] / 1e9
        rows.append([name, "training iteration", crop, gflop, t, gflop / t, of_peak(gflop / t, "float32")])
    headers = ["network", "pass", "input (B x H x W x D)", "GFLOP", "s", "GFLOP/s", "% of peak"]
    return format_table(headers, rows)
