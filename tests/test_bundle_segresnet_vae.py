"""End-to-end tests of the ``bundles/segresnet_vae`` MONAI bundle, the way a user runs it.

The bundle commands run as real ``python -m monai.bundle run ...`` subprocesses on the tiny synthetic BraTS 2023
dataset of ``conftest.py`` (32^3, 4 labelled cases -> 2 folds of 2, 2 unlabelled cases), with the shipped configs
plus a small overlay written in ``tmp_path`` (``conftest.TINY_OVERRIDES``: ``num_workers`` 0, cached data, 32^3
crops). One training run (``run training`` from the repository root, ``--network_def#init_filters 8 --epochs 2`` on
the command line over the overlay's width 16 and 5 epochs) is shared by the module: its checkpoints feed the
evaluation, the inference and the TorchScript export. A second, one-epoch training starts from inside the bundle
folder with the default ``run`` id. Every run gets ``--bundle_root`` in ``tmp_path``, so nothing is written into the
repository; the derivation of ``bundle_root`` from the command line (what happens without ``--bundle_root``) is
unit-tested on argv lists.

``verify_net_in_out``, ``ckpt_export`` and ``verify_metadata`` go through python-fire in this process, on the very
functions ``python -m monai.bundle`` dispatches to (``monai/bundle/__main__.py`` is ``fire.Fire()`` over them), which
saves ~15 s of imports per command. The subprocesses run with ``OMP_NUM_THREADS=1``: on a shared 2-core machine the
tiny 3-D convolutions run about twice as fast on one thread.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, assert_close_to_scale
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle import __main__ as monai_bundle_main
from monai.bundle.scripts import _get_fake_spatial_shape
from monai.networks.nets import SegResNet
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from brats_pipeline.data.datalist import build_datalist
from brats_pipeline.tools.synthetic import generate_dataset
from brats_pipeline.transforms.labels import get_convention, regions_to_label
from custom_networks.segresnet_vae import VAE_PREFIX, SegResNetVAE2018

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "segresnet_vae"
CONFIGS = BUNDLE / "configs"
TRAIN, EVALUATE, INFERENCE, METADATA = (CONFIGS / f"{n}.json" for n in ("train", "evaluate", "inference", "metadata"))
MODEL_CARD = BUNDLE / "docs" / "README.md"
SCHEMA = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"
REAL_CASE = REPO.parent / "shared" / "data" / "BraTS-GLI-00001-000"  # as the real_case fixture of conftest.py
#: one intra-op thread per run: two runs share the two cores, and tiny 3-D convolutions run faster on one thread
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

TINY = TINY_OVERRIDES["segresnet_vae"]
ROI = TINY["roi_size"]
WIDTH = TINY["network_width"]  # given on the command line; GroupNorm(8 groups) needs a multiple of 8
OVERLAY_WIDTH = 16  # what the command line must override
EPOCHS = 2  # given on the command line
OVERLAY_EPOCHS = 5  # what the command line must override
NUM_FOLDS = TINY["num_folds"]
TRAIN_CASES = 2  # 4 labelled cases in 2 folds: fold 0 validates, fold 1 trains
BRATS2023_VALUES = set(get_convention("brats2023").values)
#: the arguments of the plain SegResNet the bundle ships (inference.json's network_def), at the test width
SEGRESNET_ARGS = {k: v for k, v in json.loads(INFERENCE.read_text())["network_def"].items() if not k.startswith("_")}
SEGRESNET_ARGS["init_filters"] = WIDTH
SEGRESNET_ARGS["out_channels"] = 3  # "$3 + int(@include_rc)" in the file: the three BraTS regions


# ------------------------------------------------------------------------------------------------- helpers


def repo_relative(path: Path) -> str:
    return str(path.relative_to(REPO))


def config_list(*files: Path | str) -> str:
    """The ``--config_file "['a.json','b.json']"`` form (merged in order)."""
    return str([str(f) for f in files])


class BundleRun:
    """One ``python -m monai.bundle <args>`` subprocess; its stdout and stderr go to ``<log_dir>/<name>.log``."""

    def __init__(self, name: str, *args: str, cwd: Path = REPO) -> None:
        self.name, self.args, self.cwd = name, list(args), cwd
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.output = ""
        self.seconds = 0.0
        self.not_started = "never started"

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "monai.bundle", *self.args]

    def start(self, log_dir: Path) -> BundleRun:
        self.log_file = log_dir / f"{self.name}.log"
        with open(self.log_file, "w") as log:
            self.proc = subprocess.Popen(self.command, cwd=self.cwd, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        self.started_at = time.time()
        return self

    def wait(self, timeout: float = 600) -> BundleRun:
        if self.proc is not None and self.returncode is None:
            try:
                self.returncode = self.proc.wait(timeout=timeout)
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait()
            self.seconds = self.log_file.stat().st_mtime - self.started_at  # its last output, not when we waited
            self.output = self.log_file.read_text()
        return self

    def check(self) -> str:
        """Assert the run exited with status 0; return its output."""
        assert self.proc is not None, f"{self.name}: {self.not_started}"
        self.wait()
        assert self.returncode == 0, f"{self.command} (cwd {self.cwd}) exited {self.returncode}:\n{self.output[-6000:]}"
        return self.output


def fire_bundle(*argv: str):
    """``python -m monai.bundle <argv>`` in this process: python-fire over the functions ``monai.bundle.__main__``
    exposes, so the command line is parsed exactly as by the real entry point."""
    commands = {n: getattr(monai_bundle_main, n) for n in ("verify_net_in_out", "ckpt_export", "verify_metadata")}
    return fire.Fire(commands, command=list(argv), name="monai.bundle")


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in the TensorBoard event files of ``log_dir``: tag -> [(step, value), ...]."""
    tags: dict[str, list[tuple[int, float]]] = {}
    for event_file in sorted(log_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            tags.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return tags


def assert_label_map(pred_file: Path, image_file: Path, k_divisible: int = 8) -> np.ndarray:
    """A written prediction: the input's shape and affine, uint8 on disk, BraTS 2023 values only, and tumor only
    inside the brain's bounding box (CropForegroundd, extended to a multiple of ``k_divisible``). Returns the data."""
    pred, image = nib.load(pred_file), nib.load(image_file)
    assert pred.shape == image.shape
    np.testing.assert_allclose(pred.affine, image.affine, atol=1e-5)
    assert pred.get_data_dtype() == np.uint8
    data = np.asarray(pred.dataobj)
    assert set(np.unique(data).tolist()) <= BRATS2023_VALUES
    brain = np.asarray(image.dataobj) > 0
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        inside = np.flatnonzero(brain.any(axis=other))
        tumor = np.flatnonzero((data > 0).any(axis=other))
        if tumor.size:
            assert tumor.min() >= inside.min() - (k_divisible - 1) and tumor.max() <= inside.max() + (k_divisible - 1)
    return data


def image_of(case_dir: Path) -> Path:
    return case_dir / f"{case_dir.name}-t1c.nii.gz"


def save_random_segresnet(path: Path, seed: int = 0) -> Path:
    """An untrained plain SegResNet (the shipped architecture at width 8) as a raw state dict, like model.pt."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = SegResNet(**SEGRESNET_ARGS)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bundle_segresnet_vae")


@pytest.fixture(scope="module")
def overlay(work: Path, synthetic_dataset: Path) -> Path:
    path = work / "tiny.json"
    tiny = {**TINY, "dataset_dir": str(synthetic_dataset), "epochs": OVERLAY_EPOCHS, "network_width": OVERLAY_WIDTH}
    path.write_text(json.dumps(tiny, indent=1))
    return path


@pytest.fixture(scope="module")
def runs(work: Path, overlay: Path) -> dict[str, BundleRun]:
    """Every bundle command of the module, run two at a time (one thread each, the machine's two cores).

    - ``train``: ``run training`` from the repository root, ``--network_def#init_filters 8 --epochs 2`` over the
      overlay's width 16 and 5 epochs; bundle_root ``work/trained``.
    - ``train_inside``: ``run`` (default run id) from inside the bundle folder with ``configs/train.json``,
      ``--network_width 8 --epochs 1``; bundle_root ``work/inside``.
    - ``evaluate``: train.json + evaluate.json on ``work/trained`` (its best model.pt, the fold-0 cases).
    - ``infer_folder``: inference.json with only ``models/model.pt`` (copied from ``train``) in ``work/deploy``, on two
      unlabelled cases of a size that is not a multiple of 8, with mirror-flip TTA, a 24^3 sliding window, a
      second ensemble member (untrained weights) and the probability maps saved.
    - ``infer_real``: inference.json on the real BraTS 2023 case (if present) with untrained width-8 weights,
      whole-volume mode; bundle_root ``work/random``.
    """
    random_weights = save_random_segresnet(work / "random" / "models" / "model.pt")
    to_segment = work / "to_segment"
    generate_dataset(to_segment, 2, "brats2023", (40, 32, 28), seed=3, with_labels=False, start_index=101)
    logs = work / "logs"
    logs.mkdir()
    train, evaluate = repo_relative(TRAIN), repo_relative(EVALUATE)
    r = {
        "train": BundleRun(
            "train", "run", "training",
            "--config_file", config_list(train, overlay),
            "--bundle_root", str(work / "trained"),
            "--network_def#init_filters", str(WIDTH),
            "--epochs", str(EPOCHS),
        ),
        "train_inside": BundleRun(
            "train_inside", "run",
            "--config_file", config_list("configs/train.json", overlay),
            "--bundle_root", str(work / "inside"),
            "--network_width", str(WIDTH),
            "--epochs", "1",
            cwd=BUNDLE,
        ),
        "evaluate": BundleRun(
            "evaluate", "run",
            "--config_file", config_list(train, evaluate, overlay),
            "--bundle_root", str(work / "trained"),
            "--network_width", str(WIDTH),
        ),
        "infer_folder": BundleRun(
            "infer_folder", "run",
            "--config_file", repo_relative(INFERENCE),
            "--bundle_root", str(work / "deploy"),
            "--dataset_dir", str(to_segment),
            "--network_def#init_filters", str(WIDTH),
            "--tta", "True",
            "--inference_mode", "sliding_window",
            "--sw_roi_size", "[24,24,24]",
            "--ensemble_checkpoints", f"['{random_weights}']",
            "--save_probabilities", "True",
        ),
        "infer_real": BundleRun(
            "infer_real", "run",
            "--config_file", repo_relative(INFERENCE),
            "--bundle_root", str(work / "random"),
            "--dataset_dir", str(REAL_CASE),
            "--network_def#init_filters", str(WIDTH),
        ),
    }  # fmt: skip
    try:
        r["train"].start(logs)
        r["train_inside"].start(logs)
        if r["train"].wait().returncode == 0:
            (work / "deploy" / "models").mkdir(parents=True)
            shutil.copyfile(work / "trained" / "models" / "model.pt", work / "deploy" / "models" / "model.pt")
            r["evaluate"].start(logs)
            r["train_inside"].wait()
            r["infer_folder"].start(logs)
        else:
            r["evaluate"].not_started = r["infer_folder"].not_started = "not started: the training run failed"
        r["train_inside"].wait()
        r["evaluate"].wait()
        if REAL_CASE.is_dir():
            r["infer_real"].start(logs)
        r["infer_folder"].wait()
        r["infer_real"].wait()
    finally:
        for run in r.values():
            if run.proc is not None and run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()
    for name, run in r.items():
        if run.proc is not None:
            print(f"{name}: {run.seconds:.1f} s, exit status {run.returncode}")
    return r


# ------------------------------------------------------------------------------------------------- bundle_root


def _bundle_root(config_file, **override) -> str:
    workflow = ConfigWorkflow(config_file=config_file, workflow_type="inference", logging_file=False, **override)
    workflow.initialize()
    return workflow.bundle_root  # evaluated inside the workflow, as run/load evaluate it


def test_bundle_root_from_repository_root(monkeypatch):
    monkeypatch.chdir(REPO)
    assert _bundle_root(repo_relative(INFERENCE)) == str(BUNDLE)


def test_bundle_root_inside_bundle_folder(monkeypatch):
    monkeypatch.chdir(BUNDLE)
    assert _bundle_root("configs/inference.json") == str(BUNDLE)


def test_bundle_root_first_config_file_decides(monkeypatch, tmp_path):
    overlay = tmp_path / "overlay.json"
    overlay.write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert _bundle_root([str(INFERENCE), str(overlay)]) == str(BUNDLE)
    assert _bundle_root([str(overlay), str(INFERENCE)]) == str(tmp_path)  # a file outside configs/: its folder


def test_bundle_root_override_and_bare_parser(monkeypatch, tmp_path):
    assert _bundle_root(str(INFERENCE), bundle_root=str(tmp_path)) == str(tmp_path)
    monkeypatch.chdir(BUNDLE)
    parser = ConfigParser()  # no workflow evaluating it: the Model Zoo's "."
    parser.read_config(str(TRAIN))
    assert parser.get_parsed_content("bundle_root") == "."


def test_bundle_code_is_put_on_sys_path_only_when_shipped(monkeypatch, tmp_path):
    """``bundle_code`` adds ``<bundle_root>/scripts`` (a packaged bundle's copy of our code) to ``sys.path``, once."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    workflow = ConfigWorkflow(config_file=str(INFERENCE), workflow_type="inference", logging_file=False)
    workflow.initialize()
    assert not any(p.endswith("scripts") for p in sys.path)  # the repository bundle ships no scripts/
    (tmp_path / "scripts").mkdir()
    for _ in range(2):
        workflow = ConfigWorkflow(
            config_file=str(INFERENCE), workflow_type="inference", logging_file=False, bundle_root=str(tmp_path)
        )
        workflow.initialize()
    assert sys.path.count(str(tmp_path / "scripts")) == 1


def test_config_bundle_root_is_derived(monkeypatch, tmp_path):
    """Both configs derive ``bundle_root`` (and the output folders) from the first config file, whatever the working
    directory: what the Model Zoo's ``"."`` does not give. With ``"."``, a run from the repository root (the README's
    commands) would write ``models/`` into the repository root, and ``monai.bundle.load`` of a downloaded bundle
    from any other folder would look for its ``scripts/`` (our code) and ``models/`` in that folder."""
    for cwd in (REPO, tmp_path):
        monkeypatch.chdir(cwd)
        for config in (TRAIN, INFERENCE):
            workflow = ConfigWorkflow(config_file=str(config), workflow_type="train", logging_file=False)
            workflow.initialize()
            assert workflow.parser.get_parsed_content("ckpt_dir") == str(BUNDLE / "models")
            workflow = ConfigWorkflow(
                config_file=str(config), workflow_type="train", logging_file=False, bundle_root="."
            )
            workflow.initialize()
            assert workflow.parser.get_parsed_content("ckpt_dir") == "./models"


# ------------------------------------------------------------------------------------------------- metadata, properties


def test_metadata_survives_monai_parsing():
    """MONAI renames the deprecated ``optional_packages_version`` to ``required_packages_version`` on reading: a
    metadata.json with both loses its required list (and exports the wrong one into model.ts)."""
    raw = json.loads(METADATA.read_text())
    assert "optional_packages_version" not in raw
    parser = ConfigParser()
    parser.read_meta(str(METADATA))
    required = parser.get_parsed_content("_meta_#required_packages_version")
    assert required == raw["required_packages_version"]
    assert {"nibabel", "pytorch-ignite", "fire", "tensorboard"} <= set(required)
    assert raw["network_data_format"]["inputs"]["image"]["num_channels"] == SEGRESNET_ARGS["in_channels"]
    assert raw["network_data_format"]["outputs"]["pred"]["num_channels"] == SEGRESNET_ARGS["out_channels"]


def test_verify_metadata():
    if not SCHEMA.is_file():
        pytest.skip(f"metadata schema not available at {SCHEMA} (verify_metadata would download it)")
    fire_bundle("verify_metadata", "--meta_file", str(METADATA), "--filepath", str(SCHEMA))


@pytest.mark.parametrize("workflow_type, config", [("train", TRAIN), ("inference", INFERENCE)])
def test_check_properties(workflow_type, config, tiny_workflow):
    """The Model Zoo's check: every required (and every referenced optional) property resolves (bundle_root in
    ``tmp_path``: handlers built here create eval/ and models/)."""
    workflow = tiny_workflow("segresnet_vae", str(config), workflow_type=workflow_type)
    assert workflow.check_properties() == []


def model_card_rows() -> dict[str, str]:
    """Table rows of the model card: every backticked key of a row's first cell -> the row's second cell."""
    rows = {}
    for line in MODEL_CARD.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) >= 2:
            for key in re.findall(r"`([^`]+)`", cells[0]):
                rows[key] = cells[1]
    return rows


def test_model_card_documents_every_train_key():
    """docs/README.md has a table row, with the file's default, for every key of train.json a user changes: each
    top-level key and ``network_def`` argument that holds a plain value (a paper hyper-parameter or a knob).
    Components, references and expressions are plumbing: the card links the config file for them."""

    def plain(value) -> bool:
        if isinstance(value, str):
            return not value.startswith(("$", "@", "%"))
        if isinstance(value, list):
            return all(isinstance(v, (int, float)) for v in value)
        return value is None or isinstance(value, (bool, int, float))

    config = json.loads(TRAIN.read_text())
    expected = {k: v for k, v in config.items() if plain(v)}
    expected.update({f"network_def#{k}": v for k, v in config["network_def"].items() if plain(v) and k[0] != "_"})
    rows = model_card_rows()
    assert not [k for k in expected if k not in rows], "keys of train.json missing from the model card"
    for key, value in expected.items():
        shown = re.match(r"`([^`]+)`", rows[key])
        assert shown, f"{key}: no default shown"
        assert (shown[1] if isinstance(value, str) else json.loads(shown[1])) == value, key


def test_model_card_names_existing_configs():
    text = MODEL_CARD.read_text()
    named = set(re.findall(r"(?:bundles/segresnet_vae/)?configs/\w+\.json", text))
    assert {"configs/train.json", "configs/evaluate.json", "configs/multi_gpu_train.json"} <= named
    missing = [n for n in named if not (REPO / n).is_file() and not (BUNDLE / n).is_file()]
    assert not missing, missing
    assert re.search(r"Quickstart \(synthetic data.*held-out mean Dice \d\.\d+ \(WT \d\.\d+", text), (
        "the model card reports the measured quickstart Dice"
    )


# ------------------------------------------------------------------------------------------------- network checks


@pytest.mark.parametrize("n, width", [(1, None), (3, WIDTH)])
def test_verify_net_in_out(n, width):
    """``verify_net_in_out`` passes (at the shipped width 32 too); it checks channels and dtype only, so the shape is
    checked here: the metadata's ``8*n`` sides come out unchanged."""
    override = [] if width is None else ["--network_def#init_filters", str(width)]
    args = ["--config_file", str(INFERENCE), "--meta_file", str(METADATA), "--n", str(n), *override]
    fire_bundle("verify_net_in_out", "network_def", *args)

    meta = json.loads(METADATA.read_text())["network_data_format"]
    shape = _get_fake_spatial_shape(meta["inputs"]["image"]["spatial_shape"], n=n)
    assert shape == (8 * n,) * 3
    parser = ConfigParser()
    parser.read_config(str(INFERENCE))
    if width is not None:
        parser["network_def#init_filters"] = width
    net = parser.get_parsed_content("network_def").eval()
    with torch.no_grad():
        out = net(torch.rand(1, meta["inputs"]["image"]["num_channels"], *shape))
    assert out.shape == (1, meta["outputs"]["pred"]["num_channels"], *shape)
    assert out.dtype == torch.float32


# ------------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_training_checkpoints(runs: dict[str, BundleRun], work: Path):
    runs["train"].check()
    models = work / "trained" / "models"
    assert sorted(p.name for p in models.iterdir()) == [
        "cases.json",
        f"last_checkpoint_epoch={EPOCHS}.pt",
        "model.pt",
        "model_settings.json",
    ]

    # model.pt: segmentation weights only, strict into a plain MONAI SegResNet; the command line's width 8 won over
    # the overlay's 16
    best = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    assert not any(part.startswith(VAE_PREFIX) for k in best for part in k.split("."))
    assert best["convInit.conv.weight"].shape == (WIDTH, 4, 3, 3, 3)
    assert best["conv_final.2.conv.weight"].shape == (3, WIDTH, 1, 1, 1)
    SegResNet(**SEGRESNET_ARGS).load_state_dict(best, strict=True)

    # last_checkpoint_epoch=N.pt: everything needed to resume
    last = torch.load(models / f"last_checkpoint_epoch={EPOCHS}.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(last)
    net = SegResNetVAE2018(vae_input_size=ROI, **SEGRESNET_ARGS)
    net.load_state_dict(last["model"], strict=True)
    assert any(k.startswith(VAE_PREFIX) for k in last["model"])
    # Ignite's state: --epochs 2 beat the overlay's 5; one iteration per training case (batch size 1)
    assert dict(last["trainer"]) == {
        "max_epochs": EPOCHS,
        "epoch_length": TRAIN_CASES,
        "iteration": EPOCHS * TRAIN_CASES,
    }
    assert last["lr_scheduler"]["total_iters"] == EPOCHS and last["lr_scheduler"]["last_epoch"] == EPOCHS
    groups = last["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [1e-5, 0.0]  # L2 on the convolution kernels only (Sec. 3.6)
    n_kernels = sum(p.ndim == 5 for p in net.parameters())
    assert [len(g["params"]) for g in groups] == [n_kernels, len(list(net.parameters())) - n_kernels]
    assert groups[0]["initial_lr"] == pytest.approx(1e-4)
    assert groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # (1 - e/N_e)^0.9 reaches 0 after the last epoch


@pytest.mark.slow
def test_training_tensorboard(runs: dict[str, BundleRun], work: Path):
    runs["train"].check()
    tags = scalars(work / "trained" / "eval" / "logs")
    iterations = EPOCHS * TRAIN_CASES
    for tag in ("train_loss", "loss_dice", "loss_l2", "loss_kl", "loss_total"):
        assert [step for step, _ in tags[tag]] == list(range(1, iterations + 1)), tag
        assert all(np.isfinite(v) for _, v in tags[tag])
    for tag in ("val_mean_dice", "val_tc_dice", "val_wt_dice", "val_et_dice"):
        assert [step for step, _ in tags[tag]] == list(range(1, EPOCHS + 1)), tag
        assert all(0.0 <= v <= 1.0 for _, v in tags[tag])
    for (_, total), (_, dice), (_, l2), (_, kl), (_, logged) in zip(
        *(tags[t] for t in ("loss_total", "loss_dice", "loss_l2", "loss_kl", "train_loss")), strict=True
    ):
        assert total == pytest.approx(dice + 0.1 * l2 + 0.1 * kl, rel=1e-5)  # Eq. 1 with the default weights
        assert logged == pytest.approx(total, rel=1e-6)
        assert 0.0 < dice <= 3.0 and l2 > 0.0 and kl >= 0.0  # three summed Dice losses


@pytest.mark.slow
def test_run_id_from_inside_the_bundle_folder(runs: dict[str, BundleRun], work: Path):
    """``python -m monai.bundle run --config_file configs/train.json`` (default run id ``run``) from the bundle
    folder, ``--network_width 8`` on the command line: outputs under the given bundle_root, none in the repository."""
    run = runs["train_inside"]
    output = run.check()
    assert "Cannot find the metadata config file" not in output
    root = work / "inside"
    assert sorted(p.name for p in (root / "models").iterdir()) == [
        "cases.json",
        "last_checkpoint_epoch=1.pt",
        "model.pt",
        "model_settings.json",
    ]
    best = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert best["convInit.conv.weight"].shape[0] == WIDTH
    assert [step for step, _ in scalars(root / "eval" / "logs")["val_mean_dice"]] == [1]
    leaked = [p for p in (BUNDLE / "models").glob("*.pt") if p.stat().st_mtime >= run.started_at]
    assert not leaked, f"training wrote into the repository: {leaked}"


# ------------------------------------------------------------------------------------------------- evaluation


@pytest.mark.slow
def test_evaluate(runs: dict[str, BundleRun], work: Path, synthetic_dataset: Path):
    runs["evaluate"].check()
    eval_dir = work / "trained" / "eval" / f"{synthetic_dataset.name}-fold0"  # evaluate.json's eval_dir
    datalist = build_datalist(synthetic_dataset, num_folds=NUM_FOLDS, seed=0)
    val_cases = {c["case_id"]: c for c in datalist["training"] if c["fold"] == 0}
    assert len(val_cases) == 2

    predictions = sorted((eval_dir / "predictions").glob("*.nii.gz"))
    assert [p.name for p in predictions] == [f"{c}.nii.gz" for c in sorted(val_cases)]
    for pred in predictions:
        case_id = pred.name.removesuffix(".nii.gz")
        assert_label_map(pred, Path(val_cases[case_id]["image"][0]))

    # the evaluator's Dice reproduces the best validation Dice of the training run: model.pt is the best checkpoint
    with open(eval_dir / "metrics.csv") as f:
        metrics = {row[0]: float(row[1]) for row in csv.reader(f)}
    assert set(metrics) == {"val_mean_dice", "val_tc_dice", "val_wt_dice", "val_et_dice"}
    best = max(v for _, v in scalars(work / "trained" / "eval" / "logs")["val_mean_dice"])
    assert metrics["val_mean_dice"] == pytest.approx(best, abs=1e-5)

    # BraTS scores of the written label maps against the reference files
    with open(eval_dir / "brats2023" / "metrics_per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({r["case_id"] for r in rows}) == sorted(val_cases)
    assert sorted(r["region"] for r in rows) == sorted(["ET", "TC", "WT"] * len(val_cases))
    assert all(0.0 <= float(r["dice"]) <= 1.0 and float(r["hd95"]) >= 0.0 for r in rows)
    summary = json.loads((eval_dir / "brats2023" / "metrics_summary.json").read_text())
    assert summary["n_cases"] == len(val_cases) and summary["convention"] == "brats2023"
    assert set(summary["metrics"]) == {"ET", "TC", "WT"}
    assert summary["missing_predictions"] == []  # only the evaluated fold is scored, not the training cases
    assert {"lesion_dice", "lesion_hd95", "lesion_tp", "lesion_fp", "lesion_fn"} <= set(summary["metrics"]["ET"])


# ------------------------------------------------------------------------------------------------- inference


@pytest.mark.slow
def test_inference_on_a_folder(runs: dict[str, BundleRun], work: Path):
    """The deployed model.pt alone, mirror-flip TTA, a sliding window, a second ensemble member and the probability
    maps, on cases whose size is not a multiple of 8."""
    output = runs["infer_folder"].check()
    assert f"ensemble member 1 loaded from {work / 'random' / 'models' / 'model.pt'}" in output
    cases = sorted(p for p in (work / "to_segment").iterdir() if p.is_dir())
    out_dir = work / "deploy" / "eval" / "predictions"
    expected = [f"{c.name}{postfix}.nii.gz" for c in cases for postfix in ("", "_prob")]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        [*expected, "predictions.json"]
    )  # + which model wrote them
    for case in cases:
        label = assert_label_map(out_dir / f"{case.name}.nii.gz", image_of(case))
        prob_file = nib.load(out_dir / f"{case.name}_prob.nii.gz")
        assert prob_file.shape == (*label.shape, 3) and prob_file.get_data_dtype() == np.float32
        np.testing.assert_allclose(prob_file.affine, nib.load(image_of(case)).affine, atol=1e-5)
        prob = np.moveaxis(np.asarray(prob_file.dataobj), -1, 0)  # TC, WT, ET
        assert prob.min() >= 0.0 and prob.max() <= 1.0
        # the label map is the thresholded probabilities (AsDiscreted: >= 0.5), nested as RegionsToLabel does
        np.testing.assert_array_equal(regions_to_label(torch.from_numpy(prob >= 0.5), "brats2023")[0].numpy(), label)


@pytest.mark.slow
def test_inference_on_the_real_case(real_case: Path, runs: dict[str, BundleRun], work: Path):
    """A real BraTS 2023 case (240x240x155, LPS, int16), untrained width-8 weights, whole-volume mode."""
    runs["infer_real"].check()
    pred = work / "random" / "eval" / "predictions" / f"{real_case.name}.nii.gz"
    data = assert_label_map(pred, image_of(real_case))
    assert data.shape == (240, 240, 155)


# ------------------------------------------------------------------------------------------------- export


@pytest.mark.slow
def test_ckpt_export_torchscript_matches_eager(runs: dict[str, BundleRun], work: Path, tmp_path: Path):
    runs["train"].check()
    ckpt, ts_file = work / "trained" / "models" / "model.pt", tmp_path / "model.ts"
    fire_bundle(
        "ckpt_export", "network_def",
        "--filepath", str(ts_file),
        "--ckpt_file", str(ckpt),
        "--config_file", str(INFERENCE),
        "--meta_file", str(METADATA),
        "--network_def#init_filters", str(WIDTH),
    )  # fmt: skip
    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(ts_file), map_location="cpu", _extra_files=extra).eval()
    assert json.loads(extra["metadata.json"])["required_packages_version"]["nibabel"]
    assert json.loads(extra["inference.json"])["network_def"]["_target_"] == "SegResNet"

    eager = SegResNet(**SEGRESNET_ARGS)
    eager.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    eager.eval()
    generator = torch.Generator().manual_seed(0)
    for shape in ((32, 32, 32), (24, 40, 16)):
        x = torch.randn(1, 4, *shape, generator=generator)
        with torch.no_grad():
            expected, got = eager(x), scripted(x)
        assert got.shape == (1, 3, *shape)
        assert_close_to_scale(got, expected)
