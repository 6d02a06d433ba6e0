"""Where an inference case's time goes, per stage, through each bundle's shipped ``inference.json``.

Times every transform of ``preprocessing`` and ``postprocessing`` and the network's forward passes on full-size
synthetic cases (random weights at the paper width; loading in the main process, ``num_workers`` 0, so the stages
add up), and groups them as

* ``read``: ``LoadImaged`` (four gzip NIfTI files);
* ``pre``: the other pre-processing (channel order, orientation, brain crop, normalisation);
* ``network``: the forward passes;
* ``post``: ``Invertd``, thresholding / argmax, label conversion;
* ``write``: ``SaveLabelMapd`` (the label map, gzip);
* ``other``: the rest of the per-case wall time (collation, engine).

The wall time runs from the first case's fetch to the last case's end: the run's start and end (loading and
checksumming the model, screening the folder, the summary) do not grow with the cases and are left out.

With ``--end-to-end`` each configuration also runs as shipped (its own ``num_workers``: the next
case is read and pre-processed in a worker process while the network runs) and reports that wall time minus the
network's time measured alone (the ``network`` column): what the whole pipeline adds to the network on this machine,
contention for the cores included (``e2e outside``).

``--compare KEY=JSON`` adds a second configuration of the same bundle (the shipped file with that override), and
``--baseline-ref REF`` the bundle's ``inference.json`` as it was at git ``REF``; all run in the same process,
alternately (``python -m benchmarks.inference_split`` is the same)::

    python benchmarks/inference_split.py --cases 3 --repeats 2 --baseline-ref b734885 --end-to-end  # vs 0.2.0
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:
    # run as a file: Python put benchmarks/ first on sys.path; import it as the package ``benchmarks`` instead
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from benchmarks.tables import format_table  # noqa: E402
from benchmarks.timing import median  # noqa: E402
from brats_pipeline.bundle.workflows import bundle_workflow, config_at_revision  # noqa: E402
from brats_pipeline.tools.synthetic import generate_dataset  # noqa: E402

WIDTH = {"segresnet_vae": 32, "espnet3d": 32}
STAGE_OF = {"LoadImaged": "read", "SaveLabelMapd": "write", "SaveOverlayd": "write"}


def build(
    bundle: str, root: Path, dataset: Path, overrides: dict[str, Any], config: Path | None = None, shipped: bool = False
):
    """The bundle's inference workflow with random weights; ``num_workers`` 0 unless ``shipped``."""
    (root / "models").mkdir(parents=True, exist_ok=True)
    values = {"network_width": WIDTH[bundle], "overwrite": True, "progress": False, **overrides}
    if not shipped:
        values["num_workers"] = 0
    wf = bundle_workflow(
        bundle,
        config or "inference.json",
        workflow_type="inference",
        bundle_root=str(root),
        dataset_dir=str(dataset),
        **values,
    )
    torch.save(wf.parser.get_parsed_content("network").state_dict(), root / "models" / "model.pt")
    return wf


