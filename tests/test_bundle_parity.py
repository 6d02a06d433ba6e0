"""Two bundles, one set of guarantees: the bundles' configs differ only where the papers differ, and both attach the
same guarantees when built.

* Structure: each config file of ``segresnet_vae`` and ``espnet3d`` is flattened to ``id -> value``; every id whose
  value differs (or that one bundle lacks) must sit under a key of :data:`PAPER_KEYS`, which says why it differs.
  A guarantee added to one bundle only (a new key, handler or run step) fails here.
* Behaviour: both shipped ``train.json`` are built at tiny size and the handlers their ``TrainingRun`` attaches, the
  ids of their own trainer/evaluator handlers and the inference handlers are compared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from brats_pipeline.bundle.command_line import InterruptGuard
from brats_pipeline.data.screening import CaseFailureReport
from brats_pipeline.training.checkpointing import ArchiveEarlierRun, AtomicCheckpointSaver, ResumeFromCheckpoint
from brats_pipeline.training.guards import NonFiniteLossGuard
from brats_pipeline.training.records import CaseRecord

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("segresnet_vae", "espnet3d")
CONFIG_FILES = ("train.json", "inference.json", "evaluate.json", "multi_gpu_train.json")

#: config ids allowed to differ between the bundles, per file, with the paper reason
PAPER_KEYS: dict[str, dict[str, str]] = {
    "train.json": {
        "network_def": "the two networks",
        "inference_network": "segresnet_vae infers without its VAE branch",
        "best_weights": "segresnet_vae's model.pt holds the segmentation weights only (loads into plain SegResNet)",
        "channels_last": "speed lever, measured per network (docs/performance.md)",
        "roi_size": "paper crops: 160x192x128 (Myronenko) vs 128^3 (Nuechterlein)",
        "batch_size": "paper batch sizes: 1 vs 4",
        "train_brain_crop": "3D-ESPNet trains on the brain box; SegResNet on random crops of the whole volume",
        "brain_crop_k_divisible": "SegResNet downsamples 3 times: whole-volume inputs divisible by 8",
        "label_transform": "sigmoid regions (TC/WT/ET) vs softmax classes",
        "normalize_intensity": "z-score on brain voxels vs min-max",
        "output_activation": "sigmoid vs softmax",
        "discretize": "threshold 0.5 vs argmax",
        "as_regions": "classes -> regions for the region Dice (3D-ESPNet only)",
        "to_label": "regions -> labels vs classes -> labels",
        "train#random_transforms": "paper augmentations",
        "intensity_scale": "Myronenko's intensity augmentation",
        "intensity_shift": "Myronenko's intensity augmentation",
        "zoom_prob": "3D-ESPNet's scale augmentation",
        "min_zoom": "3D-ESPNet's scale augmentation",
        "max_zoom": "3D-ESPNet's scale augmentation",
        "loss": "Dice + VAE terms vs weighted Jaccard / cross-entropy",
        "dice_weight": "Myronenko Eq. 1",
        "l2_weight": "Myronenko Eq. 1",
        "kl_weight": "Myronenko Eq. 1",
        "smooth_nr": "Myronenko Eq. 2 (no smoothing in the numerator)",
        "losses": "3D-ESPNet's loss choices",
        "loss_name": "3D-ESPNet's loss choices",
        "class_weights": "3D-ESPNet's class weights",
        "class_weight_c": "3D-ESPNet's class weights",
        "computed_class_weights": "3D-ESPNet's class weights",
        "loss_class_weights": "3D-ESPNet's class weights",
        "optimizer": "weight decay on conv kernels only (Myronenko) vs on all parameters",
        "weight_decay": "paper values",
        "lr_scheduler": "polynomial decay vs step decay",
        "lr_decay_power": "Myronenko's polynomial decay",
        "lr_milestones": "3D-ESPNet's step decay",
        "lr_gamma": "3D-ESPNet's step decay",
    },
    "inference.json": {
        "network_def": "the two networks",
        "trained#defaults#roi_size": "paper crops",
        "trained#defaults#brain_crop_k_divisible": "SegResNet downsamples 3 times",
        "normalize_intensity": "z-score vs min-max",
        "output_activation": "sigmoid vs softmax",
        "discretize": "threshold 0.5 vs argmax",
        "to_label": "regions -> labels vs classes -> labels",
    },
    "evaluate.json": {"trained#defaults#brain_crop_k_divisible": "SegResNet downsamples 3 times"},
    "multi_gpu_train.json": {},
}


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a#b#0#c": leaf}``; lists of plain values are leaves."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}#{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}#{i}"))
        return out
    return {prefix: value}


def config(bundle: str, name: str) -> dict:
    return json.loads((REPO / "bundles" / bundle / "configs" / name).read_text())


def allowed(config_id: str, keys: dict[str, str]) -> bool:
    parts = config_id.split("#")
    return any("#".join(parts[:n]) in keys for n in range(1, len(parts) + 1))


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_configs_differ_only_where_the_papers_differ(name):
    a, b = (flatten(config(bundle, name)) for bundle in BUNDLES)
    missing = object()
    differing = sorted(k for k in a.keys() | b.keys() if a.get(k, missing) != b.get(k, missing))
    unexplained = [k for k in differing if not allowed(k, PAPER_KEYS[name])]
    assert not unexplained, (
        f"{name}: these ids differ between {BUNDLES[0]} and {BUNDLES[1]} without a paper reason; put the shared "
        f"wiring in both (or in brats_pipeline/), or add the id to PAPER_KEYS with its reason: {unexplained}"
    )
    stale = [k for k in PAPER_KEYS[name] if not any(allowed(d, {k: ""}) for d in differing)]
    assert not stale, f"{name}: PAPER_KEYS lists ids that no longer differ: {stale}"


def test_parity_check_catches_a_one_sided_guarantee():
    """The structural check itself: a key added to one bundle only is reported."""
    a = flatten({**config("segresnet_vae", "train.json"), "new_guard": True})
    b = flatten(config("espnet3d", "train.json"))
    differing = [k for k in a.keys() | b.keys() if a.get(k) != b.get(k)]
    assert "new_guard" in [k for k in differing if not allowed(k, PAPER_KEYS["train.json"])]


def test_both_bundles_attach_the_same_guarantees(tiny_workflow, tmp_path):
    attached, own = {}, {}
    for bundle in BUNDLES:  # progress on: every handler the shipped wiring can attach
        wf = tiny_workflow(bundle, "train.json", bundle_root=str(tmp_path / bundle), progress=True)
        run = wf.parser.get_parsed_content("training_run")
        # distinct handler kinds in order: segresnet_vae's loss also logs its Dice/L2/KL terms (a second
        # TensorBoardStatsHandler), 3D-ESPNet's single-term loss has none
        attached[bundle] = {e: list(dict.fromkeys(type(h) for h in hs)) for e, hs in run.handlers().items()}
        own[bundle] = {
            e: [type(h).__name__ for h in wf.parser.get_parsed_content(f"{e}#handlers")] for e in ("train", "validate")
        }
        assert run.resume_from_checkpoint.enabled is False and run.check_labels is True
        # models/cases.json and model_settings.json: written with model.pt, not when training starts
        assert isinstance(run.case_record, CaseRecord) and run.settings_record is not None
        assert set(run.checkpoint_dict) == {"model", "optimizer", "lr_scheduler", "trainer", "rng", "best", "scaler"}
    assert attached["segresnet_vae"] == attached["espnet3d"]
    assert (
        own["segresnet_vae"]
        == own["espnet3d"]
        == {
            "train": ["LrScheduleHandler", "ValidationHandler"],
            "validate": [],
        }
    )
    trainer = attached["espnet3d"]["trainer"]
    assert trainer[:2] == [NonFiniteLossGuard, ResumeFromCheckpoint] and AtomicCheckpointSaver in trainer
    assert ArchiveEarlierRun in trainer and InterruptGuard in trainer
    assert AtomicCheckpointSaver in attached["espnet3d"]["evaluator"]


def test_both_inference_configs_screen_cases_and_have_the_same_handlers(tiny_workflow, tmp_path):
    handlers = {}
    for bundle in BUNDLES:
        wf = tiny_workflow(bundle, "inference.json", bundle_root=str(tmp_path / bundle), progress=True)
        parsed = wf.parser.get_parsed_content("handlers")
        handlers[bundle] = [type(h).__name__ for h in parsed]
        assert any(isinstance(h, CaseFailureReport) for h in parsed)
        assert wf.parser.get_parsed_content("prediction_run").cases  # the screened list the dataset is built from
        assert wf.parser["dataset"]["data"] == "$@prediction_run.cases"
    assert handlers["segresnet_vae"] == handlers["espnet3d"]
    assert handlers["espnet3d"] == ["CheckpointLoader", "CaseFailureReport", "ProgressBar", "InterruptGuard"]


# ------------------------------------------------------------------------------------------------- Model Zoo shape


def _items(node: Any, found: dict[str, list]) -> None:
    """Walk a config: every ``$`` expression and every ``_target_`` value into ``found``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_":
                found["targets"].append(value)
            _items(value, found)
    elif isinstance(node, list):
        for value in node:
            _items(value, found)
    elif isinstance(node, str) and node.startswith("$"):
        found["expressions"].append(node)


