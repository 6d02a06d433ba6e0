"""SegResNetVAELoss against hand-computed values (paper Eq. 1-4), and a short training run."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from brats_pipeline.losses.vae import SegResNetVAELoss
from custom_networks.segresnet_vae import SegResNetVAE2018, SegResNetVAEOutput

EPS = 1e-5


def _pred(seed: int = 0, batch: int = 2, shape: tuple[int, int, int] = (4, 3, 2)) -> SegResNetVAEOutput:
    g = torch.Generator().manual_seed(seed)
    return SegResNetVAEOutput(
        seg=torch.randn(batch, 3, *shape, generator=g) * 2,
        reconstruction=torch.randn(batch, 4, *shape, generator=g),
        mu=torch.randn(batch, 5, generator=g),
        log_var=torch.randn(batch, 5, generator=g) * 0.5,
        image=torch.randn(batch, 4, *shape, generator=g),
    )


def _label(seed: int = 1, batch: int = 2, shape: tuple[int, int, int] = (4, 3, 2)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    label = (torch.rand(batch, 3, *shape, generator=g) > 0.5).float()
    label[1, 2] = 0  # an empty region (ET absent): with smooth_nr=0 its Dice loss is 1
    return label


def _hand_dice(seg: torch.Tensor, label: torch.Tensor) -> float:
    s, g = seg.double().numpy(), label.double().numpy()
    p = 1.0 / (1.0 + np.exp(-s))
    per_element = []
    for b in range(s.shape[0]):
        per_element.append(
            sum(
                1 - 2 * (p[b, c] * g[b, c]).sum() / ((p[b, c] ** 2).sum() + (g[b, c] ** 2).sum() + EPS)
                for c in range(s.shape[1])
            )
        )
    return float(np.mean(per_element))


def _hand_kl(mu: torch.Tensor, log_var: torch.Tensor, n_voxels: int) -> float:
    per_element = []
    for m_row, lv_row in zip(mu.tolist(), log_var.tolist(), strict=True):
        per_element.append(sum(m**2 + math.exp(lv) - lv - 1 for m, lv in zip(m_row, lv_row, strict=True)) / n_voxels)
    return sum(per_element) / len(per_element)


def test_kl_term_by_hand():
    pred = _pred()
    loss = SegResNetVAELoss(dice_weight=0.0, l2_weight=0.0, kl_weight=1.0)
    value = loss(pred, _label())
    expected = _hand_kl(pred.mu, pred.log_var, n_voxels=4 * 3 * 2)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert loss.last_terms["kl"] == pytest.approx(expected, rel=1e-5)
    # sigma = 1, mu = 0 is the prior: KL 0
    prior = pred._replace(mu=torch.zeros(2, 5), log_var=torch.zeros(2, 5))
    assert loss(prior, _label()).item() == 0.0


def test_l2_term_by_hand():
    pred = _pred()
    diff = (pred.reconstruction - pred.image).double().numpy()
    label = _label()
    mean_loss = SegResNetVAELoss(dice_weight=0.0, l2_weight=1.0, kl_weight=0.0)
    assert mean_loss(pred, label).item() == pytest.approx(float((diff**2).mean()), rel=1e-5)
    sum_loss = SegResNetVAELoss(dice_weight=0.0, l2_weight=1.0, kl_weight=0.0, l2_reduction="sum")
    per_element = [(diff[b] ** 2).sum() for b in range(2)]
    assert sum_loss(pred, label).item() == pytest.approx(float(np.mean(per_element)), rel=1e-5)
    with pytest.raises(ValueError, match="'max'(.|\n)*(sum|mean)"):
        SegResNetVAELoss(l2_reduction="max")


def test_dice_term_by_hand():
    pred, label = _pred(), _label()
    loss = SegResNetVAELoss(dice_weight=1.0, l2_weight=0.0, kl_weight=0.0)
    assert loss(pred, label).item() == pytest.approx(_hand_dice(pred.seg, label), rel=1e-5)
    # summed over the three regions: perfect logits give ~0, inverted ones ~3
    perfect = (label * 2 - 1) * 50
    perfect[1, 2] = -50  # empty region predicted empty: loss 1 with the paper's smooth_nr=0, 0 with smooth_nr=eps
    assert loss(perfect, label).item() == pytest.approx(0.5, abs=1e-4)
    assert SegResNetVAELoss(smooth_nr=EPS)(perfect, label).item() == pytest.approx(0.0, abs=1e-4)
    assert loss(-perfect, label).item() == pytest.approx(3.0, abs=1e-4)
    # bool labels (MONAI's ConvertToMultiChannelBasedOnBratsClasses) are accepted
    assert loss(pred.seg, label.bool()).item() == pytest.approx(_hand_dice(pred.seg, label), rel=1e-5)


def test_weights_and_last_terms():
    pred, label = _pred(seed=3), _label(seed=4)
    dice = _hand_dice(pred.seg, label)
    l2 = float(((pred.reconstruction - pred.image).double().numpy() ** 2).mean())
    kl = _hand_kl(pred.mu, pred.log_var, n_voxels=24)

    default = SegResNetVAELoss()
    assert default(pred, label).item() == pytest.approx(dice + 0.1 * l2 + 0.1 * kl, rel=1e-5)

    loss = SegResNetVAELoss(dice_weight=0.7, l2_weight=0.3, kl_weight=0.05)
    total = loss(pred, label)
    assert total.item() == pytest.approx(0.7 * dice + 0.3 * l2 + 0.05 * kl, rel=1e-5)
    terms = loss.last_terms
    assert set(terms) == {"dice", "l2", "kl", "total"} and all(isinstance(v, float) for v in terms.values())
    assert terms["dice"] == pytest.approx(dice, rel=1e-5)
    assert terms["l2"] == pytest.approx(l2, rel=1e-5)
    assert terms["kl"] == pytest.approx(kl, rel=1e-5)
    assert terms["total"] == pytest.approx(total.item())


def test_plain_tensor_is_dice_only():
    pred, label = _pred(), _label()
    loss = SegResNetVAELoss(dice_weight=2.0)
    value = loss(pred.seg, label)
    assert value.item() == pytest.approx(2.0 * _hand_dice(pred.seg, label), rel=1e-5)
    assert loss.last_terms["l2"] == loss.last_terms["kl"] == 0.0
    # any object with the output's attributes works (e.g. TorchScript's copy of the NamedTuple)
    duck = SimpleNamespace(**pred._asdict())
    assert loss(duck, label).item() == pytest.approx(loss(pred, label).item())
    with pytest.raises(TypeError, match="SegResNetVAEOutput"):
        loss((pred.seg, pred.reconstruction), label)


def _blob_batch(batch: int = 2, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with a bright nested blob; labels TC, WT, ET as nested spheres."""
    g = torch.Generator().manual_seed(0)
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    images, labels = [], []
    for _ in range(batch):
        centre = (torch.rand(3, generator=g) * size / 2 + size / 4).view(3, 1, 1, 1)
        r = ((grid - centre) ** 2).sum(0).sqrt()
        wt, tc, et = r < 9, r < 6, (r > 3) & (r < 6)
        image = torch.stack([et * 2.0, tc * 1.0, wt * 1.5, wt * 1.0]) + 0.1 * torch.randn(
            4, size, size, size, generator=g
        )
        images.append(image)
        labels.append(torch.stack([tc, wt, et]).float())
    return torch.stack(images), torch.stack(labels)


