"""The project's standing GPU check: what the GPU goals need, for both bundles, in one run (under 8 minutes on one GPU).

Run through ``benchmarks/gpu_check.sh OUT_DIR`` (``--dry-run``: the same steps on CPU at tiny sizes, as CI does).
Everything goes through the shipped configs (``ConfigWorkflow`` of ``train.json`` / ``inference.json`` with
overrides), so the numbers are those of the bundles, not of a rebuilt pipeline:

``train_step``
    one training iteration (forward, loss, backward, optimizer step) at the paper's crop and width, AMP on CUDA:
    s/iteration (median of ``--steps``) and peak GPU memory.
``train_run``
    a short run of the real ``train.json`` (persistent cache on, ``num_workers`` as shipped) on ``--cases``
    full-size synthetic cases for ``--epochs`` epochs: cases/s of the epochs after the cache filled, and the share of
    the epoch the trainer waited for its next batch (Ignite ``GET_BATCH_STARTED`` -> ``GET_BATCH_COMPLETED``).
``inference``
    one full-size case through ``inference.json`` at the paper's width, AMP on CUDA: seconds end to end and in the
    network alone (forward hooks), without and with 8-flip TTA, and with the levers ``channels_last`` and
    ``compile`` (compile time reported separately: the first call).

Writes ``gpu_check.json`` and ``gpu_check.md`` into OUT_DIR and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:
    # run as a file: Python put benchmarks/ first on sys.path; import it as the package ``benchmarks`` instead
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from benchmarks.memory import gpu_peak_mib, reset_gpu_peak  # noqa: E402
from benchmarks.tables import format_table  # noqa: E402
from benchmarks.timing import ForwardTimer, median, sync, time_runs  # noqa: E402
from benchmarks.training import train_step as make_train_step  # noqa: E402
from brats_pipeline.bundle.workflows import bundle_workflow  # noqa: E402
from brats_pipeline.tools.synthetic import generate_dataset  # noqa: E402

BUNDLES = ("segresnet_vae", "espnet3d")
#: paper settings (full run) and the tiny ones of --dry-run
FULL = {
    "shape": (240, 240, 155),
    "segresnet_vae": {"roi_size": [160, 192, 128], "network_width": 32},
    "espnet3d": {"roi_size": [128, 128, 128], "network_width": 32},
}
DRY = {
    "shape": (48, 48, 40),
    "segresnet_vae": {"roi_size": [32, 32, 32], "network_width": 8},
    "espnet3d": {"roi_size": [24, 24, 24], "network_width": 8},
}


def _peak_gib(device: torch.device) -> float | None:
    mib = gpu_peak_mib(device)
    return None if mib is None else mib / 1024


def train_step(bundle: str, sizes: dict, steps: int, root: Path, dataset: Path) -> dict:
    """Median s/iteration of the bundle's network, loss and optimizer at the paper crop, AMP on CUDA."""
    wf = bundle_workflow(
        bundle, "train.json", bundle_root=str(root), dataset_dir=str(dataset), num_folds=1, fold=-1, **sizes
    )
    p = wf.parser
    device, amp = p.get_parsed_content("device"), p.get_parsed_content("amp")
    network, loss_fn, optimizer = (p.get_parsed_content(k) for k in ("network", "loss", "optimizer"))
    batch = int(p.get_parsed_content("batch_size"))
    out_channels = int(p.get_parsed_content("network_def#out_channels"))
    shape = (batch, 4, *sizes["roi_size"])
    image = torch.randn(shape, device=device)
    if bundle == "espnet3d":
        label = torch.randint(0, out_channels, (batch, 1, *sizes["roi_size"]), device=device).float()
    else:
        label = (torch.rand((batch, out_channels, *sizes["roi_size"]), device=device) > 0.7).float()
    network.train()
    step = make_train_step(network, loss_fn, optimizer, image, label, amp=bool(amp))
    reset_gpu_peak(device)
    _, times = time_runs(step, warmup=2, repeats=steps)  # two warm-up steps (cudnn autotuning)
    return {"s_per_iteration": median(times), "batch": batch, "peak_gib": _peak_gib(device)}


def train_run(bundle: str, sizes: dict, epochs: int, root: Path, dataset: Path, num_workers: int | None) -> dict:
    """The shipped train.json on the synthetic cases: cases/s after the cache filled, share of time waiting for data."""
    from ignite.engine import Events

    overrides = dict(sizes, epochs=epochs, num_folds=1, fold=-1, val_interval=epochs + 1, progress=False)
    if num_workers is not None:
        overrides["num_workers"] = num_workers
    wf = bundle_workflow(bundle, "train.json", bundle_root=str(root), dataset_dir=str(dataset), **overrides)
    trainer = wf.parser.get_parsed_content("train#trainer")
    device = wf.parser.get_parsed_content("device")
    waits: dict[int, float] = {}
    epoch_times: dict[int, float] = {}
    marks: dict[str, float] = {}
    trainer.add_event_handler(Events.GET_BATCH_STARTED, lambda e: marks.__setitem__("get", time.perf_counter()))
    trainer.add_event_handler(
        Events.GET_BATCH_COMPLETED,
        lambda e: waits.__setitem__(e.state.epoch, waits.get(e.state.epoch, 0.0) + time.perf_counter() - marks["get"]),
    )
    trainer.add_event_handler(
        Events.EPOCH_STARTED, lambda e: (sync(device), marks.__setitem__("epoch", time.perf_counter()))
    )
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED,
        lambda e: (sync(device), epoch_times.__setitem__(e.state.epoch, time.perf_counter() - marks["epoch"])),
    )
    reset_gpu_peak(device)
    wf.parser.get_parsed_content("training_run").run()
    cases = len(wf.parser.get_parsed_content("train_files"))
    later = [e for e in epoch_times if e > 1] or list(epoch_times)  # epoch 1 fills the persistent cache
    total = sum(epoch_times[e] for e in later)
    return {
        "cases": cases,
        "num_workers": int(wf.parser.get_parsed_content("num_workers")),
        "first_epoch_s": epoch_times.get(1),
        "cases_per_s": cases * len(later) / total,
        "data_wait_share": sum(waits.get(e, 0.0) for e in later) / total,
        "peak_gib": _peak_gib(device),
    }


