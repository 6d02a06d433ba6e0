"""Shared fixtures: a tiny synthetic BraTS 2023 dataset, the real case (skipped when absent), and the shipped bundle
configs built as workflows at tiny size (:data:`TINY_OVERRIDES`, :func:`tiny_workflow`)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from monai.bundle import ConfigWorkflow

from brats_pipeline.bundle.workflows import bundle_workflow
from brats_pipeline.tools.synthetic import generate_dataset

REAL_CASE = Path(__file__).resolve().parents[1].parent / "shared/data/BraTS-GLI-00001-000"
TINY_SHAPE = (32, 32, 32)

#: per bundle: the config keys (``train.json``'s, as ``--key value`` overrides) that make a shipped config tiny on
#: :func:`synthetic_dataset`: 2 folds (2 training, 2 validation cases), one epoch validated, width 8 (SegResNet's
#: GroupNorm needs a multiple of 8), 32^3 crops (3D-ESPNet's PSP pooling needs at least 24^3), no worker processes,
#: the in-memory cache instead of the persistent one, no progress bars. Both bundles take the same values today (the
#: shipped batch sizes, 1 and 4, give the same batches of 2 training cases); an entry per bundle keeps room for sizes
#: that must differ. Subprocess tests turn an entry into an overlay file or ``--key value`` flags; keys that
#: ``inference.json`` lacks are harmless in-process but refused on the command line.
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    bundle: {
        "num_folds": 2,
        "epochs": 1,
        "val_interval": 1,
        "network_width": 8,
        "roi_size": [32, 32, 32],
        "num_workers": 0,
        "cache_rate": 1.0,
        "progress": False,
    }
    for bundle in ("segresnet_vae", "espnet3d")
}


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """``torch.testing.assert_close`` with both tolerances relative to ``expected``'s scale (its largest magnitude).

    For network outputs computed along two paths (a loaded or exported copy, TorchScript, another memory format):
    oneDNN picks other kernels on CPUs with and without AVX-512, and their float32 sums round differently by a
    fraction of the tensor's scale, not of each element (a random 3D-ESPNet's outputs reach ~1e7, where an element
    near zero can differ by ~10). Bit equality belongs only to one path on one CPU, or to integer label maps.
    """
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BraTS 2023 layout, 32^3: four labelled cases (indices 1-4) and two unlabelled ones (5-6). Treat as read-only."""
    root = tmp_path_factory.mktemp("synthetic_brats2023")
    generate_dataset(root, 4, "brats2023", TINY_SHAPE, seed=0)
    generate_dataset(root, 2, "brats2023", TINY_SHAPE, seed=0, with_labels=False, start_index=5)
    return root


@pytest.fixture
def real_case() -> Path:
    """The real BraTS 2023 case folder (4 modalities, no label)."""
    if not REAL_CASE.is_dir():
        pytest.skip(f"real BraTS case not available at {REAL_CASE}")
    return REAL_CASE


@pytest.fixture
def tiny_workflow(tmp_path: Path, synthetic_dataset: Path) -> Callable[..., ConfigWorkflow]:
    """A factory ``make(bundle, config="train.json", *extra_configs, **overrides)``: the shipped config (merged with
    ``extra_configs``) as an initialised ``ConfigWorkflow`` through
    :func:`~brats_pipeline.bundle.workflows.bundle_workflow`, with ``bundle_root`` the test's ``tmp_path``,
    ``dataset_dir`` :func:`synthetic_dataset`, ``TINY_OVERRIDES[bundle]``, then ``overrides`` (the caller's win; they
    may also be ``bundle_workflow``'s ``workflow_type`` and ``initialize``)."""

    def make(bundle: str, config: str = "train.json", *extra_configs: str, **overrides: Any) -> ConfigWorkflow:
        settings = {"bundle_root": str(tmp_path), "dataset_dir": str(synthetic_dataset)}
        settings.update(copy.deepcopy(TINY_OVERRIDES[bundle]), **overrides)
        return bundle_workflow(bundle, config, *extra_configs, **settings)

    return make
