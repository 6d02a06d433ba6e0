"""The persistent on-disk cache of the deterministic data pipeline, for both bundles' training and validation.

Decoding four gzip NIfTI volumes per case and epoch costs about 1.5 s of one CPU core (``docs/performance.md``): on a
GPU that starves the network, and an in-memory ``CacheDataset`` of a BraTS training set needs 17-68 GB. Here each
case goes once through the deterministic part of the pipeline (load, channel order, RAS orientation, crop to the
brain box, intensity normalisation; the label stays a uint8 map) and is stored uncompressed as a ``.pt`` file (MONAI
``PersistentDataset``); every later epoch reads that file (a few tens of MB) and runs only the cheap rest (label to
regions or classes, random crop and augmentation).

What MONAI 1.6's ``PersistentDataset`` lacks, :class:`PersistentCaseDataset` adds:

* **Invalidation.** An entry's name hashes each source file's path, size and modification time
  (:func:`file_state_hash`) and the cached transforms' classes and arguments (:func:`transform_fingerprint`); MONAI
  hashes the paths only, and without ``hash_transform`` ignores changed transforms (with ``json_hashing`` MONAI
  transforms fall back to their class names).
* **Atomic writes.** An entry is written to a temporary file in the cache folder, fsynced and renamed
  (:func:`brats_pipeline.atomic_files.atomic_write`); MONAI writes into the system temp folder and ``shutil.move``\\ s
  the file, a copy when the cache is on another file system, which a killed run can leave half-written.
* **A bad entry is a miss.** An entry that cannot be read is deleted and recomputed (MONAI re-raises most errors).
* **It says where it is**: folder, entries present and their size, at construction.

:func:`case_dataset` is what the configs call: the persistent cache, MONAI's in-memory ``CacheDataset``
(``cache_rate`` > 0) or no cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import Compose, Transform

from brats_pipeline.atomic_files import atomic_write

__all__ = [
    "CompactTensors",
    "PersistentCaseDataset",
    "cache_size",
    "case_dataset",
    "file_state_hash",
    "transform_fingerprint",
]

logger = logging.getLogger(__name__)


def _file_states(value: Any) -> Any:
    """``value`` with every existing file path replaced by ``[path, size, mtime_ns]``."""
    if isinstance(value, Mapping):
        return {str(k): _file_states(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_file_states(v) for v in value]
    if isinstance(value, (str, os.PathLike)) and os.path.isfile(value):
        st = os.stat(value)
        return [os.path.abspath(value), st.st_size, st.st_mtime_ns]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def file_state_hash(item: Mapping[str, Any]) -> bytes:
    """MD5 hex digest (as bytes, MONAI's ``hash_func`` contract) of a datalist entry and its files' size and mtime."""
    return hashlib.md5(json.dumps(_file_states(item), sort_keys=True).encode()).hexdigest().encode()


def _arguments(transform: Any) -> dict[str, str]:
    """Public, non-random attributes of a transform, as text (nested transforms included)."""
    out = {}
    for name, value in sorted(vars(transform).items()):
        if name.startswith("_") or name == "R":
            continue
        if hasattr(value, "__dict__") and not isinstance(value, (torch.Tensor, type)):
            out[name] = f"{type(value).__qualname__}{_arguments(value)}"
        else:
            out[name] = repr(value)
    return out


def transform_fingerprint(transforms: Sequence[Callable]) -> str:
    """MD5 of the transforms' classes and arguments: a changed crop margin or orientation changes it."""
    described = [[f"{type(t).__module__}.{type(t).__qualname__}", _arguments(t)] for t in transforms]
    return hashlib.md5(json.dumps(described, sort_keys=True).encode()).hexdigest()


def cache_size(cache_dir: str | os.PathLike) -> tuple[int, int]:
    """``(entries, bytes)`` of the ``.pt`` entries in ``cache_dir``."""
    files = list(Path(cache_dir).glob("*.pt")) if Path(cache_dir).is_dir() else []
    return len(files), sum(f.stat().st_size for f in files)


class CompactTensors(Transform):
    """Give every tensor of a data dict its own storage of its own size.

    A crop (``CropForegroundd``) returns a view of the whole volume; ``torch.save`` and ``CacheDataset`` would keep
    the full 240x240x155 storage behind the brain box (measured: 152 MB instead of 55 MB per case).
    """

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        return {
            k: v.clone(memory_format=torch.contiguous_format) if isinstance(v, torch.Tensor) else v
            for k, v in data.items()
        }


class PersistentCaseDataset(PersistentDataset):
    """``PersistentDataset`` with file-state and transform hashing, atomic entries and bad entries recomputed.

    Args:
        data: datalist entries (``{"image": [4 paths], "label": path, ...}``).
        transform: the deterministic transforms to cache (a list or ``Compose``); no random transform.
        cache_dir: folder of the entries (created).
    """

    def __init__(self, data: Sequence[Mapping], transform: Sequence[Callable] | Compose, cache_dir: str | os.PathLike):
        transform = Compose(
            [*(transform.transforms if isinstance(transform, Compose) else transform), CompactTensors()]
        )
        super().__init__(data=data, transform=transform, cache_dir=cache_dir, hash_func=file_state_hash)
        self.transform_hash = transform_fingerprint(transform.flatten().transforms)
        entries, size = cache_size(self.cache_dir)
        logger.info(
            "persistent cache %s: %d entries (%.1f MB) for %d cases; new cases are added as they are first read",
            self.cache_dir,
            entries,
            size / 1e6,
            len(data),
        )

    def _cachecheck(self, item_transformed: Mapping) -> Any:
        hashfile = self.cache_dir / f"{self.hash_func(item_transformed).decode('utf-8')}{self.transform_hash}.pt"
        if hashfile.is_file():
            try:
                # memory-mapped (copy-on-write): the crop reads only the pages it needs, without a first copy
                return torch.load(hashfile, weights_only=False, mmap=True)
            except Exception as e:  # a truncated or foreign file: recompute it
                logger.warning("cache entry %s unreadable (%s: %s): recomputing it", hashfile, type(e).__name__, e)
                hashfile.unlink(missing_ok=True)
        item = self._pre_transform(dict(item_transformed))
        try:
            with atomic_write(hashfile, "wb") as f:
                torch.save(item, f)
        except OSError as e:  # a full or read-only disk must not stop training: the item is still returned
            logger.warning("cannot write cache entry %s (%s): continuing without it", hashfile, e)
        return item


def case_dataset(
    data: Sequence[Mapping],
    cached_transforms: Sequence[Callable],
    transforms: Sequence[Callable],
    persistent_cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    cache_rate: float = 0.0,
    num_workers: int = 0,
) -> Dataset:
    """The dataset of a bundle's training or validation cases, with the configured cache.

    Args:
        data: datalist entries.
        cached_transforms: the deterministic head of the pipeline (what the persistent cache stores).
        transforms: the rest, run on every read (label conversion, random augmentation).
        persistent_cache: store the head's output in ``cache_dir`` (config key ``persistent_cache``).
        cache_dir: the persistent cache's folder (config key ``cache_dir``).
        cache_rate: > 0: MONAI's in-memory ``CacheDataset`` of the whole pipeline up to its first random
            transform instead (the persistent cache is then not used).
        num_workers: threads filling the in-memory cache.

    Returns:
        ``Dataset(PersistentCaseDataset(data, head), rest)``, ``CacheDataset(data, head + rest)`` or
        ``Dataset(data, head + rest)``.
    """
    if cache_rate > 0:
        return CacheDataset(
            data=data,
            transform=Compose([*cached_transforms, CompactTensors(), *transforms]),
            cache_rate=cache_rate,
            num_workers=num_workers,
        )
    if persistent_cache:
        if cache_dir is None:
            raise ValueError("persistent_cache needs a cache_dir")
        return Dataset(
            data=PersistentCaseDataset(data, cached_transforms, cache_dir), transform=Compose(list(transforms))
        )
    return Dataset(data=data, transform=Compose([*cached_transforms, *transforms]))
