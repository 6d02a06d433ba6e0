"""Dictionary transforms of the BraTS data layer that MONAI does not provide."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from monai.config import DtypeLike, KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.data.image_reader import NibabelReader
from monai.transforms import MapTransform
from monai.utils import MetaKeys


class ReorderChannelsd(MapTransform):
    """Reorder the channel axis of ``(C, H, W, D)`` images to the order stored in the data dict under ``order_key``.

    MSD Task01 ships one 4-D file per case with channels FLAIR, T1w, T1gd, T2w; after ``LoadImaged`` and
    ``EnsureChannelFirstd`` its datalist entry's ``"channel_order"`` (``[2, 1, 3, 0]``: the index in the file of
    each modality of :data:`brats_pipeline.layouts.CHANNELS`) turns it into the project's order t1c, t1, t2,
    flair: ``out[i] = img[order[i]]``. Entries without ``order_key`` (BraTS layouts, whose four files are
    already listed in that order) pass through unchanged, so one pipeline serves every layout.
    MetaTensor metadata and applied operations are kept.
    """

    def __init__(self, keys: KeysCollection, order_key: str = "channel_order", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.order_key = order_key

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        order = d.get(self.order_key)
        if order is None:
            return d
        order = [int(i) for i in (order.tolist() if isinstance(order, (np.ndarray, torch.Tensor)) else order)]
        for key in self.key_iterator(d):
            d[key] = self._reorder(d[key], order)
        return d

    @staticmethod
    def _reorder(img: NdarrayOrTensor, order: Sequence[int]) -> NdarrayOrTensor:
        if sorted(order) != list(range(img.shape[0])):
            source = img.meta.get("filename_or_obj", "<image>") if isinstance(img, MetaTensor) else "<image>"
            raise ValueError(
                f"{source}: channel order {list(order)} is not a permutation of the {img.shape[0]} channels of an "
                f"image of shape {tuple(img.shape)} (is the channel axis first?)"
            )
        if isinstance(img, MetaTensor):
            out = img.as_tensor()[list(order)]
            return MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)
        return img[list(order)]


class RestoreFieldOfViewd(MapTransform):
    """Undo the most recent ``CropForegroundd`` of each key: zero-pad ``(C, *cropped)`` back to ``(C, *orig_size)``.

    The persistent cache (:mod:`brats_pipeline.data_cache`) stores every case cropped to its brain box, a third of the
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


