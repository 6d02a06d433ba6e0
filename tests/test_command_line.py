"""Command-line safety (:mod:`brats_pipeline.bundle.command_line`) against the shipped configs of both bundles.

In-process: :func:`check_command_line` on real argv lists (typos named with the nearest key, boolean text refused,
documented commands accepted) and :func:`user_error_message` on the exceptions MONAI, torch and this package raise.
End to end: real ``python -m monai.bundle run`` processes on tiny (32^3) synthetic data. The shipped configs are not
edited here: every run merges a temporary overlay (``tmp``) whose ``initialize`` puts :data:`GUARD_ITEMS` before the
bundle's own steps, as the configs' ``initialize`` does once the items are wired in; a user mistake must then end with
status 1 and exactly one stderr line ``error: ...`` (MONAI's own warning that configs run code is printed before
``initialize`` and is the only other line allowed).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import monai
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from brats_pipeline.bundle import command_line
from brats_pipeline.bundle.command_line import (
    USER_ERRORS,
    CommandLineError,
    UserError,
    check_command_line,
    install_error_handler,
    parse_command_line,
    user_error_message,
)
from brats_pipeline.data.screening import BadCasesError, CaseError, DatasetError
from brats_pipeline.tools.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("segresnet_vae", "espnet3d")
SHAPE = (32, 32, 32)
#: the guard step of initialize, as the configs name it (by _target_, after @bundle_code has put scripts/ on sys.path)
GUARD_ITEMS = [{"_target_": "brats_pipeline.bundle.command_line.guard_bundle_run", "_requires_": "@bundle_code"}]
#: MONAI prints this warning (one line) before ``initialize`` runs; it is not ours to silence
MONAI_TRUST_WARNING = "parsing config_file "
#: TrainingRun's label pre-check draws a tqdm bar on stderr whatever --progress says; its lines are not counted
PROGRESS_BAR = re.compile(r"^[^:]*: +\d+%\|")
ENV = {k: v for k, v in os.environ.items() if k != command_line.DEBUG_ENV} | {"OMP_NUM_THREADS": "1"}


def config(bundle: str, name: str) -> str:
    return str(REPO / "bundles" / bundle / "configs" / f"{name}.json")


def run_args(bundle: str, name: str, *overrides: str) -> list[str]:
    return ["run", "--config_file", config(bundle, name), *overrides]


def refused(argv: list[str]) -> str:
    with pytest.raises(CommandLineError) as info:
        check_command_line(argv)
    return str(info.value)


# --- python-fire's reading of the command line --------------------------------------------------------------------


def test_parse_like_python_fire():
    command, params, overrides = parse_command_line(
        ["run", "training", "--config_file", "['a.json','b.json']", "--epochs=3", "--tta", "false", "--resume",
         "--network-width", "8", "--network_def#init_filters", "16", "--noamp", "--", "--help"]
    )  # fmt: skip
    assert command == "run"
    assert params == {"run_id": "training", "config_file": ["a.json", "b.json"]}
    got = {o.key: (o.flag, o.text, o.value) for o in overrides}
    assert got == {
        "epochs": ("--epochs", "3", 3),
        "tta": ("--tta", "false", "false"),  # the truthy string, as python-fire passes it on
        "resume": ("--resume", "True", True),  # a flag without value
        "network_width": ("--network-width", "8", 8),  # python-fire turns "-" into "_"
        "network_def::init_filters": ("--network_def#init_filters", "16", 16),
        "amp": ("--noamp", "False", False),  # python-fire: a lone --noX is X=False
    }


# --- overrides checked against the shipped configs ----------------------------------------------------------------

ACCEPTED = {
    "segresnet_vae": [
        ("train", ["--epochs", "1", "--network_def#init_filters", "8", "--train#dataloader#batch_size", "2"]),
        ("train", ["--train::dataloader::batch_size", "2", "--resume", "True", "--tensorboard", "False"]),
        ("train", ["--network_def#vae_estimate_std", "False"]),  # a new argument that SegResNetVAE2018 takes
        ("inference", ["--tta", "True", "--network_width", "8", "--sw_roi_size=[16,16,16]"]),
    ],
    "espnet3d": [
        ("train", ["--epochs", "1", "--network_def#channels", "[4,8,16,32]", "--loss_name", "cross_entropy"]),
        ("inference", ["--tta", "False", "--save_overlays", "$True", "--inferer#tta", "True"]),
    ],
}
RUN_ITSELF = ["--bundle_root", "/tmp/b", "--logging_file", "False", "--meta_file", "m.json", "--workflow_type", "train",
              "--tracking", "mlflow", "--experiment_name", "x", "--_meta_#version", "0.2.0"]  # fmt: skip


@pytest.mark.parametrize("bundle", BUNDLES)
def test_supported_overrides_pass(bundle):
    for name, overrides in ACCEPTED[bundle]:
        check_command_line(["run", "training", "--config_file", config(bundle, name), *overrides, *RUN_ITSELF])
    merged = str([config(bundle, "train"), config(bundle, "evaluate")])  # a key only evaluate.json has
    check_command_line(
        ["run", "--config_file", merged, "--strict", "True", "--validate#save_prediction#overwrite=False"]
    )
    merged = str([config(bundle, "train"), config(bundle, "multi_gpu_train")])
    check_command_line(["run", "--config_file", merged, "--sync_batchnorm", "False"])


@pytest.mark.parametrize("bundle", BUNDLES)
def test_unknown_override_names_the_nearest_key(bundle):
    train = config(bundle, "train")
    assert refused(["run", "training", "--config_file", train, "--epoch", "1"]) == (
        "unknown override --epoch: did you mean --epochs?"
    )
    assert refused(["run", "--config_file", train, "--learningrate=0.1"]) == (
        "unknown override --learningrate: did you mean --learning_rate?"
    )
    assert refused(["run", "--config_file", train, "--network_deff#in_channels", "4"]) == (
        "unknown override --network_deff#in_channels: did you mean --network_def#in_channels?"
    )
    assert refused(["run", "--config_file", train, "--train::trainer::max_epoch", "4"]) == (
        "unknown override --train::trainer::max_epoch: SupervisedTrainer takes no argument 'max_epoch'; "
        "did you mean --train::trainer::max_epochs?"
    )
    assert (
        refused(["run", "--config_file", train, "--zzz", "1"]) == "unknown override --zzz: train.json has no key 'zzz'"
    )
    assert refused(["run", "--config_file", train, "--config_files", "x.json"]).startswith(
        "unknown override --config_files: did you mean --config_file"
    )  # run()'s own arguments are candidates too
    # evaluate.json's key is unknown to train.json alone
    assert "--strict" in refused(["run", "--config_file", train, "--strict", "True"])


def test_new_argument_must_be_one_the_component_takes():
    espnet, segresnet = config("espnet3d", "train"), config("segresnet_vae", "train")
    check_command_line(["run", "--config_file", segresnet, "--network_def#init_filters", "8"])
    assert refused(["run", "--config_file", espnet, "--network_def#init_filters", "8"]) == (
        "unknown override --network_def#init_filters: ESPNet3D takes no argument 'init_filters'"
    )
    assert refused(["run", "--config_file", segresnet, "--network_def#init_filter", "8"]) == (
        "unknown override --network_def#init_filter: SegResNetVAE2018 takes no argument 'init_filter'; "
        "did you mean --network_def#init_filters?"
    )


@pytest.mark.parametrize("text", ["false", "true", "yes", "no", "0", "1", "FALSE"])
def test_boolean_key_refuses_text(text):
    message = refused(run_args("espnet3d", "inference", "--tta", text))
    what = f"the string {text!r}" if not text.isdigit() else f"the int {text}"
    meant = text.lower() in ("true", "yes", "1")
    assert message == (f"--tta {text} is {what}; write --tta {meant} (python-fire turns only True/False into booleans)")
    assert "--resume" in refused(run_args("segresnet_vae", "train", f"--resume={text}"))
    # an argument whose default is a boolean, not a JSON key: BratsInferer(tta=False)
    assert "--validate#inferer#tta" in refused(run_args("segresnet_vae", "train", "--validate#inferer#tta", text))


def test_true_false_text_refused_for_any_key():
    """'false' is truthy: refused for keys whose value is an expression (amp) and for run()'s own arguments."""
    assert refused(run_args("espnet3d", "train", "--amp", "false")).startswith("--amp false is the string 'false'")
    assert refused(run_args("espnet3d", "train", "--logging_file", "false")).startswith("--logging_file false is")
    check_command_line(run_args("espnet3d", "train", "--amp", "False", "--dataset_dir", "no"))  # other text is text


