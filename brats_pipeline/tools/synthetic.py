"""Synthetic BraTS-like cases: four co-registered MR contrasts and a nested tumor label, written as real NIfTI.

Each case is a skull-stripped brain (a randomly deformed ellipsoid with zero background) with grey/white-matter
texture, CSF (sulci and two lateral ventricles) and one tumor built from a few lumpy blobs: a necrotic core
(optional) inside an enhancing rim inside peritumoral edema. Contrasts follow the radiological appearance used
by the BraTS annotation protocol: enhancing tumor bright on T1c, edema bright on T2 and FLAIR, necrosis dark on
T1c and bright on T2 (:data:`TISSUE_CONTRASTS`). Every modality gets its own scanner gain, a smooth multiplicative
bias field and Rician noise. Everything is drawn from one seeded generator, so a case is a pure function of
``(shape, seed)``.

Spatial extents are fractions of the volume, so a ``64^3`` case is a scaled-down ``240x240x155`` case. Files carry
the affine of the BraTS releases (1 mm, LPS: ``diag(-1, -1, 1)`` with origin ``(0, H - 1, 0)``), int16 images and
uint8 labels in the layout's label convention.

Command line (:func:`main`; examples with their output in ``docs/tools.md``)::

    python -m brats_pipeline.tools.synthetic OUTPUT_DIR [--num_cases 8] [--layout brats2023] [--shape 64,64,64]
        [--seed 0] [--with_labels False] [--start_index 1]

``--layout`` is one of :data:`SYNTHETIC_LAYOUTS` (``brats2018``, ``brats2020``, ``brats2021``, ``brats2023``,
``msd``); ``--shape`` is ``H,W,D`` or one number for a cube (default the BraTS size ``240,240,155``). Calling again with
a later ``--start_index`` adds cases; ``--with_labels False`` writes cases without a label file (a test split).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.utils import look_up_option
from scipy import ndimage

from brats_pipeline.atomic_files import write_json_atomic
from brats_pipeline.bundle.command_line import fire_command
from brats_pipeline.data.layouts import CHANNELS, LAYOUTS, MSD_CHANNELS, MSD_LABEL_CONVENTION
from brats_pipeline.inference.writers import save_nifti_atomic
from brats_pipeline.transforms.labels import get_convention

logger = logging.getLogger(__name__)

#: bump when the generator's output changes, so that :func:`ensure_dataset` regenerates cached datasets
GENERATOR_VERSION = 1
#: every layout the generator writes
SYNTHETIC_LAYOUTS: tuple[str, ...] = (*LAYOUTS, "msd")
MANIFEST_NAME = ".synthetic.json"
#: files of one case written concurrently
WRITE_THREADS = 2

#: mean intensity (arbitrary units, before gain, bias and noise) of each tissue in each canonical modality
TISSUE_CONTRASTS: dict[str, dict[str, float]] = {
    "wm": {"t1c": 1000.0, "t1": 1000.0, "t2": 500.0, "flair": 700.0},
    "gm": {"t1c": 760.0, "t1": 760.0, "t2": 780.0, "flair": 930.0},
    "csf": {"t1c": 260.0, "t1": 260.0, "t2": 1700.0, "flair": 220.0},
    "necrosis": {"t1c": 330.0, "t1": 380.0, "t2": 1750.0, "flair": 950.0},
    "edema": {"t1c": 640.0, "t1": 640.0, "t2": 1350.0, "flair": 1550.0},
    "enhancing": {"t1c": 2100.0, "t1": 720.0, "t2": 1050.0, "flair": 1250.0},
}

#: brain ellipsoid semi-axes and centre as fractions of the volume (measured on BraTS-GLI-00001-000)
BRAIN_RADIUS_FRACTION: tuple[float, float, float] = (0.29, 0.39, 0.42)
BRAIN_CENTER_FRACTION: tuple[float, float, float] = (0.5, 0.51, 0.5)

MSD_MODALITY_NAMES: dict[str, str] = {"flair": "FLAIR", "t1": "T1w", "t1c": "t1gd", "t2": "T2w"}
_BRATS18_INSTITUTIONS = ("2013", "TCIA01", "TCIA02", "CBICA")


def brats_affine(shape: Sequence[int]) -> np.ndarray:
    """The voxel-to-world affine of the BraTS releases for a volume of ``shape``: 1 mm, ``diag(-1, -1, 1)``.

    BraTS stores LPS-oriented volumes; in NIfTI (RAS) world coordinates voxel ``(i, j, k)`` sits at
    ``(-i, H - 1 - j, k)``, which for ``240x240x155`` is the affine of every released case.
    """
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[1, 3] = float(shape[1] - 1)
    return affine


def _parse_shape(shape: Sequence[int] | str | int) -> tuple[int, int, int]:
    if isinstance(shape, str):
        shape = [int(s) for s in re.split(r"[,x\s]+", shape.strip("()[] ")) if s]
    elif isinstance(shape, int):
        shape = (shape,) * 3
    out = tuple(int(s) for s in shape)
    if len(out) != 3 or min(out) < 16:
        raise ValueError(f"shape must be three sizes of at least 16 voxels, got {shape!r}")
    return out  # type: ignore[return-value]


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``(n_out, n_in)`` linear-interpolation matrix (corners aligned)."""
    mat = np.zeros((n_out, n_in), dtype=np.float32)
    if n_in == 1:
        mat[:, 0] = 1.0
        return mat
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    i0 = np.minimum(np.floor(pos).astype(int), n_in - 2)
    w = (pos - i0).astype(np.float32)
    rows = np.arange(n_out)
    mat[rows, i0] = 1.0 - w
    mat[rows, i0 + 1] = w
    return mat


