"""Speed and memory benchmarks of the two bundles, side by side with MONAI's own recipes, in one run.

Run from the repository root::

    python benchmarks/run_benchmarks.py --repeats 3 --warmup 1     # full sizes (docs/performance.md)
    python benchmarks/run_benchmarks.py --quick                     # small sizes, to check the script works

Sections (``--sections``, all by default), each printed as a Markdown table with ratios:

``inference``
    One case end to end (load four NIfTI, pre-process, network, invert, write the label map), by running the
    bundles' own ``inference.json`` through ``monai.bundle.ConfigWorkflow`` in-process (random weights saved
    as ``models/model.pt`` of a temporary bundle root), against the MONAI Model Zoo ``brats_mri_segmentation``
    inference recipe rebuilt from its published config (:func:`model_zoo_inference_config`). Each pipeline
    runs with and without 8-flip TTA (the Model Zoo recipe has no TTA). The network's forward passes are
    timed by hooks inside the same runs.
``training``
    One training iteration (forward, loss, backward, optimizer step) of the networks, losses and optimizers
    that the bundles' ``train.json`` builds, against MONAI's ``SegResNetVAE`` with the same widths.
``data``
    The training input pipeline of the bundles' ``train.json`` (``train#dataset``) on synthetic full-size
    cases: cases per second with and without ``CacheDataset`` caching, ``DataLoader`` vs
    ``ThreadDataLoader``, 0/1/2 workers, and the time it adds to an epoch against the measured training step.
``flops``
    The measured peak of the machine (a large matmul, fp32 and bf16) and the FLOPs of every network above
    (``torch.utils.flop_counter.FlopCounterMode`` on a meta-device copy: convolutions and matmuls only),
    giving the achieved FLOP/s of the measured forward passes and training iterations as % of that peak.
``levers``
    Forward-pass switches on the bundles' networks at the brain-cropped case size: ``torch.inference_mode``,
    ``channels_last_3d``, bf16 autocast (with the agreement, as Dice, between the fp32 and bf16 label maps on
    the real case and synthetic hold-out cases) and ``torch.compile`` (compile time reported separately).

Every configuration runs in its own subprocess: a fresh interpreter isolates warm-up effects and gives an
honest peak RSS (``resource.getrusage``; with CUDA also ``torch.cuda.max_memory_allocated``). Times are the
median of ``--repeats`` timed runs after ``--warmup`` untimed ones; a row stops repeating once its timed runs
exceed ``--row-budget`` seconds (the tables give the number of timed runs, ``n``). The script uses CUDA, AMP
and ``cudnn.benchmark`` when a GPU is present.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES_DIR = REPO_ROOT / "bundles"
REAL_CASE = REPO_ROOT.parent / "shared/data/BraTS-GLI-00001-000"
RESULT_MARKER = "BENCHMARK_RESULT "
SECTIONS: tuple[str, ...] = ("inference", "training", "data", "flops", "levers")

#: full-size settings: the BraTS volume, the paper's training crop, the Model Zoo recipe's window
FULL_SIZES: dict[str, Any] = {
    "case_shape": (240, 240, 155),
    "zoo_roi_size": (240, 240, 160),
    "train_roi_size": (160, 192, 128),
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

SEGRESNET_BLOCKS = {"blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1]}
#: cases in an epoch of the BraTS 2018 training set (the paper's), for the epoch-equivalent column
EPOCH_CASES = 285


# ----------------------------------------------------------------------------------------------------------------
# measuring


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
    return statistics.median(values) if values else None


def peak_rss_mib() -> float:
    """High-water mark of this process's resident memory (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the convolutions and matmuls run by ``fn`` (``FlopCounterMode``; elementwise ops, norms and
    interpolations are not counted). Run it on meta tensors to count without computing."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def meta_copy(network):
    """A copy of ``network`` on the meta device (shapes only), for counting FLOPs at no compute cost."""
    return copy.deepcopy(network).to("meta")


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, load, library versions and date, for the header of the report."""
    import monai
    import torch

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
    from brats_pipeline.inference import cpu_has_native_bf16

    info["bf16_cpu"] = cpu_has_native_bf16()
    return info


def setup_torch(threads: int) -> Any:
    """Threads for intra-op parallelism, ``cudnn.benchmark`` on a GPU; returns the device to use."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda:0")
    return torch.device("cpu")


def _sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize()


def _gpu_peak_mib(device) -> float | None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def _reset_gpu_peak(device) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


class ForwardTimer:
    """Forward hooks on a module recording each call's wall time and input shape (synchronised on CUDA)."""

    def __init__(self, module, device) -> None:
        self.device = device
        self.times: list[float] = []
        self.shapes: list[tuple[int, ...]] = []
        self._t0 = 0.0
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, module, args) -> None:
        _sync(self.device)
        self.shapes.append(tuple(int(s) for s in args[0].shape))
        self._t0 = time.perf_counter()

    def _post(self, module, args, output) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter() - self._t0)

    def reset(self) -> None:
        self.times, self.shapes = [], []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


