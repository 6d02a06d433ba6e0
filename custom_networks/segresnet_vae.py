"""Myronenko's BraTS 2018 network: MONAI's SegResNet plus a VAE branch built exactly as the paper's Table 1.

Reference: A. Myronenko, "3D MRI brain tumor segmentation using autoencoder regularization", BrainLes 2018
(arXiv:1810.11654). Section 3, Table 1.
"""

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
from monai.networks.blocks.segresnet_block import get_conv_layer, get_upsample_layer
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from monai.networks.nets import SegResNet
from monai.utils import UpsampleMode

__all__ = ["SegResNetVAE2018", "SegResNetVAEOutput", "SegmentationWeights", "segmentation_state_dict"]

#: Every module of the VAE branch is named ``vae_*``; the remaining state-dict keys are MONAI ``SegResNet``'s.
VAE_PREFIX = "vae_"


class SegResNetVAEOutput(NamedTuple):
    """What :class:`SegResNetVAE2018` returns in training mode with the VAE branch on.

    The input image travels with the predictions so that a loss called as ``loss(pred, label)`` (MONAI's
    ``SupervisedTrainer``) has the reconstruction target at hand.
    """

    seg: torch.Tensor
    """Segmentation logits, (B, out_channels, H, W, D); the paper's final sigmoid is left to the loss/post-transforms."""
    reconstruction: torch.Tensor
    """VAE reconstruction of the input, (B, in_channels, H, W, D)."""
    mu: torch.Tensor
    """Latent means, (B, vae_latent_dim)."""
    log_var: torch.Tensor
    """Latent log-variances log(sigma^2), (B, vae_latent_dim)."""
    image: torch.Tensor
    """The network input (the reconstruction target), (B, in_channels, H, W, D)."""


