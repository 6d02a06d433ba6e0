"""The experiment overlays in ``configs/`` (documented in ``docs/experiments.md``), merged over the bundles' configs.

Every overlay is merged after its bundle's ``train.json`` (or ``inference.json``) exactly as the documentation's
``--config_file "['bundles/<b>/configs/train.json','configs/<overlay>.json']"`` does, through MONAI's
``ConfigWorkflow`` in this process (no subprocess start-up), on the tiny synthetic BraTS 2023 dataset of
``conftest.py`` (32^3). On top of the overlay, the test keeps the runs tiny with the bundles' own keys: one training
case and one validation case (``train_files``/``val_files``), one epoch, ``network_width`` 8, 32^3 crops, cached data,
no worker processes, outputs in ``tmp_path``. Each overlay is

- parsed over every bundle it applies to: the bundle's required properties resolve and the trainer (or the
  inference evaluator) is built, and the keys it changes reach the objects they are meant for;
- run: one training iteration plus its validation (or inference of one case), with a check of the behaviour the
  overlay promises (the loss it computes, when training stops, where metrics go, how many forward passes, ...).

The crop overlays are the exception: one SegResNet+VAE step at 128^3 takes about 70 s on 2 CPU cores (160x192x128
about 130 s, measured at width 8), so their test checks what the overlay changes -- the training batches come out
at the crop size and the VAE is built for it -- without the step. The command-line traps of python-fire
(``--tta false`` is the string 'false', ``--tta None`` is dropped) are checked through ``python -m monai.bundle``'s own
entry point, once as a real subprocess.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import fire
import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_OVERRIDES
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle import __main__ as monai_bundle_main
from monai.handlers import CheckpointLoader, EarlyStopHandler, MLFlowHandler, TensorBoardStatsHandler
from monai.utils import path_to_sqlite_uri

from brats_pipeline.bundle.workflows import bundle_workflow
from brats_pipeline.data.datalist import build_datalist, write_json_atomic
from brats_pipeline.data.layouts import CHANNELS, LAYOUTS, MSD_CHANNELS
from brats_pipeline.losses.jaccard import WeightedCrossEntropyLoss
from brats_pipeline.losses.vae import SegResNetVAELoss
from brats_pipeline.tools.synthetic import write_msd_dataset_json
from brats_pipeline.transforms.labels import LabelConventionError, get_convention
from custom_networks.segresnet_vae import VAE_PREFIX

REPO = Path(__file__).resolve().parents[1]
OVERLAY_DIR = REPO / "configs"
DOC = REPO / "docs" / "experiments.md"
BUNDLES = ("segresnet_vae", "espnet3d")
NOT_EXPERIMENTS = {"quickstart.json"}  # the quickstart overlay has its own documentation and test

WIDTH = TINY_OVERRIDES["segresnet_vae"]["network_width"]
#: the bundles' own keys, merged after the overlay: conftest's TINY_OVERRIDES (one epoch, tiny network, 32^3 crops,
#: ...; the keys inference.json lacks are unused ids there) and, for training, one training and one validation case
ONE_CASE_EACH = {"train_files": "$@datalist['training'][:1]", "val_files": "$@datalist['training'][1:2]"}

#: overlay -> (bundles it is written for, the bundle configs it is merged after); the first base is the one its run
#: test uses
OVERLAYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "brats2023_labels.json": (BUNDLES, ("train.json", "inference.json")),
    "brats2024_labels.json": (BUNDLES, ("train.json", "inference.json")),
    "msd_task01.json": (BUNDLES, ("train.json",)),
    "tta.json": (BUNDLES, ("inference.json",)),
    "ensemble.json": (BUNDLES, ("inference.json",)),
    "crop_paper.json": (BUNDLES, ("train.json",)),
    "crop_small.json": (BUNDLES, ("train.json",)),
    "segresnet_no_vae.json": (("segresnet_vae",), ("train.json",)),
    "loss_weights.json": (("segresnet_vae",), ("train.json",)),
    "espnet_weighted_ce.json": (("espnet3d",), ("train.json",)),
    "early_stopping.json": (BUNDLES, ("train.json",)),
    "mlflow.json": (BUNDLES, ("train.json",)),
    "segresnet_paper_protocol.json": (("segresnet_vae",), ("train.json",)),
    "espnet_paper_protocol.json": (("espnet3d",), ("train.json",)),
    "espnet_code_protocol.json": (("espnet3d",), ("train.json",)),
    "espnet_code_test.json": (("espnet3d",), ("inference.json",)),
}
#: overlays whose keys replace the tiny crop (they are about the crop)
CROP_OVERLAYS = {"crop_paper.json": [160, 192, 128], "crop_small.json": [128, 128, 128]}


# ------------------------------------------------------------------------------------------------- helpers


def bundle_config(bundle: str, name: str) -> Path:
    return REPO / "bundles" / bundle / "configs" / name


def workflow(
    bundle: str,
    overlays: list[str],
    bundle_root: Path,
    dataset_dir: Path | str,
    workflow_type: str = "train",
    keep: tuple[str, ...] = (),
    **override,
) -> ConfigWorkflow:
    """``train.json`` (or ``inference.json``) + ``configs/<overlay>`` ... merged in order, then the tiny overrides
    (except the keys in ``keep``, left to the files) and ``override``. Not conftest's ``tiny_workflow``: ``keep``,
    and a bundle root and dataset per call."""
    base = "train.json" if workflow_type == "train" else "inference.json"
    tiny = {**copy.deepcopy(TINY_OVERRIDES[bundle]), **(ONE_CASE_EACH if workflow_type == "train" else {})}
    return bundle_workflow(
        bundle,
        base,
        *(OVERLAY_DIR / o for o in overlays),
        workflow_type=workflow_type,
        bundle_root=str(bundle_root),
        dataset_dir=str(dataset_dir),
        **{**{k: v for k, v in tiny.items() if k not in keep}, **override},
    )


def run(wf: ConfigWorkflow) -> ConfigWorkflow:
    wf.run()
    wf.finalize()
    return wf


def parsed(wf: ConfigWorkflow, id: str):
    return wf.parser.get_parsed_content(id)


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from (MONAI wraps errors of config expressions)."""
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def save_random_weights(bundle: str, bundle_root: Path, names: list[str], overlays: Sequence[str] = ()) -> list[Path]:
    """Untrained weights of the bundle's inference network (at the test width, with ``overlays`` merged: e.g. one
    more output channel with brats2024_labels.json), one seed per file."""
    paths = []
    for seed, name in enumerate(names):
        wf = workflow(bundle, list(overlays), bundle_root, bundle_root, workflow_type="inference")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = parsed(wf, "network_def")
        path = bundle_root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), path)
        paths.append(path)
    return paths