# ----------------------------------------------------------------------------------------------------------------
# data


def synthetic_dataset(root: str | os.PathLike, num_cases: int, shape: Sequence[int], with_labels: bool = True) -> Path:
    """Synthetic BraTS 2023 cases of ``shape`` in ``root/<shape>`` (generated once, reused by later runs)."""
    from brats_pipeline.synthetic import ensure_dataset

    folder = Path(root) / ("x".join(str(int(s)) for s in shape) + ("" if with_labels else "_unlabelled"))
    ensure_dataset(folder, num_cases=num_cases, layout="brats2023", shape=tuple(shape), seed=0, with_labels=with_labels)
    return folder


def single_case_dir(case_dir: str | os.PathLike, work_dir: str | os.PathLike) -> Path:
    """A dataset folder holding only ``case_dir`` (as a symbolic link), for the bundles' ``dataset_dir``."""
    case_dir = Path(case_dir).resolve()
    folder = Path(work_dir) / "dataset"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / case_dir.name
    if not link.exists():
        link.symlink_to(case_dir, target_is_directory=True)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# pipelines


def model_zoo_inference_config(init_filters: int = 16, roi_size: Sequence[int] = (240, 240, 160)) -> dict:
    """The MONAI Model Zoo ``brats_mri_segmentation`` inference recipe (``configs/inference.json``).

    Same network (SegResNet, blocks (1, 2, 2, 4) / (1, 1, 1), dropout 0.2), pre-processing (``LoadImaged``,
    ``NormalizeIntensityd(nonzero, channel_wise)``), ``SlidingWindowInferer(roi_size=(240, 240, 160),
    sw_batch_size=1, overlap=0.5)`` and post-processing (sigmoid, ``Invertd``, threshold 0.5, regions to the
    BraTS 2018 labels, ``SaveImaged`` uint8). Changes, none of which touches the timed work: an
    ``EnsureChannelFirstd`` (our cases are four 3-D files, the Model Zoo's data one 4-D file), AMP only where
    CUDA is (the recipe sets ``amp: true``, a no-op with a warning on CPU), ``num_workers`` and the datalist
    set by the caller, and the run list named ``run`` (the recipe's ``evaluating``).
    """
    return {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "test_datalist": [],
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "amp": "$torch.cuda.is_available()",
        "num_workers": 0,
        "network_def": {
            "_target_": "SegResNet",
            **SEGRESNET_BLOCKS,
            "init_filters": int(init_filters),
            "in_channels": 4,
            "out_channels": 3,
            "dropout_prob": 0.2,
        },
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True},
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "@test_datalist", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": "@num_workers",
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": [int(s) for s in roi_size],
            "sw_batch_size": 1,
            "overlap": 0.5,
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": False,
                    "to_tensor": True,
                },
                {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
                {
                    "_target_": "Lambdad",
                    "keys": "pred",
                    "func": "$lambda x: torch.where(x[[2]] > 0, 4, torch.where(x[[0]] > 0, 1, torch.where(x[[1]] > 0, 2, 0)))",
                },
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "seg",
                    "output_dtype": "uint8",
                    "resample": False,
                    "squeeze_end_dims": True,
                    "print_log": False,
                },
            ],
        },
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "$@bundle_root + '/models/model.pt'",
                "load_dict": {"model": "@network"},
                "map_location": "@device",
            },
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": "@amp",
        },
        "initialize": ["$setattr(torch.backends.cudnn, 'benchmark', True)"],
        "run": ["$@evaluator.run()"],
        "finalize": [],
    }


