"""Shared fixtures: a tiny synthetic BraTS 2023 dataset and the real case (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from brats_pipeline.tools.synthetic import generate_dataset

REAL_CASE = Path(__file__).resolve().parents[1].parent / "shared/data/BraTS-GLI-00001-000"
TINY_SHAPE = (32, 32, 32)


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
