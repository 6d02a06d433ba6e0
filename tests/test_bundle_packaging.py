"""Bundles that travel: ``<name>_v<version>.zip``, downloaded and used where this repository does not exist.

The end-to-end test packages both bundles with weights at their default (paper) widths: espnet3d's 14 MB ride in
the zip, segresnet_vae's 72 MB are over the Model Zoo's 25 MB and go to ``large_files.json`` (with a ``file://``
URL standing in for the host). Then, in a fresh folder and through ``tests/fresh_environment.py`` (our packages and
PyYAML, which the requirements do not declare, not importable), it runs the commands a user would:
``monai.bundle download``, ``download_large_files``, ``monai.bundle run`` on a synthetic case, and
``monai.bundle.load`` of both bundles in one process. A quick test runs ``download_large_files`` alone.

Weights and their settings travel together: a bundle without weights is refused (one line on the command line) unless
``--allow_no_weights True``, which says so loudly; ``models/model_settings.json`` next to the weights goes into the
zip and its values become the packaged configs' defaults; training leftovers (resume checkpoints, the persistent
cache) stay behind. ``tests/test_model_settings.py`` packages a really trained bundle and runs it from the zip.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import assert_close_to_scale
from monai.bundle import ConfigParser

from brats_pipeline.bundle.settings import SETTINGS_NAME
from brats_pipeline.tools.packaging import (
    LARGE_FILES_NAME,
    REQUIRED_FILES,
    BundlePackagingError,
    apply_trained_settings,
    bundle_metadata,
    missing_required_files,
    package_bundle,
)
from brats_pipeline.tools.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[1]
BUNDLES = {name: REPO / "bundles" / name for name in ("segresnet_vae", "espnet3d")}
#: a fresh environment: this repository not importable, nor PyYAML, which the requirements do not declare
FRESH = [sys.executable, str(REPO / "tests" / "fresh_environment.py"), str(REPO), "--block", "yaml"]
BRATS2021_VALUES = {0, 1, 2, 4}

LOAD_BOTH = """
import json, torch, monai
report = {}
for name in ("segresnet_vae", "espnet3d"):
    net = monai.bundle.load(name, bundle_dir="./models", workflow_type="inference", device="cpu").eval()
    saved = torch.load(f"./models/{name}/models/model.pt", map_location="cpu", weights_only=True)
    x = torch.load(f"./input_{name}.pt")
    with torch.no_grad():
        y = net(x)
    torch.save(y, f"./output_{name}.pt")
    report[name] = {
        "class": type(net).__module__ + "." + type(net).__name__,
        "weights_equal": all(torch.equal(v, saved[k]) for k, v in net.state_dict().items()),
    }
import brats_pipeline, custom_networks
report["code"] = [brats_pipeline.__file__, custom_networks.__file__]
print("LOADED " + json.dumps(report))
"""


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_model_zoo_checks(name):
    """What the Model Zoo's CI checks before anything runs: required files, version present in the changelog."""
    assert missing_required_files(BUNDLES[name]) == []
    meta = bundle_metadata(BUNDLES[name])
    assert meta["name"] == name
    assert meta["version"] in meta["changelog"]


def _copy_bundle(tmp_path: Path, name: str = "espnet3d") -> Path:
    dst = tmp_path / name
    shutil.copytree(BUNDLES[name], dst, ignore=shutil.ignore_patterns("eval", "logs", "*.pt", "*.ts"))
    return dst


def test_version_missing_from_changelog_is_refused(tmp_path):
    bundle = _copy_bundle(tmp_path)
    meta_file = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["version"] = "9.9.9"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(BundlePackagingError, match=r"metadata\.json: version '9\.9\.9' has no entry in 'changelog'"):
        package_bundle(bundle, tmp_path / "dist")
    assert not (tmp_path / "dist" / "espnet3d_v9.9.9.zip").exists()


