"""Figures: segmentation overlays in the style of the seed paper's Fig. 2, and training curves.

* :func:`overlay_figure`: axial, sagittal and coronal T1c slices through the tumor's center with the
  predicted labels (and the reference labels in a second row) in the BraTS colors: necrosis / non-enhancing
  core red, edema green, enhancing tumor yellow (Myronenko 2018, Fig. 2; ITK-SNAP's default label colors).
* :func:`training_curves_figure`: loss terms per iteration and Dice per region per epoch, read from the
  TensorBoard event files that MONAI's ``TensorBoardStatsHandler`` writes.
* :func:`scoring_summary_figure`: the per-case distribution of whole-region and lesion-wise Dice and HD95 per region
  (and the detection F1 under ``--rules brats2025``), from the rows of
  :func:`brats_pipeline.evaluation.scoring.score_folders` (written next to its tables), titled with its rule set.

Command line (examples with their output in ``docs/tools.md``)::

    python -m brats_pipeline.evaluation.figures curves LOG_DIR OUT.png [--smoothing 0.0]
    python -m brats_pipeline.evaluation.figures overlay IMAGE PRED OUT.png [--ref REF] [--convention brats2018]

``IMAGE`` is the T1c NIfTI, a BraTS case folder (its T1c file is found by name) or a 4-D NIfTI (``--channel``,
default the T1c channel of MSD's order). Drawing uses matplotlib's Agg canvas directly: importing this module does
not change the pyplot backend. PNGs are written atomically (:func:`brats_pipeline.atomic_files.atomic_write`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation
from scipy import ndimage

from brats_pipeline.atomic_files import atomic_write
from brats_pipeline.bundle.command_line import fire_command
from brats_pipeline.data.layouts import LAYOUTS, MSD_CHANNELS, case_id_from_path
from brats_pipeline.transforms.labels import LabelConvention, label_to_classes

#: BraTS overlay colors (RGB) of the contiguous classes of :data:`brats_pipeline.transforms.labels.CLASSES`
BRATS_PALETTE: dict[str, tuple[float, float, float]] = {
    "necrosis": (1.0, 0.0, 0.0),  # red: NCR/NET (2018), NETC (2023)
    "edema": (0.0, 1.0, 0.0),  # green: ED (2018), SNFH (2023)
    "enhancing": (1.0, 1.0, 0.0),  # yellow: ET
}
LEGEND_NAMES: dict[str, str] = {
    "necrosis": "necrosis / non-enhancing core",
    "edema": "edema",
    "enhancing": "enhancing tumor",
}
#: panel order of :func:`overlay_figure`
VIEWS: tuple[str, ...] = ("axial", "sagittal", "coronal")
EVENT_FILE_GLOB = "events.out.tfevents.*"


def _save_png(fig: Figure, out_path: str | os.PathLike, dpi: int) -> Path:
    out = Path(out_path)
    with atomic_write(out, "wb") as f:
        FigureCanvasAgg(fig)
        fig.savefig(f, format="png", dpi=dpi, facecolor=fig.get_facecolor())
    return out


def _to_ras(arr: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(apply_orientation(arr, ornt))


def _slices(vol: np.ndarray, center: Sequence[int], spacing: Sequence[float]) -> dict[str, tuple[np.ndarray, float]]:
    """RAS volume -> 2-D views in radiological display (patient's right on the image's left, anterior/superior up)
    with the pixel aspect (height / width in mm)."""
    i, j, k = center
    sx, sy, sz = spacing
    return {
        "axial": (vol[::-1, ::-1, k].T, sy / sx),  # rows: anterior -> posterior, cols: right -> left
        "sagittal": (vol[i, ::-1, ::-1].T, sz / sy),  # rows: superior -> inferior, cols: anterior -> posterior
        "coronal": (vol[::-1, j, ::-1].T, sz / sx),  # rows: superior -> inferior, cols: right -> left
    }


#: edge letters of each view: (top, bottom, left, right)
_EDGE_LETTERS = {"axial": "APRL", "sagittal": "SIAP", "coronal": "SIRL"}
#: where they go, in axes fraction: (x, y, ha, va) for top, bottom, left, right
_EDGE_POSITIONS = ((0.5, 0.99, "center", "top"), (0.5, 0.01, "center", "bottom"),
                   (0.01, 0.5, "left", "center"), (0.99, 0.5, "right", "center"))  # fmt: skip


def _rgba(classes: np.ndarray, alpha: float) -> np.ndarray:
    rgba = np.zeros((*classes.shape, 4), dtype=np.float32)
    for index, name in enumerate(BRATS_PALETTE, start=1):
        rgba[classes == index] = (*BRATS_PALETTE[name], alpha)
    return rgba


def overlay_figure(
    t1c: NdarrayOrTensor,
    pred_label: NdarrayOrTensor,
    ref_label: NdarrayOrTensor | None = None,
    convention: str | LabelConvention = "brats2018",
    spacing: Sequence[float] | None = None,
    out_path: str | os.PathLike | None = None,
    title: str | None = None,
    affine: np.ndarray | None = None,
    axcodes: str = "RAS",
    pred_convention: str | LabelConvention | None = None,
    alpha: float = 0.45,
    window_percentiles: tuple[float, float] = (0.5, 99.5),
    panel_inches: float = 3.0,
    dpi: int = 120,
) -> Path:
    """Axial, sagittal and coronal T1c slices through the tumor center with label overlays, written as PNG.

    Args:
        t1c: image ``(H, W, D)`` (or ``(1, H, W, D)``).
        pred_label: predicted label map of the same spatial shape, in ``pred_convention`` (default ``convention``).
        ref_label: optional reference label map, drawn in a second row.
        convention: label convention of the reference (and of the prediction unless ``pred_convention``).
        spacing: voxel size in mm per array axis; default from ``affine``, else isotropic 1 mm.
        out_path: PNG file to write (required).
        title: figure title.
        affine: the images' voxel-to-world affine; used to display any stored orientation correctly.
        axcodes: orientation of the array axes when no ``affine`` is given (nibabel codes, e.g. ``"LPS"`` for
            BraTS files read as stored, ``"RAS"`` after MONAI's ``Orientationd(axcodes="RAS")``).
        pred_convention: label convention of the prediction when it differs.
        alpha: opacity of the label colors.
        window_percentiles: gray window from these percentiles of the nonzero T1c voxels.
        panel_inches: size of one panel.
        dpi: resolution of the PNG.

    The slices go through the center of mass of the reference's whole tumor when a reference is given, else of the
    prediction's, else through the image center. Views are radiological (patient's right on the left; anterior up
    on axial, superior up on sagittal/coronal) with edge letters; pixel aspect follows the spacing.

    Returns:
        the path of the PNG.
    """
    if out_path is None:
        raise ValueError("overlay_figure needs out_path")
    img = np.asarray(t1c, dtype=np.float32)
    img = img[0] if img.ndim == 4 and img.shape[0] == 1 else img
    if img.ndim != 3:
        raise ValueError(f"t1c must be (H, W, D), got shape {img.shape}")
    labels = {"Prediction": label_to_classes(pred_label, pred_convention or convention, "prediction")[0].numpy()}
    if ref_label is not None:
        labels["Reference"] = label_to_classes(ref_label, convention, "reference")[0].numpy()
    for name, lab in labels.items():
        if lab.shape != img.shape:
            raise ValueError(f"{name.lower()} label shape {lab.shape} differs from the image shape {img.shape}")

    ornt = io_orientation(affine) if affine is not None else axcodes2ornt(tuple(axcodes.upper()))
    if spacing is None:
        spacing = nib.affines.voxel_sizes(affine) if affine is not None else (1.0, 1.0, 1.0)
    ras_spacing = [1.0, 1.0, 1.0]
    for axis, (target, _) in enumerate(ornt):
        ras_spacing[int(target)] = float(spacing[axis])
    img = _to_ras(img, ornt)
    labels = {name: _to_ras(lab.astype(np.uint8), ornt) for name, lab in labels.items()}

    tumor = labels.get("Reference", labels["Prediction"]) > 0
    if tumor.any():
        center = [int(round(c)) for c in ndimage.center_of_mass(tumor)]
    else:
        center = [s // 2 for s in img.shape]

    stored_index = {}  # slice numbers as in the stored array, for the panel titles
    for view, ras_axis in zip(VIEWS, (2, 0, 1), strict=True):
        axis = int(np.flatnonzero(ornt[:, 0] == ras_axis)[0])
        n = img.shape[ras_axis]
        stored_index[view] = center[ras_axis] if ornt[axis, 1] > 0 else n - 1 - center[ras_axis]

    brain = img[img != 0]
    lo, hi = np.percentile(brain, window_percentiles) if brain.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    img_views = _slices(img, center, ras_spacing)

    # Fixed inch margins instead of tight_layout: with aspect-locked images tight_layout can choose a negative row
    # spacing, and two rows' panels (and their edge letters) then overlap. Rows are as tall as the tallest panel.
    rows, cols = len(labels), len(VIEWS)
    tallest = max(g.shape[0] * aspect / g.shape[1] for g, aspect in img_views.values())
    row_inches = panel_inches * float(np.clip(tallest, 0.5, 2.0))
    col_gap, row_gap, left, right, bottom, top = 0.25, 0.12, 0.35, 0.1, 0.45, 0.35 + (0.4 if title else 0.0)
    width = left + cols * panel_inches + (cols - 1) * col_gap + right
    height = bottom + rows * row_inches + (rows - 1) * row_gap + top
    fig = Figure(figsize=(width, height), facecolor="black")
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=col_gap / panel_inches,
        hspace=row_gap / row_inches,
    )
    for row, (row_name, lab) in enumerate(labels.items()):
        lab_views = _slices(lab, center, ras_spacing)
        for col, view in enumerate(VIEWS):
            ax = axes[row, col]
            gray, aspect = img_views[view]
            ax.imshow(gray, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="bilinear")
            ax.imshow(_rgba(lab_views[view][0], alpha), aspect=aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            # edge letters just inside the panel's own image (axes fraction), never on a neighbouring panel
            style = {"color": "white", "fontsize": 8, "transform": ax.transAxes, "clip_on": True}
            for letter, (x, y, ha, va) in zip(_EDGE_LETTERS[view], _EDGE_POSITIONS, strict=True):
                ax.text(x, y, letter, ha=ha, va=va, **style)
            if row == 0:
                ax.set_title(f"{view}, slice {stored_index[view]}", color="white", fontsize=10)
            if col == 0:
                ax.set_ylabel(row_name, color="white", fontsize=11)
    handles = [Patch(facecolor=rgb, edgecolor="none", label=LEGEND_NAMES[name]) for name, rgb in BRATS_PALETTE.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, labelcolor="white", fontsize=9)
    if title:
        fig.suptitle(title, color="white", fontsize=12, y=1 - 0.08 / height, va="top")
    return _save_png(fig, out_path, dpi)


def _event_files(log_dir_or_event_file: str | os.PathLike) -> list[Path]:
    path = Path(log_dir_or_event_file)
    files = [path] if path.is_file() else sorted(path.rglob(EVENT_FILE_GLOB))
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files ({EVENT_FILE_GLOB}) in {path}")
    return files


def read_scalars(log_dir_or_event_file: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All scalar series of a TensorBoard log: ``{tag: (steps, values)}`` sorted by step.

    Several event files (a resumed run) are merged; of two values logged at the same step the later one wins.
    Event files in sub-folders (separate runs) get the sub-folder as a tag prefix.
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    root = Path(log_dir_or_event_file)
    merged: dict[str, dict[int, tuple[float, float]]] = {}
    for file in _event_files(root):
        acc = EventAccumulator(str(file), size_guidance={SCALARS: 0})  # 0: keep every value
        acc.Reload()
        prefix = "" if root.is_file() or file.parent == root else f"{file.parent.relative_to(root).as_posix()}/"
        for tag in acc.Tags()[SCALARS]:
            series = merged.setdefault(prefix + tag, {})
            for event in acc.Scalars(tag):
                if event.step not in series or series[event.step][0] <= event.wall_time:
                    series[event.step] = (event.wall_time, event.value)
    return {
        tag: (np.asarray(sorted(s)), np.asarray([s[step][1] for step in sorted(s)], dtype=np.float64))
        for tag, s in merged.items()
    }


def _group(tag: str) -> str:
    name = tag.lower()
    if "loss" in name or re.search(r"(^|[/_])(kl|l2|mse)($|[/_])", name):
        return "loss"
    return "dice" if "dice" in name else "other"


def _smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's exponential moving average (``weight`` 0: none)."""
    if weight <= 0 or values.size == 0:
        return values
    out = np.empty_like(values)
    acc = values[0]
    for n, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        out[n] = acc
    return out


