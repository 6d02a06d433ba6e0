"""The ensemble recipe (``brats-ensemble train|predict``, python-fire): the commands it builds, and for both
bundles the whole recipe at tiny size as documented in docs/experiments.md: two members (folds 0 and 1 of a 2-fold
split of the 32^3 synthetic dataset), one epoch each at width 8, then the ensemble's prediction of two held-out
synthetic cases, scored."""

from __future__ import annotations

import ast
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest

from brats_pipeline.bundle.command_line import CommandLineError
from brats_pipeline.tools import ensembles as ensemble_tool
from brats_pipeline.tools.ensembles import (
    MANIFEST_NAME,
    architecture_overrides,
    member_commands,
    predict_command,
    seen_by_members,
)
from brats_pipeline.tools.synthetic import generate_dataset
from brats_pipeline.training.records import CaseRecord

REPO = Path(__file__).resolve().parents[1]


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_member_commands_folds_and_seeds(tmp_path):
    members = member_commands(
        REPO / "bundles" / "segresnet_vae",
        tmp_path,
        folds=[0, 3],
        configs=["configs/segresnet_paper_protocol.json"],
        datalist_file=tmp_path / "datalist.json",
        dataset_dir=tmp_path / "data",
        extra=["--epochs", "2"],
        python="python",
    )
    assert [m["name"] for m in members] == ["member_fold0", "member_fold3"]
    cmd = members[1]["command"]
    assert cmd[:5] == ["python", "-m", "monai.bundle", "run", "training"]
    files = ast.literal_eval(option(cmd, "--config_file"))  # what python-fire reads back: a list
    assert files == [
        str(REPO / "bundles" / "segresnet_vae" / "configs" / "train.json"),
        str(REPO / "configs" / "segresnet_paper_protocol.json"),
    ]
    assert option(cmd, "--bundle_root") == str(tmp_path.resolve() / "member_fold3")
    assert option(cmd, "--fold") == "3" and cmd[-2:] == ["--epochs", "2"]
    assert members[1]["model"] == str(tmp_path.resolve() / "member_fold3" / "models" / "model.pt")
    seeds = member_commands(REPO / "bundles" / "espnet3d", tmp_path, seeds=[1, 2], datalist_file="d.json")
    assert [option(m["command"], "--seed") for m in seeds] == ["1", "2"] and "--fold" not in seeds[0]["command"]
    with pytest.raises(ValueError, match="either folds or seeds"):
        member_commands(REPO / "bundles" / "espnet3d", tmp_path, folds=[0], seeds=[0])
    with pytest.raises(ValueError, match="distinct"):
        member_commands(REPO / "bundles" / "espnet3d", tmp_path, folds=[0, 0])
    with pytest.raises(FileNotFoundError, match="not a bundle folder"):
        member_commands(tmp_path, tmp_path, folds=[0])


def test_predict_command_follows_ensemble_json_conventions(tmp_path):
    manifest = {
        "bundle": str(REPO / "bundles" / "espnet3d"),
        "train_overrides": ["--epochs", "1", "--network_width", "8", "--network_def#upsample", "deconv", "--fold", "0"],
        "members": [{"model": "/m/a/model.pt"}, {"model": "/m/b/model.pt"}],
    }
    cmd = predict_command(manifest, tmp_path, tmp_path / "cases", tta=True, test_scales="['native',144]", python="py")
    files = ast.literal_eval(option(cmd, "--config_file"))
    assert files == [
        str(REPO / "bundles" / "espnet3d" / "configs" / "inference.json"),
        str(REPO / "configs" / "ensemble.json"),
        str(REPO / "configs" / "tta.json"),
    ]
    assert ast.literal_eval(option(cmd, "--ensemble_checkpoints")) == ["/m/a/model.pt", "/m/b/model.pt"]
    assert option(cmd, "--network_width") == "8" and option(cmd, "--network_def#upsample") == "deconv"
    assert "--epochs" not in cmd and "--fold" not in cmd  # only the architecture is repeated
    assert option(cmd, "--inferer#test_scales") == "['native',144]" and option(cmd, "--overwrite") == "True"
    with pytest.raises(ValueError, match="test_scales"):
        predict_command(manifest, tmp_path, tmp_path, test_scales="[0]")
    ensemble = json.loads((REPO / "configs" / "ensemble.json").read_text())
    assert ensemble["inferer#include_given_network"] == "@ensemble_include_bundle_model"  # the members are the list


def test_argument_helpers(tmp_path):
    assert architecture_overrides(["--network_width=16", "--amp", "--network_def::init_filters", "8"]) == [
        "--network_width",
        "16",
        "--network_def::init_filters",
        "8",
    ]
    members = []
    for name, train, val in (("m0", ["a", "b"], ["c"]), ("m1", ["a", "c"], ["b"])):
        CaseRecord(tmp_path / name / "models", [{"case_id": i} for i in train], [{"case_id": i} for i in val])()
        members.append({"name": name, "bundle_root": str(tmp_path / name)})
    statement, warnings = seen_by_members({"members": members}, ["x", "y"])
    assert warnings == [] and "held out" in statement
    statement, warnings = seen_by_members({"members": members}, ["b", "x"])
    assert "NOT held out" in statement and len(warnings) == 2