def _upsample(low: np.ndarray, out_shape: Sequence[int]) -> np.ndarray:
    """Trilinear upsampling of a small 3-D grid to ``out_shape`` as three 2-D matrix products (BLAS)."""
    mx, my, mz = (_interp_matrix(n, m) for n, m in zip(out_shape, low.shape, strict=True))
    (lx, ly, lz), (nx, ny, nz) = low.shape, out_shape
    a = (mx @ low.reshape(lx, ly * lz)).reshape(nx, ly, lz)
    a = np.ascontiguousarray(a.transpose(1, 0, 2)).reshape(ly, nx * lz)
    b = (my @ a).reshape(ny, nx, lz).transpose(1, 0, 2).reshape(nx * ny, lz)
    return (b @ np.ascontiguousarray(mz.T)).reshape(nx, ny, nz)


def _smooth_noise(rng: np.random.Generator, out_shape: Sequence[int], scale: float) -> np.ndarray:
    """Unit-variance smooth random field of ``out_shape`` whose blobs are about ``scale`` voxels wide (float32)."""
    step = max(scale / 2.0, 2.0)
    low_shape = tuple(max(int(np.ceil(n / step)) + 1, 2) for n in out_shape)
    low = ndimage.gaussian_filter(rng.standard_normal(low_shape, dtype=np.float32), sigma=1.0, mode="wrap")
    low /= max(float(low.std()), 1e-6)
    return _upsample(low, out_shape)


