"""3D-ESPNet (custom_networks.espnet3d / custom_networks.esp): size, shapes, ESP module, native resolution, TorchScript."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn
from monai.transforms import DivisiblePad

from custom_networks.esp import CBR, ESPBlock, PSPBlock, SPPBlock
from custom_networks.espnet3d import ESPNet3D

TINY = {"channels": (4, 8, 8, 16)}
REFERENCE_PARAMETERS = 3_626_584  # sacmehta/3D-ESPNet Model.py, ESPNet(classes=4, channels=4)


@pytest.fixture(autouse=True)
def one_thread():
    """Run on one intra-op thread, restored afterwards: these small convolutions are several times faster on
    one thread than on two when the CPU is shared (OpenMP threads spin-wait while the other is descheduled)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def calibrated(net: ESPNet3D, shape: tuple[int, ...], seed: int = 0) -> ESPNet3D:
    """One train-mode forward sets the BatchNorm running statistics (momentum 0.95), then eval mode."""
    torch.manual_seed(seed)
    net.train()
    with torch.no_grad():
        net(torch.randn(2, 4, *shape))
    return net.eval()


def test_parameter_count_matches_reference():
    net = ESPNet3D()
    count = n_params(net)
    print(f"ESPNet3D default parameters: {count:,}")
    assert 3_400_000 <= count <= 4_000_000
    assert count == REFERENCE_PARAMETERS
    assert n_params(ESPNet3D(upsample="deconv")) == REFERENCE_PARAMETERS  # 3x3x3 deconv has the CBR's weights
    assert n_params(ESPNet3D(psp_kernel_size=1)) == REFERENCE_PARAMETERS - 4 * 4 * 4 * (27 - 1)


@pytest.mark.parametrize("shape", [(64, 64, 64), (96, 80, 72)])
def test_output_shape_default_widths(shape):
    net = ESPNet3D().eval()
    with torch.inference_mode():
        out = net(torch.randn(1, 4, *shape))
    assert out.shape == (1, 4, *shape)
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_whole_volume_240x240x155_default_widths():
    net = ESPNet3D().eval()
    torch.manual_seed(0)
    x = torch.randn(1, 4, 240, 240, 155)
    start = time.perf_counter()
    with torch.inference_mode():
        out = net(x)
    print(f"ESPNet3D 1x4x240x240x155 forward: {time.perf_counter() - start:.1f} s on {torch.get_num_threads()} threads")
    assert out.shape == (1, 4, 240, 240, 155)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "in_ch,out_ch,stride,size,expected_size,residual",
    [
        (8, 8, 1, (9, 8, 7), (9, 8, 7), True),
        (8, 16, 1, (9, 8, 7), (9, 8, 7), False),
        (8, 16, 2, (9, 8, 7), (5, 4, 4), False),
        (16, 16, 2, (16, 12, 10), (8, 6, 5), False),
    ],
)
def test_esp_block_shapes_and_residual(in_ch, out_ch, stride, size, expected_size, residual):
    block = ESPBlock(in_ch, out_ch, stride=stride).eval()
    assert block.residual is residual
    x = torch.randn(2, in_ch, *size)
    assert block(x).shape == (2, out_ch, *expected_size)
    # with the branches zeroed and an identity merge BN, only the residual path is left: relu(x) or 0
    with torch.no_grad():
        for branch in block.branches:
            branch.conv.weight.zero_()
    out = block(x)
    if residual:
        torch.testing.assert_close(out, torch.relu(x))
    else:
        assert torch.count_nonzero(out) == 0


def test_esp_block_hierarchical_fusion():
    block = ESPBlock(6, 16, dilations=(1, 1, 2, 2)).eval()
    assert [b.conv.out_channels for b in block.branches] == [4, 4, 4, 4]
    assert [b.conv.dilation for b in block.branches] == [(1,) * 3, (1,) * 3, (2,) * 3, (2,) * 3]
    x = torch.randn(1, 6, 7, 6, 5)
    with torch.no_grad():
        r = block.reduce(x)
        b = [branch(r) for branch in block.branches]
        expected = torch.relu(block.bn(torch.cat([b[0], b[1], b[1] + b[2], b[1] + b[2] + b[3]], 1)))
        torch.testing.assert_close(block(x), expected)
    # widths that K does not divide: the first branch takes the remainder
    assert [b.conv.out_channels for b in ESPBlock(4, 10).branches] == [4, 2, 2, 2]


