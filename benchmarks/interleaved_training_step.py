"""Interleaved A/B timing of one training iteration: segresnet_vae (separate VAE decoder, paper loss) against
MONAI's ``SegResNetVAE``, at the same width and crop, in one process.

``run_benchmarks.py`` times each configuration in its own process, one after the other, so a slow drift of the
machine (other jobs, thermal state) lands on one side. Here the two steps alternate (A, B, A, B, ...) after one
warm-up each, and the table gives every run, the medians and their ratio. Run from the repository root
(``python -m benchmarks.interleaved_training_step`` is the same)::

    python benchmarks/interleaved_training_step.py --width 16 --rounds 4
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # run as a file: Python put benchmarks/ first on sys.path; import it as the package ``benchmarks`` instead
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.machine import machine_info, setup_torch  # noqa: E402
from benchmarks.tables import format_table  # noqa: E402
from benchmarks.timing import median  # noqa: E402
from benchmarks.training import PAPER_CROP, train_step, training_setup  # noqa: E402

MODELS = ("segresnet_vae", "monai_segresnetvae")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--roi-size", type=int, nargs=3, default=list(PAPER_CROP))
    p.add_argument("--rounds", type=int, default=4, help="timed iterations per model, alternating")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    device = setup_torch(args.threads or os.cpu_count() or 1)
    steps = {}
    for model in MODELS:
        network, loss_fn, optimizer, image, label, _, _ = training_setup(
            model, args.width, list(args.roi_size), 1, device
        )
        network.train()
        steps[model] = train_step(network, loss_fn, optimizer, image, label)
    times: dict[str, list[float]] = {m: [] for m in MODELS}
    for model in MODELS:
        steps[model]()  # warm-up
    for _ in range(args.rounds):
        for model in MODELS:
            t0 = time.perf_counter()
            steps[model]()
            times[model].append(time.perf_counter() - t0)
    info = machine_info()
    print(
        f"{info['date']}, {info.get('cpu', '?')}, {info['cores']} cores, torch {info['torch']}, monai {info['monai']}"
    )
    print(f"width {args.width}, crop {'x'.join(map(str, args.roi_size))}, batch 1, load average {info.get('loadavg')}")
    print()
    rows = [[m, ", ".join(f"{t:.2f}" for t in times[m]), f"{median(times[m]):.2f}"] for m in MODELS]
    print(format_table(["model", "runs (s, in order)", "median s"], rows, pad=False))
    ratio = median(times[MODELS[0]]) / median(times[MODELS[1]])
    print(f"\nsegresnet_vae / MONAI SegResNetVAE: {ratio:.3f}x")


if __name__ == "__main__":
    main()
