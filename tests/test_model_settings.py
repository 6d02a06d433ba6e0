"""A model remembers how it was built: ``models/model_settings.json`` (:mod:`brats_pipeline.bundle.settings`).

In-process: the file's content, :func:`trained_setting`, :func:`check_trained_settings` on real argv lists and
:func:`config_arguments` on the shipped ``train.json``. End to end, for both bundles at tiny size (32^3 synthetic cases,
width 8, one epoch): ``python -m monai.bundle run training`` writes the file next to ``model.pt``; ``inference.json``
without ``--network_width`` loads the model and writes predictions, with a contradicting ``--network_width 16`` it ends
in one line naming the setting and both values; without the file (a model trained before it existed) a width mismatch
is one line naming the tensor, both shapes and the fix; ``evaluate.json`` runs without the override; and a packaged
zip keeps the trained width through ``monai.bundle download`` and ``run`` in a fresh environment.

The shipped configs are not edited here: every run merges a temporary overlay (:func:`wiring`) after the shipped
config, holding exactly the lines the configs are to carry.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from brats_pipeline.bundle import command_line
from brats_pipeline.bundle.settings import (
    SETTINGS_NAME,
    ModelSettingsError,
    ModelSettingsRecord,
    SettingsMismatchError,
    check_trained_settings,
    config_arguments,
    read_model_settings,
    settings_record,
    trained_setting,
)
from brats_pipeline.data.layouts import CHANNELS
from brats_pipeline.tools.packaging import package_bundle
from brats_pipeline.tools.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("segresnet_vae", "espnet3d")
SHAPE = (32, 32, 32)
ROI = {"segresnet_vae": [16, 16, 16], "espnet3d": [24, 24, 24]}
FRESH = [sys.executable, str(REPO / "tests" / "fresh_environment.py"), str(REPO), "--block", "yaml"]
ENV = {k: v for k, v in os.environ.items() if k != command_line.DEBUG_ENV} | {"OMP_NUM_THREADS": "1"}
MONAI_TRUST_WARNING = "parsing config_file "
PROGRESS_BAR = re.compile(r"^[^:]*: +\d+%\|")

# --- the config lines (what bundles/*/configs/{train,inference,evaluate}.json are to carry) ------------------------


def _arguments(config_id: str) -> dict[str, Any]:
    return {
        "_target_": "brats_pipeline.bundle.settings.config_arguments",
        "_requires_": "@bundle_code",
        "config_id": config_id,
    }


CHECKED = {k: f"@{k}" for k in ("network_width", "include_rc", "brain_crop_margin", "brain_crop_k_divisible")}
#: the keys that read ``@trained`` in each config
TRAINED_KEYS = {"inference": ("network_width", "include_rc", "sw_roi_size"), "evaluate": tuple(CHECKED)}


def shipped(bundle: str, name: str) -> dict[str, Any]:
    return json.loads((REPO / "bundles" / bundle / "configs" / f"{name}.json").read_text())


def wiring(bundle: str) -> dict[str, dict[str, Any]]:
    """The lines to add, per config file, as an overlay merged after the shipped file."""
    inference, evaluate = shipped(bundle, "inference"), shipped(bundle, "evaluate")
    return {
        "train": {
            "training_run#settings": {
                "network_width": "@network_width",
                "network_def": _arguments("network_def"),
                "normalize_intensity": _arguments("normalize_intensity"),
                "roi_size": "@roi_size",
                "brain_crop_margin": "@brain_crop_margin",
                "brain_crop_k_divisible": "@brain_crop_k_divisible",
                "label_convention": "@label_convention",
                "include_rc": "@include_rc",
            }
        },
        # inference.json and evaluate.json read every trained setting through one component (``trained``)
        "inference": {k: inference[k] for k in ("trained", *TRAINED_KEYS["inference"], "initialize")},
        "evaluate": {k: evaluate[k] for k in ("trained", *TRAINED_KEYS["evaluate"], "initialize")},
    }


def merged(config: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` merged into ``config`` as MONAI merges a later file: a top-level key replaces, ``a#b`` sets a
    nested value (kept as the key ``a#b`` when ``config`` has no ``a``: evaluate.json's ids of train.json items)."""
    out = copy.deepcopy(config)
    for key, value in overlay.items():
        *parents, last = key.split("#")
        node: Any = out
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.get(p)
            if node is None:
                node, last = out, key
                break
        node[last] = copy.deepcopy(value)
    return out