def test_cbr_spp_psp_blocks():
    cbr = CBR(3, 5, 3, stride=2)
    assert isinstance(cbr.conv, nn.Conv3d) and cbr.conv.bias is None and cbr.conv.padding == (1, 1, 1)
    assert isinstance(cbr.adn.N, nn.BatchNorm3d) and cbr.adn.N.momentum == 0.95 and cbr.adn.N.eps == 1e-3
    assert isinstance(cbr.adn.A, nn.ReLU)
    assert cbr(torch.randn(1, 3, 9, 8, 6)).shape == (1, 5, 5, 4, 3)

    spp = SPPBlock(4, kernel_sizes=(3, 5, 7, 9)).eval()
    assert [b.conv.kernel_size[0] for b in spp.branches] == [3, 5, 7, 9]
    assert all(b.conv.dilation == (1, 1, 1) for b in spp.branches)
    x = torch.randn(1, 4, 10, 9, 8)
    with torch.no_grad():
        expected = torch.relu(sum(b(x) for b in spp.branches) + x)
        torch.testing.assert_close(spp(x), expected)

    psp = PSPBlock(4, scales=(0.2, 0.4, 0.6, 0.8)).eval()
    y = psp(x)
    assert y.shape == (1, 20, 10, 9, 8)
    torch.testing.assert_close(y[:, :4], x)  # the input comes first, unchanged
    tiny = torch.randn(1, 4, 2, 2, 2)  # 0.2 * 2 rounds to 0: pooled to at least one voxel
    assert psp(tiny).shape == (1, 20, 2, 2, 2)


@pytest.mark.parametrize("upsample", ["trilinear", "deconv"])
def test_train_and_eval_same_sizes(upsample):
    net = ESPNet3D(**TINY, upsample=upsample)
    x = torch.randn(2, 4, 20, 18, 13)
    net.train()
    out_train = net(x)
    net.eval()
    with torch.no_grad():
        out_eval = net(x)
    assert out_train.shape == out_eval.shape == (2, 4, 20, 18, 13)
    out_train.mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_pads_like_divisible_pad_and_runs_at_native_resolution():
    net = ESPNet3D(**TINY).eval()
    x = torch.randn(1, 4, 21, 16, 11)
    seen: list[torch.Tensor] = []
    net.stem.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().clone()))
    with torch.no_grad():
        out = net(x)
    assert out.shape == (1, 4, 21, 16, 11)
    expected = DivisiblePad(k=8, method="symmetric")(x[0])  # MONAI's padding of the same image: 24 x 16 x 16
    assert seen[0].shape == (1, 4, 24, 16, 16)
    torch.testing.assert_close(seen[0][0], torch.as_tensor(expected), rtol=0, atol=0)
    assert net._pad_width([21, 16, 11]) == [2, 3, 0, 0, 1, 2]


@pytest.mark.parametrize("train", [False, True])
def test_every_stage_runs_at_native_resolution(train):
    """No resampling to a fixed grid (the reference resamples to 128^3 in eval): stage sizes follow the input."""
    net = ESPNet3D(**TINY).train(train)
    sizes: dict[str, tuple[int, ...]] = {}
    for name in ("stem", "down2", "down3", "psp", "head_out"):
        getattr(net, name).register_forward_hook(lambda mod, inp, out, n=name: sizes.update({n: tuple(out.shape[2:])}))
    with torch.set_grad_enabled(train):
        out = net(torch.randn(1, 4, 45, 33, 17))  # padded to 48 x 40 x 24
    assert out.shape == (1, 4, 45, 33, 17)
    assert sizes == {
        "stem": (24, 20, 12),
        "down2": (12, 10, 6),
        "down3": (6, 5, 3),
        "psp": (24, 20, 12),
        "head_out": (48, 40, 24),
    }


@pytest.mark.parametrize("upsample,head_mode", [("trilinear", "trilinear"), ("deconv", "nearest")])
def test_torchscript_matches_eager(upsample, head_mode):
    net = calibrated(ESPNet3D(**TINY, upsample=upsample, head_upsample_mode=head_mode), (24, 24, 24))
    scripted = torch.jit.script(net)
    for shape in [(24, 24, 24), (19, 26, 13)]:
        x = torch.randn(1, 4, *shape)
        with torch.no_grad():
            eager, script = net(x), scripted(x)
        assert script.shape == (1, 4, *shape)
        assert (eager - script).abs().max() <= 1e-4


def test_invalid_arguments():
    with pytest.raises(ValueError, match="esp_branches"):
        ESPNet3D(esp_branches=3)
    with pytest.raises(ValueError, match="upsample"):
        ESPNet3D(upsample="pixelshuffle")
    with pytest.raises(ValueError, match="channels"):
        ESPNet3D(channels=(16, 32, 128))
    with pytest.raises(ValueError, match="scales"):
        PSPBlock(4, scales=(0.0, 0.5))