class ThreadedNibabelReader(NibabelReader):
    """MONAI's ``NibabelReader`` that decompresses the files of one case (the four modalities) in parallel threads,
    straight into the stacked ``(C, H, W, D)`` array.

    ``LoadImaged`` reads a case's modalities one after the other; each ``.nii.gz`` is a gzip stream whose inflation
    (zlib) releases the GIL, so threads overlap them. Each thread also copies its Fortran-ordered NIfTI array, cast
    to ``dtype``, into its channel of one C-ordered array (numpy copies without the GIL), which spares the main
    thread ``NibabelReader``'s stacking and ``LoadImaged``'s conversion: two copies of the whole case. Same array and
    metadata as ``NibabelReader`` followed by ``LoadImaged(dtype=dtype)`` (tested), and the same error when the files
    of a case differ in shape or affine.

    Args:
        num_threads: threads per case (at most one per file).
        dtype: the type ``LoadImaged`` converts to (its default ``float32``); ``None`` keeps the stored types and
            leaves the stacking to ``NibabelReader``.
        kwargs: ``NibabelReader`` arguments.
    """

    def __init__(self, num_threads: int = 4, dtype: DtypeLike | None = np.float32, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_threads = int(num_threads)
        self.dtype = None if dtype is None else np.dtype(dtype)
        self._arrays: dict[int, np.ndarray] = {}
        self._stacked: np.ndarray | None = None

    def read(self, data, **kwargs):
        images = super().read(data, **kwargs)
        listed = list(images) if isinstance(images, (list, tuple)) else [images]
        self._arrays, self._stacked = {}, None
        if len(listed) < 2 or self.num_threads < 2:
            return images
        shapes = {tuple(img.shape) for img in listed}
        if self.dtype is not None and len(shapes) == 1 and not self.as_closest_canonical:
            self._stacked = np.empty((len(listed), *shapes.pop()), dtype=self.dtype)
            work = [(img, self._stacked[i]) for i, img in enumerate(listed)]
        else:  # stored types, or files that do not stack: NibabelReader stacks (and names the mismatch)
            work = [(img, None) for img in listed]
        with ThreadPoolExecutor(min(self.num_threads, len(listed))) as pool:
            arrays = list(pool.map(lambda job: self._materialise(*job), work))
        self._arrays = {id(img): arr for img, arr in zip(listed, arrays, strict=True)}
        return images

    @staticmethod
    def _materialise(img, target: np.ndarray | None) -> np.ndarray:
        array = np.asanyarray(img.dataobj)
        if target is None:
            return np.ascontiguousarray(array)
        np.copyto(target, array, casting="unsafe")
        return target

    def get_data(self, img):
        listed = list(img) if isinstance(img, (list, tuple)) else [img]
        stacked, self._stacked = self._stacked, None
        if stacked is None or len(listed) != stacked.shape[0]:
            return super().get_data(img)
        names = [str(f) for f in self.filenames]
        _, meta = super().get_data(listed[0])  # the first file's metadata; its array is a view of ``stacked``
        for other, name in zip(listed[1:], names[1:], strict=True):  # NibabelReader's check of the files it stacks
            if not np.allclose(self._get_affine(other), meta[MetaKeys.AFFINE]):
                raise RuntimeError(
                    f"{name}: its affine differs from that of {names[0]}; the files of a case must share one grid "
                    "to be stacked as channels"
                )
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        self._arrays.clear()
        return stacked, meta

    def _get_array_data(self, img, filename):
        array = self._arrays.pop(id(img), None)
        return array if array is not None else super()._get_array_data(img, filename)


class NormalizeNonzeroIntensityd(MapTransform):
    """Z-score each channel over its non-zero voxels; zeros (background) stay 0. Myronenko 2018, Sec. 3.7.

    The same result as MONAI's ``NormalizeIntensityd(nonzero=True, channel_wise=True)`` (population standard
    deviation; a constant channel is only shifted), computed from per-channel sums (float64 accumulators) written
    into one output tensor instead of boolean gathering and scattering: about 0.06 s for a 4 x 144 x 192 x 144 brain
    box with two threads, where MONAI's takes 0.3-0.9 s on one core (slowest on the strided view a crop returns).
    Values agree with MONAI's to float32 rounding (tested).
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalize(d[key])
        return d

    @staticmethod
    def normalize(img: NdarrayOrTensor) -> NdarrayOrTensor:
        """``(C, *spatial)`` -> float32 ``(C, *spatial)``, each channel's non-zero voxels z-scored."""
        tensor = (img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)).float()
        out = torch.empty(tensor.shape, dtype=torch.float32)
        for channel, target in zip(tensor, out, strict=True):
            count = int(torch.count_nonzero(channel))
            if count == 0:
                target.copy_(channel)
                continue
            mean = channel.sum(dtype=torch.float64) / count
            var = torch.clamp(channel.square().sum(dtype=torch.float64) / count - mean * mean, min=0.0)
            std = float(var.sqrt()) or 1.0
            torch.sub(channel, float(mean), out=target).div_(std).masked_fill_(channel == 0, 0.0)
        if isinstance(img, MetaTensor):
            return MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)
        return out if isinstance(img, torch.Tensor) else out.numpy()


__all__ = [
    "NormalizeNonzeroIntensityd",
    "ReorderChannelsd",
    "RestoreFieldOfViewd",
    "ThreadedNibabelReader",
    "brain_box_geometry",
]
