"""3D-ESPNet with pyramidal refinement (Nuechterlein & Mehta, "3D-ESPNet with Pyramidal Refinement for
Volumetric Brain Tumor Image Segmentation", BrainLes 2018, Fig. 1 and Fig. 4).

The paper fixes the overall design; the reference implementation (``sacmehta/3D-ESPNet``, ``Model.py``)
fixes what the paper leaves open (widths, block counts, dilations, BatchNorm settings, the PSP kernel). At
the default arguments the parameter count equals the reference's, 3,626,584 (the paper rounds to 3.8M).

Deliberate differences from the reference implementation:

* The reference resamples every input (to 128^3 in eval mode, to the next multiple of 8 in training) and
  interpolates the output back. This network never resamples: it pads the input to a multiple of the
  network stride (8) inside ``forward`` (the arithmetic of MONAI's ``DivisiblePad(k=8, method="symmetric")``,
  zeros by default), runs at native resolution and crops the logits back, so any ``H, W, D`` works.
* It returns logits; softmax belongs to the loss / post-transforms.
* ``head_upsample_mode`` defaults to ``"trilinear"`` as the paper states (Sect. 2.2); the reference
  classifier uses ``nn.Upsample(scale_factor=2)``, i.e. nearest neighbour.
* ``upsample="deconv"`` gives the paper's decoder (first upsampling by a 3x3x3 transposed convolution,
  the second trilinear); the default ``"trilinear"`` is the reference's (CBR, then trilinear x2, twice).
  Both have the same number of parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from custom_networks.esp import CBR, ESPBlock, PSPBlock, SPPBlock

__all__ = ["ESPNet3D"]


class _UpBlock(nn.Module):
    """x2 decoder upsampling: CBR then trilinear interpolation, or a strided 3x3x3 transposed CBR."""

    def __init__(self, in_channels: int, out_channels: int, mode: str, bn_momentum: float, bn_eps: float) -> None:
        super().__init__()
        if mode not in ("trilinear", "deconv"):
            raise ValueError(f"upsample must be 'trilinear' or 'deconv', got {mode!r}")
        self.deconv: bool = mode == "deconv"
        self.conv = CBR(
            in_channels, out_channels, 3, stride=2 if self.deconv else 1, transposed=self.deconv,
            bn_momentum=bn_momentum, bn_eps=bn_eps,
        )  # fmt: skip

    def forward(self, x: torch.Tensor, size: list[int]) -> torch.Tensor:
        x = self.conv(x)
        if self.deconv:
            return x
        return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


class ESPNet3D(nn.Module):
    """3D-ESPNet encoder-decoder with pyramidal refinement; returns class logits at the input's size.

    Encoder (resolution relative to the input): CBR ``stem_kernel_size``^3 stride 2 (1/2) -> level 1:
    ``encoder_blocks[0]`` ESP modules -> level 2: a strided ESP + ``encoder_blocks[1]`` ESP (1/4) -> level 3:
    a strided ESP + ``encoder_blocks[2]`` ESP (1/8). Decoder: x2 upsampling (CBR to the level-2 width), concat
    with the level-2 skip, a merging ESP + ``decoder_blocks[0]`` ESP; x2 upsampling, concat with the level-1
    skip, a merging ESP + ``decoder_blocks[1]`` ESP. Pyramidal refinement at 1/2 resolution: 3x3x3 CBR
    projection to ``out_channels``, SPP block, PSP block; classifier: CBR, SPP, x2 upsampling,
    ``head_kernel_size``^3 CBR, 1x1x1 convolution.

    Args:
        in_channels: input modalities.
        out_channels: classes (the refinement runs at this width, as in the paper).
        channels: widths ``(stem, level 1, level 2, level 3)``; reference ``(16, 32, 128, 256)``.
        encoder_blocks: ESP modules at levels 1, 2, 3 (at levels 2 and 3 after the strided ESP); reference
            ``(2, 2, 3)``.
        decoder_blocks: ESP modules after the merging ESP at levels 2 and 1; reference ``(2, 2)``.
        esp_branches: ``K``, parallel branches per ESP module; must equal ``len(dilations)``.
        dilations: dilation of each ESP branch (reference ``(1, 1, 2, 2)``).
        esp_kernel_size: ESP branch kernel size.
        stem_kernel_size: kernel of the first, strided CBR (reference 7).
        spp_kernels: kernel sizes of the SPP blocks (paper Fig. 3a / reference ``(3, 5, 7, 9)``).
        psp_scales: pooled size of each PSP branch relative to its input (reference ``(0.2, 0.4, 0.6, 0.8)``).
        psp_kernel_size: kernel of the PSP branch CBRs: 3 in the reference (the default, and what the
            parameter count assumes), 1 ("point-wise") in the paper's text.
        head_kernel_size: kernel of the classifier's CBR after its upsampling (reference 7).
        upsample: decoder upsampling, ``"trilinear"`` (reference) or ``"deconv"`` (paper), see module doc.
        head_upsample_mode: interpolation mode of the classifier's x2 upsampling: ``"trilinear"`` (paper)
            or ``"nearest"`` (reference code).
        bn_momentum: momentum of every CBR / SPP / PSP BatchNorm, in PyTorch's convention (reference 0.95).
        bn_eps: their epsilon (reference 1e-3).
        esp_bn_momentum: momentum of the BatchNorm after each ESP concatenation (reference: PyTorch's 0.1).
        esp_bn_eps: its epsilon (reference: PyTorch's 1e-5).
        pad_mode: ``torch.nn.functional.pad`` mode used to reach a multiple of the stride (``"constant"``
            pads zeros, like MONAI's ``DivisiblePad``; ``"replicate"``/``"reflect"`` also work).

    Shapes: ``(B, in_channels, H, W, D)`` -> logits ``(B, out_channels, H, W, D)`` for any ``H, W, D >= 1``.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        channels: Sequence[int] = (16, 32, 128, 256),
        encoder_blocks: Sequence[int] = (2, 2, 3),
        decoder_blocks: Sequence[int] = (2, 2),
        esp_branches: int = 4,
        dilations: Sequence[int] = (1, 1, 2, 2),
        esp_kernel_size: int = 3,
        stem_kernel_size: int = 7,
        spp_kernels: Sequence[int] = (3, 5, 7, 9),
        psp_scales: Sequence[float] = (0.2, 0.4, 0.6, 0.8),
        psp_kernel_size: int = 3,
        head_kernel_size: int = 7,
        upsample: str = "trilinear",
        head_upsample_mode: str = "trilinear",
        bn_momentum: float = 0.95,
        bn_eps: float = 1e-3,
        esp_bn_momentum: float = 0.1,
        esp_bn_eps: float = 1e-5,
        pad_mode: str = "constant",
    ) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"channels must give 4 widths (stem, level 1, 2, 3), got {tuple(channels)}")
        if len(encoder_blocks) != 3 or encoder_blocks[0] < 1:
            raise ValueError(f"encoder_blocks must give 3 counts, the first >= 1, got {tuple(encoder_blocks)}")
        if len(decoder_blocks) != 2:
            raise ValueError(f"decoder_blocks must give 2 counts, got {tuple(decoder_blocks)}")
        if esp_branches != len(dilations):
            raise ValueError(f"esp_branches={esp_branches} but {len(dilations)} dilations were given")
        if head_upsample_mode not in ("trilinear", "nearest"):
            raise ValueError(f"head_upsample_mode must be 'trilinear' or 'nearest', got {head_upsample_mode!r}")
        if pad_mode not in ("constant", "replicate", "reflect", "circular"):
            raise ValueError(f"unsupported pad_mode {pad_mode!r}")
        c0, c1, c2, c3 = (int(c) for c in channels)
        cbr_kw = {"bn_momentum": bn_momentum, "bn_eps": bn_eps}
        esp_kw = {
            "dilations": tuple(dilations),
            "kernel_size": esp_kernel_size,
            "merge_bn_momentum": esp_bn_momentum,
            "merge_bn_eps": esp_bn_eps,
            **cbr_kw,
        }

        def esp_stack(first_in: int, width: int, count: int) -> nn.ModuleList:
            return nn.ModuleList([ESPBlock(first_in if i == 0 else width, width, **esp_kw) for i in range(count)])

        # encoder
        self.stem = CBR(in_channels, c0, stem_kernel_size, stride=2, **cbr_kw)
        self.enc1 = esp_stack(c0, c1, encoder_blocks[0])
        self.down2 = ESPBlock(c1, c2, stride=2, **esp_kw)
        self.enc2 = esp_stack(c2, c2, encoder_blocks[1])
        self.down3 = ESPBlock(c2, c3, stride=2, **esp_kw)
        self.enc3 = esp_stack(c3, c3, encoder_blocks[2])
        # decoder; the upsampled maps are concatenated before the skip, as in the reference
        self.up3 = _UpBlock(c3, c2, upsample, **cbr_kw)
        self.dec2 = esp_stack(2 * c2, c2, 1 + decoder_blocks[0])
        self.up2 = _UpBlock(c2, c1, "trilinear", **cbr_kw)
        self.dec1 = esp_stack(2 * c1, c1, 1 + decoder_blocks[1])
        # pyramidal refinement (Fig. 4) at 1/2 resolution, width = number of classes
        self.project = CBR(c1, out_channels, 3, **cbr_kw)
        self.spp = SPPBlock(out_channels, kernel_sizes=spp_kernels, **cbr_kw)
        self.psp = PSPBlock(out_channels, scales=psp_scales, kernel_size=psp_kernel_size, **cbr_kw)
        # classifier
        self.head_in = nn.Sequential(
            CBR(self.psp.out_channels, out_channels, 3, **cbr_kw),
            SPPBlock(out_channels, kernel_sizes=spp_kernels, **cbr_kw),
        )
        self.head_out = nn.Sequential(
            CBR(out_channels, out_channels, head_kernel_size, **cbr_kw),
            nn.Conv3d(out_channels, out_channels, 1, bias=False),
        )
        self.head_upsample_mode = head_upsample_mode
        self.pad_mode = pad_mode
        self.stride: int = 8
        self._init_weights()

    def _init_weights(self) -> None:
        """The reference's initialisation: N(0, 2 / (k^3 * out_channels)) for every convolution."""
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                fan_out = math.prod(m.kernel_size) * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _pad_width(self, spatial: list[int]) -> list[int]:
        """``F.pad`` widths (last axis first) reaching the next multiple of ``self.stride``, split as MONAI's
        ``DivisiblePad(method="symmetric")`` splits them (the smaller half before)."""
        pad: list[int] = []
        for size in spatial[::-1]:
            total = (size + self.stride - 1) // self.stride * self.stride - size
            pad.append(total // 2)
            pad.append(total - total // 2)
        return pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial: list[int] = [int(s) for s in x.shape[2:]]
        pad = self._pad_width(spatial)
        padded = sum(pad) > 0
        if padded:
            x = F.pad(x, pad, mode=self.pad_mode)
        full_size: list[int] = [int(s) for s in x.shape[2:]]

        out1 = self.stem(x)
        for block in self.enc1:
            out1 = block(out1)
        out2 = self.down2(out1)
        for block in self.enc2:
            out2 = block(out2)
        out3 = self.down3(out2)
        for block in self.enc3:
            out3 = block(out3)

        dec = torch.cat([self.up3(out3, [int(s) for s in out2.shape[2:]]), out2], dim=1)
        for block in self.dec2:
            dec = block(dec)
        dec = torch.cat([self.up2(dec, [int(s) for s in out1.shape[2:]]), out1], dim=1)
        for block in self.dec1:
            dec = block(dec)

        out = self.psp(self.spp(self.project(dec)))
        out = self.head_in(out)
        if self.head_upsample_mode == "nearest":
            out = F.interpolate(out, size=full_size, mode="nearest")
        else:
            out = F.interpolate(out, size=full_size, mode="trilinear", align_corners=False)
        out = self.head_out(out)

        if padded:  # pad lists the last axis first
            h0, w0, d0 = pad[4], pad[2], pad[0]
            out = out[:, :, h0 : h0 + spatial[0], w0 : w0 + spatial[1], d0 : d0 + spatial[2]]
        return out
