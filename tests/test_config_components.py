"""The named components that replaced the configs' repeated blocks and multi-part ``$`` one-liners (0.4.0), each
against what it replaced: ``LoadCased`` against MONAI's loading chain (and its inverse), ``RegionsToLabeld`` /
``ClassesToLabeld`` against ``Lambdad`` of the array transforms, ``fold_split`` and ``parameter_groups`` against the
former expressions, ``TrainedSettings`` against ``trained_setting``, ``ScreenedCases`` against ``screen_cases`` with
a report, ``BratsInferer(amp="auto")`` against ``cpu_has_native_bf16``; and that the shipped configs use them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import CastToTyped, LoadImaged, Orientationd

from brats_pipeline.bundle.settings import SETTINGS_NAME, TrainedSettings, trained_setting
from brats_pipeline.data.datalist import find_cases, fold_split
from brats_pipeline.data.screening import CaseFailureReport, ScreenedCases, screen_cases
from brats_pipeline.inference.inferer import BratsInferer, cpu_has_native_bf16
from brats_pipeline.tools.synthetic import generate_dataset
from brats_pipeline.training.run import parameter_groups
from brats_pipeline.transforms.labels import (
    ClassesToLabel,
    ClassesToLabeld,
    RegionsToLabel,
    RegionsToLabeld,
    label_to_regions,
)
from brats_pipeline.transforms.preprocessing import LoadCased, ReorderChannelsd, ThreadedNibabelReader

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("segresnet_vae", "espnet3d")


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("components")
    generate_dataset(root, 2, "brats2021", (24, 20, 16), seed=3)
    return find_cases(root)


def test_load_case_is_monai_loading_chain_and_inverts_orientation(cases):
    keys = ["image", "label"]
    monai_chain = [
        LoadImaged(keys, reader=ThreadedNibabelReader(), ensure_channel_first=True),
        ReorderChannelsd("image"),
        Orientationd(keys, axcodes="RAS", labels=None),
        CastToTyped("label", dtype=np.uint8),
    ]
    expected = dict(cases[0])
    for t in monai_chain:
        expected = t(expected)
    load = LoadCased(keys, start_time_key="start")
    got = load(dict(cases[0]))
    for key in keys:
        assert got[key].dtype == expected[key].dtype and got[key].shape == expected[key].shape
        torch.testing.assert_close(got[key].as_tensor(), expected[key].as_tensor(), rtol=0, atol=0)
        np.testing.assert_array_equal(got[key].affine, expected[key].affine)
    assert got["label"].dtype == torch.uint8 and got["image"].dtype == torch.float32
    assert isinstance(got["start"], str) and float(got["start"]) > 0
    # the inverse returns an output (here the label itself, under the image key as Invertd passes it) to the file grid
    restored = load.inverse({"image": got["label"]})["image"]
    raw = LoadImaged("label", ensure_channel_first=True)(dict(cases[0]))["label"]
    np.testing.assert_array_equal(restored.numpy(), raw.numpy())
    np.testing.assert_array_equal(restored.affine, raw.affine)


def test_label_dict_transforms_write_back_or_to_names():
    regions = (torch.rand(3, 6, 5, 4) > 0.5).float()
    classes = torch.randint(0, 4, (1, 6, 5, 4)).float()
    out = RegionsToLabeld("pred", "brats2023", names="pred_label")({"pred": regions})
    assert torch.equal(out["pred"], regions)  # the regions stay for the metrics
    assert torch.equal(out["pred_label"], RegionsToLabel("brats2023")(regions))
    out = ClassesToLabeld("pred", "brats2018")({"pred": classes})
    assert torch.equal(out["pred"], ClassesToLabel("brats2018")(classes))
    with pytest.raises(ValueError, match="1 keys but 2 names"):
        RegionsToLabeld("pred", names=["a", "b"])


def test_fold_split_is_the_former_expressions():
    datalist = {"training": [{"case_id": str(i), "fold": i % 3} for i in range(7)], "validation": [{"case_id": "v"}]}
    split = fold_split(datalist, fold=1)
    assert split["training"] == [c for c in datalist["training"] if c["fold"] != 1]
    assert split["validation"] == [c for c in datalist["training"] if c["fold"] == 1] + datalist["validation"]
    everything = fold_split(datalist, fold=1, train_on_all=True)
    assert everything == {"training": datalist["training"] + datalist["validation"], "validation": []}


def test_parameter_groups_decay_only_convolution_kernels():
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 3, 3), torch.nn.GroupNorm(1, 3), torch.nn.Conv3d(3, 1, 1))
    decayed, free = parameter_groups(net, 1e-5)
    assert decayed["weight_decay"] == 1e-5 and free["weight_decay"] == 0.0
    assert [p.ndim for p in decayed["params"]] == [5, 5]
    assert len(decayed["params"]) + len(free["params"]) == len(list(net.parameters()))
    torch.optim.Adam(parameter_groups(net, 1e-5))  # the optimizer takes them


def test_trained_settings_read_the_file_with_defaults(tmp_path):
    defaults = {"network_width": 32, "include_rc": False, "roi_size": [160, 192, 128]}
    trained = TrainedSettings(tmp_path, defaults)
    assert dict(trained) == defaults  # no file: a model trained before it existed
    (tmp_path / SETTINGS_NAME).write_text(json.dumps({"format": 1, "network_width": 8, "include_rc": True}))
    assert dict(trained) == {k: trained_setting(tmp_path, k, v) for k, v in defaults.items()}
    assert trained["network_width"] == 8 and trained["include_rc"] is True and trained["roi_size"] == [160, 192, 128]
    trained.check(argv=["run", "--config_file", "x.json", "--network_width", "8"])  # agrees
    with pytest.raises(ValueError, match="--network_width 16 does not match the trained model"):
        trained.check(argv=["run", "--config_file", "x.json", "--network_width", "16"])
    trained.check(enabled=False, argv=["run", "--config_file", "x.json", "--network_width", "16"])


def test_screened_cases_screen_once_and_report(cases):
    bad = {"case_id": "broken", "image": ["/nowhere/a.nii.gz"] * 4}
    screened = ScreenedCases([*cases, bad])
    report = CaseFailureReport()
    assert screened.cases == screen_cases([*cases, bad], report=report)
    assert screened.cases is screened.cases  # screened once
    assert [f.case_id for f in screened.report.failures] == [f.case_id for f in report.failures] == ["broken"]


def test_inferer_auto_bf16_follows_the_cpu():
    net = torch.nn.Conv3d(1, 1, 1)
    x = torch.rand(1, 1, 4, 4, 4)
    seen = []
    net.register_forward_hook(lambda m, i, o: seen.append(torch.is_autocast_cpu_enabled()))
    BratsInferer(amp="auto")(x, net)
    assert seen == [cpu_has_native_bf16("cpu")]
    with pytest.raises(ValueError):
        BratsInferer(amp="sometimes")


@pytest.mark.parametrize("bundle", BUNDLES)
def test_shipped_configs_use_the_components(bundle):
    configs = {n: json.loads((REPO / "bundles" / bundle / "configs" / f"{n}.json").read_text()) for n in
               ("train", "inference", "evaluate")}  # fmt: skip
    assert configs["train"]["load_case"]["_target_"].endswith("LoadCased")
    assert configs["train"]["split"]["_target_"].endswith("fold_split")
    assert configs["train"]["to_label"]["_target_"].endswith("ToLabeld")
    assert configs["inference"]["preprocessing"]["transforms"][0]["_target_"].endswith("LoadCased")
    assert configs["inference"]["trained"]["_target_"].endswith("TrainedSettings")
    assert configs["inference"]["bf16_autocast"] == "auto"
    assert configs["evaluate"]["eval_cases"]["_target_"].endswith("ScreenedCases")
    for name in ("train", "inference", "evaluate"):
        head = configs[name]["initialize"][0]
        assert head == {"_target_": "brats_pipeline.bundle.command_line.guard_bundle_run", "_requires_": "@bundle_code"}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_validation_scores_the_regions_of_the_written_label_map(bundle, tiny_workflow):
    """The shipped validation postprocessing (also the quickstart's held-out table) gives the regions of the label
    map the bundle writes, which the challenge and ``brats-score`` score: segresnet_vae's sigmoid channels are nested
    first (a TC that misses ET voxels once scored TC 0.871 where the label map scored 0.819)."""
    workflow = tiny_workflow(bundle)
    post = workflow.parser.get_parsed_content("validate#postprocessing")
    to_label = workflow.parser.get_parsed_content("to_label")
    discretize = workflow.parser.get_parsed_content("discretize")
    channels = 3 if bundle == "segresnet_vae" else 4
    pred = torch.rand(channels, 12, 10, 8, generator=torch.Generator().manual_seed(0))
    if bundle == "segresnet_vae":
        pred[0, :6] = 0.0  # TC misses half of ET: the written map's TC holds it
        pred[2, :6] = 1.0
    label = label_to_regions(torch.randint(0, 4, (1, 12, 10, 8)), "brats2023")
    out = post({"pred": pred.clone(), "label": label})
    written = to_label(discretize({"pred": pred.clone()}))["pred_label"]
    expected = label_to_regions(written, "brats2023")
    assert torch.equal(torch.as_tensor(out["pred"]), expected)
    for i, region in enumerate(("tc", "wt", "et")):
        assert torch.equal(torch.as_tensor(out[f"pred_{region}"])[0], expected[i])
