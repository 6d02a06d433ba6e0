"""End-to-end tests of the espnet3d bundle (``bundles/espnet3d``): training, evaluation, inference and export.

Everything runs on the shared synthetic BraTS 2023 dataset (32^3, 4 labelled + 2 unlabelled cases) with a tiny
overlay (``conftest.TINY_OVERRIDES``: 2 folds, 2 training and 2 validation cases, width 8, 32^3 crops; batch 2, one
iteration per epoch). Only the training run goes through ``python -m monai.bundle run`` in a subprocess (the command
line, its overrides and the ``training`` run id); the other workflows run in-process through
:class:`monai.bundle.ConfigWorkflow`, the class that command uses (conftest's ``tiny_workflow``), to save the ~15 s of
imports per process.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, assert_close_to_scale
from monai.bundle import ckpt_export, verify_net_in_out

from brats_pipeline.data.datalist import find_cases
from brats_pipeline.transforms.labels import get_convention
from custom_networks.espnet3d import ESPNet3D

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "espnet3d" / "configs"
TRAIN, INFERENCE, META = (str(CONFIGS / f) for f in ("train.json", "inference.json", "metadata.json"))
BRATS2023_VALUES = set(get_convention("brats2023").values)
#: widths given on the command line, replacing network_width's (4, 8, 32, 64); every later workflow must match them
CHANNELS = [4, 8, 16, 32]
#: the overlay of every run: the tiny sizes, with 2 epochs for the command line's ``--epochs 1`` to replace
OVERLAY = {**TINY_OVERRIDES["espnet3d"], "epochs": 2, "batch_size": 2}


def assert_label_maps_match_inputs(pred_dir: Path, cases: list[dict]) -> None:
    """One uint8 label map per case, with the case's shape and affine and only brats2023 label values."""
    written = sorted(p.name for p in pred_dir.glob("*.nii.gz"))
    assert written == sorted(f"{c['case_id']}.nii.gz" for c in cases)
    for case in cases:
        ref = nib.load(case["image"][0])
        out = nib.load(pred_dir / f"{case['case_id']}.nii.gz")
        assert out.shape == ref.shape
        np.testing.assert_allclose(out.affine, ref.affine, atol=1e-5)
        assert out.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(out.dataobj)).tolist()) <= BRATS2023_VALUES


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_dataset) -> dict:
    """One training run through the command line, with ``--epochs 1`` and ``--network_def#channels`` overrides."""
    tmp = tmp_path_factory.mktemp("espnet3d_bundle")
    overlay = tmp / "tiny.json"
    overlay.write_text(json.dumps({**OVERLAY, "dataset_dir": str(synthetic_dataset)}))
    root = tmp / "bundle"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", str([TRAIN, str(overlay)]),
        "--bundle_root", str(root),
        "--epochs", "1",
        "--network_def#channels", str(CHANNELS),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    return {"root": root, "overlay": str(overlay), "log": log, "dataset": synthetic_dataset}


def test_training_command_line(trained):
    models = sorted(p.name for p in (trained["root"] / "models").iterdir())
    assert models == [
        "cases.json",
        "last_checkpoint_epoch=1.pt",
        "model.pt",
        "model_settings.json",
    ]  # --epochs 1 replaced the overlay's 2
    for metric in ("val_mean_dice", "val_tc_dice", "val_wt_dice", "val_et_dice"):
        assert metric in trained["log"]
    state = torch.load(trained["root"] / "models" / "model.pt", weights_only=True)
    # the command-line widths, not network_width 8's (4, 8, 32, 64)
    assert state["stem.conv.weight"].shape == (CHANNELS[0], 4, 7, 7, 7)
    assert state["down3.bn.weight"].shape == (CHANNELS[3],)
    assert state["head_out.1.weight"].shape == (4, 4, 1, 1, 1)
    assert list((trained["root"] / "eval" / "logs").glob("events.out.tfevents.*"))


def test_train_workflow_properties_and_run_id(trained, tiny_workflow, tmp_path):
    wf = tiny_workflow("espnet3d", "train.json", trained["overlay"], workflow_type="train", epochs=1)
    assert not wf.check_properties()
    assert wf.parser.get_parsed_content("network_def#channels") == [4, 8, 32, 64]  # channels follow network_width
    weights = wf.parser.get_parsed_content("loss_class_weights")
    assert len(weights) == 4 and weights[0] == min(weights)  # background is the most frequent class
    wf.run()  # the Model Zoo's run id "run"
    wf.finalize()
    assert (tmp_path / "models" / "model.pt").is_file()
    assert wf.parser.get_parsed_content("train#trainer").state.epoch == 1


