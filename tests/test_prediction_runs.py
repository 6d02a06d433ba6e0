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


def run_counting_forwards(wf) -> int:
    """Run and finalise ``wf``; the number of forward passes of its network."""
    forwards = []
    wf.parser.get_parsed_content("network").register_forward_hook(lambda *a: forwards.append(1))
    wf.run()
    wf.finalize()
    return len(forwards)


def save_weights(make, bundle: str, root: Path, seed: int) -> None:
    """Untrained weights of the tiny inference network (``make``: the ``tiny_workflow`` factory) as ``model.pt``."""
    torch.manual_seed(seed)
    wf = make(bundle, "inference.json", bundle_root=str(root), initialize=False)
    (root / "models").mkdir(parents=True, exist_ok=True)
    torch.save(wf.parser.get_parsed_content("network_def").state_dict(), root / "models" / "model.pt")


@pytest.mark.parametrize("bundle", ["segresnet_vae", "espnet3d"])
def test_existing_predictions_are_kept_and_named(bundle, tiny_workflow, synthetic_dataset, tmp_path, capsys):
    cases = tmp_path / "cases"
    for name in ("BraTS-GLI-00005-000", "BraTS-GLI-00006-000"):
        shutil.copytree(synthetic_dataset / name, cases / name)
    root = tmp_path / "bundle"

    def inference(**override) -> int:
        return run_counting_forwards(
            tiny_workflow(bundle, "inference.json", bundle_root=str(root), dataset_dir=str(cases), **override)
        )

    save_weights(tiny_workflow, bundle, root, seed=0)
    forwards = inference()
    out = capsys.readouterr().out
    assert forwards == 2
    assert f"inference: wrote 2 label map(s) to {root / 'eval' / 'predictions'}" in out
    assert "label convention brats2023: enhancing tumor = 3" in out
    record = json.loads((root / "eval" / "predictions" / RECORD_NAME).read_text())
    assert set(record["cases"]) == {"BraTS-GLI-00005-000", "BraTS-GLI-00006-000"}

    forwards = inference()  # same model, same folder: nothing recomputed
    out = capsys.readouterr().out
    assert forwards == 0
    assert "wrote 0 label map(s)" in out and "kept 2 existing prediction(s)" in out and "--overwrite True" in out
    assert "another model" not in out

    # retrained: the kept maps are the old model's, and the run says so
    save_weights(tiny_workflow, bundle, root, seed=1)
    forwards = inference()
    out = capsys.readouterr().out
    assert forwards == 0 and "WARNING: 2 kept prediction(s) were written by another model" in out

    before = (root / "eval" / "predictions" / "BraTS-GLI-00005-000.nii.gz").stat().st_mtime_ns
    forwards = inference(overwrite=True)
    out = capsys.readouterr().out
    assert forwards == 2 and "wrote 2 label map(s)" in out and "kept" not in out
    assert (root / "eval" / "predictions" / "BraTS-GLI-00005-000.nii.gz").stat().st_mtime_ns > before


def test_evaluate_and_inference_write_to_different_folders():
    for bundle in ("segresnet_vae", "espnet3d"):
        evaluate = bundle_workflow(bundle, "train.json", "evaluate.json", bundle_root="/b", initialize=False)
        infer = bundle_workflow(bundle, "inference.json", bundle_root="/b", initialize=False)
        assert evaluate.parser.get_parsed_content("prediction_dir") != infer.parser.get_parsed_content("prediction_dir")
