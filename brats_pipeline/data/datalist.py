"""Scan a BraTS (or MSD Task01) folder, recognise its layout, and write a decathlon-style datalist with folds.

The layout is recognised from folder names alone (see :mod:`brats_pipeline.data.layouts`): case folders
``Brats18_*`` (in ``HGG``/``LGG`` or flat), ``BraTS20_{Training,Validation}_NNN``, ``BraTS2021_NNNNN`` and
``BraTS-<SUB>-NNNNN-NNN`` are found up to :data:`MAX_DEPTH` folders below the dataset folder (so the folder the
archive unpacks into can be given as is); an MSD ``dataset.json`` makes it ``msd``. Cases without a label
(validation/test releases) land in ``testing``.

Bad cases: a case folder that lacks a modality, holds two files for one, or a folder of NIfTI files next to the
case folders whose name does not follow the layout, and (with ``check_files``) any file that fails the header
checks of :mod:`brats_pipeline.data.screening`. :func:`build_datalist` (training) raises one
:class:`~brats_pipeline.data.screening.BadCasesError` that lists every bad case (with ``check_labels``, bad label
values of the other cases too); ``find_cases(keep_bad_cases=True)``
(inference) returns them as entries that carry their error, which
:func:`brats_pipeline.data.screening.screen_cases` reports and skips.

Each entry::

    {"case_id": "BraTS-GLI-00001-000", "image": [t1c, t1, t2, flair paths], "label": path,
     "layout": "brats2023", "label_convention": "brats2023"}

For MSD the image is the single 4-D file and ``"channel_order"`` gives, for each modality of
:data:`~brats_pipeline.data.layouts.CHANNELS`, its index in the file (``[2, 1, 3, 0]`` for FLAIR, T1w, T1gd, T2w),
applied by :class:`brats_pipeline.transforms.preprocessing.ReorderChannelsd`.

Command line::

    python -m brats_pipeline.data.datalist DATASET_DIR --output_file datalist.json --num_folds 5 --seed 0
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brats_pipeline.atomic_files import write_json_atomic
from brats_pipeline.bundle.command_line import fire_command
from brats_pipeline.data.layouts import (
    CHANNELS,
    MSD_CHANNELS,
    MSD_LABEL_CONVENTION,
    BratsLayout,
    case_id_from_path,
    is_nifti,
    layout_of_case,
    split_nifti_suffix,
)
from brats_pipeline.data.screening import (
    CASE_ERROR_KEY,
    BadCasesError,
    CaseError,
    DatasetError,
    check_case,
    check_label,
)

logger = logging.getLogger(__name__)

#: how many folder levels below the dataset folder are searched for case folders
MAX_DEPTH = 3
#: MSD ``dataset.json`` modality names -> canonical names
MSD_MODALITY_ALIASES: dict[str, str] = {
    "flair": "flair",
    "t2-flair": "flair",
    "t2f": "flair",
    "t1": "t1",
    "t1w": "t1",
    "t1n": "t1",
    "t1gd": "t1c",
    "t1c": "t1c",
    "t1ce": "t1c",
    "t2": "t2",
    "t2w": "t2",
}


def _modality_of(file_name: str, case_name: str, layout: BratsLayout) -> str | None:
    """Canonical modality (or ``"seg"``) that ``file_name`` holds in case ``case_name``, else None.

    Matching is case-insensitive and also accepts a suffix followed by a non-alphanumeric character
    (``..._t1ce (1).nii.gz``), so that a stray copy is reported as a duplicate rather than ignored.
    """
    prefix = (case_name + layout.separator).lower()
    stem = split_nifti_suffix(file_name)[0].lower()
    if not stem.startswith(prefix):
        return None
    rest = stem[len(prefix) :]
    for modality, suffix in (*layout.suffixes.items(), ("seg", layout.label_suffix)):
        if rest == suffix or (rest.startswith(suffix) and not rest[len(suffix)].isalnum()):
            return modality
    return None


def _parse_case_dir(case_dir: Path, layout: BratsLayout) -> dict:
    """The datalist entry of one case folder; :class:`CaseError` for a doubled or missing modality."""
    case_id = case_dir.name
    found: dict[str, list[Path]] = {}
    unknown: list[Path] = []
    for child in sorted(case_dir.iterdir()):
        if child.name.startswith(".") or not child.is_file() or not is_nifti(child.name):
            continue
        modality = _modality_of(child.name, case_id, layout)
        if modality is None:
            unknown.append(child)
        else:
            found.setdefault(modality, []).append(child)
    for modality, files in found.items():
        if len(files) > 1:
            names = ", ".join(f.name for f in files)
            extra = next((f for f in files if f.name != layout.filename(case_id, modality)), files[1])  # the copy
            raise CaseError(case_id, extra, f"two files for {modality!r} in one case folder ({names}); keep one")
    if "seg" not in found:
        # BraTS 2020 ships Training_355 with its label named 'W39_1998.09.19_Segm.nii'
        segs = [f for f in unknown if "seg" in f.name.lower()]
        if len(segs) == 1:
            logger.warning("case %s: using %s as the label (non-standard name)", case_id, segs[0].name)
            found["seg"] = segs
            unknown.remove(segs[0])
    missing = [m for m in CHANNELS if m not in found]
    if missing:
        expected = [case_dir / layout.filename(case_id, m) for m in missing]
        what = f"the {missing[0]} image" if len(missing) == 1 else f"the {', '.join(missing)} images"
        reason = f"missing {what} (no file {', '.join(e.name for e in expected)} or .nii)"
        if unknown:
            reason += f"; NIfTI files not named for this case and layout: {', '.join(f.name for f in unknown)}"
        raise CaseError(case_id, expected[0], reason)
    for f in unknown:
        logger.warning("case %s: ignoring unrecognised NIfTI file %s", case_id, f)
    entry: dict = {"case_id": case_id, "image": [str(found[m][0].resolve()) for m in CHANNELS]}
    if "seg" in found:
        entry["label"] = str(found["seg"][0].resolve())
    entry["layout"] = layout.name
    entry["label_convention"] = layout.label_convention
    return entry


def _stray_error(folder: Path, neighbour: Path, layout: BratsLayout) -> CaseError:
    nifti = sorted(f.name for f in folder.iterdir() if f.is_file() and is_nifti(f.name))
    return CaseError(
        folder.name,
        folder,
        f"folder name does not follow the {layout.name} case naming of the folders beside it "
        f"(e.g. {neighbour.name}), so its {len(nifti)} NIfTI file(s) ({', '.join(nifti[:4])}"
        f"{', ...' if len(nifti) > 4 else ''}) belong to no case; rename or remove it",
    )


def _msd_channel_order(meta: Mapping, json_file: Path) -> list[int]:
    modality = meta.get("modality")
    if not isinstance(modality, Mapping):
        return [MSD_CHANNELS.index(c) for c in CHANNELS]
    names: dict[str, int] = {}
    for index, name in modality.items():
        canonical = MSD_MODALITY_ALIASES.get(str(name).lower())
        if canonical is None:
            raise DatasetError(f"{json_file}: unknown modality {name!r}; known: {sorted(MSD_MODALITY_ALIASES)}")
        names[canonical] = int(index)
    missing = [c for c in CHANNELS if c not in names]
    if missing:
        raise DatasetError(f"{json_file}: modalities {missing} are missing from {dict(modality)}")
    return [names[c] for c in CHANNELS]


def _read_msd(json_file: Path) -> tuple[list[dict], list[CaseError]]:
    """The cases an MSD ``dataset.json`` lists, and the errors of those whose files are missing."""
    try:
        meta = json.loads(json_file.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{json_file}: not a readable MSD dataset.json ({e})") from None
    order = _msd_channel_order(meta, json_file)
    root = json_file.parent

    def entry(image: str, label: str | None) -> dict:
        path = (root / image).resolve()
        case_id = case_id_from_path(path)
        if not path.exists():
            raise CaseError(case_id, path, f"listed in {json_file.name} but does not exist")
        out: dict = {"case_id": case_id, "image": str(path)}
        if label:
            label_path = (root / label).resolve()
            if not label_path.exists():
                raise CaseError(case_id, label_path, f"label listed in {json_file.name} but does not exist")
            out["label"] = str(label_path)
        out.update(layout="msd", label_convention=MSD_LABEL_CONVENTION, channel_order=list(order))
        return out

    items = [(item["image"], item.get("label")) for item in meta.get("training", [])]
    items += [(item["image"] if isinstance(item, Mapping) else item, None) for item in meta.get("test", [])]
    cases: list[dict] = []
    errors: list[CaseError] = []
    for image, label in items:
        try:
            cases.append(entry(image, label))
        except CaseError as e:
            errors.append(e)
    return cases, errors


def _is_msd_json(path: Path) -> bool:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, Mapping) and ("training" in meta or "test" in meta)


def _holds_nifti(folder: Path) -> bool:
    try:
        return any(f.is_file() and is_nifti(f.name) and not f.name.startswith(".") for f in folder.iterdir())
    except OSError:
        return False


def _scan(root: Path) -> tuple[list[tuple[Path, BratsLayout]], list[Path], list[tuple[Path, Path]]]:
    """Case folders and MSD ``dataset.json`` files at most :data:`MAX_DEPTH` levels below ``root``, and the stray
    folders: ``(folder, a case folder beside it)`` for each folder of NIfTI files next to case folders whose name
    follows no layout."""
    layout = layout_of_case(root.name)
    if layout is not None:  # the folder of a single case
        return [(root, layout)], [], []
    cases: list[tuple[Path, BratsLayout]] = []
    msd: list[Path] = []
    strays: list[tuple[Path, Path]] = []
    pending = [(root, 0)]
    while pending:
        folder, depth = pending.pop()
        json_file = folder / "dataset.json"
        if json_file.is_file() and _is_msd_json(json_file):
            msd.append(json_file)
            continue
        others: list[Path] = []
        first_case: Path | None = None
        for child in sorted(folder.iterdir()):
            if child.name.startswith(".") or not child.is_dir():
                continue
            layout = layout_of_case(child.name)
            if layout is not None:
                cases.append((child, layout))
                first_case = first_case or child
            else:
                others.append(child)
        for child in others:
            if first_case is not None and _holds_nifti(child):
                strays.append((child, first_case))
            elif depth < MAX_DEPTH:
                pending.append((child, depth + 1))
    return cases, msd, strays


def _duplicate_errors(cases: list[dict]) -> tuple[list[dict], list[CaseError]]:
    """``cases`` without the later entries of a case id seen before, and one error for each of those."""

    def where(case: dict) -> str | Path:
        return case["image"] if isinstance(case["image"], str) else Path(case["image"][0]).parent

    seen: dict[str, dict] = {}
    errors: list[CaseError] = []
    for case in cases:
        first = seen.setdefault(case["case_id"], case)
        if first is not case:
            errors.append(
                CaseError(case["case_id"], where(case), f"the same case id appears twice (also at {where(first)})")
            )
    return list(seen.values()), errors


def find_cases(
    dataset_dir: str | os.PathLike, check_files: bool = True, keep_bad_cases: bool = False, check_labels: bool = False
) -> list[dict]:
    """All cases under ``dataset_dir``, sorted by case id, in one recognised layout.

    Args:
        dataset_dir: a dataset folder (or any folder above the case folders, or a single case folder).
        check_files: run the header-level checks of :func:`brats_pipeline.data.screening.check_case` on every case
            (existence, readable non-truncated NIfTI, 3-D (4-D for MSD), same shape and affine in a case).
        keep_bad_cases: return each unusable case (a missing or doubled modality, a stray folder, a case id seen
            twice, a failed header check) as an entry ``{"case_id", ..., "case_error": {"file", "reason"}}``
            instead of raising, for :func:`brats_pipeline.data.screening.screen_cases` to report and skip.
        check_labels: when some cases are unusable (and without ``keep_bad_cases``), also check the label values
            of the others (:func:`~brats_pipeline.data.screening.check_label`) before raising, so that one error
            lists every bad case. Otherwise the values are left to the caller (training checks every label file
            when it starts, :func:`~brats_pipeline.training.guards.check_label_files`), so they are read once.

    Returns:
        entries ``{"case_id", "image", "label"?, "layout", "label_convention", "channel_order"? (MSD)}`` with
        absolute paths; ``image`` lists the files in :data:`~brats_pipeline.data.layouts.CHANNELS` order.

    Raises:
        DatasetError: the folder is missing or empty, holds no recognisable case, or mixes layouts.
        CaseError: without ``keep_bad_cases``, the one unusable case (the message names the case and the file).
        BadCasesError: without ``keep_bad_cases``, several unusable cases: the message lists every one.
    """
    root = Path(dataset_dir).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    case_dirs, msd_files, strays = _scan(root)
    kinds = sorted({layout.name for _, layout in case_dirs} | ({"msd"} if msd_files else set()))
    if not kinds:
        what = "is empty" if not any(root.iterdir()) else "holds no recognisable BraTS case"
        examples = ", ".join(["Brats18_2013_2_1", "BraTS20_Training_001", "BraTS2021_00001", "BraTS-GLI-00001-000"])
        raise DatasetError(
            f"dataset folder {root} {what}: expected case folders named like {examples} "
            f"(up to {MAX_DEPTH} levels deep) or an MSD Task01 dataset.json"
        )
    if len(kinds) > 1 or len(msd_files) > 1:
        where = [f"{p} ({layout.name})" for p, layout in case_dirs[:1]] + [str(p) for p in msd_files[:2]]
        raise DatasetError(
            f"dataset folder {root} mixes several datasets/layouts {kinds} (e.g. {', '.join(where)}); "
            "point dataset_dir at one of them"
        )
    errors: list[CaseError] = []
    if msd_files:
        cases, errors = _read_msd(msd_files[0])
        layout_fields = {"layout": "msd", "label_convention": MSD_LABEL_CONVENTION}
    else:
        cases = []
        for path, layout in case_dirs:
            try:
                cases.append(_parse_case_dir(path, layout))
            except CaseError as e:
                errors.append(e)
        layout = case_dirs[0][1]
        errors += [_stray_error(folder, neighbour, layout) for folder, neighbour in strays]
        layout_fields = {"layout": layout.name, "label_convention": layout.label_convention}
    cases, duplicates = _duplicate_errors(cases)
    errors += duplicates
    entries = [e.as_entry(**layout_fields) for e in errors]  # cases that could not be assembled
    for case in cases:
        try:
            if check_files:
                check_case(case, check_data=False)
        except CaseError as e:
            errors.append(e)
            case = e.as_entry(**{k: v for k, v in case.items() if k != "case_id"})
        entries.append(case)
    if errors and not keep_bad_cases:
        if check_labels:
            errors += _label_errors([case for case in entries if CASE_ERROR_KEY not in case])
        if len(errors) == 1:
            raise errors[0]
        raise BadCasesError(sorted(errors, key=lambda e: e.case_id), root)
    return sorted(entries, key=lambda c: c["case_id"])


def _label_errors(entries: list[dict]) -> list[CaseError]:
    errors = []
    for entry in entries:
        try:
            check_label(entry)
        except CaseError as e:
            errors.append(e)
    return errors


def _num_validation(num_validation: int | float, num_labelled: int) -> int:
    if isinstance(num_validation, float) and 0.0 < num_validation < 1.0:
        n = int(round(num_validation * num_labelled))
    elif float(num_validation).is_integer() and num_validation >= 0:
        n = int(num_validation)
    else:
        raise ValueError(f"num_validation must be a count >= 0 or a fraction in (0, 1), got {num_validation!r}")
    if n > num_labelled:
        raise ValueError(f"num_validation={num_validation!r} asks for {n} cases but only {num_labelled} are labelled")
    return n


def build_datalist(
    dataset_dir: str | os.PathLike,
    output_file: str | os.PathLike | None = None,
    num_folds: int = 5,
    num_validation: int | float = 0,
    seed: int = 0,
    check_files: bool = True,
    keep_bad_cases: bool = False,
    check_labels: bool = False,
) -> dict:
    """Decathlon-style datalist of ``dataset_dir`` with a seeded cross-validation split.

    Labelled cases are shuffled with ``seed``; the first ``num_validation`` (a count, or a fraction of the
    labelled cases) form ``validation``, the rest ``training``, each with a ``"fold"`` in ``0..num_folds-1``
    assigned round-robin in shuffled order (folds differ in size by at most one). Unlabelled cases form
    ``testing``. Lists are sorted by case id.

    Args:
        keep_bad_cases: list the unusable cases under ``"bad_cases"`` (entries carrying their error, see
            :func:`find_cases`) instead of raising; they take no part in the split. Off for training, which must
            not start on a dataset with bad cases.
        check_labels: list bad label values with the other bad cases (:func:`find_cases`); training passes its
            ``check_labels``.

    Returns:
        ``{"name", "dataset_dir", "layout", "label_convention", "channels", "num_folds", "seed", "training",
        "validation", "testing"}`` (and ``"bad_cases"`` with ``keep_bad_cases``); written atomically as JSON to
        ``output_file`` when given.

    Raises:
        CaseError, BadCasesError: without ``keep_bad_cases``, naming every unusable case (see :func:`find_cases`).
    """
    num_folds = int(num_folds)
    if num_folds < 1:
        raise ValueError(f"num_folds must be at least 1, got {num_folds}")
    found = find_cases(dataset_dir, check_files, keep_bad_cases, check_labels)
    cases = [c for c in found if CASE_ERROR_KEY not in c]
    bad_cases = [c for c in found if CASE_ERROR_KEY in c]
    labelled = [c for c in cases if "label" in c]
    n_val = _num_validation(num_validation, len(labelled))
    order = np.random.default_rng(int(seed)).permutation(len(labelled))
    validation = [labelled[i] for i in order[:n_val]]
    training = [{**labelled[i], "fold": k % num_folds} for k, i in enumerate(order[n_val:])]
    if 0 < len(training) < num_folds:
        raise DatasetError(
            f"{dataset_dir}: {len(training)} labelled case(s) cannot fill {num_folds} folds; lower num_folds "
            f"(--num_folds {max(1, len(training))} or less)"
        )
    root = Path(dataset_dir).expanduser().resolve()
    datalist = {
        "name": root.name,
        "dataset_dir": str(root),
        "layout": found[0]["layout"],
        "label_convention": found[0]["label_convention"],
        "channels": list(CHANNELS),
        "num_folds": num_folds,
        "seed": int(seed),
        "training": sorted(training, key=lambda c: c["case_id"]),
        "validation": sorted(validation, key=lambda c: c["case_id"]),
        "testing": [c for c in cases if "label" not in c],
    }
    if keep_bad_cases:
        datalist["bad_cases"] = bad_cases
    if output_file is not None:
        write_json_atomic(datalist, output_file)
    return datalist


def main(
    dataset_dir: str,
    output_file: str = "datalist.json",
    num_folds: int = 5,
    num_validation: int | float = 0,
    seed: int = 0,
) -> None:
    """Command line: scan ``dataset_dir`` and write its datalist to ``output_file``."""
    d = build_datalist(dataset_dir, output_file, num_folds, num_validation, seed, check_labels=True)
    print(
        f"{output_file}: {len(d['training'])} training ({d['num_folds']} folds), {len(d['validation'])} validation, "
        f"{len(d['testing'])} testing cases; layout {d['layout']}, labels {d['label_convention']}"
    )


__all__ = ["MAX_DEPTH", "build_datalist", "find_cases", "fold_split", "main"]


def fold_split(
    datalist: Mapping[str, Any],
    fold: int = 0,
    train_on_all: bool = False,
    validation: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, list[dict]]:
    """The training and validation cases of one run on a datalist (:func:`build_datalist`).

    ``{"training": the cases of every other fold, "validation": the cases of ``fold`` and the datalist's
    ``validation`` list}``; with ``train_on_all``, every labelled case trains (Myronenko 2018 trains on all 285
    cases and keeps the final model). ``validation`` (the cases of a separate labelled folder, ``val_dataset_dir``)
    is added to the validation cases in both modes: the 3D-ESPNet code trains on all BraTS 2018 cases and validates
    on BraTS 2017 less the overlap (its README's "Option 3")::

        "split": {"_target_": "brats_pipeline.data.datalist.fold_split", "datalist": "@datalist", "fold": "@fold",
                  "train_on_all": "@train_on_all", "validation": "@val_folder_cases"},
        "train_files": "$@split['training']",
    """
    cases, extra, separate = list(datalist["training"]), list(datalist.get("validation", [])), list(validation or [])
    if train_on_all:
        return {"training": cases + extra, "validation": separate}
    return {
        "training": [c for c in cases if c["fold"] != fold],
        "validation": [c for c in cases if c["fold"] == fold] + extra + separate,
    }


def cli() -> None:
    """Console command ``brats-datalist`` (also ``python -m brats_pipeline.data.datalist``)."""
    fire_command(main)


if __name__ == "__main__":
    cli()
