"""NaN/Inf loss guard on a tiny MONAI trainer fed from NIfTI files, and the label-file check before training."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.handlers import StatsHandler
from monai.losses import DiceLoss
from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged
from monai.utils import set_determinism

from brats_pipeline.training.checkpointing import AtomicCheckpointSaver
from brats_pipeline.training.guards import (
    NonFiniteLossError,
    NonFiniteLossGuard,
    batch_case_names,
    check_label_files,
    label_values,
)
from brats_pipeline.transforms.labels import LabelConventionError


def write_nifti(path: Path, arr: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    return str(path)


def make_cases(folder: Path, n: int = 4, bad_case: int | None = None, bad_value: float = np.nan) -> list[dict]:
    """``n`` cases of one 8^3 image + a uint8 label; ``bad_case``'s image holds one ``bad_value`` voxel."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        img = rng.random((8, 8, 8), dtype=np.float32)
        if i == bad_case:
            img[3, 3, 3] = bad_value
        lab = (rng.random((8, 8, 8)) > 0.5).astype(np.uint8)
        items.append(
            {
                "image": write_nifti(folder / f"case_{i:03d}_t1.nii.gz", img),
                "label": write_nifti(folder / f"case_{i:03d}_seg.nii.gz", lab),
            }
        )
    return items


def make_trainer(
    items: list[dict], ckpt_dir: Path, guard: bool = True, max_epochs: int = 2, loss=None, check_grads: bool = True
) -> tuple:
    set_determinism(seed=0)
    tf = Compose(
        [
            LoadImaged(["image", "label"], image_only=True),
            EnsureChannelFirstd(["image", "label"]),
            EnsureTyped(["image", "label"], dtype=torch.float32),
        ]
    )
    net = torch.nn.Conv3d(1, 1, 3, padding=1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=DataLoader(Dataset(items, tf), batch_size=2, shuffle=False),
        network=net,
        optimizer=opt,
        loss_function=DiceLoss(sigmoid=True) if loss is None else loss,
        decollate=False,
    )
    handlers = [
        AtomicCheckpointSaver(
            save_dir=str(ckpt_dir),
            save_dict={"model": net, "optimizer": opt, "trainer": trainer},
            file_prefix="last",
            save_interval=1,
            n_saved=1,
        ),
        StatsHandler(tag_name="train_loss", output_transform=lambda out: out["loss"].item()),
    ]
    if guard:
        handlers.insert(0, NonFiniteLossGuard(check_grads=check_grads))
    for h in handlers:
        h.attach(trainer)
    return trainer, net