@pytest.mark.parametrize(
    "path",
    sorted(REPO.glob("bundles/*/configs/*.json")) + sorted(REPO.glob("configs/*.json")),
    ids=lambda p: f"{p.parent.parent.name}/{p.name}",
)
def test_configs_read_like_model_zoo_configs(path):
    """No ``$`` expression over 120 characters (logic beyond one short line has a name in brats_pipeline), and no
    component written out more than 3 times in one file (a repeated block is one named component)."""
    found: dict[str, list] = {"targets": [], "expressions": []}
    _items(json.loads(path.read_text()), found)
    long = [e for e in found["expressions"] if len(e) > 120]
    assert not long, f"{path}: $ expressions over 120 characters: {long}"
    repeated = {t: found["targets"].count(t) for t in set(found["targets"]) if found["targets"].count(t) > 3}
    assert not repeated, f"{path}: components written out more than 3 times: {repeated}"


def test_bundle_versions_move_with_the_package():
    """Both bundles and the package carry one version, and each version has a one-line changelog entry."""
    import brats_pipeline

    for bundle in BUNDLES:
        meta = json.loads((REPO / "bundles" / bundle / "configs" / "metadata.json").read_text())
        assert meta["version"] == brats_pipeline.__version__, bundle
        assert all("\n" not in line and len(line) <= 200 for line in meta["changelog"].values()), bundle


def _count_items(node: Any) -> int:
    """Config items: keys at every depth (list entries are not keys; dicts inside lists are walked)."""
    if isinstance(node, dict):
        return sum(1 + _count_items(v) for v in node.values())
    if isinstance(node, list):
        return sum(_count_items(v) for v in node)
    return 0


@pytest.mark.parametrize("bundle", BUNDLES)
def test_config_sizes_stay_near_the_model_zoos(bundle):
    """The plumbing stays behind named components: inference.json at most 150 items and evaluate.json at most 80
    (the Model Zoo's brats_mri_segmentation: 97 and 49; before 0.4.0: 227-232 and 114)."""
    configs = REPO / "bundles" / bundle / "configs"
    assert _count_items(json.loads((configs / "inference.json").read_text())) <= 150
    assert _count_items(json.loads((configs / "evaluate.json").read_text())) <= 80