def test_all_problems_in_one_message(tmp_path):
    message = refused(run_args("espnet3d", "train", "--epoch", "1", "--resume", "false"))
    assert message.startswith("2 problems: (1) unknown override --epoch: did you mean --epochs? (2) --resume false")
    args_file = tmp_path / "args.json"  # keys of an --args_file are overrides too, and it may name the config
    args_file.write_text(json.dumps({"config_file": config("espnet3d", "train"), "epoch": 2}))
    assert refused(["run", "--args_file", str(args_file)]) == "unknown override --epoch: did you mean --epochs?"


@pytest.mark.parametrize("text", ["None", "none", "null", "NULL"])
def test_none_refused_for_a_key_with_a_value(text):
    """python-fire turns None into None and MONAI drops None overrides: --dataset_dir None would silently run on the
    config's /workspace/data/... folder. Refused, in one line saying to give a folder."""
    for bundle in BUNDLES:
        default = json.loads(Path(config(bundle, "train")).read_text())["dataset_dir"]
        message = refused(run_args(bundle, "train", "--dataset_dir", text))
        assert message.startswith(f"--dataset_dir {text} ") and message.endswith(
            "give a folder: --dataset_dir /path/to/folder"
            + ("" if text == "None" else f" (the config's value is {default!r})")
        ), message
        assert repr(default) in message and "\n" not in message
    assert refused(run_args("espnet3d", "train", "--dataset_dir", "None")) == (
        "--dataset_dir None is ignored: MONAI drops an override whose value is None and the run would use the "
        "config's value '/workspace/data/BraTS2021_TrainingData'; give a folder: --dataset_dir /path/to/folder"
    )
    # an expression (the output folder), a number, a boolean, a component: all have a value that None would keep
    assert "give a folder: --output_dir" in refused(run_args("segresnet_vae", "inference", "--output_dir", text))
    assert "give a value: --sw_overlap VALUE" in refused(run_args("segresnet_vae", "inference", "--sw_overlap", text))
    assert "write --tta True or --tta False" in refused(run_args("espnet3d", "inference", "--tta", text))
    quickstart = str([config("segresnet_vae", "train"), str(REPO / "configs" / "quickstart.json")])
    assert "ensure_dataset(...)" in refused(["run", "training", "--config_file", quickstart, "--dataset_dir", text])