def test_cross_entropy_by_config(trained, tiny_workflow):
    wf = tiny_workflow(
        "espnet3d", "train.json", trained["overlay"], loss_name="cross_entropy", class_weights=[1.0, 2.0, 3.0, 4.0]
    )
    loss = wf.parser.get_parsed_content("loss")
    assert type(loss).__name__ == "WeightedCrossEntropyLoss"
    assert loss.weight.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_evaluate_writes_predictions_and_brats_metrics(trained, tiny_workflow):
    root = trained["root"]
    overrides = {"bundle_root": str(root), "network_def#channels": CHANNELS}
    wf = tiny_workflow("espnet3d", "train.json", "evaluate.json", trained["overlay"], **overrides)
    wf.run()
    wf.finalize()
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    val_files = wf.parser.get_parsed_content("val_files")
    assert len(val_files) == 2
    eval_dir = Path(wf.parser.get_parsed_content("eval_dir"))  # eval/<dataset>-fold0, the scores in brats2023/
    assert_label_maps_match_inputs(eval_dir / "predictions", val_files)
    scores = ("brats2023/metrics_per_case.csv", "brats2023/metrics_summary.csv")
    for name in ("metrics.csv", "val_mean_dice_raw.csv", *scores):
        assert (eval_dir / name).is_file(), name
    # the label maps written in the input geometry score what the evaluator measured on the brain-cropped volumes
    with open(eval_dir / "brats2023" / "metrics_per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["case_id"] for r in rows} == {c["case_id"] for c in val_files}
    for region in ("TC", "WT", "ET"):
        scored = np.mean([float(r["dice"]) for r in rows if r["region"] == region])
        assert scored == pytest.approx(evaluator.state.metrics[f"val_{region.lower()}_dice"], abs=1e-4)


def test_inference_on_folder_with_tta_and_ensemble(trained, tiny_workflow, tmp_path):
    root = trained["root"]
    folder = tmp_path / "cases"  # one labelled and one unlabelled case: 2 x 8 flips x 2 ensemble members
    for case in ("BraTS-GLI-00004-000", "BraTS-GLI-00005-000"):
        shutil.copytree(trained["dataset"] / case, folder / case)
    wf = tiny_workflow(
        "espnet3d",
        "inference.json",
        bundle_root=str(root),
        dataset_dir=str(folder),
        prediction_dir=str(tmp_path / "pred"),
        tta=True,
        ensemble_checkpoints=[str(root / "models" / "last_checkpoint_epoch=1.pt")],
        **{"network_def#channels": CHANNELS},
    )
    assert not wf.check_properties()
    wf.run()
    wf.finalize()  # raises if a case failed
    cases = find_cases(folder)
    assert [c["case_id"] for c in cases if "label" in c] == ["BraTS-GLI-00004-000"]
    assert_label_maps_match_inputs(tmp_path / "pred", cases)


def test_inference_on_real_case(real_case, tiny_workflow, tmp_path):
    torch.manual_seed(0)
    (tmp_path / "models").mkdir()
    torch.save(ESPNet3D(channels=(4, 8, 32, 64)).state_dict(), tmp_path / "models" / "model.pt")  # untrained
    wf = tiny_workflow("espnet3d", "inference.json", dataset_dir=str(real_case))
    wf.run()
    wf.finalize()
    cases = find_cases(real_case)
    assert_label_maps_match_inputs(tmp_path / "eval" / "predictions", cases)
    assert nib.load(tmp_path / "eval" / "predictions" / "BraTS-GLI-00001-000.nii.gz").shape == (240, 240, 155)


def test_verify_net_in_out_and_torchscript_export(tmp_path):
    # "*" spatial sizes in metadata.json: 13^3 is not a multiple of the network stride 8
    verify_net_in_out(
        net_id="network_def", meta_file=META, config_file=INFERENCE, device="cpu", any=13, network_width=8
    )
    torch.manual_seed(0)
    net = ESPNet3D(channels=(4, 8, 32, 64)).eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    ts_file = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts_file),
        ckpt_file=str(tmp_path / "model.pt"),
        meta_file=META,
        config_file=INFERENCE,
        network_width=8,
    )
    scripted = torch.jit.load(str(ts_file))
    x = torch.rand(1, 4, 20, 24, 12)
    with torch.no_grad():
        assert_close_to_scale(scripted(x), net(x))