def _step_unit(tag: str) -> str:
    """What a tag's steps count: ``TrainingRun`` logs ``train_loss`` and the loss terms ``loss_<name>`` per
    iteration; the evaluator's metrics (``val_*``) and anything else are logged per epoch."""
    name = tag.rsplit("/", 1)[-1].lower()
    return "iteration" if _group(name) == "loss" and not name.startswith("val_") else "epoch"


def _loss_style(tag: str) -> dict[str, Any]:
    name = tag.rsplit("/", 1)[-1].lower()
    if name == "train_loss":  # a wide pale band: loss_total, drawn dashed on top, has the same values
        return {"linewidth": 5.0, "alpha": 0.35, "zorder": 2}
    if name.endswith("total"):
        return {"linewidth": 1.3, "linestyle": (0, (4, 2)), "zorder": 3}
    return {"linewidth": 1.3, "zorder": 3}


def training_curves_figure(
    log_dir_or_event_file: str | os.PathLike,
    out_path: str | os.PathLike,
    smoothing: float = 0.0,
    title: str | None = None,
    panel_inches: float = 4.0,
    dpi: int = 120,
) -> Path:
    """Loss terms and Dice per region against iteration or epoch, from TensorBoard event files.

    Tags are grouped by name: anything with ``loss`` (or a ``kl``/``l2``/``mse`` term) goes to the loss panel,
    anything else with ``dice`` to the Dice panel, the rest (learning rate, HD95, ...) to a third panel when present.
    The x axis says what the steps count: iterations for the per-iteration losses (``train_loss``, ``loss_<term>``),
    epochs for the per-epoch metrics (``val_*``); a panel holding both gets the epoch axis on top. ``train_loss`` is
    drawn as a wide pale band and a ``*total`` term dashed, so the two stay visible where they coincide.

    Args:
        log_dir_or_event_file: a log folder (searched recursively) or one event file.
        out_path: PNG file to write.
        smoothing: TensorBoard-style EMA weight in [0, 1) for the loss curves (raw curve drawn faintly behind).
        title: figure title.
        panel_inches: width of one panel.
        dpi: resolution of the PNG.

    Returns:
        the path of the PNG.
    """
    scalars = read_scalars(log_dir_or_event_file)
    if not scalars:
        raise ValueError(f"no scalar values in the TensorBoard log {log_dir_or_event_file}")
    groups: dict[str, list[str]] = {"loss": [], "dice": [], "other": []}
    for tag in sorted(scalars):
        groups[_group(tag)].append(tag)
    panels = [(name, tags) for name, tags in groups.items() if tags]
    ylabels = {"loss": "loss", "dice": "Dice", "other": "value"}

    fig = Figure(figsize=(panel_inches * len(panels), panel_inches * 0.8))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, tags) in zip(axes, panels, strict=True):
        units = sorted({_step_unit(t) for t in tags}, key=("iteration", "epoch").index)
        x_axes = {units[0]: ax}
        if len(units) > 1:  # the epoch curves get their own x axis on top
            x_axes[units[1]] = ax.twiny()
            x_axes[units[1]].set_xlabel(units[1])
        colors = iter(f"C{i}" for i in range(len(tags)))
        for tag in tags:
            steps, values = scalars[tag]
            target = x_axes[_step_unit(tag)]
            style = _loss_style(tag) if name == "loss" else {"linewidth": 1.5}
            style.setdefault("marker", "o" if steps.size <= 50 and _step_unit(tag) == "epoch" else None)
            color = next(colors)
            if name == "loss" and smoothing > 0:
                target.plot(steps, values, color=color, alpha=0.2, linewidth=0.8, zorder=1)
                values = _smooth(values, smoothing)
            target.plot(steps, values, color=color, markersize=3, label=tag, **style)
        ax.set_xlabel(units[0])
        for x_ax in x_axes.values():
            x_ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5 (nor iteration 2.5)
        ax.set_ylabel(ylabels[name])
        ax.set_title({"loss": "Loss", "dice": "Dice", "other": "Other"}[name])
        if name == "dice":
            ax.set_ylim(0.0, 1.02)
        ax.grid(True, alpha=0.3)
        handles = [h for a in x_axes.values() for h in a.get_legend_handles_labels()[0]]
        ax.legend(handles=handles, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save_png(fig, out_path, dpi)


#: (whole-region metric, lesion-wise metric, panel title) of :func:`scoring_summary_figure`; a panel is drawn when the
#: rows hold one of its metrics (``lesion_f1``: the detection F1 of ``--rules brats2025``)
_SCORE_PANELS: tuple[tuple[str | None, str, str], ...] = (
    ("dice", "lesion_dice", "Dice"),
    ("hd95", "lesion_hd95", "HD95 (mm)"),
    (None, "lesion_f1", "lesion detection F1"),
)


def scoring_summary_figure(
    rows: Sequence[Mapping[str, Any]],
    out_path: str | os.PathLike,
    regions: Sequence[str] | None = None,
    hd95_penalty_mm: float | None = None,
    title: str | None = None,
    panel_inches: float = 4.5,
    dpi: int = 120,
    rules: str | None = None,
    challenge: str | None = None,
) -> Path:
    """Per-case distribution of whole-region and lesion-wise Dice and HD95 per region, written as PNG.

    One panel per metric (Dice, HD95, and the lesion detection F1 when the rows have it); per region a box of the
    whole-region values ("legacy"; "global" under ``brats2025``) and, beside it, a box of the lesion-wise values,
    with every case drawn as a dot and the mean as a white diamond. The HD95 axis is logarithmic (values from a
    fraction of a mm to the penalty); the penalty is drawn as a dashed line. The title names the rule set and the
    sub-challenge, so that a figure says which leaderboard its numbers belong to.

    Args:
        rows: long rows ``{"case_id", "region", "dice", "hd95", "lesion_dice", "lesion_hd95", ...}``.
        out_path: PNG file to write.
        regions: regions to draw, in order; default: those of the rows, in the order they first appear.
        hd95_penalty_mm: the HD95 penalty of the rules used, drawn as a reference line.
        title: figure title, e.g. the number of cases.
        panel_inches: width of one panel.
        dpi: resolution of the PNG.
        rules: the rule set of the numbers (``--rules``), added to the title.
        challenge: the sub-challenge (and config), added to the title.

    Returns:
        the path of the PNG.
    """
    if not rows:
        raise ValueError("no rows to draw")
    regions = list(regions) if regions is not None else list(dict.fromkeys(str(r["region"]) for r in rows))
    whole = "global" if rules == "brats2025" else "legacy"
    colors = {whole: "tab:blue", "lesion-wise": "tab:orange"}
    panels = [p for p in _SCORE_PANELS if any(m in rows[0] for m in p[:2] if m)]
    fig = Figure(figsize=(panel_inches * len(panels), panel_inches * 0.85))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    rng = np.random.default_rng(0)  # jitter of the dots: the same figure for the same rows
    for ax, (legacy, lesion, label) in zip(axes, panels, strict=True):
        for i, region in enumerate(regions):
            for offset, (kind, metric) in zip((-0.18, 0.18), ((whole, legacy), ("lesion-wise", lesion)), strict=True):
                if metric is None:
                    continue
                values = np.asarray([float(r[metric]) for r in rows if r["region"] == region and metric in r])
                values = values[np.isfinite(values)]
                if metric.endswith("hd95"):
                    values = np.maximum(values, 0.1)  # log axis: 0 mm (perfect) drawn at 0.1 mm
                if values.size == 0:
                    continue
                x = i + offset
                box = ax.boxplot(values, positions=[x], widths=0.3, patch_artist=True, showfliers=False)
                box["boxes"][0].set(facecolor=colors[kind], alpha=0.35, edgecolor=colors[kind])
                box["medians"][0].set(color=colors[kind], linewidth=2)
                ax.scatter(x + rng.uniform(-0.08, 0.08, values.size), values, s=9, color=colors[kind], zorder=3)
                ax.scatter([x], [values.mean()], marker="D", s=28, color="white", edgecolor="black", zorder=4)
        ax.set_xticks(range(len(regions)))
        ax.set_xticklabels(regions)
        ax.set_xlim(-0.6, len(regions) - 0.4)
        ax.set_title(label)
        ax.grid(True, axis="y", alpha=0.3)
        if not lesion.endswith("hd95"):
            ax.set_ylim(-0.03, 1.03)
        else:
            ax.set_yscale("log")
            if hd95_penalty_mm:
                ax.set_ylim(top=hd95_penalty_mm * 2.5)  # room for the label above the line
                ax.axhline(hd95_penalty_mm, color="gray", linestyle="--", linewidth=1)
                ax.text(
                    len(regions) - 0.45,
                    hd95_penalty_mm,
                    f"penalty {hd95_penalty_mm:g} mm",
                    ha="right",
                    va="bottom",
                    fontsize=8,
                    color="gray",
                )
    handles = [Patch(facecolor=c, alpha=0.5, label=k) for k, c in colors.items()]
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False, fontsize=9)
    named = [title] if title else []
    named += [f"rules {rules}"] if rules else []
    named += [f"challenge {challenge}"] if challenge else []
    if named:
        fig.suptitle(", ".join(named))
    fig.tight_layout(rect=(0, 0.06, 1, 0.95 if named else 1))
    return _save_png(fig, out_path, dpi)