def train_workflow(config_file: Path, values: dict[str, Any]):
    """An initialised ``ConfigWorkflow`` of a bundle's ``train.json`` with the ``values`` overrides."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(config_file),
        meta_file=str(config_file.parent / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        **values,
    )
    workflow.initialize()
    return workflow


def inference_workflow(
    pipeline: str,
    width: int,
    dataset_dir: str | os.PathLike,
    bundle_root: str | os.PathLike,
    tta: bool = False,
    zoo_roi_size: Sequence[int] = (240, 240, 160),
    overrides: dict[str, Any] | None = None,
):
    """A ``ConfigWorkflow`` of one inference pipeline, set to write into ``bundle_root``.

    ``pipeline``: ``"model_zoo"`` (:func:`model_zoo_inference_config`), ``"segresnet_vae"`` or ``"espnet3d"``
    (the bundle's own ``configs/inference.json``, with ``num_workers=0`` so that a case's loading is timed
    with it, ``overwrite=True`` so that every repeat writes its file, and the width and ``tta`` set).
    """
    from monai.bundle import ConfigWorkflow

    bundle_root = Path(bundle_root)
    (bundle_root / "models").mkdir(parents=True, exist_ok=True)
    if pipeline == "model_zoo":
        from brats_pipeline.datalist import find_cases

        config = model_zoo_inference_config(width, zoo_roi_size)
        config_file = bundle_root / "configs" / "inference.json"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(json.dumps(config, indent=1))
        datalist = [{"image": c["image"]} for c in find_cases(dataset_dir, check_files=False)]
        values = {"bundle_root": str(bundle_root), "test_datalist": datalist}
        meta_file = None
    elif pipeline in ("segresnet_vae", "espnet3d"):
        config_file = BUNDLES_DIR / pipeline / "configs" / "inference.json"
        width_key = "network_def#init_filters" if pipeline == "segresnet_vae" else "network_width"
        values = {
            "bundle_root": str(bundle_root),
            "dataset_dir": str(dataset_dir),
            "num_workers": 0,
            "overwrite": True,
            "tta": bool(tta),
            width_key: int(width),
        }
        meta_file = str(config_file.parent / "metadata.json")
    else:
        raise ValueError(f"unknown inference pipeline {pipeline!r}")
    values.update(overrides or {})
    workflow = ConfigWorkflow(
        config_file=str(config_file), meta_file=meta_file, logging_file=False, workflow_type="inference", **values
    )
    workflow.initialize()
    return workflow


def _written_files(bundle_root: Path) -> list[Path]:
    return sorted((bundle_root / "eval").rglob("*.nii.gz"))


def run_inference_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One inference pipeline on one case: plain runs (warm-up + timed), then TTA runs in the same process.

    Spec keys: ``pipeline``, ``width``, ``case_dir``, ``work_dir``, ``tta`` (also run the TTA phase),
    ``warmup``, ``repeats``, ``tta_repeats``, ``budget_s``, ``threads``, ``zoo_roi_size``, ``overrides``.
    """
    import torch

    device = setup_torch(spec.get("threads", os.cpu_count() or 1))
    work = Path(spec["work_dir"])
    dataset_dir = single_case_dir(spec["case_dir"], work)
    phases = [("plain", False, spec.get("warmup", 1), spec.get("repeats", 3))]
    if spec.get("tta"):
        # the plain runs above warmed this process up (same shapes, same kernels)
        phases.append(("tta", True, 0, spec.get("tta_repeats", 1)))
    result: dict[str, Any] = {
        "pipeline": spec["pipeline"],
        "width": spec["width"],
        "label": spec.get("label"),
        "overrides": spec.get("overrides"),
        "phases": {},
    }
    for phase, tta, warmup, repeats in phases:
        root = work / phase
        shutil.rmtree(root, ignore_errors=True)
        workflow = inference_workflow(
            spec["pipeline"],
            spec["width"],
            dataset_dir,
            root,
            tta=tta,
            zoo_roi_size=spec.get("zoo_roi_size", (240, 240, 160)),
            overrides=spec.get("overrides"),
        )
        network = workflow.parser.get_parsed_content("network")
        torch.save(network.state_dict(), root / "models" / "model.pt")  # random weights: no trained model exists
        timer = ForwardTimer(network, device)
        rss_setup = peak_rss_mib()
        _reset_gpu_peak(device)
        warm, times = time_runs(workflow.run, warmup, repeats, spec.get("budget_s", 0.0))
        workflow.finalize()  # raises if the case failed (the bundles record failures instead of stopping)
        written = _written_files(root)
        if not written:
            raise RuntimeError(f"{spec['pipeline']} wrote no label map under {root / 'eval'}")
        runs = len(warm) + len(times)
        per_run = len(timer.times) // runs if runs else 0
        timed_forwards = timer.times[len(warm) * per_run :]
        info: dict[str, Any] = {
            "warmup_s": warm,
            "times_s": times,
            "forward_times_s": timed_forwards,
            "forwards_per_case": per_run,
            "network_input": list(timer.shapes[0]) if timer.shapes else None,
            "rss_after_setup_mib": rss_setup,
            "peak_rss_mib": peak_rss_mib(),
            "gpu_peak_mib": _gpu_peak_mib(device),
        }
        if phase == "plain" and timer.shapes:
            meta_net = meta_copy(network).eval()
            x = torch.empty(timer.shapes[0], device="meta")
            with torch.no_grad():
                info["flops_per_forward"] = count_flops(lambda m=meta_net, x=x: m(x))
        result["phases"][phase] = info
        timer.remove()
        shutil.rmtree(root / "eval", ignore_errors=True)
    return result


