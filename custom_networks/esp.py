"""Building blocks of 3D-ESPNet (Nuechterlein & Mehta, BrainLes 2018): CBR, the ESP module, the SPP and PSP blocks.

Where the paper (Sect. 2, Figs. 2-4) is silent, the blocks follow the reference implementation
(``sacmehta/3D-ESPNet``, ``Model.py``); every such choice is a constructor argument. All blocks are 3D,
take ``(B, C, H, W, D)`` tensors and work with ``torch.jit.script`` and ONNX export (``torch.onnx.export``, both the
dynamo-based and the TorchScript-based exporter).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution

__all__ = ["CBR", "ESPBlock", "SPPBlock", "PSPBlock", "adaptive_avg_pool3d_separable"]


def _adaptive_pool_matrix(in_size: int, out_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(out_size, in_size)`` averaging matrix of 1-D adaptive average pooling with PyTorch's windows: output ``i``
    averages inputs ``floor(i * in / out) <= j < ceil((i + 1) * in / out)``."""
    i = torch.arange(out_size, device=device)
    start = torch.div(i * in_size, out_size, rounding_mode="floor")
    end = torch.div((i + 1) * in_size + out_size - 1, out_size, rounding_mode="floor")
    j = torch.arange(in_size, device=device)
    inside = (j.unsqueeze(0) >= start.unsqueeze(1)) & (j.unsqueeze(0) < end.unsqueeze(1))
    return inside.to(dtype) / (end - start).unsqueeze(1).to(dtype)


def adaptive_avg_pool3d_separable(x: torch.Tensor, output_size: list[int]) -> torch.Tensor:
    """``F.adaptive_avg_pool3d`` written as three 1-D averaging matrices (one per axis) applied with ``einsum``.

    A box average is the product of the per-axis averages, so this equals ``F.adaptive_avg_pool3d(x, output_size)``
    up to float rounding, for any input and output size (also when the output size does not divide the input's).
    ``PSPBlock`` uses it only during export: the dynamo-based ONNX exporter (torch 2.13, onnxscript 0.7) has no
    conversion for ``aten._adaptive_avg_pool3d`` at all and the TorchScript-based one only for output sizes that
    divide the input's, while ``Einsum`` exports everywhere. The matrices are built from the input's shape with
    torch ops.

    Args:
        x: ``(B, C, H, W, D)``.
        output_size: ``[h, w, d]``, each ``>= 1``.

    Returns:
        ``(B, C, h, w, d)``.
    """
    pool_h = _adaptive_pool_matrix(x.shape[2], output_size[0], x.dtype, x.device)
    pool_w = _adaptive_pool_matrix(x.shape[3], output_size[1], x.dtype, x.device)
    pool_d = _adaptive_pool_matrix(x.shape[4], output_size[2], x.dtype, x.device)
    x = torch.einsum("bchwd,kd->bchwk", x, pool_d)
    x = torch.einsum("bchwk,jw->bchjk", x, pool_w)
    return torch.einsum("bchjk,ih->bcijk", x, pool_h)


