"""Write one NIfTI label map (and optionally the probabilities) per case, atomically, in the input's geometry.

The bundles' post-processing ends with::

    Invertd(keys="pred", transform=preprocessing, orig_keys="image")   # back to the input grid (shape, affine)
    AsDiscreted(...) / RegionsToLabel(...) / ClassesToLabel(...)        # dataset label values, (1, H, W, D)
    SaveLabelMapd(keys="pred", output_dir=...)                          # <output_dir>/<case_id>.nii.gz

Each file appears whole or not at all: it is written with :func:`brats_pipeline.atomic_files.atomic_write` (a hidden
temporary file ``.<name>.<random>.tmp`` in the output folder, never ending in ``.nii.gz``, flushed to disk, then
renamed; an existing file is kept unless ``overwrite``). An interrupted run therefore never leaves a truncated
``<case_id>.nii.gz`` that a later evaluation would read; a hard kill can leave the hidden temporary file, which no
output pattern matches. Given the inference run (``prediction_run``, a
:class:`~brats_pipeline.inference.runs.PredictionRun`), each label map is recorded in ``predictions.json`` as soon as
it is written, with Ctrl-C held back until both are done (:func:`~brats_pipeline.bundle.command_line.interrupts_deferred`).

MONAI's ``SaveImaged`` is not used because it writes in place (a crash leaves a truncated file) and
overwrites existing outputs.
"""

from __future__ import annotations

import gzip
import logging
import os
import time
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import DtypeLike, KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_numpy, look_up_option

from brats_pipeline.atomic_files import atomic_write
from brats_pipeline.bundle.command_line import interrupts_deferred
from brats_pipeline.data.layouts import NIFTI_SUFFIXES, case_id_from_path, split_nifti_suffix

logger = logging.getLogger(__name__)


def save_nifti_atomic(
    img: nib.Nifti1Image,
    path: str | os.PathLike,
    overwrite: bool = False,
    compresslevel: int = 1,
    fsync: bool = True,
) -> Path:
    """Write the NIfTI image ``img`` as it is (header, dtype, scaling) to ``path`` with
    :func:`~brats_pipeline.atomic_files.atomic_write`; gzip-compressed when ``path`` ends in ``.nii.gz``.

    Raises:
        ValueError: ``path`` is not a ``.nii.gz``/``.nii`` name.
        FileExistsError: ``path`` exists and ``overwrite`` is False (the existing file is left untouched).
    """
    path = Path(path)
    suffix = split_nifti_suffix(path)[1].lower()
    if not suffix:
        raise ValueError(f"{path}: a NIfTI file name must end with one of {NIFTI_SUFFIXES}")
    with atomic_write(path, "wb", overwrite=overwrite, fsync=fsync) as f:
        payload = img.to_bytes()
        if suffix == ".nii.gz":
            with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=compresslevel, mtime=0) as gz:
                gz.write(payload)
        else:
            f.write(payload)
    return path


def write_nifti_atomic(
    array: NdarrayOrTensor,
    affine: NdarrayOrTensor,
    path: str | os.PathLike,
    dtype: DtypeLike = np.uint8,
    overwrite: bool = False,
    xform_code: int = 1,
    compresslevel: int = 1,
    fsync: bool = True,
) -> Path:
    """Write ``array`` as the NIfTI file ``path`` so that the file appears complete or not at all.

    Args:
        array: the voxels, spatial axes first (``(H, W, D)``, or ``(H, W, D, C)`` for a 4-D image).
        affine: ``(4, 4)`` voxel-to-world matrix, stored as both qform and sform.
        path: output file, ending in ``.nii.gz`` or ``.nii``; its folder is created if needed.
        dtype: on-disk type. Float data written as an integer type is scaled by nibabel (slope/intercept).
            NIfTI-1 has no float16.
        overwrite: replace an existing ``path``; otherwise :class:`FileExistsError` is raised and the existing
            file is left untouched.
        xform_code: qform/sform code (1 = scanner coordinates, as the BraTS releases are written).
        compresslevel: gzip level for ``.nii.gz`` (nibabel's default is 1).
        fsync: flush the bytes to disk before the rename (survives a power cut, not only a crash).

    Returns:
        The written path.
    """
    aff = np.asarray(convert_to_numpy(affine), dtype=np.float64)
    img = nib.Nifti1Image(np.asarray(convert_to_numpy(array)), aff)
    img.set_data_dtype(np.dtype(dtype))
    img.header.set_qform(aff, code=xform_code)
    img.header.set_sform(aff, code=xform_code)
    return save_nifti_atomic(img, path, overwrite=overwrite, compresslevel=compresslevel, fsync=fsync)


def _meta_of(value: Any) -> dict:
    return dict(value.meta) if isinstance(value, MetaTensor) else {}


def _filename_of(meta: Mapping) -> str | None:
    name = meta.get("filename_or_obj")
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    return str(name) if name else None


