"""Optional post-processing of discrete BraTS predictions (off by default in both bundles).

Neither seed paper post-processes (Myronenko 2018 tried CRFs and dropped them); these are the two common
additions, kept as MONAI-style transforms so a config can switch them on:

* :class:`EnhancingTumorThreshold`: nnU-Net's BraTS trick (Isensee et al., "nnU-Net for Brain Tumor
  Segmentation", BrainLes 2020): when a case's predicted enhancing tumor is smaller than a threshold, it is
  most likely a false positive in a case without ET (BraTS scores an empty reference with any ET prediction as
  Dice 0), so those voxels are relabelled as necrosis/non-enhancing core. The voxels stay in the tumor core.
  The threshold is data-dependent (nnU-Net tunes it on its training cross-validation), so it has no default.
* :class:`KeepLargestTumorComponent`: keeps the largest connected component of the whole tumor (as MONAI's
  ``KeepLargestConnectedComponent`` would) and removes the sub-regions outside it, so the nesting
  ET <= TC <= WT still holds. Multifocal gliomas exist: measure before switching it on.

Both work on the discrete predictions of either bundle: nested regions ``(3, *spatial)`` in the order
TC, WT, ET (segresnet_vae, after ``AsDiscreted(threshold=0.5)``), or a single-channel class/label map
``(1, *spatial)`` (espnet3d, after ``ArgmaxClassesd`` or MONAI's ``AsDiscreted(argmax=True)``, or any map after
``ClassesToLabel``). Apply
them before or after ``Invertd``: the ``"ml"`` unit reads the voxel size from the MetaTensor's affine, which
is right in either grid.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_dst_type
from scipy import ndimage

logger = logging.getLogger(__name__)

UNITS: tuple[str, ...] = ("voxels", "ml")
PREDICTION_LAYOUTS: tuple[str, ...] = ("regions", "classes")


def voxel_volume_ml(img: NdarrayOrTensor, spacing: Sequence[float] | None = None) -> float:
    """Volume of one voxel in ml (spacing in mm), from ``spacing`` or the MetaTensor's affine."""
    if spacing is None:
        if not isinstance(img, MetaTensor):
            raise ValueError("unit='ml' needs a MetaTensor (its affine gives the voxel size) or an explicit spacing")
        spacing = affine_to_spacing(img.affine, r=img.affine.shape[-1] - 1).tolist()
    return float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0


class EnhancingTumorThreshold(Transform):
    """Relabel a case's enhancing tumor as necrosis/non-enhancing core when its volume is below ``min_size``.

    Args:
        min_size: threshold, in ``unit``; an ET volume strictly below it (and above zero) is relabelled.
        unit: ``"voxels"`` or ``"ml"`` (voxel size from ``spacing`` or the input's affine, in mm).
        layout: ``"regions"``: binary ``(3, *spatial)`` TC, WT, ET: the ET channel is cleared and its voxels
            are added to TC (and WT), as a necrosis label would be. ``"classes"``: a ``(1, *spatial)`` or
            ``(*spatial)`` map: voxels equal to ``et_value`` become ``replacement_value``.
        et_value: enhancing tumor value of a class/label map (3 for the contiguous classes and for BraTS 2023
            and MSD labels, 4 for BraTS 2018-2021 labels).
        replacement_value: necrosis/non-enhancing core value (1 for classes and BraTS labels, 2 for MSD).
        channels: indices of (TC, WT, ET) in a region map.
        spacing: voxel size in mm, overriding the affine.

    Returns:
        A relabelled copy (same type, dtype and metadata), or the input itself when nothing changes.
    """

    def __init__(
        self,
        min_size: float,
        unit: str = "voxels",
        layout: str = "regions",
        et_value: int = 3,
        replacement_value: int = 1,
        channels: Sequence[int] = (0, 1, 2),
        spacing: Sequence[float] | None = None,
    ) -> None:
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        if layout not in PREDICTION_LAYOUTS:
            raise ValueError(f"layout must be one of {PREDICTION_LAYOUTS}, got {layout!r}")
        if min_size < 0:
            raise ValueError(f"min_size must be >= 0, got {min_size}")
        self.min_size = float(min_size)
        self.unit = unit
        self.layout = layout
        self.et_value = et_value
        self.replacement_value = replacement_value
        self.tc_channel, self.wt_channel, self.et_channel = (int(c) for c in channels)
        self.spacing = spacing

    def et_mask(self, img: NdarrayOrTensor) -> torch.Tensor:
        data = torch.as_tensor(img)
        if self.layout == "regions":
            if data.ndim < 2 or data.shape[0] <= max(self.tc_channel, self.wt_channel, self.et_channel):
                raise ValueError(f"expected regions (3, *spatial), got shape {tuple(data.shape)}")
            return data[self.et_channel] > 0.5
        return data == self.et_value

    def et_volume(self, img: NdarrayOrTensor) -> float:
        """The enhancing tumor volume of ``img`` in ``unit``."""
        count = float(self.et_mask(img).sum())
        if self.unit == "voxels":
            return count
        return count * voxel_volume_ml(img, self.spacing)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        et = self.et_mask(img)
        volume = self.et_volume(img)
        if volume == 0 or volume >= self.min_size:
            return img
        logger.info("enhancing tumor of %.6g %s < %.6g: relabelled as necrosis", volume, self.unit, self.min_size)
        data = torch.as_tensor(img).clone()
        if self.layout == "regions":
            data[self.tc_channel][et] = 1
            data[self.wt_channel][et] = 1
            data[self.et_channel] = 0
        else:
            data[et] = self.replacement_value
        if isinstance(img, MetaTensor):
            return MetaTensor(data, meta=img.meta, applied_operations=img.applied_operations)
        return convert_to_dst_type(data, img)[0]


