"""Small pieces the bundle configs call that MONAI's bundle runner does not provide.

``bundle_root`` itself is computed in the configs without our code (our code may not be importable yet: in a
downloaded bundle it lives in ``<bundle_root>/scripts``): the expression asks the ``ConfigWorkflow`` that is
evaluating it for its ``config_root_path`` (the folder of the first ``--config_file``) and takes the folder above
``configs/``. That covers ``python -m monai.bundle run``, ``torchrun``, ``monai.bundle.load`` and
``ConfigWorkflow`` from Python; ``--bundle_root DIR`` still overrides it, and a bare ``ConfigParser`` gets ``"."``.
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
