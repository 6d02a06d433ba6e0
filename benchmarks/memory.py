"""Peak memory: the process's resident set and, on CUDA, the allocator's high-water mark."""

from __future__ import annotations

import resource

import torch

__all__ = ["gpu_peak_mib", "peak_rss_mib", "reset_gpu_peak"]


def peak_rss_mib() -> float:
    """High-water mark of this process's resident memory (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def gpu_peak_mib(device: torch.device | str) -> float | None:
    """``torch.cuda.max_memory_allocated`` of ``device`` in MiB since the last :func:`reset_gpu_peak`; ``None`` on CPU."""
    device = torch.device(device)
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_gpu_peak(device: torch.device | str) -> None:
    """Start a new high-water mark for :func:`gpu_peak_mib` (nothing to do on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
