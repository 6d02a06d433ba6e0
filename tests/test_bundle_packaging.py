"""Bundles that travel: ``<name>_v<version>.zip``, downloaded and used where this repository does not exist.

The end-to-end test packages both bundles with weights at their default (paper) widths: espnet3d's 14 MB ride in
the zip, segresnet_vae's 72 MB are over the Model Zoo's 25 MB and go to ``large_files.json`` (with a ``file://``
URL standing in for the host). Then, in a fresh folder and through ``tests/fresh_environment.py`` (our packages and
PyYAML, which the requirements do not declare, not importable), it runs the commands a user would:
``monai.bundle download``, ``download_large_files``, ``monai.bundle run`` on a synthetic case, and
``monai.bundle.load`` of both bundles in one process. A quick test runs ``download_large_files`` alone.
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
from monai.bundle import ConfigParser

from brats_pipeline.bundle_packaging import (
    LARGE_FILES_NAME,
    REQUIRED_FILES,
    BundlePackagingError,
    bundle_metadata,
    missing_required_files,
    package_bundle,
)
from brats_pipeline.synthetic import generate_dataset

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
    zip_path = package_bundle(BUNDLES["espnet3d"], tmp_path)
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
    assert "espnet3d/scripts/brats_pipeline/labels.py" in names
    assert all(n.startswith("espnet3d/") for n in names)
    assert not any("__pycache__" in n or "/eval/" in n for n in names)


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
        torch.testing.assert_close(torch.load(fresh / f"output_{name}.pt"), expected, atol=1e-5, rtol=1e-5)