def segmentation_state_dict(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The segmentation part of a :class:`SegResNetVAE2018` state dict: every key without a ``vae_*`` component.

    The result loads with ``strict=True`` into a plain ``monai.networks.nets.SegResNet`` built with the same
    arguments. Accepts the model or a state dict (e.g. a checkpoint's ``"model"`` entry, also with a
    ``module.`` prefix from DDP).
    """
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    return {k: v for k, v in state.items() if not any(part.startswith(VAE_PREFIX) for part in k.split("."))}


class SegResNetVAE2018(SegResNet):
    """SegResNet with the VAE regulariser of Myronenko (BraTS 2018), VAE branch as in the paper's Table 1.

    The encoder and the segmentation decoder are MONAI's :class:`~monai.networks.nets.SegResNet` unchanged
    (same modules, same state-dict keys); the VAE branch adds modules named ``vae_*`` only. Hence
    ``SegResNet(<same arguments>).load_state_dict(segmentation_state_dict(model))`` gives a network whose output
    equals this one's in eval mode: that plain SegResNet is what the inference bundle exports.

    VAE branch (Table 1; C = init_filters * 2**(len(blocks_down) - 1) = 256 and S = vae_input_size / 16 for the
    paper's settings), modules in brackets:

    - VD [``vae_down``, ``vae_fc_latent``]: GN, ReLU, Conv 3x3x3 (vae_down_channels=16) stride 2, flatten,
      Dense -> 2 * vae_latent_dim (128 means + 128 log-variances; means only with ``vae_estimate_std=False``).
    - VDraw: z = mu + exp(log_var / 2) * eps, eps ~ N(0, I) (reparameterised, so gradients reach the encoder);
      z = mu in eval mode.
    - VU [``vae_fc_up``, ``vae_fc_up_sample``]: Dense -> 16 * S, ReLU, reshape to 16 x S, Conv1 -> C, UpLinear.
    - VUp2/VBlock2 ... VUp0/VBlock0 [``vae_up_samples``, ``vae_up_layers``]: Conv1 (halve the channels),
      UpLinear, then MONAI ``ResBlock`` (GN, ReLU, Conv, GN, ReLU, Conv, AddId); built by SegResNet's own
      ``_make_up_layers`` but as new modules with their own weights; no skip connections from the encoder.
    - Vend [``vae_conv_final``]: Conv1 -> in_channels (with bias), nothing before it.

    The std is parameterised by its log-variance log(sigma^2) (standard VAE practice): sigma^2 = exp(log_var) is
    positive without clamping, and the KL term of Eq. 4 needs log(sigma^2) itself, which is then exact.

    Output: in eval mode, or with ``use_vae=False``, the segmentation logits (B, out_channels, H, W, D) exactly
    as SegResNet (so ``SlidingWindowInferer``, ``torch.jit.trace`` and ``verify_net_in_out`` work); the VAE
    branch does not run at all. In training mode with ``use_vae=True``: a :class:`SegResNetVAEOutput`. The
    paper's final sigmoid is not in the network: it is fused into the loss (``DiceLoss(sigmoid=True)``) and the
    post-transforms, which is numerically safer and keeps the logits MONAI's convention.

    Deviations, point by point (MONAI ``SegResNetVAE`` | paper | this class):

    1. VAE decoder weights: MONAI runs the VAE through the segmentation decoder's own ``up_samples`` /
       ``up_layers`` (shared weights) | separate VAE decoder (Table 1) | separate ``vae_up_*`` modules.
    2. Latent: MONAI has two Dense layers of ``vae_nz=256`` each (256 means + 256 stds) | one Dense to 256 =
       128 means + 128 stds | one Dense to 2 * ``vae_latent_dim`` (128 + 128), split in two.
    3. Std: MONAI defaults to ``vae_estimate_std=False``, a fixed std 0.3 and KL = mean(mu^2) | estimated |
       estimated by default (``vae_estimate_std=True``); with False, log_var is the constant
       2 log(``vae_default_std``) and the loss's KL keeps the paper's formula.
    4. KL normalisation: MONAI uses 0.5 * mean over the latent | (1/N) * sum over the latent, N = image voxels
       (Eq. 4) | Eq. 4, in ``brats_pipeline.losses.vae.SegResNetVAELoss``.
    5. Extra layers: MONAI adds GN+ReLU after the VD conv, after the VU upsampling and before the Vend conv |
       none (Table 1) | none.
    6. Loss weights: MONAI's forward returns the unweighted ``mse + KL`` (the weights are the user's problem) |
       L_dice + 0.1 L_L2 + 0.1 L_KL | the loss module takes ``dice_weight``, ``l2_weight``, ``kl_weight``.
    7. Input size: MONAI fixes ``input_image_size`` and fails with a shape error elsewhere | 160x192x128 |
       ``vae_input_size`` (each side divisible by 2**len(blocks_down)) with a clear error on a mismatch; eval
       mode takes any size SegResNet takes.
    8. Inherited from MONAI SegResNet on purpose, for weight compatibility: the GN+ReLU before the final
       1x1x1 segmentation conv (paper: the 1x1x1 conv follows the last decoder block directly), and the
       bias-free convolutions. The VD conv is bias-free too (the Dense layer's bias absorbs a bias there).

    Args:
        vae_input_size: the training crop (H, W, D); it sets the size of the VAE's Dense layers. Each side must
            be divisible by ``2 ** len(blocks_down)`` (16). Ignored when ``use_vae=False``.
        spatial_dims: 3 (2 works too).
        init_filters: filters of the initial convolution (32 in the paper).
        in_channels: input channels, the MRI modalities (4).
        out_channels: output channels, the regions TC, WT, ET (3).
        dropout_prob: rate of the spatial dropout (``Dropout3d``) after the initial convolution (0.2); None
            disables it.
        act: activation, as for SegResNet.
        norm: normalisation, as for SegResNet (GroupNorm with 8 groups).
        blocks_down: ResBlocks per encoder level.
        blocks_up: ResBlocks per decoder level; the VAE decoder uses the same.
        upsample_mode: SegResNet's upsampling mode; "nontrainable" is the paper's (tri)linear upsampling.
        use_vae: build and run the VAE branch (False: the paper's ablation, a plain SegResNet).
        vae_latent_dim: latent size, number of means (128; as many log-variances).
        vae_down_channels: channels of the VD convolution (16).
        vae_estimate_std: estimate the std (paper) rather than fix it to ``vae_default_std``.
        vae_default_std: the fixed std when ``vae_estimate_std=False``.
    """

    # for torch.jit.script: typed attributes, and a constant use_vae so that use_vae=False compiles no VAE code
    __constants__ = ["use_vae"]
    vae_input_size: list[int]
    vae_fc_shape: list[int]

    def __init__(
        self,
        vae_input_size: Sequence[int] = (160, 192, 128),
        spatial_dims: int = 3,
        init_filters: int = 32,
        in_channels: int = 4,
        out_channels: int = 3,
        dropout_prob: float | None = 0.2,
        act: tuple | str = ("RELU", {"inplace": True}),
        norm: tuple | str = ("GROUP", {"num_groups": 8}),
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        blocks_up: Sequence[int] = (1, 1, 1),
        upsample_mode: UpsampleMode | str = UpsampleMode.NONTRAINABLE,
        use_vae: bool = True,
        vae_latent_dim: int = 128,
        vae_down_channels: int = 16,
        vae_estimate_std: bool = True,
        vae_default_std: float = 0.3,
    ) -> None:
        self.segresnet_kwargs = {
            "spatial_dims": spatial_dims,
            "init_filters": init_filters,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "dropout_prob": dropout_prob,
            "act": act,
            "norm": norm,
            "blocks_down": tuple(blocks_down),
            "blocks_up": tuple(blocks_up),
            "upsample_mode": upsample_mode,
        }
        super().__init__(**self.segresnet_kwargs)
        self.use_vae = use_vae
        self.vae_input_size = [int(s) for s in vae_input_size]
        self.vae_latent_dim = vae_latent_dim
        self.vae_down_channels = vae_down_channels
        self.vae_estimate_std = vae_estimate_std
        self.vae_default_std = vae_default_std
        # spatial size of the VD convolution's output, the shape the VU Dense layer reshapes to
        self.vae_fc_shape = []
        if use_vae:
            self._make_vae_layers()

    def _make_vae_layers(self) -> None:
        n_levels = len(self.blocks_down)
        if len(self.blocks_up) != n_levels - 1:
            raise ValueError(
                f"The VAE decoder must return to the input resolution: len(blocks_up)={len(self.blocks_up)} "
                f"must be len(blocks_down) - 1 = {n_levels - 1}."
            )
        if len(self.vae_input_size) != self.spatial_dims:
            raise ValueError(f"vae_input_size={self.vae_input_size} must have spatial_dims={self.spatial_dims} sides.")
        factor = 2**n_levels  # the encoder's downsamplings plus the VD stride-2 convolution
        if any(s % factor for s in self.vae_input_size):
            raise ValueError(
                f"Each side of vae_input_size={self.vae_input_size} must be divisible by 2**len(blocks_down)={factor}."
            )
        self.vae_fc_shape = [s // factor for s in self.vae_input_size]
        endpoint_channels = self.init_filters * 2 ** (n_levels - 1)
        n_flat = self.vae_down_channels * math.prod(self.vae_fc_shape)
        n_stats = 2 * self.vae_latent_dim if self.vae_estimate_std else self.vae_latent_dim

        # VD
        self.vae_down = nn.Sequential(
            get_norm_layer(name=self.norm, spatial_dims=self.spatial_dims, channels=endpoint_channels),
            get_act_layer(self.act),
            get_conv_layer(self.spatial_dims, endpoint_channels, self.vae_down_channels, stride=2),
        )
        self.vae_fc_latent = nn.Linear(n_flat, n_stats)
        # VU
        self.vae_fc_up = nn.Sequential(nn.Linear(self.vae_latent_dim, n_flat), get_act_layer(self.act))
        self.vae_fc_up_sample = nn.Sequential(
            get_conv_layer(self.spatial_dims, self.vae_down_channels, endpoint_channels, kernel_size=1),
            get_upsample_layer(self.spatial_dims, endpoint_channels, upsample_mode=self.upsample_mode),
        )
        # VUp2/VBlock2 ... VUp0/VBlock0: SegResNet's own builder, new modules (own weights)
        self.vae_up_layers, self.vae_up_samples = self._make_up_layers()
        # Vend
        self.vae_conv_final = get_conv_layer(
            self.spatial_dims, self.init_filters, self.in_channels, kernel_size=1, bias=True
        )

    def _check_vae_input(self, x: torch.Tensor) -> None:
        if list(x.shape[2:]) != self.vae_input_size:
            raise ValueError(
                f"SegResNetVAE2018 was built for vae_input_size={self.vae_input_size} (the VAE's Dense layers depend "
                f"on it) but got an input of spatial size {list(x.shape[2:])}: set vae_input_size to the training "
                "crop size, or call the network in eval mode (segmentation only) for other sizes."
            )

    def vae_forward(self, endpoint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the VAE branch (Table 1) on the encoder endpoint.

        Args:
            endpoint: encoder output, (B, init_filters * 2**(len(blocks_down)-1), *vae_input_size / 2**(len(blocks_down)-1)).

        Returns:
            reconstruction (B, in_channels, *vae_input_size), mu (B, vae_latent_dim) and
            log_var (B, vae_latent_dim). The latent is sampled in training mode and is mu in eval mode.
        """
        stats = self.vae_fc_latent(self.vae_down(endpoint).flatten(1))
        if self.vae_estimate_std:
            mu, log_var = stats.chunk(2, dim=1)
        else:
            mu = stats
            log_var = torch.full_like(mu, 2.0 * math.log(self.vae_default_std))
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu) if self.training else mu

        x = self.vae_fc_up(z).view([-1, self.vae_down_channels] + self.vae_fc_shape)
        x = self.vae_fc_up_sample(x)
        for up, upl in zip(self.vae_up_samples, self.vae_up_layers):  # noqa: B905 (TorchScript has no strict=)
            x = upl(up(x))
        return self.vae_conv_final(x), mu, log_var

    def forward(self, x: torch.Tensor) -> torch.Tensor | SegResNetVAEOutput:  # type: ignore[override]
        """
        Args:
            x: image, (B, in_channels, H, W, D).

        Returns:
            In eval mode or with ``use_vae=False``: segmentation logits (B, out_channels, H, W, D).
            In training mode with ``use_vae=True``: :class:`SegResNetVAEOutput`.
        """
        if self.use_vae and self.training:
            self._check_vae_input(x)
        endpoint, down_x = self.encode(x)
        down_x.reverse()
        seg = self.decode(endpoint, down_x)
        if self.use_vae:
            if self.training:
                reconstruction, mu, log_var = self.vae_forward(endpoint)
                return SegResNetVAEOutput(seg, reconstruction, mu, log_var, x)
        return seg

    def segmentation_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict without the ``vae_*`` keys: it loads (strict) into ``SegResNet(**self.segresnet_kwargs)``."""
        return segmentation_state_dict(self)

    def segmentation_network(self) -> SegResNet:
        """A plain MONAI ``SegResNet`` with this network's segmentation weights (a copy), for export and inference."""
        net = SegResNet(**self.segresnet_kwargs)
        net.load_state_dict(self.segmentation_state_dict())
        return net.to(next(self.parameters()).device).train(self.training)


class SegmentationWeights:
    """Checkpoint view of a :class:`SegResNetVAE2018`: its segmentation weights only.

    Put it in a ``CheckpointSaver``'s ``save_dict`` (``{"model": SegmentationWeights(network)}``) so that the
    saved ``model.pt`` loads strictly into a plain MONAI ``SegResNet``: the inference bundle and TorchScript
    export then need no VAE code. A ``DistributedDataParallel`` wrapper is looked through.
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def _module(self) -> nn.Module:
        return getattr(self.network, "module", self.network)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return segmentation_state_dict(self._module())

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
        """Load segmentation weights; the VAE branch keeps its current weights."""
        result = self._module().load_state_dict(state_dict, strict=False)
        missing = [k for k in result.missing_keys if not any(p.startswith(VAE_PREFIX) for p in k.split("."))]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"segmentation weights do not match: missing {missing}, unexpected {result.unexpected_keys}"
            )
        return result