def test_wiring_differs_between_bundles_only_in_paper_keys():
    """The same lines in both bundles except the defaults that differ by paper (brain crop k, sliding window)."""
    a, b = (wiring(bundle) for bundle in BUNDLES)
    assert a["train"] == b["train"]
    for name in ("inference", "evaluate"):
        assert {k for k in a[name] if a[name][k] != b[name][k]} <= {"trained"}
        for key in TRAINED_KEYS[name]:
            assert a[name][key].startswith("$@trained["), (name, key)  # the shipped key reads the trained value
        da, db = a[name]["trained"]["defaults"], b[name]["trained"]["defaults"]
        assert {k for k in da if da[k] != db[k]} <= {"brain_crop_k_divisible", "roi_size"}
        assert any("@trained.check(" in s for s in a[name]["initialize"] if isinstance(s, str))


# --- in-process -----------------------------------------------------------------------------------------------------


def test_record_written_when_called(tmp_path):
    """The file's content; ``TrainingRun`` calls the record each time it writes ``model.pt``
    (``test_checkpointing.py``), not when training starts: it is no engine handler."""
    settings = {"network_width": 8, "roi_size": (16, 16, 16), "scale": np.float32(0.5), "t": torch.tensor(3)}
    assert settings_record(settings) == {
        "format": 1,
        "channels": list(CHANNELS),
        "network_width": 8,
        "roi_size": [16, 16, 16],
        "scale": 0.5,
        "t": 3,
    }
    record = ModelSettingsRecord(tmp_path / "models", settings)
    assert not hasattr(record, "attach")
    assert not (tmp_path / "models").exists()
    assert record() == tmp_path / "models" / SETTINGS_NAME
    written = json.loads((tmp_path / "models" / SETTINGS_NAME).read_text())
    assert written["network_width"] == 8 and written["channels"] == list(CHANNELS)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [SETTINGS_NAME]  # no temporary file left


def test_trained_setting_and_its_default(tmp_path):
    assert trained_setting(tmp_path, "network_width", 32) == 32  # no file: a model trained before it existed
    (tmp_path / SETTINGS_NAME).write_text(json.dumps({"network_width": 8, "include_rc": True}))
    assert trained_setting(tmp_path, "network_width", 32) == 8
    assert trained_setting(tmp_path, "include_rc", False) is True
    assert trained_setting(tmp_path, "roi_size", [128, 128, 128]) == [128, 128, 128]  # key not recorded
    assert trained_setting(None, "network_width", 32) == 32
    (tmp_path / SETTINGS_NAME).write_text("{not json")
    with pytest.raises(ModelSettingsError, match=r"model_settings\.json: not valid JSON") as info:
        read_model_settings(tmp_path)
    assert command_line.user_error_message(info.value).startswith(f"{tmp_path / SETTINGS_NAME}: not valid JSON")


def _argv(*overrides: str) -> list[str]:
    return ["run", "--config_file", "inference.json", *overrides]


