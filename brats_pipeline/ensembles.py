"""Ensembles end to end: train K members with a bundle's own ``train.json``, then predict with all of them.

Myronenko 2018 (Sec. 4, Table 2-3) ensembles 10 models trained from scratch; an ensemble of the 5 models of a
5-fold cross-validation is the other common recipe. This module runs either with the bundle's own configs, one
``python -m monai.bundle`` subprocess per member, so an ensemble member is exactly what a single training run
makes::

    # K members: one per fold (--folds) or one per seed on one shared split (--seeds)
    python -m brats_pipeline.ensembles train --bundle bundles/segresnet_vae --output_dir runs/seg_ens \\
        --dataset_dir /data/BraTS2021_TrainingData --folds 0 1 2 3 4 -- --epochs 300

    # the K models/model.pt averaged by inference.json (configs/ensemble.json's conventions), TTA optional
    python -m brats_pipeline.ensembles predict --output_dir runs/seg_ens --dataset_dir /data/BraTS2021_ValidationData --tta

``train`` writes the split once (``<output_dir>/datalist.json``, from ``--dataset_dir``; or takes ``--datalist_file``),
so every member trains on the same split, whatever its seed, and runs for each member ``k``::

    python -m monai.bundle run training --config_file "['<bundle>/configs/train.json',<--config ...>]"
        --bundle_root <output_dir>/member_<k> --datalist_file <output_dir>/datalist.json --dataset_dir <dataset_dir>
        --fold k | --seed k   <overrides after -->

Each member's ``models/cases.json`` (written by every training run, ``TrainingRun``) lists the cases it trained and
was selected on. ``<output_dir>/ensemble.json`` is the manifest
(members, their ``model.pt``, commands, the overrides). ``predict`` runs::

    python -m monai.bundle run --config_file "['<bundle>/configs/inference.json','configs/ensemble.json'(,'configs/tta.json')]"
        --bundle_root <output_dir> --ensemble_checkpoints "[<member model.pt files>]" --dataset_dir <dir>
        --overwrite True  (+ the members' network_width / network_def# overrides, --inferer#test_scales, overrides)

into ``<output_dir>/eval/predictions``, after saying which of the cases any member has seen in training or model
selection (an ensemble of the folds of one split has seen every labelled case of that split: score it on a held-out
folder). ``--score`` then scores the predictions against the labels in ``--dataset_dir``
(:func:`brats_pipeline.scoring.score_folders`, missing predictions scored worst).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from brats_pipeline.atomic_files import write_json_atomic
from brats_pipeline.protocols import CASE_RECORD_NAME, read_case_record

__all__ = [
    "MANIFEST_NAME",
    "member_commands",
    "predict_command",
    "train_ensemble",
    "predict_ensemble",
    "main",
]

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MANIFEST_NAME = "ensemble.json"
#: training overrides that change the architecture, forwarded to ``predict`` (inference must build the same network)
ARCHITECTURE_KEYS = ("network_width",)
ARCHITECTURE_PREFIXES = ("network_def#", "network_def::")


def _python_list(items: Sequence[str]) -> str:
    """A list literal python-fire reads back as a list of strings (``--config_file``, ``--ensemble_checkpoints``)."""
    return "[" + ",".join(json.dumps(str(i)) for i in items) + "]"


def _override_pairs(extra: Sequence[str]) -> list[tuple[str, str | None]]:
    """``["--a", "1", "--flag", "--b", "x"]`` -> ``[("a", "1"), ("flag", None), ("b", "x")]`` (for reading only)."""
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(extra):
        token = extra[i]
        if token.startswith("--"):
            key, eq, value = token[2:].partition("=")
            if eq:
                pairs.append((key, value))
            elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                pairs.append((key, extra[i + 1]))
                i += 1
            else:
                pairs.append((key, None))
        i += 1
    return pairs


def architecture_overrides(extra: Sequence[str]) -> list[str]:
    """The ``--network_width`` / ``--network_def#...`` overrides of a training command, to repeat at inference."""
    out: list[str] = []
    for key, value in _override_pairs(extra):
        if value is not None and (key in ARCHITECTURE_KEYS or key.startswith(ARCHITECTURE_PREFIXES)):
            out += [f"--{key}", value]
    return out


def _bundle_dir(bundle: str | os.PathLike) -> Path:
    path = Path(bundle).resolve()
    if path.name == "configs":
        path = path.parent
    if not (path / "configs" / "train.json").is_file():
        raise FileNotFoundError(f"{bundle}: not a bundle folder (no configs/train.json)")
    return path


