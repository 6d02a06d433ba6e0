"""Validation metrics of both bundles: BraTS-style Dice per nested region as MONAI Ignite metric handlers.

The engines' ``postprocessing`` turns ``pred`` and ``label`` into binary ``(3, H, W, D)`` region masks in the
channel order TC, WT, ET and splits them with ``SplitDimd`` into ``pred_tc``/``label_tc`` etc.
:func:`region_dice_metrics` builds the metric handlers over those keys. Dice uses MONAI's ``DiceMetric`` with
``ignore_empty=False``: a case whose region is empty in both prediction and reference scores 1, the BraTS rule
(MONAI's default, ``ignore_empty=True``, gives NaN there and drops the case from the mean).

:func:`report_metrics` prints an evaluator's metrics as a small table at the end of a config-driven run
(``configs/quickstart.json`` after its held-out evaluation).
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import DiceMetric

__all__ = ["REGION_POSTFIXES", "dice_metric_handler", "region_dice_metrics", "report_metrics"]

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
