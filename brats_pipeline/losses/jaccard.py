"""3D-ESPNet's losses (Nuechterlein & Mehta, BrainLes 2018) and their class weights.

* :class:`WeightedJaccardLoss`: the paper's loss (Sect. 3.3, "we used mean intersection over union (mIOU)
  for our loss function ... We weight our mIOU loss to address the severe class imbalance").
* :class:`WeightedCrossEntropyLoss`: what the reference code trains with (``torch.nn.CrossEntropyLoss(weight)``).
* The class weights of the reference code (``loadData.py``): ``w_c = 1 / ln(c + p_c)`` with ``p_c`` the
  frequency of class ``c`` over the training labels and ``c = 1.10``
  (:func:`class_weights_from_frequencies`, :func:`class_weights_from_labels`).

Predictions are logits ``(B, C, H, W, D)``; targets are contiguous class indices ``(B, 1, H, W, D)`` (float
or integer, as :class:`brats_pipeline.transforms.labels.LabelToClassesd` gives them: 0 background, 1 NCR/NET, 2 ED, 3 ET).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.utils import look_up_option

from brats_pipeline.transforms.labels import check_label_values, get_convention

__all__ = [
    "WeightedJaccardLoss",
    "WeightedCrossEntropyLoss",
    "class_weights_from_frequencies",
    "class_weights_from_labels",
]


def _as_weight(weight: Sequence[float] | torch.Tensor | None, name: str) -> torch.Tensor | None:
    if weight is None:
        return None
    w = torch.as_tensor(weight, dtype=torch.float32).flatten()
    if w.numel() == 0 or bool((w < 0).any()) or not bool(torch.isfinite(w).all()) or float(w.sum()) <= 0:
        raise ValueError(f"{name} must be finite, non-negative and not all zero, got {w.tolist()}")
    return w


class WeightedJaccardLoss(DiceLoss):
    """Class-weighted soft Jaccard (mIoU) loss: ``1 - sum_c w_c IoU_c`` with ``sum_c w_c = 1``.

    ``p = softmax(logits)``, ``g = one_hot(target)``, and per class, summed over the voxels (and over the batch
    when ``batch=True``)::

        IoU_c = sum(p_c * g_c) / (sum(p_c + g_c - p_c * g_c) + eps)

    This is exactly MONAI's ``DiceLoss(jaccard=True)`` with plain (not squared) sums, ``smooth_nr=0`` and
    ``smooth_dr=2 * eps`` (MONAI computes ``1 - 2 tp / (2 (tp + fp + fn) + smooth_dr)`` and
    ``tp + fp + fn = sum(p + g - p g)``), so this class only sets those arguments. MONAI multiplies the
    per-class losses by ``weight`` and then averages over classes (and batch); passing ``C * w / sum(w)``
    turns that average into the weighted mean ``sum_c w_c (1 - IoU_c)`` of the paper's loss. With
    ``batch=False`` the result is the mean of that over the batch elements.

    Args:
        weight: per-class weights ``w_c`` (length ``C``, or ``C - 1`` without background), normalised here to
            sum to 1; ``None`` weights all classes equally (plain mIoU loss). The paper gives no formula; the
            bundle uses :func:`class_weights_from_labels` (the reference code's weights).
        include_background: include class 0 in the mean (the paper's mIoU does).
        batch: compute one IoU per class over the whole batch (default) instead of one per batch element.
            Per-element IoU of a class absent from an element is 0 whatever the prediction (eps only in the
            denominator): a constant term without gradient, which crops without ET/NCR would produce often.
        eps: denominator epsilon.
    """

    def __init__(
        self,
        weight: Sequence[float] | torch.Tensor | None = None,
        include_background: bool = True,
        batch: bool = True,
        eps: float = 1e-5,
    ) -> None:
        w = _as_weight(weight, "weight")
        if w is not None:
            w = w * (w.numel() / w.sum())
        super().__init__(
            include_background=include_background,
            to_onehot_y=True,
            softmax=True,
            squared_pred=False,
            jaccard=True,
            reduction="mean",
            smooth_nr=0.0,
            smooth_dr=2.0 * eps,
            batch=batch,
            weight=w,
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``input`` logits ``(B, C, *spatial)``, ``target`` class indices ``(B, 1, *spatial)`` -> scalar loss."""
        return super().forward(input, target)


class WeightedCrossEntropyLoss(nn.Module):
    """Class-weighted cross-entropy on class-index targets, the reference code's criterion.

    ``torch.nn.functional.cross_entropy(logits, target, weight)``: with ``reduction="mean"`` the weighted sum
    of the voxel losses divided by the sum of the voxels' weights, as in PyTorch. Only adapts the target
    layout: MONAI's ``(B, 1, *spatial)`` float class indices become ``(B, *spatial)`` long.

    Args:
        weight: per-class weights (length ``C``), e.g. from :func:`class_weights_from_labels`; ``None`` for
            plain cross-entropy. Stored as a buffer, so it follows the module's device.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (PyTorch's meanings).
    """

    weight: torch.Tensor | None

    def __init__(self, weight: Sequence[float] | torch.Tensor | None = None, reduction: str = "mean") -> None:
        super().__init__()
        reduction = look_up_option(reduction, ("mean", "sum", "none"))
        self.register_buffer("weight", _as_weight(weight, "weight"))
        self.reduction = reduction

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``input`` logits ``(B, C, *spatial)``, ``target`` class indices ``(B, 1, *spatial)`` or ``(B, *spatial)``."""
        if target.ndim == input.ndim:
            if target.shape[1] != 1:
                raise ValueError(f"target must hold class indices (B, 1, ...), got shape {tuple(target.shape)}")
            target = target[:, 0]
        target = torch.as_tensor(target).round().long()  # MetaTensor -> Tensor; float labels -> indices
        weight = None if self.weight is None else self.weight.to(input)
        return F.cross_entropy(torch.as_tensor(input), target, weight=weight, reduction=self.reduction)


def class_weights_from_frequencies(frequencies: Sequence[float], c: float = 1.10) -> list[float]:
    """Reference-code class weights ``w_k = 1 / ln(c + p_k)``, ``p_k`` the frequencies normalised to sum 1.

    ``c > 1`` keeps every weight finite and positive; rare classes get at most ``1 / ln(c)`` (10.5 for 1.10),
    a class filling everything ``1 / ln(c + 1)``.

    Args:
        frequencies: class frequencies or voxel counts (normalised here).
        c: the reference's ``normVal``.
    """
    p = np.asarray(frequencies, dtype=np.float64)
    if p.ndim != 1 or p.size == 0 or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"frequencies must be non-negative and not all zero, got {list(p)}")
    if c <= 1.0:
        raise ValueError(f"c must be > 1 (ln(c + p) must stay positive), got {c}")
    p = p / p.sum()
    return [float(1.0 / math.log(c + pk)) for pk in p]


def class_weights_from_labels(
    labels: Sequence[str | Path | Mapping],
    convention: str | None,
    num_classes: int = 4,
    c: float = 1.10,
    max_cases: int | None = None,
    label_key: str = "label",
) -> list[float]:
    """Class weights ``1 / ln(c + p_k)`` from the class frequencies of training label files.

    Each label NIfTI is read with nibabel, validated against its convention (an unknown value raises
    :class:`brats_pipeline.transforms.labels.LabelConventionError` naming the file) and its voxels counted per contiguous
    class (0 background, 1 NCR/NET, 2 ED, 3 ET). The counts are summed over all cases, so large volumes weigh
    more, as in the reference. Unlike the reference (``np.histogram(label, 4)``, whose bins follow each
    volume's own value range), every voxel is counted in its exact class.

    Args:
        labels: label file paths, or datalist entries (mappings with ``label_key``).
        convention: label convention of the files (``brats2018``, ``brats2023``, ``msd``); ``None`` takes
            each entry's ``"label_convention"`` (datalist entries carry one).
        num_classes: must equal the convention's class count (4); a guard against a mismatched config.
        c: the reference's ``normVal`` (1.10).
        max_cases: count only the first ``max_cases`` labels (``None``: all).
        label_key: key of the label path in datalist entries.

    Returns:
        ``num_classes`` weights, background first.
    """
    items = list(labels)[:max_cases] if max_cases is not None else list(labels)
    if not items:
        raise ValueError("class_weights_from_labels needs at least one label file")
    counts = np.zeros(num_classes, dtype=np.float64)
    for item in items:
        entry_convention = None
        if isinstance(item, Mapping):
            if label_key not in item:
                raise ValueError(f"datalist entry {item.get('case_id', item)!r} has no {label_key!r}")
            entry_convention = item.get("label_convention")
            path = str(item[label_key])
        else:
            path = str(item)
        name = convention if convention is not None else entry_convention
        if name is None:
            raise ValueError(f"no label convention given for {path}")
        conv = get_convention(name)
        if len(conv.values) != num_classes:
            raise ValueError(f"convention {conv.name!r} has {len(conv.values)} classes, not {num_classes=}")
        values, value_counts = np.unique(np.asarray(nib.load(path).dataobj), return_counts=True)
        check_label_values(values, conv, source=path)
        for value, count in zip(values.tolist(), value_counts.tolist(), strict=True):
            counts[conv.values.index(int(value))] += count
    return class_weights_from_frequencies(counts, c=c)
