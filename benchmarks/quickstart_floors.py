"""The held-out Dice behind the quickstart test's floors: the reduced quickstart runs of ``tests/test_quickstart.py``
over several seeds, with the CPU's own kernels and with those an AVX2-only CPU picks, and an untrained network.

Run on an idle machine (each run uses one thread; a row takes one to a few minutes)::

    python -m benchmarks.quickstart_floors --seeds "[0,1,2]" --isas "['native','avx2']"
    python -m benchmarks.quickstart_floors --documented True --seeds "[0]" --untrained False  # docs/quickstart.md

``avx2`` sets ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``: on an AVX-512 machine
PyTorch, oneDNN and MKL then take the kernels of an AVX2-only CPU, whose float32 sums round otherwise, so training
follows another trajectory from the same seed. ``untrained`` rows train one epoch at learning rate 0: the held-out
Dice of the initial weights, what a floor must stay well above. Prints a Markdown table and the minimum per bundle.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

import fire

from benchmarks.tables import format_table
from tests.test_quickstart import CASES, REPO, documented_command, with_overrides

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
REGIONS = ("ET", "TC", "WT", "mean")


def run_once(bundle: str, seed: int, isa: str, untrained: bool = False, documented: bool = False) -> dict[str, float]:
    """One reduced quickstart run of ``bundle`` (the test's command and sizes; ``documented``: the documented command
    as written, full size); its held-out Dice and wall time."""
    doc, sizes, _ = CASES[bundle]
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {
            **({} if documented else sizes),
            "seed": str(seed),
            "quickstart_dir": f"{tmp}/data",
            "bundle_root": f"{tmp}/bundle",
        }
        if untrained:
            overrides.update(epochs="1", val_interval="1", learning_rate="0.0")
        cmd = [sys.executable, *with_overrides(documented_command(doc, bundle), overrides)[1:]]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(AVX2_ENV if isa == "avx2" else {})}
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{bundle} seed {seed} {isa}: exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-3000:]}")
    found = dict(re.findall(r"^holdout_(\w+?)_dice\s+([0-9.]+)$", proc.stdout, re.MULTILINE))
    return {**{r: float(found[r]) for r in REGIONS}, "wall_s": wall}


def main(
    bundles: tuple[str, ...] = tuple(CASES),
    seeds: tuple[int, ...] = (0, 1, 2),
    isas: tuple[str, ...] = ("native", "avx2"),
    untrained: bool = True,
    documented: bool = False,
) -> None:
    """Print the held-out Dice of every (bundle, seed, kernels) run, the untrained rows, and each bundle's minimum.
    ``documented``: the documented quickstart commands at full size (the numbers of ``docs/quickstart.md``)."""
    rows, worst = [], {}
    for bundle in bundles:
        runs = [(seed, isa, False) for seed in seeds for isa in isas] + (
            [(seeds[0], isas[0], True)] if untrained else []
        )
        for seed, isa, untrained_run in runs:
            scores = run_once(bundle, seed, isa, untrained_run, documented)
            label = "untrained" if untrained_run else isa
            rows.append([bundle, seed, label, *(f"{scores[r]:.3f}" for r in REGIONS), f"{scores['wall_s']:.0f}"])
            print(format_table(["bundle", "seed", "kernels", *REGIONS, "wall s"], rows[-1:], pad=False), flush=True)
            if not untrained_run:
                worst[bundle] = {r: min(worst.get(bundle, {}).get(r, 1.0), scores[r]) for r in REGIONS}
    print()
    print(format_table(["bundle", "seed", "kernels", *(f"{r} Dice" for r in REGIONS), "wall s"], rows))
    print()
    print(
        format_table(
            ["bundle", *(f"min {r}" for r in REGIONS)],
            [[b, *(f"{v:.3f}" for v in w.values())] for b, w in worst.items()],
        )
    )


if __name__ == "__main__":
    fire.Fire(main)