def test_command_line_value_against_the_trained_one(tmp_path):
    values = {"network_width": 16, "include_rc": False, "brain_crop_margin": 0, "brain_crop_k_divisible": 8}
    # no settings file: nothing to compare against
    check_trained_settings(tmp_path, values, argv=_argv("--network_width", "16"))
    settings = settings_record(
        {
            "network_width": 8,
            "include_rc": False,
            "brain_crop_margin": 0,
            "brain_crop_k_divisible": 8,
            "network_def": {"_target_": "SegResNet", "init_filters": 8, "blocks_down": [1, 2, 2, 4]},
            "normalize_intensity": {"_target_": "brats_pipeline.transforms.preprocessing.NormalizeNonzeroIntensityd"},
        }
    )
    (tmp_path / SETTINGS_NAME).write_text(json.dumps(settings))
    with pytest.raises(SettingsMismatchError) as info:
        check_trained_settings(tmp_path, values, argv=_argv("--network_width", "16"))
    message = str(info.value)
    assert message == (
        f"--network_width 16 does not match the trained model: {tmp_path / 'model.pt'} was trained with "
        f"network_width 8; leave out --network_width to use the trained value (trained settings: "
        f"{tmp_path / SETTINGS_NAME})"
    )
    assert command_line.user_error_message(info.value) == message  # a CommandLineError: one line, status 1
    check_trained_settings(tmp_path, values)  # not on the command line (a value the user did not type): not compared
    check_trained_settings(tmp_path, {**values, "network_width": 8}, argv=_argv("--network_width", "8"))  # agrees
    check_trained_settings(tmp_path, values, enabled=False, argv=_argv("--network_width", "16"))  # no model loaded
    with pytest.raises(SettingsMismatchError, match=r"^2 settings do not match.*\(1\) --network_width 16.*"
                       r"\(2\) --include_rc True does not match.*include_rc False"):  # fmt: skip
        check_trained_settings(
            tmp_path, {**values, "include_rc": True}, argv=_argv("--network_width", "16", "--include_rc", "True")
        )
    with pytest.raises(SettingsMismatchError, match=r"--network_def#init_filters 16 does not match .* 8"):
        check_trained_settings(tmp_path, {}, argv=_argv("--network_def#init_filters", "16"))
    check_trained_settings(tmp_path, {}, argv=_argv("--network_def#init_filters", "$8"))  # expressions: at load time
    with pytest.raises(SettingsMismatchError, match="normalize_intensity ScaleIntensityd does not match"):
        from monai.transforms import ScaleIntensityd

        check_trained_settings(tmp_path, {}, normalize_intensity=ScaleIntensityd(keys="image"))
    (tmp_path / SETTINGS_NAME).write_text(json.dumps({**settings, "channels": ["flair", "t1", "t1c", "t2"]}))
    with pytest.raises(SettingsMismatchError, match=r"trained on channels \[\"flair\",\"t1\",\"t1c\",\"t2\"\]"):
        check_trained_settings(tmp_path, {})


def test_checkpoint_shapes_against_the_network(tmp_path):
    """Before the engine runs: the first tensor that does not fit, both shapes, and the width the shapes imply."""
    trained_net, net = torch.nn.Conv3d(4, 8, 3), torch.nn.Conv3d(4, 32, 3)
    torch.save(trained_net.state_dict(), tmp_path / "model.pt")
    check_trained_settings(tmp_path, {"network_width": 8}, network=trained_net)  # fits: nothing to say
    with pytest.raises(SettingsMismatchError) as info:
        check_trained_settings(tmp_path, {"network_width": 32}, network=net)
    assert str(info.value) == (
        f"checkpoint {tmp_path / 'model.pt'} does not fit Conv3d: weight has shape [8,4,3,3,3] in the checkpoint but "
        "[32,4,3,3,3] in the network (and 1 more tensors); by its shapes it was trained with --network_width 8: add "
        "--network_width 8 (set any other network override to the values it was trained with)"
    )
    # shapes that no single width explains: the general fix
    torch.save(torch.nn.Conv3d(3, 8, 3).state_dict(), tmp_path / "model.pt")
    with pytest.raises(SettingsMismatchError, match=r"\(and 1 more tensors\); set --network_width \(and any other"):
        check_trained_settings(tmp_path, {"network_width": 32}, network=net)
    # with the settings file: the trained values that differ, whatever set them (here an overlay, not the command line)
    (tmp_path / SETTINGS_NAME).write_text(json.dumps({"network_width": 8}))
    torch.save(trained_net.state_dict(), tmp_path / "model.pt")
    with pytest.raises(SettingsMismatchError, match=r"it was trained with network_width 8 \(not 32\): leave out"):
        check_trained_settings(tmp_path, {"network_width": 32}, network=net)
    torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "model.pt")
    with pytest.raises(SettingsMismatchError, match=r"2 missing tensors \(e.g. 'weight'\), 1 unexpected tensors"):
        check_trained_settings(tmp_path, {}, network=net)
    check_trained_settings(tmp_path, {}, network=net, enabled=False)  # no model loaded: nothing checked
    (tmp_path / "model.pt").unlink()
    check_trained_settings(tmp_path, {}, network=net)  # missing weights: CheckpointLoader says so itself