def run_cli(monkeypatch, *args: str) -> None:
    """``brats-ensemble <args>`` in this process (python-fire reads ``sys.argv``)."""
    monkeypatch.setattr(sys, "argv", ["brats-ensemble", *args])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # fire_command installs the one-line error handler
    ensemble_tool.cli()


def test_command_line_passes_overrides_to_the_members(tmp_path, monkeypatch, capsys):
    run_cli(
        monkeypatch, "train", "--bundle", str(REPO / "bundles" / "espnet3d"), "--output_dir", str(tmp_path),
        "--datalist_file", str(tmp_path / "d.json"), "--folds", "[0,2]", "--config", "configs/espnet_paper_protocol.json",
        "--dry_run", "--epochs", "3", "--roi_size", "[24,24,24]", "--network_def#upsample", "deconv",
        "--logging_file", "False", "--run_name", "'1'",
    )  # fmt: skip
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert [option(c, "--fold") for c in commands] == ["0", "2"]
    assert option(commands[1], "--bundle_root") == str(tmp_path.resolve() / "member_fold2")
    assert ast.literal_eval(option(commands[0], "--config_file"))[1] == str(
        REPO / "configs" / "espnet_paper_protocol.json"
    )
    # each override as text python-fire reads back as the same value (the string '1' stays a string)
    assert commands[0][-10:] == [
        "--epochs", "3", "--roi_size", "[24, 24, 24]", "--network_def#upsample", "deconv",
        "--logging_file", "False", "--run_name", "'1'",
    ]  # fmt: skip
    run_cli(monkeypatch, "train", "--bundle", str(REPO / "bundles" / "espnet3d"), "--output_dir", str(tmp_path),
            "--datalist_file", "d.json", "--seeds", "1,2", "--dry_run")  # fmt: skip
    assert [option(shlex.split(c), "--seed") for c in capsys.readouterr().out.splitlines()] == ["1", "2"]

    manifest = {
        "bundle": str(REPO / "bundles" / "espnet3d"),
        "train_overrides": ["--network_width", "8"],
        "members": [{"name": "m0", "bundle_root": str(tmp_path / "m0"), "model": str(tmp_path / "m0" / "model.pt")}],
    }
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    run_cli(monkeypatch, "predict", "--output_dir", str(tmp_path), "--dataset_dir", str(tmp_path), "--tta",
            "--test_scales", "['native',144]", "--dry_run", "--num_workers", "0")  # fmt: skip
    cmd = shlex.split(capsys.readouterr().out)
    assert ast.literal_eval(option(cmd, "--config_file"))[-1] == str(REPO / "configs" / "tta.json")
    assert option(cmd, "--inferer#test_scales") == "['native', 144]" and option(cmd, "--network_width") == "8"
    assert cmd[-2:] == ["--num_workers", "0"]


def test_command_line_mistakes(tmp_path, monkeypatch):
    bundle = str(REPO / "bundles" / "espnet3d")
    with pytest.raises(CommandLineError, match=r"--tta false is not a boolean.*--tta True or --tta False"):
        ensemble_tool.predict(output_dir=str(tmp_path), dataset_dir=str(tmp_path), tta="false")
    with pytest.raises(CommandLineError, match="--test_scales"):
        ensemble_tool.predict(output_dir=str(tmp_path), dataset_dir=str(tmp_path), test_scales=[0])
    with pytest.raises(CommandLineError, match="either --folds or --seeds"):
        ensemble_tool.train(bundle=bundle, output_dir=str(tmp_path), datalist_file="d.json", folds=0, seeds=1)
    with pytest.raises(CommandLineError, match="distinct"):
        ensemble_tool.train(bundle=bundle, output_dir=str(tmp_path), datalist_file="d.json", folds=(0, 0))
    with pytest.raises(CommandLineError, match="--dataset_dir"):
        ensemble_tool.train(bundle=bundle, output_dir=str(tmp_path), folds=0)
    with pytest.raises(CommandLineError, match="--dry_run"):
        ensemble_tool.train(bundle=bundle, output_dir=str(tmp_path), datalist_file="d.json", folds=0, dry_run="no")
    # the former nargs form: python-fire leaves "1 2" over; refused before anything runs
    args = ["train", "--bundle", bundle, "--output_dir", str(tmp_path), "--datalist_file", "d.json", "--folds"]
    with pytest.raises(CommandLineError, match=r"unexpected argument\(s\) 1 2.*--folds"):
        run_cli(monkeypatch, *args, "0", "1", "2")
    # the former "-- <overrides>": python-fire would take them as its own flags and drop them
    with pytest.raises(SystemExit, match="options after '--'.*--epochs"):
        run_cli(monkeypatch, *args, "0", "--", "--epochs", "3")
    assert not (tmp_path / MANIFEST_NAME).exists()