def test_none_accepted_where_it_changes_nothing_or_is_a_choice():
    check_command_line(run_args("segresnet_vae", "inference", "--test_scales", "None"))  # null already
    check_command_line(run_args("segresnet_vae", "inference", "--inferer#activation", "none"))  # a string choice
    check_command_line(run_args("segresnet_vae", "train", "--dataset_dir", "/data/none"))  # a folder that says none


def test_overlay_before_the_bundle_config_refused(tmp_path, monkeypatch):
    """MONAI takes the first config file's folder as the bundle's configs/ folder: an overlay first would read no
    metadata.json and write models/ and eval/ at the repository root."""
    monkeypatch.chdir(REPO)
    wrong = "['configs/quickstart.json','bundles/segresnet_vae/configs/train.json']"
    assert refused(["run", "training", "--config_file", wrong]) == (
        "--config_file lists configs/quickstart.json before the bundle's config bundles/segresnet_vae/configs/train.json: "
        "MONAI takes the first file's folder for the bundle's configs/ folder (metadata.json, models/, eval/); list the "
        "bundle's config first: --config_file \"['bundles/segresnet_vae/configs/train.json','configs/quickstart.json']\""
    )
    # the suggested order passes, and so do two files of the bundle, or overlays alone (not a bundle run)
    check_command_line(["run", "training", "--config_file", "['bundles/segresnet_vae/configs/train.json','configs/quickstart.json']"])  # fmt: skip
    check_command_line(["run", "--config_file", str([config("espnet3d", "train"), config("espnet3d", "evaluate")])])
    check_command_line(["run", "--config_file", "configs/quickstart.json,configs/tta.json"])
    # several overlays and bundle files, comma-separated: bundle files first, each group in the order given
    mixed = "configs/tta.json,bundles/espnet3d/configs/inference.json,configs/ensemble.json"
    assert refused(["run", "--config_file", mixed]).endswith(
        "--config_file \"['bundles/espnet3d/configs/inference.json','configs/tta.json','configs/ensemble.json']\""
    )
    # a bundle config is a file in a configs/ folder holding metadata.json: a copied bundle counts, a bare folder not
    bundle = tmp_path / "my_bundle" / "configs"
    bundle.mkdir(parents=True)
    (bundle / "train.json").write_text(Path(config("espnet3d", "train")).read_text())
    overlay = tmp_path / "overlay.json"
    overlay.write_text(json.dumps({"epochs": 1}))
    check_command_line(["run", "--config_file", str([str(overlay), str(bundle / "train.json")])])
    (bundle / "metadata.json").write_text(Path(config("espnet3d", "metadata")).read_text())
    assert "list the bundle's config first" in refused(
        ["run", "--config_file", str([str(overlay), str(bundle / "train.json")])]
    )


