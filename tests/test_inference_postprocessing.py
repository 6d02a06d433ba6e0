"""Both bundles' ``inference.json`` discretise before pasting the prediction back into the input grid (1 label
channel instead of 3-4 probability channels through ``Invertd``): the label maps must equal those of the
probability path (``save_probabilities``, which inverts the probabilities first), voxel for voxel; and the
threaded NIfTI reader loads exactly what MONAI's sequential reader loads."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import LoadImaged

from brats_pipeline.transforms.preprocessing import ThreadedNibabelReader


def predicted(wf, root: Path, case: Path) -> np.ndarray:
    """Run and finalise ``wf``; the label map it wrote for ``case`` under ``root``."""
    wf.run()
    wf.finalize()
    return np.asarray(nib.load(root / "eval" / "predictions" / f"{case.name}.nii.gz").dataobj)


@pytest.mark.parametrize("bundle", ["segresnet_vae", "espnet3d"])
def test_label_maps_equal_with_and_without_probabilities(bundle, tiny_workflow, synthetic_dataset, tmp_path):
    case = synthetic_dataset / "BraTS-GLI-00005-000"
    torch.manual_seed(0)
    probe = tiny_workflow(bundle, "inference.json")
    weights = probe.parser.get_parsed_content("network_def").state_dict()
    for name in ("a", "b"):
        (tmp_path / name / "models").mkdir(parents=True)
        torch.save(weights, tmp_path / name / "models" / "model.pt")
    a, b = tmp_path / "a", tmp_path / "b"
    settings = {"dataset_dir": str(case), "bf16_autocast": False}
    direct = predicted(tiny_workflow(bundle, "inference.json", bundle_root=str(a), **settings), a, case)
    via_probabilities = predicted(
        tiny_workflow(bundle, "inference.json", bundle_root=str(b), save_probabilities=True, **settings), b, case
    )
    assert (tmp_path / "b" / "eval" / "predictions" / f"{case.name}_prob.nii.gz").is_file()
    assert direct.shape == nib.load(case / f"{case.name}-t1c.nii.gz").shape
    assert np.array_equal(direct, via_probabilities)
    assert len(np.unique(direct)) > 1  # random weights still predict something somewhere


def test_threaded_reader_loads_what_monai_loads(synthetic_dataset):
    case = synthetic_dataset / "BraTS-GLI-00001-000"
    files = [str(case / f"{case.name}-{m}.nii.gz") for m in ("t1c", "t1n", "t2w", "t2f")]
    plain = LoadImaged("image", image_only=True)({"image": files})["image"]
    threaded = LoadImaged("image", image_only=True, reader=ThreadedNibabelReader())({"image": files})["image"]
    assert torch.equal(plain.as_tensor(), threaded.as_tensor())
    assert np.array_equal(plain.affine, threaded.affine) and plain.meta.keys() == threaded.meta.keys()
    for key in ("original_channel_dim", "filename_or_obj", "spatial_shape", "original_affine"):
        assert np.array_equal(np.asarray(plain.meta[key]), np.asarray(threaded.meta[key])), key


def test_threaded_reader_converts_int16_files_as_loadimaged_does(synthetic_dataset, tmp_path):
    """BraTS files are int16: the reader's threads return C-ordered float32 arrays equal to LoadImaged's conversion,
    and ``dtype=None`` keeps the stored type."""
    case = synthetic_dataset / "BraTS-GLI-00001-000"
    files = []
    for m in ("t1c", "t1n", "t2w", "t2f"):
        img = nib.load(case / f"{case.name}-{m}.nii.gz")
        data = np.round(np.asanyarray(img.dataobj) * 100).astype(np.int16)
        out = nib.Nifti1Image(data, img.affine)
        out.set_data_dtype(np.int16)
        files.append(str(tmp_path / f"{m}.nii.gz"))
        nib.save(out, files[-1])
    plain = LoadImaged("image", image_only=True)({"image": files})["image"]
    threaded = LoadImaged("image", image_only=True, reader=ThreadedNibabelReader())({"image": files})["image"]
    assert threaded.dtype == torch.float32 and torch.equal(plain.as_tensor(), threaded.as_tensor())
    stored = ThreadedNibabelReader(dtype=None)
    arrays, _ = stored.get_data(stored.read(files))
    assert arrays.dtype == np.int16 and np.array_equal(arrays.astype(np.float32), plain.numpy())


def test_threaded_reader_names_the_file_whose_affine_differs(synthetic_dataset, tmp_path):
    case = synthetic_dataset / "BraTS-GLI-00001-000"
    files = [str(case / f"{case.name}-{m}.nii.gz") for m in ("t1c", "t1n", "t2w")]
    img = nib.load(case / f"{case.name}-t2f.nii.gz")
    shifted = img.affine.copy()
    shifted[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), shifted), tmp_path / "t2f.nii.gz")
    with pytest.raises(RuntimeError, match="t2f.nii.gz: its affine differs"):
        LoadImaged("image", image_only=True, reader=ThreadedNibabelReader())(
            {"image": [*files, str(tmp_path / "t2f.nii.gz")]}
        )
