"""Dictionary transforms of the BraTS data layer that MONAI does not provide."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform


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


__all__ = ["ReorderChannelsd"]
