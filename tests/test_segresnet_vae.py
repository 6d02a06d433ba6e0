"""SegResNetVAE2018: paper shapes (Table 1), own VAE weights, MONAI SegResNet weight compatibility, export paths."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_close_to_scale
from monai.inferers import SlidingWindowInferer
from monai.networks.blocks import Convolution, UpSample
from monai.networks.blocks.segresnet_block import ResBlock
from monai.networks.nets import SegResNet

from custom_networks.segresnet_vae import SegResNetVAE2018, SegResNetVAEOutput, segmentation_state_dict

SMALL = {"init_filters": 8, "vae_input_size": (32, 32, 32)}

VAE_PARAMETER_NAMES = [
    "vae_down.0.weight",
    "vae_down.0.bias",
    "vae_down.2.conv.weight",
    "vae_fc_latent.weight",
    "vae_fc_latent.bias",
    "vae_fc_up.0.weight",
    "vae_fc_up.0.bias",
    "vae_fc_up_sample.0.conv.weight",
    *[
        f"vae_up_layers.{i}.0.{name}"
        for i in range(3)
        for name in (
            "norm1.weight",
            "norm1.bias",
            "norm2.weight",
            "norm2.bias",
            "conv1.conv.weight",
            "conv2.conv.weight",
        )
    ],
    "vae_up_samples.0.0.conv.weight",
    "vae_up_samples.1.0.conv.weight",
    "vae_up_samples.2.0.conv.weight",
    "vae_conv_final.conv.weight",
    "vae_conv_final.conv.bias",
]


def _small_net(**kwargs) -> SegResNetVAE2018:
    torch.manual_seed(0)
    return SegResNetVAE2018(**{**SMALL, **kwargs})


def test_paper_crop_shapes():
    # A real forward at 1x4x160x192x128 with init_filters=32 takes ~2 min on 2 CPU cores: meta tensors carry the
    # shapes through the very same forward code (every layer's output shape is computed, no arithmetic).
    with torch.device("meta"):
        net = SegResNetVAE2018()
    net.train()
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str, module: nn.Module) -> None:
        module.register_forward_hook(lambda _m, _i, out: shapes.__setitem__(name, tuple(out.shape)))

    record("endpoint", net.down_layers[-1])
    record("VD conv", net.vae_down)
    record("VD dense", net.vae_fc_latent)
    record("VU", net.vae_fc_up_sample)
    for i, level in enumerate((2, 1, 0)):
        record(f"VUp{level}", net.vae_up_samples[i])
        record(f"VBlock{level}", net.vae_up_layers[i])
    out = net(torch.empty(1, 4, 160, 192, 128, device="meta"))

    assert isinstance(out, SegResNetVAEOutput)
    assert shapes == {
        "endpoint": (1, 256, 20, 24, 16),
        "VD conv": (1, 16, 10, 12, 8),
        "VD dense": (1, 256),
        "VU": (1, 256, 20, 24, 16),
        "VUp2": (1, 128, 40, 48, 32),
        "VBlock2": (1, 128, 40, 48, 32),
        "VUp1": (1, 64, 80, 96, 64),
        "VBlock1": (1, 64, 80, 96, 64),
        "VUp0": (1, 32, 160, 192, 128),
        "VBlock0": (1, 32, 160, 192, 128),
    }
    assert out.seg.shape == (1, 3, 160, 192, 128)
    assert out.reconstruction.shape == (1, 4, 160, 192, 128)
    assert out.mu.shape == out.log_var.shape == (1, 128)
    assert out.image.shape == (1, 4, 160, 192, 128)
    assert net.vae_fc_latent.in_features == net.vae_fc_up[0].out_features == 16 * 10 * 12 * 8


def test_vae_branch_is_table_1():
    net = _small_net()
    c = 64  # endpoint channels at init_filters=8
    vd = list(net.vae_down)
    assert [type(m) for m in vd] == [nn.GroupNorm, nn.ReLU, Convolution]
    assert vd[0].num_groups == 8 and vd[0].num_channels == c
    assert vd[2].conv.out_channels == 16 and vd[2].conv.stride == (2, 2, 2) and vd[2].conv.kernel_size == (3, 3, 3)
    assert net.vae_fc_latent.out_features == 256  # 128 means + 128 log-variances
    assert [type(m) for m in net.vae_fc_up] == [nn.Linear, nn.ReLU]
    assert net.vae_fc_up[0].in_features == 128
    vu = list(net.vae_fc_up_sample)
    assert [type(m) for m in vu] == [Convolution, UpSample]
    assert vu[0].conv.kernel_size == (1, 1, 1) and vu[0].conv.out_channels == c
    for i, channels in enumerate((c // 2, c // 4, c // 8)):
        conv1, up = net.vae_up_samples[i]
        assert conv1.conv.kernel_size == (1, 1, 1) and conv1.conv.out_channels == channels
        assert up.upsample_non_trainable.mode == "trilinear"
        (block,) = net.vae_up_layers[i]
        assert isinstance(block, ResBlock) and block.conv1.conv.in_channels == channels
    final = net.vae_conv_final.conv
    assert final.kernel_size == (1, 1, 1) and final.out_channels == 4 and final.bias is not None
    # no GN beyond VD's and the three ResBlocks' (MONAI's SegResNetVAE adds three more)
    vae_norms = [m for name, m in net.named_modules() if name.startswith("vae_") and isinstance(m, nn.GroupNorm)]
    assert len(vae_norms) == 1 + 2 * 3


def test_dropout_is_spatial_after_initial_conv():
    net = SegResNetVAE2018()
    assert isinstance(net.dropout, nn.Dropout3d) and net.dropout.p == 0.2
    assert SegResNetVAE2018(dropout_prob=None).dropout_prob is None


def test_parameter_names():
    net = _small_net()
    names = [k for k, _ in net.named_parameters()]
    assert [k for k in names if k.startswith("vae_")] == VAE_PARAMETER_NAMES
    plain = SegResNet(spatial_dims=3, init_filters=8, in_channels=4, out_channels=3, dropout_prob=0.2)
    assert list(segmentation_state_dict(net)) == list(plain.state_dict())
    assert [k for k in names if not k.startswith("vae_")] == [k for k, _ in plain.named_parameters()]


def test_vae_decoder_has_own_parameters():
    net = _small_net()
    vae_ids = {id(p) for name, p in net.named_parameters() if name.startswith("vae_")}
    seg_ids = {id(p) for name, p in net.named_parameters() if not name.startswith("vae_")}
    assert vae_ids and seg_ids and not vae_ids & seg_ids
    # named_parameters() drops duplicates: the two counts add up only if nothing is shared
    assert len(vae_ids) + len(seg_ids) == len(list(net.parameters()))
    vae_modules = {id(m) for name, m in net.named_modules() if name.startswith("vae_")}
    for seg_module in (*net.up_layers.modules(), *net.up_samples.modules(), *net.conv_final.modules()):
        if any(True for _ in seg_module.parameters(recurse=False)):
            assert id(seg_module) not in vae_modules


def test_gradient_flows_through_sample_into_encoder_only_via_vae():
    net = _small_net(dropout_prob=None).train()
    x = torch.randn(1, 4, 32, 32, 32)
    out = net(x)
    F.mse_loss(out.reconstruction, out.image).backward()
    assert net.convInit.conv.weight.grad.abs().sum() > 0
    assert net.down_layers[-1][-1].conv2.conv.weight.grad.abs().sum() > 0
    grad_stats = net.vae_fc_latent.weight.grad
    assert grad_stats[:128].abs().sum() > 0  # through mu
    assert grad_stats[128:].abs().sum() > 0  # through sigma * eps
    # the reconstruction does not touch the segmentation decoder
    for p in (*net.up_layers.parameters(), *net.up_samples.parameters(), *net.conv_final.parameters()):
        assert p.grad is None


def test_sampling_in_training_mean_in_eval():
    net = _small_net()
    endpoint = torch.randn(2, 64, 4, 4, 4)
    with torch.no_grad():
        net.train()
        r1, mu1, _ = net.vae_forward(endpoint)
        r2, mu2, _ = net.vae_forward(endpoint)
        assert torch.equal(mu1, mu2) and not torch.allclose(r1, r2)
        net.eval()
        e1, _, _ = net.vae_forward(endpoint)
        e2, _, _ = net.vae_forward(endpoint)
    assert torch.equal(e1, e2)


def test_fixed_std():
    net = _small_net(vae_estimate_std=False, vae_default_std=0.5).train()
    assert net.vae_fc_latent.out_features == 128
    with torch.no_grad():
        out = net(torch.randn(1, 4, 32, 32, 32))
    torch.testing.assert_close(out.log_var, torch.full((1, 128), 2 * math.log(0.5)))


def test_eval_output_equals_monai_segresnet():
    net = _small_net().eval()
    # non-trivial norm parameters, so that a wrong key mapping could not go unnoticed
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    plain = SegResNet(spatial_dims=3, init_filters=8, in_channels=4, out_channels=3, dropout_prob=0.2).eval()
    plain.load_state_dict(segmentation_state_dict(net.state_dict()), strict=True)
    x = torch.randn(2, 4, 32, 32, 32)
    with torch.no_grad():
        ours = net(x)
        assert isinstance(ours, torch.Tensor) and ours.shape == (2, 3, 32, 32, 32)
        assert torch.equal(ours, plain(x))
        assert torch.equal(ours, net.segmentation_network()(x))
    ddp_state = {f"module.{k}": v for k, v in net.state_dict().items()}
    assert list(segmentation_state_dict(ddp_state)) == [f"module.{k}" for k in plain.state_dict()]


def test_other_crop_sizes():
    net = _small_net(vae_input_size=(32, 48, 64)).train()
    assert net.vae_fc_shape == [2, 3, 4]
    x = torch.randn(1, 4, 32, 48, 64)
    with torch.no_grad():
        out = net(x)
    assert out.seg.shape == (1, 3, 32, 48, 64)
    assert out.reconstruction.shape == (1, 4, 32, 48, 64)
    assert out.mu.shape == (1, 128)
    assert out.image is x


def test_wrong_input_size_raises():
    net = _small_net().train()
    with pytest.raises(ValueError, match=r"vae_input_size=\[32, 32, 32\].*\[32, 32, 48\]"):
        net(torch.randn(1, 4, 32, 32, 48))
    with pytest.raises(ValueError, match="divisible by"):
        SegResNetVAE2018(vae_input_size=(40, 32, 32), init_filters=8)
    with pytest.raises(ValueError, match="blocks_up"):
        SegResNetVAE2018(vae_input_size=(32, 32, 32), init_filters=8, blocks_up=(1, 1))
    # segmentation only (eval) takes any size SegResNet takes
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 4, 32, 32, 48)).shape == (1, 3, 32, 32, 48)


def test_without_vae_is_plain_segresnet():
    net = SegResNetVAE2018(init_filters=8, use_vae=False).train()
    assert not [k for k in net.state_dict() if k.startswith("vae_")]
    SegResNet(spatial_dims=3, init_filters=8, in_channels=4, out_channels=3).load_state_dict(net.state_dict())
    with torch.no_grad():
        out = net(torch.randn(1, 4, 32, 32, 48))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 32, 32, 48)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # from torch's own GroupNorm batch check
def test_inference_and_export_paths():
    net = _small_net().eval()
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        expected = net(x)
        windows = SlidingWindowInferer(roi_size=(32, 32, 32), sw_batch_size=2, overlap=0.25)(
            torch.randn(1, 4, 48, 32, 32), net
        )
        assert windows.shape == (1, 3, 48, 32, 32)
        scripted = torch.jit.script(net)
        assert_close_to_scale(scripted(x), expected)
        assert_close_to_scale(torch.jit.trace(net, x, check_trace=False)(x), expected)
        scripted.train()
        train_out = scripted(x)
        plain = torch.jit.script(net.segmentation_network().eval())
        assert_close_to_scale(plain(x), expected)
    assert train_out.reconstruction.shape == (1, 4, 32, 32, 32) and train_out.seg.shape == (1, 3, 32, 32, 32)
