"""Myronenko's BraTS 2018 loss: L = L_dice + 0.1 * L_L2 + 0.1 * L_KL (paper Eq. 1-4)."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.utils import look_up_option

__all__ = ["SegResNetVAELoss"]


class SegResNetVAELoss(nn.Module):
    """Loss of Myronenko, "3D MRI brain tumor segmentation using autoencoder regularization" (BrainLes 2018).

    ``L = dice_weight * L_dice + l2_weight * L_L2 + kl_weight * L_KL`` (Eq. 1, weights 1, 0.1, 0.1), for
    ``custom_networks.segresnet_vae.SegResNetVAE2018``. Called as ``loss(pred, label)`` (MONAI's
    ``SupervisedTrainer``):

    - ``pred`` a ``SegResNetVAEOutput`` (training with the VAE branch; any object with the attributes
      ``seg``, ``reconstruction``, ``mu``, ``log_var``, ``image`` works, e.g. the TorchScript copy of it):
      all three terms.
    - ``pred`` a plain tensor of segmentation logits (``use_vae=False``, the paper's ablation, or a plain
      SegResNet): the Dice term alone, ``dice_weight * L_dice``.

    Terms, per batch element, then averaged over the batch (the paper trains with batch size 1):

    - ``L_dice`` (Eq. 2): soft Dice with squared terms in the denominator on ``sigmoid(seg)``, one per region
      channel, and the channel losses summed ("we simply add the three dice loss functions"):
      ``sum_c 1 - (2 sum(p g) + smooth_nr) / (sum p^2 + sum g^2 + smooth_dr)``. This is MONAI's
      ``DiceLoss(sigmoid=True, squared_pred=True)`` with a per-channel reduction. The paper's epsilon is in the
      denominator only, hence ``smooth_nr=0`` by default; ``smooth_nr=smooth_dr`` gives MONAI's default, which
      scores an empty region predicted empty as a loss of 0 instead of 1.

      What the literal Eq. 2 (``smooth_nr=0``) does to a channel whose region is absent from the crop (ET in a
      crop, or a whole case, without enhancing tumor; common in lower-grade gliomas): the numerator
      ``2 sum(p g)`` is 0 whatever ``p``, so that channel's loss is exactly 1 and its gradient exactly 0. False
      positives there cost nothing in the Dice term; they are only discouraged through the other channels and
      crops. With ``smooth_nr = smooth_dr = s`` the channel's loss is ``1 - s / (sum p^2 + s)``: 0 for an
      empty prediction, but it is already close to 1 once ``sum p^2`` is a few times ``s``, so with ``s = 1e-5``
      the gradient is negligible unless the prediction is nearly empty; a larger ``s`` (e.g. 1) gives a usable
      gradient. ``tests/test_vae_loss.py`` checks these numbers.
    - ``L_L2`` (Eq. 3, ``||I_input - I_pred||_2^2``): ``l2_reduction="mean"`` (default) is the mean squared
      error over channels and voxels, as in MONAI's and most public re-implementations; it keeps the 0.1 weight
      on the scale of the Dice term whatever the crop size. ``"sum"`` is the literal squared norm (per batch
      element), about 4 * 160 * 192 * 128 times larger at the paper's crop.
    - ``L_KL`` (Eq. 4): ``(1/N) sum_latent (mu^2 + sigma^2 - log sigma^2 - 1)`` with N the number of image voxels
      (H * W * D); sigma^2 = exp(log_var). (MONAI's ``SegResNetVAE`` uses 0.5 * the mean over the latent.)

    The terms are computed in float32 whatever the autocast dtype of the network's outputs (sums over a whole
    volume overflow float16). ``last_terms`` gives the terms of the latest call as floats for logging.

    Args:
        dice_weight: weight of the Dice term (1).
        l2_weight: weight of the reconstruction term (0.1).
        kl_weight: weight of the KL term (0.1).
        smooth_nr: constant added to the Dice numerator (0, Eq. 2).
        smooth_dr: constant added to the Dice denominator, the paper's epsilon (1e-5).
        l2_reduction: ``"mean"`` or ``"sum"`` over channels and voxels, see above.
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        l2_weight: float = 0.1,
        kl_weight: float = 0.1,
        smooth_nr: float = 0.0,
        smooth_dr: float = 1e-5,
        l2_reduction: str = "mean",
    ) -> None:
        super().__init__()
        l2_reduction = look_up_option(l2_reduction, ("mean", "sum"))
        self.dice_weight = dice_weight
        self.l2_weight = l2_weight
        self.kl_weight = kl_weight
        self.l2_reduction = l2_reduction
        self.dice = DiceLoss(
            sigmoid=True, squared_pred=True, smooth_nr=smooth_nr, smooth_dr=smooth_dr, reduction="none"
        )
        self._last: dict[str, torch.Tensor] = {}

    @property
    def last_terms(self) -> dict[str, float]:
        """Unweighted terms and the weighted total of the latest call: keys ``dice``, ``l2``, ``kl``, ``total``.

        Kept as detached tensors and converted here, so training does not synchronise with the GPU unless someone
        reads them. ``l2`` and ``kl`` are 0 for a plain-tensor prediction.
        """
        return {k: float(v) for k, v in self._last.items()}

    def dice_term(self, seg: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Eq. 2 summed over the region channels, averaged over the batch. seg: logits (B, C, H, W, D);
        label: (B, C, H, W, D) region masks (bool or float)."""
        return self.dice(seg.float(), label.float()).flatten(1).sum(1).mean()

    def l2_term(self, reconstruction: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Eq. 3: squared error, (B, C_in, H, W, D) each; mean over everything, or sum per element then batch mean."""
        if self.l2_reduction == "mean":
            return F.mse_loss(reconstruction.float(), image.float())
        return F.mse_loss(reconstruction.float(), image.float(), reduction="sum") / image.shape[0]

    @staticmethod
    def kl_term(mu: torch.Tensor, log_var: torch.Tensor, n_voxels: int) -> torch.Tensor:
        """Eq. 4: (1/N) sum(mu^2 + sigma^2 - log sigma^2 - 1) per element, batch mean. mu, log_var: (B, latent)."""
        mu, log_var = mu.float(), log_var.float()
        kl = (mu.square() + log_var.exp() - log_var - 1).sum(1) / n_voxels
        return kl.mean()

    def forward(self, pred, label: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pred: ``SegResNetVAEOutput`` (or any object with its attributes) or segmentation logits
                (B, C, H, W, D).
            label: region masks (B, C, H, W, D), e.g. TC, WT, ET.

        Returns:
            The scalar loss.
        """
        if isinstance(pred, torch.Tensor):
            dice = self.dice_term(pred, label)
            total = self.dice_weight * dice
            zero = torch.zeros((), device=dice.device)
            self._last = {"dice": dice.detach(), "l2": zero, "kl": zero, "total": total.detach()}
            return total
        try:
            seg, reconstruction, mu, log_var, image = (
                pred.seg,
                pred.reconstruction,
                pred.mu,
                pred.log_var,
                pred.image,
            )
        except AttributeError as e:
            raise TypeError(
                "SegResNetVAELoss expects segmentation logits (a tensor) or a SegResNetVAEOutput "
                f"(seg, reconstruction, mu, log_var, image), got {type(pred).__name__}."
            ) from e
        dice = self.dice_term(seg, label)
        l2 = self.l2_term(reconstruction, image)
        kl = self.kl_term(mu, log_var, math.prod(image.shape[2:]))
        total = self.dice_weight * dice + self.l2_weight * l2 + self.kl_weight * kl
        self._last = {"dice": dice.detach(), "l2": l2.detach(), "kl": kl.detach(), "total": total.detach()}
        return total