@pytest.fixture(scope="module")
def holdout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("holdout")
    generate_dataset(root, 2, "brats2023", (32, 32, 32), seed=1000, start_index=1001)
    return root


def ensembles(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "brats_pipeline.tools.ensembles", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "bundle, tiny",
    [
        ("segresnet_vae", ["--roi_size", "[32,32,32]"]),
        ("espnet3d", ["--roi_size", "[24,24,24]", "--batch_size", "1"]),
    ],
)
def test_ensemble_recipe_end_to_end(bundle, tiny, synthetic_dataset, holdout, tmp_path):
    out = tmp_path / "ens"
    common = ["--epochs", "1", "--network_width", "8", "--num_workers", "0", "--logging_file", "False"]
    train = ensembles(
        "train",
        "--bundle",
        str(REPO / "bundles" / bundle),
        "--output_dir",
        str(out),
        "--dataset_dir",
        str(synthetic_dataset),
        "--num_folds",
        "2",
        "--folds",
        "[0,1]",
        *common,
        *tiny,
        cwd=tmp_path,
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert "ensemble of 2 members" in train.stdout
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert [m["name"] for m in manifest["members"]] == ["member_fold0", "member_fold1"]
    for m in manifest["members"]:
        assert Path(m["model"]).is_file() and m["returncode"] == 0
        assert m["trained_on"] == 2 and m["selected_on"] == 2
    datalist = json.loads((out / "datalist.json").read_text())
    assert datalist["num_folds"] == 2 and len(datalist["training"]) == 4

    predict = ensembles(
        "predict", "--output_dir", str(out), "--dataset_dir", str(holdout), "--score",
        "--num_workers", "0", "--logging_file", "False", cwd=tmp_path,
    )  # fmt: skip
    assert predict.returncode == 0, predict.stdout[-3000:] + predict.stderr[-3000:]
    assert "none of them trained or chose any of the 2 members: held out" in predict.stdout
    assert "--ensemble_checkpoints" in predict.stdout and "configs/ensemble.json" in predict.stdout
    predictions = sorted((out / "eval" / "predictions").glob("*.nii.gz"))
    assert [p.name for p in predictions] == ["BraTS-GLI-01001-000.nii.gz", "BraTS-GLI-01002-000.nii.gz"]
    assert nib.load(predictions[0]).shape == (32, 32, 32)
    summary = json.loads((out / "eval" / "scores" / "metrics_summary.json").read_text())
    assert summary["n_cases"] == 2

    # the ensemble's own training cases are not held out: the recipe says so before predicting
    seen = ensembles(
        "predict", "--output_dir", str(out), "--dataset_dir", str(synthetic_dataset), "--dry_run", cwd=tmp_path
    )
    assert seen.returncode == 0 and "--ensemble_checkpoints" in seen.stdout
    from brats_pipeline.tools.ensembles import read_manifest

    statement, warnings = seen_by_members(read_manifest(out), [c["case_id"] for c in datalist["training"]])
    assert "NOT held out" in statement and len(warnings) == 4


@pytest.mark.slow
def test_segresnet_reported_numbers_recipe(synthetic_dataset, holdout, tmp_path):
    """Myronenko's reported numbers come from 10 models trained from scratch on all cases, averaged with 8-flip TTA.
    The documented two commands (docs/experiments.md) at tiny size with K = 2 seeds: each member trains on every
    labelled case and keeps its final weights; the prediction averages both members over the 8 flips."""
    out = tmp_path / "paper"
    train = ensembles(
        "train", "--bundle", str(REPO / "bundles" / "segresnet_vae"), "--output_dir", str(out),
        "--dataset_dir", str(synthetic_dataset), "--seeds", "[0,1]", "--config", "configs/segresnet_paper_protocol.json",
        "--num_folds", "2", "--epochs", "1", "--network_width", "8", "--roi_size", "[32,32,32]", "--num_workers", "0",
        "--logging_file", "False", cwd=REPO,
    )  # fmt: skip
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert [m["name"] for m in manifest["members"]] == ["member_seed0", "member_seed1"]
    for member in manifest["members"]:
        record = json.loads((Path(member["model"]).parent / "cases.json").read_text())
        assert record["model_selection"] == "final" and len(record["trained_on"]) == 4 and record["selected_on"] == []
    predict = ensembles(
        "predict", "--output_dir", str(out), "--dataset_dir", str(holdout), "--tta", "--num_workers", "0",
        "--logging_file", "False", cwd=REPO,
    )  # fmt: skip
    assert predict.returncode == 0, predict.stdout[-3000:] + predict.stderr[-3000:]
    assert "configs/tta.json" in predict.stdout and predict.stdout.count("member_seed") >= 2
    predictions = sorted((out / "eval" / "predictions").glob("*.nii.gz"))
    assert [p.name for p in predictions] == ["BraTS-GLI-01001-000.nii.gz", "BraTS-GLI-01002-000.nii.gz"]