def inference(bundle: str, sizes: dict, root: Path, case_dir: Path, tta: bool, lever: str | None) -> dict:
    """One case through inference.json (random weights at the paper width): end to end and network-only seconds."""
    width = sizes["network_width"]
    overrides: dict[str, Any] = {
        "network_width": width,
        "num_workers": 0,
        "overwrite": True,
        "tta": tta,
        "progress": False,
    }
    if lever == "channels_last":
        overrides["channels_last"] = True
    elif lever == "compile":
        overrides["compile"] = True
    shutil.rmtree(root, ignore_errors=True)
    (root / "models").mkdir(parents=True)
    wf = bundle_workflow(bundle, "inference.json", bundle_root=str(root), dataset_dir=str(case_dir), **overrides)
    network = wf.parser.get_parsed_content("network")
    torch.save(network.state_dict(), root / "models" / "model.pt")
    device = wf.parser.get_parsed_content("device")
    timer = ForwardTimer(network, device)
    evaluator = wf.parser.get_parsed_content("evaluator")
    results = []
    for _ in range(2):  # the first run warms up (and compiles)
        timer.reset()
        reset_gpu_peak(device)
        sync(device)
        start = time.perf_counter()
        evaluator.run()
        sync(device)
        results.append({"end_to_end_s": time.perf_counter() - start, "network_s": sum(timer.times)})
    return {**results[-1], "first_run_s": results[0]["end_to_end_s"], "peak_gib": _peak_gib(device)}


def markdown(report: dict) -> str:
    """The report's header line and its table, one row per measurement."""
    rows = []
    for bundle, measured in report["bundles"].items():
        step = measured["train_step"]
        peak = f", peak {step['peak_gib']:.2f} GiB" if step["peak_gib"] is not None else ""
        rows.append([bundle, f"training step (batch {step['batch']})", f"{step['s_per_iteration']:.3f} s/it{peak}"])
        run = measured["train_run"]
        rows.append(
            [
                bundle,
                f"train.json, {run['cases']} cases, {run['num_workers']} workers",
                f"{run['cases_per_s']:.2f} cases/s, waiting for data {100 * run['data_wait_share']:.1f} % "
                f"(first epoch, filling the cache: {run['first_epoch_s']:.1f} s)",
            ]
        )
        for name, inf in measured["inference"].items():
            rows.append(
                [
                    bundle,
                    f"inference {name}",
                    f"{inf['end_to_end_s']:.2f} s end to end, network {inf['network_s']:.2f} s "
                    f"(first run {inf['first_run_s']:.1f} s)",
                ]
            )
    header = f"GPU check {report['date']} on {report['device']} ({report['mode']}); torch {report['torch']}"
    return f"{header}\n\n" + format_table(["bundle", "measurement", "value"], rows, pad=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script (CI)")
    parser.add_argument("--bundles", nargs="+", default=list(BUNDLES))
    parser.add_argument("--cases", type=int, default=None, help="synthetic cases of the training run")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the training run (the first fills the cache)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps")
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: train.json's)")
    args = parser.parse_args(argv)
    dry = args.dry_run
    if dry:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    sizes = DRY if dry else FULL
    cases = args.cases or (2 if dry else 8)
    steps = args.steps or (2 if dry else 10)
    num_workers = args.num_workers if args.num_workers is not None else (0 if dry else None)
    levers = [None] if dry else [None, "channels_last", "compile"]
    device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "CPU"
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "mode": "dry run (CPU, tiny sizes)" if dry else "full",
        "torch": torch.__version__,
        "bundles": {},
    }
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        generate_dataset(work / "data", cases, layout="brats2023", shape=sizes["shape"], seed=0)
        case_dir = sorted(p for p in (work / "data").iterdir() if p.is_dir())[0]
        for bundle in args.bundles:
            rows: dict[str, Any] = {}
            t0 = time.perf_counter()
            rows["train_step"] = train_step(bundle, sizes[bundle], steps, work / f"{bundle}_step", work / "data")
            rows["train_run"] = train_run(
                bundle, sizes[bundle], args.epochs, work / f"{bundle}_run", work / "data", num_workers
            )
            rows["inference"] = {}
            for tta in (False, True):
                for lever in levers if not tta else [None]:
                    name = ("tta" if tta else "plain") + (f" + {lever}" if lever else "")
                    rows["inference"][name] = inference(
                        bundle, sizes[bundle], work / f"{bundle}_inf", case_dir, tta, lever
                    )
            rows["seconds"] = time.perf_counter() - t0
            report["bundles"][bundle] = rows
            print(f"{bundle}: done in {rows['seconds']:.0f} s", flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (args.out_dir / "gpu_check.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
