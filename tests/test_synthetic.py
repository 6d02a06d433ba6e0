"""The synthetic case generator: geometry, label conventions, contrasts, files, determinism and speed."""

from __future__ import annotations

import json
import time

import fire
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from brats_pipeline.data.layouts import CHANNELS, LAYOUTS, MSD_CHANNELS
from brats_pipeline.tools import synthetic
from brats_pipeline.tools.synthetic import brats_affine, ensure_dataset, generate_case, generate_dataset, write_case
from brats_pipeline.transforms.labels import CONVENTIONS, label_to_regions

SHAPE = (48, 44, 40)


@pytest.fixture(scope="module")
def cases() -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Six cases in the brats2023 convention (1 necrosis, 2 edema, 3 enhancing)."""
    return [generate_case(SHAPE, seed=s, convention="brats2023") for s in range(6)]


def test_shapes_dtypes_background(cases):
    for images, label in cases:
        assert list(images) == list(CHANNELS)
        assert label.shape == SHAPE and label.dtype == np.uint8
        brain = images["t1"] > 0
        assert 0.1 < brain.mean() < 0.4
        for m, img in images.items():
            assert img.shape == SHAPE and img.dtype == np.int16, m
            np.testing.assert_array_equal(img > 0, brain, err_msg=f"{m}: brain mask differs between modalities")
            assert img.min() == 0
        # skull-stripped: zero background, the border planes are empty, the tumor lies inside the brain
        assert not brain[[0, -1]].any() and not brain[:, [0, -1]].any() and not brain[:, :, [0, -1]].any()
        assert not (label[~brain]).any()


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_label_values_follow_convention(convention):
    conv = CONVENTIONS[convention]
    seen = set()
    for seed in range(4):
        _, label = generate_case(SHAPE, seed=seed, convention=convention)
        values = set(np.unique(label).tolist())
        assert values <= set(conv.values), values
        assert {0, conv.edema, conv.enhancing} <= values
        seen |= values
    assert seen == set(conv.values)  # some case has necrosis


def test_same_case_in_every_convention():
    ref_images, ref = generate_case(SHAPE, seed=3, convention="brats2023")
    for name in CONVENTIONS:
        images, label = generate_case(SHAPE, seed=3, convention=name)
        for m in CHANNELS:
            np.testing.assert_array_equal(images[m], ref_images[m])
        np.testing.assert_array_equal(label_to_regions(label, name), label_to_regions(ref, "brats2023"))


def test_nested_subregions(cases):
    necrotic = 0
    for _, label in cases:
        tc, wt, et = (r.numpy().astype(bool) for r in label_to_regions(label, "brats2023"))
        ncr = label == 1
        assert et.any() and tc.any() and wt.any() and (wt & ~tc).any(), "every case has ET, TC, WT and edema"
        assert not (et & ~tc).any() and not (tc & ~wt).any() and not (ncr & ~tc).any()
        if ncr.any():
            necrotic += 1
            # the necrotic core is wrapped in enhancing rim: its outer shell lies (almost) entirely in TC
            shell = ndimage.binary_dilation(ncr) & ~ncr
            assert (shell & ~tc).mean() / shell.mean() < 0.1
    assert necrotic >= 2


def _ellipsoid_dice(mask: np.ndarray) -> float:
    """Dice between ``mask`` and the solid ellipsoid with the same centre and second moments."""
    points = np.argwhere(mask).astype(np.float64)
    mean, inv = points.mean(0), np.linalg.inv(np.cov(points.T))
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in mask.shape], indexing="ij"), -1).reshape(-1, 3) - mean
    ellipsoid = (np.einsum("ij,jk,ik->i", grid, inv, grid) <= 5.0).reshape(mask.shape)  # var = r^2 / 5
    return 2 * (ellipsoid & mask).sum() / (ellipsoid.sum() + mask.sum())


def test_tumor_shape_size_and_position_vary(cases):
    centers = np.array([np.argwhere(label > 0).mean(0) for _, label in cases])
    volumes = np.array([(label > 0).sum() for _, label in cases])
    assert centers.std(0).max() > 1.5
    assert volumes.max() > 1.5 * volumes.min()
    grid = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    assert (
        _ellipsoid_dice(((grid[0] - 20) / 6) ** 2 + ((grid[1] - 20) / 5) ** 2 + ((grid[2] - 18) / 4) ** 2 <= 1) > 0.97
    )
    # lumpy blobs: whole tumors are clearly not ellipsoids
    dices = [_ellipsoid_dice(label > 0) for _, label in cases]
    assert max(dices) < 0.96 and np.mean(dices) < 0.93, dices


def test_contrasts(cases):
    for images, label in cases:
        brain = images["t1"] > 0
        normal = brain & (label == 0)
        et, edema, ncr = label == 3, label == 2, label == 1

        def mean(m, mask, images=images):
            return images[m][mask].astype(np.float64).mean()

        assert mean("t1c", et) > 1.5 * mean("t1c", normal)
        assert mean("flair", edema) > 1.3 * mean("flair", normal)
        assert mean("t2", edema) > 1.3 * mean("t2", normal)
        if ncr.any():
            assert mean("t1c", ncr) < 0.5 * mean("t1c", et)
            assert mean("t2", ncr) > mean("t2", normal)
        # noisy: voxels of one tissue are not constant
        assert images["t1c"][et].std() > 0.02 * mean("t1c", et)


def test_separable_by_a_voxel_classifier(cases):
    """A Gaussian classifier on z-scored intensities, fitted on four cases, segments two others well:
    a small network can learn the task."""

    def features(images):
        brain = images["t1"] > 0
        x = np.stack([images[m][brain].astype(np.float64) for m in CHANNELS], 1)
        return brain, (x - x.mean(0)) / x.std(0)

    xs, ys = zip(*[(features(im)[1], lab[features(im)[0]]) for im, lab in cases[:4]], strict=True)
    x, y = np.concatenate(xs), np.concatenate(ys)
    stats = [(x[y == c].mean(0), np.cov(x[y == c].T)) for c in range(4)]

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    for images, label in cases[4:]:
        brain, x = features(images)
        truth = label[brain]
        loglik = [
            -0.5 * np.einsum("ij,jk,ik->i", x - mu, np.linalg.inv(cov), x - mu) - 0.5 * np.linalg.slogdet(cov)[1]
            for mu, cov in stats
        ]
        pred = np.argmax(loglik, axis=0)
        assert dice(pred > 0, truth > 0) > 0.5
        assert dice(np.isin(pred, (1, 3)), np.isin(truth, (1, 3))) > 0.8
        assert dice(pred == 3, truth == 3) > 0.8


def test_deterministic_by_seed():
    a_img, a_lab = generate_case((32, 32, 32), seed=7)
    b_img, b_lab = generate_case((32, 32, 32), seed=7)
    c_img, c_lab = generate_case((32, 32, 32), seed=8)
    np.testing.assert_array_equal(a_lab, b_lab)
    for m in CHANNELS:
        np.testing.assert_array_equal(a_img[m], b_img[m])
    assert not np.array_equal(a_img["t1"], c_img["t1"]) and not np.array_equal(a_lab, c_lab)


def test_brats_affine_matches_real_case(real_case):
    real = nib.load(next(real_case.glob("*-t1c.nii.gz")))
    np.testing.assert_allclose(brats_affine(real.shape), real.affine)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_written_files(tmp_path, layout):
    case_dir = write_case(tmp_path, 2, layout, (32, 30, 28), seed=5)
    images, label = generate_case((32, 30, 28), seed=(5, 2), convention=LAYOUTS[layout].label_convention)
    spec = LAYOUTS[layout]
    expected = np.diag([-1.0, -1.0, 1.0, 1.0])
    expected[1, 3] = 29.0
    for m in (*CHANNELS, "seg"):
        img = nib.load(case_dir / spec.filename(case_dir.name, m))
        np.testing.assert_array_equal(img.affine, expected)
        assert img.header.get_zooms() == (1.0, 1.0, 1.0)
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
        data = np.asanyarray(img.dataobj)
        if m == "seg":
            assert data.dtype == np.uint8
            np.testing.assert_array_equal(data, label)
            assert set(np.unique(data)) <= set(CONVENTIONS[spec.label_convention].values)
        else:
            assert data.dtype == np.int16
            np.testing.assert_array_equal(data, images[m])
    assert [p.name for p in tmp_path.rglob(".tmp*")] == []


def test_layout_names(tmp_path):
    assert synthetic.case_path(tmp_path, "brats2018", 3).relative_to(tmp_path).as_posix() == "HGG/Brats18_CBICA_3_1"
    assert synthetic.case_path(tmp_path, "brats2018", 4).relative_to(tmp_path).parts[0] == "LGG"
    assert synthetic.case_name("brats2020", 7) == "BraTS20_Training_007"
    assert synthetic.case_name("brats2020", 7, with_labels=False) == "BraTS20_Validation_007"
    assert synthetic.case_name("brats2021", 12) == "BraTS2021_00012"
    assert synthetic.case_name("brats2023", 1) == "BraTS-GLI-00001-000"
    assert synthetic.case_name("msd", 1) == "BRATS_001"
    for layout in LAYOUTS:
        assert LAYOUTS[layout].matches(synthetic.case_name(layout, 9))


def test_msd_layout(tmp_path):
    paths = generate_dataset(tmp_path, 2, "msd", (32, 32, 32), seed=1)
    generate_dataset(tmp_path, 1, "msd", (32, 32, 32), seed=1, with_labels=False, start_index=3)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "imagesTr/BRATS_001.nii.gz",
        "imagesTr/BRATS_002.nii.gz",
    ]
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert meta["labels"] == {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
    assert meta["numTraining"] == 2 and meta["numTest"] == 1
    assert meta["training"][1] == {"image": "./imagesTr/BRATS_002.nii.gz", "label": "./labelsTr/BRATS_002.nii.gz"}
    assert meta["test"] == ["./imagesTs/BRATS_003.nii.gz"]
    img = nib.load(tmp_path / "imagesTr/BRATS_002.nii.gz")
    assert img.shape == (32, 32, 32, 4) and img.get_data_dtype() == np.int16
    images, label = generate_case((32, 32, 32), seed=(1, 2), convention="msd")
    data = np.asanyarray(img.dataobj)
    for c, m in enumerate(MSD_CHANNELS):
        np.testing.assert_array_equal(data[..., c], images[m])
    np.testing.assert_array_equal(np.asanyarray(nib.load(tmp_path / "labelsTr/BRATS_002.nii.gz").dataobj), label)
    assert not (tmp_path / "labelsTr/BRATS_003.nii.gz").exists()


def test_interrupted_write_leaves_no_case(tmp_path, monkeypatch):
    calls = []
    real_save = nib.save

    def failing_save(img, path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated interruption")
        real_save(img, path)

    monkeypatch.setattr(synthetic.nib, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        write_case(tmp_path, 1, "brats2021", (32, 32, 32))
    assert list(tmp_path.iterdir()) == []  # neither the case folder nor its temporary folder


def test_ensure_dataset_generates_once(tmp_path, monkeypatch):
    root = tmp_path / "data"
    assert ensure_dataset(root, 3, "brats2023", "32,32,32", seed=2) == str(root)
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == [
        f"BraTS-GLI-0000{i}-000" for i in (1, 2, 3)
    ]

    calls = []
    real_generate = synthetic.generate_dataset
    monkeypatch.setattr(synthetic, "generate_dataset", lambda *a, **k: calls.append((a, k)) or real_generate(*a, **k))
    start = time.perf_counter()
    ensure_dataset(root, 3, "brats2023", (32, 32, 32), seed=2)
    assert calls == [] and time.perf_counter() - start < 0.5

    # a missing case is regenerated, and only that one
    case = root / "BraTS-GLI-00002-000"
    before = nib.load(case / "BraTS-GLI-00002-000-t1c.nii.gz").get_fdata()
    for f in case.iterdir():
        f.unlink()
    case.rmdir()
    ensure_dataset(root, 3, "brats2023", (32, 32, 32), seed=2)
    assert len(calls) == 1 and calls[0][1]["start_index"] == 2 and calls[0][0][1] == 1
    np.testing.assert_array_equal(nib.load(case / "BraTS-GLI-00002-000-t1c.nii.gz").get_fdata(), before)

    # other parameters: regenerated in place
    ensure_dataset(root, 3, "brats2023", (32, 32, 32), seed=3)
    assert len(calls) == 2 and nib.load(case / "BraTS-GLI-00002-000-t1c.nii.gz").shape == (32, 32, 32)


def test_ensure_dataset_msd_and_foreign_data(tmp_path):
    root = tmp_path / "msd"
    ensure_dataset(root, 2, "msd", (32, 32, 32), seed=0)
    assert json.loads((root / "dataset.json").read_text())["numTraining"] == 2
    (root / "labelsTr/BRATS_002.nii.gz").unlink()
    ensure_dataset(root, 2, "msd", (32, 32, 32), seed=0)
    assert (root / "labelsTr/BRATS_002.nii.gz").exists()

    foreign = tmp_path / "foreign" / "BraTS-GLI-00001-000"
    foreign.mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not generated"):
        ensure_dataset(foreign.parent, 1, "brats2023", (32, 32, 32))


def test_cli(tmp_path, capsys):
    """The fire command line (in-process: the datalist tests run a CLI in a subprocess)."""
    out = tmp_path / "cli"
    fire.Fire(
        synthetic.main, [str(out), "--num_cases", "2", "--layout", "brats2020", "--shape", "32,32,24", "--seed", "4"]
    )
    assert "wrote 2 synthetic brats2020 cases of shape (32, 32, 24)" in capsys.readouterr().out
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz"))
    assert len(files) == 10 and files[0] == "BraTS20_Training_001/BraTS20_Training_001_flair.nii.gz"
    assert nib.load(out / files[0]).shape == (32, 32, 24)
    np.testing.assert_array_equal(
        np.asanyarray(nib.load(out / files[0]).dataobj), generate_case((32, 32, 24), seed=(4, 1))[0]["flair"]
    )


def test_full_size_speed(tmp_path):
    """A 240x240x155 case is generated and written in a few seconds (target < 3 s on an idle 2-core machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    case_dir = write_case(tmp_path, 1, "brats2023", (240, 240, 155), seed=0)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"\nfull-size case generated + written: {wall:.2f} s wall, {cpu:.2f} s CPU")
    assert nib.load(next(case_dir.glob("*-seg.nii.gz"))).shape == (240, 240, 155)
    assert cpu < 10.0