def test_only_the_bundle_command_line_is_checked(monkeypatch):
    bad = ["run", "--config_file", config("espnet3d", "train"), "--epoch", "1"]
    monkeypatch.setattr(sys, "argv", ["pytest", *bad])
    check_command_line()  # a ConfigWorkflow in some other program: its argv is not ours to judge
    monkeypatch.setattr(sys, "argv", [str(Path(monai.__file__).parent / "bundle" / "__main__.py"), *bad])
    with pytest.raises(CommandLineError, match="--epochs"):
        check_command_line()
    check_command_line(["verify_metadata", "--meta_file", "x", "--filepath", "y"])  # other commands: not checked


def _documented_commands() -> list[tuple[str, list[str], Path, str]]:
    """``monai.bundle run`` commands of README.md, docs/ and the model cards: the folder they run from and the line
    the document shows after them."""
    found = []
    docs = ["README.md", *sorted(glob.glob("docs/*.md", root_dir=REPO)), *glob.glob("bundles/*/docs/README.md", root_dir=REPO)]  # fmt: skip
    for doc in docs:
        text = (REPO / doc).read_text().replace("\\\n", " ")
        for m in re.finditer(r"-m monai\.bundle (run\b[^\n`|&;>]*)", text):
            argv = shlex.split(m.group(1))
            shown = (text[m.end() :].split("\n") + ["", ""])[1]
            files = parse_command_line(argv)[1].get("config_file", [])
            files = [files] if isinstance(files, str) else files
            for cwd in (REPO, (REPO / doc).parents[1]):
                if files and all((cwd / f).is_file() for f in files):
                    found.append((doc, argv, cwd, shown))
                    break
    return found


def test_documented_commands_pass(monkeypatch):
    """Every documented command passes the check, except those a document shows refused, with that very line."""
    commands = _documented_commands()
    assert len(commands) >= 20
    wrong = []
    for doc, argv, cwd, shown in commands:
        monkeypatch.chdir(cwd)
        try:
            check_command_line(argv)
        except CommandLineError as e:
            if shown != f"error: {e}":
                wrong.append(f"{doc}: {shlex.join(argv)}\n  {e}")
    assert not wrong, "documented commands the check refuses:\n" + "\n".join(wrong)


# --- one-line messages --------------------------------------------------------------------------------------------


def _wrapped(error: BaseException) -> RuntimeError:
    """``error`` inside MONAI's two wrappers, as raised by a config component whose expression failed."""
    try:
        try:
            try:
                raise error
            except BaseException as e:
                raise RuntimeError("Failed to evaluate ConfigExpression: \n'$@x'") from e
        except RuntimeError as e:
            raise RuntimeError("Failed to instantiate component 'a.b' with keywords: x\n set '_mode_=debug'") from e
    except RuntimeError as e:
        return e


def test_user_error_message_looks_through_monai_wrappers():
    assert user_error_message(_wrapped(DatasetError("dataset folder /x is empty"))) == "dataset folder /x is empty"
    bad = BadCasesError(
        [CaseError("A", "/d/A/a.nii.gz", "empty file"), CaseError("B", "/d/B/b.nii.gz", "truncated")], "/d"
    )
    assert user_error_message(_wrapped(bad)) == (
        "2 unusable cases in /d; fix or remove them: case 'A': /d/A/a.nii.gz: empty file; case 'B': /d/B/b.nii.gz: truncated"
    )
    missing = FileNotFoundError(2, "No such file or directory", "/b/models/model.pt")
    assert user_error_message(_wrapped(missing)) == (
        "checkpoint /b/models/model.pt does not exist; train the bundle first, or put its weights there"
    )
    assert (
        user_error_message(FileNotFoundError(2, "No such file", "/d/list.json"))
        == "no such file or folder: /d/list.json"
    )
    # not a user mistake, or one hidden behind an error that is no MONAI wrapper: keep the traceback
    assert user_error_message(_wrapped(ValueError("num_folds must be at least 1"))) is None
    try:
        raise RuntimeError("a bug while handling it") from DatasetError("x")
    except RuntimeError as e:
        assert user_error_message(e) is None


