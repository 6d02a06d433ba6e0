"""3D-ESPNet's epoch (``epoch_passes``): three whole-brain passes, each resized to one size.

The reference code (sacmehta/3D-ESPNet, ``main.py``) trains every epoch on three DataLoaders that resize the whole
brain box of each case to 144^3, 96^3 and 128^3 (``ScaleToFixed``: linear for the image, nearest for the label), in
an order shuffled every epoch after the first; the LR schedule and the validation run once per such three-pass epoch.
:class:`ResizedPasses` wraps a bundle's training dataset so that it holds every case once per size, resized to that
size; :class:`PassBatchSampler` batches each pass on its own (tensors of one batch must have one size) and shuffles
the pass order and the cases within each pass. One ``SupervisedTrainer`` epoch is then ``len(sizes)`` passes over
the data, as in the reference.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from monai.transforms import Resized
from torch.utils.data import Dataset, Sampler

__all__ = ["ResizedPasses", "PassBatchSampler"]


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ------------------------------------------------------------------------------------------------- epoch passes


def _as_size(size: int | Sequence[int] | None, spatial_dims: int = 3) -> tuple[int, ...] | None:
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        sizes: tuple[int, ...] = (int(size),) * spatial_dims
    else:
        sizes = tuple(size)
    if len(sizes) != spatial_dims or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
        raise ValueError(f"epoch_passes: each size is an int >= 1 or {spatial_dims} of them (or null), got {size!r}")
    return sizes


class ResizedPasses(Dataset):
    """Every item of ``dataset`` once per size of ``sizes``, resized to that size: ``len(sizes)`` passes.

    Index ``i`` is case ``i % len(dataset)`` of pass ``i // len(dataset)``; the item is ``dataset``'s (its transforms,
    random ones included, run as usual) followed by MONAI ``Resized`` of ``keys`` to ``sizes[pass]``. Use
    :class:`PassBatchSampler` so that a batch holds one pass only (tensors of one batch must have one size).

    This is the 3D-ESPNet reference's epoch: ``sizes=[144, 96, 128]`` with the whole brain box as input
    (``train_brain_crop``), image resized linearly and label by nearest neighbour, as its ``ScaleToFixed`` does.

    Args:
        dataset: the training dataset (e.g. ``@train#dataset``, a ``CacheDataset``); items are dicts (or lists of
            dicts from a multi-sample crop, each resized).
        sizes: one entry per pass: an int (a cube), a list of sizes per spatial axis, or ``None`` (the item as it
            is; only for ``batch_size`` 1 or inputs of one size).
        keys: the keys to resize.
        mode: interpolation per key (``"trilinear"`` for the image, ``"nearest"`` for a label map or masks).
        align_corners: per key, for the linear modes (``None`` for the others).
        anti_aliasing: smooth the image before downsampling (MONAI ``Resized``); off by default, as in the
            reference (``skimage`` 0.14's ``resize`` did not anti-alias by default).
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        dataset: Dataset,
        sizes: Sequence[int | Sequence[int] | None],
        keys: Sequence[str] = ("image", "label"),
        mode: Sequence[str] | str = ("trilinear", "nearest"),
        align_corners: Sequence[bool | None] | bool | None = (False, None),
        anti_aliasing: bool = False,
        allow_missing_keys: bool = True,
    ) -> None:
        if isinstance(sizes, (int, str)) or sizes is None or len(sizes) == 0:
            raise ValueError(f"epoch_passes must be a non-empty list of sizes, got {sizes!r}")
        self.dataset = dataset
        self.sizes = [_as_size(s) for s in sizes]
        self._resizers = [
            None
            if size is None
            else Resized(
                keys=list(keys),
                spatial_size=size,
                mode=mode,
                align_corners=align_corners,
                anti_aliasing=anti_aliasing,
                allow_missing_keys=allow_missing_keys,
            )
            for size in self.sizes
        ]

    @property
    def num_cases(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    @property
    def num_passes(self) -> int:
        return len(self.sizes)

    @property
    def transform(self) -> Any:
        """The wrapped dataset's transform (so that :class:`~brats_pipeline.training.checkpointing.RNGStates` finds the
        random transforms to save and restore)."""
        return getattr(self.dataset, "transform", None)

    def __len__(self) -> int:
        return self.num_cases * self.num_passes

    def locate(self, index: int) -> tuple[int, int]:
        """``(pass, case)`` of flat index ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items ({self.num_passes} passes)")
        return divmod(int(index), self.num_cases)

    def __getitem__(self, index: int) -> Any:
        pass_index, case_index = self.locate(index)
        item = self.dataset[case_index]
        resize = self._resizers[pass_index]
        if resize is None:
            return item
        if isinstance(item, (list, tuple)):
            return [resize(i) for i in item]
        return resize(item)


class PassBatchSampler(Sampler):
    """Batches of :class:`ResizedPasses` indices that never mix two passes (sizes), one epoch = every pass.

    Each epoch (each ``iter``) the order of the passes is shuffled (``shuffle_passes``) and the cases within each
    pass are shuffled independently (``shuffle``), then cut into batches of ``batch_size``. The permutations are
    drawn from a generator seeded from torch's global generator at the start of each epoch (as PyTorch's
    ``RandomSampler`` does), so ``set_determinism`` fixes them and a resumed run, whose torch generator state is
    restored from the checkpoint, continues with the same order.

    Pass it to the DataLoader as ``batch_sampler`` (and no ``batch_size``/``shuffle``/``sampler``).

    Args:
        passes: the :class:`ResizedPasses` dataset (or anything with ``num_cases`` and ``num_passes``).
        batch_size: cases per batch.
        shuffle: shuffle the cases within each pass.
        shuffle_passes: shuffle the order of the passes each epoch (the reference keeps its first epoch in the
            order 144, 96, 128 and shuffles from the second on; here every epoch is shuffled).
        drop_last: drop the last, incomplete batch of each pass.

    Raises:
        RuntimeError: when iterated inside ``torch.distributed`` with more than one process: the passes are not
            split across ranks (``multi_gpu_train.json`` is not supported with ``epoch_passes``).
    """

    def __init__(
        self,
        passes: Any,
        batch_size: int = 1,
        shuffle: bool = True,
        shuffle_passes: bool = True,
        drop_last: bool = False,
    ) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_cases = int(passes.num_cases)
        self.num_passes = int(passes.num_passes)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.shuffle_passes = bool(shuffle_passes)
        self.drop_last = bool(drop_last)

    def batches_per_pass(self) -> int:
        if self.drop_last:
            return self.num_cases // self.batch_size
        return math.ceil(self.num_cases / self.batch_size)

    def __len__(self) -> int:
        return self.num_passes * self.batches_per_pass()

    def __iter__(self) -> Iterator[list[int]]:
        if _is_distributed():
            raise RuntimeError(
                "PassBatchSampler (epoch_passes) does not split its passes across distributed ranks; train with one "
                "process, or without epoch_passes"
            )
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        generator = torch.Generator().manual_seed(seed)
        n = self.num_cases
        order = torch.randperm(self.num_passes, generator=generator).tolist() if self.shuffle_passes else None
        for pass_index in order if order is not None else range(self.num_passes):
            cases = torch.randperm(n, generator=generator).tolist() if self.shuffle else list(range(n))
            for start in range(0, self.batches_per_pass() * self.batch_size, self.batch_size):
                chunk = cases[start : start + self.batch_size]
                if chunk:
                    yield [pass_index * n + j for j in chunk]
