"""The papers' protocols (``configs/segresnet_paper_protocol.json``; 3D-ESPNet as its paper states it,
``configs/espnet_paper_protocol.json``, and as its code trains it, ``configs/espnet_code_protocol.json`` with
``configs/espnet_code_test.json``) and their
pieces in :mod:`brats_pipeline.training.epochs`, :mod:`~brats_pipeline.training.records` and :mod:`~brats_pipeline.evaluation.plan`: 3D-ESPNet's three-pass epoch (``ResizedPasses``, ``PassBatchSampler``),
Myronenko's final model trained on all cases (``FinalModelSaver``), the record of which cases a run saw
(``CaseRecord``) and the honest evaluation statement (``evaluation_plan``).

The overlays run at tiny size through MONAI's ``ConfigWorkflow`` on the 32^3 synthetic dataset of ``conftest.py``
(4 labelled cases): width 8, no workers, cached data, outputs in ``tmp_path``; the evaluations run the shipped
``evaluate.json``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigWorkflow
from monai.data import DataLoader, Dataset

from brats_pipeline.evaluation.plan import evaluation_plan
from brats_pipeline.inference.inferer import BratsInferer
from brats_pipeline.training.checkpointing import FinalModelSaver
from brats_pipeline.training.epochs import PassBatchSampler, ResizedPasses
from brats_pipeline.training.records import CaseRecord, read_case_record
from custom_networks.segresnet_vae import VAE_PREFIX

REPO = Path(__file__).resolve().parents[1]
SEG_OVERLAY = REPO / "configs" / "segresnet_paper_protocol.json"
ESP_PAPER = REPO / "configs" / "espnet_paper_protocol.json"
ESP_CODE = REPO / "configs" / "espnet_code_protocol.json"
ESP_CODE_TEST = REPO / "configs" / "espnet_code_test.json"
WIDTH = 8


#: keys proposed for both bundles' evaluate.json (see the report of issue 15 / docs/experiments.md)
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def workflow(bundle: str, files: list[Path | str], bundle_root: Path, dataset_dir: Path, **override) -> ConfigWorkflow:
    configs = REPO / "bundles" / bundle / "configs"
    wf = ConfigWorkflow(
        config_file=[str(configs / "train.json"), *[str(f) for f in files]],
        meta_file=str(configs / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(bundle_root),
        dataset_dir=str(dataset_dir),
        **{"num_workers": 0, "cache_rate": 1.0, "network_width": WIDTH, "num_folds": 2, **override},
    )
    wf.initialize()
    return wf


# ------------------------------------------------------------------------------------------------- epoch passes


def toy_cases(n: int = 5, shape=(10, 12, 14)) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.rand(2, *shape, generator=g),
            "label": torch.randint(0, 4, (1, *shape), generator=g).float(),
            "case_id": f"case{i}",
        }
        for i in range(n)
    ]


def test_resized_passes_hold_every_case_once_per_size():
    data = Dataset(toy_cases())
    passes = ResizedPasses(data, [16, [8, 6, 4], None])
    assert len(passes) == 15 and passes.num_passes == 3 and passes.num_cases == 5
    assert passes.locate(7) == (1, 2)
    for i in range(len(passes)):
        p, j = passes.locate(i)
        item = passes[i]
        assert item["case_id"] == f"case{j}"
        expected = [(16, 16, 16), (8, 6, 4), (10, 12, 14)][p]
        assert tuple(item["image"].shape[1:]) == tuple(item["label"].shape[1:]) == expected
        assert set(torch.unique(item["label"]).tolist()) <= {0.0, 1.0, 2.0, 3.0}  # nearest: no new label values
    with pytest.raises(IndexError):
        passes[15]
    for bad in ([], 96, [[96, 96]], [0]):
        with pytest.raises(ValueError, match="epoch_passes"):
            ResizedPasses(data, bad)


def test_pass_batch_sampler_covers_each_pass_once_and_never_mixes_sizes():
    passes = ResizedPasses(Dataset(toy_cases()), [16, 8, 12])
    sampler = PassBatchSampler(passes, batch_size=2)
    assert len(sampler) == 3 * 3
    orders = []
    torch.manual_seed(0)
    for _ in range(4):
        batches = list(sampler)
        assert len(batches) == len(sampler)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(15))  # every case once per pass
        assert all(len({passes.locate(i)[0] for i in b}) == 1 for b in batches)  # one size per batch
        orders.append([passes.locate(b[0])[0] for b in batches][::3])
    assert len({tuple(o) for o in orders}) > 1  # the pass order is reshuffled between epochs
    torch.manual_seed(0)
    again = [list(sampler) for _ in range(4)]
    torch.manual_seed(0)
    assert again == [list(sampler) for _ in range(4)]  # torch's generator fixes the order (resume restores it)
    assert len(PassBatchSampler(passes, batch_size=2, drop_last=True)) == 3 * 2
    fixed = list(PassBatchSampler(passes, batch_size=5, shuffle=False, shuffle_passes=False))
    assert fixed == [list(range(0, 5)), list(range(5, 10)), list(range(10, 15))]
    loader = DataLoader(passes, batch_sampler=PassBatchSampler(passes, batch_size=2), num_workers=0)
    shapes = Counter(tuple(b["image"].shape[2:]) for b in loader)
    assert shapes == {(16, 16, 16): 3, (8, 8, 8): 3, (12, 12, 12): 3}


# ------------------------------------------------------------------------------------------------- final model, record


def toy_engine(net: torch.nn.Module, fail_at: int | None = None) -> Engine:
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def step(engine, batch):
        if fail_at is not None and engine.state.iteration == fail_at:
            raise RuntimeError("boom")
        opt.zero_grad()
        net(batch).sum().backward()
        opt.step()

    return Engine(step)


def test_final_model_saver_writes_the_last_weights_on_completion_only(tmp_path):
    net = torch.nn.Linear(3, 2)
    saver = FinalModelSaver(tmp_path / "models", net)
    engine = toy_engine(net)
    saver.attach(engine)
    saver.attach(engine)  # idempotent
    engine.run([torch.ones(1, 3)] * 3, max_epochs=2)
    saved = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert saved.keys() == net.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())
    assert saver.saved_epoch == 2

    crashed = FinalModelSaver(tmp_path / "crash", net)
    engine = toy_engine(net, fail_at=2)
    crashed.attach(engine)
    with pytest.raises(RuntimeError, match="boom"):
        engine.run([torch.ones(1, 3)] * 3, max_epochs=2)
    assert not (tmp_path / "crash" / "model.pt").exists()

    off = FinalModelSaver(tmp_path / "off", net, enabled=False)
    engine = toy_engine(net)
    off.attach(engine)
    engine.run([torch.ones(1, 3)], max_epochs=1)
    assert not (tmp_path / "off").exists()


def test_case_record(tmp_path):
    CaseRecord(tmp_path, [{"case_id": "b"}, {"case_id": "a"}], [{"case_id": "c"}], extra={"fold": 1})()
    content = read_case_record(tmp_path)
    assert content == {
        "model_selection": "best val_mean_dice",
        "trained_on": ["a", "b"],
        "selected_on": ["c"],
        "validated_on": ["c"],
        "fold": 1,
    }
    final = CaseRecord(tmp_path / "f", [{"case_id": "a"}], [{"case_id": "c"}], model_selection="final")()
    assert json.loads(final.read_text())["selected_on"] == []
    assert read_case_record(tmp_path / "missing") is None


# ------------------------------------------------------------------------------------------------- evaluation plan


@pytest.fixture
def datalist() -> dict:
    def case(i, fold=None, label=True):
        c = {"case_id": f"c{i}", "image": [f"c{i}_t1c"]}
        if label:
            c["label"] = f"c{i}_seg"
        if fold is not None:
            c["fold"] = fold
        return c

    return {
        "name": "toy",
        "num_folds": 2,
        "seed": 0,
        "training": [case(i, i % 2) for i in range(6)],
        "validation": [case(10)],
        "testing": [case(20), case(21, label=False)],
    }


def test_default_evaluation_scores_the_selection_cases_and_says_so(datalist):
    plan = evaluation_plan(datalist, fold=1)
    assert [c["case_id"] for c in plan.cases] == ["c1", "c3", "c5", "c10"]
    assert plan.held_out is False and plan.overlap["selected_on"] == ["c1", "c10", "c3", "c5"]
    assert "4 cases of toy: the validation fold 1 of the 2-fold split (seed 0)" in plan.statement
    assert "inferred: no models/cases.json" in plan.statement
    assert len(plan.warnings) == 1 and "used for model selection" in plan.warnings[0]
    assert "--eval_split testing" in plan.warnings[0] and "--eval_split all" in plan.warnings[0]
    assert "used for model selection" in evaluation_plan(datalist, split="validation").warnings[0]


def test_held_out_and_unknown_splits(datalist, tmp_path):
    testing = evaluation_plan(datalist, split="testing")
    assert [c["case_id"] for c in testing.cases] == ["c20"]  # the labelled one
    assert testing.held_out is True and testing.warnings == []
    assert "a held-out score" in testing.statement

    every = evaluation_plan(datalist, split="all")
    assert len(every.cases) == 8 and every.held_out is None
    assert "cannot tell whether the model was trained on toy" in every.warnings[0]

    # with the record a training run wrote, the check is exact for any split
    record = {"trained_on": ["c0", "c2"], "selected_on": ["c1"]}
    exact = evaluation_plan(datalist, split="all", case_record=record)
    assert exact.held_out is False and exact.overlap == {"selected_on": ["c1"], "trained_on": ["c0", "c2"]}
    assert len(exact.warnings) == 2 and "were training cases" in exact.warnings[1]
    CaseRecord(tmp_path, [{"case_id": "x"}], [{"case_id": "y"}])()
    clean = evaluation_plan(datalist, split="all", case_record=tmp_path)
    assert clean.held_out is True and "written by the training run" in clean.statement

    clean.report(tmp_path / "eval", print_it=False)
    written = json.loads((tmp_path / "eval" / "evaluated_cases.json").read_text())
    assert written["held_out"] is True and len(written["cases"]) == 8


def test_empty_splits_say_what_to_do(datalist):
    with pytest.raises(ValueError, match="trained on all labelled cases.*--eval_split testing"):
        evaluation_plan(datalist, train_on_all=True)
    with pytest.raises(ValueError, match="no 'validation' entries"):
        evaluation_plan({**datalist, "validation": []}, split="validation")
    with pytest.raises(ValueError, match="did you mean 'testing'"):
        evaluation_plan(datalist, split="test")
    trained_all = evaluation_plan(datalist, split="testing", train_on_all=True)
    assert trained_all.held_out is True


# ------------------------------------------------------------------------------------------------- overlays


def test_overlay_files_are_json_objects():
    for path in (SEG_OVERLAY, ESP_PAPER, ESP_CODE, ESP_CODE_TEST):
        assert isinstance(json.loads(path.read_text()), dict)


@pytest.mark.slow
def test_segresnet_paper_protocol_trains_on_all_cases_and_keeps_the_final_model(synthetic_dataset, tmp_path):
    """All 4 labelled cases train, validation never runs, ``model.pt`` holds the segmentation weights after the last
    epoch, ``cases.json`` says so, and Eq. 2's ``smooth_nr`` is 0. Then the evaluation statement: the default split
    has nothing to score (train_on_all), a labelled folder the run never saw is a held-out score."""
    wf = workflow("segresnet_vae", [SEG_OVERLAY], tmp_path, synthetic_dataset, epochs=2, roi_size=[32, 32, 32])
    parser = wf.parser
    assert len(parser.get_parsed_content("train_files")) == 4 and parser.get_parsed_content("val_files") == []
    assert parser.get_parsed_content("loss").dice.smooth_nr == 0.0
    evaluator = parser.get_parsed_content("validate#evaluator")
    ran = []
    evaluator.add_event_handler(Events.STARTED, lambda e: ran.append(e.state.epoch))
    wf.run()
    summary = parser.get_parsed_content("training_run").summary()
    assert ran == [] and summary["epochs_run"] == 2 and summary["model"] == str(tmp_path / "models" / "model.pt")
    saved = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    network = parser.get_parsed_content("network")
    final = {k: v for k, v in network.state_dict().items() if not k.startswith(VAE_PREFIX)}
    assert saved.keys() == final.keys() and all(torch.equal(saved[k], final[k].cpu()) for k in final)
    record = read_case_record(tmp_path / "models")
    assert record["model_selection"] == "final" and len(record["trained_on"]) == 4 and record["selected_on"] == []

    datalist = parser.get_parsed_content("datalist")
    with pytest.raises(ValueError, match="train_on_all"):
        evaluation_plan(datalist, split="fold", val_files=[], train_on_all=True)
    seen = evaluation_plan(datalist, split="all", case_record=tmp_path / "models")
    assert seen.held_out is False and len(seen.overlap["trained_on"]) == 4

    # the switch off: the bundle's own fold split and best-by-metric model
    off = workflow(
        "segresnet_vae",
        [SEG_OVERLAY],
        tmp_path / "off",
        synthetic_dataset,
        train_on_all=False,
        keep_model="best",
        epochs=1,
        roi_size=[32, 32, 32],
    )
    assert len(off.parser.get_parsed_content("val_files")) == 2
    assert [type(h).__name__ for h in off.parser.get_parsed_content("train#handlers")][-1] == "ValidationHandler"
    run_off = off.parser.get_parsed_content("training_run")
    assert run_off.keep_model == "best" and run_off.final_model.enabled is False
    on = parser.get_parsed_content("training_run")
    assert on.keep_model == "final" and any(isinstance(h, FinalModelSaver) for h in on.handlers()["trainer"])


@pytest.mark.slow
def test_espnet_code_protocol_epoch_is_three_resized_passes(synthetic_dataset, tmp_path):
    """One epoch = one pass per size of ``epoch_passes`` over the whole brain boxes resized to that size (batches of
    one size), the LR schedule steps once per such epoch; then ``evaluate.json`` with the proposed keys averages the
    native and a resized scale and prints the statement of what it scores (the selection fold: warned)."""
    sizes = [16, 24, 32]
    wf = workflow(
        "espnet3d",
        [ESP_CODE],
        tmp_path,
        synthetic_dataset,
        epochs=2,
        batch_size=2,
        epoch_passes=sizes,
        lr_milestones=[1],
        train_on_all=False,
        keep_model="best",
    )
    parser = wf.parser
    loader = parser.get_parsed_content("train#dataloader")
    assert len(loader) == 3 * 1  # 2 training cases, batch 2: one batch per pass
    network = parser.get_parsed_content("network")
    seen = []
    network.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)) if m.training else None)
    wf.run()
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 2 * 3
    assert sorted(s[2:] for s in seen) == sorted([(n, n, n) for n in sizes] * 2) and all(s[0] == 2 for s in seen)
    assert parser.get_parsed_content("optimizer").param_groups[0]["lr"] == pytest.approx(2.5e-4)  # stepped per epoch
    assert len(read_case_record(tmp_path / "models")["selected_on"]) == 2

    configs = REPO / "bundles" / "espnet3d" / "configs"
    ev = ConfigWorkflow(
        config_file=[str(configs / "train.json"), str(ESP_CODE), str(configs / "evaluate.json")],
        meta_file=str(configs / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(tmp_path),
        dataset_dir=str(synthetic_dataset),
        num_workers=0,
        network_width=WIDTH,
        num_folds=2,
        train_on_all=False,
        keep_model="best",
        test_scales=["native", 24],
    )
    ev.initialize()
    inferer = ev.parser.get_parsed_content("validate#inferer")
    assert isinstance(inferer, BratsInferer) and inferer.test_scales == [None, 24]
    ev.run()
    eval_dir = tmp_path / "eval" / f"{synthetic_dataset.name}-fold0"  # evaluate.json's eval_dir
    written = json.loads((eval_dir / "evaluated_cases.json").read_text())
    assert written["held_out"] is False and "used for model selection" in written["warnings"][0]
    assert len(list((eval_dir / "predictions").glob("*.nii.gz"))) == 2


@pytest.mark.slow
def test_evaluate_a_held_out_folder(synthetic_dataset, tmp_path):
    """A model trained on the synthetic dataset, evaluated with ``--dataset_dir <another labelled folder>
    --eval_split all``: the statement, from the run's ``cases.json``, says the score is held out."""
    from brats_pipeline.tools.synthetic import generate_dataset

    holdout = tmp_path / "holdout"
    generate_dataset(holdout, 2, "brats2023", (32, 32, 32), seed=7, start_index=501)
    wf = workflow("espnet3d", [ESP_CODE], tmp_path, synthetic_dataset, epochs=1, batch_size=2, epoch_passes=[24])
    wf.run()
    configs = REPO / "bundles" / "espnet3d" / "configs"
    ev = ConfigWorkflow(
        config_file=[str(configs / "train.json"), str(configs / "evaluate.json")],
        meta_file=str(configs / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(tmp_path),
        dataset_dir=str(holdout),
        num_workers=0,
        network_width=WIDTH,
        num_folds=2,
        test_scales=None,
        eval_split="all",
    )
    ev.initialize()
    ev.run()
    eval_dir = tmp_path / "eval" / "holdout-all"  # evaluate.json's eval_dir: <dataset folder>-<eval_split>
    written = json.loads((eval_dir / "evaluated_cases.json").read_text())
    assert written["held_out"] is True and written["warnings"] == []
    assert written["cases"] == ["BraTS-GLI-00501-000", "BraTS-GLI-00502-000"]
    assert json.loads((eval_dir / "brats2023" / "metrics_summary.json").read_text())["n_cases"] == 2


# ------------------------------------------------------------------------------------------------- 3D-ESPNet's two sources


def test_class_iou_is_the_reference_miou():
    """``ClassIoUMetric``: per case, the IoU of each class with the reference's epsilon (a class absent from both
    scores 0), averaged over the classes and then over the cases: the reference's ``iouEval`` (``IOUEval.py``)
    written out with numpy, less its constant factor cases / (cases + 1)."""
    import numpy as np

    from brats_pipeline.training.validation import ClassIoUMetric, class_iou_metrics

    g = torch.Generator().manual_seed(0)
    preds = [torch.randint(0, 4, (1, 6, 5, 4), generator=g) for _ in range(3)]
    refs = [torch.randint(0, 3, (1, 6, 5, 4), generator=g) for _ in range(3)]  # class 3 absent from the references

    def reference_case(pred, gth):  # iouEval.addBatch's per-batch mIOU
        hist = np.bincount(4 * gth.numpy().flatten() + pred.numpy().flatten(), minlength=16).reshape(4, 4)
        iou = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist) + 0.00000001)
        return np.nanmean(iou)

    metric = ClassIoUMetric()
    for p, r in zip(preds, refs, strict=True):
        metric(p[None], r[None])
    expected = np.mean([reference_case(p, r) for p, r in zip(preds, refs, strict=True)])
    assert float(metric.aggregate()) == pytest.approx(expected, rel=1e-6)
    # the handler recovers the classes from the engines' nested regions
    regions = torch.stack([refs[0] == 1, refs[0] >= 1, refs[0] == 3]).squeeze(1).float()
    handler = class_iou_metrics()["val_mean_iou"]
    classes, labels = handler._output_transform([{"pred": regions, "label": regions}])
    assert torch.equal(classes[0].long(), labels[0].long())
    assert torch.equal(classes[0].long(), torch.where(refs[0] == 2, 2, refs[0]).long())


