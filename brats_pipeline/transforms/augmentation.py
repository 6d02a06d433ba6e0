"""The papers' random training augmentation, computed from the cached brain box with as few copies as possible.

Both bundles' ``train#random_transforms`` used to be MONAI chains: ``RestoreFieldOfViewd`` (segresnet_vae: the cached
brain box zero-padded back to the whole volume) or ``RandZoomd`` (espnet3d), ``SpatialPadd`` + ``RandSpatialCropd``,
``RandShiftIntensityd`` + ``RandScaleIntensityd`` (segresnet_vae) and three ``RandFlipd``. Each link copies the
volume once or more: on one CPU core that was 0.16-0.36 s per case, most of what a data-loader worker spends per
case once the persistent cache has removed the NIfTI decoding (``docs/performance.md``). The transforms here draw
their random parameters from the same distributions as those chains and, for the same parameters, return the same
tensors (``tests/test_augmentation.py`` compares them with MONAI's transforms), in one copy each:

* :class:`RandCropFromBoxd`: the random ``roi_size`` crop of the whole field of view (segresnet_vae, Myronenko
  2018 Sec. 3.7) or of the brain box after a random zoom (espnet3d), pasted straight from the cached box: the
  volume outside the box is zero by the brain crop's definition, so it is never materialised.
* :class:`RandShiftScaleIntensityd`: MONAI's per-channel shift, then scale, in one new tensor.
* :class:`RandFlipAxesd`: each spatial axis flipped with its own probability, in one ``torch.flip``.

Training crops are not invertible: the outputs carry the input's metadata with the affine updated and no
``applied_operations``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable
from monai.utils import ensure_tuple_rep

__all__ = ["RandCropFromBoxd", "RandFlipAxesd", "RandShiftScaleIntensityd"]


def brain_box_geometry(img: NdarrayOrTensor) -> tuple[list[int], list[int]] | None:
    """``(whole volume's spatial size, the box's first voxel in it)`` from the ``CropForegroundd`` record of ``img``.

    The record is the last of the MetaTensor's ``applied_operations``: its ``orig_size``, the ``cropped`` margins and
    the ``k_divisible`` padding (``pad_info``), so the offset may be negative where the padding reaches outside the
    volume. ``None`` if ``img`` has no such record (not cropped, or not a MetaTensor).
    """
    ops = getattr(img, "applied_operations", None)
    if not ops or ops[-1].get("class") != "CropForeground":
        return None
    op = ops[-1]
    info = op.get("extra_info", {})
    cropped = [int(c) for c in info["cropped"]]
    padded = info.get("pad_info", {}).get("extra_info", {}).get("padded", ())
    spatial_pads = [tuple(int(v) for v in p) for p in list(padded)[1:]] if padded else []
    orig_size = [int(s) for s in op["orig_size"]]
    offsets = [cropped[2 * i] - (spatial_pads[i][0] if spatial_pads else 0) for i in range(len(orig_size))]
    return orig_size, offsets


class RestoreFieldOfViewd(MapTransform):
    """Undo the most recent ``CropForegroundd`` of each key: zero-pad ``(C, *cropped)`` back to ``(C, *orig_size)``.

    The persistent cache (:mod:`brats_pipeline.data.cache`) stores every case cropped to its brain box, a third of the
    bytes of the full field of view. A recipe that samples its random crops from the whole volume (Myronenko:
    160x192x128 crops of the 240x240x155 volume) restores the field of view after the cache, so its crops are the
    same as without the cache: everything outside the brain box is zero by the crop's definition (``x > 0`` on the
    image; a label outside the brain does not occur in skull-stripped BraTS data).

    Unlike ``CropForegroundd.inverse``, which requires the very transform object that cropped (the cached item was
    cropped in an earlier run), this reads the crop's record in the MetaTensor's ``applied_operations`` (the
    ``cropped`` margins and the ``k_divisible`` padding) and removes it, so later ``Invertd`` steps stay consistent.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.restore(d[key], key)
        return d

    @staticmethod
    def restore(img: NdarrayOrTensor, key: Hashable) -> MetaTensor:
        """``(C, *box)`` -> ``(C, *orig_size)``: the brain box zero-padded back into the whole volume."""
        geometry = brain_box_geometry(img)
        if geometry is None:
            raise ValueError(f"RestoreFieldOfViewd: the last operation applied to '{key}' is not a CropForeground crop")
        orig_size, offsets = geometry
        tensor = img.as_tensor()
        out = torch.zeros((tensor.shape[0], *orig_size), dtype=tensor.dtype)
        target, source = [slice(None)], [slice(None)]
        for size, offset, box in zip(orig_size, offsets, tensor.shape[1:], strict=True):
            lo, hi = max(offset, 0), min(offset + box, size)  # the box without its k_divisible padding
            target.append(slice(lo, hi))
            source.append(slice(lo - offset, hi - offset))
        out[tuple(target)] = tensor[tuple(source)]
        shift = torch.eye(len(orig_size) + 1, dtype=torch.float64)
        shift[:-1, -1] = -torch.tensor(offsets, dtype=torch.float64)  # voxel 0 of the box is voxel `offset`
        restored = MetaTensor(out, meta=dict(img.meta), applied_operations=list(img.applied_operations[:-1]))
        restored.affine = torch.as_tensor(img.affine, dtype=torch.float64) @ shift
        return restored