def _box(center: np.ndarray, half: np.ndarray, shape: Sequence[int]) -> tuple[slice, ...]:
    lo = np.clip(np.floor(center - half).astype(int), 0, None)
    hi = np.minimum(np.ceil(center + half).astype(int) + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _tumor(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    brain_center: np.ndarray,
    brain_radius: np.ndarray,
    tumor_radius: tuple[float, float],
    edema_scale: tuple[float, float],
    necrosis: bool,
) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray, np.ndarray]:
    """One lumpy tumor in a box of the volume.

    Returns:
        the box, and inside it: classes 0..3 (see :data:`brats_pipeline.transforms.labels.CLASSES`), the edema weight
        (0.5 at the edema border to 1 near the core: how much the edema contrast replaces normal tissue) and a
        unit-variance texture for tumor heterogeneity.
    """
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    center = brain_center + brain_radius * direction * rng.uniform(0.0, 0.45)
    radius = rng.uniform(*tumor_radius) * float(np.mean(brain_radius))
    edema = rng.uniform(*edema_scale)
    box = _box(center, np.full(3, radius * (edema + 0.5) * 1.6), shape)
    coords = [np.arange(s.start, s.stop, dtype=np.float32) for s in box]
    box_shape = tuple(len(c) for c in coords)

    # union of ellipsoidal lobes: normalised squared distance to the nearest lobe (1 on the core surface)
    dist2 = np.full(box_shape, np.inf, dtype=np.float32)
    for k in range(int(rng.integers(2, 5))):
        if k == 0:
            lobe_center, lobe_radius = center, radius
        else:
            offset = rng.standard_normal(3)
            lobe_center = center + offset / np.linalg.norm(offset) * radius * rng.uniform(0.3, 0.8)
            lobe_radius = radius * rng.uniform(0.45, 0.8)
        axes = lobe_radius * rng.uniform(0.75, 1.3, size=3)
        sq = [((c - lc) / a) ** 2 for c, lc, a in zip(coords, lobe_center, axes, strict=True)]
        np.minimum(dist2, sq[0][:, None, None] + sq[1][None, :, None] + sq[2][None, None, :], out=dist2)
    dist = np.sqrt(dist2) + 0.12 * _smooth_noise(rng, box_shape, radius * 0.6)

    edema_dist = dist + 0.18 * _smooth_noise(rng, box_shape, radius * 0.8)
    classes = np.zeros(box_shape, dtype=np.uint8)
    classes[edema_dist < edema] = 2
    classes[dist < 1.0] = 3
    if necrosis:
        core = dist + 0.08 * _smooth_noise(rng, box_shape, radius * 0.5)
        classes[(core < rng.uniform(0.55, 0.8)) & (dist < 1.0)] = 1
    edema_weight = np.clip((edema - edema_dist) / max(edema - 1.0, 0.1), 0.0, 0.5) + 0.5
    return box, classes, edema_weight, _smooth_noise(rng, box_shape, radius * 0.3)