class SaveLabelMapd(MapTransform):
    """Write the label map under ``keys`` (one key) as ``<output_dir>/<case_id><output_postfix><output_ext>``.

    The label map is ``(1, H, W, D)`` or ``(H, W, D)``, already in the input's grid (after ``Invertd``) and in
    the dataset's label values (after ``RegionsToLabel``/``ClassesToLabel``); it is written as ``label_dtype``
    with the affine from its metadata, so the file has the input's exact shape, affine and orientation.

    Args:
        keys: the key of the label map (exactly one).
        output_dir: folder for the outputs (created if missing); default: ``prediction_run``'s ``prediction_dir``,
            else ``predictions``.
        output_postfix: appended to the case id (``""`` gives the BraTS submission naming ``<case_id>.nii.gz``).
        output_ext: ``".nii.gz"`` or ``".nii"``.
        case_id_key: data key holding the case id; when missing, the id is derived from the file name of the
            label map's or ``image_key``'s metadata (:func:`~brats_pipeline.data.layouts.case_id_from_path`).
        image_key: key whose metadata gives the file name when ``case_id_key`` is missing.
        overwrite: replace existing outputs; otherwise an existing file is kept and the case is skipped with an
            INFO log line. Default: ``prediction_run``'s ``overwrite``, else ``False``.
        label_dtype: on-disk type of the label map; values must be integers that fit it.
        check_geometry: raise when the label map's shape or affine differs from the input's (the metadata's
            ``spatial_shape``/``original_affine``): usually a missing ``Invertd``.
        save_probabilities: also write the ``(C, H, W, D)`` map under ``prob_key`` as a 4-D NIfTI
            ``(H, W, D, C)`` named ``<case_id><prob_postfix><output_ext>``, with the same atomic and overwrite
            rules. Copy the probabilities before thresholding, e.g.
            ``CopyItemsd(keys="pred", names="prob")`` right after ``Invertd``.
        prob_key: data key of the probabilities.
        prob_postfix: appended to the case id for the probability file.
        prob_dtype: ``float32``, or ``uint8`` for nibabel's scaled storage (4x smaller, error <= 1/510).
            NIfTI-1 has no float16.
        timestamp_key: data key set by :class:`~brats_pipeline.transforms.preprocessing.RecordStartTimed`; each case's logged time runs from it. Without
            it, the time since the previous case was written (for the first case: since this transform was
            created).
        xform_code: qform/sform code of the written files (1 = scanner, as the BraTS releases).
        allow_missing_keys: skip silently when the label key is missing.
        prediction_run: the inference run (``@prediction_run``, an object with ``prediction_dir``, ``overwrite`` and
            ``record_written(case_id)``): each written label map is recorded in its ``predictions.json`` at once,
            and a Ctrl-C waits until the file and its record are both written.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_dir: str | os.PathLike | None = None,
        output_postfix: str = "",
        output_ext: str = ".nii.gz",
        case_id_key: str = "case_id",
        image_key: str = "image",
        overwrite: bool | None = None,
        label_dtype: DtypeLike = np.uint8,
        check_geometry: bool = True,
        save_probabilities: bool = False,
        prob_key: str = "prob",
        prob_postfix: str = "_prob",
        prob_dtype: DtypeLike = np.float32,
        timestamp_key: str | None = "start_time",
        xform_code: int = 1,
        allow_missing_keys: bool = False,
        prediction_run: Any = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if output_dir is None:
            output_dir = getattr(prediction_run, "prediction_dir", None) or "predictions"
        if overwrite is None:
            overwrite = bool(getattr(prediction_run, "overwrite", False))
        self.prediction_run = prediction_run
        if len(self.keys) != 1:
            raise ValueError(f"SaveLabelMapd writes one label map per case; got keys {self.keys}")
        output_ext = look_up_option(output_ext, NIFTI_SUFFIXES)
        if not np.issubdtype(np.dtype(label_dtype), np.integer):
            raise ValueError(f"label_dtype must be an integer type, got {np.dtype(label_dtype)}")
        if np.dtype(prob_dtype) == np.float16:
            raise ValueError("NIfTI-1 has no float16: use prob_dtype float32, or uint8 for scaled storage")
        self.output_dir = Path(output_dir)
        self.output_postfix = output_postfix
        self.output_ext = output_ext
        self.case_id_key = case_id_key
        self.image_key = image_key
        self.overwrite = overwrite
        self.label_dtype = np.dtype(label_dtype)
        self.check_geometry = check_geometry
        self.save_probabilities = save_probabilities
        self.prob_key = prob_key
        self.prob_postfix = prob_postfix
        self.prob_dtype = np.dtype(prob_dtype)
        self.timestamp_key = timestamp_key
        self.xform_code = xform_code
        self._last_time = time.time()

    def case_id(self, data: Mapping[Hashable, Any], key: Hashable) -> str:
        value = data.get(self.case_id_key)
        if isinstance(value, (list, tuple)) and len(value) == 1:
            value = value[0]
        if value is not None and str(value):
            return str(value)
        for source in (data.get(key), data.get(self.image_key)):
            filename = _filename_of(_meta_of(source))
            if filename:
                return case_id_from_path(filename)
        raise KeyError(f"no {self.case_id_key!r} in the data and no file name in the metadata of {key!r}")

    def output_path(self, case_id: str, postfix: str | None = None) -> Path:
        postfix = self.output_postfix if postfix is None else postfix
        return self.output_dir / f"{case_id}{postfix}{self.output_ext}"

    def _geometry(self, value: NdarrayOrTensor, case_id: str, spatial_shape: tuple[int, ...]) -> np.ndarray:
        meta = _meta_of(value)
        if "affine" not in meta:
            raise ValueError(f"case {case_id}: the label map carries no affine (expected a MetaTensor)")
        affine = np.asarray(convert_to_numpy(meta["affine"]), dtype=np.float64)
        if self.check_geometry:
            original_shape = meta.get("spatial_shape")
            if original_shape is not None and tuple(int(s) for s in convert_to_numpy(original_shape)) != spatial_shape:
                raise ValueError(
                    f"case {case_id}: label map shape {spatial_shape} differs from the input's "
                    f"{tuple(int(s) for s in convert_to_numpy(original_shape))}: is Invertd missing from the post-processing?"
                )
            original_affine = meta.get("original_affine")
            if original_affine is not None and not np.allclose(convert_to_numpy(original_affine), affine, atol=1e-4):
                raise ValueError(
                    f"case {case_id}: label map affine differs from the input's original affine: "
                    "is Invertd missing from the post-processing?"
                )
        return affine

    def _label_array(self, value: NdarrayOrTensor, case_id: str) -> np.ndarray:
        arr = np.asarray(convert_to_numpy(value))
        if arr.ndim == 4:
            if arr.shape[0] != 1:
                raise ValueError(
                    f"case {case_id}: a label map has one channel, got shape {arr.shape} "
                    "(convert regions/classes with RegionsToLabel/ClassesToLabel first)"
                )
            arr = arr[0]
        if arr.ndim != 3:
            raise ValueError(f"case {case_id}: expected a 3-D label map, got shape {arr.shape}")
        if arr.dtype != self.label_dtype:
            info = np.iinfo(self.label_dtype)
            if (
                not np.all(np.isfinite(arr))
                or np.any(arr != np.round(arr))
                or arr.min() < info.min
                or arr.max() > info.max
            ):
                raise ValueError(
                    f"case {case_id}: label values must be integers in [{info.min}, {info.max}] "
                    f"to be written as {self.label_dtype}; got {arr.dtype} in [{arr.min()}, {arr.max()}]"
                )
            arr = arr.astype(self.label_dtype)
        return arr

    def _write(self, array: np.ndarray, affine: np.ndarray, path: Path, dtype: np.dtype) -> bool:
        if path.exists() and not self.overwrite:
            logger.info("%s exists: not overwritten (overwrite=False)", path)
            return False
        try:
            write_nifti_atomic(array, affine, path, dtype=dtype, overwrite=self.overwrite, xform_code=self.xform_code)
        except FileExistsError:  # another process wrote it since the check above
            logger.info("%s exists: not overwritten (overwrite=False)", path)
            return False
        return True

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            case_id = self.case_id(d, key)
            label = self._label_array(d[key], case_id)
            affine = self._geometry(d[key], case_id, label.shape)
            prob = None
            if self.save_probabilities:
                prob = np.asarray(convert_to_numpy(d[self.prob_key]), dtype=np.float32)
                if prob.ndim != 4 or prob.shape[1:] != label.shape:
                    raise ValueError(
                        f"case {case_id}: probabilities {prob.shape} do not match the label map {label.shape}"
                    )
            with interrupts_deferred():  # the files and their record in predictions.json, or none of them
                written = (
                    [self.output_path(case_id)]
                    if self._write(label, affine, self.output_path(case_id), self.label_dtype)
                    else []
                )
                if prob is not None:
                    prob_path = self.output_path(case_id, self.prob_postfix)
                    if self._write(np.moveaxis(prob, 0, -1), affine, prob_path, self.prob_dtype):
                        written.append(prob_path)
                if written and self.prediction_run is not None:
                    self.prediction_run.record_written(case_id)
            self._log_time(d, case_id, written)
        return d

    def _log_time(self, d: Mapping[Hashable, Any], case_id: str, written: list[Path]) -> None:
        now = time.time()
        start = d.get(self.timestamp_key) if self.timestamp_key else None
        if start is not None:
            if isinstance(start, (list, tuple)):
                start = start[0]
            start = float(start) if isinstance(start, str) else float(torch.as_tensor(start).reshape(-1)[0])
            # a prefetched case waited in the DataLoader while the previous one ran: count from the later of the two,
            # so each case's time is its own, not a running total
            elapsed, since = now - max(start, self._last_time), "for this case"
        else:
            elapsed, since = now - self._last_time, "since the previous case"
        self._last_time = now
        files = ", ".join(str(p) for p in written) or "nothing new written"
        logger.info("case %s: %.2f s %s (%s)", case_id, elapsed, since, files)


__all__ = ["save_nifti_atomic", "write_nifti_atomic", "SaveLabelMapd"]
