"""ONNX export of both bundles' inference networks, as a user runs it: ``python -m monai.bundle onnx_export`` in a
subprocess (MONAI 1.6.1 hands the module to ``torch.onnx.export``, the dynamo-based exporter on torch >= 2.9), then
onnxruntime against the eager network with the same weights on a random input: max abs difference <= 1e-4 from
the eager network run in float64 (the exact answer), and from the float32 eager run (ESPNet3D: 2e-4, see below).

The exports run concurrently (one module fixture), each with ``OMP_NUM_THREADS=1``; widths are tiny
(``--network_width 8``). ESPNet3D gets BatchNorm running statistics from a few training-mode passes on inputs in
[0, 1] (its normalisation), so its logits have a trained network's magnitude (~10) rather than the ~1e6 of fresh
running statistics, where an absolute tolerance would mean nothing.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.bundle import ConfigParser
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from custom_networks.esp import PSPBlock, adaptive_avg_pool3d_separable

REPO = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
}
WIDTH = 8
#: onnxruntime vs eager, relative to the output's scale (:func:`onnx_vs_eager`)
REL_TOL = 1e-4
NAMES = {"input_names": ["image"], "output_names": ["pred"]}
DYNAMIC = {"image": {0: "batch", 2: "h", 3: "w", 4: "d"}, "pred": {0: "batch", 2: "h", 3: "w", 4: "d"}}
#: name -> (bundle, --input_shape, extra command-line arguments). SegResNet: one file for every size divisible by 8
#: (dynamic axes); ESPNet3D: fixed shapes (see its model card)
EXPORTS = {
    "segresnet_vae": (
        "segresnet_vae",
        [1, 4, 32, 32, 32],
        ["--converter_kwargs", str({**NAMES, "dynamic_axes": DYNAMIC})],
    ),
    # non-cubic and not a multiple of 8, so the padding to the network stride, the crop back and PSP pooling to
    # sizes that do not divide the input (e.g. 19 -> 3) all run inside the graph (one export: each costs ~20 s of CPU)
    "espnet3d": ("espnet3d", [1, 4, 37, 30, 21], ["--converter_kwargs", str(NAMES)]),
}


def bundle_network(bundle: str) -> nn.Module:
    """``network_def`` of ``bundles/<bundle>/configs/inference.json`` at ``network_width`` 8."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "inference.json"))
    parser["network_width"] = WIDTH
    return parser.get_parsed_content("network_def")


