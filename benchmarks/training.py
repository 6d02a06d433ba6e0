"""The section ``training``: one training iteration against MONAI's ``SegResNetVAE``.

One iteration (forward, loss, backward, optimizer step) of the networks, losses and optimizers that the bundles'
``train.json`` builds, against MONAI's ``SegResNetVAE`` with the same widths.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.losses import DiceLoss
from monai.networks.nets import SegResNetVAE

from benchmarks.flops import count_flops, meta_copy
from benchmarks.machine import setup_torch
from benchmarks.memory import gpu_peak_mib, peak_rss_mib, reset_gpu_peak
from benchmarks.tables import dims, format_table, ratio
from benchmarks.timing import median, sync, time_runs
from brats_pipeline.bundle.workflows import bundle_workflow

__all__ = ["EPOCH_CASES", "LABELS", "PAPER_CROP", "table", "train_step", "training_setup", "worker"]

#: the paper's training crop
PAPER_CROP = (160, 192, 128)
#: cases in an epoch of the BraTS 2018 training set (the paper's), for the epoch-equivalent column
EPOCH_CASES = 285

LABELS = {
    "segresnet_vae": "segresnet_vae (SegResNetVAE2018 + SegResNetVAELoss)",
    "monai_segresnetvae": "MONAI SegResNetVAE (Dice + vae_loss)",
    "espnet3d": "espnet3d (ESPNet3D + weighted Jaccard)",
}


def training_setup(
    model: str, width: int, roi_size: Sequence[int] | None, batch_size: int | None, device: torch.device
) -> tuple[torch.nn.Module, Callable, torch.optim.Optimizer, torch.Tensor, torch.Tensor, list[int], int]:
    """Network, loss, optimizer and a random batch for one training iteration.

    ``model``: ``"segresnet_vae"`` / ``"espnet3d"`` (network, loss and optimizer built by the bundle's
    ``train.json``; ``roi_size``/``batch_size`` ``None`` take the bundle's values) or ``"monai_segresnetvae"``
    (MONAI's ``SegResNetVAE`` with the Model Zoo recipe's ``DiceLoss`` plus its own ``vae_loss``, Adam with the
    same learning rate and weight decay as ours).

    Returns ``(network, loss_fn, optimizer, image, label, roi_size, batch_size)``; ``loss_fn(output, label)``.
    """
    gen = torch.Generator().manual_seed(0)
    if model in ("segresnet_vae", "espnet3d"):
        values: dict[str, Any] = {"network_width": int(width), "device": f"$torch.device('{device}')"}
        if roi_size is not None:
            values["roi_size"] = [int(s) for s in roi_size]
        if batch_size is not None:
            values["batch_size"] = int(batch_size)
        if model == "espnet3d":
            # the reference class weights are counted from label files; any weights cost the same
            values["loss_class_weights"] = [1.0, 1.0, 1.0, 1.0]
        parser = bundle_workflow(model, "train.json", workflow_type="train", **values).parser
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
        roi = [int(s) for s in (roi_size or PAPER_CROP)]
        batch = int(batch_size or 1)
        network = SegResNetVAE(
            input_image_size=roi,
            spatial_dims=3,
            init_filters=int(width),
            in_channels=4,
            out_channels=3,
            dropout_prob=0.2,
            blocks_down=[1, 2, 2, 4],
            blocks_up=[1, 1, 1],
        ).to(device)
        dice = DiceLoss(smooth_nr=0, smooth_dr=1e-5, squared_pred=True, to_onehot_y=False, sigmoid=True)

        def loss_fn(output: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
            seg, vae_loss = output
            return dice(seg, target) + vae_loss

        optimizer = torch.optim.Adam(network.parameters(), lr=1e-4, weight_decay=1e-5)
        image = torch.randn((batch, 4, *roi), generator=gen)
        label = (torch.rand((batch, 3, *roi), generator=gen) > 0.9).float()
    else:
        raise ValueError(f"unknown training model {model!r}")
    return network, loss_fn, optimizer, image.to(device), label.to(device), roi, batch


def train_step(
    network: torch.nn.Module,
    loss_fn: Callable,
    optimizer: torch.optim.Optimizer,
    image: torch.Tensor,
    label: torch.Tensor,
    amp: bool = False,
) -> Callable[[], None]:
    """One training iteration as a function of no arguments: forward, loss, backward, optimizer step, and a CUDA
    synchronisation so that it can be timed. ``amp``: CUDA autocast fp16 + ``GradScaler``, as
    ``SupervisedTrainer(amp=True)`` (ignored without CUDA)."""
    device = image.device
    amp = bool(amp) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            loss = loss_fn(network(image), label)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        sync(device)

    return step


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Median time of one training iteration (forward, loss, backward, optimizer step) and its FLOPs.

    Spec keys: ``model``, ``width``, ``roi_size``, ``batch_size``, ``warmup``, ``repeats``, ``budget_s``,
    ``threads``, ``amp`` (CUDA autocast fp16 + ``GradScaler``, as ``SupervisedTrainer(amp=True)``).
    """
    device = setup_torch(spec.get("threads", os.cpu_count() or 1))
    network, loss_fn, optimizer, image, label, roi, batch = training_setup(
        spec["model"], spec["width"], spec.get("roi_size"), spec.get("batch_size"), device
    )
    network.train()
    step = train_step(network, loss_fn, optimizer, image, label, amp=spec.get("amp", True))
    rss_setup = peak_rss_mib()
    reset_gpu_peak(device)
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
        "gpu_peak_mib": gpu_peak_mib(device),
        "parameters": sum(p.numel() for p in network.parameters()),
    }
    meta_net = meta_copy(network).train()
    x = torch.empty(image.shape, device="meta")
    y = torch.empty(label.shape, device="meta")

    def fwd_bwd() -> None:
        loss_fn(meta_net(x), y).backward()

    def fwd() -> None:
        with torch.no_grad():
            meta_net(x)

    result["flops_per_iteration"] = count_flops(fwd_bwd)
    result["flops_per_forward"] = count_flops(fwd)
    return result


def table(results: list[dict[str, Any]], peak: dict[str, Any] | None) -> str:
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
                LABELS[r["model"]],
                r["width"],
                dims(r["roi_size"]),
                r["batch_size"],
                t,
                len(r["times_s"]),
                ratio(t, ref),
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
