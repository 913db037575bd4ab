"""Building blocks shared by every family: conv / norm / activation for 2D and 3D, chosen by ``dims``.

Tensors are ``(N, C, Y, X)`` for ``dims=2`` and ``(N, C, Z, Y, X)`` for ``dims=3``.

Also home of the sliding-window contract every zoo network follows (:class:`PatchContract`):

* ``margin``: voxels lost per side per spatial axis (array order); 0 for same-padding nets;
* ``divisor``: the input size per axis must be a multiple of it (pooling depth);
* ``input_patch_for(output_patch)``: the input patch that yields ``output_patch``;
* ``min_input``: the smallest input size per axis that trains (e.g. 32 when an instance norm sits at
  1/16 resolution: instance norm needs more than one voxel per channel in training).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ModelError

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BATCH_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def _check_dims(dims: int) -> int:
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims!r}")
    return dims


def conv_nd(dims: int) -> type[nn.Module]:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    return _CONV[_check_dims(dims)]


def conv_transpose_nd(dims: int) -> type[nn.Module]:
    """``nn.ConvTranspose2d`` or ``nn.ConvTranspose3d``."""
    return _CONV_T[_check_dims(dims)]


def batch_norm_nd(dims: int) -> type[nn.Module]:
    return _BATCH_NORM[_check_dims(dims)]


def instance_norm_nd(dims: int) -> type[nn.Module]:
    return _INSTANCE_NORM[_check_dims(dims)]


def norm_nd(kind: str | None, dims: int, channels: int, num_groups: int = 2) -> nn.Module:
    """A normalisation layer over ``channels``: ``"batch"``, ``"instance"`` (affine), ``"group"``
    (``num_groups`` capped at ``channels``) or ``None``/``"none"`` (identity)."""
    if kind in (None, "none"):
        return nn.Identity()
    if kind == "batch":
        return batch_norm_nd(dims)(channels)
    if kind == "instance":
        return instance_norm_nd(dims)(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(num_groups=min(num_groups, channels), num_channels=channels)
    raise ValueError(f"unknown norm {kind!r}: use 'batch', 'instance', 'group' or 'none'")


def interpolation_mode(mode: str, dims: int) -> str:
    """Map ``"linear"`` to ``"bilinear"``/``"trilinear"`` for ``dims``; other modes pass through."""
    _check_dims(dims)
    if mode in ("linear", "bilinear", "trilinear"):
        return "bilinear" if dims == 2 else "trilinear"
    if mode == "nearest":
        return mode
    raise ValueError(f"unknown upsampling mode {mode!r}: use 'nearest' or 'linear'")


def upsample_to(x: torch.Tensor, size: Sequence[int], mode: str = "nearest",
                align_corners: bool | None = None) -> torch.Tensor:
    """Resample ``x`` (N, C, *S) to spatial ``size``; ``mode`` as in :func:`interpolation_mode`.

    Nearest upsampling by whole factors is exported to ONNX as reshape + expand (a copy), not as
    Resize: ONNX Runtime's generic CPU Resize took a quarter of a UNet3D window's time; the values
    are the same (each voxel repeated ``factor`` times per axis, as ``interpolate`` does).
    """
    mode = interpolation_mode(mode, x.dim() - 2)
    if mode == "nearest":
        factors = _whole_factors(tuple(int(s) for s in x.shape[2:]), tuple(int(s) for s in size))
        if factors is not None and torch.onnx.is_in_onnx_export():
            return repeat_nearest(x, factors)
        return nn.functional.interpolate(x, size=tuple(size), mode=mode)
    return nn.functional.interpolate(x, size=tuple(size), mode=mode, align_corners=bool(align_corners))


def _whole_factors(shape: tuple[int, ...], size: tuple[int, ...]) -> tuple[int, ...] | None:
    """Per-axis factors ``size / shape`` when all are whole numbers >= 1, else None."""
    if len(shape) != len(size) or any(s <= 0 or t % s for s, t in zip(shape, size)):
        return None
    return tuple(t // s for s, t in zip(shape, size))


def repeat_nearest(x: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """(N, C, *S) -> (N, C, *(S * factors)): every voxel repeated ``factors[i]`` times along axis i
    (nearest-neighbour upsampling by whole factors, as reshape + expand + reshape)."""
    n, c = x.shape[:2]
    view, expanded, final = [n, c], [n, c], [n, c]
    for length, factor in zip(x.shape[2:], factors):
        view += [length, 1]
        expanded += [length, int(factor)]
        final.append(length * int(factor))
    return x.reshape(view).expand(expanded).reshape(final)


def activation(kind: str, channels: int = 1) -> nn.Module:
    """An activation by name: relu, leakyrelu (0.1), elu, prelu (one parameter per channel), swish, mish."""
    kind = kind.lower()
    if kind == "relu":
        return nn.ReLU()
    if kind == "leakyrelu":
        return nn.LeakyReLU(negative_slope=0.1)
    if kind == "elu":
        return nn.ELU()
    if kind == "prelu":
        return nn.PReLU(num_parameters=channels)
    if kind == "swish":
        return nn.SiLU()
    if kind == "mish":
        return nn.Mish()
    raise ValueError(f"unknown activation {kind!r}")


# Letters of a layer order string (AttentionBased-MIS convention) and the module names the seed used,
# so a seed state_dict's keys (``Conv1.conv.weight``, ``Conv1.pReLU.weight`` ...) load unchanged.
_ORDER_LETTERS = {
    "r": ("ReLU", "relu"), "l": ("LeakyReLU", "leakyrelu"), "e": ("ELU", "elu"), "p": ("pReLU", "prelu"),
    "s": ("swish", "swish"), "m": ("Mish", "mish"),
}


class ConvNormAct(nn.Sequential):
    """Convolution followed by the operations of ``order``, in that order (AttentionBased-MIS' SingleConv).

    Letters: ``c`` conv, ``r`` ReLU, ``l`` LeakyReLU(0.1), ``e`` ELU, ``p`` PReLU (one parameter per
    output channel), ``s`` swish, ``m`` Mish, ``g`` GroupNorm (``num_groups`` capped at the channel
    count), ``i`` InstanceNorm (affine), ``b`` BatchNorm. The conv has a bias only when the order has
    no ``g``/``b``. A norm letter before ``c`` normalises the input channels. Default ``"cpi"`` is the
    seed's conv -> PReLU -> InstanceNorm (norm after activation). ``transpose=True`` builds a
    transposed convolution (VNet up-sampling).

    Shapes: (N, in_channels, *S) -> (N, out_channels, *S') with S' = S for the default k3 p1 s1.
    """

    def __init__(self, in_channels: int, out_channels: int, *, dims: int = 3, kernel_size: int = 3,
                 padding: int | None = None, stride: int = 1, dilation: int = 1, order: str = "cpi",
                 num_groups: int = 2, transpose: bool = False):
        super().__init__()
        if "c" not in order:
            raise ValueError(f"layer order {order!r} has no convolution 'c'")
        unknown = set(order) - set("crlepsmgib")
        if unknown:
            raise ValueError(f"layer order {order!r} has unknown letters {sorted(unknown)}; "
                             "use c, r, l, e, p, s, m, g, i, b")
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        conv_at = order.index("c")
        bias = not ("g" in order or "b" in order)
        for i, char in enumerate(order):
            if char == "c":
                if transpose:
                    self.add_module("convtranspose3d" if dims == 3 else "convtranspose2d",
                                    conv_transpose_nd(dims)(in_channels, out_channels, kernel_size,
                                                            stride=stride, padding=padding, bias=bias))
                else:
                    self.add_module("conv", conv_nd(dims)(in_channels, out_channels, kernel_size, stride=stride,
                                                          padding=padding, dilation=dilation, bias=bias))
            elif char in _ORDER_LETTERS:
                name, kind = _ORDER_LETTERS[char]
                self.add_module(name, activation(kind, out_channels))
            else:
                channels = in_channels if i < conv_at else out_channels
                if char == "g":
                    if i < conv_at:
                        raise ValueError("GroupNorm must come after the convolution in the layer order")
                    self.add_module("groupnorm", norm_nd("group", dims, channels, num_groups))
                elif char == "i":
                    self.add_module("instancenorm", norm_nd("instance", dims, channels))
                elif char == "b":
                    self.add_module("batchnorm", norm_nd("batch", dims, channels))


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``module`` (all of them unless ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class PatchContract:
    """Mixin: the sliding-window contract of a network (sizes in array order, (Z, Y, X) or (Y, X)).

    Subclasses call :meth:`_set_patch_contract` in ``__init__``. ``fixed_shape`` pins axes whose size
    the weights depend on (slice attention learns one weight per depth slice), as ``{axis: size}``.
    """

    margin: tuple
    divisor: tuple
    fixed_shape: dict

    def _set_patch_contract(self, spatial_dims: int, divisor: int | Sequence[int], margin: int | Sequence[int] = 0,
                            fixed_shape: dict | None = None, min_input: int | Sequence[int] | None = None) -> None:
        self.spatial_dims = spatial_dims
        self.divisor = _as_tuple(divisor, spatial_dims)
        self.margin = _as_tuple(margin, spatial_dims)
        self.fixed_shape = dict(fixed_shape or {})
        self.min_input = _as_tuple(min_input, spatial_dims) if min_input is not None else self.divisor

    def input_patch_for(self, output_patch: Sequence[int]) -> tuple:
        """The input patch (array order) that produces ``output_patch``: ``output + 2 * margin``.

        Raises :class:`ModelError` when ``output_patch`` has the wrong length, a size is not a multiple
        of ``divisor`` or is below ``min_input``, or an axis pinned by ``fixed_shape`` has another size.
        """
        patch = tuple(int(v) for v in output_patch)
        name = type(self).__name__
        if len(patch) != self.spatial_dims:
            raise ModelError(f"{name} needs a {self.spatial_dims}D patch, got {patch}",
                             hint=f"Give {self.spatial_dims} sizes in array order.")
        inp = tuple(p + 2 * m for p, m in zip(patch, self.margin))
        bad = [i for i, (s, d) in enumerate(zip(inp, self.divisor)) if s < 1 or s % d]
        if bad:
            suggestion = tuple(max(d, -(-s // d) * d) for s, d in zip(inp, self.divisor))
            raise ModelError(f"{name}: input patch {inp} is not a multiple of {self.divisor} on axes {bad}",
                             hint=f"Use an input patch of {suggestion} (multiples of the pooling factor).")
        small = [i for i, (s, m) in enumerate(zip(inp, self.min_input)) if s < m]
        if small:
            raise ModelError(f"{name}: input patch {inp} is smaller than {self.min_input} on axes {small}",
                             hint=f"Use an input patch of at least {self.min_input}.")
        for axis, size in self.fixed_shape.items():
            if inp[axis] != size:
                raise ModelError(f"{name} was built for size {size} on axis {axis}, got patch {inp}",
                                 hint=f"Use a patch with {size} on axis {axis} (its slice attention has one "
                                      "weight per slice) or rebuild the model with depth={inp[axis]}.")
        return inp


def _as_tuple(value: int | Sequence[int], n: int) -> tuple:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f"expected {n} values, got {value}")
    return value