def member_commands(
    bundle: str | os.PathLike,
    output_dir: str | os.PathLike,
    folds: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    configs: Sequence[str | os.PathLike] = (),
    datalist_file: str | os.PathLike | None = None,
    dataset_dir: str | os.PathLike | None = None,
    extra: Sequence[str] = (),
    python: str = sys.executable,
) -> list[dict[str, Any]]:
    """One ``{"name", "fold"|"seed", "bundle_root", "model", "command"}`` per member (nothing is run or written).

    ``folds``: member ``k`` trains with ``--fold k`` (its validation fold; the others train it). ``seeds``: member
    ``k`` trains with ``--seed k`` on the fold of ``extra`` (default 0), one split for all (give ``datalist_file``).
    """
    if (folds is None) == (seeds is None):
        raise ValueError("give either folds or seeds (one member per value)")
    values = [int(v) for v in (folds if folds is not None else seeds)]  # type: ignore[union-attr]
    if not values or len(set(values)) != len(values):
        raise ValueError(f"members need distinct values, got {values}")
    key = "fold" if folds is not None else "seed"
    bundle_dir = _bundle_dir(bundle)
    out = Path(output_dir).resolve()
    files = [str(bundle_dir / "configs" / "train.json")]
    files += [str(Path(c).resolve()) for c in configs]
    members = []
    for v in values:
        root = out / f"member_{key}{v}"
        command = [python, "-m", "monai.bundle", "run", "training", "--config_file", _python_list(files)]
        command += ["--bundle_root", str(root)]
        if datalist_file is not None:
            command += ["--datalist_file", str(Path(datalist_file).resolve())]
        if dataset_dir is not None:
            command += ["--dataset_dir", str(Path(dataset_dir).resolve())]
        command += [f"--{key}", str(v), *extra]
        members.append(
            {
                "name": root.name,
                key: v,
                "bundle_root": str(root),
                "model": str(root / "models" / "model.pt"),
                "command": command,
            }
        )
    return members


