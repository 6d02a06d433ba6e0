"""BraTS 2024 post-treatment glioma labels (4 = resection cavity) through both bundles' shipped configs with
``configs/brats2024_labels.json``: training learns RC as a fourth region (segresnet_vae) or fifth class (espnet3d),
validation reports its Dice, and inference writes label maps whose values are those of the convention."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES

from brats_pipeline.data.datalist import find_cases
from brats_pipeline.tools.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[1]


def flags(overrides: dict) -> list[str]:
    """``--key value`` for each override, as python-fire reads them back (``False``, ``[32, 32, 32]``)."""
    return [arg for key, value in overrides.items() for arg in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def post_treatment_dataset(tmp_path_factory) -> Path:
    """BraTS 2023-layout synthetic cases with a resection cavity (label 4) carved next to the tumor."""
    root = tmp_path_factory.mktemp("brats2024")
    generate_dataset(root, num_cases=4, layout="brats2023", shape=(32, 32, 32), seed=3)
    for case in find_cases(root):
        img = nib.load(case["label"])
        label = np.asarray(img.dataobj).astype(np.uint8)
        brain = np.asarray(nib.load(case["image"][0]).dataobj) > 0
        cavity = np.zeros_like(brain)
        cavity[8:13, 8:13, 8:13] = True
        label[cavity & brain & (label == 0)] = 4
        assert (label == 4).sum() > 20
        nib.save(nib.Nifti1Image(label, img.affine, img.header), case["label"])
    return root


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ["segresnet_vae", "espnet3d"])
def test_train_and_infer_with_resection_cavity(bundle, post_treatment_dataset, tmp_path):
    configs = str(
        [str(REPO / "bundles" / bundle / "configs" / "train.json"), str(REPO / "configs" / "brats2024_labels.json")]
    )
    tiny = TINY_OVERRIDES[bundle]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", configs, *flags(tiny)]
    cmd += ["--bundle_root", str(tmp_path), "--dataset_dir", str(post_treatment_dataset)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "checked 4 label files against the brats2024 convention" in log
    assert "val_rc_dice" in log  # RC scored as its own region in validation
    weights = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    out_weights = [v for k, v in weights.items() if v.ndim == 5][-1]
    assert out_weights.shape[0] == {"segresnet_vae": 4, "espnet3d": 5}[bundle]

    source = sorted(p for p in post_treatment_dataset.iterdir() if p.is_dir())[0]
    case = tmp_path / "new_case" / source.name  # an unlabelled case to segment
    case.mkdir(parents=True)
    for f in source.iterdir():
        if not f.name.endswith("-seg.nii.gz"):
            (case / f.name).write_bytes(f.read_bytes())
    configs = str(
        [str(REPO / "bundles" / bundle / "configs" / "inference.json"), str(REPO / "configs" / "brats2024_labels.json")]
    )
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", str(tmp_path)]
    cmd += [*flags({k: tiny[k] for k in ("network_width", "num_workers")}), "--dataset_dir", str(case)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    pred = nib.load(tmp_path / "eval" / "predictions" / f"{case.name}.nii.gz")
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1, 2, 3, 4}
    assert pred.shape == nib.load(source / f"{case.name}-seg.nii.gz").shape
