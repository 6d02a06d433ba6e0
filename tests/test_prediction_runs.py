"""No stale results: a second ``inference.json`` run into the same folder keeps existing label maps without
recomputing them and says so, names the kept maps another model wrote, and ``--overwrite True`` replaces them; the
end-of-run summary states what was written and in which label convention."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
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


@pytest.mark.parametrize("bundle", ["segresnet_vae", "espnet3d"])
def test_interrupted_run_records_what_it_wrote(bundle, tiny_workflow, synthetic_dataset, tmp_path, capsys):
    """Ctrl-C after the first of two cases: that case's label map is in predictions.json already (recorded as it was
    written), the interrupt is no failed case, the rerun does the rest, and a later run with another model names
    both kept maps as another model's."""
    cases = tmp_path / "cases"
    for name in ("BraTS-GLI-00005-000", "BraTS-GLI-00006-000"):
        shutil.copytree(synthetic_dataset / name, cases / name)
    root, out_dir = tmp_path / "bundle", tmp_path / "bundle" / "eval" / "predictions"
    save_weights(tiny_workflow, bundle, root, seed=0)
    wf = tiny_workflow(bundle, "inference.json", bundle_root=str(root), dataset_dir=str(cases))
    forwards = []

    def ctrl_c_on_the_second_case(*_):
        forwards.append(1)
        if len(forwards) == 2:
            raise KeyboardInterrupt

    wf.parser.get_parsed_content("network").register_forward_hook(ctrl_c_on_the_second_case)
    with pytest.raises(KeyboardInterrupt):
        wf.run()
    run = wf.parser.get_parsed_content("prediction_run")
    assert run.report.failures == []  # an interrupt is not a bad case
    assert sorted(p.name for p in out_dir.iterdir()) == ["BraTS-GLI-00005-000.nii.gz", RECORD_NAME]
    record = json.loads((out_dir / RECORD_NAME).read_text())
    assert set(record["cases"]) == {"BraTS-GLI-00005-000"}
    assert run.interrupt_message() == (
        f"interrupted: 1 of 2 cases written to {out_dir}; rerun the same command to finish the rest"
    )
    capsys.readouterr()

    def inference() -> str:
        run_counting_forwards(tiny_workflow(bundle, "inference.json", bundle_root=str(root), dataset_dir=str(cases)))
        return capsys.readouterr().out

    out = inference()
    assert "wrote 1 label map(s)" in out and "kept 1 existing prediction(s)" in out and "WARNING" not in out
    save_weights(tiny_workflow, bundle, root, seed=1)  # another model
    assert "WARNING: 2 kept prediction(s) were written by another model" in inference()


def test_kept_maps_without_a_record_are_named(tmp_path, capsys):
    """A label map with no entry in predictions.json (written before the record existed, or by a writer that does not
    record) is of an unknown model: said, not silently kept."""
    from brats_pipeline.inference.runs import ExistingPredictions

    (tmp_path / "models").mkdir()
    torch.save({"w": torch.zeros(1)}, tmp_path / "models" / "model.pt")
    (tmp_path / "out").mkdir()
    for case in ("a", "b"):
        (tmp_path / "out" / f"{case}.nii.gz").write_bytes(b"x")
    existing = ExistingPredictions(tmp_path / "out", model_files=[tmp_path / "models" / "model.pt"])
    existing.record_written("a")
    assert existing.pending([{"case_id": "a", "image": []}, {"case_id": "b", "image": []}]) == []
    assert existing.kept == ["a", "b"] and existing.kept_unrecorded == ["b"] and existing.kept_from_other_model == []


@pytest.mark.parametrize("bundle", ["segresnet_vae", "espnet3d"])
def test_labels_are_ignored_at_inference(bundle, tiny_workflow, synthetic_dataset, tmp_path, capsys):
    """As the model cards say, inference ignores labels: a case whose label holds a corrupt value and one whose
    label file is not even a NIfTI file are both segmented (both were once rejected as bad cases)."""
    cases = tmp_path / "cases"
    for name in ("BraTS-GLI-00001-000", "BraTS-GLI-00002-000"):
        shutil.copytree(synthetic_dataset / name, cases / name)
    seg = cases / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-seg.nii.gz"
    label = nib.load(seg)
    data = np.asanyarray(label.dataobj).astype(np.uint8)
    data[0, 0, 0] = 5
    nib.save(nib.Nifti1Image(data, label.affine), seg)
    (cases / "BraTS-GLI-00002-000" / "BraTS-GLI-00002-000-seg.nii.gz").write_bytes(b"not a NIfTI file")
    root = tmp_path / "bundle"
    save_weights(tiny_workflow, bundle, root, seed=0)
    wf = tiny_workflow(bundle, "inference.json", bundle_root=str(root), dataset_dir=str(cases))
    assert run_counting_forwards(wf) == 2
    assert f"inference: wrote 2 label map(s) to {root / 'eval' / 'predictions'}" in capsys.readouterr().out
    assert len(list((root / "eval" / "predictions").glob("BraTS-GLI-*.nii.gz"))) == 2