def training_setup(model: str, width: int, roi_size: Sequence[int] | None, batch_size: int | None, device):
    """Network, loss, optimizer and a random batch for one training iteration.

    ``model``: ``"segresnet_vae"`` / ``"espnet3d"`` (network, loss and optimizer built by the bundle's
    ``train.json``; ``roi_size``/``batch_size`` ``None`` take the bundle's values) or ``"monai_segresnetvae"``
    (MONAI's ``SegResNetVAE`` with the Model Zoo recipe's ``DiceLoss`` plus its own ``vae_loss``, Adam with the
    same learning rate and weight decay as ours).

    Returns ``(network, loss_fn, optimizer, image, label, roi_size, batch_size)``; ``loss_fn(output, label)``.
    """
    import torch

    gen = torch.Generator().manual_seed(0)
    if model in ("segresnet_vae", "espnet3d"):
        config_file = BUNDLES_DIR / model / "configs" / "train.json"
        values: dict[str, Any] = {"network_width": int(width), "device": f"$torch.device('{device}')"}
        if roi_size is not None:
            values["roi_size"] = [int(s) for s in roi_size]
        if batch_size is not None:
            values["batch_size"] = int(batch_size)
        if model == "espnet3d":
            # the reference class weights are counted from label files; any weights cost the same
            values["loss_class_weights"] = [1.0, 1.0, 1.0, 1.0]
        workflow = train_workflow(config_file, values)
        parser = workflow.parser
        roi = [int(s) for s in parser.get_parsed_content("roi_size")]
        batch = int(parser.get_parsed_content("batch_size"))
        network = parser.get_parsed_content("network")
        loss_fn = parser.get_parsed_content("loss")
        optimizer = parser.get_parsed_content("optimizer")
        image = torch.randn((batch, 4, *roi), generator=gen)
        if model == "segresnet_vae":
            label = (torch.rand((batch, 3, *roi), generator=gen) > 0.9).float()
        else:
            label = torch.randint(0, 4, (batch, 1, *roi), generator=gen).float()
    elif model == "monai_segresnetvae":
        from monai.losses import DiceLoss
        from monai.networks.nets import SegResNetVAE

        roi = [int(s) for s in (roi_size or FULL_SIZES["train_roi_size"])]
        batch = int(batch_size or 1)
        network = SegResNetVAE(
            input_image_size=roi,
            spatial_dims=3,
            init_filters=int(width),
            in_channels=4,
            out_channels=3,
            dropout_prob=0.2,
            **SEGRESNET_BLOCKS,
        ).to(device)
        dice = DiceLoss(smooth_nr=0, smooth_dr=1e-5, squared_pred=True, to_onehot_y=False, sigmoid=True)

        def loss_fn(output, target):
            seg, vae_loss = output
            return dice(seg, target) + vae_loss

        optimizer = torch.optim.Adam(network.parameters(), lr=1e-4, weight_decay=1e-5)
        image = torch.randn((batch, 4, *roi), generator=gen)
        label = (torch.rand((batch, 3, *roi), generator=gen) > 0.9).float()
    else:
        raise ValueError(f"unknown training model {model!r}")
    return network, loss_fn, optimizer, image.to(device), label.to(device), roi, batch


def run_training_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Median time of one training iteration (forward, loss, backward, optimizer step) and its FLOPs.

    Spec keys: ``model``, ``width``, ``roi_size``, ``batch_size``, ``warmup``, ``repeats``, ``budget_s``,
    ``threads``, ``amp`` (CUDA autocast fp16 + ``GradScaler``, as ``SupervisedTrainer(amp=True)``).
    """
    import torch

    device = setup_torch(spec.get("threads", os.cpu_count() or 1))
    network, loss_fn, optimizer, image, label, roi, batch = training_setup(
        spec["model"], spec["width"], spec.get("roi_size"), spec.get("batch_size"), device
    )
    network.train()
    amp = bool(spec.get("amp", True)) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp else None

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", enabled=amp) if amp else contextlib.nullcontext():
            loss = loss_fn(network(image), label)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        _sync(device)

    rss_setup = peak_rss_mib()
    _reset_gpu_peak(device)
    warm, times = time_runs(step, spec.get("warmup", 1), spec.get("repeats", 3), spec.get("budget_s", 0.0))
    result = {
        "model": spec["model"],
        "width": spec["width"],
        "roi_size": roi,
        "batch_size": batch,
        "warmup_s": warm,
        "times_s": times,
        "rss_after_setup_mib": rss_setup,
        "peak_rss_mib": peak_rss_mib(),
        "gpu_peak_mib": _gpu_peak_mib(device),
        "parameters": sum(p.numel() for p in network.parameters()),
    }
    meta_net = meta_copy(network).train()
    x = torch.empty(image.shape, device="meta")
    y = torch.empty(label.shape, device="meta")

    def fwd_bwd() -> None:
        out = meta_net(x)
        loss_fn(out, y).backward()

    def fwd() -> None:
        with torch.no_grad():
            meta_net(x)

    result["flops_per_iteration"] = count_flops(fwd_bwd)
    result["flops_per_forward"] = count_flops(fwd)
    return result


def run_peak_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The machine's measured matmul peak: ``size``-square matmuls in fp32 (and bf16 where supported)."""
    import torch

    device = setup_torch(spec.get("threads", os.cpu_count() or 1))
    n = int(spec.get("size", 4096))
    dtypes = [torch.float32]
    from brats_pipeline.inference import cpu_has_native_bf16

    if device.type == "cuda" or cpu_has_native_bf16():
        dtypes.append(torch.bfloat16)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    out: dict[str, Any] = {"size": n, "flops_per_matmul": 2 * n**3}
    for dtype in dtypes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)

        def mm(a=a, b=b) -> None:
            torch.mm(a, b)
            _sync(device)

        _, times = time_runs(mm, spec.get("warmup", 1), spec.get("repeats", 5))
        name = str(dtype).removeprefix("torch.")
        out[name] = {"times_s": times, "gflops": 2 * n**3 / median(times) / 1e9}
    return out


