"""The machine a benchmark runs on: its description for a report's header, and torch set up to use it."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import monai
import torch

from brats_pipeline.inference.inferer import cpu_has_native_bf16

__all__ = ["machine_info", "setup_torch"]


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, load, library versions and date, for the header of the report."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "cores": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / 1024**2, 1)
    with contextlib.suppress(OSError):
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    info["bf16_cpu"] = cpu_has_native_bf16()
    return info


def setup_torch(threads: int) -> torch.device:
    """Threads for intra-op parallelism, ``cudnn.benchmark`` on a GPU; returns the device to use."""
    torch.set_num_threads(max(1, int(threads)))
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda:0")
    return torch.device("cpu")