def _with_meta(out: torch.Tensor, img: NdarrayOrTensor, voxel_map: torch.Tensor | None = None) -> torch.Tensor:
    """``out`` with ``img``'s metadata; ``voxel_map`` (4x4: output voxel -> input voxel) updates the affine."""
    if not isinstance(img, MetaTensor):
        return out
    result = MetaTensor(out, meta=dict(img.meta), applied_operations=[])
    if voxel_map is not None:
        result.affine = torch.as_tensor(img.affine, dtype=torch.float64) @ voxel_map
    return result


def _plain(img: NdarrayOrTensor) -> torch.Tensor:
    """The tensor behind ``img``, without MetaTensor bookkeeping on the operations that follow."""
    return img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)


def _pasted(source: torch.Tensor, target: Sequence[slice], shape: Sequence[int]) -> torch.Tensor:
    """A tensor of ``shape`` holding ``source`` at ``target`` (one slice per axis) and zeros elsewhere; only the
    margins around ``target`` are zeroed, not the whole tensor first."""
    out = torch.empty(tuple(shape), dtype=source.dtype)
    out[tuple(target)] = source
    for axis, region in enumerate(target):
        lo, hi = region.indices(shape[axis])[:2]
        before, after = [slice(None)] * len(shape), [slice(None)] * len(shape)
        before[axis], after[axis] = slice(0, lo), slice(hi, shape[axis])
        for part in (before, after):
            # the margin of this axis, within the target's extent on the axes handled before (zeroed already)
            for prior in range(axis):
                part[prior] = target[prior]
            out[tuple(part)] = 0
    return out


def _symmetric_pad(size: int, roi: int) -> int:
    """Leading padding of MONAI ``SpatialPad(method="symmetric")`` from ``size`` to at least ``roi``."""
    return max(roi - size, 0) // 2


def _nearest_indices(in_size: int, out_size: int, positions: torch.Tensor) -> torch.Tensor:
    """Source indices of ``torch.nn.functional.interpolate(mode="nearest")`` (its float32 rule) for ``positions``."""
    scale = torch.tensor(float(in_size), dtype=torch.float32) / out_size
    return torch.clamp((positions.to(torch.float32) * scale).floor().long(), max=in_size - 1)


