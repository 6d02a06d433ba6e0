"""Inference for both bundles: whole-volume or sliding-window prediction, mirror-flip TTA, multi-scale test-time
averaging and checkpoint ensembles.

:class:`BratsInferer` is a :class:`monai.inferers.Inferer`, so a bundle config plugs it into a
``SupervisedEvaluator`` as ``inferer``. It returns *probabilities*: the activation (sigmoid for the
segresnet_vae bundle's three nested regions TC/WT/ET, softmax for the espnet3d bundle's four classes) is
applied to every forward pass, and the probabilities are averaged over all ensemble members and all mirror
flips, as in Myronenko 2018, Sec. 4 and Table 2 ("averaged the output of the resulting 8 flipped
segmentation probability maps"; "ensembled a set of 10 models"). The post-processing chain therefore must
not apply the activation again. With ``test_scales`` the input is also resized to each scale, the network's
*logits* are resized back and averaged before the activation, as the 3D-ESPNet reference code's test script does
(``test_resolutions = [None, (144, 144, 144)]``: native and 144^3, outputs summed and divided, then argmax).

Cropping to the brain is *not* done here: the bundles crop with MONAI's invertible ``CropForegroundd`` in
the pre-processing and paste the prediction back with ``Invertd`` in the post-processing.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer, SimpleInferer, SlidingWindowInferer
from monai.transforms import DivisiblePad
from monai.utils import convert_to_dst_type, look_up_option

logger = logging.getLogger(__name__)

ACTIVATIONS: tuple[str, ...] = ("sigmoid", "softmax", "none")
MODES: tuple[str, ...] = ("whole", "sliding_window")
#: interpolation of the input to a test scale (``"area"`` is adaptive average pooling, the 3D-ESPNet reference's)
SCALE_MODES: tuple[str, ...] = ("trilinear", "area", "nearest")
#: spellings of "the input as it is" in ``test_scales``
NATIVE_SCALE_NAMES: tuple[str, ...] = ("native", "none", "original")
#: keys under which training scripts commonly nest the weights in a checkpoint file
CHECKPOINT_STATE_KEYS: tuple[str, ...] = ("model", "network", "state_dict")


def segmentation_output(output: Any) -> torch.Tensor:
    """The segmentation logits of a network's output.

    MONAI's ``SegResNetVAE`` returns ``(seg, vae_loss)`` (``vae_loss`` is ``None`` in eval mode), which
    ``SlidingWindowInferer`` cannot stitch; the first element of a tuple/list output is taken as the logits.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"expected the network to return a Tensor or a (Tensor, ...) tuple, got {type(output).__name__}")


