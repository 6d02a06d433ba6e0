"""Validation metrics of both bundles: BraTS-style Dice per nested region as MONAI Ignite metric handlers.

The engines' ``postprocessing`` turns ``pred`` and ``label`` into binary ``(3, H, W, D)`` region masks in the
channel order TC, WT, ET and splits them with ``SplitDimd`` into ``pred_tc``/``label_tc`` etc.
:func:`region_dice_metrics` builds the metric handlers over those keys. Dice uses MONAI's ``DiceMetric`` with
``ignore_empty=False``: a case whose region is empty in both prediction and reference scores 1, the BraTS rule
(MONAI's default, ``ignore_empty=True``, gives NaN there and drops the case from the mean).

:func:`class_iou_metrics` is the 3D-ESPNet code's model-selection metric, the mean IoU over the four classes.

:func:`report_metrics` prints an evaluator's metrics as a small table at the end of a config-driven run
(``configs/quickstart.json`` after its held-out evaluation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import CumulativeIterationMetric, DiceMetric
from monai.metrics.utils import do_metric_reduction

from brats_pipeline.transforms.labels import label_to_classes, regions_to_label

__all__ = [
    "REGION_POSTFIXES",
    "ClassIoUMetric",
    "class_iou_metrics",
    "dice_metric_handler",
    "region_dice_metrics",
    "report_metrics",
]

#: ``SplitDimd`` postfixes of the region channels, in channel order.
REGION_POSTFIXES: tuple[str, ...] = ("tc", "wt", "et")


def dice_metric_handler(pred_key: str = "pred", label_key: str = "label") -> IgniteMetricHandler:
    """Mean Dice over the batch and channels of ``engine.state.output[pred_key]`` vs ``[label_key]`` (BraTS empty rule)."""
    return IgniteMetricHandler(
        metric_fn=DiceMetric(include_background=True, reduction="mean", ignore_empty=False),
        output_transform=from_engine([pred_key, label_key]),
    )


def region_dice_metrics(
    prefix: str = "val", regions: Sequence[str] = REGION_POSTFIXES, mean: bool = True, per_region: bool = True
) -> dict[str, IgniteMetricHandler]:
    """``{f"{prefix}_mean_dice": ..., f"{prefix}_{region}_dice": ...}`` metric handlers, mean first.

    Args:
        prefix: metric name prefix (``val``, ``holdout``).
        regions: region names as they appear in the metric names; their lower-case forms are the ``SplitDimd``
            postfixes of the output keys (``pred_tc``, ...).
        mean: include the mean over all regions (the key metric of both bundles).
        per_region: include one metric per region.
    """
    metrics: dict[str, IgniteMetricHandler] = {}
    if mean:
        metrics[f"{prefix}_mean_dice"] = dice_metric_handler()
    if per_region:
        for region in regions:
            metrics[f"{prefix}_{region}_dice"] = dice_metric_handler(
                f"pred_{region.lower()}", f"label_{region.lower()}"
            )
    return metrics


class ClassIoUMetric(CumulativeIterationMetric):
    """Mean IoU over the classes (background included) of each case, averaged over the cases: the 3D-ESPNet code's
    validation ``mIOU`` (``IOUEval.py``), by which ``main.py`` keeps ``best_model.pth``.

    Per case and class ``c``: ``IoU_c = |P_c & G_c| / (|P_c | G_c| + 1e-8)``, so a class absent from both the
    prediction and the reference scores 0 (the reference's epsilon), and the case's value is the mean over the
    ``num_classes`` classes. The reference divides the sum over cases by their number plus one (its batch counter
    starts at 1): a constant factor that does not change which epoch is best, left out here.

    Inputs: class index maps ``(B, 1, *spatial)`` (``y_pred`` and ``y``), values ``0..num_classes-1``.
    """

    def __init__(self, num_classes: int = 4, reduction: str = "mean") -> None:
        super().__init__()
        self.num_classes = num_classes
        self.reduction = reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n = self.num_classes
        values = []
        for pred, ref in zip(y_pred.long(), y.long(), strict=True):
            hist = torch.bincount(n * ref.flatten() + pred.flatten(), minlength=n * n).reshape(n, n).double()
            inter = hist.diag()
            values.append((inter / (hist.sum(0) + hist.sum(1) - inter + 1e-8)).mean())
        return torch.stack(values)[:, None]

    def aggregate(self, reduction: str | None = None) -> torch.Tensor:
        f, _ = do_metric_reduction(self.get_buffer(), reduction or self.reduction)
        return f


def _regions_to_classes(regions: torch.Tensor) -> torch.Tensor:
    """Binary nested regions ``(3|4, *spatial)`` -> class indices ``(1, *spatial)`` (0 background, 1 NCR/NET, 2 ED,
    3 ET, 4 RC), nested as the written label maps are (:func:`~brats_pipeline.transforms.labels.regions_to_label`)."""
    convention = "brats2024" if regions.shape[0] == 4 else "brats2018"
    return label_to_classes(regions_to_label(regions, convention), convention)


def class_iou_metrics(prefix: str = "val", num_classes: int = 4) -> dict[str, IgniteMetricHandler]:
    """``{f"{prefix}_mean_iou": ...}``: :class:`ClassIoUMetric` on the engines' region outputs (``pred``/``label``
    after ``postprocessing``), their classes recovered from the nested regions. A key metric for the 3D-ESPNet
    protocol overlays, in place of ``val_mean_dice``::

        "validate#key_metric": {"_target_": "brats_pipeline.training.validation.class_iou_metrics", "prefix": "val"}
    """

    def classes(output):
        preds, labels = from_engine(["pred", "label"])(output)
        return [_regions_to_classes(p) for p in preds], [_regions_to_classes(r) for r in labels]

    return {f"{prefix}_mean_iou": IgniteMetricHandler(metric_fn=ClassIoUMetric(num_classes), output_transform=classes)}


def report_metrics(engine, title: str = "Dice per region", prefix: str = "") -> dict[str, float]:
    """Print the metrics an Ignite engine computed (``engine.state.metrics``) as a small table and return them.

    Args:
        engine: an evaluator after ``run()``.
        title: heading of the table.
        prefix: only metrics whose name starts with it are shown (all when empty).
    """
    metrics = {k: float(v) for k, v in engine.state.metrics.items() if k.startswith(prefix) and _is_number(v)}
    width = max((len(k) for k in metrics), default=10)
    lines = [title, "-" * (width + 10)] + [f"{k:<{width}}  {v:.4f}" for k, v in sorted(metrics.items())]
    print("\n".join(lines), flush=True)
    return metrics


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