def eager_network(bundle: str, ckpt: Path) -> nn.Module:
    net = bundle_network(bundle)
    net.load_state_dict(torch.load(ckpt, weights_only=True))
    return net.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Runs every export of ``EXPORTS`` concurrently; name -> (checkpoint, .onnx file)."""
    tmp = tmp_path_factory.mktemp("onnx_export")
    torch.manual_seed(0)
    ckpts = {}
    for bundle in ("segresnet_vae", "espnet3d"):
        net = bundle_network(bundle)
        if bundle == "espnet3d":
            net.train()
            with torch.no_grad():
                for _ in range(3):
                    net(torch.rand(2, 4, 32, 32, 32))
        ckpts[bundle] = tmp / f"{bundle}.pt"
        torch.save(net.state_dict(), ckpts[bundle])
    procs, files = {}, {}
    for name, (bundle, shape, extra) in EXPORTS.items():
        configs = REPO / "bundles" / bundle / "configs"
        files[name] = tmp / f"{name}.onnx"
        cmd = [
            sys.executable, "-m", "monai.bundle", "onnx_export", "network_def",
            "--filepath", str(files[name]),
            "--ckpt_file", str(ckpts[bundle]),
            "--meta_file", str(configs / "metadata.json"),
            "--config_file", str(configs / "inference.json"),
            "--network_width", str(WIDTH),
            "--input_shape", str(shape),
            *extra,
        ]  # fmt: skip
        procs[name] = subprocess.Popen(
            cmd, cwd=tmp, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    results = {}
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}:\n{log[-5000:]}"
        results[name] = (ckpts[EXPORTS[name][0]], files[name])
    return results


def onnx_vs_eager(
    onnx_file: Path, net: nn.Module, shape: list[int], out_channels: int, seed: int = 0
) -> tuple[float, float]:
    """Max abs differences between onnxruntime and the eager network, in float32 and in float64 (the exact answer
    up to ~1e-12), on ``torch.rand(shape)``, relative to the output's scale (its largest magnitude): float32 kernels
    round their sums by a fraction of the scale, and which kernels onnxruntime and oneDNN run depends on the CPU."""
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    x = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        eager32 = net(x).numpy()
        eager64 = copy.deepcopy(net).double()(x.double()).numpy()
    assert onnx_out.shape == eager32.shape == (shape[0], out_channels, *shape[2:])
    scale = float(np.abs(eager64).max())
    return float(np.abs(onnx_out - eager32).max()) / scale, float(np.abs(onnx_out - eager64).max()) / scale


@pytest.mark.parametrize(
    "out_size", [[1, 1, 1], [2, 3, 1], [5, 7, 4], [6, 16, 8], [11, 5, 7], [13, 17, 9], [20, 18, 12]]
)
def test_separable_pooling_equals_adaptive_avg_pool3d(out_size):
    x = torch.randn(2, 3, 13, 17, 9, generator=torch.Generator().manual_seed(0))
    expected = F.adaptive_avg_pool3d(x, out_size)
    torch.testing.assert_close(adaptive_avg_pool3d_separable(x, out_size), expected, rtol=0, atol=1e-6)
    scripted = torch.jit.script(adaptive_avg_pool3d_separable)  # ckpt_export scripts the network
    expected64 = F.adaptive_avg_pool3d(x.double(), out_size)
    torch.testing.assert_close(scripted(x.double(), out_size), expected64, rtol=0, atol=1e-12)


def test_psp_block_pools_with_torch_outside_export(monkeypatch):
    """Eager forward keeps ``F.adaptive_avg_pool3d`` (faster); under export the matrix form gives the same output."""
    block = PSPBlock(4).eval()
    x = torch.rand(1, 4, 19, 15, 11)
    calls = []
    torch_pool = F.adaptive_avg_pool3d
    monkeypatch.setattr(F, "adaptive_avg_pool3d", lambda *a, **k: calls.append(1) or torch_pool(*a, **k))
    with torch.no_grad():
        eager = block(x)
        assert len(calls) == len(block.scales)
        monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
        exporting = block(x)
    assert len(calls) == len(block.scales)  # not called again
    torch.testing.assert_close(exporting, eager, rtol=0, atol=1e-5)


def test_espnet3d_onnx_matches_eager(exported):
    """Fixed-shape export: matches the eager network at its shape; onnxruntime rejects any other shape."""
    _, shape, _ = EXPORTS["espnet3d"]
    ckpt, onnx_file = exported["espnet3d"]
    net = eager_network("espnet3d", ckpt)
    for seed in range(2):
        diff32, diff64 = onnx_vs_eager(onnx_file, net, shape, 4, seed)
        # measured (2026-12, AVX-512 and AVX2 kernels): 1.8e-5 of the scale against float32 eager (both roundings
        # add up), 5e-6 against float64; segresnet_vae 1.5e-6 and 1.1e-6
        assert diff32 <= REL_TOL and diff64 <= REL_TOL
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "image" and session.get_outputs()[0].name == "pred"
    assert session.get_inputs()[0].shape == shape and session.get_outputs()[0].shape == [1, 4, *shape[2:]]
    with pytest.raises(InvalidArgument, match="dimensions"):
        session.run(None, {"image": np.zeros([1, 4, 40, 32, 24], np.float32)})


def test_segresnet_vae_onnx_matches_eager_with_dynamic_axes(exported):
    """``--converter_kwargs`` with ``dynamic_axes``: one file for any batch and any size divisible by 8."""
    ckpt, onnx_file = exported["segresnet_vae"]
    net = eager_network("segresnet_vae", ckpt)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "image" and session.get_outputs()[0].name == "pred"
    assert session.get_inputs()[0].shape == ["batch", 4, "h", "w", "d"]
    for seed, shape in enumerate(([1, 4, 32, 32, 32], [2, 4, 40, 32, 24], [1, 4, 24, 48, 16])):
        diff32, diff64 = onnx_vs_eager(onnx_file, net, shape, 3, seed)
        assert diff32 <= REL_TOL and diff64 <= REL_TOL