def test_missing_required_file_is_named(tmp_path):
    bundle = _copy_bundle(tmp_path)
    (bundle / "docs" / "data_license.txt").unlink()
    assert missing_required_files(bundle) == ["docs/data_license.txt"]
    with pytest.raises(BundlePackagingError, match="docs/data_license.txt"):
        package_bundle(bundle, tmp_path / "dist")


def test_large_weights_need_a_url_and_never_enter_the_zip(tmp_path):
    bundle = _copy_bundle(tmp_path)
    weights = tmp_path / "big.pt"
    weights.write_bytes(b"\0" * (2 * 2**20))
    with pytest.raises(BundlePackagingError, match=r"big\.pt: 2\.0 MB is over the 1 MB.*--weights_url"):
        package_bundle(bundle, tmp_path / "dist", weights=weights, max_file_mb=1)
    assert not list((tmp_path / "dist").glob("*.zip"))  # nothing half-written
    zip_path = package_bundle(
        bundle, tmp_path / "dist", weights=weights, weights_url="https://host/m.pt", max_file_mb=1
    )
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
        listing = json.loads(zf.read(f"espnet3d/{LARGE_FILES_NAME}"))
    assert LARGE_FILES_NAME == "large_files.json"
    assert "espnet3d/models/model.pt" not in names
    assert listing == {
        "large_files": [
            {
                "path": "models/model.pt",
                "url": "https://host/m.pt",
                "hash_val": hashlib.sha256(weights.read_bytes()).hexdigest(),
                "hash_type": "sha256",
            }
        ]
    }