def _cache_stats(dataset) -> tuple[float, str]:
    """``(MiB, digest of the bytes)`` of the tensors a ``CacheDataset`` holds (``(0, "")`` for a plain dataset)."""
    import hashlib

    import torch

    total, digest = 0, hashlib.blake2b(digest_size=16)
    for item in getattr(dataset, "_cache", None) or []:
        for value in item.values() if isinstance(item, dict) else ():
            if isinstance(value, torch.Tensor):
                array = torch.as_tensor(value).detach().cpu().contiguous().numpy()
                total += array.nbytes
                digest.update(array.tobytes())
    return total / 2**20, digest.hexdigest() if total else ""


def run_data_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Cases per second of a bundle's training input pipeline (``train#dataset``) under several loaders.

    Spec keys: ``bundle``, ``dataset_dir``, ``roi_size`` and ``num_folds`` (``None``: the bundle's);
    ``loaders``: a list of ``{"cache": bool, "loader": "DataLoader" | "ThreadDataLoader", "workers": int}``,
    optionally ``"copy_cache": False`` (``CacheDataset`` then hands out its cached items without the default
    deep copy; the worker checks that an epoch leaves the cache unchanged); ``cache_workers`` (CacheDataset's
    fill threads); ``warmup`` (epochs before the first loader of each dataset: warms the page cache) and
    ``repeats`` (timed epochs per loader); ``threads``.
    """
    import torch
    from monai.data import DataLoader, ThreadDataLoader

    setup_torch(spec.get("threads", os.cpu_count() or 1))
    config_file = BUNDLES_DIR / spec["bundle"] / "configs" / "train.json"
    rows = []
    for cache in sorted({bool(c["cache"]) for c in spec["loaders"]}):
        values: dict[str, Any] = {
            "dataset_dir": str(spec["dataset_dir"]),
            "cache_rate": 1.0 if cache else 0.0,
            "persistent_cache": False,  # this section compares CacheDataset with none; loader_throughput.py the rest
            "num_workers": int(spec.get("cache_workers", os.cpu_count() or 1)),
            "device": "$torch.device('cpu')",
        }
        if spec.get("roi_size") is not None:
            values["roi_size"] = [int(s) for s in spec["roi_size"]]
        if spec.get("num_folds") is not None:
            values["num_folds"] = int(spec["num_folds"])
        workflow = train_workflow(config_file, values)
        t0 = time.perf_counter()
        dataset = workflow.parser.get_parsed_content("train#dataset")
        fill_s = time.perf_counter() - t0
        cache_mib, checksum = _cache_stats(dataset)
        batch_size = int(workflow.parser.get_parsed_content("batch_size"))
        warmup = spec.get("warmup", 1)
        for cfg in spec["loaders"]:
            if bool(cfg["cache"]) != cache:
                continue
            if hasattr(dataset, "copy_cache"):
                dataset.copy_cache = bool(cfg.get("copy_cache", True))
            cls = ThreadDataLoader if cfg["loader"] == "ThreadDataLoader" else DataLoader
            torch.manual_seed(0)
            loader = cls(dataset, batch_size=batch_size, shuffle=True, num_workers=int(cfg["workers"]))

            def epoch(loader=loader) -> None:
                for _ in loader:
                    pass

            _, times = time_runs(epoch, warmup, spec.get("repeats", 3))
            warmup = 0
            row = {
                **cfg,
                "cases": len(dataset),
                "batch_size": batch_size,
                "fill_s": fill_s if cache else None,
                "cache_mib": cache_mib if cache else None,
                "epoch_times_s": times,
                "cases_per_s": len(dataset) * len(times) / sum(times),
            }
            if cache and not cfg.get("copy_cache", True):
                row["cache_unchanged"] = _cache_stats(dataset)[1] == checksum
            rows.append(row)
    return {"bundle": spec["bundle"], "rows": rows, "peak_rss_mib": peak_rss_mib()}


def _region_dice(a, b) -> list[float]:
    """Dice per channel between two boolean maps ``(C, *spatial)``; 1 where both are empty."""
    out = []
    for x, y in zip(a, b, strict=True):
        denom = int(x.sum()) + int(y.sum())
        out.append(1.0 if denom == 0 else 2.0 * int((x & y).sum()) / denom)
    return out


def _regions_of(pipeline: str, logits):
    """Boolean TC/WT/ET maps ``(3, *spatial)`` from one case's logits ``(1, C, *spatial)``."""
    from brats_pipeline.labels import classes_to_regions

    if pipeline == "segresnet_vae":
        return logits[0].float().sigmoid() > 0.5
    return classes_to_regions(logits[0].float().argmax(0)) > 0


def _lever_variant(name: str, network, images: list, reference: list, spec: dict[str, Any], device, amp_dtype):
    """Time one forward-pass variant on ``images[0]``; for bf16 and compile also the label agreement with fp32.

    ``torch.compile`` specialises on the input shape (``dynamic=False``): its first call is the compile time,
    and the first call on a second case's (different) brain-crop shape is reported as the recompile time.
    """
    import torch

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

    def forward(x=inputs[0]):
        with ctx():
            out = net(x)
        _sync(device)
        return out

    row: dict[str, Any] = {"variant": name, "compile_s": None}
    if compiled:
        t0 = time.perf_counter()
        forward()
        row["compile_s"] = time.perf_counter() - t0
    warm, row["times_s"] = time_runs(forward, spec.get("warmup", 1), spec.get("repeats", 3), spec.get("budget_s", 0.0))
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


def run_levers_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Forward-pass switches on a bundle's network at the size of its pre-processed (brain-cropped) cases.

    Spec keys: ``pipeline`` (``segresnet_vae``/``espnet3d``), ``width``, ``case_dirs`` (the first is timed, all
    are used for the fp32-vs-bf16 agreement), ``variants`` (names from :data:`LEVER_VARIANTS`), ``work_dir``,
    ``warmup``, ``repeats``, ``budget_s``, ``threads``.
    """
    import torch

    device = setup_torch(spec.get("threads", os.cpu_count() or 1))
    work = Path(spec["work_dir"])
    images = []
    for i, case_dir in enumerate(spec["case_dirs"]):
        wf = inference_workflow(
            spec["pipeline"], spec["width"], single_case_dir(case_dir, work / f"case{i}"), work / f"root{i}"
        )
        preprocessing = wf.parser.get_parsed_content("preprocessing")
        case = wf.parser.get_parsed_content("cases")[0]
        images.append(preprocessing(dict(case))["image"].as_tensor()[None].to(device))
        if i == 0:
            network = wf.parser.get_parsed_content("network_def").to(device).eval()
    torch.manual_seed(0)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    reference: list[Any] = []
    with torch.no_grad():
        for x in images:
            reference.append(_regions_of(spec["pipeline"], network(x)))

    rows = []
    for name in spec["variants"]:
        try:
            rows.append(_lever_variant(name, network, images, reference, spec, device, amp_dtype))
        except Exception as e:  # e.g. torch.compile without a working C++ toolchain
            rows.append({"variant": name, "error": f"{type(e).__name__}: {e}"[:300]})
    return {
        "pipeline": spec["pipeline"],
        "width": spec["width"],
        "input": [list(x.shape) for x in images],
        "rows": rows,
        "peak_rss_mib": peak_rss_mib(),
    }


#: forward-pass variants of the levers section; the first is the baseline (what the segresnet_vae bundle runs)
LEVER_VARIANTS: tuple[str, ...] = (
    "no_grad fp32",
    "inference_mode",
    "channels_last",
    "bf16",
    "bf16 channels_last",
    "compile",
)

WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "inference": run_inference_worker,
    "training": run_training_worker,
    "peak": run_peak_worker,
    "data": run_data_worker,
    "levers": run_levers_worker,
}


def run_worker(spec: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
    """Run ``WORKERS[spec["kind"]](spec)`` in a fresh Python process; its result, or ``{"error": ...}``."""
    env = dict(os.environ)
    threads = str(spec.get("threads", os.cpu_count() or 1))
    env.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONWARNINGS": "ignore"})
    if spec.get("kind") == "levers" and spec.get("work_dir"):  # a cold torch.compile cache: honest compile times
        env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(spec["work_dir"]) / "inductor_cache")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
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
    spec = json.loads(spec_json)
    result = WORKERS[spec["kind"]](spec)
    sys.stdout.flush()
    print(RESULT_MARKER + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# tables


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table with columns padded to equal width."""
    n = len(headers)
    cells = [[str(h) for h in headers]] + [([fmt(c) for c in row] + [""] * n)[:n] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or not b else f"{a / b:.2f}x"


def _shape(s: Sequence[int] | None) -> str:
    return "—" if not s else "x".join(str(int(v)) for v in s)


INFERENCE_LABELS = {
    "model_zoo": "Model Zoo brats_mri_segmentation",
    "segresnet_vae": "segresnet_vae",
    "espnet3d": "espnet3d",
}
TRAINING_LABELS = {
    "segresnet_vae": "segresnet_vae (SegResNetVAE2018 + SegResNetVAELoss)",
    "monai_segresnetvae": "MONAI SegResNetVAE (Dice + vae_loss)",
    "espnet3d": "espnet3d (ESPNet3D + weighted Jaccard)",
}


def inference_table(results: list[dict[str, Any]]) -> str:
    """Per case end to end: median seconds, ratio to the Model Zoo recipe, network share, peak memory."""
    zoo = next((r for r in results if r.get("pipeline") == "model_zoo" and "phases" in r), None)
    zoo_t = median(zoo["phases"]["plain"]["times_s"]) if zoo else None
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r.get("label", "?"), "", "", "failed", "", "", "", "", "", "", r["error"][:80]])
            continue
        for phase, info in r["phases"].items():
            t = median(info["times_s"])
            fwd = median(info["forward_times_s"])
            rows.append(
                [
                    r.get("label") or INFERENCE_LABELS[r["pipeline"]],
                    r["width"],
                    "8 flips" if phase == "tta" else "no",
                    t,
                    len(info["times_s"]),
                    _ratio(t, zoo_t),
                    _shape(info["network_input"]),
                    fwd,
                    info["forwards_per_case"],
                    info["peak_rss_mib"],
                    info["gpu_peak_mib"],
                ]
            )
    headers = [
        "pipeline",
        "width",
        "TTA",
        "s / case",
        "n",
        "vs Model Zoo",
        "network input",
        "s / forward",
        "forwards",
        "peak RSS MiB",
        "peak GPU MiB",
    ]
    return format_table(headers, rows)


