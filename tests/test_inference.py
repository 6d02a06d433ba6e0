"""BratsInferer: TTA, ensembles, sliding window, activations, padding, and the bundles' crop/invert chain."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.transforms import (
    AsDiscreted,
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    Invertd,
    Lambdad,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
)

from brats_pipeline.inference.inferer import BratsInferer, load_state_dict_file, segmentation_output
from brats_pipeline.transforms.labels import RegionsToLabel

nib = pytest.importorskip("nibabel")


class CountingConv3d(nn.Conv3d):
    """A conv that counts its forward calls and remembers the input shapes (its state_dict is a plain conv's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = getattr(self, "calls", 0) + 1
        self.shapes = [*getattr(self, "shapes", []), tuple(x.shape)]
        return super().forward(x)


def conv_net(in_ch: int = 4, out_ch: int = 3, kernel: int = 1, seed: int = 0) -> CountingConv3d:
    torch.manual_seed(seed)
    net = CountingConv3d(in_ch, out_ch, kernel, padding=kernel // 2)
    return net.eval()


def symmetric_net(seed: int = 0) -> nn.Conv3d:
    """3x3x3 conv whose kernel is mirror-symmetric along every axis: flip-equivariant by construction."""
    net = conv_net(kernel=3, seed=seed)
    with torch.no_grad():
        w = net.weight
        for dim in (2, 3, 4):
            w.copy_(0.5 * (w + torch.flip(w, [dim])))
    return net


class NeedsDivisible(nn.Module):
    """A pointwise network that refuses spatial sizes not divisible by ``k`` (like a 3-level U-Net)."""

    def __init__(self, net: nn.Module, k: int):
        super().__init__()
        self.net, self.k = net, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % self.k for s in x.shape[2:]):
            raise RuntimeError(f"spatial size {tuple(x.shape[2:])} not divisible by {self.k}")
        return self.net(x)


class TupleOutput(nn.Module):
    """Mimics MONAI's SegResNetVAE in eval mode: returns ``(seg, None)``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor):
        return self.net(x), None


@pytest.fixture
def image() -> torch.Tensor:
    return torch.randn(1, 4, 20, 18, 14, generator=torch.Generator().manual_seed(1))


def test_tta_equivariant_network_equals_plain(image):
    for net in (conv_net(), symmetric_net()):
        with torch.no_grad():
            plain = BratsInferer()(image, net)
            tta = BratsInferer(tta=True)(image, net)
        assert plain.shape == (1, 3, 20, 18, 14)
        torch.testing.assert_close(tta, plain, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(plain, torch.sigmoid(net(image)), atol=1e-6, rtol=1e-5)


def test_tta_non_equivariant_network_differs_and_matches_manual_mean(image):
    net = conv_net(kernel=3, seed=3)
    with torch.no_grad():
        plain = BratsInferer()(image, net)
        tta = BratsInferer(tta=True)(image, net)
        manual = torch.zeros_like(plain)
        for fx in (False, True):
            for fy in (False, True):
                for fz in (False, True):
                    dims = [d for d, f in zip((2, 3, 4), (fx, fy, fz), strict=True) if f]
                    out = torch.sigmoid(net(torch.flip(image, dims) if dims else image))
                    manual += torch.flip(out, dims) if dims else out
    assert (tta - plain).abs().max() > 1e-3
    torch.testing.assert_close(tta, manual / 8, atol=1e-6, rtol=1e-5)


def test_number_of_forwards(image):
    net = conv_net()
    with torch.no_grad():
        BratsInferer(tta=True)(image, net)
    assert net.calls == 8
    net.calls = 0
    with torch.no_grad():
        BratsInferer(tta=True, tta_flip_axes=(0, 2))(image, net)
    assert net.calls == 4
    net.calls = 0
    with torch.no_grad():
        BratsInferer()(image, net)
    assert net.calls == 1
    assert len(BratsInferer(tta=True).flip_sets) == 8 and BratsInferer(tta=True).flip_sets[0] == ()


def test_ensemble_of_identical_checkpoints_equals_one(image, tmp_path):
    net = conv_net(kernel=3, seed=4)
    torch.save(net.state_dict(), tmp_path / "a.pt")
    torch.save({"model": net.state_dict()}, tmp_path / "b.pt")
    with torch.no_grad():
        single = BratsInferer()(image, net)
        ens = BratsInferer(ensemble_checkpoints=[tmp_path / "a.pt", tmp_path / "b.pt"], include_given_network=False)
        net.calls = 0
        both = ens(image, net)
        given_calls = net.calls
        with_given = BratsInferer(ensemble_checkpoints=[str(tmp_path / "a.pt")])(image, net)
    torch.testing.assert_close(both, single, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(with_given, single, atol=1e-6, rtol=1e-5)
    assert given_calls == 0, "the given network is not a member when include_given_network=False"


def test_ensemble_of_different_checkpoints_is_mean_of_probabilities(image, tmp_path):
    net_a, net_b = conv_net(kernel=3, seed=5), conv_net(kernel=3, seed=6)
    torch.save(net_b.state_dict(), tmp_path / "b.pt")
    # a DataParallel-style checkpoint nested under "network"
    torch.save({"network": {f"module.{k}": v for k, v in net_a.state_dict().items()}}, tmp_path / "a.pt")
    with torch.inference_mode():
        pa, pb = torch.sigmoid(net_a(image)), torch.sigmoid(net_b(image))
        inferer = BratsInferer(ensemble_checkpoints=[tmp_path / "b.pt"], tta=True)
        given = conv_net(kernel=3, seed=5)
        ens = inferer(image, given)
        again = inferer(image, given)  # cached members, no reload
        only_files = BratsInferer(
            ensemble_checkpoints=[tmp_path / "a.pt", tmp_path / "b.pt"], include_given_network=False
        )
        files = only_files(image, conv_net(kernel=3, seed=99))
    assert given.calls == 16
    assert (pa - pb).abs().max() > 1e-2
    manual_tta = BratsInferer(tta=True)
    with torch.no_grad():
        expected = 0.5 * (manual_tta(image, net_a) + manual_tta(image, net_b))
    torch.testing.assert_close(ens, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(again, ens)
    torch.testing.assert_close(files, 0.5 * (pa + pb), atol=1e-6, rtol=1e-5)
    assert len(inferer.ensemble(given)) == 2


def test_ensemble_members_follow_mode_and_load_errors(image, tmp_path):
    net = nn.Sequential(nn.Conv3d(4, 3, 1), nn.Dropout3d(0.5))
    torch.save(net.state_dict(), tmp_path / "a.pt")
    inferer = BratsInferer(ensemble_checkpoints=[tmp_path / "a.pt"])
    net.eval()
    members = inferer.ensemble(net)
    assert not any(m.training for m in members)
    torch.save({"model": {"wrong": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match="Missing key"):
        BratsInferer(ensemble_checkpoints=[tmp_path / "bad.pt"])(image, net)
    assert set(load_state_dict_file(tmp_path / "a.pt")) == set(net.state_dict())
    with pytest.raises(ValueError, match="ensemble_checkpoints"):
        BratsInferer(include_given_network=False)


def test_sliding_window_equals_whole_for_pointwise_network(image):
    net = conv_net()
    with torch.no_grad():
        whole = BratsInferer(mode="whole")(image, net)
        sw = BratsInferer(mode="sliding_window", roi_size=(8, 8, 8), overlap=0.5, sw_mode="gaussian")(image, net)
        sw_tta = BratsInferer(mode="sliding_window", roi_size=(16, 8, 8), tta=True)(image, net)
    torch.testing.assert_close(sw, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sw_tta, whole, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="roi_size"):
        BratsInferer(mode="sliding_window")


def test_tuple_output_network_in_both_modes(image):
    net = conv_net()
    with torch.no_grad():
        ref = torch.sigmoid(net(image))
        for inferer in (BratsInferer(), BratsInferer(mode="sliding_window", roi_size=(8, 8, 8))):
            torch.testing.assert_close(inferer(image, TupleOutput(net)), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="Tensor"):
        segmentation_output({"seg": ref})


def test_softmax_vs_sigmoid(image):
    net = conv_net(out_ch=4, kernel=3, seed=7)
    with torch.no_grad():
        logits = net(image)
        soft = BratsInferer(activation="softmax")(image, net)
        sig = BratsInferer(activation="sigmoid")(image, net)
        raw = BratsInferer(activation="none")(image, net)
        soft_tta = BratsInferer(activation="softmax", tta=True)(image, net)
    torch.testing.assert_close(soft, torch.softmax(logits, 1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(soft.sum(1), torch.ones_like(soft[:, 0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(soft_tta.sum(1), torch.ones_like(soft[:, 0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(sig, torch.sigmoid(logits), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(raw, logits, atol=1e-6, rtol=1e-5)
    assert (sig.sum(1) - 1).abs().max() > 0.1
    with pytest.raises(ValueError, match="relu.*(Available options|Unsupported)"):
        BratsInferer(activation="relu")


def test_divisible_k_pads_and_crops_back(image):
    base = conv_net()
    net = NeedsDivisible(base, 8)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="divisible"):
            BratsInferer()(image, net)
        out = BratsInferer(divisible_k=8)(image, net)
        out_tta = BratsInferer(divisible_k=8, tta=True)(image, net)
        assert base.shapes[-1] == (1, 4, 24, 24, 16)
        ref = torch.sigmoid(base(image))
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)  # wrong crop offsets would misalign voxels
    torch.testing.assert_close(out_tta, ref, atol=1e-6, rtol=1e-5)


def test_metatensor_in_metatensor_out_and_amp(image):
    net = conv_net()
    meta_in = MetaTensor(image, affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    with torch.no_grad():
        out = BratsInferer()(meta_in, net)
        amp = BratsInferer(amp=True, amp_dtype="bfloat16")(image, net)
    assert isinstance(out, MetaTensor)
    torch.testing.assert_close(out.affine, meta_in.affine)
    assert amp.dtype == torch.float32
    torch.testing.assert_close(amp, torch.sigmoid(net(image)).detach(), atol=2e-2, rtol=0)


# --- the bundles' pre/post chain: crop to the brain, infer, paste back into the LPS input grid ---------------

AFFINE_LPS = np.array(
    [
        [-1.0, 0.0, 0.0, 30.0],
        [0.0, -1.2, 0.0, 50.0],
        [0.0, 0.0, 2.0, -10.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
SHAPE = (40, 36, 24)
BRAIN = (slice(4, 33), slice(7, 30), slice(3, 20))
WT_BOX = (slice(8, 18), slice(10, 20), slice(6, 14))  # off-centre, so a missed flip is caught
TC_BOX = (slice(10, 16), slice(12, 17), slice(8, 12))
ET_BOX = (slice(11, 13), slice(13, 15), slice(9, 11))


def write_case(folder) -> list[str]:
    """Four modality files (t1c, t1, t2, flair). Channel c (0..2) is bright in the box of region c (TC, WT, ET)."""
    rng = np.random.default_rng(0)
    files = []
    for channel, box in enumerate((TC_BOX, WT_BOX, ET_BOX, None)):
        vol = np.zeros(SHAPE, np.int16)
        vol[BRAIN] = rng.integers(120, 180, size=vol[BRAIN].shape)
        if box is not None:
            vol[box] = 1000
        path = folder / f"case-{channel}.nii.gz"
        nib.save(nib.Nifti1Image(vol, AFFINE_LPS), path)
        files.append(str(path))
    return files


class Oracle(nn.Module):
    """Region c logit = gain * (normalised channel c - threshold): recovers the boxes from the input."""

    def __init__(self, threshold: float = 2.0, gain: float = 20.0):
        super().__init__()
        self.threshold, self.gain = threshold, gain
        self.weight = nn.Parameter(torch.zeros(1))  # a parameter, so the evaluator can find a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * (x[:, :3] - self.threshold) + self.weight


def test_crop_infer_invert_chain_restores_input_grid(tmp_path):
    files = write_case(tmp_path)
    preprocessing = Compose(
        [
            LoadImaged(keys="image"),
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes="RAS"),
            CropForegroundd(keys="image", source_key="image", margin=2, k_divisible=8),
            NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        ]
    )
    postprocessing = Compose(
        [
            Lambdad(keys="pred", func=lambda p: p),  # probabilities already: no activation here
            Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False),
            AsDiscreted(keys="pred", threshold=0.5),
            Lambdad(keys="pred", func=RegionsToLabel("brats2018")),
        ]
    )
    loader = DataLoader(Dataset([{"image": files, "case_id": "case"}], transform=preprocessing), batch_size=1)
    network = Oracle()
    inferer = BratsInferer(activation="sigmoid", tta=True, divisible_k=16)
    shapes = []
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader,
        network=network,
        inferer=lambda x, net: shapes.append(tuple(x.shape)) or inferer(x, net),
        postprocessing=postprocessing,
    )
    evaluator.run()
    pred = evaluator.state.output[0]["pred"]

    assert shapes[0][2:] != SHAPE and all(s % 8 == 0 for s in shapes[0][2:]), "the inferer sees the cropped volume"
    assert tuple(pred.shape) == (1, *SHAPE)
    assert pred.dtype == torch.uint8
    np.testing.assert_allclose(np.asarray(pred.affine), AFFINE_LPS, atol=1e-5)
    expected = np.zeros(SHAPE, np.uint8)
    expected[WT_BOX], expected[TC_BOX], expected[ET_BOX] = 2, 1, 4
    np.testing.assert_array_equal(pred[0].numpy(), expected)


def test_monai_segresnet_family(image):
    from monai.networks.nets import SegResNet, SegResNetVAE

    torch.manual_seed(0)
    seg = SegResNet(spatial_dims=3, init_filters=8, in_channels=4, out_channels=3, blocks_down=(1, 1, 1, 1)).eval()
    vae = SegResNetVAE(input_image_size=(16, 16, 16), init_filters=8, in_channels=4, out_channels=3).eval()
    with torch.no_grad():
        with pytest.raises(RuntimeError):  # 20x18x14 is not divisible by 8: the decoder's skip sums fail
            BratsInferer()(image, seg)
        out = BratsInferer(divisible_k=8, tta=True)(image, seg)
        windows = BratsInferer(mode="sliding_window", roi_size=(16, 16, 16), tta=True, tta_flip_axes=(0,))(image, vae)
    assert out.shape == windows.shape == (1, 3, 20, 18, 14)
    assert 0 <= float(out.min()) and float(out.max()) <= 1 and 0 <= float(windows.min()) and float(windows.max()) <= 1


def test_compile_lever_reuses_one_compiled_wrapper_with_the_same_weights(image):
    """``compile=True`` runs the members through ``torch.compile`` (here its ``eager`` backend, which traces with
    Dynamo but skips code generation, to stay fast): same probabilities, one wrapper per member, reused."""
    net = symmetric_net()
    plain = BratsInferer(tta=True)(image, net)
    inferer = BratsInferer(tta=True, compile=True, compile_kwargs={"backend": "eager"})
    torch._dynamo.reset()
    compiled = inferer(image, net)
    torch.testing.assert_close(compiled, plain, atol=1e-6, rtol=1e-6)
    (wrapper,) = list(inferer._compiled.values())
    assert isinstance(wrapper, torch._dynamo.eval_frame.OptimizedModule) and wrapper._orig_mod is net
    inferer(image, net)
    assert list(inferer._compiled.values()) == [wrapper]  # compiled once, reused
    with torch.no_grad():
        net.weight.mul_(2.0)  # the wrapper shares the weights: a checkpoint loaded into net reaches it
    torch.testing.assert_close(inferer(image, net), BratsInferer(tta=True)(image, net), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------- test_scales


def affine_ramp(shape=(1, 4, 20, 18, 14), seed: int = 2) -> torch.Tensor:
    """Per channel an affine function of the normalised voxel coordinates: trilinear resizing with
    ``align_corners=True`` reproduces it exactly at any size."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.meshgrid(*[torch.linspace(0.0, 1.0, n) for n in shape[2:]], indexing="ij")
    a = torch.randn(shape[1], 4, generator=g)
    out = torch.stack(
        [a[c, 0] + a[c, 1] * coords[0] + a[c, 2] * coords[1] + a[c, 3] * coords[2] for c in range(shape[1])]
    )
    return out.unsqueeze(0)


def test_test_scales_scale_equivariant_network_equals_plain():
    """A pointwise linear network on an affine ramp is scale-equivariant (resize, forward, resize back gives the
    native logits), so averaging any scales changes nothing; the network sees each scale's size."""
    x = affine_ramp()
    net = conv_net()
    with torch.no_grad():
        plain = BratsInferer()(x, net)
        net.calls, net.shapes = 0, []
        multi = BratsInferer(test_scales=[None, 24, [16, 20, 12], "native"])(x, net)
    torch.testing.assert_close(multi, plain, atol=1e-5, rtol=1e-5)
    assert net.calls == 4
    assert [s[2:] for s in net.shapes] == [(20, 18, 14), (24, 24, 24), (16, 20, 12), (20, 18, 14)]


def test_test_scales_average_logits_of_two_scales_equals_manual():
    """Native + 24^3 on a non-equivariant network: the output is the activation of the mean of the native logits
    and the 24^3 logits resized back (trilinear, align_corners), for sigmoid and softmax alike; with TTA each flip
    averages its own two scales."""
    x = torch.randn(1, 4, 20, 18, 14, generator=torch.Generator().manual_seed(5))
    net = conv_net(kernel=3, seed=4)
    with torch.no_grad():
        native = net(x)
        up = F.interpolate(
            net(F.interpolate(x, size=(24, 24, 24), mode="trilinear", align_corners=True)),
            size=(20, 18, 14),
            mode="trilinear",
            align_corners=True,
        )
        mean_logits = (native + up) / 2
        for activation, act in (("sigmoid", torch.sigmoid), ("softmax", lambda t: torch.softmax(t, 1))):
            out = BratsInferer(activation=activation, test_scales=[None, [24, 24, 24]])(x, net)
            torch.testing.assert_close(out, act(mean_logits), atol=1e-6, rtol=1e-5)
            assert (out - BratsInferer(activation=activation)(x, net)).abs().max() > 1e-3
            # logits are averaged, not probabilities
            assert (out - (act(native) + act(up)) / 2).abs().max() > 1e-4
        tta = BratsInferer(tta=True, tta_flip_axes=(1,), test_scales=[None, 24])(x, net)
        flipped = torch.flip(x, [3])
        f_native = net(flipped)
        f_up = F.interpolate(
            net(F.interpolate(flipped, size=(24, 24, 24), mode="trilinear", align_corners=True)),
            size=(20, 18, 14),
            mode="trilinear",
            align_corners=True,
        )
        manual = (torch.sigmoid(mean_logits) + torch.flip(torch.sigmoid((f_native + f_up) / 2), [3])) / 2
    torch.testing.assert_close(tta, manual, atol=1e-6, rtol=1e-5)


def test_test_scales_area_mode_is_adaptive_average_pooling_and_sliding_window():
    """``scale_mode="area"`` resizes the input as the 3D-ESPNet reference does (``adaptive_avg_pool3d``); the scales
    work in sliding-window mode and for ensembles (forwards = members x flips x scales)."""
    x = torch.randn(1, 4, 20, 18, 14, generator=torch.Generator().manual_seed(6))
    net = conv_net(kernel=3, seed=7)
    with torch.no_grad():
        out = BratsInferer(activation="none", test_scales=[[8, 8, 8]], scale_mode="area")(x, net)
        pooled = net(F.adaptive_avg_pool3d(x, (8, 8, 8)))
        manual = F.interpolate(pooled, size=(20, 18, 14), mode="trilinear", align_corners=True)
        torch.testing.assert_close(out, manual, atol=1e-6, rtol=1e-5)
        pointwise = conv_net()
        whole = BratsInferer(test_scales=[None, 16])(x, pointwise)
        pointwise.calls = 0
        windows = BratsInferer(mode="sliding_window", roi_size=(8, 8, 8), overlap=0.0, test_scales=[None, 16])(
            x, pointwise
        )
    torch.testing.assert_close(windows, whole, atol=1e-5, rtol=1e-5)
    assert pointwise.calls > 2  # several windows per scale


def test_test_scales_forward_count_with_ensemble_and_tta(image, tmp_path):
    net = conv_net()
    path = tmp_path / "member.pt"
    torch.save(conv_net(seed=9).state_dict(), path)
    inferer = BratsInferer(tta=True, tta_flip_axes=(0,), ensemble_checkpoints=[path], test_scales=["native", 16, 24])
    calls = [0]
    net.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    with torch.no_grad():
        out = inferer(MetaTensor(image), net)
    assert calls[0] == 2 * 2 * 3  # members x flips x scales (the member copy keeps the hook)
    assert isinstance(out, MetaTensor) and out.shape == (1, 3, 20, 18, 14)


@pytest.mark.parametrize(
    "scales, expected",
    [
        (None, [None]),
        ([], [None]),
        ("native", [None]),
        (144, [144]),
        ([None, 144], [None, 144]),
        (["native", [144, 144, 144]], [None, (144, 144, 144)]),
        ([None, [96, 128, 144], "Original"], [None, (96, 128, 144), None]),
    ],
)
def test_normalize_test_scales(scales, expected):
    from brats_pipeline.inference.inferer import normalize_test_scales

    assert normalize_test_scales(scales) == expected


@pytest.mark.parametrize("scales", [[0], [[144, 0, 144]], ["big"], [1.5], [[]], [True]])
def test_bad_test_scales_raise(scales):
    with pytest.raises(ValueError, match="test_scales"):
        BratsInferer(test_scales=scales)


def _adaptive_average_by_hand(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Adaptive average pooling of ``x`` ``(B, C, *spatial)`` written out: output voxel ``i`` of an axis of length
    ``n`` averages input voxels ``floor(i n / m)`` to ``ceil((i + 1) n / m) - 1`` (PyTorch's windows)."""
    out = torch.empty((*x.shape[:2], *size))
    windows = [
        [(i * n // m, -(-(i + 1) * n // m)) for i in range(m)] for n, m in zip(x.shape[2:], size, strict=True)
    ]
    for i, (a0, a1) in enumerate(windows[0]):
        for j, (b0, b1) in enumerate(windows[1]):
            for k, (c0, c1) in enumerate(windows[2]):
                out[:, :, i, j, k] = x[:, :, a0:a1, b0:b1, c0:c1].mean(dim=(2, 3, 4))
    return out


def test_test_scale_with_its_own_mode_pools_as_the_reference():
    """``{"size": ..., "mode": "area"}``: the network sees the input adaptive-average-pooled to that size, as the
    3D-ESPNet reference's ``inp_res`` pools it (``Model.py``: ``F.adaptive_avg_pool3d``); checked against the pooling
    computed by hand, for a size that divides the input and one that does not. Plain entries keep ``scale_mode``."""
    x = torch.rand(1, 2, 12, 7, 10, generator=torch.Generator().manual_seed(0))
    seen: list[torch.Tensor] = []

    def net(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.clone())
        return torch.zeros(t.shape[0], 3, *t.shape[2:])

    scales = ["native", {"size": [6, 3, 5], "mode": "area"}, {"size": [5, 4, 3], "mode": "area"}, [6, 3, 5]]
    inferer = BratsInferer(test_scales=scales, activation="none")
    assert inferer.scale_modes == ["trilinear", "area", "area", "trilinear"]
    inferer(x, net)
    assert torch.equal(seen[0], x)
    for got, size in zip(seen[1:3], [(6, 3, 5), (5, 4, 3)], strict=True):
        torch.testing.assert_close(got, _adaptive_average_by_hand(x, size), rtol=1e-6, atol=1e-6)
    trilinear = torch.nn.functional.interpolate(x, size=(6, 3, 5), mode="trilinear", align_corners=True)
    torch.testing.assert_close(seen[3], trilinear)
    with pytest.raises(ValueError, match="cubic"):
        BratsInferer(test_scales=[{"size": 8, "mode": "cubic"}])
    with pytest.raises(ValueError, match="'size' and optionally 'mode'"):
        BratsInferer(test_scales=[{"mode": "area"}])


def test_scale_of_wrong_rank_and_bad_mode_raise(image):
    with pytest.raises(ValueError, match="spatial dims"):
        BratsInferer(test_scales=[[16, 16]])(image, conv_net())
    with pytest.raises(ValueError, match="cubic.*(Available options|Unsupported)"):
        BratsInferer(scale_mode="cubic")


@pytest.mark.parametrize("bundle", ["segresnet_vae", "espnet3d"])
def test_shipped_inference_workers_only_with_cuda(bundle, monkeypatch):
    """inference.json's ``num_workers``: loader processes prefetch the next case while a GPU runs the network; without
    CUDA the network uses every core and the workers only competed for them (docs/performance.md), so none."""
    import json
    import os
    from pathlib import Path

    from brats_pipeline.bundle.workflows import bundle_workflow

    if not torch.cuda.is_available():
        assert bundle_workflow(bundle, "inference.json").parser.get_parsed_content("num_workers") == 0
    config = Path(__file__).resolve().parents[1] / "bundles" / bundle / "configs" / "inference.json"
    expression = json.loads(config.read_text())["num_workers"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert eval(expression[1:], {"os": os, "torch": torch}) == 2  # the shipped expression on a GPU machine