def test_args_file_values_are_command_line_values(tmp_path):
    (tmp_path / SETTINGS_NAME).write_text(json.dumps({"network_width": 8}))
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"network_width": 16, "dataset_dir": "/d"}))
    with pytest.raises(SettingsMismatchError, match="--network_width 16 does not match"):
        check_trained_settings(tmp_path, {"network_width": 16}, argv=_argv("--args_file", str(args)))


@pytest.mark.parametrize("bundle", BUNDLES)
def test_config_arguments_of_the_shipped_train_json(bundle):
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "train.json"))
    parser["network_width"] = 8
    parser["roi_size"] = ROI[bundle]
    parser["probe"] = {"net": _arguments("network_def"), "norm": _arguments("normalize_intensity")}
    probe = parser.get_parsed_content("probe")
    net, norm = probe["net"], probe["norm"]
    assert net["_target_"] == shipped(bundle, "train")["network_def"]["_target_"]
    assert "_requires_" not in net and net["in_channels"] == 4
    if bundle == "segresnet_vae":
        assert net["init_filters"] == 8 and net["out_channels"] == 3 and net["vae_input_size"] == ROI[bundle]
        assert norm == {
            "_target_": "brats_pipeline.transforms.preprocessing.NormalizeNonzeroIntensityd",
            "keys": "image",
        }
    else:
        assert net["channels"] == [4, 8, 32, 64] and net["out_channels"] == 4
        assert norm == {"_target_": "ScaleIntensityd", "keys": "image", "channel_wise": True}  # min-max to [0, 1]
    json.dumps(probe)  # plain JSON
    with pytest.raises(RuntimeError, match="must be built by a MONAI ConfigParser"):
        config_arguments("network_def")


# --- end to end: real monai.bundle processes ------------------------------------------------------------------------


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a failed run; nothing else on stderr but MONAI's warning and progress bars."""
    lines = [
        line
        for line in proc.stderr.splitlines()
        if line.strip() and not line.startswith(MONAI_TRUST_WARNING) and not PROGRESS_BAR.match(line)
    ]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def bundle_run(
    root: Path, bundle: str, name: str, *args: str, config_files: list[str] | None = None
) -> subprocess.CompletedProcess:
    files = config_files or [str(REPO / "bundles" / bundle / "configs" / f"{name}.json"), str(root / f"{name}.json")]
    run_id = ["training"] if name == "train" else []
    cmd = [sys.executable, "-m", "monai.bundle", "run", *run_id, "--config_file", str(files), "--num_workers", "0"]
    return subprocess.run([*cmd, *args], cwd=root, capture_output=True, text=True, timeout=600, env=ENV)


@pytest.fixture(scope="module", params=BUNDLES)
def trained(request, tmp_path_factory) -> dict[str, Any]:
    """One bundle trained at width 8 for one epoch on 32^3 synthetic cases, with the overlays of :func:`wiring`.

    ``bundle_dir`` is a copy of the bundle whose configs hold the wiring (for packaging) and whose ``models/`` the
    training filled (``--bundle_root``)."""
    bundle = request.param
    root = tmp_path_factory.mktemp(f"settings_{bundle}")
    lines = wiring(bundle)
    for name, overlay in lines.items():
        (root / f"{name}.json").write_text(json.dumps(overlay, indent=4))
    bundle_dir = root / bundle
    shutil.copytree(REPO / "bundles" / bundle, bundle_dir, ignore=shutil.ignore_patterns("eval", "cache", "*.pt"))
    for name, overlay in lines.items():
        (bundle_dir / "configs" / f"{name}.json").write_text(
            json.dumps(merged(shipped(bundle, name), overlay), indent=4)
        )
    generate_dataset(root / "train_data", 4, "brats2023", SHAPE, seed=0)
    generate_dataset(root / "new_cases", 1, "brats2023", SHAPE, seed=5, with_labels=False, start_index=9)
    args = ["--bundle_root", str(bundle_dir), "--dataset_dir", str(root / "train_data"), "--network_width", "8"]
    args += ["--epochs", "1", "--num_folds", "2", "--roi_size", json.dumps(ROI[bundle]).replace(" ", "")]
    args += ["--tensorboard", "False", "--progress", "False"]
    if bundle == "espnet3d":
        args += ["--batch_size", "1"]
    proc = bundle_run(root, bundle, "train", *args)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return {"bundle": bundle, "root": root, "bundle_dir": bundle_dir}