def training_table(results: list[dict[str, Any]], peak: dict[str, Any] | None) -> str:
    """One training iteration: median seconds, ratio to MONAI's SegResNetVAE of the same width, FLOP/s."""
    monai_t = {
        r["width"]: median(r["times_s"]) for r in results if r.get("model") == "monai_segresnetvae" and "times_s" in r
    }
    fp32_peak = peak["float32"]["gflops"] if peak and "float32" in peak else None
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r.get("label", "?"), "", "", "", "failed", "", "", "", "", "", r["error"][:80]])
            continue
        t = median(r["times_s"])
        gflop = r["flops_per_iteration"] / 1e9
        ref = monai_t.get(r["width"]) if r["model"] != "espnet3d" else None
        rows.append(
            [
                TRAINING_LABELS[r["model"]],
                r["width"],
                _shape(r["roi_size"]),
                r["batch_size"],
                t,
                len(r["times_s"]),
                _ratio(t, ref),
                gflop,
                gflop / t,
                None if not fp32_peak else 100 * gflop / t / fp32_peak,
                EPOCH_CASES / r["batch_size"] * t / 60,
                r["peak_rss_mib"],
                r["gpu_peak_mib"],
            ]
        )
    headers = [
        "network + loss",
        "width",
        "crop",
        "batch",
        "s / iteration",
        "n",
        "vs MONAI SegResNetVAE",
        "GFLOP fwd+bwd",
        "GFLOP/s",
        "% fp32 peak",
        f"{EPOCH_CASES} cases x step, min",
        "peak RSS MiB",
        "peak GPU MiB",
    ]
    return format_table(headers, rows)