class RandCropFromBoxd(Randomizable, MapTransform):
    """A random ``roi_size`` crop of the brain box, or of the whole field of view, after an optional random zoom.

    The distributions of MONAI's chain (zoom, then the symmetric pad to ``roi_size``, then the random crop) and, for
    the drawn parameters, the same output:

    * ``full_field_of_view=True``: ``RestoreFieldOfViewd`` + ``SpatialPadd(roi_size)`` + ``RandSpatialCropd(roi_size)``
      (Myronenko 2018: 160x192x128 crops of the 240x240x155 volume). The crop is drawn in the whole volume recorded
      by the brain crop (``CropForegroundd``'s ``applied_operations``; an input without that record is taken as
      the whole volume) and the part of the brain box inside it is pasted into a zero tensor.
    * ``full_field_of_view=False``: ``RandZoomd(prob=zoom_prob, min_zoom, max_zoom, keep_size=False)`` +
      ``SpatialPadd`` + ``RandSpatialCropd`` on the brain box (espnet3d). A ``"nearest"`` key (the label map) is
      gathered at the crop's voxels only, with ``interpolate``'s float32 index rule; a linear key (the image) is
      zoomed by ``torch.nn.functional.interpolate`` exactly as MONAI's ``Zoom`` does, then cropped.

    Random draws, in order: zoom or not (``R.rand() < zoom_prob``, not drawn if ``zoom_prob`` is 0), the zoom factors (``R.uniform`` per entry of
    ``min_zoom``; one entry is one isotropic factor) if zoomed, then the crop's corner per axis
    (``R.randint(0, padded - roi + 1)``).

    Args:
        keys: keys to crop (image and label); all share the draws.
        roi_size: the crop size, per spatial axis.
        full_field_of_view: draw the crop in the whole volume instead of the brain box.
        zoom_prob: probability of zooming.
        min_zoom: smallest zoom factor (float or one per spatial axis).
        max_zoom: largest zoom factor.
        mode: interpolation per key (``"trilinear"`` or ``"nearest"``), as in ``RandZoomd``.
        align_corners: per key, for the linear modes.
        allow_missing_keys: skip absent keys.

    Input ``(C, *box)`` per key; output ``(C, *roi_size)``; the label map may stay uint8.
    """

    def __init__(
        self,
        keys: KeysCollection,
        roi_size: Sequence[int],
        full_field_of_view: bool = False,
        zoom_prob: float = 0.0,
        min_zoom: float | Sequence[float] = 1.0,
        max_zoom: float | Sequence[float] = 1.0,
        mode: str | Sequence[str] = "trilinear",
        align_corners: bool | None | Sequence[bool | None] = False,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.roi_size = tuple(int(s) for s in roi_size)
        self.full_field_of_view = bool(full_field_of_view)
        self.zoom_prob = float(zoom_prob)
        self.min_zoom = tuple(float(z) for z in np.atleast_1d(min_zoom))
        self.max_zoom = tuple(float(z) for z in np.atleast_1d(max_zoom))
        if len(self.min_zoom) != len(self.max_zoom) or len(self.min_zoom) not in (1, len(self.roi_size)):
            raise ValueError(f"min_zoom {min_zoom} and max_zoom {max_zoom}: give one factor or one per spatial axis")
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.align_corners = ensure_tuple_rep(align_corners, len(self.keys))
        self.zoom: tuple[float, ...] | None = None
        self.corner: tuple[int, ...] = ()

    def randomize(self, size: Sequence[int]) -> None:
        """Draw the zoom (or none) and the crop's corner for a source of spatial ``size``."""
        self.zoom = None
        if self.zoom_prob > 0 and self.R.rand() < self.zoom_prob:  # no draw without zoom: RandSpatialCropd's crops
            factors = [self.R.uniform(lo, hi) for lo, hi in zip(self.min_zoom, self.max_zoom, strict=True)]
            self.zoom = tuple(factors * len(size)) if len(factors) == 1 else tuple(factors)
        padded = [max(z, r) for z, r in zip(self.zoomed_size(size), self.roi_size, strict=True)]
        self.corner = tuple(
            int(self.R.randint(0, p - r + 1)) if p > r else 0 for p, r in zip(padded, self.roi_size, strict=True)
        )

    def zoomed_size(self, size: Sequence[int]) -> list[int]:
        """Spatial size after the drawn zoom (MONAI ``Zoom``'s ``floor(size * factor)``)."""
        if self.zoom is None:
            return [int(s) for s in size]
        return [int(math.floor(float(s) * z)) for s, z in zip(size, self.zoom, strict=True)]

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        first = self.first_key(d)
        if first == ():
            return d
        size, _ = self._source(d[first])
        self.randomize(size)
        for key, mode, align_corners in self.key_iterator(d, self.mode, self.align_corners):
            d[key] = self._crop(d[key], mode, align_corners)
        return d

    def _source(self, img: NdarrayOrTensor) -> tuple[list[int], list[int]]:
        """(spatial size of the volume the crop is drawn from, the box's offset in it)."""
        box = [int(s) for s in img.shape[1:]]
        if not self.full_field_of_view:
            return box, [0] * len(box)
        geometry = brain_box_geometry(img)
        return (box, [0] * len(box)) if geometry is None else geometry

    def _crop(self, img: NdarrayOrTensor, mode: str, align_corners: bool | None) -> torch.Tensor:
        if self.zoom is not None and self.full_field_of_view and brain_box_geometry(img) is not None:
            img = RestoreFieldOfViewd.restore(img, "image")  # zoom the whole volume, as MONAI's chain would
        size, offset = self._source(img)
        tensor = _plain(img)
        if self.zoom is None:
            return self._paste(img, tensor, size, offset, scale=[1.0] * len(size))
        zoomed = self.zoomed_size(size)
        pads = [_symmetric_pad(z, r) for z, r in zip(zoomed, self.roi_size, strict=True)]
        if mode == "nearest":
            target, indices = [slice(None)], []
            for n, z, r, c, p in zip(size, zoomed, self.roi_size, self.corner, pads, strict=True):
                lo, hi = max(p - c, 0), min(z + p - c, r)  # output voxels inside the zoomed volume
                target.append(slice(lo, hi))
                indices.append(_nearest_indices(n, z, torch.arange(c + lo - p, c + hi - p)))
            source = tensor
            for axis, index in enumerate(indices):
                source = source.index_select(axis + 1, index)
            out = _pasted(source, target, (tensor.shape[0], *self.roi_size))
            return _with_meta(out, img, self._voxel_map(size, zoomed, pads))
        zoomed_tensor = F.interpolate(
            tensor.to(torch.float32).unsqueeze(0),
            scale_factor=list(self.zoom),
            mode=mode,
            align_corners=align_corners,
            recompute_scale_factor=True,
        ).squeeze(0)
        scale = [n / z for n, z in zip(size, zoomed, strict=True)]
        return self._paste(img, zoomed_tensor, zoomed, [0] * len(size), scale=scale, zoomed_from=size)

    def _paste(
        self,
        img: NdarrayOrTensor,
        tensor: torch.Tensor,
        size: Sequence[int],
        offset: Sequence[int],
        scale: Sequence[float],
        zoomed_from: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """The crop of ``tensor`` (a volume of spatial ``size`` holding ``tensor`` at ``offset``) after the pad."""
        pads = [_symmetric_pad(s, r) for s, r in zip(size, self.roi_size, strict=True)]
        target, source, inside = [slice(None)], [slice(None)], True
        for n, o, b, r, c, p in zip(size, offset, tensor.shape[1:], self.roi_size, self.corner, pads, strict=True):
            # output voxel j is volume voxel c + j - p, i.e. box voxel c + j - p - o
            lo = max(p - c, o + p - c, 0)
            hi = min(n + p - c, o + b + p - c, r)
            hi = max(hi, lo)
            target.append(slice(lo, hi))
            source.append(slice(c + lo - p - o, c + hi - p - o))
            inside = inside and lo == 0 and hi == r
        if inside:  # no zeros to add: a view, as MONAI's crop returns
            out = tensor[tuple(source)]
        else:
            out = _pasted(tensor[tuple(source)], target, (tensor.shape[0], *self.roi_size))
        if zoomed_from is not None:
            voxel_map = self._voxel_map(zoomed_from, size, pads)
        else:
            voxel_map = torch.eye(len(size) + 1, dtype=torch.float64)
            for axis, (o, c, p) in enumerate(zip(offset, self.corner, pads, strict=True)):
                voxel_map[axis, -1] = c - p - o
        return _with_meta(out, img, voxel_map)

    def _voxel_map(self, size: Sequence[int], zoomed: Sequence[int], pads: Sequence[int]) -> torch.Tensor:
        """Output voxel -> source voxel of a zoomed crop (voxel centres, as MONAI's ``scale_affine``)."""
        voxel_map = torch.eye(len(size) + 1, dtype=torch.float64)
        for axis, (n, z, c, p) in enumerate(zip(size, zoomed, self.corner, pads, strict=True)):
            s = n / z
            voxel_map[axis, axis] = s
            voxel_map[axis, -1] = (c - p + 0.5) * s - 0.5
        return voxel_map


class RandShiftScaleIntensityd(Randomizable, MapTransform):
    """Per channel ``c``: ``(x + o_c) * (1 + f_c)``, ``o_c ~ U(-offsets, offsets)``, ``f_c ~ U(-factors, factors)``.

    Myronenko 2018 Sec. 3.7: "a random (per channel) intensity shift (-0.1..0.1 of image std) and scale (0.9..1.1)
    on input image channels", on z-scored channels (so the shift is in units of the channel's std). The distributions
    of MONAI's ``RandShiftIntensityd(offsets, prob=1, channel_wise=True)`` followed by ``RandScaleIntensityd(factors,
    prob=1, channel_wise=True)`` (drawn from one random state: all offsets, then all factors) and, for the drawn
    values, the same tensor, in one new tensor instead of four.

    Args:
        keys: the image key(s), ``(C, *spatial)`` float.
        offsets: half-width of the shift's range, or ``(low, high)``.
        factors: half-width of the scale factor's range around 1, or ``(low, high)``.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        offsets: float | Sequence[float] = 0.1,
        factors: float | Sequence[float] = 0.1,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.offsets = self._range(offsets)
        self.factors = self._range(factors)
        self.offset_values: list[float] = []
        self.factor_values: list[float] = []

    @staticmethod
    def _range(value: float | Sequence[float]) -> tuple[float, float]:
        if isinstance(value, (int, float)):
            return (min(-value, value), max(-value, value))
        if len(value) != 2:
            raise ValueError(f"expected a float or (low, high), got {value!r}")
        return (min(value), max(value))

    def randomize(self, channels: int) -> None:
        self.offset_values = [self.R.uniform(*self.offsets) for _ in range(channels)]
        self.factor_values = [self.R.uniform(*self.factors) for _ in range(channels)]

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        first = self.first_key(d)
        if first == ():
            return d
        self.randomize(int(d[first].shape[0]))
        for key in self.key_iterator(d):
            tensor = _plain(d[key])
            shape = (-1,) + (1,) * (tensor.ndim - 1)
            offsets = torch.tensor(self.offset_values, dtype=tensor.dtype).reshape(shape)
            scales = torch.tensor([1.0 + f for f in self.factor_values], dtype=tensor.dtype).reshape(shape)
            d[key] = _with_meta(torch.add(tensor, offsets).mul_(scales), d[key])
        return d


class RandFlipAxesd(Randomizable, MapTransform):
    """Flip each spatial axis with probability ``prob``, independently (Myronenko 2018 Sec. 3.7: "random axis mirror
    flip (for all 3 axes) with a probability 0.5"), in one ``torch.flip``.

    The distribution of one MONAI ``RandFlipd(prob, spatial_axis=a)`` per axis of ``spatial_axes`` (drawn from one
    random state: one ``R.rand() < prob`` per axis, in order) and, for the drawn axes, the same tensor; those copy the
    volume once per flipped axis.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        spatial_axes: Sequence[int] = (0, 1, 2),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.prob = float(prob)
        self.spatial_axes = tuple(int(a) for a in spatial_axes)
        self.flipped: tuple[int, ...] = ()

    def randomize(self, data: object = None) -> None:
        self.flipped = tuple(a for a in self.spatial_axes if self.R.rand() < self.prob)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        self.randomize()
        if not self.flipped:
            return d
        for key in self.key_iterator(d):
            tensor = _plain(d[key])
            voxel_map = torch.eye(tensor.ndim, dtype=torch.float64)
            for axis in self.flipped:
                voxel_map[axis, axis] = -1.0
                voxel_map[axis, -1] = tensor.shape[axis + 1] - 1
            d[key] = _with_meta(torch.flip(tensor, [a + 1 for a in self.flipped]), d[key], voxel_map)
        return d