def instrument(wf, times: dict[str, float]) -> None:
    """Make each transform and the network add their seconds to ``times[stage]``.

    Each transform gets a subclass of its own class with a timed ``__call__`` (the objects stay the same, so
    ``Invertd``'s identity and type checks still pass).
    """

    def timed_class(cls: type, stage: str) -> type:
        def __call__(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return cls.__call__(self, *args, **kwargs)
            finally:
                times[stage] += time.perf_counter() - start

        return type(cls.__name__, (cls,), {"__call__": __call__})

    for part, default in (("preprocessing", "pre"), ("postprocessing", "post")):
        for t in wf.parser.get_parsed_content(part).transforms:
            t.__class__ = timed_class(type(t), STAGE_OF.get(type(t).__name__, default))
    network = wf.parser.get_parsed_content("network")
    forward = network.forward

    def timed_forward(*args, **kwargs):
        start = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            times["network"] += time.perf_counter() - start

    network.forward = timed_forward


def case_span(evaluator) -> dict[str, float]:
    """Record, on ``evaluator``, when the first case was fetched and the last one finished.

    The span between them is the per-case work (reading, pre-processing, network, post-processing, writing); the
    run's start and end (loading and checksumming the model, screening the folder, the summary) are left out:
    they do not grow with the number of cases.
    """
    from ignite.engine import Events

    span: dict[str, float] = {}
    if not hasattr(evaluator, "_case_span"):
        evaluator.add_event_handler(
            Events.GET_BATCH_STARTED, lambda e: e._case_span.setdefault("first", time.perf_counter())
        )
        evaluator.add_event_handler(
            Events.ITERATION_COMPLETED, lambda e: e._case_span.__setitem__("last", time.perf_counter())
        )
    evaluator._case_span = span
    return span


def run_end_to_end(wf) -> float:
    """Seconds of the per-case work of one run of the workflow as configured (:func:`case_span`)."""
    evaluator = wf.parser.get_parsed_content("evaluator")
    span = case_span(evaluator)
    evaluator.run()
    return span["last"] - span["first"]


def run_once(wf) -> dict[str, float]:
    times: dict[str, float] = defaultdict(float)
    if not getattr(wf, "_instrumented", None):
        wf._times = times
        instrument(wf, wf._times)
        wf._instrumented = True
    wf._times.clear()
    evaluator = wf.parser.get_parsed_content("evaluator")
    span = case_span(evaluator)
    evaluator.run()  # every timed stage is per-case work, inside the span
    wall = span["last"] - span["first"]
    out = dict(wf._times)
    out["other"] = wall - sum(out.values())
    out["wall"] = wall
    out["outside_network"] = wall - out.get("network", 0.0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", nargs="+", default=list(WIDTH))
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compare", action="append", default=[], help="KEY=JSON override of a second configuration")
    parser.add_argument(
        "--baseline-ref", default=None, help="git ref whose inference.json runs as a second configuration"
    )
    parser.add_argument(
        "--end-to-end", action="store_true", help="also run each configuration with its shipped num_workers"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = {"shipped": {}}
    if args.compare:
        configs["compared"] = {k: json.loads(v) for k, v in (c.split("=", 1) for c in args.compare)}

    results: dict[tuple[str, str], list[dict[str, float]]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="inference_split_") as tmp:
        work = Path(tmp)
        generate_dataset(
            work / "data", args.cases, layout="brats2023", shape=(240, 240, 155), seed=0, with_labels=False
        )
        for bundle in args.bundles:
            setups = {name: (o, None) for name, o in configs.items()}
            if args.baseline_ref:
                old = config_at_revision(bundle, "inference.json", args.baseline_ref, work / bundle / "baseline_config")
                width_key = {"segresnet_vae": "network_def#init_filters", "espnet3d": "network_width"}[bundle]
                setups[f"baseline {args.baseline_ref}"] = ({width_key: WIDTH[bundle]}, old)
            workflows = {
                name: build(bundle, work / bundle / f"split {name}", work / "data", o, config=c)
                for name, (o, c) in setups.items()
            }
            shipped = {
                name: build(bundle, work / bundle / f"e2e {name}", work / "data", o, config=c, shipped=True)
                for name, (o, c) in setups.items()
                if args.end_to_end
            }
            for name, wf in workflows.items():  # warm-up
                run_once(wf)
                if name in shipped:
                    run_end_to_end(shipped[name])
            for _ in range(args.repeats):  # alternate the configurations
                for name, wf in workflows.items():
                    results[(bundle, name)].append(run_once(wf))
                    if name in shipped:
                        results[(bundle, name)][-1]["e2e_wall"] = run_end_to_end(shipped[name])

    stages = ("read", "pre", "network", "post", "write", "other", "outside_network", "wall")
    if args.end_to_end:
        for runs in results.values():
            for r in runs:
                r["e2e_outside"] = r["e2e_wall"] - r["network"]
        stages += ("e2e_wall", "e2e_outside")
    print(
        f"\nSeconds per case ({args.cases} full-size cases, median of {args.repeats} alternating runs, "
        f"{args.threads} threads)\n"
    )
    table = []
    for (bundle, name), runs in results.items():
        label = f"compared ({', '.join(args.compare)})" if name == "compared" else name
        table.append([bundle, label, *(f"{median([r.get(s, 0.0) for r in runs]) / args.cases:.2f}" for s in stages)])
    print(format_table(["bundle", "config", *stages], table, pad=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