def generate_case(
    shape: Sequence[int] = (240, 240, 155),
    seed: int | Sequence[int] = 0,
    convention: str = "brats2018",
    *,
    tumor_radius: tuple[float, float] = (0.18, 0.32),
    edema_scale: tuple[float, float] = (1.3, 2.0),
    necrosis_probability: float = 0.75,
    noise_std: float = 0.04,
    bias_strength: float = 0.15,
    gain_range: tuple[float, float] = (0.7, 1.4),
    contrasts: Mapping[str, Mapping[str, float]] | None = None,
    max_attempts: int = 20,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Draw one synthetic case.

    Args:
        shape: volume size ``(H, W, D)``.
        seed: seed (or seed sequence) of the case; the same seed gives the same case.
        convention: label convention of the returned label map (see :data:`brats_pipeline.transforms.labels.CONVENTIONS`).
        tumor_radius: range of the tumor-core radius, as a fraction of the mean brain radius.
        edema_scale: range of the edema extent, in multiples of the tumor-core radius.
        necrosis_probability: chance that the case has a necrotic core (else TC is all enhancing).
        noise_std: Rician noise level, as a fraction of the modality's mean normal-tissue intensity.
        bias_strength: standard deviation of the log bias field (smooth quadratic, per modality).
        gain_range: range of the per-modality scanner gain (BraTS intensities are not standardised).
        contrasts: tissue -> modality -> intensity; defaults to :data:`TISSUE_CONTRASTS`.
        max_attempts: tumor re-draws allowed until WT, TC, ET and edema are all non-empty.

    Returns:
        ``images``: canonical modality (:data:`CHANNELS` order) -> int16 array of ``shape`` (background exactly 0,
        brain voxels at least 1); ``label``: uint8 array of ``shape`` in ``convention``.
    """
    shape = _parse_shape(shape)
    contrasts = TISSUE_CONTRASTS if contrasts is None else contrasts
    lut = get_convention(convention).class_to_label
    rng = np.random.default_rng(seed)
    size = np.asarray(shape, dtype=np.float64)

    # brain: deformed ellipsoid inside its own box
    brain_center = size * np.asarray(BRAIN_CENTER_FRACTION) + rng.uniform(-0.015, 0.015, 3) * size
    brain_radius = size * np.asarray(BRAIN_RADIUS_FRACTION) * rng.uniform(0.93, 1.03, 3)
    box = _box(brain_center, brain_radius * 1.15, shape)
    box_shape = tuple(s.stop - s.start for s in box)
    u, v, w = (
        (np.arange(s.start, s.stop, dtype=np.float32) - c) / r
        for s, c, r in zip(box, brain_center, brain_radius, strict=True)
    )
    level = np.sqrt(u[:, None, None] ** 2 + v[None, :, None] ** 2 + w[None, None, :] ** 2)
    level *= 1.0 + 0.04 * np.clip(_smooth_noise(rng, box_shape, float(size.mean()) * 0.3), -2.5, 2.5)
    brain = level < 1.0
    for axis, (s, n) in enumerate(zip(box, shape, strict=True)):  # keep one empty voxel plane at each border
        index = [slice(None)] * 3
        for at in (0, n - 1):
            if s.start <= at < s.stop:
                index[axis] = at - s.start
                brain[tuple(index)] = False
    idx = np.flatnonzero(brain)
    lv = level.ravel()[idx]
    gyri = _smooth_noise(rng, box_shape, float(size.mean()) * 0.035).ravel()[idx]
    ix, iy, iz = np.unravel_index(idx, box_shape)
    bu, bv, bw = u[ix], v[iy], w[iz]
    gx, gy, gz = ix + box[0].start, iy + box[1].start, iz + box[2].start  # volume coordinates of brain voxels

    # normal tissue fractions: white matter inside a gyral grey-matter ribbon, sulcal CSF, two ventricles
    wm = np.clip((0.74 + 0.1 * gyri - lv) / 0.05 + 0.5, 0.0, 1.0)
    csf = np.clip((lv - 0.95 + 0.04 * gyri) / 0.03, 0.0, 1.0) * (gyri < 0.3)
    vent_size = rng.uniform(0.8, 1.2, 3)
    for side in (-1.0, 1.0):
        vent = (
            ((bu - side * 0.09) / (0.07 * vent_size[0])) ** 2
            + ((bv + 0.05) / (0.33 * vent_size[1])) ** 2
            + ((bw - 0.12) / (0.14 * vent_size[2])) ** 2
        )
        csf = np.maximum(csf, np.clip((1.0 - vent) / 0.3, 0.0, 1.0))
    wm = np.minimum(wm, 1.0 - csf)
    gm = 1.0 - wm - csf

    # tumor: re-draw until every sub-region (and edema) is present inside the brain
    necrosis = bool(rng.random() < necrosis_probability)
    for attempt in range(max_attempts):
        necrosis = necrosis and attempt < max_attempts // 2  # a necrotic core may not fit a tiny volume
        t_box, t_classes, t_weight, t_texture = _tumor(
            rng, shape, brain_center, brain_radius, tumor_radius, edema_scale, necrosis
        )
        inside = np.flatnonzero(
            (gx >= t_box[0].start)
            & (gx < t_box[0].stop)
            & (gy >= t_box[1].start)
            & (gy < t_box[1].stop)
            & (gz >= t_box[2].start)
            & (gz < t_box[2].stop)
        )
        local = (gx[inside] - t_box[0].start, gy[inside] - t_box[1].start, gz[inside] - t_box[2].start)
        t_cls = t_classes[local]
        present = np.bincount(t_cls, minlength=4)
        if present[2] and present[3] and (present[1] or not necrosis):
            break
    else:
        raise RuntimeError(f"could not place a tumor with all sub-regions in a {shape} volume (seed {seed})")
    keep = t_cls > 0
    t_idx, t_cls, local = inside[keep], t_cls[keep], tuple(c[keep] for c in local)
    t_w = np.where(t_cls == 2, t_weight[local], 1.0).astype(np.float32)
    t_hetero = 1.0 + 0.08 * t_texture[local]
    flat = np.ravel_multi_index((gx, gy, gz), shape)  # brain voxels in the flattened volume
    label = np.zeros(shape, dtype=np.uint8)
    label.reshape(-1)[flat[t_idx]] = lut[t_cls]

    # smooth quadratic log-bias basis on brain voxels
    basis = np.empty((9, len(idx)), dtype=np.float32)
    for row, (p, q) in enumerate([(bu, None), (bv, None), (bw, None), (bu, bv), (bu, bw), (bv, bw)]):
        basis[row] = p if q is None else p * q
    for row, p in enumerate((bu, bv, bw), start=6):
        np.square(p, out=basis[row])
        basis[row] -= 0.2
    texture = 1.0 + 0.03 * gyri
    images: dict[str, np.ndarray] = {}
    for m in CHANNELS:
        signal = (wm * contrasts["wm"][m] + gm * contrasts["gm"][m] + csf * contrasts["csf"][m]) * texture
        tissue = np.asarray(
            [0.0, contrasts["necrosis"][m], contrasts["edema"][m], contrasts["enhancing"][m]], dtype=np.float32
        )[t_cls]
        signal[t_idx] = signal[t_idx] * (1.0 - t_w) + tissue * t_hetero * t_w
        gain = rng.uniform(*gain_range)
        signal *= np.exp(rng.normal(0.0, bias_strength / 3.0, size=len(basis)).astype(np.float32) @ basis) * gain
        sigma = noise_std * gain * 0.5 * (contrasts["wm"][m] + contrasts["gm"][m])
        signal += sigma * rng.standard_normal(len(idx), dtype=np.float32)
        signal = np.hypot(signal, sigma * rng.standard_normal(len(idx), dtype=np.float32))  # Rician magnitude
        out = np.zeros(shape, dtype=np.int16)
        out.reshape(-1)[flat] = np.clip(np.rint(signal), 1, np.iinfo(np.int16).max)
        images[m] = out
    return images, label


# ---------------------------------------------------------------------------------------------------------------
# writing


def case_name(layout: str, index: int, with_labels: bool = True) -> str:
    """Name of synthetic case ``index`` in ``layout`` (``BraTS-GLI-00001-000``, ``BraTS20_Training_001``, ...)."""
    if layout == "brats2018":
        return f"Brats18_{_BRATS18_INSTITUTIONS[index % len(_BRATS18_INSTITUTIONS)]}_{index}_1"
    if layout == "brats2020":
        return f"BraTS20_{'Training' if with_labels else 'Validation'}_{index:03d}"
    if layout == "brats2021":
        return f"BraTS2021_{index:05d}"
    if layout == "brats2023":
        return f"BraTS-GLI-{index:05d}-000"
    if layout == "msd":
        return f"BRATS_{index:03d}"
    raise ValueError(f"unknown layout {layout!r}; choose one of {list(SYNTHETIC_LAYOUTS)}")


def case_path(output_dir: str | os.PathLike, layout: str, index: int, with_labels: bool = True) -> Path:
    """Where case ``index`` lives: its folder, or for ``msd`` its 4-D image file."""
    root = Path(output_dir)
    name = case_name(layout, index, with_labels)
    if layout == "msd":
        return root / ("imagesTr" if with_labels else "imagesTs") / f"{name}.nii.gz"
    if layout == "brats2018" and with_labels:
        return root / ("LGG" if index % 4 == 0 else "HGG") / name
    return root / name


def _nifti(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final``; an existing ``final`` is replaced, a concurrent writer wins."""
    try:
        os.rename(tmp, final)
        return
    except OSError:
        if not final.exists():
            raise
    trash = final.with_name(f".trash-{final.name}-{uuid.uuid4().hex[:8]}")
    os.rename(final, trash)
    os.rename(tmp, final)
    shutil.rmtree(trash, ignore_errors=True)


def write_case(
    output_dir: str | os.PathLike,
    index: int,
    layout: str = "brats2023",
    shape: Sequence[int] | str = (240, 240, 155),
    seed: int = 0,
    with_labels: bool = True,
    **generator_kwargs,
) -> Path:
    """Generate case ``index`` (seeded by ``(seed, index)``) and write it in ``layout`` under ``output_dir``.

    A BraTS case is written into a hidden temporary folder next to its final place and renamed when complete;
    an MSD case writes the label, then the image, each with :func:`brats_pipeline.inference.writers.save_nifti_atomic`
    (which replaces an existing file). An interrupted run therefore never leaves something that looks like a
    complete case.

    Returns:
        the case folder, or for ``msd`` the 4-D image file.
    """
    shape = _parse_shape(shape)
    final = case_path(output_dir, layout, index, with_labels)
    convention = MSD_LABEL_CONVENTION if layout == "msd" else LAYOUTS[layout].label_convention
    images, label = generate_case(shape, seed=(int(seed), int(index)), convention=convention, **generator_kwargs)
    affine = brats_affine(shape)
    final.parent.mkdir(parents=True, exist_ok=True)

    if layout == "msd":
        if with_labels:
            save_nifti_atomic(_nifti(label, affine), final.parent.parent / "labelsTr" / final.name, overwrite=True)
        stacked = np.stack([images[m] for m in MSD_CHANNELS], axis=-1)  # (H, W, D, 4), channels last as MSD ships
        save_nifti_atomic(_nifti(stacked, affine), final, overwrite=True)
        logger.debug("wrote %s", final)
        return final

    spec = LAYOUTS[layout]
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        jobs = [(images[m], spec.filename(final.name, m)) for m in CHANNELS]
        if with_labels:
            jobs.append((label, spec.filename(final.name, "seg")))
        # gzip compression releases the GIL: files are written in parallel
        with ThreadPoolExecutor(max_workers=WRITE_THREADS) as pool:
            futures = [pool.submit(nib.save, _nifti(array, affine), tmp / name) for array, name in jobs]
        for future in futures:
            future.result()
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_msd_dataset_json(output_dir: str | os.PathLike) -> Path:
    """(Re)write ``dataset.json`` of an MSD Task01 folder from the images and labels present in it."""
    root = Path(output_dir)

    def listed(folder: str) -> list[str]:
        d = root / folder
        return sorted(p.name for p in d.glob("BRATS_*.nii.gz")) if d.is_dir() else []

    labels = set(listed("labelsTr"))
    training = [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in listed("imagesTr") if n in labels]
    test = [f"./imagesTs/{n}" for n in listed("imagesTs")]
    conv = get_convention(MSD_LABEL_CONVENTION)
    names = {conv.edema: "edema", conv.necrosis: "non-enhancing tumor", conv.enhancing: "enhancing tumour"}
    meta = {
        "name": "BRATS",
        "description": "Synthetic gliomas segmentation tumour and oedema in on brain images (brats_pipeline.tools.synthetic)",
        "reference": "https://www.med.upenn.edu/sbia/brats2017.html",
        "licence": "CC-BY-SA 4.0",
        "release": "synthetic",
        "tensorImageSize": "4D",
        "modality": {str(i): MSD_MODALITY_NAMES[m] for i, m in enumerate(MSD_CHANNELS)},
        "labels": {"0": "background", **{str(k): names[k] for k in sorted(names)}},
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    path = root / "dataset.json"
    write_json_atomic(meta, path)
    return path


def generate_dataset(
    output_dir: str | os.PathLike,
    num_cases: int,
    layout: str = "brats2023",
    shape: Sequence[int] | str = (240, 240, 155),
    seed: int = 0,
    with_labels: bool = True,
    start_index: int = 1,
    **generator_kwargs,
) -> list[Path]:
    """Write cases ``start_index .. start_index + num_cases - 1`` in ``layout``; return their paths.

    Case ``i`` depends only on ``(seed, i, shape)``, so datasets can be grown by calling again with a later
    ``start_index`` (for instance unlabelled cases for a test split, ``with_labels=False``). For ``msd`` the
    ``dataset.json`` is rewritten to list every case present.
    """
    layout = look_up_option(layout, list(SYNTHETIC_LAYOUTS))
    shape = _parse_shape(shape)
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    paths = [
        write_case(root, i, layout, shape, seed, with_labels, **generator_kwargs)
        for i in range(int(start_index), int(start_index) + int(num_cases))
    ]
    if layout == "msd":
        write_msd_dataset_json(root)
    _update_manifest(root, layout, shape, seed, with_labels, paths, generator_kwargs)
    return paths


def _manifest_key(layout: str, shape: Sequence[int], seed: int, with_labels: bool, kwargs: Mapping) -> dict:
    return {
        "version": GENERATOR_VERSION,
        "layout": layout,
        "shape": list(shape),
        "seed": int(seed),
        "with_labels": bool(with_labels),
        "generator_kwargs": {k: kwargs[k] for k in sorted(kwargs)},
    }


def _read_manifest(root: Path) -> list[dict]:
    try:
        data = json.loads((root / MANIFEST_NAME).read_text())
        return list(data["datasets"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _update_manifest(
    root: Path, layout: str, shape: Sequence[int], seed: int, with_labels: bool, paths: list[Path], kwargs: Mapping
) -> None:
    key = _manifest_key(layout, shape, seed, with_labels, kwargs)
    rel = {str(p.relative_to(root)) for p in paths}
    datasets = []
    for entry in _read_manifest(root):
        cases = set(entry.get("cases", []))
        if {k: entry.get(k) for k in key} == key:
            rel |= cases
        else:
            cases -= rel  # regenerated with other parameters
            if cases:
                datasets.append({**entry, "cases": sorted(cases)})
    datasets.append({**key, "cases": sorted(rel)})
    write_json_atomic({"datasets": datasets}, root / MANIFEST_NAME)


def ensure_dataset(
    output_dir: str | os.PathLike,
    num_cases: int = 8,
    layout: str = "brats2023",
    shape: Sequence[int] | str = (64, 64, 64),
    seed: int = 0,
    with_labels: bool = True,
    start_index: int = 1,
) -> str:
    """Return ``output_dir`` after making sure it holds the synthetic cases of these parameters.

    Cheap when the data exists (one small JSON read and a ``stat`` per case): cases are generated only where
    they are missing or were generated with other parameters (recorded in ``output_dir/.synthetic.json``).
    Refuses to overwrite same-named case folders it did not generate.
    """
    shape = _parse_shape(shape)
    root = Path(output_dir)
    key = _manifest_key(layout, shape, seed, with_labels, {})
    ours: set[str] = set()
    matching: set[str] = set()
    for entry in _read_manifest(root):
        ours |= set(entry.get("cases", []))
        if {k: entry.get(k) for k in key} == key:
            matching |= set(entry.get("cases", []))
    todo = []
    for i in range(int(start_index), int(start_index) + int(num_cases)):
        path = case_path(root, layout, i, with_labels)
        rel = str(path.relative_to(root))
        complete = path.exists() and (
            layout != "msd" or not with_labels or (path.parent.parent / "labelsTr" / path.name).exists()
        )
        if complete and rel in matching:
            continue
        if path.exists() and rel not in ours:
            raise FileExistsError(
                f"{path} exists and was not generated by brats_pipeline.tools.synthetic; not overwriting it"
            )
        todo.append(i)
    if layout == "msd" and not todo and not (root / "dataset.json").exists():
        write_msd_dataset_json(root)
    for start, count in _runs(todo):
        logger.info("generating %d synthetic %s cases of shape %s in %s", count, layout, shape, root)
        generate_dataset(root, count, layout, shape, seed, with_labels, start_index=start)
    return str(root)


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs ``[(start, count), ...]`` of sorted ``indices``."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def main(
    output_dir: str,
    num_cases: int = 8,
    layout: str = "brats2023",
    shape: Sequence[int] | str = (240, 240, 155),
    seed: int = 0,
    with_labels: bool = True,
    start_index: int = 1,
) -> None:
    """Command line: write synthetic cases ``start_index .. start_index + num_cases - 1`` into ``output_dir``.

    Args:
        output_dir: dataset folder (created if missing; other cases in it are kept).
        num_cases: number of cases to write.
        layout: folder and file naming, and label convention, of a BraTS release or MSD Task01
            (one of :data:`SYNTHETIC_LAYOUTS`).
        shape: volume size ``H,W,D`` (or one number for a cube); default the BraTS ``240,240,155``.
        seed: dataset seed; case ``i`` depends only on ``(seed, i, shape)``.
        with_labels: write the label file (``False``: a test split without labels).
        start_index: number of the first case (to grow a dataset, e.g. unlabelled cases after the labelled ones).
    """
    from brats_pipeline.bundle.command_line import CommandLineError

    if not isinstance(with_labels, bool):  # python-fire reads "--with_labels false" as the (truthy) string 'false'
        raise CommandLineError(
            f"--with_labels {with_labels} is not a boolean ({with_labels!r}); write --with_labels True or "
            "--with_labels False (python-fire turns only True/False into booleans)"
        )
    if layout not in SYNTHETIC_LAYOUTS:
        raise CommandLineError(f"unknown --layout {layout!r}; choose one of {', '.join(SYNTHETIC_LAYOUTS)}")
    paths = generate_dataset(output_dir, num_cases, layout, shape, seed, with_labels, start_index)
    print(f"wrote {len(paths)} synthetic {layout} cases of shape {_parse_shape(shape)} to {Path(output_dir).resolve()}")


def cli() -> None:
    """Console command ``brats-synthetic`` (also ``python -m brats_pipeline.tools.synthetic``)."""
    fire_command(main)


if __name__ == "__main__":
    cli()
