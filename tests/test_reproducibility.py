"""A fixed seed on CPU gives identical losses and weights (set_determinism + monai.data.DataLoader, as the bundles)."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.losses import DiceLoss
from monai.transforms import Compose, RandFlipd, RandScaleIntensityd, RandSpatialCropd
from monai.utils import set_determinism


def make_data() -> list[dict]:
    g = torch.Generator().manual_seed(7)
    return [
        {
            "image": torch.rand(4, 16, 16, 16, generator=g),
            "label": (torch.rand(3, 16, 16, 16, generator=g) > 0.6).float(),
        }
        for _ in range(6)
    ]


def train(seed: int | None, num_workers: int = 0, loader_cls=DataLoader, epochs: int = 2) -> tuple[list[float], dict]:
    """Seed like the bundles' ``initialize``, build a tiny trainer with random augmentation and dropout, train."""
    set_determinism(seed=seed)
    transform = Compose(
        [
            RandSpatialCropd(["image", "label"], roi_size=(12, 12, 12), random_size=False),
            RandScaleIntensityd("image", factors=0.1, prob=1.0),
            RandFlipd(["image", "label"], prob=0.5, spatial_axis=0),
            RandFlipd(["image", "label"], prob=0.5, spatial_axis=2),
        ]
    )
    loader = loader_cls(Dataset(make_data(), transform), batch_size=2, shuffle=True, num_workers=num_workers)
    net = torch.nn.Sequential(torch.nn.Conv3d(4, 4, 3, padding=1), torch.nn.Dropout3d(0.2), torch.nn.Conv3d(4, 3, 1))
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=loader,
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-2),
        loss_function=DiceLoss(sigmoid=True),
        decollate=False,
    )
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    trainer.run()
    return losses, {k: v.clone() for k, v in net.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("num_workers", [0, 2])
def test_same_seed_same_run(num_workers):
    losses_a, weights_a = train(seed=0, num_workers=num_workers)
    losses_b, weights_b = train(seed=0, num_workers=num_workers)
    assert len(losses_a) == 6
    assert losses_a == losses_b  # bit-identical, not approximately equal
    assert_same_weights(weights_a, weights_b)

    losses_c, _ = train(seed=1, num_workers=num_workers)
    assert losses_c != losses_a  # the seed does drive shuffling, cropping, flipping and dropout


def test_seeding_comes_from_set_determinism():
    """``Compose`` seeds its transforms from ``set_determinism``'s seed when built (MONAI 1.6) and
    ``monai.data.DataLoader(num_workers=0)`` reseeds them from the torch generator, so even torch's own DataLoader
    reproduces here; without ``set_determinism`` two runs differ."""
    losses_a, _ = train(seed=0, loader_cls=torch.utils.data.DataLoader)
    losses_b, _ = train(seed=0, loader_cls=torch.utils.data.DataLoader)
    assert losses_a == losses_b
    losses_c, _ = train(seed=None)
    losses_d, _ = train(seed=None)
    assert losses_c != losses_d


def test_set_determinism_flags():
    set_determinism(seed=0)
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    set_determinism(seed=None)  # restores the flags for the other tests in this process