def _load_t1c(image: str | os.PathLike, channel: int | None) -> tuple[nib.spatialimages.SpatialImage, np.ndarray]:
    path = Path(image)
    if path.is_dir():
        names = {layout.filename(path.name, "t1c") for layout in LAYOUTS.values()}
        found = [path / n for n in sorted(names) if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"no T1c file in case folder {path} (looked for {sorted(names)})")
        path = found[0]
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4:
        data = data[..., MSD_CHANNELS.index("t1c") if channel is None else channel]
    return img, data


class SaveOverlayd(MapTransform):
    """Write :func:`overlay_figure` for each case of an inference run: ``<output_dir>/<case_id>_overlay.png``.

    Place it after the label map is back in the input's geometry (after ``Invertd`` and the label conversion).
    The T1c slices are read again from the case's T1c file (``filename_or_obj`` of ``image_key``'s meta: the
    first channel file, T1c, or the 4-D MSD image), so orientation and spacing come from its header.

    Args:
        keys: the label-map key, ``(1, H, W, D)`` in the dataset's convention.
        output_dir: folder of the PNGs.
        convention: label convention of the map.
        image_key: key whose meta names the source image file.
        case_id_key: data key holding the case id; without it, :func:`~brats_pipeline.data.layouts.case_id_from_path` of
            the source file (the rule of :class:`~brats_pipeline.inference.writers.SaveLabelMapd`).
        enabled: ``False`` makes the transform a no-op (a config switch).
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_dir: str | os.PathLike = "overlays",
        convention: str | LabelConvention = "brats2018",
        image_key: str = "image",
        case_id_key: str = "case_id",
        enabled: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.convention = convention
        self.image_key = image_key
        self.case_id_key = case_id_key
        self.enabled = enabled

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if not self.enabled:
            return d
        image = d.get(self.image_key)
        source = image.meta.get("filename_or_obj") if isinstance(image, MetaTensor) else None
        if isinstance(source, (list, tuple)):
            source = source[0]
        if not source:
            raise ValueError(f"SaveOverlayd: '{self.image_key}' carries no source file name in its meta")
        img, t1c = _load_t1c(source, None)
        case_id = str(d.get(self.case_id_key) or case_id_from_path(str(source)))
        for key in self.key_iterator(d):
            label = np.asarray(d[key].detach().cpu() if isinstance(d[key], torch.Tensor) else d[key])
            label = label[0] if label.ndim == 4 else label
            overlay_figure(
                t1c,
                label,
                convention=self.convention,
                affine=img.affine,
                out_path=self.output_dir / f"{case_id}_overlay.png",
                title=case_id,
            )
        return d


def overlay(
    image: str,
    pred: str,
    out_path: str,
    ref: str | None = None,
    convention: str = "brats2018",
    pred_convention: str | None = None,
    title: str | None = None,
    channel: int | None = None,
) -> str:
    """Command line: overlay figure of one case from files (orientation and spacing from the image's header)."""
    img, t1c = _load_t1c(image, channel)
    pred_label = np.asanyarray(nib.load(pred).dataobj)
    ref_label = np.asanyarray(nib.load(ref).dataobj) if ref else None
    return str(
        overlay_figure(
            t1c,
            pred_label,
            ref_label,
            convention=convention,
            out_path=out_path,
            title=title or Path(pred).name,
            affine=img.affine,
            pred_convention=pred_convention,
        )
    )


def curves(log_dir: str, out_path: str, smoothing: float = 0.0, title: str | None = None) -> str:
    """Command line: training curves from a TensorBoard log folder or event file."""
    return str(training_curves_figure(log_dir, out_path, smoothing=float(smoothing), title=title))


__all__: Sequence[str] = (
    "BRATS_PALETTE",
    "VIEWS",
    "SaveOverlayd",
    "overlay_figure",
    "read_scalars",
    "scoring_summary_figure",
    "training_curves_figure",
)


def cli() -> None:
    """Console command ``brats-figures`` (also ``python -m brats_pipeline.evaluation.figures``)."""
    fire_command({"curves": curves, "overlay": overlay})


if __name__ == "__main__":
    cli()
