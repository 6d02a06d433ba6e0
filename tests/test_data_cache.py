"""The persistent data cache of both bundles: same items as without it, invalidated by changed files or transforms,
written atomically, bad entries recomputed; and the shipped train.json uses it by default."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from brats_pipeline.data.cache import PersistentCaseDataset, cache_size, case_dataset
from brats_pipeline.data.datalist import find_cases

BUNDLES = ("segresnet_vae", "espnet3d")


def items(dataset, seed: int = 0) -> list[dict]:
    """Every item of ``dataset`` with the random transforms seeded the same way."""
    transform = getattr(dataset, "transform", None)
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=seed)
    return [dataset[i] for i in range(len(dataset))]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_shipped_training_reads_the_same_items_with_and_without_the_cache(
    bundle, tiny_workflow, synthetic_dataset, tmp_path
):
    """``train.json``'s default persistent cache: entries appear under ``cache_dir``, and the training and validation
    items (random crop and augmentation included, same seed) equal the uncached pipeline's, for segresnet_vae
    (whole field of view restored after the cached brain box) and espnet3d (brain box). ``cache_rate`` is the shipped
    0 (no in-memory cache, which would replace the persistent one)."""
    cached = tiny_workflow(bundle, bundle_root=str(tmp_path / "a"), cache_rate=0.0)
    plain = tiny_workflow(bundle, bundle_root=str(tmp_path / "b"), cache_rate=0.0, persistent_cache=False)
    assert cached.parser.get_parsed_content("persistent_cache") is True
    for part in ("train", "validate"):
        ds_cached = cached.parser.get_parsed_content(f"{part}#dataset")
        ds_plain = plain.parser.get_parsed_content(f"{part}#dataset")
        assert isinstance(ds_cached.data, PersistentCaseDataset) and not isinstance(
            ds_plain.data, PersistentCaseDataset
        )
        for first_read in (True, False):  # the epoch that fills the cache and one that reads it
            for a, b in zip(items(ds_cached), items(ds_plain), strict=True):
                assert a["image"].shape == b["image"].shape, (part, first_read)
                assert torch.equal(a["image"].as_tensor(), b["image"].as_tensor()), (part, first_read)
                assert torch.equal(a["label"].as_tensor(), b["label"].as_tensor()), (part, first_read)
                assert np.allclose(a["image"].affine, b["image"].affine)
    entries, size = cache_size(tmp_path / "a" / "cache")
    assert entries == 4 and size > 0  # one entry per case, shared by training and validation
    full = 4 * np.prod(nib_shape(synthetic_dataset)) * 4
    for f in (tmp_path / "a" / "cache").glob("*.pt"):
        entry = torch.load(f, weights_only=False)
        assert entry["label"].dtype == torch.uint8  # stored compact
        assert entry["image"].numel() * 4 < full  # cropped to the brain box
        stored = entry["image"].numel() * 4 + entry["label"].numel()
        assert f.stat().st_size < stored + 200_000  # the box's own bytes, not the whole volume's storage behind it


def nib_shape(dataset: Path) -> tuple[int, ...]:
    import nibabel as nib

    case = find_cases(dataset)[0]
    return nib.load(case["image"][0]).shape


def _head():
    from monai.transforms import CropForegroundd, EnsureChannelFirstd, LoadImaged

    return [
        LoadImaged(["image", "label"], image_only=True),
        EnsureChannelFirstd(["image", "label"]),
        CropForegroundd(["image", "label"], source_key="image"),
    ]


def test_entries_are_invalidated_by_changed_files_and_transforms(synthetic_dataset, tmp_path):
    data = [c for c in find_cases(synthetic_dataset) if "label" in c][:2]
    ds = PersistentCaseDataset(data, _head(), tmp_path / "cache")
    ds[0]
    assert cache_size(tmp_path / "cache")[0] == 1
    PersistentCaseDataset(data, _head(), tmp_path / "cache")[0]  # same files and transforms: a hit
    assert cache_size(tmp_path / "cache")[0] == 1

    changed = _head()
    changed[2].cropper.margin = 2  # another crop margin: another entry
    PersistentCaseDataset(data, changed, tmp_path / "cache")[0]
    assert cache_size(tmp_path / "cache")[0] == 2

    copy = tmp_path / "copy"
    copy.mkdir()
    label = Path(data[0]["label"])
    (copy / label.name).write_bytes(label.read_bytes())
    entry = {**data[0], "label": str(copy / label.name)}
    PersistentCaseDataset([entry], _head(), tmp_path / "cache")[0]
    assert cache_size(tmp_path / "cache")[0] == 3
    os.utime(copy / label.name, ns=(1, 1))  # the same path, rewritten: another entry
    PersistentCaseDataset([entry], _head(), tmp_path / "cache")[0]
    assert cache_size(tmp_path / "cache")[0] == 4


def test_truncated_entry_is_recomputed_and_writes_leave_no_temp_files(synthetic_dataset, tmp_path, caplog):
    data = [c for c in find_cases(synthetic_dataset) if "label" in c][:1]
    ds = PersistentCaseDataset(data, _head(), tmp_path / "cache")
    good = ds[0]
    (entry,) = (tmp_path / "cache").glob("*.pt")
    entry.write_bytes(entry.read_bytes()[:100])  # what a kill in the middle of a non-atomic write leaves
    again = PersistentCaseDataset(data, _head(), tmp_path / "cache")[0]
    assert torch.equal(again["image"].as_tensor(), good["image"].as_tensor())
    assert "unreadable" in caplog.text
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [entry.name]  # rewritten, no leftovers
    torch.load(entry, weights_only=False)


def test_case_dataset_choices(synthetic_dataset, tmp_path):
    data = [c for c in find_cases(synthetic_dataset) if "label" in c][:1]
    from monai.data import CacheDataset

    assert isinstance(case_dataset(data, _head(), [], cache_rate=1.0), CacheDataset)
    assert isinstance(case_dataset(data, _head(), [], cache_dir=tmp_path).data, PersistentCaseDataset)
    assert case_dataset(data, _head(), [], persistent_cache=False).data == data
    with pytest.raises(ValueError, match="cache_dir"):
        case_dataset(data, _head(), [])


def test_entries_hold_the_brain_box_only(tmp_path):
    """A crop is a view of the whole volume; the entry must not carry the whole volume's storage."""
    import nibabel as nib

    volume = np.zeros((48, 48, 48), np.float32)
    volume[10:18, 12:20, 14:22] = 1.0 + np.random.default_rng(0).random((8, 8, 8), dtype=np.float32)
    paths = []
    for name in ("a.nii.gz", "b.nii.gz"):
        nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / name)
        paths.append(str(tmp_path / name))
    from monai.transforms import CropForegroundd, EnsureChannelFirstd, LoadImaged

    head = [LoadImaged("image", image_only=True), EnsureChannelFirstd("image"), CropForegroundd("image", "image")]
    item = PersistentCaseDataset([{"image": paths}], head, tmp_path / "cache")[0]
    assert tuple(item["image"].shape) == (2, 8, 8, 8)
    (entry,) = (tmp_path / "cache").glob("*.pt")
    assert entry.stat().st_size < 2 * 8**3 * 4 + 100_000  # 4 KB of voxels, not 2 x 48^3 x 4 = 884 KB