def load_state_dict_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a model's weights from ``path``.

    Accepts a raw ``state_dict`` (what MONAI's ``CheckpointSaver`` writes for a single-object ``save_dict``,
    and the Model Zoo's ``models/model.pt``) or a dict nesting it under one of :data:`CHECKPOINT_STATE_KEYS`.
    A ``module.`` prefix on every key (``DataParallel``/``DDP`` checkpoints) is dropped.
    """
    obj = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(obj, Mapping):
        raise TypeError(f"{path}: expected a state_dict or a dict of state_dicts, got {type(obj).__name__}")
    for key in CHECKPOINT_STATE_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(found, torch.dtype):
        raise ValueError(f"unknown torch dtype {dtype!r}")
    return found


def _scale_entry(entry: Any, test_scales: Any) -> tuple[tuple[int, ...] | int | None, str | None]:
    """``(size, mode)`` of one ``test_scales`` entry (``mode`` ``None``: the inferer's ``scale_mode``)."""
    if isinstance(entry, Mapping):
        unknown = set(entry) - {"size", "mode"}
        if unknown or "size" not in entry:
            raise ValueError(f"test_scales: a scale given as a mapping has 'size' and optionally 'mode', got {entry!r}")
        size, _ = _scale_entry(entry["size"], test_scales)
        return size, None if entry.get("mode") is None else look_up_option(entry["mode"], SCALE_MODES)
    if entry is None or (isinstance(entry, str) and entry.strip().lower() in NATIVE_SCALE_NAMES):
        return None, None
    if isinstance(entry, int) and not isinstance(entry, bool):
        if entry < 1:
            raise ValueError(f"test_scales: a size must be >= 1, got {entry}")
        return int(entry), None
    if isinstance(entry, Sequence) and not isinstance(entry, str) and entry:
        sizes = tuple(entry)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes):
            raise ValueError(f"test_scales: a size must be a list of ints >= 1, got {list(entry)}")
        return sizes, None
    raise ValueError(
        f"test_scales entries are null/'native', an int, a list of ints or {{'size': ..., 'mode': ...}}, got {entry!r} "
        f"in {test_scales!r}"
    )


def _scale_entries(test_scales: Sequence[Any] | int | str | None) -> list[tuple[tuple[int, ...] | int | None, str | None]]:
    if test_scales is None:
        return [(None, None)]
    if isinstance(test_scales, (int, str, Mapping)) and not isinstance(test_scales, bool):
        test_scales = [test_scales]
    return [_scale_entry(entry, test_scales) for entry in test_scales] or [(None, None)]


def normalize_test_scales(
    test_scales: Sequence[Any] | int | str | None,
) -> list[tuple[int, ...] | int | None]:
    """The sizes of ``test_scales``: a list of ``None`` (native: the input as it is), an ``int`` (a cube of that
    side, any number of spatial dims) or a tuple of sizes (one per spatial dim).

    Accepts ``None`` or ``[]`` (native only: ``[None]``), a single int, and lists whose entries are ``None``,
    ``"native"`` (also ``"none"``, ``"original"``; handy on the command line, where python-fire drops ``None``), an
    int, a list of ints, or ``{"size": <one of those>, "mode": "area"}``: a size with its own resize mode
    (:func:`resize_modes`). Repeated entries are kept: each one is a term of the average.

    Raises:
        ValueError: for sizes < 1 or entries of another kind.
    """
    return [size for size, _ in _scale_entries(test_scales)]


def resize_modes(test_scales: Sequence[Any] | int | str | None, default: str = "trilinear") -> list[str]:
    """The resize mode of each entry of ``test_scales`` (``{"size": 144, "mode": "area"}``), else ``default``."""
    return [mode or look_up_option(default, SCALE_MODES) for _, mode in _scale_entries(test_scales)]


def resize_spatial(
    x: torch.Tensor, size: Sequence[int], mode: str = "trilinear", align_corners: bool = True
) -> torch.Tensor:
    """Resize ``x`` ``(B, C, *spatial)`` to ``size`` with ``F.interpolate`` (``x`` itself when already that size).

    ``mode``: ``"trilinear"`` (``"bilinear"``/``"linear"`` for 2-/1-D inputs are picked automatically), ``"area"``
    (adaptive average pooling) or ``"nearest"``. ``align_corners`` applies to the linear modes only.
    """
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    if mode == "trilinear":
        linear = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.ndim - 2]
        return F.interpolate(x, size=size, mode=linear, align_corners=align_corners)
    return F.interpolate(x, size=size, mode=mode)


