"""3D-ESPNet losses (brats_pipeline.losses.jaccard): weighted soft Jaccard, weighted CE, class weights."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn

from brats_pipeline.losses.jaccard import (
    WeightedCrossEntropyLoss,
    WeightedJaccardLoss,
    class_weights_from_frequencies,
    class_weights_from_labels,
)
from brats_pipeline.transforms.labels import LabelConventionError
from custom_networks.espnet3d import ESPNet3D


@pytest.fixture(autouse=True)
def one_thread():
    """Run on one intra-op thread, restored afterwards: these small convolutions are several times faster on
    one thread than on two when the CPU is shared (OpenMP threads spin-wait while the other is descheduled)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def numpy_weighted_iou_loss(logits: np.ndarray, target: np.ndarray, weight, batch: bool, eps: float = 1e-5):
    """The paper's loss written out in numpy: 1 - sum_c w_c IoU_c, w normalised to sum 1."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    g = np.stack([(target[:, 0] == c) for c in range(logits.shape[1])], axis=1).astype(np.float64)
    axes = (0, 2, 3, 4) if batch else (2, 3, 4)
    iou = (p * g).sum(axis=axes) / ((p + g - p * g).sum(axis=axes) + eps)
    w = np.asarray(weight, dtype=np.float64) / np.sum(weight)
    return float(np.mean(1.0 - (iou * w).sum(axis=-1)))


def test_weighted_jaccard_hand_value_hard_predictions():
    # six voxels, three classes; logits +-30 make the softmax one-hot to 1e-13
    target = torch.tensor([0, 0, 1, 1, 2, 2], dtype=torch.float32).view(1, 1, 6, 1, 1)
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    logits = (torch.nn.functional.one_hot(pred, 3).T.float() * 60 - 30).view(1, 3, 6, 1, 1)
    # IoU_0 = 1 / 3 (one overlap, union 3), IoU_1 = 2 / 3, IoU_2 = 1 / 2; weights 1, 2, 1 -> 1/4, 1/2, 1/4
    expected = 1 - (1 / 4 * 1 / 3 + 1 / 2 * 2 / 3 + 1 / 4 * 1 / 2)
    assert expected == pytest.approx(11 / 24)
    loss = WeightedJaccardLoss(weight=[1.0, 2.0, 1.0], eps=0.0)(logits, target)
    assert float(loss) == pytest.approx(11 / 24, abs=1e-6)
    # unweighted: plain mIoU loss
    assert float(WeightedJaccardLoss(eps=0.0)(logits, target)) == pytest.approx(
        1 - (1 / 3 + 2 / 3 + 1 / 2) / 3, abs=1e-6
    )


@pytest.mark.parametrize("batch", [True, False])
def test_weighted_jaccard_matches_numpy_soft(batch):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 3, 4, 2))
    target = rng.integers(0, 4, size=(2, 1, 3, 4, 2)).astype(np.float32)
    weight = [0.2, 3.0, 1.5, 5.0]
    expected = numpy_weighted_iou_loss(logits, target, weight, batch=batch)
    loss = WeightedJaccardLoss(weight=weight, batch=batch)(
        torch.tensor(logits, dtype=torch.float64), torch.tensor(target)
    )
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # the normalisation makes the loss invariant to the weights' scale
    loss10 = WeightedJaccardLoss(weight=[10 * w for w in weight], batch=batch)(
        torch.tensor(logits, dtype=torch.float64), torch.tensor(target)
    )
    assert float(loss10) == pytest.approx(expected, rel=1e-6)


def test_weighted_jaccard_rejects_bad_weights():
    with pytest.raises(ValueError):
        WeightedJaccardLoss(weight=[1.0, -1.0, 1.0, 1.0])
    with pytest.raises(ValueError):
        WeightedJaccardLoss(weight=[0.0, 0.0])


def test_class_weights_from_frequencies_hand_values():
    # 1 / ln(1.10 + p): p = 0.97 -> 1 / ln(2.07), 0.01 -> 1 / ln(1.11), 0.015 -> 1 / ln(1.115), 0.005 -> 1 / ln(1.105)
    hand = [1.374479, 9.582214, 9.186583, 10.015490]
    assert class_weights_from_frequencies([0.97, 0.01, 0.015, 0.005]) == pytest.approx(hand, rel=1e-5)
    assert class_weights_from_frequencies([970, 10, 15, 5]) == pytest.approx(hand, rel=1e-5)  # counts normalised
    assert class_weights_from_frequencies([1, 0], c=1.5) == pytest.approx([1 / math.log(2.5), 1 / math.log(1.5)])
    with pytest.raises(ValueError):
        class_weights_from_frequencies([0.5, 0.5], c=1.0)
    with pytest.raises(ValueError):
        class_weights_from_frequencies([0.0, 0.0])


def test_weighted_cross_entropy_matches_torch_and_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 3, 2, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 1, 3, 3, 2)).double()  # float indices, as LabelToClassesd gives them
    weight = [0.5, 4.0, 2.0, 6.0]
    loss = WeightedCrossEntropyLoss(weight)(logits, target)
    reference = nn.CrossEntropyLoss(weight=torch.tensor(weight, dtype=torch.float64))(logits, target[:, 0].long())
    torch.testing.assert_close(loss, reference)
    # written out: sum_i w_{y_i} (-log p_{y_i}) / sum_i w_{y_i}
    logp = torch.log_softmax(logits, 1).numpy()
    y = target[:, 0].long().numpy()
    w = np.asarray(weight)[y]
    nll = -np.take_along_axis(logp, y[:, None], axis=1)[:, 0]
    assert float(loss) == pytest.approx(float((w * nll).sum() / w.sum()), rel=1e-10)
    # no weight: plain CE; reduction "none" keeps the voxels
    torch.testing.assert_close(
        WeightedCrossEntropyLoss()(logits, target), nn.CrossEntropyLoss()(logits, target[:, 0].long())
    )
    assert WeightedCrossEntropyLoss(weight, reduction="none")(logits, target).shape == (2, 3, 3, 2)
    # the weight is a buffer: it moves with the module and reaches the state dict
    assert "weight" in WeightedCrossEntropyLoss(weight).state_dict()


def _write_label(path, data: np.ndarray, dtype=np.uint8) -> str:
    nib.save(nib.Nifti1Image(data.astype(dtype), np.eye(4)), str(path))
    return str(path)


def test_class_weights_from_labels_tiny_nifti(tmp_path):
    a = np.zeros((4, 4, 4))
    a.flat[:6] = 1  # NCR
    a.flat[6:16] = 2  # ED
    a.flat[16:20] = 4  # ET (brats2018)
    b = np.zeros((4, 4, 2))
    b.flat[:2] = 4
    files = [_write_label(tmp_path / "a_seg.nii.gz", a), _write_label(tmp_path / "b_seg.nii.gz", b, np.float32)]
    counts = [(64 - 20) + (32 - 2), 6, 10, 4 + 2]  # background, NCR, ED, ET over both cases
    expected = [1 / math.log(1.10 + n / 96) for n in counts]
    assert class_weights_from_labels(files, "brats2018") == pytest.approx(expected)
    # datalist entries work too, and max_cases keeps the first cases only
    entries = [{"case_id": "a", "label": files[0]}, {"case_id": "b", "label": files[1]}]
    assert class_weights_from_labels(entries, "brats2018") == pytest.approx(expected)
    only_a = [1 / math.log(1.10 + n / 64) for n in (44, 6, 10, 4)]
    assert class_weights_from_labels(entries, "brats2018", max_cases=1) == pytest.approx(only_a)
    # convention from the entries themselves
    tagged = [dict(e, label_convention="brats2018") for e in entries]
    assert class_weights_from_labels(tagged, None) == pytest.approx(expected)

    # MSD: 1 is edema, 2 non-enhancing -> contiguous classes 2 and 1
    msd = np.zeros((4, 4, 4))
    msd.flat[:6] = 2
    msd.flat[6:16] = 1
    msd.flat[16:20] = 3
    msd_file = _write_label(tmp_path / "msd.nii.gz", msd)
    assert class_weights_from_labels([msd_file], "msd") == pytest.approx(only_a)

    # a value outside the convention names the file
    with pytest.raises(LabelConventionError, match="a_seg"):
        class_weights_from_labels(files, "brats2023")
    with pytest.raises(ValueError, match="num_classes"):
        class_weights_from_labels(files, "brats2018", num_classes=3)


def _blob_batch(size: int = 16, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical tumors: ET core, NCR shell, ED halo; each modality a noisy function of the class."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    images, labels = [], []
    for _ in range(batch):
        centre = size / 2 + (torch.rand(3, 1, 1, 1, generator=gen) - 0.5) * size / 4
        r = (grid - centre).norm(dim=0)
        label = torch.zeros(size, size, size)
        label[r < 5.5] = 2
        label[r < 3.5] = 1
        label[r < 2] = 3
        lut = torch.tensor([[0.0, 0.3, 0.8, 1.0], [0.0, 0.5, 0.2, 0.6], [0.0, 0.9, 0.7, 0.4], [0.0, 0.2, 1.0, 0.5]])
        image = lut[:, label.long()] + 0.1 * torch.randn(4, size, size, size, generator=gen)
        images.append(image)
        labels.append(label[None])
    return torch.stack(images), torch.stack(labels)


@pytest.mark.parametrize("loss_name", ["jaccard", "ce"])
def test_losses_decrease_when_training_tiny_espnet(loss_name):
    torch.manual_seed(0)
    image, label = _blob_batch()
    counts = torch.bincount(label.long().flatten(), minlength=4).tolist()
    weight = class_weights_from_frequencies(counts)
    loss_fn = WeightedJaccardLoss(weight) if loss_name == "jaccard" else WeightedCrossEntropyLoss(weight)
    net = ESPNet3D(channels=(4, 8, 8, 16), encoder_blocks=(1, 1, 1), decoder_blocks=(1, 1)).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = loss_fn(net(image), label)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    print(loss_name, [round(v, 4) for v in losses])
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-3:]) < losses[0] - 0.02, losses
