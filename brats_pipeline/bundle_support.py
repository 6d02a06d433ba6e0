"""Printing an evaluator's metrics as a small table at the end of a config-driven run.

``configs/quickstart.json`` calls :func:`report_metrics` after its held-out evaluation. (``bundle_root`` and putting a
packaged bundle's ``scripts/`` on ``sys.path`` are config keys of the bundles, not code here: see
``docs/deployment.md``.)
"""

from __future__ import annotations


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