class CBR(Convolution):
    """Convolution (no bias) + BatchNorm + ReLU, "same" padding: the paper's CBR block (Fig. 1).

    A thin specialisation of MONAI's :class:`~monai.networks.blocks.Convolution` (``adn_ordering="NA"``),
    so its weights live under ``conv`` and ``adn.N``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: cubic kernel size (odd).
        stride: convolution stride; with stride 2 an even size ``L`` becomes ``L / 2``.
        dilation: convolution dilation.
        act: apply the ReLU (``False`` gives the reference's ``CB`` block: conv + BN).
        transposed: transposed convolution (upsampling by ``stride``, ``output_padding = stride - 1``).
        bn_momentum: BatchNorm momentum in PyTorch's convention (weight of the newest batch). The reference
            uses 0.95, so the running statistics follow the last few batches closely.
        bn_eps: BatchNorm epsilon (reference: 1e-3).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        act: bool = True,
        transposed: bool = False,
        bn_momentum: float = 0.95,
        bn_eps: float = 1e-3,
    ) -> None:
        super().__init__(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            strides=stride,
            kernel_size=kernel_size,
            adn_ordering="NA",
            act=("relu", {"inplace": True}) if act else None,
            norm=("batch", {"momentum": bn_momentum, "eps": bn_eps}),
            dilation=dilation,
            bias=False,
            is_transposed=transposed,
            output_padding=stride - 1 if transposed else None,
        )


def _plain_conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1) -> nn.Module:
    """Bias-free 3D convolution with "same" padding (the reference's ``C`` / ``CDilated``)."""
    return Convolution(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        strides=stride,
        kernel_size=kernel_size,
        dilation=dilation,
        bias=False,
        conv_only=True,
    )


class ESPBlock(nn.Module):
    """Efficient Spatial Pyramid module (paper Fig. 2; reference ``DilatedParllelResidualBlockB1``).

    Reduce-Split-Transform-Merge: a 1x1x1 CBR reduces ``in_channels`` to ``d = out_channels // K``; ``K``
    parallel dilated ``kernel_size``-cubed convolutions (the first one gives ``out_channels - (K-1) d``
    channels so the widths add up) transform it; hierarchical feature fusion adds each branch from the
    second on to the sum of the branches before it (the first branch is kept apart, as in ESPNet), the
    outputs are concatenated, batch-normalised, added to the input when the shapes match, and ReLU'd.

    The strided module (encoder downsampling) applies ``stride`` in the branch convolutions; the 1x1x1
    reduction runs at the input resolution, as in the reference. The paper's strided module uses kernels of
    growing size; the reference (and this class) uses the same dilated kernels as the plain module.

    The residual is decided at construction (``stride == 1 and in_channels == out_channels``), which is when
    the reference's run-time shape test succeeds for any input.

    Args:
        in_channels: ``M`` in Fig. 2.
        out_channels: ``N`` in Fig. 2.
        stride: 1, or 2 for a downsampling module (odd sizes round up).
        dilations: one dilation per branch; ``K = len(dilations)`` (reference: ``(1, 1, 2, 2)``).
        kernel_size: branch kernel size.
        bn_momentum: momentum of the reduction CBR's BatchNorm.
        bn_eps: epsilon of the reduction CBR's BatchNorm.
        merge_bn_momentum: momentum of the BatchNorm after the concatenation (the reference leaves it
            at PyTorch's default 0.1, unlike its CBR blocks).
        merge_bn_eps: epsilon of that BatchNorm (reference: PyTorch's default 1e-5).

    Shapes: ``(B, in_channels, H, W, D)`` -> ``(B, out_channels, ceil(H/s), ceil(W/s), ceil(D/s))``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        dilations: Sequence[int] = (1, 1, 2, 2),
        kernel_size: int = 3,
        bn_momentum: float = 0.95,
        bn_eps: float = 1e-3,
        merge_bn_momentum: float = 0.1,
        merge_bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        branches = len(dilations)
        if branches < 1 or out_channels < branches:
            raise ValueError(f"need 1 <= len(dilations) <= out_channels, got {branches} branches, {out_channels=}")
        width = out_channels // branches
        first_width = out_channels - (branches - 1) * width
        self.reduce = CBR(in_channels, width, 1, bn_momentum=bn_momentum, bn_eps=bn_eps)
        self.branches = nn.ModuleList(
            [
                _plain_conv(width, first_width if i == 0 else width, kernel_size, stride=stride, dilation=d)
                for i, d in enumerate(dilations)
            ]
        )
        self.bn = nn.BatchNorm3d(out_channels, momentum=merge_bn_momentum, eps=merge_bn_eps)
        self.residual: bool = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduced = self.reduce(x)
        outs: list[torch.Tensor] = []
        for i, branch in enumerate(self.branches):
            y = branch(reduced)
            if i >= 2:  # hierarchical feature fusion; branch 0 stays apart, branch 1 starts the running sum
                y = y + outs[-1]
            outs.append(y)
        out = self.bn(torch.cat(outs, dim=1))
        if self.residual:
            out = out + x
        return F.relu(out, inplace=True)


class SPPBlock(nn.Module):
    """Spatial pyramid "pooling" by convolutions of several kernel sizes (paper Fig. 3a; reference ``ASPBlock``).

    Parallel conv + BatchNorm branches with kernel sizes ``kernel_sizes`` (not dilated), summed, added to
    the input when ``in_channels == out_channels``, then ReLU.

    Args:
        in_channels: input channels (the number of classes in 3D-ESPNet's refinement).
        out_channels: output channels; defaults to ``in_channels``.
        kernel_sizes: the branches' cubic kernel sizes (reference: ``(3, 5, 7, 9)``).
        bn_momentum: BatchNorm momentum of the branches (reference: 0.95).
        bn_eps: BatchNorm epsilon of the branches (reference: 1e-3).

    Shapes: ``(B, in_channels, H, W, D)`` -> ``(B, out_channels, H, W, D)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        kernel_sizes: Sequence[int] = (3, 5, 7, 9),
        bn_momentum: float = 0.95,
        bn_eps: float = 1e-3,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        if len(kernel_sizes) < 1:
            raise ValueError("SPPBlock needs at least one kernel size")
        self.branches = nn.ModuleList(
            [CBR(in_channels, out_channels, k, act=False, bn_momentum=bn_momentum, bn_eps=bn_eps) for k in kernel_sizes]
        )
        self.residual: bool = in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(1, dtype=x.dtype, device=x.device)
        for i, branch in enumerate(self.branches):
            out = branch(x) if i == 0 else out + branch(x)
        if self.residual:
            out = out + x
        return F.relu(out, inplace=True)


class PSPBlock(nn.Module):
    """Pyramid pooling block, split-pool-transform-upsample-merge (paper Fig. 3b; reference ``PSPDec``).

    Each branch average-pools the input to ``int(scale * size)`` voxels per axis (at least 1; adaptive
    pooling, so any size works), applies a CBR, and interpolates back trilinearly; the branch outputs are
    concatenated after the input. During ONNX export the pooling runs as :func:`adaptive_avg_pool3d_separable`
    (the same averages, exportable for any size).

    Args:
        channels: input channels ``C``.
        scales: relative output size of each branch's pooling (reference: ``(0.2, 0.4, 0.6, 0.8)``).
        branch_channels: CBR output channels per branch; defaults to ``channels``.
        kernel_size: kernel of the branch CBR. The paper calls it point-wise (1); the reference uses 3.
        bn_momentum: BatchNorm momentum of the branch CBRs.
        bn_eps: BatchNorm epsilon of the branch CBRs.
        align_corners: of the trilinear upsampling.

    Shapes: ``(B, C, H, W, D)`` -> ``(B, C + len(scales) * branch_channels, H, W, D)``.
    """

    def __init__(
        self,
        channels: int,
        scales: Sequence[float] = (0.2, 0.4, 0.6, 0.8),
        branch_channels: int | None = None,
        kernel_size: int = 3,
        bn_momentum: float = 0.95,
        bn_eps: float = 1e-3,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        branch_channels = channels if branch_channels is None else branch_channels
        if any(not 0.0 < s <= 1.0 for s in scales):
            raise ValueError(f"PSP scales must lie in (0, 1], got {tuple(scales)}")
        self.scales: list[float] = [float(s) for s in scales]
        self.branches = nn.ModuleList(
            [CBR(channels, branch_channels, kernel_size, bn_momentum=bn_momentum, bn_eps=bn_eps) for _ in self.scales]
        )
        self.align_corners = align_corners
        self.out_channels = channels + len(self.scales) * branch_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size: list[int] = [int(s) for s in x.shape[2:]]
        outs: list[torch.Tensor] = [x]
        for i, branch in enumerate(self.branches):
            scale = self.scales[i]
            pooled_size = [max(1, int(float(s) * scale)) for s in size]
            if torch.jit.is_scripting():
                pooled = F.adaptive_avg_pool3d(x, pooled_size)
            # is_exporting: torch.onnx's fallback to torch.export(strict=True) reads is_in_onnx_export() as False
            elif torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
                pooled = adaptive_avg_pool3d_separable(x, pooled_size)
            else:
                pooled = F.adaptive_avg_pool3d(x, pooled_size)
            y = branch(pooled)
            outs.append(F.interpolate(y, size=size, mode="trilinear", align_corners=self.align_corners))
        return torch.cat(outs, dim=1)
