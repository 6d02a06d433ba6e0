"""Scoring speed per case: our ``--rules brats2025`` against the official package called directly, and our
``brats2023`` for context, in one run on one case pair.

Writes one synthetic BraTS 2023 case (:func:`brats_pipeline.tools.synthetic.generate_dataset`, ``--shape``, by
default the full 240 x 240 x 155) and a prediction made from its reference (shifted by two voxels, plus a
false-positive ET blob), then times, each after ``--warmup`` untimed runs, the median of ``--repeats`` runs of

* ``package``: ``brats_evaluation.evaluate_single_exam`` on the two files (the evaluator loaded once, as its
  command line does): what the leaderboard runs;
* ``ours brats2025``: :func:`brats_pipeline.evaluation.scoring.package_case_scores` (the same call, after our label
  checks: both files read once more);
* ``ours brats2023``: :func:`brats_pipeline.evaluation.scoring.score_case` under the 2023 toolkit's rules (legacy +
  lesion-wise + NSD for ET, TC, WT);

with ``--threads`` torch threads (1 by default: one core), and prints a Markdown table with each time's ratio to
the package's. ``brats2025`` needs ``pip install -e .[challenge]``. Run it on an idle machine::

    python benchmarks/scoring_speed.py --repeats 5
    python benchmarks/scoring_speed.py --shape 48 --repeats 1 --warmup 0     # a quick check that it runs
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # run as a file: Python put benchmarks/ first on sys.path; import it as the package ``benchmarks`` instead
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.tables import format_table, ratio  # noqa: E402
from benchmarks.timing import median, time_runs  # noqa: E402
from brats_pipeline.evaluation.challenge_package import ChallengePackage, import_package  # noqa: E402
from brats_pipeline.evaluation.scoring import package_case_scores, score_case  # noqa: E402
from brats_pipeline.tools.synthetic import generate_dataset  # noqa: E402


def make_pair(root: Path, shape: tuple[int, int, int], seed: int) -> tuple[str, Path, Path]:
    """``(case_id, prediction, reference)``: a synthetic reference and its perturbed copy."""
    case = generate_dataset(root / "labels", 1, "brats2023", shape, seed)[0]
    ref_path = case / f"{case.name}-seg.nii.gz"
    ref = nib.load(str(ref_path))
    pred = np.roll(np.asanyarray(ref.dataobj), 2, axis=0)
    side = max(2, min(shape) // 16)
    pred[-2 * side : -side, -2 * side : -side, -2 * side : -side] = 3  # a far false-positive ET blob
    pred_path = root / "preds" / f"{case.name}.nii.gz"
    pred_path.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(pred.astype(np.uint8), ref.affine, ref.header), str(pred_path))
    return case.name, pred_path, ref_path


def time_scoring(shape: tuple[int, int, int], seed: int, warmup: int, repeats: int) -> list[list]:
    """Rows ``[what, median s, timed runs, ratio to the package]`` of the three scorings of one case pair."""
    package = ChallengePackage("GLI")
    evaluate_single_exam = import_package().evaluate_single_exam

    def official() -> dict:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return evaluate_single_exam(str(pred), str(ref), case_id, package.evaluator)

    with tempfile.TemporaryDirectory(prefix="scoring-speed-") as tmp:
        case_id, pred, ref = make_pair(Path(tmp), shape, seed)
        runs = {
            "package (evaluate_single_exam)": official,
            "ours --rules brats2025": lambda: package_case_scores(package, pred, ref, case_id, "brats2023"),
            "ours --rules brats2023": lambda: score_case(pred, ref, "brats2023", rules="brats2023"),
        }
        times = {what: median(time_runs(fn, warmup, repeats)[1]) for what, fn in runs.items()}
    base = times["package (evaluate_single_exam)"]
    return [[what, t, repeats, ratio(t, base)] for what, t in times.items()]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[240, 240, 155], help="H W D, or one number")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (the median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: one core)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = tuple(args.shape * 3 if len(args.shape) == 1 else args.shape)
    rows = time_scoring(shape, args.seed, args.warmup, args.repeats)
    table = format_table(["scoring of one case", "median (s)", "timed runs", "vs package"], rows)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{'x'.join(map(str, shape))} case pair, {args.threads} torch thread(s), {platform.processor() or 'cpu'}, "
        f"{os.cpu_count()} cores, load average {load:.2f}\n\n{table}"
    )
    return table


if __name__ == "__main__":
    main()