def data_table(results: list[dict[str, Any]], step_s: dict[str, float | None]) -> str:
    """Loader throughput against the measured training step of the same bundle."""
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r.get("bundle", "?"), "failed", "", "", "", "", "", "", "", r["error"][:80]])
            continue
        step = step_s.get(r["bundle"])
        for row in r["rows"]:
            per_batch = row["batch_size"] / row["cases_per_s"]
            dataset = "no cache (cache_rate 0)"
            if row["cache"]:
                dataset = "CacheDataset (cache_rate 1)"
                if not row.get("copy_cache", True):
                    unchanged = row.get("cache_unchanged")
                    dataset += ", copy_cache=False" + ("" if unchanged else " (CACHE MODIFIED)")
            rows.append(
                [
                    r["bundle"],
                    dataset,
                    row["loader"],
                    row["workers"],
                    row["cases"],
                    row["fill_s"],
                    None if row.get("cache_mib") is None else row["cache_mib"] / row["cases"],
                    row["cases_per_s"],
                    per_batch,
                    step,
                    None if not step else 100 * per_batch / step,
                ]
            )
    headers = [
        "bundle",
        "dataset",
        "loader",
        "workers",
        "cases",
        "cache fill s",
        "cache MiB / case",
        "cases / s",
        "s / batch",
        "train step s",
        "load / step %",
    ]
    return format_table(headers, rows)


def flops_table(inference: list[dict[str, Any]], training: list[dict[str, Any]], peak: dict[str, Any] | None) -> str:
    """FLOPs per forward pass and achieved FLOP/s of the measured forward passes / iterations."""
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
                f"{r.get('label') or INFERENCE_LABELS[r['pipeline']]} w{r['width']}",
                "inference forward",
                _shape(info["network_input"]),
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
        crop = _shape([r["batch_size"], *r["roi_size"]])
        rows.append(
            [f"{TRAINING_LABELS[r['model']]} w{r['width']}", "training forward", crop, r["flops_per_forward"] / 1e9]
            + [None, None, None]
        )
        gflop = r["flops_per_iteration"] / 1e9
        rows.append(
            [f"{TRAINING_LABELS[r['model']]} w{r['width']}", "training iteration", crop, gflop, t, gflop / t]
            + [of_peak(gflop / t, "float32")]
        )
    headers = ["network", "pass", "input (B x H x W x D)", "GFLOP", "s", "GFLOP/s", "% of peak"]
    return format_table(headers, rows)