@pytest.mark.slow
def test_training_writes_the_settings_next_to_the_weights(trained):
    bundle, models = trained["bundle"], trained["bundle_dir"] / "models"
    assert (models / "model.pt").is_file()
    settings = json.loads((models / SETTINGS_NAME).read_text())
    expected_net = {"segresnet_vae": {"init_filters": 8, "out_channels": 3}, "espnet3d": {"channels": [4, 8, 32, 64]}}
    assert settings["format"] == 1 and settings["channels"] == list(CHANNELS)
    assert settings["network_width"] == 8
    assert settings["network_def"].items() >= expected_net[bundle].items()
    assert settings["network_def"]["_target_"] == shipped(bundle, "train")["network_def"]["_target_"]
    assert settings["normalize_intensity"]["_target_"] == shipped(bundle, "train")["normalize_intensity"]["_target_"]
    assert settings["roi_size"] == ROI[bundle]
    assert settings["brain_crop_margin"] == 0
    assert settings["brain_crop_k_divisible"] == shipped(bundle, "train")["brain_crop_k_divisible"]
    assert settings["label_convention"] == "brats2023" and settings["include_rc"] is False
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # still a raw state dict


@pytest.mark.slow
def test_inference_uses_the_trained_width(trained):
    """No ``--network_width``: the model trained at 8 loads (the configured default is 32) and segments."""
    bundle, root, bundle_dir = trained["bundle"], trained["root"], trained["bundle_dir"]
    proc = bundle_run(root, bundle, "inference", "--bundle_root", str(bundle_dir), "--dataset_dir", "new_cases")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "network_width = 8, as the model was trained" in proc.stdout + proc.stderr
    (case,) = [p for p in (root / "new_cases").iterdir() if p.is_dir()]
    pred = nib.load(bundle_dir / "eval" / "predictions" / f"{case.name}.nii.gz")
    assert pred.shape == SHAPE
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1, 2, 3}