@pytest.mark.parametrize(
    "bad_value, loss, expected",
    [
        (np.nan, None, "non-finite training loss nan"),  # NaN voxel -> NaN Dice loss, caught before backward()
        (np.inf, torch.nn.MSELoss(), "non-finite training loss inf"),
        # Inf voxel -> sigmoid saturates, the Dice loss is finite but the gradients are NaN: caught before step()
        (np.inf, None, "non-finite gradients of weight (loss 0."),
    ],
)
def test_guard_stops_before_the_optimizer_step(tmp_path, bad_value, loss, expected):
    items = make_cases(tmp_path, bad_case=2, bad_value=bad_value)
    # epoch 1 trains clean cases only; from epoch 2 on, case_002 (with case_003) is the first batch (iteration 3)
    trainer, net = make_trainer([items[0], items[1], items[0], items[1]], tmp_path / "ckpt", loss=loss)
    dataset = trainer.data_loader.dataset

    def poison_from_epoch_2(engine):
        if engine.state.epoch == 2:
            dataset.data = [items[2], items[3], items[0], items[1]]

    trainer.add_event_handler(Events.EPOCH_STARTED, poison_from_epoch_2)
    weights: dict = {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: weights.update(net.state_dict()))

    with pytest.raises(NonFiniteLossError) as info:
        trainer.run()  # StatsHandler's EXCEPTION_RAISED logs and re-raises: the run fails
    msg = str(info.value)
    assert "epoch 2, iteration 3 (1/2 of the epoch)" in msg
    assert "cases in the batch: " in msg and "case_002_t1.nii.gz" in msg and "case_003_t1.nii.gz" in msg
    assert expected in msg
    # the weights are the last good ones: no backward/step happened on the bad batch
    for k, v in net.state_dict().items():
        assert torch.isfinite(v).all() and torch.equal(v, weights[k]), k
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last_checkpoint_epoch=1.pt"]
    ckpt = torch.load(tmp_path / "ckpt" / "last_checkpoint_epoch=1.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_without_guard_nan_reaches_the_weights(tmp_path):
    """Control: what the guard prevents."""
    items = make_cases(tmp_path, bad_case=0)
    trainer, net = make_trainer(items, tmp_path / "ckpt", guard=False, max_epochs=1)
    trainer.run()
    assert not torch.isfinite(net.weight).all()
    ckpt = torch.load(tmp_path / "ckpt" / "last_checkpoint_epoch=1.pt", weights_only=True)
    assert not torch.isfinite(ckpt["model"]["weight"]).all()


def test_loss_only_guard_lets_nan_gradients_through(tmp_path):
    """Control for check_grads: a finite Dice loss on an Inf voxel corrupts the weights; the NaN loss comes later."""
    items = make_cases(tmp_path, bad_case=0, bad_value=np.inf)
    trainer, net = make_trainer(items, tmp_path / "ckpt", max_epochs=1, check_grads=False)
    with pytest.raises(NonFiniteLossError, match="iteration 2 "):
        trainer.run()
    assert not torch.isfinite(net.weight).all()


def test_guard_needs_a_monai_trainer():
    with pytest.raises(ValueError, match="LOSS_COMPLETED"):
        NonFiniteLossGuard().attach(Engine(lambda e, b: None))


def test_batch_case_names(tmp_path):
    items = make_cases(tmp_path, n=2)
    loader = DataLoader(Dataset(items, LoadImaged(["image", "label"], image_only=True)), batch_size=2)
    batch = next(iter(loader))
    assert batch_case_names(batch) == [items[0]["image"], items[1]["image"]]
    assert batch_case_names(batch, ("label",)) == [items[0]["label"], items[1]["label"]]
    # the datalist's case ids (kept as a list of strings by collation) come first
    ids = {**batch, "case_id": ["BraTS-1", "BraTS-2"]}
    assert batch_case_names(ids) == ["BraTS-1", "BraTS-2"]
    assert batch_case_names({"image_meta_dict": {"filename_or_obj": ["a.nii"]}}) == ["a.nii"]
    assert batch_case_names({"image": torch.zeros(1)}) == [] and batch_case_names(None) == []


@pytest.fixture
def label_files(tmp_path) -> dict[str, str]:
    shape = (16, 16, 16)
    files = {}
    good = np.zeros(shape, np.uint8)
    good[2:6, 2:6, 2:6], good[6:8, 2:6, 2:6], good[8:10, 2:6, 2:6] = 2, 1, 4
    files["good_2018"] = write_nifti(tmp_path / "good_2018.nii.gz", good)
    files["good_2023"] = write_nifti(tmp_path / "good_2023.nii.gz", np.where(good == 4, 3, good).astype(np.uint8))
    bad = good.copy()
    bad[12, 12, 12] = 3
    files["has_3"] = write_nifti(tmp_path / "has_3.nii.gz", bad)
    files["int16_2018"] = write_nifti(tmp_path / "int16_2018.nii.gz", good.astype(np.int16))
    half = good.astype(np.float32)
    half[0, 0, 0] = 0.5
    files["float_half"] = write_nifti(tmp_path / "float_half.nii.gz", half)
    return files


def test_label_values(label_files, tmp_path):
    assert label_values(label_files["good_2018"]).tolist() == [0, 1, 2, 4]
    full = write_nifti(tmp_path / "no_background.nii.gz", np.full((4, 4, 4), 2, np.uint8))
    assert label_values(full).tolist() == [2]
    empty = write_nifti(tmp_path / "empty.nii.gz", np.zeros((4, 4, 4), np.uint8))
    assert label_values(empty).tolist() == [0]
    assert label_values(label_files["has_3"]).dtype == np.uint8
    assert label_values(label_files["int16_2018"]).tolist() == [0, 1, 2, 4]
    assert label_values(label_files["float_half"]).tolist() == [0.0, 0.5, 1.0, 2.0, 4.0]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_check_label_files(label_files, num_workers, capsys):
    entries = [
        {"image": ["x.nii.gz"], "label": label_files["good_2018"]},
        {"image": ["y.nii.gz"]},  # test-set case without a label: skipped
        {"image": ["z.nii.gz"], "label": label_files["int16_2018"]},
    ]
    check_label_files(entries, "brats2018", num_workers=num_workers)
    assert "checking label files" not in capsys.readouterr().err  # progress bars only on a terminal
    with pytest.raises(LabelConventionError, match=r"has_3\.nii\.gz.*\{3\}.*'brats2018'"):
        check_label_files(entries + [{"label": label_files["has_3"]}], "brats2018", num_workers=num_workers)
    check_label_files([label_files["good_2023"]], "brats2023", progress=False)
    with pytest.raises(LabelConventionError, match=r"float_half\.nii\.gz.*0\.5"):
        check_label_files([label_files["float_half"]], "brats2018", progress=False)
    with pytest.raises(LabelConventionError, match="good_2018"):  # 4 is not ET in the 2023 convention
        check_label_files([label_files["good_2018"]], "brats2023", progress=False)


def test_check_label_files_relative_and_missing(label_files, tmp_path):
    check_label_files([{"label": "good_2018.nii.gz"}], "brats2018", base_dir=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="missing_seg"):
        check_label_files([{"label": str(tmp_path / "missing_seg.nii.gz")}], "brats2018", progress=False)
