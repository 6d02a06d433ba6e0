"""Whole-volume inference with 8-flip TTA on the real BraTS 2023 case, through the bundle's inference.json.

Random weights (no trained model can ship): the test checks geometry, label values and the overlay figure,
not the segmentation quality.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.networks.nets import SegResNet

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "segresnet_vae"


@pytest.mark.slow
def test_tta_inference_on_real_case_writes_label_map_and_overlay(real_case: Path, tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    torch.manual_seed(0)
    net = SegResNet(
        spatial_dims=3, in_channels=4, out_channels=3, init_filters=8, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1)
    )
    torch.save(net.state_dict(), tmp_path / "models" / "model.pt")

    workflow = ConfigWorkflow(
        config_file=str(BUNDLE / "configs" / "inference.json"),
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="inference",
        bundle_root=str(tmp_path),
        dataset_dir=str(real_case.parent),
        num_workers=0,
        tta=True,
        save_overlays=True,
        **{"network_def#init_filters": 8},
    )
    workflow.initialize()
    assert workflow.inferer.tta and len(workflow.inferer.flip_sets) == 8
    workflow.run()
    workflow.finalize()

    case_id = real_case.name
    src = nib.load(str(real_case / f"{case_id}-t1c.nii.gz"))
    out = nib.load(str(tmp_path / "eval" / "predictions" / f"{case_id}.nii.gz"))
    assert out.shape == src.shape == (240, 240, 155)
    np.testing.assert_allclose(out.affine, src.affine)
    assert out.get_data_dtype() == np.uint8
    values = set(np.unique(np.asarray(out.dataobj)).tolist())
    assert values <= {0, 1, 2, 3}, values
    # nothing predicted outside the brain's bounding box (grown to a multiple of 8): the crop was pasted back
    brain = np.asarray(src.dataobj) != 0
    pred = np.asarray(out.dataobj) > 0
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        inside = np.flatnonzero(brain.any(axis=others))
        predicted = np.flatnonzero(pred.any(axis=others))
        assert predicted.min() >= inside.min() - 8 and predicted.max() <= inside.max() + 8

    png = tmp_path / "eval" / "overlays" / f"{case_id}_overlay.png"
    picture = matplotlib.image.imread(str(png))
    assert picture.ndim == 3 and picture.shape[0] > 200 and picture.shape[1] > 600