def test_user_errors_include_their_subclasses():
    """UserError is the base any tool's own mistakes may share (the scorer's ScoringError); its subclasses, and those
    of the other USER_ERRORS, are one line even when known only by name in a DataLoader worker's traceback text."""
    assert UserError in USER_ERRORS and issubclass(CommandLineError, UserError)

    class ToolError(UserError):
        pass

    assert user_error_message(_wrapped(ToolError("no prediction in p matches"))) == "no prediction in p matches"
    worker = RuntimeError(
        "Caught CorruptLabelError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nbrats_pipeline.transforms.labels.CorruptLabelError: /d/a_seg.nii.gz: label '
        "value {5} belongs to no BraTS label convention\n"
    )
    assert user_error_message(worker) == "/d/a_seg.nii.gz: label value {5} belongs to no BraTS label convention"
    assert user_error_message(RuntimeError(str(worker).replace("CorruptLabelError", "KeyError"))) is None


def test_state_dict_errors_in_one_line():
    try:
        torch.nn.Conv3d(4, 32, 3).load_state_dict(torch.nn.Conv3d(4, 8, 3).state_dict())
    except RuntimeError as e:
        assert user_error_message(_wrapped(e)) == (
            "the checkpoint does not fit Conv3d: weight has shape [8,4,3,3,3] in the checkpoint but [32,4,3,3,3] "
            "in the network (and 1 more tensors); set --network_width (and any other network override) to the values "
            "it was trained with"
        )
    try:
        torch.nn.Linear(3, 4).load_state_dict({"fc.weight": torch.zeros(4, 3)})
    except RuntimeError as e:
        assert user_error_message(e) == (
            "the checkpoint does not fit Linear: 2 missing tensors (e.g. 'weight'), 1 unexpected tensors "
            "(e.g. 'fc.weight'); is it a checkpoint of this bundle's network?"
        )