def peak_table(peak: dict[str, Any] | None) -> str:
    rows = []
    for dtype in ("float32", "bfloat16"):
        if peak and dtype in peak:
            rows.append([dtype, f"{peak['size']}^2", median(peak[dtype]["times_s"]), peak[dtype]["gflops"]])
    return format_table(["dtype", "matmul", "s (median)", "GFLOP/s"], rows)


def levers_table(results: list[dict[str, Any]], inference: list[dict[str, Any]]) -> str:
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
                    _shape(r["input"][0][2:]),
                    t,
                    len(v["times_s"]),
                    _ratio(base, t),
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
        crop = median(ours["phases"]["plain"]["forward_times_s"])
        for variant, info, t in (
            ("whole volume (Model Zoo row)", zoo["phases"]["plain"], whole),
            ("brain bbox crop (segresnet_vae row)", ours["phases"]["plain"], crop),
        ):
            rows.append(
                ["SegResNet w16", variant, _shape(info["network_input"][2:]), t, len(info["forward_times_s"])]
                + [_ratio(whole, t)]
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


# ----------------------------------------------------------------------------------------------------------------
# orchestration


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_plan(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """The worker specs of each section, from the command line."""
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    common = {"threads": args.threads, "warmup": args.warmup, "repeats": args.repeats, "budget_s": args.row_budget}
    work = Path(args.work_dir)
    plan: dict[str, list[dict[str, Any]]] = {s: [] for s in SECTIONS}
    plan["flops"].append({"kind": "peak", "threads": args.threads, "size": args.matmul_size, "warmup": 1, "repeats": 5})
    case_dir = args.case_dir
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
                "case_dir": case_dir,
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
    variants = [v for v in LEVER_VARIANTS if args.compile or v != "compile"]
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
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    sections = [s for s in SECTIONS if s in args.sections]
    plan = build_plan(args)
    results: dict[str, Any] = {"machine": machine_info(), "command": " ".join(sys.argv), "sizes": sizes}
    data_root = Path(args.data_dir)
    need_synthetic = bool({"data", "levers"} & set(sections)) or not args.case_dir
    if need_synthetic:
        _log(f"synthetic cases {sizes['data_shape']} in {data_root} (generated once, then reused)")
        data_dir = synthetic_dataset(data_root, sizes["data_cases"], sizes["data_shape"])
    if not args.case_dir:  # --quick, or the real case is missing: a synthetic case of the benchmark size
        case_root = synthetic_dataset(data_root, 1, sizes["case_shape"], with_labels=False)
        args.case_dir = str(next(p for p in sorted(case_root.iterdir()) if p.is_dir()))
        for spec in plan["inference"]:
            spec["case_dir"] = args.case_dir
    results["case_dir"] = args.case_dir
    for spec in plan["data"]:
        spec["dataset_dir"] = str(data_dir) if need_synthetic else None
    holdout = sorted(p for p in data_dir.iterdir() if p.is_dir())[-2:] if need_synthetic else []
    for spec in plan["levers"]:
        spec["case_dirs"] = [args.case_dir] + [str(p) for p in holdout]

    order = ["flops", "inference", "training", "data", "levers"]
    for section in order:
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
        lines += ["## Machine peak (matmul)", "", peak_table(peak), ""]
    if "inference" in results:
        lines += ["## 1. Inference, one case end to end", "", inference_table(results["inference"]), ""]
    if "training" in results:
        lines += ["## 2. One training iteration", "", training_table(results["training"], peak), ""]
    if "data" in results:
        steps: dict[str, float | None] = {}
        for r in results.get("training", []):
            if "times_s" in r and (r["model"], r["width"]) in (("segresnet_vae", 32), ("espnet3d", 32)):
                steps[r["model"]] = median(r["times_s"])
        lines += ["## 3. Training input pipeline", "", data_table(results["data"], steps), ""]
    if "training" in results or "inference" in results:
        lines += [
            "## 4. FLOPs and achieved FLOP/s",
            "",
            flops_table(results.get("inference", []), results.get("training", []), peak),
            "",
        ]
    if "levers" in results:
        lines += ["## 5. Levers (forward pass)", "", levers_table(results["levers"], results.get("inference", [])), ""]
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
    p.add_argument("--case-dir", default=None, help="case folder for inference (default: the real BraTS case)")
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
    if args.case_dir is None and not args.quick and REAL_CASE.is_dir():
        args.case_dir = str(REAL_CASE)
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
