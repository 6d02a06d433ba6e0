"""Ensembles end to end: train K members with a bundle's own ``train.json``, then predict with all of them.

Myronenko 2018 (Sec. 4, Table 2-3) ensembles 10 models trained from scratch; an ensemble of the 5 models of a
5-fold cross-validation is the other common recipe. This module runs either with the bundle's own configs, one
``python -m monai.bundle`` subprocess per member, so an ensemble member is exactly what a single training run
makes. Its command line is python-fire's, as ``python -m monai.bundle``'s (``brats-ensemble`` or
``python -m brats_pipeline.tools.ensembles``; ``brats-ensemble train --help``); every option that is not the
command's own is a bundle override, passed on to the members' (or the ensemble's) ``monai.bundle`` command::

    # K members: one per fold (--folds) or one per seed on one shared split (--seeds)
    brats-ensemble train --bundle bundles/segresnet_vae --output_dir runs/seg_ens \\
        --dataset_dir /data/BraTS2021_TrainingData --folds "[0,1,2,3,4]" --epochs 300

    # the K models/model.pt averaged by inference.json (configs/ensemble.json's conventions), TTA optional
    brats-ensemble predict --output_dir runs/seg_ens --dataset_dir /data/BraTS2021_ValidationData --tta

``train`` writes the split once (``<output_dir>/datalist.json``, from ``--dataset_dir``; or takes ``--datalist_file``),
so every member trains on the same split, whatever its seed, and runs for each member ``k``::

    python -m monai.bundle run training --config_file "['<bundle>/configs/train.json',<--config ...>]"
        --bundle_root <output_dir>/member_<k> --datalist_file <output_dir>/datalist.json --dataset_dir <dataset_dir>
        --fold k | --seed k   <the bundle overrides>

Each member's ``models/cases.json`` (written by every training run, ``TrainingRun``) lists the cases it trained and
was selected on. ``<output_dir>/ensemble.json`` is the manifest
(members, their ``model.pt``, commands, the overrides). ``predict`` runs::

    python -m monai.bundle run --config_file "['<bundle>/configs/inference.json','configs/ensemble.json'(,'configs/tta.json')]"
        --bundle_root <output_dir> --ensemble_checkpoints "[<member model.pt files>]" --dataset_dir <dir>
        --overwrite True  (+ the members' network_width / network_def# overrides, --inferer#test_scales, overrides)

into ``<output_dir>/eval/predictions``, after saying which of the cases any member has seen in training or model
selection (an ensemble of the folds of one split has seen every labelled case of that split: score it on a held-out
folder). ``--score`` then scores the predictions against the labels in ``--dataset_dir``
(:func:`brats_pipeline.evaluation.scoring.score_folders`, missing predictions scored worst).
"""

from __future__ import annotations

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
from brats_pipeline.bundle.command_line import CommandLineError, fire_command
from brats_pipeline.training.records import CASE_RECORD_NAME, read_case_record

__all__ = [
    "MANIFEST_NAME",
    "member_commands",
    "predict_command",
    "train_ensemble",
    "predict_ensemble",
    "EnsembleError",
    "train",
    "predict",
    "cli",
]

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MANIFEST_NAME = "ensemble.json"
#: training overrides that change the architecture, forwarded to ``predict`` (inference must build the same network)
ARCHITECTURE_KEYS = ("network_width",)
ARCHITECTURE_PREFIXES = ("network_def#", "network_def::")


class EnsembleError(RuntimeError):
    """A member's training or the ensemble's inference failed (its log says why)."""


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
        EnsembleError: (a ``RuntimeError``) when a member's training fails or leaves no ``models/model.pt`` (the
            manifest written so far names it; members already trained are kept).
    """
    out = Path(output_dir).resolve()
    if datalist_file is None:
        if dataset_dir is None:
            raise ValueError(
                "give --dataset_dir (the split is written once to <output_dir>/datalist.json) or --datalist_file"
            )
        datalist_file = out / "datalist.json"
        if not dry_run:
            from brats_pipeline.data.datalist import build_datalist

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
            raise EnsembleError(
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
        raise FileNotFoundError(f"{path}: no ensemble manifest; run 'brats-ensemble train' first")
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
    from brats_pipeline.inference.inferer import normalize_test_scales

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
    "statement", "summary"}`` (``summary``: :func:`~brats_pipeline.evaluation.scoring.score_folders`' with ``score``)."""
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
    from brats_pipeline.data.datalist import find_cases

    cases = [c for c in find_cases(dataset_dir, check_files=False, keep_bad_cases=True) if "case_id" in c]
    statement, _ = seen_by_members(manifest, [c["case_id"] for c in cases])
    result["statement"] = f"ensemble prediction of {Path(dataset_dir).name}: {statement}"
    print(result["statement"], flush=True)
    rc = _run_logged(command, out / "predict.log", "[predict]")
    result["returncode"] = rc
    if rc != 0:
        raise EnsembleError(f"ensemble inference failed (exit status {rc}); its log: {out / 'predict.log'}")
    if score:
        from brats_pipeline.evaluation.scoring import score_folders

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