class _BadCase(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        raise CaseError("BraTS-GLI-00001-000", "/d/BraTS-GLI-00001-000/BraTS-GLI-00001-000-t1c.nii.gz", "empty file")


def test_error_from_a_dataloader_worker():
    """A worker's exception comes back as text inside a new exception; the original message is found in it."""
    with pytest.raises(Exception) as info:
        next(iter(torch.utils.data.DataLoader(_BadCase(), num_workers=1)))
    assert user_error_message(info.value) == (
        "case 'BraTS-GLI-00001-000': /d/BraTS-GLI-00001-000/BraTS-GLI-00001-000-t1c.nii.gz: empty file"
    )


def test_excepthook(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(sys, "excepthook", lambda *args: calls.append(args))
    monkeypatch.setattr(command_line, "_previous_hook", None)
    install_error_handler()
    assert not calls and sys.excepthook is not command_line._excepthook  # not python -m monai.bundle: left alone
    install_error_handler(force=True)
    install_error_handler(force=True)  # idempotent
    assert command_line._previous_hook is not command_line._excepthook
    user, bug = _wrapped(DatasetError("dataset folder /x is empty")), ValueError("bug")
    sys.excepthook(type(user), user, user.__traceback__)
    assert capsys.readouterr().err == "error: dataset folder /x is empty\n" and not calls
    sys.excepthook(type(bug), bug, None)
    assert calls == [(ValueError, bug, None)]  # everything else: the previous hook (Python's traceback)
    monkeypatch.setenv(command_line.DEBUG_ENV, "1")
    sys.excepthook(type(user), user, user.__traceback__)
    assert calls[-1][1] is user and capsys.readouterr().err == ""


# --- real monai.bundle processes ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    """Overlays with the guard items for every config, tiny datasets, and width-8 weights of both bundles."""
    root = tmp_path_factory.mktemp("command_line")
    for bundle in BUNDLES:
        for name in ("train", "inference"):
            steps = json.loads(Path(config(bundle, name)).read_text())["initialize"]
            overlay = {"initialize": GUARD_ITEMS + [s for s in steps if s not in GUARD_ITEMS]}
            (root / f"guard_{bundle}_{name}.json").write_text(json.dumps(overlay, indent=1))
        parser = ConfigParser()
        parser.read_config(config(bundle, "inference"))
        parser["network_width"] = 8
        (root / f"width8_{bundle}" / "models").mkdir(parents=True)
        torch.save(parser.get_parsed_content("network_def").state_dict(), root / f"width8_{bundle}/models/model.pt")
    generate_dataset(root / "brats2023", 1, "brats2023", SHAPE)
    generate_dataset(root / "brats2018", 2, "brats2018", SHAPE)
    label = sorted((root / "brats2018").rglob("*_seg.nii.gz"))[0]
    img = nib.load(label)
    data = np.asarray(img.dataobj).copy()
    data[data == 4] = 3  # a BraTS 2023 enhancing-tumor value in a BraTS 2018 dataset
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(label))
    (root / "empty").mkdir()
    generate_dataset(root / "one_bad", 2, "brats2023", SHAPE)
    t1c = sorted((root / "one_bad").rglob("*-t1c.nii.gz"))[1]
    t1c.write_bytes(t1c.read_bytes()[:2000])
    return root


def bundle_run(tmp: Path, bundle: str, name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    files = str([config(bundle, name), str(tmp / f"guard_{bundle}_{name}.json")])
    run_id = ["training"] if name == "train" else []
    cmd = [sys.executable, "-m", "monai.bundle", "run", *run_id, "--config_file", files, "--num_workers", "0", *args]
    return subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=300, env=env or ENV)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a failed run; nothing else on stderr but MONAI's warning."""
    lines = [
        line
        for line in proc.stderr.splitlines()
        if line.strip() and not line.startswith(MONAI_TRUST_WARNING) and not PROGRESS_BAR.match(line)
    ]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


MISTAKES = {
    # name: (config, arguments, what the line must say)
    "missing dataset": ("train", ["--dataset_dir", "no/such/folder"], ["no/such/folder", "does not exist"]),
    "empty dataset": ("train", ["--dataset_dir", "empty"], ["empty is empty"]),
    "label convention": (
        "train",
        ["--dataset_dir", "brats2018", "--num_folds", "2"],
        ["_seg.nii.gz: label values {3}", "'brats2018' convention", "--label_convention"],
    ),
    "missing weights": ("inference", ["--dataset_dir", "brats2023"], ["models/model.pt does not exist"]),
    "width mismatch": (
        "inference",
        ["--dataset_dir", "brats2023", "--bundle_root", "<width8>"],
        ["width8_<bundle>/models/model.pt does not fit", "<shapes> in the network", "--network_width"],
    ),
}
#: the first tensor's shape at width 8 (checkpoint) and 32 (network)
FIRST_TENSOR = {
    "segresnet_vae": "convInit.conv.weight has shape [8,4,3,3,3] in the checkpoint but [32,4,3,3,3]",
    "espnet3d": "stem.conv.weight has shape [4,4,7,7,7] in the checkpoint but [16,4,7,7,7]",
}


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES)
@pytest.mark.parametrize("mistake", MISTAKES)
def test_user_mistake_ends_in_one_line(tmp, tmp_path, bundle, mistake):
    name, args, expected = MISTAKES[mistake]
    width8 = str(tmp / f"width8_{bundle}")
    args = [a.replace("<width8>", width8) for a in args]
    root = [] if "--bundle_root" in args else ["--bundle_root", str(tmp_path / "bundle")]
    proc = bundle_run(tmp, bundle, name, *root, *args)
    line = error_line(proc)
    for text in expected:
        assert text.replace("<bundle>", bundle).replace("<shapes>", FIRST_TENSOR[bundle]) in line, line


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES)
def test_typo_refused_before_anything_runs(tmp, tmp_path, bundle):
    proc = bundle_run(tmp, bundle, "train", "--epoch", "1", "--dataset_dir", "empty", "--bundle_root", str(tmp_path))
    assert error_line(proc) == "error: unknown override --epoch: did you mean --epochs?"
    assert not list(tmp_path.iterdir())  # not even the dataset was looked at


