"""Wall-clock timing: repeated runs, medians, the network's forward passes (synchronised on CUDA)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["ForwardTimer", "median", "sync", "time_runs"]


def sync(device: torch.device | str) -> None:
    """Wait for the queued CUDA work of ``device`` (nothing to wait for on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(
    fn: Callable[[], Any], warmup: int = 1, repeats: int = 3, budget_s: float = 0.0
) -> tuple[list[float], list[float]]:
    """Call ``fn`` ``warmup`` times untimed, then up to ``repeats`` times timed (wall clock, seconds).

    The timed loop stops early once the timed runs add up to ``budget_s`` (``0``: no budget); at least one
    timed run is always made. Returns ``(warmup_times, timed_times)``.
    """
    warm = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t0)
    times: list[float] = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if budget_s and sum(times) >= budget_s:
            break
    return warm, times


def median(values: Sequence[float]) -> float | None:
    """The median of ``values``; ``None`` for none."""
    return statistics.median(values) if values else None


class ForwardTimer:
    """Forward hooks on a module recording each call's wall time and input shape (synchronised on CUDA)."""

    def __init__(self, module: torch.nn.Module, device: torch.device | str) -> None:
        self.device = device
        self.times: list[float] = []
        self.shapes: list[tuple[int, ...]] = []
        self._t0 = 0.0
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    # hooks must return None: a value would replace the inputs / the output
    def _pre(self, module: torch.nn.Module, args: tuple) -> None:
        sync(self.device)
        self.shapes.append(tuple(int(s) for s in args[0].shape))
        self._t0 = time.perf_counter()

    def _post(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        sync(self.device)
        self.times.append(time.perf_counter() - self._t0)

    def reset(self) -> None:
        self.times, self.shapes = [], []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