def test_training_decreases_total_loss():
    torch.manual_seed(0)
    image, label = _blob_batch()
    net = SegResNetVAE2018(vae_input_size=(32, 32, 32), init_filters=8).train()
    loss_fn = SegResNetVAELoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    history = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = loss_fn(net(image), label)
        loss.backward()
        optimizer.step()
        history.append(loss_fn.last_terms)
    assert history[-1]["total"] < history[0]["total"]
    assert history[-1]["dice"] < history[0]["dice"]
    assert history[-1]["l2"] < history[0]["l2"]


def test_literal_eq2_gives_no_signal_on_a_region_absent_from_the_crop():
    """``smooth_nr=0`` (the paper's Eq. 2, the bundle's default): a channel whose region is absent (no ET in the
    crop) has loss exactly 1 and gradient exactly 0 whatever the prediction, so false-positive ET there costs
    nothing; ``smooth_nr = smooth_dr`` (MONAI's default) scores a confidently empty prediction as about 0 and does
    push the logits down, with a gradient that vanishes as soon as the prediction is far from empty."""
    label = torch.zeros(1, 3, 8, 8, 8)
    label[:, :2, 2:6, 2:6, 2:6] = 1  # TC and WT present, ET absent
    for bias in (-10.0, 0.0, 10.0):  # confidently empty, undecided, confidently full (false positives)
        seg = (torch.randn(1, 3, 8, 8, 8, generator=torch.Generator().manual_seed(0)) + bias).requires_grad_()
        loss = SegResNetVAELoss().dice(seg, label).flatten(1)
        assert float(loss[0, 2].detach()) == 1.0
        loss[0, 2].backward()
        assert float(seg.grad.abs().max()) == 0.0
    monai_default = SegResNetVAELoss(smooth_nr=EPS, smooth_dr=EPS)
    empty = (torch.randn(1, 3, 8, 8, 8, generator=torch.Generator().manual_seed(0)) - 10.0).requires_grad_()
    per_channel = monai_default.dice(empty, label).flatten(1)
    assert float(per_channel[0, 2].detach()) < 0.6  # sum p^2 ~ 1e-7 * 512 is comparable to 1e-5
    per_channel[0, 2].backward()
    assert float(empty.grad[:, 2].abs().max()) > 1e-3
    assert float(empty.grad[:, 2].min()) >= 0  # d loss / d logit >= 0: lowering the logits lowers the loss
    full = torch.full((1, 3, 8, 8, 8), 10.0)
    assert float(monai_default.dice(full, label).flatten(1)[0, 2]) > 0.999999
