"""The three rule sets on the same cases, side by side: legacy (``captk``), the 2023 toolkit (``brats2023``) and the
official 2025 package (``brats2025``).

Writes ``--num-cases`` synthetic BraTS 2023 cases (:func:`brats_pipeline.tools.synthetic.generate_dataset`, one
tumor each, ``--shape``), makes one prediction per case by perturbing its reference in a known way
(:data:`PERTURBATIONS`), scores the folder under each rule set with
:func:`brats_pipeline.evaluation.scoring.score_folders` and prints one Markdown table: per case and region the
legacy Dice and HD95, the 2023 lesion-wise Dice and HD95, and the 2025 lesion-wise Dice (matched pairs), detection
F1 and global Dice and HD95, then the means. ``docs/scoring.md`` shows its output (``brats2025`` needs
``pip install -e .[challenge]``)::

    python benchmarks/rule_sets.py --num-cases 5 --shape 96
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # run as a file: Python put benchmarks/ first on sys.path; import it as the package ``benchmarks`` instead
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from benchmarks.tables import format_table  # noqa: E402
from brats_pipeline.evaluation.scoring import score_folders  # noqa: E402
from brats_pipeline.tools.synthetic import generate_dataset  # noqa: E402

REGIONS = ("ET", "TC", "WT")
#: rule set -> (label in the table, its columns: (header, metric, decimals))
RULE_SET_COLUMNS: dict[str, tuple[str, tuple[tuple[str, str, int], ...]]] = {
    "captk": ("legacy", (("Dice", "dice", 3), ("HD95", "hd95", 1))),
    "brats2023": ("2023 toolkit", (("lesion Dice", "lesion_dice", 3), ("lesion HD95", "lesion_hd95", 1))),
    "brats2025": (
        "2025 package",
        (("lesion Dice", "lesion_dice", 3), ("F1", "lesion_f1", 3), ("Dice", "dice", 3), ("HD95", "hd95", 1)),
    ),
}


def _far_blob(label: np.ndarray) -> np.ndarray:
    """A false-positive ET cube (1/16 of the volume's side) in the corner farthest from the tumor."""
    out = label.copy()
    side = max(2, min(label.shape) // 16)
    center = np.asarray(ndimage.center_of_mass(label > 0))
    corner = tuple(side if c > s / 2 else s - 2 * side for c, s in zip(center, label.shape, strict=True))
    out[tuple(slice(c, c + side) for c in corner)] = 3
    return out


def _split(label: np.ndarray) -> np.ndarray:
    """The tumor cut in two by a 2-voxel slab through its center (first axis)."""
    out = label.copy()
    c = int(ndimage.center_of_mass(label > 0)[0])
    out[c - 1 : c + 1] = 0
    return out


def _dilated(label: np.ndarray) -> np.ndarray:
    """Every label grown by one voxel (edema last, so the core keeps its labels)."""
    out = label.copy()
    for value in (2, 1, 3):
        grown = ndimage.binary_dilation(label == value) & (out == 0)
        out[grown] = value
    return out


def _missed_et(label: np.ndarray) -> np.ndarray:
    """ET predicted as necrosis: the enhancing region missed, TC and WT intact."""
    return np.where(label == 3, 1, label).astype(label.dtype)


#: name -> how the prediction is made from the reference
PERTURBATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "shifted": lambda label: np.roll(label, 2, axis=0),
    "far_fp": _far_blob,
    "split": _split,
    "dilated": _dilated,
    "missed_et": _missed_et,
}


def make_cases(root: Path, num_cases: int, shape: tuple[int, int, int], seed: int) -> tuple[Path, Path, dict]:
    """Synthetic references in ``root/labels`` and perturbed predictions in ``root/preds``; ``{case_id: name}``."""
    label_dir, pred_dir = root / "labels", root / "preds"
    pred_dir.mkdir(parents=True)
    names = {}
    for case, name in zip(
        generate_dataset(label_dir, num_cases, "brats2023", shape, seed), PERTURBATIONS, strict=False
    ):
        ref = nib.load(str(case / f"{case.name}-seg.nii.gz"))
        pred = PERTURBATIONS[name](np.asanyarray(ref.dataobj)).astype(np.uint8)
        nib.save(nib.Nifti1Image(pred, ref.affine, ref.header), str(pred_dir / f"{case.name}.nii.gz"))
        names[case.name] = name
    return label_dir, pred_dir, names


def rule_set_table(label_dir: Path, pred_dir: Path, names: dict[str, str]) -> str:
    """The Markdown table of the three rule sets on the cases (see the module docstring)."""
    scored = {
        rules: score_folders(pred_dir, label_dir, "brats2023", rules=rules, progress=False, print_table=False)
        for rules in RULE_SET_COLUMNS
    }
    by_case = {rules: {(r["case_id"], r["region"]): r for r in rows} for rules, (rows, _) in scored.items()}
    headers = ["case", "region"] + [
        f"{label}: {header}" for label, columns in RULE_SET_COLUMNS.values() for header, _, _ in columns
    ]
    rows = []
    for case, name in names.items():
        for region in REGIONS:
            cells = [
                f"{by_case[rules][(case, region)][metric]:.{digits}f}"
                for rules, (_, columns) in RULE_SET_COLUMNS.items()
                for _, metric, digits in columns
            ]
            rows.append([name, region, *cells])
    for region in REGIONS:
        cells = [
            f"{scored[rules][1]['metrics'][region][metric]['mean']:.{digits}f}"
            for rules, (_, columns) in RULE_SET_COLUMNS.items()
            for _, metric, digits in columns
        ]
        rows.append(["**mean**", region, *cells])
    return format_table(headers, rows)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-cases", type=int, default=len(PERTURBATIONS), help="cases (one perturbation each)")
    parser.add_argument("--shape", type=int, nargs="+", default=[96], help="H W D, or one number for a cube")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic cases")
    args = parser.parse_args(argv)
    shape = tuple(args.shape * 3 if len(args.shape) == 1 else args.shape)
    with tempfile.TemporaryDirectory(prefix="rule-sets-") as tmp:
        label_dir, pred_dir, names = make_cases(Path(tmp), min(args.num_cases, len(PERTURBATIONS)), shape, args.seed)
        table = rule_set_table(label_dir, pred_dir, names)
    print(f"{len(names)} synthetic cases of {'x'.join(map(str, shape))}, seed {args.seed}\n\n{table}")
    return table


if __name__ == "__main__":
    main()
