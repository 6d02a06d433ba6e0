"""Speed and memory benchmarks of the two bundles, side by side with MONAI's own recipes, in one run.

Run from the repository root (``python -m benchmarks.run_benchmarks`` is the same)::

    python benchmarks/run_benchmarks.py --repeats 3 --warmup 1     # full sizes (docs/performance.md)
    python benchmarks/run_benchmarks.py --quick                     # small sizes, to check the script works

Sections (``--sections``, all by default), each printed as a Markdown table with ratios, each a module of the
package ``benchmarks``:

``inference`` (:mod:`benchmarks.inference`)
    One case end to end through the bundles' ``inference.json`` against the MONAI Model Zoo
    ``brats_mri_segmentation`` recipe (``benchmarks/model_zoo_recipe.json``), with and without 8-flip TTA.
``training`` (:mod:`benchmarks.training`)
    One training iteration of what the bundles' ``train.json`` builds, against MONAI's ``SegResNetVAE``.
``data`` (:mod:`benchmarks.data`)
    The bundles' ``train#dataset`` with and without ``CacheDataset``, under several loaders, against the step.
``flops`` (:mod:`benchmarks.flops`)
    The machine's measured matmul peak and the FLOPs and achieved FLOP/s of every network above.
``levers`` (:mod:`benchmarks.levers`)
    Forward-pass switches (``inference_mode``, ``channels_last_3d``, bf16, ``torch.compile``) at the brain crop.

The inference case is ``--case-dir``, by default the real BraTS case ``--real-case``; with ``--quick``, or when
that folder is missing, a synthetic case of the benchmark size.

Every configuration runs in its own subprocess: a fresh interpreter isolates warm-up effects and gives an
honest peak RSS (``resource.getrusage``; with CUDA also ``torch.cuda.max_memory_allocated``). Times are the
median of ``--repeats`` timed runs after ``--warmup`` untimed ones; a row stops repeating once its timed runs
exceed ``--row-budget`` seconds (the tables give the number of timed runs, ``n``). The script uses CUDA, AMP
and ``cudnn.benchmark`` when a GPU is present.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and not __package__:
    # run as a file: Python put benchmarks/ first on sys.path; import it as the package ``benchmarks`` instead
    sys.path[0] = str(REPO_ROOT)

from benchmarks import data, flops, inference, levers, training  # noqa: E402
from benchmarks.machine import machine_info  # noqa: E402
from benchmarks.timing import median  # noqa: E402

#: the real BraTS 2023 case of the development machine (``--real-case``)
REAL_CASE = REPO_ROOT.parent / "shared/data/BraTS-GLI-00001-000"
RESULT_MARKER = "BENCHMARK_RESULT "
SECTIONS: tuple[str, ...] = ("inference", "training", "data", "flops", "levers")

#: full-size settings: the BraTS volume, the paper's training crop, the Model Zoo recipe's window
FULL_SIZES: dict[str, Any] = {
    "case_shape": (240, 240, 155),
    "zoo_roi_size": (240, 240, 160),
    "train_roi_size": training.PAPER_CROP,
    "train_batch_size": 1,
    "espnet_roi_size": None,  # None: the bundle's train.json roi_size and batch_size
    "espnet_batch_size": None,
    "data_shape": (240, 240, 155),
    "data_cases": 6,
    "data_roi_size": None,  # None: the bundle's own crop
}
#: --quick: the same pipelines on small synthetic volumes
QUICK_SIZES: dict[str, Any] = {
    "case_shape": (96, 96, 64),
    "zoo_roi_size": (96, 96, 64),
    "train_roi_size": (32, 48, 32),
    "train_batch_size": 1,
    "espnet_roi_size": (32, 32, 32),
    "espnet_batch_size": 2,
    "data_shape": (64, 64, 48),
    "data_cases": 6,
    "data_roi_size": (32, 48, 32),
}

#: the measurement a worker subprocess runs, by its spec's ``kind``
WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "inference": inference.worker,
    "training": training.worker,
    "peak": flops.peak_worker,
    "data": data.worker,
    "levers": levers.worker,
}


def run_worker(spec: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
    """Run ``WORKERS[spec["kind"]](spec)`` in a fresh Python process; its result, or ``{"error": ...}``."""
    env = dict(os.environ)
    threads = str(spec.get("threads", os.cpu_count() or 1))
    env.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONWARNINGS": "ignore"})
    if spec.get("kind") == "levers" and spec.get("work_dir"):  # a cold torch.compile cache: honest compile times
        env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(spec["work_dir"]) / "inductor_cache")
    cmd = [sys.executable, "-m", "benchmarks.run_benchmarks", "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s", "wall_s": time.perf_counter() - t0}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER) :])
            result["wall_s"] = time.perf_counter() - t0
            return result
    tail = (proc.stderr or proc.stdout)[-2000:]
    return {"error": f"exit code {proc.returncode}: {tail}", "wall_s": time.perf_counter() - t0}


def worker_main(spec_json: str) -> None:
    """The subprocess side of :func:`run_worker`: run the spec, print its result on one marked line."""
    spec = json.loads(spec_json)
    result = WORKERS[spec["kind"]](spec)
    sys.stdout.flush()
    print(RESULT_MARKER + json.dumps(result), flush=True)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_plan(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """The worker specs of each section, from the command line."""
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    common = {"threads": args.threads, "warmup": args.warmup, "repeats": args.repeats, "budget_s": args.row_budget}
    work = Path(args.work_dir)
    plan: dict[str, list[dict[str, Any]]] = {s: [] for s in SECTIONS}
    plan["flops"].append({"kind": "peak", "threads": args.threads, "size": args.matmul_size, "warmup": 1, "repeats": 5})
    # the levers in the real pipeline: BratsInferer's own autocast (bf16 on CPU; the evaluator's amp is CUDA-only)
    # and channels_last_3d weights (the espnet3d bundle already uses them on CPU)
    amp = {"inferer#amp": True}
    channels_last = {"network": "$@network_def.to(device=@device, memory_format=torch.channels_last_3d)"}
    inference_rows = [
        ("model_zoo", 16, False, None, None),
        ("segresnet_vae", 16, True, None, None),
        ("segresnet_vae", 32, True, None, None),
        ("espnet3d", 32, True, None, None),
    ]
    if args.amp_rows:
        inference_rows += [
            ("segresnet_vae", 16, False, channels_last, "segresnet_vae + channels_last"),
            ("segresnet_vae", 16, False, {**channels_last, **amp}, "segresnet_vae + channels_last + amp"),
            ("segresnet_vae", 32, False, {**channels_last, **amp}, "segresnet_vae + channels_last + amp"),
            ("espnet3d", 32, False, amp, "espnet3d + amp"),
        ]
    for i, (pipeline, width, tta, overrides, label) in enumerate(inference_rows):
        plan["inference"].append(
            {
                "kind": "inference",
                "pipeline": pipeline,
                "width": width,
                "label": label,
                "overrides": overrides,
                "tta": tta and not args.no_tta,
                "tta_repeats": args.tta_repeats,
                "case_dir": args.case_dir,
                "zoo_roi_size": list(sizes["zoo_roi_size"]),
                "work_dir": str(work / f"inference_{i}_{pipeline}_{width}"),
                **common,
            }
        )
    for model, width in [
        ("segresnet_vae", 32),
        ("monai_segresnetvae", 32),
        ("segresnet_vae", 16),
        ("monai_segresnetvae", 16),
    ]:
        plan["training"].append(
            {
                "kind": "training",
                "model": model,
                "width": width,
                "roi_size": list(sizes["train_roi_size"]),
                "batch_size": sizes["train_batch_size"],
                **common,
            }
        )
    plan["training"].append(
        {
            "kind": "training",
            "model": "espnet3d",
            "width": 32,
            "roi_size": sizes["espnet_roi_size"],
            "batch_size": sizes["espnet_batch_size"],
            **common,
        }
    )
    loaders = [{"cache": c, "loader": "DataLoader", "workers": w} for c in (False, True) for w in (0, 1, 2)]
    loaders += [{"cache": c, "loader": "ThreadDataLoader", "workers": 0} for c in (False, True)]
    loaders.append({"cache": True, "copy_cache": False, "loader": "ThreadDataLoader", "workers": 0})
    for bundle in ("segresnet_vae", "espnet3d"):
        plan["data"].append(
            {
                "kind": "data",
                "bundle": bundle,
                "dataset_dir": None,  # filled in once the synthetic data exists
                "roi_size": sizes["data_roi_size"],
                "loaders": loaders,
                "cache_workers": args.threads,
                "threads": args.threads,
                "warmup": args.warmup,
                "repeats": args.data_epochs,
            }
        )
    variants = [v for v in levers.VARIANTS if args.compile or v != "compile"]
    for pipeline, width in (("segresnet_vae", 16), ("espnet3d", 32)):
        plan["levers"].append(
            {
                "kind": "levers",
                "pipeline": pipeline,
                "width": width,
                "case_dirs": None,  # filled in once the synthetic hold-out cases exist
                "variants": variants,
                "recompile_check": args.recompile_check,
                "work_dir": str(work / f"levers_{pipeline}"),
                **common,
            }
        )
    return plan


def run_plan(args: argparse.Namespace) -> dict[str, Any]:
    """Run every worker of the chosen sections, one after the other; the results by section."""
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    sections = [s for s in SECTIONS if s in args.sections]
    plan = build_plan(args)
    results: dict[str, Any] = {"machine": machine_info(), "command": " ".join(sys.argv), "sizes": sizes}
    data_root = Path(args.data_dir)
    need_synthetic = bool({"data", "levers"} & set(sections)) or not args.case_dir
    if need_synthetic:
        _log(f"synthetic cases {sizes['data_shape']} in {data_root} (generated once, then reused)")
        data_dir = data.synthetic_dataset(data_root, sizes["data_cases"], sizes["data_shape"])
    if not args.case_dir:  # --quick, or the real case is missing: a synthetic case of the benchmark size
        case_root = data.synthetic_dataset(data_root, 1, sizes["case_shape"], with_labels=False)
        args.case_dir = str(next(p for p in sorted(case_root.iterdir()) if p.is_dir()))
        for spec in plan["inference"]:
            spec["case_dir"] = args.case_dir
    results["case_dir"] = args.case_dir
    for spec in plan["data"]:
        spec["dataset_dir"] = str(data_dir) if need_synthetic else None
    holdout = sorted(p for p in data_dir.iterdir() if p.is_dir())[-2:] if need_synthetic else []
    for spec in plan["levers"]:
        spec["case_dirs"] = [args.case_dir] + [str(p) for p in holdout]

    for section in ("flops", "inference", "training", "data", "levers"):
        if section not in sections and not (section == "flops" and {"training", "inference"} & set(sections)):
            continue
        results[section] = []
        t_section = time.perf_counter()
        for spec in plan[section]:
            label = spec.get("pipeline") or spec.get("model") or spec.get("bundle") or spec["kind"]
            _log(f"{section}: {label} {spec.get('width', '')} ...")
            out = run_worker(spec, timeout_s=args.worker_timeout or None)
            out.setdefault("label", spec.get("label"))
            if "error" in out:
                out["label"] = f"{label} {spec.get('width', '')}".strip()
                _log(f"  FAILED: {out['error'][-500:]}")
            else:
                _log(f"  done in {out['wall_s']:.0f} s")
            results[section].append(out)
        results.setdefault("section_s", {})[section] = time.perf_counter() - t_section
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def report(results: dict[str, Any]) -> str:
    """All tables of a run, as Markdown."""
    m = results["machine"]
    peak = next((r for r in results.get("flops", []) if "float32" in r), None)
    lines = [
        "# Benchmark results",
        "",
        f"- date: {m['date']}; command: `{results['command']}`",
        f"- machine: {m.get('cpu', '?')}, {m['cores']} cores, {m.get('memory_gib', '?')} GiB; GPU: {m['cuda'] or 'none'}",
        f"- torch {m['torch']}, monai {m['monai']}, Python {m['python']}",
        f"- load average (1, 5, 15 min) at start {m.get('loadavg')}, at end {results.get('loadavg_end')}",
        f"- case: {results.get('case_dir')}",
        "",
    ]
    if peak:
        lines += ["## Machine peak (matmul)", "", flops.peak_table(peak), ""]
    if "inference" in results:
        lines += ["## 1. Inference, one case end to end", "", inference.table(results["inference"]), ""]
    if "training" in results:
        lines += ["## 2. One training iteration", "", training.table(results["training"], peak), ""]
    if "data" in results:
        steps: dict[str, float | None] = {}
        for r in results.get("training", []):
            if "times_s" in r and (r["model"], r["width"]) in (("segresnet_vae", 32), ("espnet3d", 32)):
                steps[r["model"]] = median(r["times_s"])
        lines += ["## 3. Training input pipeline", "", data.table(results["data"], steps), ""]
    if "training" in results or "inference" in results:
        lines += [
            "## 4. FLOPs and achieved FLOP/s",
            "",
            flops.table(results.get("inference", []), results.get("training", []), peak),
            "",
        ]
    if "levers" in results:
        lines += ["## 5. Levers (forward pass)", "", levers.table(results["levers"], results.get("inference", [])), ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    p.add_argument(
        "--row-budget",
        type=float,
        default=60.0,
        help="stop a row's timed runs once they add up to this many seconds (0: always --repeats)",
    )
    p.add_argument("--data-epochs", type=int, default=2, help="timed epochs per loader in the data section")
    p.add_argument("--tta-repeats", type=int, default=1, help="timed TTA runs (after the plain runs warmed up)")
    p.add_argument("--no-tta", action="store_true", help="skip the TTA rows")
    p.add_argument(
        "--amp-rows",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add inference rows with the levers set through config overrides: channels_last_3d weights and\n"
        "inferer#amp=True (BratsInferer's autocast: bf16 on CPU)",
    )
    p.add_argument(
        "--recompile-check",
        action="store_true",
        help="with the compile lever, also time the first call on a second case's shape (a second compile)",
    )
    p.add_argument("--quick", action="store_true", help="small synthetic volumes and crops")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument(
        "--case-dir",
        default=None,
        help="case folder for inference and levers (default: --real-case; with --quick, or when that folder is\n"
        "missing, a synthetic case of the benchmark size)",
    )
    p.add_argument("--real-case", default=str(REAL_CASE), help="the real BraTS case folder (default: %(default)s)")
    p.add_argument(
        "--data-dir",
        default=str(Path(tempfile.gettempdir()) / "brats_benchmark_data"),
        help="cache folder of the synthetic cases",
    )
    p.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--matmul-size", type=int, default=4096)
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure the torch.compile lever (default: on, off with --quick)",
    )
    p.add_argument("--worker-timeout", type=float, default=0.0, help="seconds per configuration (0: none)")
    p.add_argument("--json", default=None, help="also write the raw results to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if args.compile is None:
        args.compile = not args.quick
    if args.case_dir is None and not args.quick and Path(args.real_case).is_dir():
        args.case_dir = args.real_case
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    own_work_dir = args.work_dir is None
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="brats_benchmark_")
    t0 = time.perf_counter()
    try:
        results = run_plan(args)
    finally:
        if own_work_dir:
            shutil.rmtree(args.work_dir, ignore_errors=True)
    results["total_s"] = time.perf_counter() - t0
    sections = ", ".join(f"{k} {v / 60:.1f}" for k, v in results.get("section_s", {}).items())
    text = report(results) + f"\nTotal benchmark time: {results['total_s'] / 60:.1f} min ({sections})\n"
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    failed = [r for s in SECTIONS for r in results.get(s, []) if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
