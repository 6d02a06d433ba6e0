"""No stale results: a second ``inference.json`` run into the same folder keeps existing label maps without
recomputing them and says so, names the kept maps another model wrote, and ``--overwrite True`` replaces them; the
end-of-run summary states what was written and in which label convention."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from brats_pipeline.bundle.workflows import bundle_workflow
from brats_pipeline.inference.runs import RECORD_NAME


def inference(bundle: str, root: Path, cases: Path, **override):
    wf = bundle_workflow(
        bundle,
        "inference.json",
        bundle_root=str(root),
        dataset_dir=str(cases),
        network_width=8,
        num_workers=0,
        **override,
    )
    forwards = []
    wf.parser.get_parsed_content("network").register_forward_hook(lambda *a: forwards.append(1))
    wf.run()
    wf.finalize()
    return wf, len(forwards)


def save_weights(bundle: str, root: Path, seed: int) -> None:
    torch.manual_seed(seed)
    wf = bundle_workflow(bundle, "inference.json", bundle_root=str(root), network_width=8, initialize=False)
    (root / "models").mkdir(parents=True, exist_ok=True)
    torch.save(wf.parser.get_parsed_content("network_def").state_dict(), root / "models" / "model.pt")


@pytest.mark.parametrize("bundle", ["segresnet_vae", "espnet3d"])
def test_existing_predictions_are_kept_and_named(bundle, synthetic_dataset, tmp_path, capsys):
    cases = tmp_path / "cases"
    for name in ("BraTS-GLI-00005-000", "BraTS-GLI-00006-000"):
        shutil.copytree(synthetic_dataset / name, cases / name)
    root = tmp_path / "bundle"
    save_weights(bundle, root, seed=0)
    _, forwards = inference(bundle, root, cases)
    out = capsys.readouterr().out
    assert forwards == 2
    assert f"inference: wrote 2 label map(s) to {root / 'eval' / 'predictions'}" in out
    assert "label convention brats2023: enhancing tumor = 3" in out
    record = json.loads((root / "eval" / "predictions" / RECORD_NAME).read_text())
    assert set(record["cases"]) == {"BraTS-GLI-00005-000", "BraTS-GLI-00006-000"}

    _, forwards = inference(bundle, root, cases)  # same model, same folder: nothing recomputed
    out = capsys.readouterr().out
    assert forwards == 0
    assert "wrote 0 label map(s)" in out and "kept 2 existing prediction(s)" in out and "--overwrite True" in out
    assert "another model" not in out

    save_weights(bundle, root, seed=1)  # retrained: the kept maps are the old model's, and the run says so
    _, forwards = inference(bundle, root, cases)
    out = capsys.readouterr().out
    assert forwards == 0 and "WARNING: 2 kept prediction(s) were written by another model" in out

    before = (root / "eval" / "predictions" / "BraTS-GLI-00005-000.nii.gz").stat().st_mtime_ns
    _, forwards = inference(bundle, root, cases, overwrite=True)
    out = capsys.readouterr().out
    assert forwards == 2 and "wrote 2 label map(s)" in out and "kept" not in out
    assert (root / "eval" / "predictions" / "BraTS-GLI-00005-000.nii.gz").stat().st_mtime_ns > before


def test_evaluate_and_inference_write_to_different_folders():
    for bundle in ("segresnet_vae", "espnet3d"):
        evaluate = bundle_workflow(bundle, "train.json", "evaluate.json", bundle_root="/b", initialize=False)
        infer = bundle_workflow(bundle, "inference.json", bundle_root="/b", initialize=False)
        assert evaluate.parser.get_parsed_content("prediction_dir") != infer.parser.get_parsed_content("prediction_dir")