def _run_logged(command: Sequence[str], log_file: Path, prefix: str) -> int:
    """Run ``command``; its output goes to the terminal (each line prefixed) and to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    print(f"{prefix} $ {shlex.join(command)}", flush=True)
    with (
        open(log_file, "w", encoding="utf-8") as log,
        subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            sys.stdout.write(f"{prefix} {line}")
        sys.stdout.flush()
        return proc.wait()


def train_ensemble(
    bundle: str | os.PathLike,
    output_dir: str | os.PathLike,
    folds: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    dataset_dir: str | os.PathLike | None = None,
    datalist_file: str | os.PathLike | None = None,
    num_folds: int = 5,
    split_seed: int = 0,
    configs: Sequence[str | os.PathLike] = (),
    extra: Sequence[str] = (),
    dry_run: bool = False,
) -> dict[str, Any]:
    """Train the members one after the other (see the module docstring); return and write the manifest.

    Raises:
        RuntimeError: when a member's training fails or leaves no ``models/model.pt`` (the manifest written so far
            names it; members already trained are kept).
    """
    out = Path(output_dir).resolve()
    if datalist_file is None:
        if dataset_dir is None:
            raise ValueError(
                "give --dataset_dir (the split is written once to <output_dir>/datalist.json) or --datalist_file"
            )
        datalist_file = out / "datalist.json"
        if not dry_run:
            from brats_pipeline.datalist import build_datalist

            d = build_datalist(dataset_dir, output_file=datalist_file, num_folds=num_folds, seed=split_seed)
            print(
                f"split written to {datalist_file}: {len(d['training'])} training cases in {d['num_folds']} folds "
                f"(seed {split_seed}), {len(d['validation'])} validation, {len(d['testing'])} testing",
                flush=True,
            )
    members = member_commands(bundle, out, folds, seeds, configs, datalist_file, dataset_dir, extra)
    manifest: dict[str, Any] = {
        "bundle": str(_bundle_dir(bundle)),
        "configs": [str(Path(c).resolve()) for c in configs],
        "datalist_file": str(Path(datalist_file).resolve()),
        "dataset_dir": None if dataset_dir is None else str(Path(dataset_dir).resolve()),
        "train_overrides": list(extra),
        "members": members,
    }
    if dry_run:
        for m in members:
            print(shlex.join(m["command"]))
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    for i, member in enumerate(members, 1):
        rc = _run_logged(member["command"], Path(member["bundle_root"]) / "train.log", f"[{member['name']}]")
        member["returncode"] = rc
        record = read_case_record(Path(member["bundle_root"]) / "models" / CASE_RECORD_NAME)
        if record is not None:
            member["trained_on"] = len(record.get("trained_on", []))
            member["selected_on"] = len(record.get("selected_on", []))
        write_json_atomic(manifest, out / MANIFEST_NAME)
        if rc != 0 or not Path(member["model"]).is_file():
            raise RuntimeError(
                f"member {member['name']} ({i}/{len(members)}) failed (exit status {rc}"
                + ("" if Path(member["model"]).is_file() else ", no models/model.pt")
                + f"); its log: {Path(member['bundle_root']) / 'train.log'}"
            )
    print(format_members(manifest), flush=True)
    return manifest


def format_members(manifest: Mapping[str, Any]) -> str:
    lines = [f"ensemble of {len(manifest['members'])} members ({manifest['bundle']}):"]
    for m in manifest["members"]:
        which = f"fold {m['fold']}" if "fold" in m else f"seed {m['seed']}"
        seen = (
            f"trained on {m['trained_on']} cases, selected on {m['selected_on']}"
            if "trained_on" in m
            else "cases not recorded"
        )
        lines.append(f"  {m['name']:<14} {which:<8} {seen:<40} {m['model']}")
    return "\n".join(lines)


def read_manifest(output_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(output_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ensemble manifest; run 'python -m brats_pipeline.ensembles train' first")
    return json.loads(path.read_text())


def predict_command(
    manifest: Mapping[str, Any],
    output_dir: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    tta: bool = False,
    test_scales: str | None = None,
    configs: Sequence[str | os.PathLike] = (),
    extra: Sequence[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """The ``python -m monai.bundle run`` command of ``predict`` (see the module docstring)."""
    bundle = Path(manifest["bundle"])
    models = [m["model"] for m in manifest["members"]]
    files = [str(bundle / "configs" / "inference.json")]
    ensemble_overlay = REPO_CONFIGS / "ensemble.json"
    conventions: list[str] = []
    if ensemble_overlay.is_file():
        files.append(str(ensemble_overlay))
    else:  # a packaged bundle without this repository's configs/: ensemble.json's three keys on the command line
        conventions = ["--inferer#include_given_network", "False", "--load_bundle_model", "False"]
    if tta:
        if (REPO_CONFIGS / "tta.json").is_file():
            files.append(str(REPO_CONFIGS / "tta.json"))
        else:
            conventions += ["--tta", "True"]
    files += [str(Path(c).resolve()) for c in configs]
    command = [python, "-m", "monai.bundle", "run", "--config_file", _python_list(files)]
    command += ["--bundle_root", str(Path(output_dir).resolve()), "--dataset_dir", str(Path(dataset_dir).resolve())]
    command += ["--ensemble_checkpoints", _python_list(models), "--overwrite", "True", *conventions]
    command += architecture_overrides(manifest.get("train_overrides", []))
    if test_scales is not None:
        _check_test_scales(test_scales)
        command += ["--inferer#test_scales", test_scales]
    return command + list(extra)


def _check_test_scales(text: str) -> None:
    """Fail before any work when ``--test_scales`` is not what ``BratsInferer`` accepts."""
    from brats_pipeline.inference import normalize_test_scales

    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word such as native
    normalize_test_scales(value)


def seen_by_members(manifest: Mapping[str, Any], case_ids: Sequence[str]) -> tuple[str, list[str]]:
    """A statement of which of ``case_ids`` any member has seen (from each member's ``models/cases.json``), and
    the warnings."""
    ids = set(case_ids)
    warnings: list[str] = []
    unknown = []
    for m in manifest["members"]:
        record = read_case_record(Path(m["bundle_root"]) / "models" / CASE_RECORD_NAME)
        if record is None:
            unknown.append(m["name"])
            continue
        selected = ids & set(record.get("selected_on", []))
        trained = (ids & set(record.get("trained_on", []))) - selected
        if selected:
            warnings.append(
                f"{len(selected)} of the {len(ids)} cases chose member {m['name']}'s model (its validation fold)"
            )
        if trained:
            warnings.append(f"{len(trained)} of the {len(ids)} cases trained member {m['name']}")
    if warnings:
        statement = f"{len(ids)} cases; NOT held out from the ensemble: " + "; ".join(warnings) + "."
    elif unknown:
        statement = f"{len(ids)} cases; unknown for members without models/cases.json: {', '.join(unknown)}."
    else:
        statement = (
            f"{len(ids)} cases; none of them trained or chose any of the {len(manifest['members'])} members: held out."
        )
    return statement, warnings


def predict_ensemble(
    output_dir: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    tta: bool = False,
    test_scales: str | None = None,
    configs: Sequence[str | os.PathLike] = (),
    extra: Sequence[str] = (),
    score: bool = False,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Run ``predict`` (see the module docstring); return ``{"command", "returncode", "prediction_dir",
    "statement", "summary"}`` (``summary``: :func:`~brats_pipeline.scoring.score_folders`' with ``score``)."""
    out = Path(output_dir).resolve()
    manifest = read_manifest(out)
    missing = [m["model"] for m in manifest["members"] if not Path(m["model"]).is_file()]
    if missing and not dry_run:
        raise FileNotFoundError(f"ensemble members without a model: {missing}")
    command = predict_command(manifest, out, dataset_dir, tta, test_scales, configs, extra)
    result: dict[str, Any] = {"command": command, "prediction_dir": str(out / "eval" / "predictions")}
    if dry_run:
        print(shlex.join(command))
        return result
    from brats_pipeline.datalist import find_cases

    cases = [c for c in find_cases(dataset_dir, check_files=False, keep_bad_cases=True) if "case_id" in c]
    statement, _ = seen_by_members(manifest, [c["case_id"] for c in cases])
    result["statement"] = f"ensemble prediction of {Path(dataset_dir).name}: {statement}"
    print(result["statement"], flush=True)
    rc = _run_logged(command, out / "predict.log", "[predict]")
    result["returncode"] = rc
    if rc != 0:
        raise RuntimeError(f"ensemble inference failed (exit status {rc}); its log: {out / 'predict.log'}")
    if score:
        from brats_pipeline.scoring import score_folders

        _, summary = score_folders(
            out / "eval" / "predictions",
            dataset_dir,
            output_dir=out / "eval" / "scores",
            on_missing="worst",
            progress=False,
            figure=False,
        )
        result["summary"] = summary
    return result


def _split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m brats_pipeline.ensembles",
        description="Train an ensemble with a bundle's own train.json (one run per member), then predict with "
        "inference.json averaging the members. Bundle overrides go after '--'.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the members (one 'monai.bundle run training' each)")
    train.add_argument("--bundle", required=True, help="bundle folder, e.g. bundles/segresnet_vae")
    train.add_argument("--output_dir", required=True, help="where member_*/, datalist.json and ensemble.json go")
    members = train.add_mutually_exclusive_group(required=True)
    members.add_argument("--folds", type=int, nargs="+", help="one member per validation fold")
    members.add_argument("--seeds", type=int, nargs="+", help="one member per seed (same split, same fold)")
    train.add_argument(
        "--dataset_dir", help="the labelled cases; the split is written once to <output_dir>/datalist.json"
    )
    train.add_argument("--datalist_file", help="an existing datalist (its split is used as is)")
    train.add_argument("--num_folds", type=int, default=5, help="folds of the split written from --dataset_dir")
    train.add_argument("--split_seed", type=int, default=0, help="seed of the split written from --dataset_dir")
    train.add_argument("--config", action="append", default=[], help="an overlay merged after train.json (repeatable)")
    train.add_argument("--dry_run", action="store_true", help="print the commands only")
    predict = sub.add_parser("predict", help="segment a folder with the ensemble (inference.json)")
    predict.add_argument("--output_dir", required=True, help="the folder 'train' wrote (ensemble.json)")
    predict.add_argument("--dataset_dir", required=True, help="the cases to segment")
    predict.add_argument("--tta", action="store_true", help="8-flip test-time augmentation (configs/tta.json)")
    predict.add_argument("--test_scales", help="multi-scale test averaging, e.g. \"['native',144]\"")
    predict.add_argument("--config", action="append", default=[], help="an overlay merged after inference.json")
    predict.add_argument("--score", action="store_true", help="score the predictions against --dataset_dir's labels")
    predict.add_argument("--dry_run", action="store_true", help="print the command only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    own, extra = _split_argv(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(own)
    try:
        if args.command == "train":
            train_ensemble(
                args.bundle,
                args.output_dir,
                folds=args.folds,
                seeds=args.seeds,
                dataset_dir=args.dataset_dir,
                datalist_file=args.datalist_file,
                num_folds=args.num_folds,
                split_seed=args.split_seed,
                configs=args.config,
                extra=extra,
                dry_run=args.dry_run,
            )
        else:
            predict_ensemble(
                args.output_dir,
                args.dataset_dir,
                tta=args.tta,
                test_scales=args.test_scales,
                configs=args.config,
                extra=extra,
                score=args.score,
                dry_run=args.dry_run,
            )
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