class BratsInferer(Inferer):
    """Whole-volume or sliding-window inference with mirror-flip TTA and a checkpoint ensemble.

    For an input batch ``(B, C_in, *spatial)`` the output is ``(B, C_out, *spatial)`` float32 probabilities::

        mean over members m and flip sets S of  flip_S( activation( m( flip_S(inputs) ) ) )

    where ``S`` runs over all ``2 ** len(tta_flip_axes)`` subsets of ``tta_flip_axes`` (8 for three axes,
    the identity included) when ``tta`` is on, and is only the identity otherwise. With ``test_scales`` the logits
    of one member and flip are themselves an average over the scales ``s``::

        m(x) := mean over s of  resize_back( m( resize_s(x) ) )        (logits, before the activation) The sum is accumulated in
    place, so memory does not grow with the number of flips or members. The caller provides ``no_grad``/
    ``inference_mode`` and ``eval()`` (``SupervisedEvaluator`` does both); ensemble members follow the
    given network's train/eval mode and device.

    Args:
        activation: ``"sigmoid"`` (independent channels, e.g. the nested regions TC/WT/ET), ``"softmax"``
            (mutually exclusive classes over channel dim 1) or ``"none"`` (average the raw outputs).
        mode: ``"whole"``: one forward of the whole (brain-cropped) volume per member and flip, through
            ``SimpleInferer``; ``"sliding_window"``: MONAI's ``SlidingWindowInferer`` with the ``roi_size``,
            ``sw_batch_size``, ``overlap``, ``sw_mode``, ``sigma_scale``, ``padding_mode``, ``cval``,
            ``sw_device``, ``device`` and ``progress`` arguments below (see its documentation).
        roi_size: window size (sliding-window mode only; required there).
        tta: average over the mirror flips of ``tta_flip_axes``.
        tta_flip_axes: spatial axes (0 = first spatial axis, i.e. tensor dim 2) to flip.
        ensemble_checkpoints: checkpoint files of further ensemble members. On the first call the given
            network is deep-copied once per file and each copy loads that file's weights (a raw
            ``state_dict`` or one nested under ``"model"``/``"network"``/``"state_dict"``); the copies are
            cached for later calls with the same network.
        include_given_network: whether the network passed to ``__call__`` (in a bundle: the evaluator's
            network, loaded from ``models/model.pt``) is itself a member. Default ``True``: the checkpoints
            are *extra* members, so adding ``ensemble_checkpoints`` never silently drops the model the bundle
            ships. Set ``False`` when ``ensemble_checkpoints`` lists every member; listing the bundle's own
            weights while this is ``True`` counts them twice (a warning says so).
        strict_loading: passed to ``load_state_dict`` of the ensemble copies.
        divisible_k: pad the input (constant ``cval``, symmetric) to a multiple of ``divisible_k`` per
            spatial axis before the forward pass, for networks whose down/up-sampling needs it, and crop
            the output back. ``1`` disables it. Padding is done once, before the flips.
        amp: run the forward passes under ``torch.autocast`` (leave ``False`` when the evaluator's own
            ``amp`` is on); ``"auto"``: bfloat16 autocast on a CPU with native bf16 arithmetic only
            (:func:`cpu_has_native_bf16`), the bundles' default.
        amp_dtype: autocast dtype; default ``float16`` on CUDA, ``bfloat16`` elsewhere.
        compile: run each member through ``torch.compile`` (compiled once per member and reused; the compiled
            wrapper shares the member's weights, so checkpoints load into the plain network as before). The
            first call pays the compilation, and every new input shape may recompile.
        compile_kwargs: passed to ``torch.compile`` (e.g. ``{"dynamic": true}`` for cases of varying size).
        test_scales: multi-scale test-time averaging, for any network. ``None`` (default) or ``[null]``: the
            input as it is. Otherwise a list whose entries are ``null``/``"native"`` (the input as it is), an int
            (a cube, e.g. ``144``), a list of sizes per spatial axis (``[144, 144, 144]``), or
            ``{"size": 144, "mode": "area"}`` (a size with its own resize mode): the (padded, flipped) input is
            resized to each size (the entry's mode, else ``scale_mode``), run through the network (whole volume
            or sliding window, as ``mode`` says), its logits are resized back to the input's size (trilinear) and the logits
            of all scales are averaged before the activation. The 3D-ESPNet reference's test script uses
            ``[null, {"size": 144, "mode": "area"}]`` (``VisualizeResults.py``). Each scale is one more forward pass per member and flip.
        scale_mode: how the input is resized to a test scale: ``"trilinear"`` (default), ``"area"`` (adaptive
            average pooling, what the reference code's ``inp_res`` does) or ``"nearest"``.
        scale_align_corners: ``align_corners`` of the trilinear resizing, both ways (default ``True``, as the
            reference's ``F.upsample`` of PyTorch 0.3 did; it maps the corner voxels onto each other, so a
            function linear in space survives a round trip exactly).

    Raises:
        ValueError: for an unknown ``activation``/``mode``/``scale_mode``, a sliding window without ``roi_size``,
            repeated flip axes, ``divisible_k < 1``, an ensemble with no member, or malformed ``test_scales``.
    """

    def __init__(
        self,
        activation: str = "sigmoid",
        mode: str = "whole",
        roi_size: Sequence[int] | int | None = None,
        sw_batch_size: int = 1,
        overlap: Sequence[float] | float = 0.5,
        sw_mode: str = "gaussian",
        sigma_scale: Sequence[float] | float = 0.125,
        padding_mode: str = "constant",
        cval: float = 0.0,
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        tta: bool = False,
        tta_flip_axes: Sequence[int] = (0, 1, 2),
        ensemble_checkpoints: Sequence[str | Path] | None = None,
        include_given_network: bool = True,
        strict_loading: bool = True,
        divisible_k: Sequence[int] | int = 1,
        amp: bool | str = False,
        amp_dtype: str | torch.dtype | None = None,
        compile: bool = False,
        compile_kwargs: Mapping[str, Any] | None = None,
        test_scales: Sequence[Any] | int | str | None = None,
        scale_mode: str = "trilinear",
        scale_align_corners: bool = True,
    ) -> None:
        super().__init__()
        activation = look_up_option(activation, ACTIVATIONS)
        scale_mode = look_up_option(scale_mode, SCALE_MODES)
        self.test_scales = normalize_test_scales(test_scales)
        self.scale_modes = resize_modes(test_scales, scale_mode)
        self.scale_mode = scale_mode
        self.scale_align_corners = bool(scale_align_corners)
        mode = look_up_option(mode, MODES)
        axes = tuple(int(a) for a in tta_flip_axes)
        if len(set(axes)) != len(axes) or any(a < 0 for a in axes):
            raise ValueError(f"tta_flip_axes must be distinct non-negative spatial axes, got {tuple(tta_flip_axes)}")
        ks = (divisible_k,) if isinstance(divisible_k, int) else tuple(divisible_k)
        if any(int(k) < 1 for k in ks):
            raise ValueError(f"divisible_k must be >= 1, got {divisible_k}")
        self.checkpoints = [Path(p) for p in (ensemble_checkpoints or ())]
        if not include_given_network and not self.checkpoints:
            raise ValueError("include_given_network=False needs at least one path in ensemble_checkpoints")

        self.activation = activation
        self.mode = mode
        self.tta = tta
        self.tta_flip_axes = axes
        self.include_given_network = include_given_network
        self.strict_loading = strict_loading
        self.divisible_k = divisible_k
        self.cval = cval
        self.amp = look_up_option(amp, ("auto",)) if isinstance(amp, str) else bool(amp)
        self.amp_dtype = None if amp_dtype is None else _as_dtype(amp_dtype)
        self.compile = compile
        self.compile_kwargs = dict(compile_kwargs or {})
        self._compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

        self.inferer: Inferer
        if mode == "sliding_window":
            if roi_size is None:
                raise ValueError("mode='sliding_window' needs roi_size")
            self.inferer = SlidingWindowInferer(
                roi_size=roi_size,
                sw_batch_size=sw_batch_size,
                overlap=overlap,
                mode=sw_mode,
                sigma_scale=sigma_scale,
                padding_mode=padding_mode,
                cval=cval,
                sw_device=sw_device,
                device=device,
                progress=progress,
            )
        else:
            self.inferer = SimpleInferer()
        self._padder = DivisiblePad(k=divisible_k, method="symmetric") if any(int(k) > 1 for k in ks) else None
        self._members: list[nn.Module] = []
        self._members_of: weakref.ReferenceType | None = None

    @property
    def flip_sets(self) -> list[tuple[int, ...]]:
        """The spatial-axis subsets to flip, identity first (``2 ** len(tta_flip_axes)`` sets with TTA)."""
        if not self.tta:
            return [()]
        n = len(self.tta_flip_axes)
        return [s for r in range(n + 1) for s in itertools.combinations(self.tta_flip_axes, r)]

    def ensemble(self, network: nn.Module) -> list[nn.Module]:
        """The ensemble members for ``network``: itself (if included), then one copy per checkpoint."""
        if self.checkpoints and (self._members_of is None or self._members_of() is not network):
            self._members = self._load_members(network)
            self._members_of = weakref.ref(network)
        members = [network] if self.include_given_network else []
        ref = next(network.parameters(), None)
        for member in self._members:
            member.train(network.training)
            if ref is not None:
                member.to(ref.device)
        return members + self._members

    def _load_members(self, network: nn.Module) -> list[nn.Module]:
        # a normal (non-inference) tensor context, so the copies stay usable whatever context calls us
        with torch.inference_mode(False), torch.no_grad():
            given = {k: v.detach() for k, v in network.state_dict().items()}
            members = []
            for path in self.checkpoints:
                state = load_state_dict_file(path)
                member = copy.deepcopy(network)
                member.load_state_dict(state, strict=self.strict_loading)
                if self.include_given_network and _same_weights(state, given):
                    logger.warning(
                        "ensemble checkpoint %s holds the same weights as the given network, which is already a "
                        "member (include_given_network=True): it is counted twice",
                        path,
                    )
                logger.info("ensemble member %d loaded from %s", len(members) + 1, path)
                members.append(member)
        return members

    def _compiled_member(self, member: nn.Module) -> Callable[..., Any]:
        if member not in self._compiled:
            self._compiled[member] = torch.compile(member, **self.compile_kwargs)
        return self._compiled[member]

    def _autocast(self, device: torch.device):
        if not (cpu_has_native_bf16(device) if self.amp == "auto" else self.amp):
            return nullcontext()
        dtype = self.amp_dtype or (torch.float16 if device.type == "cuda" else torch.bfloat16)
        return torch.autocast(device_type=device.type, dtype=dtype)

    def scale_sizes(self, spatial_shape: Sequence[int]) -> list[tuple[int, ...] | None]:
        """The input size of each test scale for an input of ``spatial_shape`` (``None``: the input as it is)."""
        n = len(spatial_shape)
        sizes: list[tuple[int, ...] | None] = []
        for scale in self.test_scales:
            if scale is None:
                sizes.append(None)
                continue
            size = (scale,) * n if isinstance(scale, int) else tuple(scale)
            if len(size) != n:
                raise ValueError(f"test scale {list(size)} does not fit {n} spatial dims")
            sizes.append(None if size == tuple(spatial_shape) else size)
        return sizes

    def _multiscale_logits(
        self, x: torch.Tensor, forward: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Logits of ``forward`` on ``x``, averaged over :attr:`test_scales` (float32 unless the only scale is native)."""
        sizes = self.scale_sizes(x.shape[2:])
        total: torch.Tensor | None = None
        for size, scale_mode in zip(sizes, self.scale_modes, strict=True):
            xin = x if size is None else resize_spatial(x, size, scale_mode, self.scale_align_corners)
            with self._autocast(x.device):
                logits = self.inferer(xin, forward, *args, **kwargs)
            if isinstance(logits, MetaTensor):
                logits = logits.as_tensor()
            if sizes == [None]:
                return logits
            logits = logits.float()
            if size is not None:
                logits = resize_spatial(logits, x.shape[2:], "trilinear", self.scale_align_corners)
            total = logits if total is None else total.add_(logits)
        assert total is not None
        return total.div_(len(sizes))

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.activation == "sigmoid":
            return torch.sigmoid(logits)
        if self.activation == "softmax":
            return torch.softmax(logits, dim=1)
        return logits

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Probabilities ``(B, C_out, *spatial)`` (float32) for ``inputs`` ``(B, C_in, *spatial)``.

        ``args``/``kwargs`` are passed on to every network call. The result is a ``MetaTensor`` carrying the
        input's metadata when the input is one, as with MONAI's own inferers.
        """
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else torch.as_tensor(inputs)
        spatial_dims = x.ndim - 2
        if any(a >= spatial_dims for a in self.tta_flip_axes) and self.tta:
            raise ValueError(f"tta_flip_axes {self.tta_flip_axes} do not fit {spatial_dims} spatial dims")
        spatial_shape = x.shape[2:]
        crop = None
        if self._padder is not None:
            widths = self._padder.compute_pad_width(spatial_shape)[1:]
            if any(w for pair in widths for w in pair):
                flat = [w for pair in reversed(widths) for w in pair]
                x = F.pad(x, flat, mode="constant", value=self.cval)
                crop = (slice(None), slice(None)) + tuple(
                    slice(lo, lo + size) for (lo, _), size in zip(widths, spatial_shape, strict=True)
                )

        if isinstance(network, nn.Module):
            members = self.ensemble(network)
        elif self.checkpoints:
            raise TypeError("an ensemble of checkpoints needs an nn.Module network to copy")
        else:
            members = [network]
        total: torch.Tensor | None = None
        count = 0
        for member in members:
            if self.compile and isinstance(member, nn.Module):
                member = self._compiled_member(member)

            def forward(t: torch.Tensor, *a: Any, _m: Callable[..., Any] = member, **kw: Any) -> torch.Tensor:
                return segmentation_output(_m(t, *a, **kw))

            for flip in self.flip_sets:
                dims = [a + 2 for a in flip]
                xin = torch.flip(x, dims) if dims else x
                logits = self._multiscale_logits(xin, forward, *args, **kwargs)
                prob = self._activate(logits)
                if dims:
                    prob = torch.flip(prob, dims)
                total = prob if total is None else total.add_(prob)
                count += 1
        assert total is not None
        out = total.div_(count) if count > 1 else total
        if crop is not None:
            out = out[crop].contiguous()
        if isinstance(inputs, MetaTensor):
            meta_like = MetaTensor([]).copy_meta_from(inputs, copy_attr=False)
            out = convert_to_dst_type(out, meta_like, dtype=out.dtype, device=out.device)[0]
        return out


@functools.cache
def cpu_has_native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` is a CPU with native bfloat16 arithmetic (``avx512_bf16`` or ``amx_bf16`` in
    ``/proc/cpuinfo``), where bf16 autocast speeds up 3D convolutions instead of emulating them.

    The espnet3d bundle's ``bf16_autocast`` default: measured 1.5x faster end to end on such a CPU with Dice within
    0.001 of float32 on the synthetic hold-out (docs/performance.md). ``False`` for CUDA devices (they use ``amp``).
    """
    if torch.device(device).type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def _same_weights(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(a[k].shape == b[k].shape and torch.equal(a[k].to(b[k].device, b[k].dtype), b[k]) for k in a)


__all__ = [
    "BratsInferer",
    "segmentation_output",
    "load_state_dict_file",
    "normalize_test_scales",
    "resize_modes",
    "resize_spatial",
    "ACTIVATIONS",
    "MODES",
    "SCALE_MODES",
]
