"""Training-loader throughput as a GPU would see it: cases per second per CPU core, for both bundles.

Builds ``train#dataset`` of each bundle's shipped ``train.json`` (paper crop, random crop and augmentation included)
on full-size synthetic cases and reads every item in one process with one thread (= one DataLoader worker), for

* ``nifti``: no cache, four gzip NIfTI volumes decoded per case and epoch;
* ``persistent``: the default persistent cache (``brats_pipeline.data.cache``), read after one filling epoch;
* ``memory``: MONAI's in-memory ``CacheDataset`` (``cache_rate`` 1), after filling.

It prints cases/s per core, the ratio against ``nifti``, the workers needed to feed ``--cases-per-second`` (8: an
H100 at the paper's crop) or one case per ``--step-time`` seconds, the cost of filling the cache and its size per
case, as a Markdown table (and ``--json`` for a file). ``--baseline-ref REF`` adds the NIfTI path of the bundle's
``train.json`` at git ``REF`` (its transforms, no cache) as a row and a column of ratios. Run it on an idle
machine (``python -m benchmarks.loader_throughput`` is the same)::

    python benchmarks/loader_throughput.py --cases 6 --epochs 3 --baseline-ref b734885
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # run as a file: Python put benchmarks/ first on sys.path; import it as the package ``benchmarks`` instead
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from benchmarks.tables import format_table  # noqa: E402
from benchmarks.timing import median, time_runs  # noqa: E402
from brats_pipeline.bundle.workflows import bundle_workflow, config_at_revision  # noqa: E402
from brats_pipeline.tools.synthetic import generate_dataset  # noqa: E402

BUNDLES = ("segresnet_vae", "espnet3d")
MODES = {
    "nifti": {"persistent_cache": False, "cache_rate": 0.0},
    "persistent": {"persistent_cache": True, "cache_rate": 0.0},
    "memory": {"persistent_cache": False, "cache_rate": 1.0},
}


def train_dataset(bundle: str, dataset_dir: Path, root: Path, mode: str, overrides: dict, config: Path | None = None):
    """``train#dataset`` of the bundle's ``train.json`` (or of ``config``, an older one) in ``mode``."""
    wf = bundle_workflow(
        bundle,
        config or "train.json",
        bundle_root=str(root),
        dataset_dir=str(dataset_dir),
        num_folds=1,
        fold=-1,  # every case trains
        num_workers=0,
        check_labels=False,
        **MODES[mode],
        **overrides,
    )
    return wf.parser.get_parsed_content("train#dataset")


def read_epoch(dataset) -> None:
    """Every item of ``dataset`` once, in order."""
    for i in range(len(dataset)):
        assert dataset[i]["image"].ndim == 4


def measure(
    bundle: str, dataset_dir: Path, work: Path, mode: str, epochs: int, overrides: dict, config: Path | None = None
) -> dict:
    root = work / f"{bundle}_{mode}{'_baseline' if config else ''}"
    start = time.perf_counter()
    dataset = train_dataset(bundle, dataset_dir, root, mode, overrides, config)
    build = time.perf_counter() - start  # the in-memory cache fills here
    # the persistent cache's first epoch writes the entries: its time is the fill, then come the timed epochs
    fill, times = time_runs(lambda: read_epoch(dataset), warmup=int(mode == "persistent"), repeats=epochs)
    n = len(dataset)
    row = {
        "bundle": bundle,
        "mode": mode,
        "cases": n,
        "s_per_case": median(times) / n,
        "fill_s_per_case": (fill[0] if fill else build) / n if mode != "nifti" else None,
    }
    if mode == "persistent":
        files = list((root / "cache").glob("*.pt"))
        row["cache_mb_per_case"] = sum(f.stat().st_size for f in files) / 1e6 / max(len(files), 1)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=6, help="synthetic full-size cases")
    parser.add_argument("--shape", type=int, nargs=3, default=(240, 240, 155))
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per row (median)")
    parser.add_argument("--cases-per-second", type=float, default=8.0, help="rate a GPU consumes")
    parser.add_argument("--step-time", type=float, default=None, help="GPU seconds per case (overrides the rate)")
    parser.add_argument("--bundles", nargs="+", default=list(BUNDLES))
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--override", nargs=2, action="append", default=[], metavar=("KEY", "JSON"))
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument(
        "--baseline-ref",
        default=None,
        help="git ref whose train.json adds a 'nifti at REF' row per bundle (the NIfTI path of that version)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    overrides = {k: json.loads(v) for k, v in args.override}
    rate_needed = 1.0 / args.step_time if args.step_time else args.cases_per_second

    rows = []
    with tempfile.TemporaryDirectory(prefix="loader_bench_") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        generate_dataset(work / "data", args.cases, layout="brats2023", shape=tuple(args.shape), seed=0)
        print(f"generated {args.cases} cases of {tuple(args.shape)} in {time.perf_counter() - t0:.1f} s", flush=True)
        for bundle in args.bundles:
            if args.baseline_ref:
                old = config_at_revision(
                    bundle, "train.json", args.baseline_ref, work / f"{bundle}_{args.baseline_ref}"
                )
                row = measure(bundle, work / "data", work, "nifti", args.epochs, overrides, old)
                row["mode"] = f"nifti at {args.baseline_ref}"
                rows.append(row)
                print(f"  {bundle} {row['mode']}: {row['s_per_case']:.3f} s/case", flush=True)
            for mode in args.modes:
                row = measure(bundle, work / "data", work, mode, args.epochs, overrides)
                rows.append(row)
                print(f"  {bundle} {mode}: {row['s_per_case']:.3f} s/case", flush=True)

    base = {r["bundle"]: r["s_per_case"] for r in rows if r["mode"] == "nifti"}
    old_base = {r["bundle"]: r["s_per_case"] for r in rows if r["mode"].startswith("nifti at ")}
    print(
        f"\nLoader throughput, one process and one thread per row ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}); {args.cases} cases of {tuple(args.shape)}, "
        f"median of {args.epochs} epochs; workers to feed {rate_needed:g} cases/s\n"
    )
    headers = ["bundle", "loader", "s/case", "cases/s per core", "vs NIfTI"]
    headers += [f"vs NIfTI at {args.baseline_ref}"] if args.baseline_ref else []
    headers += ["workers for the GPU", "fill s/case", "cache MB/case"]
    table = []
    for r in rows:
        per_core = 1.0 / r["s_per_case"]
        r["cases_per_s_per_core"] = per_core
        r["speedup_vs_nifti"] = base[r["bundle"]] / r["s_per_case"] if r["bundle"] in base else None
        r["workers_needed"] = math.ceil(rate_needed / per_core)
        ratios = [f"{r['speedup_vs_nifti']:.1f}x" if r["speedup_vs_nifti"] is not None else "-"]
        if args.baseline_ref:
            r["speedup_vs_baseline_nifti"] = old_base[r["bundle"]] / r["s_per_case"]
            ratios.append(f"{r['speedup_vs_baseline_nifti']:.1f}x")
        table.append(
            [r["bundle"], r["mode"], f"{r['s_per_case']:.3f}", f"{per_core:.2f}", *ratios, r["workers_needed"]]
            + [f"{r['fill_s_per_case']:.2f}" if r.get("fill_s_per_case") is not None else "-"]
            + [f"{r['cache_mb_per_case']:.1f}" if "cache_mb_per_case" in r else "-"]
        )
    print(format_table(headers, table, pad=False))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rate_needed": rate_needed, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