def test_large_files_download_without_pyyaml(tmp_path):
    """``monai.bundle download_large_files`` on the unzipped bundle, in a fresh environment where ``import yaml``
    fails: it reads our ``large_files.json``, fetches the weights from a ``file://`` URL and checks their SHA-256."""
    bundle = _copy_bundle(tmp_path)
    (bundle / "large_files.yml").write_text("large_files: []\n")  # a stale YAML listing must not travel
    weights = tmp_path / "weights.pt"
    weights.write_bytes(os.urandom(3 * 2**19))  # 1.5 MB
    zip_path = package_bundle(bundle, tmp_path / "dist", weights=weights, weights_url=weights.as_uri(), max_file_mb=1)
    with zipfile.ZipFile(zip_path) as zf:
        assert {n for n in zf.namelist() if "large_files" in n} == {f"espnet3d/{LARGE_FILES_NAME}"}
        zf.extractall(tmp_path / "unzipped")
    probe = subprocess.run([*FRESH, "-c", "import yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "No module named 'yaml'" in probe.stderr
    cmd = [*FRESH, "-m", "monai.bundle", "download_large_files", "--bundle_path", "unzipped/espnet3d"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Verified 'model.pt', sha256" in out
    downloaded = tmp_path / "unzipped" / "espnet3d" / "models" / "model.pt"
    assert hashlib.sha256(downloaded.read_bytes()).hexdigest() == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_zip_layout(tmp_path):
    zip_path = package_bundle(BUNDLES["espnet3d"], tmp_path, allow_no_weights=True)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(zip_path.stat().st_mode) == 0o666 & ~umask  # as open() would make it, not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == [zip_path.name]  # no temporary file left behind
    meta = bundle_metadata(BUNDLES["espnet3d"])
    assert zip_path.name == f"espnet3d_v{meta['version']}.zip"
    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())
    assert {f"espnet3d/{rel}" for rel in REQUIRED_FILES} <= names
    assert "espnet3d/scripts/custom_networks/espnet3d.py" in names
    assert "espnet3d/scripts/brats_pipeline/transforms/labels.py" in names
    assert "espnet3d/scripts/brats_pipeline/__init__.py" in names
    # only what the bundle runs: no tools (synthetic data, ensembles, this packager), no other network, no benchmarks
    scripts = {n for n in names if "/scripts/" in n}
    assert not [n for n in scripts if "/tools/" in n or "benchmarks" in n or "segresnet_vae.py" in n], scripts
    assert "espnet3d/scripts/brats_pipeline/tools/__init__.py" not in names
    assert all(n.startswith("espnet3d/") for n in names)
    assert not any("__pycache__" in n or "/eval/" in n for n in names)


def _packager(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "brats_pipeline.tools.packaging", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_no_weights_refused_in_one_line_unless_allowed(tmp_path):
    bundle = _copy_bundle(tmp_path)
    (bundle / "models" / SETTINGS_NAME).write_text(json.dumps({"network_width": 8}))  # settings of no weights
    with pytest.raises(BundlePackagingError, match=r"no weights to package \(models/model\.pt does not exist\)"):
        package_bundle(bundle, tmp_path / "dist")
    refused = _packager(str(bundle), "--output_dir", "dist", cwd=tmp_path)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.splitlines() == [
        f"error: {bundle}: no weights to package (models/model.pt does not exist); train the bundle, pass --weights "
        "FILE, or pass --allow_no_weights True for a zip of configs and code only"
    ]
    assert not (tmp_path / "dist").exists()
    text = _packager(str(bundle), "--output_dir", "dist", "--allow_no_weights", "true", cwd=tmp_path)
    assert text.returncode == 1 and "--allow_no_weights true is not a boolean" in text.stderr
    allowed = _packager(str(bundle), "--output_dir", "dist", "--allow_no_weights", "True", cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    zip_name = f"dist/espnet3d_v{bundle_metadata(bundle)['version']}.zip"
    assert allowed.stdout == zip_name + "\n"  # the path, as before: scripts read it
    assert f"WARNING: {zip_name} HAS NO WEIGHTS (no models/model.pt)" in allowed.stderr
    with zipfile.ZipFile(tmp_path / zip_name) as zf:
        assert not [n for n in zf.namelist() if "/models/" in n]


def test_settings_travel_with_the_weights_and_become_the_defaults(tmp_path):
    bundle = _copy_bundle(tmp_path)
    (bundle / "models" / SETTINGS_NAME).write_text(json.dumps({"network_width": 64}))  # another run's: stays behind
    (bundle / "models" / "cases.json").write_text(json.dumps({"trained_on": ["other run"]}))
    run = tmp_path / "run" / "models"
    run.mkdir(parents=True)
    (run / "model.pt").write_bytes(b"weights")
    (run / "last_checkpoint_epoch=3.pt").write_bytes(b"resume state")
    (run / "cases.json").write_text(json.dumps({"trained_on": ["BraTS-GLI-00001-000"]}))
    trained = {
        "format": 1,
        "network_width": 8,
        "include_rc": True,
        "roi_size": [24, 24, 24],
        "brain_crop_margin": 2,
        "label_convention": "brats2023",
        "network_def": {"_target_": "custom_networks.espnet3d.ESPNet3D", "in_channels": 4, "bn_momentum": 0.9},
    }
    (run / SETTINGS_NAME).write_text(json.dumps(trained))
    (bundle / "cache").mkdir()
    (bundle / "cache" / "case.pt").write_bytes(b"cached")
    zip_path = package_bundle(bundle, tmp_path / "dist", weights=run / "model.pt")
    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())
        train = json.loads(zf.read("espnet3d/configs/train.json"))
        inference = json.loads(zf.read("espnet3d/configs/inference.json"))
        assert json.loads(zf.read(f"espnet3d/models/{SETTINGS_NAME}")) == trained
        assert json.loads(zf.read("espnet3d/models/cases.json")) == {"trained_on": ["BraTS-GLI-00001-000"]}
        assert zf.read("espnet3d/models/model.pt") == b"weights"
        untouched = zf.read("espnet3d/configs/multi_gpu_train.json")
    assert {n for n in names if "/models/" in n} == {
        f"espnet3d/models/{n}" for n in ("model.pt", SETTINGS_NAME, "cases.json")
    }
    assert not any("/cache/" in n for n in names)
    assert untouched == (bundle / "configs" / "multi_gpu_train.json").read_bytes()  # nothing to change: as shipped
    shipped_train = json.loads((bundle / "configs" / "train.json").read_text())
    assert (train["network_width"], train["include_rc"], train["roi_size"], train["brain_crop_margin"]) == (
        8, True, [24, 24, 24], 2,
    )  # fmt: skip
    assert train["network_def"]["bn_momentum"] == 0.9 and train["network_def"]["in_channels"] == 4
    assert train["network_def"]["channels"] == shipped_train["network_def"]["channels"]  # an expression: follows width
    assert train["label_convention"] == shipped_train["label_convention"]  # an expression: the dataset's
    assert inference["trained"]["defaults"]["network_width"] == 8  # the packaged inference.json's own default


def test_settings_file_named_on_the_command_line(tmp_path):
    bundle = _copy_bundle(tmp_path)
    (bundle / "models" / "model.pt").write_bytes(b"weights")
    (tmp_path / "w8.json").write_text(json.dumps({"network_width": 8}))
    zip_path = package_bundle(bundle, tmp_path / "dist", settings=tmp_path / "w8.json")
    with zipfile.ZipFile(zip_path) as zf:
        assert json.loads(zf.read(f"espnet3d/models/{SETTINGS_NAME}")) == {"network_width": 8}
        assert json.loads(zf.read("espnet3d/configs/train.json"))["network_width"] == 8
    with pytest.raises(BundlePackagingError, match=r"--settings .*nothing\.json: no such file"):
        package_bundle(bundle, tmp_path / "dist", settings=tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(BundlePackagingError, match=r"bad\.json: not valid JSON"):
        package_bundle(bundle, tmp_path / "dist", settings=tmp_path / "bad.json")


def test_weights_without_settings_keep_the_configs(tmp_path, caplog):
    bundle = _copy_bundle(tmp_path)
    (bundle / "models" / "model.pt").write_bytes(b"old weights")  # trained before model_settings.json existed
    zip_path = package_bundle(bundle, tmp_path / "dist")
    assert "no model_settings.json next to the weights" in caplog.text
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.read("espnet3d/configs/train.json") == (bundle / "configs" / "train.json").read_bytes()
        assert f"espnet3d/models/{SETTINGS_NAME}" not in zf.namelist()


def test_apply_trained_settings():
    config = {
        "network_width": 32,
        "trained": {
            "_target_": "brats_pipeline.bundle.settings.TrainedSettings",
            "ckpt_dir": "@ckpt_dir",
            "defaults": {"include_rc": False, "roi_size": [1], "brain_crop_margin": "@brain_crop_margin"},
        },
        "include_rc": "$@trained['include_rc']",
        "label_convention": "$@datalist['label_convention']",
        "roi_size": "@other",
        "network_def": {"_target_": "SegResNet", "init_filters": "@network_width", "blocks_down": [1, 2, 2, 4]},
        "normalize_intensity": {"_target_": "ScaleIntensityd", "keys": "image"},
    }
    settings = {
        "network_width": 8,
        "include_rc": True,
        "roi_size": [16, 16, 16],
        "brain_crop_margin": 3,
        "label_convention": "brats2021",
        "network_def": {"_target_": "SegResNetVAE2018", "init_filters": 8, "blocks_down": [1, 1, 1, 1]},
        "normalize_intensity": {"_target_": "NormalizeNonzeroIntensityd"},
    }
    before = json.loads(json.dumps(config))
    changed = apply_trained_settings(config, settings)
    assert changed == [
        "network_width",
        "trained#defaults#include_rc",
        "trained#defaults#roi_size",
        "network_def#blocks_down",
    ]
    assert config["network_width"] == 8 and config["trained"]["defaults"]["include_rc"] is True
    assert config["trained"]["defaults"]["roi_size"] == [16, 16, 16]
    assert config["trained"]["defaults"]["brain_crop_margin"] == "@brain_crop_margin"  # a reference: left alone
    assert config["network_def"] == {
        "_target_": "SegResNet",
        "init_filters": "@network_width",
        "blocks_down": [1, 1, 1, 1],
    }
    for key in ("include_rc", "label_convention", "roi_size", "normalize_intensity"):
        assert config[key] == before[key]


def _default_width_weights(name: str, path: Path) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(BUNDLES[name] / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    torch.save(net.state_dict(), path)
    return net.eval()


def _fresh(args: list[str], cwd: Path, timeout: int = 300) -> str:
    proc = subprocess.run([*FRESH, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_download_run_and_load_in_a_fresh_environment(tmp_path):
    dist, fresh = tmp_path / "dist", tmp_path / "project"
    fresh.mkdir()
    nets, zips = {}, {}
    for name in BUNDLES:
        nets[name] = _default_width_weights(name, tmp_path / f"{name}.pt")
        zips[name] = package_bundle(
            BUNDLES[name], dist, weights=tmp_path / f"{name}.pt", weights_url=(tmp_path / f"{name}.pt").as_uri()
        )
    with zipfile.ZipFile(zips["segresnet_vae"]) as zf:  # 72 MB at init 32: listed, not shipped
        assert "segresnet_vae/models/model.pt" not in zf.namelist()
    with zipfile.ZipFile(zips["espnet3d"]) as zf:
        assert "espnet3d/models/model.pt" in zf.namelist()

    for name, zip_path in zips.items():
        _fresh(
            ["-m", "monai.bundle", "download", "--name", name, "--url", zip_path.as_uri(), "--bundle_dir", "./models"],
            fresh,
        )
    assert not (fresh / "models/segresnet_vae/models/model.pt").exists()
    out = _fresh(["-m", "monai.bundle", "download_large_files", "--bundle_path", "models/segresnet_vae"], fresh)
    assert "Verified 'model.pt', sha256" in out

    # segment a case with each downloaded bundle (espnet3d's network is our code, from its scripts/)
    data = fresh / "data"
    generate_dataset(data, 1, "brats2021", (48, 40, 32), seed=3)
    (case_dir,) = [p for p in data.iterdir() if p.is_dir()]
    ref = nib.load(next(case_dir.glob("*_flair.nii.gz")))
    for name in BUNDLES:
        _fresh(
            ["-m", "monai.bundle", "run", "--config_file", f"models/{name}/configs/inference.json",
             "--bundle_root", f"models/{name}", "--dataset_dir", str(data)],
            fresh,
        )  # fmt: skip
        pred = nib.load(fresh / f"models/{name}/eval/predictions/{case_dir.name}.nii.gz")
        assert pred.shape == ref.shape
        np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-5)
        assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= BRATS2021_VALUES

    # both bundles through monai.bundle.load in one process: same weights, same outputs as the saved networks
    for name in nets:
        x = torch.randn(1, 4, 32, 32, 32, generator=torch.Generator().manual_seed(0))
        torch.save(x, fresh / f"input_{name}.pt")
    out = _fresh(["-c", LOAD_BOTH], fresh)
    report = json.loads(out.split("LOADED ", 1)[1].splitlines()[0])
    assert report["segresnet_vae"]["class"] == "monai.networks.nets.segresnet.SegResNet"
    assert report["espnet3d"]["class"] == "custom_networks.espnet3d.ESPNet3D"
    assert all(report[name]["weights_equal"] for name in BUNDLES)
    assert all(str(fresh / "models") in path for path in report["code"])  # the bundles' own copies of our code
    for name, net in nets.items():
        with torch.no_grad():
            expected = net(torch.load(fresh / f"input_{name}.pt"))
        # the loaded and in-process networks may take other oneDNN kernels (channels-last vs contiguous)
        assert_close_to_scale(torch.load(fresh / f"output_{name}.pt"), expected)