def largest_components_mask(mask: np.ndarray, connectivity: int | None = None, num_components: int = 1) -> np.ndarray:
    """Boolean mask of the ``num_components`` largest connected components of the boolean ``mask`` (*spatial).

    Same semantics as MONAI's ``get_largest_connected_component_mask`` (``connectivity``: the maximum number
    of orthogonal hops between neighbours, ``None`` = ``mask.ndim``, i.e. 26-connectivity in 3-D), computed
    with ``scipy.ndimage.label`` because MONAI's version needs scikit-image, which is not a project dependency.
    """
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity or mask.ndim)
    labels, count = ndimage.label(mask, structure=structure)
    if count <= num_components:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.argsort(-sizes, kind="stable")[:num_components] + 1
    return np.isin(labels, keep)


class KeepLargestTumorComponent(Transform):
    """Keep the ``num_components`` largest connected components of the whole tumor; clear everything else.

    The whole-tumor mask (WT channel of a region map, or ``label > 0`` of a class/label map) is reduced to its
    largest component(s) and applied to every channel, so TC and ET voxels outside the kept whole tumor are
    cleared too and the nesting holds. MONAI's ``KeepLargestConnectedComponentd(keys="pred", applied_labels=[1],
    is_onehot=True)`` would do the WT channel alone (without the coupling) but needs scikit-image; this
    transform uses :func:`largest_components_mask` (scipy) with the same ``connectivity``/``num_components``.

    Args:
        layout: ``"regions"`` (binary ``(3, *spatial)``, TC, WT, ET) or ``"classes"`` (``(1, *spatial)`` or
            ``(*spatial)`` map).
        wt_channel: index of WT in a region map.
        connectivity: maximum number of orthogonal hops between neighbours (``None``: full, 26 in 3-D).
        num_components: how many of the largest components to keep.
    """

    def __init__(
        self, layout: str = "regions", wt_channel: int = 1, connectivity: int | None = None, num_components: int = 1
    ) -> None:
        if layout not in PREDICTION_LAYOUTS:
            raise ValueError(f"layout must be one of {PREDICTION_LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.wt_channel = wt_channel
        self.connectivity = connectivity
        self.num_components = num_components

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        data = torch.as_tensor(img)
        if self.layout == "regions":
            tumor = data[self.wt_channel] > 0.5
        else:
            tumor = (data[0] if data.ndim > 3 else data) > 0
        kept = largest_components_mask(tumor.cpu().numpy(), self.connectivity, self.num_components)
        kept_t = torch.as_tensor(kept, device=data.device)
        out = torch.where(kept_t, data, torch.zeros((), dtype=data.dtype, device=data.device))
        if isinstance(img, MetaTensor):
            return MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)
        return convert_to_dst_type(out, img)[0]


class EnhancingTumorThresholdd(MapTransform):
    """Dictionary version of :class:`EnhancingTumorThreshold`."""

    def __init__(
        self,
        keys: KeysCollection,
        min_size: float,
        unit: str = "voxels",
        layout: str = "regions",
        et_value: int = 3,
        replacement_value: int = 1,
        channels: Sequence[int] = (0, 1, 2),
        spacing: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = EnhancingTumorThreshold(
            min_size=min_size,
            unit=unit,
            layout=layout,
            et_value=et_value,
            replacement_value=replacement_value,
            channels=channels,
            spacing=spacing,
        )

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class KeepLargestTumorComponentd(MapTransform):
    """Dictionary version of :class:`KeepLargestTumorComponent`."""

    def __init__(
        self,
        keys: KeysCollection,
        layout: str = "regions",
        wt_channel: int = 1,
        connectivity: int | None = None,
        num_components: int = 1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = KeepLargestTumorComponent(
            layout=layout, wt_channel=wt_channel, connectivity=connectivity, num_components=num_components
        )

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


__all__ = [
    "EnhancingTumorThreshold",
    "EnhancingTumorThresholdd",
    "KeepLargestTumorComponent",
    "KeepLargestTumorComponentd",
    "largest_components_mask",
    "voxel_volume_ml",
]