def _integer(flag: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().lstrip("-").isdigit():
        raise CommandLineError(f"{flag} takes integers, got {value!r}")
    return int(value)


def _integers(flag: str, value: Any) -> list[int] | None:
    """``--folds 3``, ``--folds [0,1,2]`` or ``--folds 0,1,2`` (python-fire reads a tuple) as a list of ints."""
    if value is None:
        return None
    if isinstance(value, str):
        items: Sequence[Any] = value.replace(",", " ").split()
    else:
        items = value if isinstance(value, (list, tuple)) else [value]
    return [_integer(flag, v) for v in items]


def _switch(flag: str, value: Any) -> bool:
    """A boolean flag: python-fire turns ``--tta`` and ``--tta True`` into True, but ``--tta false`` into the
    (truthy) string ``'false'``, which is refused."""
    if not isinstance(value, bool):
        raise CommandLineError(
            f"{flag} {value} is not a boolean ({value!r}); write {flag} True or {flag} False "
            "(python-fire turns only True/False into booleans)"
        )
    return value


def _paths(flag: str, value: Any) -> list[str]:
    """``--config a.json`` or ``--config "['a.json','b.json']"`` as a list of paths."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, (str, os.PathLike)) for v in items):
        raise CommandLineError(f"{flag} takes a file or a list of files, e.g. \"['a.json','b.json']\"; got {value!r}")
    return [str(v) for v in items]


def _fire_text(value: Any) -> str:
    """``value`` as text that python-fire reads back as ``value`` (``8``, ``[32, 32, 32]``, ``False``, ``'1'``)."""
    if isinstance(value, str):
        from fire.parser import DefaultParseValue

        return value if DefaultParseValue(value) == value else repr(value)
    return repr(value)


def _bundle_overrides(overrides: Mapping[str, Any]) -> list[str]:
    """The options python-fire passed to ``**overrides``, as ``--key value`` arguments of a bundle command."""
    return [arg for key, value in overrides.items() for arg in (f"--{key}", _fire_text(value))]


def _refuse_stray(command: str, stray: Sequence[Any]) -> None:
    if stray:
        raise CommandLineError(
            f"{command}: unexpected argument(s) {' '.join(map(str, stray))}; give several folds or seeds as one list, "
            'e.g. --folds "[0,1,2,3,4]", and bundle overrides as --key value'
        )


def train(
    *stray: Any,
    bundle: str,
    output_dir: str,
    folds: Any = None,
    seeds: Any = None,
    dataset_dir: str | None = None,
    datalist_file: str | None = None,
    num_folds: int = 5,
    split_seed: int = 0,
    config: Any = None,
    dry_run: bool = False,
    **overrides: Any,
) -> None:
    """Command ``train``: train the members, one ``monai.bundle run training`` each (:func:`train_ensemble`).

    Args:
        stray: none is taken: several folds or seeds go in one list, bundle overrides as --key value.
        bundle: bundle folder, e.g. bundles/segresnet_vae.
        output_dir: where member_*/, datalist.json and ensemble.json go.
        folds: one member per validation fold: a list, "[0,1,2,3,4]" or 0,1,2,3,4 (or one fold, 3).
        seeds: one member per seed, on the same split and fold, e.g. "[0,1,2]".
        dataset_dir: the labelled cases; the split is written once to <output_dir>/datalist.json.
        datalist_file: an existing datalist (its split is used as is).
        num_folds: folds of the split written from dataset_dir.
        split_seed: seed of the split written from dataset_dir.
        config: an overlay merged after train.json, or a list of them, e.g. "['a.json','b.json']".
        dry_run: print the commands only.
        overrides: any other --key value, passed on to every member's bundle command (e.g. --epochs 300).
    """
    _refuse_stray("train", stray)
    folds_, seeds_ = _integers("--folds", folds), _integers("--seeds", seeds)
    if (folds_ is None) == (seeds_ is None):
        raise CommandLineError('give either --folds or --seeds (one member per value), e.g. --folds "[0,1,2,3,4]"')
    values = folds_ if folds_ is not None else seeds_
    if not values or len(set(values)) != len(values):
        raise CommandLineError(f"{'--folds' if folds_ is not None else '--seeds'} needs distinct values, got {values}")
    if dataset_dir is None and datalist_file is None:
        raise CommandLineError(
            "give --dataset_dir (the split is written once to <output_dir>/datalist.json) or --datalist_file"
        )
    train_ensemble(
        str(bundle),
        str(output_dir),
        folds=folds_,
        seeds=seeds_,
        dataset_dir=None if dataset_dir is None else str(dataset_dir),
        datalist_file=None if datalist_file is None else str(datalist_file),
        num_folds=_integer("--num_folds", num_folds),
        split_seed=_integer("--split_seed", split_seed),
        configs=_paths("--config", config),
        extra=_bundle_overrides(overrides),
        dry_run=_switch("--dry_run", dry_run),
    )


def predict(
    *stray: Any,
    output_dir: str,
    dataset_dir: str,
    tta: bool = False,
    test_scales: Any = None,
    config: Any = None,
    score: bool = False,
    dry_run: bool = False,
    **overrides: Any,
) -> None:
    """Command ``predict``: segment a folder with the ensemble, ``inference.json`` averaging the members
    (:func:`predict_ensemble`).

    Args:
        stray: none is taken: bundle overrides go as --key value.
        output_dir: the folder 'train' wrote (ensemble.json).
        dataset_dir: the cases to segment.
        tta: 8-flip test-time augmentation (configs/tta.json).
        test_scales: multi-scale test averaging, e.g. "['native',144]".
        config: an overlay merged after inference.json, or a list of them.
        score: score the predictions against dataset_dir's labels.
        dry_run: print the command only.
        overrides: any other --key value, passed on to the bundle command (e.g. --num_workers 0).
    """
    _refuse_stray("predict", stray)
    scales = None if test_scales is None else _fire_text(test_scales)
    if scales is not None:
        try:
            _check_test_scales(scales)
        except ValueError as e:
            raise CommandLineError(f"--test_scales {scales}: {e}") from e
    predict_ensemble(
        str(output_dir),
        str(dataset_dir),
        tta=_switch("--tta", tta),
        test_scales=scales,
        configs=_paths("--config", config),
        extra=_bundle_overrides(overrides),
        score=_switch("--score", score),
        dry_run=_switch("--dry_run", dry_run),
    )


#: python-fire's own flags, which follow a ``--``
_FIRE_FLAGS = ("--help", "-h", "--interactive", "-i", "--separator", "--completion", "--trace", "--verbose", "-v")


def _after_separator(argv: Sequence[str]) -> list[str]:
    """Options after the last ``--`` that are not python-fire's own flags (python-fire would ignore them)."""
    if "--" not in argv:
        return []
    tail = list(argv)[len(argv) - list(argv)[::-1].index("--") :]
    return [a for a in tail if a.startswith("-") and a.partition("=")[0] not in _FIRE_FLAGS]


def cli() -> None:
    """Console command ``brats-ensemble`` (also ``python -m brats_pipeline.tools.ensembles``): ``train`` and
    ``predict``; a user mistake or a failed member ends with one ``error:`` line and status 1."""
    ignored = _after_separator(sys.argv[1:])
    if ignored:  # the former command line put the bundle overrides after "--"; python-fire would drop them
        sys.exit(
            f"error: options after '--' are python-fire's own ({' '.join(ignored)}); write bundle overrides "
            'among the other options, e.g. brats-ensemble train ... --folds "[0,1]" --epochs 300'
        )
    try:
        fire_command({"train": train, "predict": predict})
    except EnsembleError as e:  # the member's own output (and its log) says why
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli()