def test_espnet_code_protocol_schedule_is_main_py():
    """lr 5e-4 halved every 100 epochs for 500 epochs (``main.py``: ``StepLR(step_size=100, gamma=0.5)`` stepped at
    the start of each epoch), weighted cross-entropy, weight decay 2e-4, batch 4, passes 144/96/128: every epoch's
    learning rate of the overlay's ``MultiStepLR`` equals ``main.py``'s."""
    configs = REPO / "bundles" / "espnet3d" / "configs"
    parser = ConfigWorkflow(
        config_file=[str(configs / "train.json"), str(ESP_CODE)], workflow_type="train", logging_file=False,
        meta_file=str(configs / "metadata.json"),
    ).parser  # fmt: skip
    assert [parser.get_parsed_content(k) for k in ("epochs", "batch_size", "weight_decay", "loss_name")] == [
        500, 4, 2e-4, "cross_entropy",
    ]  # fmt: skip
    assert parser.get_parsed_content("epoch_passes") == [144, 96, 128]
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=parser.get_parsed_content("learning_rate"))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, parser.get_parsed_content("lr_milestones"), parser.get_parsed_content("lr_gamma")
    )
    ours = []
    for _ in range(500):  # LrScheduleHandler steps once at the end of every epoch
        ours.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    assert ours == [pytest.approx(5e-4 * 0.5 ** (epoch // 100)) for epoch in range(500)]


@pytest.mark.slow
def test_espnet_code_protocol_trains_on_all_and_selects_on_the_separate_folder(synthetic_dataset, tmp_path):
    """The README's "Option 3": every case of ``dataset_dir`` trains, the cases of ``val_dataset_dir`` (a separate
    labelled folder) validate, and ``model.pt`` is the epoch with the best validation mIoU; without the folder the
    final model is kept and nothing validates. At test time the 144^3 scale is pooled (``"area"``)."""
    from brats_pipeline.tools.synthetic import generate_dataset

    held = tmp_path / "brats17"
    generate_dataset(held, 2, "brats2023", (32, 32, 32), seed=9, start_index=701)
    wf = workflow("espnet3d", [ESP_CODE], tmp_path, synthetic_dataset, epochs=1, batch_size=2, epoch_passes=[24],
                  val_dataset_dir=str(held))  # fmt: skip
    assert len(wf.parser.get_parsed_content("train_files")) == 4
    assert [c["case_id"] for c in wf.parser.get_parsed_content("val_files")] == [
        "BraTS-GLI-00701-000",
        "BraTS-GLI-00702-000",
    ]
    wf.run()
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    assert evaluator.state.key_metric_name == "val_mean_iou" and "val_mean_dice" in evaluator.state.metrics
    record = read_case_record(tmp_path / "models")
    assert record["model_selection"] == "best val_mean_iou" and len(record["trained_on"]) == 4
    assert record["selected_on"] == ["BraTS-GLI-00701-000", "BraTS-GLI-00702-000"]
    assert (tmp_path / "models" / "model.pt").is_file()

    none = workflow("espnet3d", [ESP_CODE], tmp_path / "none", synthetic_dataset, epochs=1, epoch_passes=[24])
    assert none.parser.get_parsed_content("val_files") == []
    assert none.parser.get_parsed_content("training_run").keep_model == "final"

    configs = REPO / "bundles" / "espnet3d" / "configs"
    for files, key in (([configs / "train.json", ESP_CODE, configs / "evaluate.json"], "validate#inferer"),
                       ([configs / "inference.json", ESP_CODE_TEST], "inferer")):  # fmt: skip
        parser = ConfigWorkflow(config_file=[str(f) for f in files], workflow_type="inference", logging_file=False,
                                meta_file=str(configs / "metadata.json"), bundle_root=str(tmp_path)).parser  # fmt: skip
        inferer = parser.get_parsed_content(key)
        assert inferer.test_scales == [None, (144, 144, 144)] and inferer.scale_modes == ["trilinear", "area"], key


@pytest.mark.slow
def test_espnet_paper_protocol_selects_by_miou_on_the_withheld_fold(synthetic_dataset, tmp_path):
    """The paper's reading: one fold of five withheld (80:20; two folds here for four cases), the bundle's weighted
    mIoU loss, 1e-4 decreased tenfold after 200 of 300 epochs, batch 4, scaling and flips, and the model kept by
    the mIoU of the withheld cases."""
    wf = workflow("espnet3d", [ESP_PAPER], tmp_path, synthetic_dataset, epochs=1, batch_size=2, roi_size=[24, 24, 24])
    parser = wf.parser
    assert type(parser.get_parsed_content("loss")).__name__ == "WeightedJaccardLoss"
    assert [parser.get_parsed_content(k) for k in ("learning_rate", "lr_milestones", "lr_gamma")] == [1e-4, [200], 0.1]
    assert len(parser.get_parsed_content("val_files")) == 2 and len(parser.get_parsed_content("train_files")) == 2
    wf.run()
    evaluator = parser.get_parsed_content("validate#evaluator")
    assert evaluator.state.key_metric_name == "val_mean_iou"
    assert read_case_record(tmp_path / "models")["model_selection"] == "best val_mean_iou"