@pytest.mark.slow
def test_none_and_overlay_first_refused_in_a_run(tmp_path):
    """Real runs of a copy of the bundle: --dataset_dir None, and the quickstart overlay listed first, end in one
    error line before anything is written (MONAI's own complaints about the missing metadata.json come first)."""
    shutil.copytree(REPO / "bundles" / "segresnet_vae" / "configs", tmp_path / "bundles" / "b" / "configs")
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file"]
    proc = subprocess.run(
        [*cmd, "bundles/b/configs/train.json", "--dataset_dir", "None"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV,
    )  # fmt: skip
    assert error_line(proc).startswith("error: --dataset_dir None is ignored: MONAI drops an override")
    wrong = "['configs/quickstart.json','bundles/b/configs/train.json']"
    proc = subprocess.run([*cmd, wrong], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stderr.count("error: ") == 1, proc.stderr
    assert lines[-1] == (
        "error: --config_file lists configs/quickstart.json before the bundle's config bundles/b/configs/train.json: "
        "MONAI takes the first file's folder for the bundle's configs/ folder (metadata.json, models/, eval/); list "
        "the bundle's config first: --config_file \"['bundles/b/configs/train.json','configs/quickstart.json']\""
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundles", "configs"]  # no quickstart_data, models, eval
    assert sorted(p.name for p in (tmp_path / "bundles" / "b").iterdir()) == ["configs"]


@pytest.mark.slow
def test_boolean_text_refused_in_a_run(tmp, tmp_path):
    proc = bundle_run(tmp, "espnet3d", "inference", "--tta", "false", "--dataset_dir", "brats2023")
    assert error_line(proc) == (
        "error: --tta false is the string 'false'; write --tta False (python-fire turns only True/False into booleans)"
    )


@pytest.mark.slow
def test_tracebacks_kept_for_bugs_and_on_request(tmp):
    debug = bundle_run(tmp, "espnet3d", "train", "--dataset_dir", "empty", env={**ENV, command_line.DEBUG_ENV: "1"})
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "DatasetError: dataset folder" in debug.stderr and "\nerror: " not in debug.stderr
    bug = bundle_run(tmp, "espnet3d", "train", "--dataset_dir", "brats2023", "--num_folds", "0")
    assert bug.returncode == 1 and "Traceback (most recent call last)" in bug.stderr
    assert "ValueError: num_folds must be at least 1" in bug.stderr and "\nerror: " not in bug.stderr


@pytest.mark.slow
def test_failed_cases_keep_their_summary(tmp, tmp_path):
    """CasesFailedError is a SystemExit: its summary, status 1, no traceback, untouched by the handler."""
    proc = bundle_run(
        tmp, "espnet3d", "inference", "--dataset_dir", "one_bad", "--load_bundle_model", "False",
        "--network_width", "8", "--bundle_root", str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "1 case(s) failed" in proc.stderr and "truncated" in proc.stderr
    assert "Traceback" not in proc.stderr and "error: " not in proc.stderr
    assert len(list((tmp_path / "eval" / "predictions").glob("*.nii.gz"))) == 1  # the good case was segmented


def test_synthetic_command_line(tmp_path):
    """The generator's own command line: its booleans are checked too, and a mistake is one line."""
    cmd = [
        sys.executable,
        "-m",
        "brats_pipeline.tools.synthetic",
        str(tmp_path / "d"),
        "--num_cases",
        "1",
        "--shape",
        "16",
    ]
    bad = subprocess.run([*cmd, "--with_labels", "false"], capture_output=True, text=True, timeout=120, env=ENV)
    assert bad.returncode == 1 and bad.stderr.splitlines() == [
        "error: --with_labels false is not a boolean ('false'); write --with_labels True or --with_labels False "
        "(python-fire turns only True/False into booleans)"
    ]
    assert not (tmp_path / "d").exists()
    good = subprocess.run([*cmd, "--with_labels", "False"], capture_output=True, text=True, timeout=120, env=ENV)
    assert good.returncode == 0, good.stderr
    assert good.stdout == f"wrote 1 synthetic brats2023 cases of shape (16, 16, 16) to {tmp_path / 'd'}\n"
    assert sorted(p.name for p in (tmp_path / "d" / "BraTS-GLI-00001-000").iterdir()) == [
        f"BraTS-GLI-00001-000-{m}.nii.gz" for m in ("t1c", "t1n", "t2f", "t2w")
    ]