def count_forward_calls(net: torch.nn.Module) -> list[int]:
    """A counter of ``net``'s forward calls; deep copies of ``net`` (ensemble members) count into it too."""
    calls = [0]

    def hook(module, args):
        calls[0] += 1

    net.register_forward_pre_hook(hook)
    return calls


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny 3-D convolutions run faster on one thread of this shared 2-core machine; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run from ``tmp_path``: anything written relative to the working directory shows up there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def msd_dataset(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Labelled cases 1-2 of the synthetic BraTS 2023 dataset re-packed as MSD Task01_BrainTumour: one 4-D image per
    case with the channels in MSD order (FLAIR, T1w, T1gd, T2w), labels in the MSD convention, a ``dataset.json``."""
    root = tmp_path_factory.mktemp("Task01_BrainTumour")
    spec, source, target = LAYOUTS["brats2023"], get_convention("brats2023"), get_convention("msd")
    lookup = np.zeros(max(source.values) + 1, dtype=np.uint8)
    lookup[list(source.values)] = target.class_to_label  # brats2023 value -> class -> msd value
    for index in (1, 2):
        case = synthetic_dataset / f"BraTS-GLI-{index:05d}-000"
        images = [nib.load(case / spec.filename(case.name, m)) for m in MSD_CHANNELS]
        label = nib.load(case / spec.filename(case.name, "seg"))
        stacked = np.stack([np.asarray(img.dataobj) for img in images], axis=-1)
        for folder, data in (("imagesTr", stacked), ("labelsTr", lookup[np.asarray(label.dataobj)])):
            (root / folder).mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(data, label.affine), root / folder / f"BRATS_{index:03d}.nii.gz")
    write_msd_dataset_json(root)
    return root


@pytest.fixture(scope="module")
def renamed_dataset(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The labelled BraTS 2023 cases (labels 1, 2, 3) under BraTS 2021 folder and file names (hard links, so the
    paths keep the new names): the datalist builder takes the layout from the names, so it declares the 2018-2021
    convention (ET = 4)."""
    root = tmp_path_factory.mktemp("renamed_brats2023")
    new, old = LAYOUTS["brats2021"], LAYOUTS["brats2023"]
    for index in range(1, 5):
        source = synthetic_dataset / f"BraTS-GLI-{index:05d}-000"
        case = root / f"BraTS2021_{index:05d}"
        case.mkdir()
        for modality in (*CHANNELS, "seg"):
            os.link(source / old.filename(source.name, modality), case / new.filename(case.name, modality))
    return root


# ------------------------------------------------------------------------------------------------- documentation


def test_every_overlay_is_listed_and_documented():
    on_disk = {p.name for p in OVERLAY_DIR.glob("*.json")} - NOT_EXPERIMENTS
    assert on_disk == set(OVERLAYS), "configs/ and this test's OVERLAYS table differ"
    doc = DOC.read_text()
    for name in on_disk:
        assert isinstance(json.loads((OVERLAY_DIR / name).read_text()), dict)
        assert f"configs/{name}" in doc, f"{name} has no command in {DOC.name}"


def test_documented_commands_name_existing_files():
    """Every ``--config_file "[...]"`` in the documentation lists files that exist (relative to the repository
    root) and starts with a bundle config; an overlay is only documented over a bundle and base it is written for."""
    lists = re.findall(r"--config_file \"(\[[^\]]*\])\"", DOC.read_text())
    assert len(lists) >= len(OVERLAYS)
    for value in lists:
        files = [f for f in json.loads(value.replace("'", '"')) if "<" not in f]  # '<your overlay>' placeholders
        for f in files:
            assert (REPO / f).is_file(), f"{f} in {DOC.name} does not exist"
        base = Path(files[0])
        assert base.parts[:1] == ("bundles",) and base.parent.name == "configs", value
        for f in files[1:]:
            if Path(f).name in OVERLAYS:
                bundles, bases = OVERLAYS[Path(f).name]
                assert base.parts[1] in bundles and base.name in bases, value


def documented_commands() -> list[list[str]]:
    """The arguments after ``python -m monai.bundle`` of every command line in the documentation."""
    lines = [line for line in DOC.read_text().splitlines() if line.startswith("python -m monai.bundle ")]
    return [shlex.split(line)[3:] for line in lines]


def test_documented_overrides_name_existing_keys():
    """What python-fire makes of each documented command: ``run`` with existing config files, overrides of keys that
    exist in the merged configs (or, for ``a#b``, whose parent does), and real booleans (not the strings
    'true'/'false') for boolean keys."""
    commands = documented_commands()
    assert len(commands) >= len(OVERLAYS)
    called: dict = {}

    def record(*args, **kwargs) -> None:
        called.update(args=args, kwargs=kwargs)

    for argv in commands:
        called.clear()
        fire.Fire({"run": record}, command=argv)
        assert argv[0] == "run" and called["args"] in ((), ("training",)), argv
        kwargs = dict(called["kwargs"])
        parser = ConfigParser()
        files = kwargs.pop("config_file")
        parser.read_config([str(REPO / f) for f in (files if isinstance(files, (list, tuple)) else [files])])
        if called["args"]:
            assert called["args"][0] in parser, argv
        for key, value in kwargs.items():
            parent = key.rsplit("#", 1)[0] if "#" in key else None
            assert key in parser or parent in parser, f"--{key} in {argv}: neither it nor its parent is in the configs"
            assert not (isinstance(value, str) and value.lower() in ("true", "false", "none")), f"--{key} {value!r}"
            if key in parser and isinstance(parser[key], bool):
                assert isinstance(value, bool), f"--{key} {value!r} is not a boolean"


# ------------------------------------------------------------------------------------------------- parsing


#: the MLflow overlays are parsed (and their handler lists compared with the bundle's) by their run test: building an
#: MLFlowHandler creates its SQLite store, which takes seconds
PAIRS = [
    (o, b, base) for o, (bundles, bases) in OVERLAYS.items() for b in bundles for base in bases if o != "mlflow.json"
]


@pytest.mark.parametrize("overlay, bundle, base", PAIRS)
def test_overlay_parses(overlay, bundle, base, synthetic_dataset, msd_dataset, tmp_path):
    """Merged over the bundle config: the required properties resolve, the trainer / evaluator builds, and every
    plain value the overlay sets is what the run sees."""
    kind = "train" if base == "train.json" else "inference"
    dataset = msd_dataset if overlay == "msd_task01.json" else synthetic_dataset
    keep = ("roi_size",) if overlay in CROP_OVERLAYS else ()
    if kind == "inference":
        save_random_weights(bundle, tmp_path, ["models/model.pt", "models/ensemble/member_1.pt"], [overlay])
        dataset = synthetic_dataset / "BraTS-GLI-00005-000"
    wf = workflow(bundle, [overlay], tmp_path, dataset, workflow_type=kind, keep=keep)
    assert wf.check_properties() == []
    assert parsed(wf, "train#trainer" if kind == "train" else "evaluator") is not None
    overridden = {"dataset_dir", *TINY_OVERRIDES[bundle], *ONE_CASE_EACH} - set(keep)
    for key, value in json.loads((OVERLAY_DIR / overlay).read_text()).items():
        plain = not isinstance(value, dict) and not (isinstance(value, str) and value.startswith(("$", "@")))
        if plain and key not in overridden and not key.startswith("+"):
            assert parsed(wf, key) == value, key


def test_crop_overlays_set_the_training_crop(synthetic_dataset, tmp_path):
    """The crop overlays change what training sees: batches at the crop size (the 32^3 case padded, then cropped),
    the VAE branch built for that size, and nothing at validation (whole brain-cropped volumes)."""
    for overlay, crop in CROP_OVERLAYS.items():
        for bundle in BUNDLES:
            wf = workflow(bundle, [overlay], tmp_path / overlay / bundle, synthetic_dataset, keep=("roi_size",))
            batch = next(iter(parsed(wf, "train#dataloader")))
            assert tuple(batch["image"].shape[2:]) == tuple(crop)
            assert batch["label"].shape[2:] == batch["image"].shape[2:]
            val = parsed(wf, "validate#dataset")[0]
            assert all(s <= 32 for s in val["image"].shape[1:]), "validation must not use the training crop"
            if bundle == "segresnet_vae":
                net = parsed(wf, "network_def")
                assert list(net.vae_input_size) == crop


# ------------------------------------------------------------------------------------------------- runs


def test_brats2023_labels(renamed_dataset, synthetic_dataset, tmp_path):
    """BraTS 2023 labels (ET = 3) under BraTS 2021 names: auto-detection says 2018-2021 and the label check stops the
    run naming the file; with the overlay the same data trains. A datalist without ``label_convention`` (another
    tool's decathlon-style file) cannot even be parsed without the overlay."""
    wf = workflow("segresnet_vae", [], tmp_path / "auto", renamed_dataset)
    assert parsed(wf, "label_convention") == "brats2018"
    with pytest.raises(Exception) as info:
        run(wf)
    error = next(e for e in causes(info.value) if isinstance(e, LabelConventionError))
    assert "BraTS2021_0000" in str(error) and "'3'" in str(error)

    wf = run(workflow("segresnet_vae", ["brats2023_labels.json"], tmp_path / "forced", renamed_dataset))
    assert parsed(wf, "label_convention") == "brats2023"
    assert parsed(wf, "train#trainer").state.iteration == 1
    assert (tmp_path / "forced" / "models" / "model.pt").is_file()

    datalist = build_datalist(synthetic_dataset, num_folds=2, check_files=False)
    foreign = {"training": [{k: c[k] for k in ("image", "label", "fold")} for c in datalist["training"]]}
    datalist_file = write_json_atomic(foreign, tmp_path / "foreign_datalist.json")
    wf = workflow("segresnet_vae", [], tmp_path / "foreign", synthetic_dataset, datalist_file=str(datalist_file))
    with pytest.raises(Exception) as info:
        parsed(wf, "label_convention")
    assert any(isinstance(e, KeyError) for e in causes(info.value))
    for bundle in BUNDLES:
        wf = workflow(
            bundle, ["brats2023_labels.json"], tmp_path / bundle, synthetic_dataset, datalist_file=str(datalist_file)
        )
        assert parsed(wf, "label_convention") == "brats2023"
        label_transform = parsed(wf, "label_transform")
        assert get_convention(label_transform.convention).name == "brats2023"


def test_msd_task01(msd_dataset, synthetic_dataset, tmp_path):
    """The MSD layout is recognised from ``dataset.json``; after channel reordering and the MSD label convention, a
    case gives the very tensors of its BraTS 2023 original; one iteration trains."""
    wf = run(workflow("segresnet_vae", ["msd_task01.json"], tmp_path / "msd", msd_dataset))
    datalist = parsed(wf, "datalist")
    assert datalist["layout"] == "msd" and parsed(wf, "label_convention") == "msd"
    assert parsed(wf, "train#trainer").state.iteration == 1

    original = workflow("segresnet_vae", [], tmp_path / "brats", synthetic_dataset)
    case = next(c for c in datalist["training"] if c["case_id"] == "BRATS_001")
    msd = parsed(wf, "validate#preprocessing")(dict(case))
    brats = build_datalist(synthetic_dataset, num_folds=2, check_files=False)
    source = next(c for c in brats["training"] if c["case_id"] == "BraTS-GLI-00001-000")
    ref = parsed(original, "validate#preprocessing")(dict(source))
    torch.testing.assert_close(msd["image"].as_tensor(), ref["image"].as_tensor())
    torch.testing.assert_close(msd["label"].as_tensor(), ref["label"].as_tensor())
    assert msd["label"].sum() > 0


def test_segresnet_no_vae(synthetic_dataset, tmp_path):
    """The paper's ablation: no VAE branch is built, the network returns plain logits and the loss is Dice only."""
    wf = run(workflow("segresnet_vae", ["segresnet_no_vae.json"], tmp_path, synthetic_dataset))
    net, loss, trainer = parsed(wf, "network"), parsed(wf, "loss"), parsed(wf, "train#trainer")
    assert trainer.state.iteration == 1
    assert not any(part.startswith(VAE_PREFIX) for k in net.state_dict() for part in k.split("."))
    assert isinstance(trainer.state.output["pred"], torch.Tensor)  # logits, not a SegResNetVAEOutput
    terms = loss.last_terms
    assert terms["l2"] == 0.0 and terms["kl"] == 0.0
    assert terms["total"] == pytest.approx(terms["dice"]) == pytest.approx(trainer.state.output["loss"].item())
    # the best model loads strictly into inference.json's plain SegResNet, as with the VAE
    inference = workflow("segresnet_vae", [], tmp_path, synthetic_dataset, workflow_type="inference")
    best = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    parsed(inference, "network_def").load_state_dict(best, strict=True)


def test_loss_weights(synthetic_dataset, tmp_path):
    weights = json.loads((OVERLAY_DIR / "loss_weights.json").read_text())
    wf = run(workflow("segresnet_vae", ["loss_weights.json"], tmp_path, synthetic_dataset))
    loss, trainer = parsed(wf, "loss"), parsed(wf, "train#trainer")
    assert isinstance(loss, SegResNetVAELoss)
    assert (loss.l2_weight, loss.kl_weight) == (weights["l2_weight"], weights["kl_weight"])
    terms = loss.last_terms
    assert terms["l2"] > 0.0
    expected = terms["dice"] + weights["l2_weight"] * terms["l2"] + weights["kl_weight"] * terms["kl"]
    assert trainer.state.output["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_espnet_weighted_ce(synthetic_dataset, tmp_path):
    """Weighted cross-entropy replaces the weighted Jaccard loss, with the same class weights 1/ln(1.1 + p)."""
    wf = run(workflow("espnet3d", ["espnet_weighted_ce.json"], tmp_path, synthetic_dataset))
    loss, trainer = parsed(wf, "loss"), parsed(wf, "train#trainer")
    assert isinstance(loss, WeightedCrossEntropyLoss)
    weights = torch.tensor(parsed(wf, "loss_class_weights"), dtype=torch.float32)
    torch.testing.assert_close(loss.weight, weights)
    out = trainer.state.output
    expected = F.cross_entropy(out["pred"].as_tensor().float(), out["label"][:, 0].as_tensor().long(), weight=weights)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_early_stopping(bundle, synthetic_dataset, tmp_path):
    """No Dice gain can exceed ``min_delta`` 1.0, so with patience 1 a 4-epoch run stops after epoch 2 (epoch 1 sets
    the best score, epoch 2 fails to beat it); the epoch-2 checkpoint is still written, and the bundle's own
    validation handlers are all still there."""
    wf = workflow(
        bundle,
        ["early_stopping.json"],
        tmp_path,
        synthetic_dataset,
        epochs=4,
        early_stopping_patience=1,
        early_stopping_min_delta=1.0,
    )
    handlers = parsed(wf, "validate#handlers")
    assert handlers[-1] is parsed(wf, "validate#early_stopping")  # added by id, appended to the bundle's own
    assert isinstance(handlers[-1], EarlyStopHandler) and handlers[-1].patience == 1
    base = json.loads(bundle_config(bundle, "train.json").read_text())["validate"]["handlers"]
    assert len(handlers) == len(base) + 1
    run(wf)
    assert parsed(wf, "train#trainer").state.epoch == 2
    assert (tmp_path / "models" / "last_checkpoint_epoch=2.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES)
def test_mlflow(bundle, synthetic_dataset, in_tmp):
    """MLflow instead of TensorBoard: the bundle's TensorBoard handlers are gone (no event file is written), every
    other handler stays, and training loss, learning rate, validation Dice and the run's settings land in one MLflow
    run of the SQLite store under ``eval/mlflow``; nothing is written to the working directory."""
    root = in_tmp / "bundle"
    overlay = "mlflow.json"
    wf = workflow(bundle, [overlay], root, synthetic_dataset, epochs=2)
    base = workflow(bundle, [], in_tmp / "base", synthetic_dataset)
    for engine_handlers in ("train#handlers", "validate#handlers"):
        with_mlflow = [type(h) for h in parsed(wf, engine_handlers)]
        assert with_mlflow == [type(h) for h in parsed(base, engine_handlers)] + [MLFlowHandler], engine_handlers
    shipped = {e: [type(h) for h in hs] for e, hs in parsed(base, "training_run").handlers().items()}
    for engine, handlers in parsed(wf, "training_run").handlers().items():  # TensorBoard off, every other guarantee on
        assert [type(h) for h in handlers] == [t for t in shipped[engine] if t is not TensorBoardStatsHandler]
    run(wf)

    assert not list(root.rglob("events.out.tfevents*"))
    assert sorted(p.name for p in in_tmp.iterdir()) == ["base", "bundle"]
    client = mlflow.tracking.MlflowClient(path_to_sqlite_uri(root / "eval" / "mlflow" / "mlruns.db"))
    experiment = client.get_experiment_by_name(bundle)  # the bundle's metadata name
    (only_run,) = client.search_runs(experiment.experiment_id)
    assert only_run.info.status == "FINISHED"
    params = only_run.data.params
    assert (
        params["network_width"] == str(WIDTH) and params["epochs"] == "2" and params["label_convention"] == "brats2023"
    )
    history = {
        k: [(m.step, m.value) for m in client.get_metric_history(only_run.info.run_id, k)]
        for k in only_run.data.metrics
    }
    assert [s for s, _ in history["train_loss"]] == [1, 2]
    assert [s for s, _ in history["val_mean_dice"]] == [1, 2]
    assert all(0.0 <= v <= 1.0 for _, v in history["val_mean_dice"])
    assert {"val_tc_dice", "val_wt_dice", "val_et_dice", "lr_group_0"} <= set(history)
    if bundle == "segresnet_vae":
        assert {"loss_dice", "loss_l2", "loss_kl"} <= set(history)
    assert Path(experiment.artifact_location) == root / "eval" / "mlflow" / "artifacts"


@pytest.mark.parametrize("bundle", BUNDLES)
def test_tta(bundle, synthetic_dataset, tmp_path):
    """Eight forward passes (all mirror-flip combinations) for the one case, and its label map is written."""
    save_random_weights(bundle, tmp_path, ["models/model.pt"])
    case = synthetic_dataset / "BraTS-GLI-00005-000"
    wf = workflow(bundle, ["tta.json"], tmp_path, case, workflow_type="inference")
    inferer = parsed(wf, "inferer")
    assert inferer.tta is True and len(inferer.flip_sets) == 8
    calls = count_forward_calls(parsed(wf, "network"))
    run(wf)
    assert calls[0] == 8
    pred = nib.load(tmp_path / "eval" / "predictions" / f"{case.name}.nii.gz")
    assert pred.shape == nib.load(case / f"{case.name}-t1c.nii.gz").shape


@pytest.mark.parametrize("bundle", BUNDLES)
def test_ensemble(bundle, synthetic_dataset, tmp_path):
    """Every ``*.pt`` in ``models/ensemble`` is a member, each with its own weights; by default the bundle's
    ``models/model.pt`` is not (and need not exist); ``ensemble_include_bundle_model`` adds it."""
    members = save_random_weights(bundle, tmp_path, ["models/ensemble/member_1.pt", "models/ensemble/member_2.pt"])
    case = synthetic_dataset / "BraTS-GLI-00005-000"
    wf = workflow(bundle, ["ensemble.json"], tmp_path, case, workflow_type="inference")
    assert parsed(wf, "ensemble_checkpoints") == [str(p) for p in members]
    assert not any(isinstance(h, CheckpointLoader) for h in parsed(wf, "handlers"))
    net = parsed(wf, "network")
    calls = count_forward_calls(net)
    run(wf)
    assert calls[0] == 2
    ensemble = parsed(wf, "inferer").ensemble(net)
    assert net not in ensemble and len(ensemble) == 2
    for member, path in zip(ensemble, members, strict=True):
        saved = torch.load(path, weights_only=True)
        assert all(torch.equal(v, saved[k]) for k, v in member.state_dict().items())
    assert (tmp_path / "eval" / "predictions" / f"{case.name}.nii.gz").is_file()

    save_random_weights(bundle, tmp_path, ["models/model.pt"])
    wf = workflow(
        bundle,
        ["ensemble.json"],
        tmp_path,
        case,
        workflow_type="inference",
        ensemble_include_bundle_model=True,
        overwrite=True,
    )
    assert isinstance(parsed(wf, "handlers")[0], CheckpointLoader)
    calls = count_forward_calls(parsed(wf, "network"))
    run(wf)
    assert calls[0] == 3


# ------------------------------------------------------------------------------------------------- command line


def probe_overlay(tmp_path: Path) -> Path:
    """A run id that only prints what the inferer received, so the command line is checked without inference."""
    path = tmp_path / "probe.json"
    path.write_text(
        json.dumps({"probe": ["$print('PROBE tta=%r flips=%d' % (@inferer.tta, len(@inferer.flip_sets)))"]})
    )
    return path


def fire_run(*argv: str) -> None:
    """``python -m monai.bundle run ...`` in this process: python-fire over the function the entry point calls."""
    fire.Fire({"run": monai_bundle_main.run}, command=["run", *argv], name="monai.bundle")


@pytest.mark.parametrize(
    "overlays, argv, expected",
    [
        ([], ["--tta", "True"], "tta=True flips=8"),
        (["tta.json"], ["--tta", "False"], "tta=False flips=1"),
        ([], ["--tta", "false"], "tta='false' flips=8"),  # the trap: a non-empty string is true
        (["tta.json"], ["--tta", "None"], "tta=True flips=8"),  # the trap: None is dropped, the overlay's value stays
    ],
)
def test_boolean_overrides_through_fire(overlays, argv, expected, synthetic_dataset, tmp_path, capsys):
    configs = [str(bundle_config("segresnet_vae", "inference.json"))] + [str(OVERLAY_DIR / o) for o in overlays]
    configs.append(str(probe_overlay(tmp_path)))
    fire_run(
        "probe",
        "--config_file", str(configs),
        "--logging_file", "False",
        "--bundle_root", str(tmp_path),
        "--dataset_dir", str(synthetic_dataset),
        *argv,
    )  # fmt: skip
    assert f"PROBE {expected}" in capsys.readouterr().out


@pytest.mark.slow
def test_boolean_override_in_a_subprocess(synthetic_dataset, tmp_path):
    """``--tta True`` as a user types it, from the repository root, reaches the inferer."""
    configs = str(["bundles/segresnet_vae/configs/inference.json", str(probe_overlay(tmp_path))])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "probe", "--config_file", configs, "--tta", "True"]
    cmd += ["--bundle_root", str(tmp_path), "--dataset_dir", str(synthetic_dataset)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PROBE tta=True flips=8" in proc.stdout