@pytest.mark.slow
def test_conflicting_width_is_one_line(trained):
    bundle, root, bundle_dir = trained["bundle"], trained["root"], trained["bundle_dir"]
    proc = bundle_run(
        root, bundle, "inference", "--bundle_root", str(bundle_dir), "--dataset_dir", "new_cases",
        "--network_width", "16", "--overwrite", "True",
    )  # fmt: skip
    assert error_line(proc) == (
        f"error: --network_width 16 does not match the trained model: {bundle_dir}/models/model.pt was trained with "
        f"network_width 8; leave out --network_width to use the trained value (trained settings: "
        f"{bundle_dir}/models/{SETTINGS_NAME})"
    )
    # the same value as trained is accepted
    proc = bundle_run(
        root, bundle, "inference", "--bundle_root", str(bundle_dir), "--dataset_dir", "new_cases",
        "--network_width", "8", "--overwrite", "True",
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


#: the first tensor's shape at width 8 (checkpoint) and 32 (network)
FIRST_TENSOR = {
    "segresnet_vae": "convInit.conv.weight has shape [8,4,3,3,3] in the checkpoint but [32,4,3,3,3]",
    "espnet3d": "stem.conv.weight has shape [4,4,7,7,7] in the checkpoint but [16,4,7,7,7]",
}


@pytest.mark.slow
def test_old_model_without_settings_file_width_mismatch_is_one_line(trained, tmp_path):
    """A model.pt trained before the settings file existed: the default width does not fit, said in one line."""
    bundle, root = trained["bundle"], trained["root"]
    (tmp_path / "models").mkdir()
    shutil.copy(trained["bundle_dir"] / "models" / "model.pt", tmp_path / "models" / "model.pt")
    proc = bundle_run(root, bundle, "inference", "--bundle_root", str(tmp_path), "--dataset_dir", "new_cases")
    line = error_line(proc)
    assert line.startswith(f"error: checkpoint {tmp_path}/models/model.pt does not fit"), line
    assert FIRST_TENSOR[bundle] in line, line
    assert line.endswith(
        "; by its shapes it was trained with --network_width 8: add --network_width 8 (set any other network "
        "override to the values it was trained with)"
    ), line
    assert "size mismatch" not in proc.stdout  # said before the engine runs: Ignite logs no 200-line message
    # the fix works
    proc = bundle_run(
        root, bundle, "inference", "--bundle_root", str(tmp_path), "--dataset_dir", "new_cases", "--network_width", "8"
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert len(list((tmp_path / "eval" / "predictions").glob("*.nii.gz"))) == 1


@pytest.mark.slow
def test_evaluate_uses_the_trained_width(trained):
    bundle, root, bundle_dir = trained["bundle"], trained["root"], trained["bundle_dir"]
    configs = [
        str(REPO / "bundles" / bundle / "configs" / "train.json"),
        str(root / "train.json"),
        str(REPO / "bundles" / bundle / "configs" / "evaluate.json"),
        str(root / "evaluate.json"),
    ]
    args = ["--bundle_root", str(bundle_dir), "--dataset_dir", str(root / "train_data"), "--num_folds", "2"]
    proc = bundle_run(root, bundle, "evaluate", *args, "--progress", "False", config_files=configs)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "Restored all variables from" in proc.stdout  # model.pt, at the trained width
    scored = json.loads((bundle_dir / "eval" / "train_data-fold0" / "brats2023" / "metrics_summary.json").read_text())
    assert scored, "evaluate.json wrote no scores"
    proc = bundle_run(root, bundle, "evaluate", *args, "--network_width", "16", config_files=configs)
    assert "--network_width 16 does not match the trained model" in error_line(proc)


@pytest.mark.slow
def test_packaged_bundle_keeps_the_trained_width(trained, tmp_path):
    """The zip carries model_settings.json and configs whose defaults are the trained ones; downloaded into a fresh
    environment, its inference.json segments with no override."""
    bundle, root, bundle_dir = trained["bundle"], trained["root"], trained["bundle_dir"]
    zip_path = package_bundle(bundle_dir, tmp_path / "dist")
    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())
        configs = {n: json.loads(zf.read(f"{bundle}/configs/{n}.json")) for n in ("train", "inference", "evaluate")}
        settings = json.loads(zf.read(f"{bundle}/models/{SETTINGS_NAME}"))
    assert {f"{bundle}/models/model.pt", f"{bundle}/models/cases.json"} <= names
    assert not any("checkpoint_epoch" in n or "/cache/" in n or "/eval/" in n for n in names), sorted(names)
    assert settings["network_width"] == 8
    assert configs["train"]["network_width"] == 8 and configs["train"]["roi_size"] == ROI[bundle]
    assert configs["inference"]["trained"]["defaults"]["network_width"] == 8
    assert configs["inference"]["trained"]["defaults"]["roi_size"] == ROI[bundle]
    assert configs["evaluate"]["trained"]["defaults"]["network_width"] == 8

    project = tmp_path / "project"
    project.mkdir()
    for args in (
        ["-m", "monai.bundle", "download", "--name", bundle, "--url", zip_path.as_uri(), "--bundle_dir", "./models"],
        ["-m", "monai.bundle", "run", "--config_file", f"models/{bundle}/configs/inference.json",
         "--bundle_root", f"models/{bundle}", "--dataset_dir", str(root / "new_cases")],
    ):  # fmt: skip
        proc = subprocess.run([*FRESH, *args], cwd=project, capture_output=True, text=True, timeout=600, env=ENV)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (case,) = [p for p in (root / "new_cases").iterdir() if p.is_dir()]
    assert (project / "models" / bundle / "eval" / "predictions" / f"{case.name}.nii.gz").is_file()
