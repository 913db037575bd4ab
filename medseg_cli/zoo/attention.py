"""Attention modules of the seed code bases, written from DIGEST §3.4, §4.3 and §5.2.

Every module maps ``x`` of shape (N, C, *S) to a tensor of the same shape (gates take a second,
gating input). ``S`` is (Y, X) for 2D and (Z, Y, X) for 3D; slice attention and PAM are 3D only and
treat Z (depth) as the slice axis.

| module | seed | bugs of the seed fixed here |
|---|---|---|
| :class:`ChannelSE` | MIS cSE | "max" pooling was average pooling in PAM's cSE (bug 2) |
| :class:`SliceAttention` | MIS per-channel slice SE | reduction not clamped for PAM -> zero-width Linear (bug 3); "max" was avg (bug 2) |
| :class:`ProgressiveAttention` (PAM) | MIS agscSE | descriptor computed from a detached numpy copy, batch size 1 only (bug 1) |
| :class:`ProjectExcite` | MIS ProjectExciteLayer | -- |
| :class:`GridAttentionGate` | MIS _GridAttentionBlock3D (Oktay) | -- |
| :class:`AdditiveAttentionGate` | liver AttU_Net Attention_block | -- |
| :class:`SpatialGate`, :class:`CBAM` | MIS _CBAM_SpatialGate | gate was sigmoid(x), not sigmoid(conv output) (bug 7) |
| :class:`SequentialBAM` | VNet-LA AttentionModule | dilation fixed to 4 (now configurable); BatchNorm1d failed for batch 1 |

:func:`build_attention` builds any of the single-input modules by name for the network families.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ModelError
from .blocks import batch_norm_nd, conv_nd, norm_nd


def _spatial_axes(x: torch.Tensor) -> tuple:
    return tuple(range(2, x.dim()))


def _expand(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (N, C, 1, ..., 1) broadcastable against ``x``."""
    return weights.reshape(weights.shape + (1,) * (x.dim() - weights.dim()))


def _check_pooling(pooling: str) -> str:
    if pooling not in ("avg", "max", "both"):
        raise ValueError(f"pooling must be 'avg', 'max' or 'both', got {pooling!r}")
    return pooling


class ChannelSE(nn.Module):
    """Squeeze-and-excitation over channels (cSE), 2D or 3D.

    Global pooling over space (``"avg"``, ``"max"`` or ``"both"``: one shared MLP whose logits are
    summed) -> Linear C -> C//r (bias) -> ReLU -> Linear C//r -> C -> sigmoid -> ``x * w``.
    ``r`` is clamped to <= C as in the seed (``channel_hierarchy``), so the hidden width is >= 1.
    Parameters: ``2 * C * (C // r) + C // r + C``.

    Seed bug fixed: in the seed's PAM variant ``"max"`` silently used average pooling (DIGEST §3.9.2);
    here ``"max"`` is a max.
    """

    def __init__(self, channels: int, reduction: int = 8, pooling: str = "avg"):
        super().__init__()
        self.pooling = _check_pooling(pooling)
        hidden = channels // max(1, min(reduction, channels))
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))

    def gate(self, avg: torch.Tensor | None, peak: torch.Tensor | None) -> torch.Tensor:
        """Channel weights (N, C) in (0, 1) from pooled descriptors (N, C) (either may be None)."""
        if self.pooling == "avg":
            logits = self.fc(avg)
        elif self.pooling == "max":
            logits = self.fc(peak)
        else:
            logits = self.fc(avg) + self.fc(peak)
        return torch.sigmoid(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = _spatial_axes(x)
        avg = x.mean(axes) if self.pooling in ("avg", "both") else None
        peak = x.amax(axes) if self.pooling in ("max", "both") else None
        return x * _expand(self.gate(avg, peak), x)


class SliceAttention(nn.Module):
    """Slice attention (sSE over depth), one MLP per channel; input (N, C, D, H, W) with D == ``slices``.

    For each channel c separately: pool every slice over (H, W) -> vector of length D -> Linear D ->
    D//r -> ReLU -> Linear D//r -> D -> sigmoid -> scale each slice. The C MLPs are stored as batched
    weights (``w1`` (C, D//r, D), ``b1`` (C, D//r), ``w2`` (C, D, D//r), ``b2`` (C, D)) and run in one
    matmul instead of a Python loop over channels; each slice ``[c]`` is exactly an ``nn.Linear`` of the
    seed's ``Slice_SE_encoder.<c>.fc.{0,2}`` (same init). Parameters: ``C * (2 * D * (D // r) + D // r + D)``.

    Seed bugs fixed: r is clamped to <= D, so a level with fewer slices than r no longer gets a
    zero-width Linear (DIGEST §3.9.3); ``"max"`` pooling is a max (§3.9.2); no heat-map file is
    written (§3.9.4); the input is not modified in place.
    """

    def __init__(self, channels: int, slices: int, reduction: int = 16, pooling: str = "avg"):
        super().__init__()
        if slices < 1 or channels < 1:
            raise ValueError(f"slice attention needs >= 1 channel and slice, got C={channels}, D={slices}")
        self.pooling = _check_pooling(pooling)
        self.channels, self.slices = channels, slices
        self.hidden = slices // max(1, min(reduction, slices))
        self.w1 = nn.Parameter(torch.empty(channels, self.hidden, slices))
        self.b1 = nn.Parameter(torch.empty(channels, self.hidden))
        self.w2 = nn.Parameter(torch.empty(channels, slices, self.hidden))
        self.b2 = nn.Parameter(torch.empty(channels, slices))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init per channel: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        for weight, bias, fan_in in ((self.w1, self.b1, self.slices), (self.w2, self.b2, self.hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(weight, -bound, bound)
            nn.init.uniform_(bias, -bound, bound)

    def _mlp(self, desc: torch.Tensor) -> torch.Tensor:
        """(N, C, D) -> (N, C, D) logits, one MLP per channel."""
        hidden = torch.matmul(desc.unsqueeze(-2), self.w1.transpose(1, 2)).squeeze(-2) + self.b1
        return torch.matmul(torch.relu(hidden).unsqueeze(-2), self.w2.transpose(1, 2)).squeeze(-2) + self.b2

    def slice_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel slice weights (N, C, D) in (0, 1)."""
        if x.dim() != 5 or x.shape[1] != self.channels or x.shape[2] != self.slices:
            raise ModelError(f"slice attention built for (N, {self.channels}, {self.slices}, H, W) got "
                             f"{tuple(x.shape)}", hint="Feed patches whose depth matches the model's `depth`.")
        if self.pooling == "avg":
            logits = self._mlp(x.mean((3, 4)))
        elif self.pooling == "max":
            logits = self._mlp(x.amax((3, 4)))
        else:
            logits = self._mlp(x.mean((3, 4))) + self._mlp(x.amax((3, 4)))
        return torch.sigmoid(logits)

    def forward_with_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x scaled per slice, slice weights (N, C, D))``."""
        weights = self.slice_weights(x)
        return x * weights[..., None, None], weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_weights(x)[0]


def key_slice_mask(slice_weights: torch.Tensor) -> torch.Tensor:
    """Key slices (N, C, D) bool: softmax over D of the slice weights >= its mean (= 1/D). No gradient.

    The slice with the largest weight is always selected, so every channel has >= 1 key slice.
    """
    with torch.no_grad():
        prob = torch.softmax(slice_weights, dim=-1)
        return prob >= prob.mean(dim=-1, keepdim=True)


class ProgressiveAttention(nn.Module):
    """PAM, the Progressive Attention Module ("agscSE", DIGEST §3.4), for (N, C, D, H, W).

    1. per-channel :class:`SliceAttention` -> ``y`` and slice weights ``a`` (N, C, D);
    2. key slices: ``softmax_D(a) >= 1/D``, without gradient (:func:`key_slice_mask`);
    3. channel SE whose descriptor for channel c averages (or maxes) ``y`` over its key slices only,
       then the usual MLP -> sigmoid -> ``y * s``.

    The optional attention gate of the PAM network lives on the decoder skip connections
    (:class:`GridAttentionGate`), not here.

    Seed bugs fixed (DIGEST §3.9.1-3): the descriptor is computed in torch from ``y`` itself, so the
    gradient flows through it (the seed used a detached numpy copy); the key-slice mask is computed per
    sample, so batch size > 1 works (the seed used ``view(D)``, i.e. batch 1, and the first sample for
    all); ``"max"`` pooling is a max; the slice reduction is clamped so D // r >= 1.
    """

    def __init__(self, channels: int, slices: int, slice_reduction: int = 16, channel_reduction: int = 8,
                 pooling: str = "avg", slice_pooling: str = "avg"):
        super().__init__()
        self.slice_attention = SliceAttention(channels, slices, slice_reduction, slice_pooling)
        self.channel_attention = ChannelSE(channels, channel_reduction, pooling)

    def forward_with_details(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(output, slice weights (N, C, D), key-slice mask (N, C, D) bool, channel weights (N, C))``."""
        y, weights = self.slice_attention.forward_with_weights(x)
        mask = key_slice_mask(weights)
        maskf = mask.to(y.dtype)
        pooling = self.channel_attention.pooling
        avg = peak = None
        if pooling in ("avg", "both"):
            avg = (y.mean((3, 4)) * maskf).sum(-1) / maskf.sum(-1)
        if pooling in ("max", "both"):
            peak = y.amax((3, 4)).masked_fill(~mask, float("-inf")).amax(-1)
        channel = self.channel_attention.gate(avg, peak)
        return y * _expand(channel, y), weights, mask, channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_details(x)[0]


class ProjectExcite(nn.Module):
    """Project & Excite (DIGEST §3.4), 2D or 3D.

    Average-pool to each spatial axis alone ((D,1,1), (1,H,1), (1,1,W) in 3D), broadcast-sum and divide
    by the number of axes -> Conv k1 C -> C//r (bias) -> PReLU(C//r) -> Conv k1 C//r -> C -> sigmoid ->
    ``x * w``. Default r = 2. Parameters: ``2 * C * (C // r) + 2 * (C // r) + C``.
    """

    def __init__(self, channels: int, reduction: int = 2, dims: int = 3):
        super().__init__()
        hidden = max(1, channels // max(1, reduction))
        conv = conv_nd(dims)
        self.conv_c = conv(channels, hidden, kernel_size=1)
        self.relu = nn.PReLU(num_parameters=hidden)
        self.conv_cT = conv(hidden, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = _spatial_axes(x)
        projection = sum(x.mean([a for a in axes if a != keep], keepdim=True) for keep in axes) / len(axes)
        return x * torch.sigmoid(self.conv_cT(self.relu(self.conv_c(projection))))


class GridAttentionGate(nn.Module):
    """Oktay-style grid attention gate on a skip connection (MIS ``_GridAttentionBlock3D``), 2D or 3D.

    ``x`` (N, C, *S) is the encoder skip, ``g`` (N, G, *S/2) the coarser decoder input.
    θ = Conv k2 s2 no bias (C -> C_i) on x; φ = Conv k1 (bias) (G -> C_i) on g, resampled to θx's size;
    α = sigmoid(ψ(ReLU(θx + φg))) with ψ = Conv k1 (C_i -> 1, bias), linearly up-sampled to x's size;
    output = InstanceNorm(Conv k1 (C -> C)(x · α)). C_i defaults to C // 2. Sizes of x must be even.
    """

    def __init__(self, in_channels: int, gate_channels: int, inter_channels: int | None = None, dims: int = 3):
        super().__init__()
        inter = inter_channels or max(1, in_channels // 2)
        conv = conv_nd(dims)
        self.theta = conv(in_channels, inter, kernel_size=2, stride=2, bias=False)
        self.phi = conv(gate_channels, inter, kernel_size=1)
        self.psi = conv(inter, 1, kernel_size=1)
        self.final_conv = nn.Sequential(conv(in_channels, in_channels, kernel_size=1),
                                        norm_nd("instance", dims, in_channels))
        self.mode = "bilinear" if dims == 2 else "trilinear"

    def forward_with_map(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gated skip (N, C, *S), attention map (N, 1, *S))``."""
        theta_x = self.theta(x)
        phi_g = F.interpolate(self.phi(g), size=theta_x.shape[2:], mode=self.mode, align_corners=False)
        alpha = torch.sigmoid(self.psi(torch.relu(theta_x + phi_g)))
        alpha = F.interpolate(alpha, size=x.shape[2:], mode=self.mode, align_corners=False)
        return self.final_conv(x * alpha), alpha

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self.forward_with_map(x, g)[0]


class AdditiveAttentionGate(nn.Module):
    """The 2D Attention-U-Net's ``Attention_block(F_g, F_l, F_int)`` (DIGEST §4.3), 2D or 3D.

    W_g = Conv k1 (F_g -> F_int, bias) + BN on the gate ``g``; W_x = Conv k1 (F_l -> F_int, bias) + BN on
    the skip ``x``; ψ = ReLU(W_g g + W_x x) -> Conv k1 (F_int -> 1, bias) + BN(1) -> sigmoid; output
    ``x * ψ``. ``g`` and ``x`` have the same spatial size. Parameter names follow the seed (W_g, W_x, psi).
    """

    def __init__(self, gate_channels: int, in_channels: int, inter_channels: int, dims: int = 2):
        super().__init__()
        conv, bn = conv_nd(dims), batch_norm_nd(dims)
        self.W_g = nn.Sequential(conv(gate_channels, inter_channels, kernel_size=1), bn(inter_channels))
        self.W_x = nn.Sequential(conv(in_channels, inter_channels, kernel_size=1), bn(inter_channels))
        self.psi = nn.Sequential(conv(inter_channels, 1, kernel_size=1), bn(1), nn.Sigmoid())

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * self.psi(torch.relu(self.W_g(g) + self.W_x(x)))


class SpatialGate(nn.Module):
    """CBAM spatial gate, 2D or 3D: [max over C, mean over C] -> Conv k (2 -> 1) -> norm -> sigmoid -> ``x * a``.

    ``norm`` is ``"instance"`` (MIS seed: IN, no ReLU), ``"batch"`` (original CBAM) or ``"none"``; the conv
    has a bias only without a norm. Seed bug fixed (DIGEST §3.4 / §3.9.7): the seed multiplied ``x`` by
    ``sigmoid(x)`` and ignored the conv output; here the gate is the sigmoid of the conv(+norm) output.
    """

    def __init__(self, kernel_size: int = 7, dims: int = 3, norm: str | None = "instance"):
        super().__init__()
        has_norm = norm not in (None, "none")
        self.conv = conv_nd(dims)(2, 1, kernel_size, padding=kernel_size // 2, bias=not has_norm)
        self.norm = norm_nd(norm, dims, 1)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, *S) gate in (0, 1)."""
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.norm(self.conv(pooled)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention_map(x)


class CBAM(nn.Module):
    """CBAM: channel gate (shared MLP over avg- and max-pooled descriptors) then :class:`SpatialGate`.

    ``channel=False`` keeps only the spatial gate, as in the MIS seed (which had no channel gate).
    """

    def __init__(self, channels: int, reduction: int = 16, dims: int = 3, kernel_size: int = 7,
                 norm: str | None = "instance", channel: bool = True):
        super().__init__()
        self.channel_gate = ChannelSE(channels, reduction, pooling="both") if channel else nn.Identity()
        self.spatial_gate = SpatialGate(kernel_size, dims, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial_gate(self.channel_gate(x))


def _single_value_safe(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """Batch norm that also runs when each channel has a single value in training (batch of one
    sample with no spatial extent, e.g. BAM's pooled channel vector or a 1x1x1 map): there is no
    batch variance then, so it normalises with the running statistics, as in eval, without updating them."""
    if bn.training and x.numel() == x.shape[1]:
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                            training=False, momentum=0.0, eps=bn.eps)
    return nn.modules.batchnorm._BatchNorm.forward(bn, x)


class _BatchNorm1dAnyBatch(nn.BatchNorm1d):
    """BatchNorm1d that accepts a batch of one sample in training (see :func:`_single_value_safe`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _single_value_safe(x, self)


class _BatchNorm2dAnySize(nn.BatchNorm2d):
    """BatchNorm2d that accepts a single value per channel in training (see :func:`_single_value_safe`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _single_value_safe(x, self)


class _BatchNorm3dAnySize(nn.BatchNorm3d):
    """BatchNorm3d that accepts a single value per channel in training (see :func:`_single_value_safe`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _single_value_safe(x, self)


class BAMChannelGate(nn.Module):
    """VNet-LA channel gate: global avg pool -> Linear C -> C//r -> BatchNorm1d -> ReLU -> Linear -> C ->
    sigmoid -> ``x + x * a`` (residual). Keys ``channel_gate.{1,2,4}`` as in the seed.

    Seed bug fixed (DIGEST §5.10.9): BatchNorm1d failed for batch size 1; here a batch of one uses the
    running statistics (see :class:`_BatchNorm1dAnyBatch`).
    """

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.channel_gate = nn.Sequential(nn.Flatten(), nn.Linear(channels, hidden), _BatchNorm1dAnyBatch(hidden),
                                          nn.ReLU(), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.sigmoid(self.channel_gate(x.mean(_spatial_axes(x))))
        return x + x * _expand(weights, x)


class BAMSpatialGate(nn.Module):
    """VNet-LA spatial gate: Conv k1 C -> C//r -> BN -> ReLU -> ``num_dilated`` x [Conv k3 dilation d
    (padding d) -> BN -> ReLU] -> Conv k1 C//r -> 1 -> sigmoid -> ``x + x * a``. Keys
    ``spatial_gate.{0,1,3,4,6,7,9}`` as in the seed. The seed fixed d = 4; here it is ``dilation``.
    Its batch norms accept a 1x1x1 map of a single sample in training (running statistics then).
    """

    def __init__(self, channels: int, reduction: int = 4, num_dilated: int = 2, dilation: int = 4, dims: int = 3):
        super().__init__()
        hidden = max(1, channels // reduction)
        conv, bn = conv_nd(dims), (_BatchNorm2dAnySize if dims == 2 else _BatchNorm3dAnySize)
        layers: list[nn.Module] = [conv(channels, hidden, kernel_size=1), bn(hidden), nn.ReLU()]
        for _ in range(num_dilated):
            layers += [conv(hidden, hidden, kernel_size=3, padding=dilation, dilation=dilation), bn(hidden), nn.ReLU()]
        layers.append(conv(hidden, 1, kernel_size=1))
        self.spatial_gate = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x * torch.sigmoid(self.spatial_gate(x))


class SequentialBAM(nn.Module):
    """The VNet-LA "BAM-style" module (DIGEST §5.2): channel gate, then spatial gate, then a residual:
    ``out = x + SpatialGate(ChannelGate(x))``. Sequential, unlike the parallel original BAM.

    ``dilation`` is the spatial gate's dilation (the seed fixed it at 4, although its README said the
    ``--dilation`` flag set it; DIGEST §5.10.5).
    """

    def __init__(self, channels: int, reduction: int = 4, dilation: int = 4, num_dilated: int = 2, dims: int = 3):
        super().__init__()
        self.channel_att = BAMChannelGate(channels, reduction)
        self.spatial_att = BAMSpatialGate(channels, reduction, num_dilated, dilation, dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.spatial_att(self.channel_att(x))


ATTENTION_KINDS = ("se", "cbam", "pe", "slice", "pam", "scse", "csse", "bam")
"""Names accepted by :func:`build_attention` (``"ag"``, the skip gate, is wired by the networks)."""
SLICE_KINDS = ("slice", "pam", "scse", "csse")
"""Kinds with one weight per depth slice: they need the map's depth (``slices``) and a 3D network."""


def build_attention(kind: str, channels: int, *, dims: int = 3, slices: int | None = None,
                    reduction: int = 8, slice_reduction: int = 16, pooling: str = "avg",
                    slice_pooling: str = "avg", pe_reduction: int = 2, cbam_reduction: int | None = None,
                    spatial_kernel: int = 7, spatial_norm: str | None = "instance", cbam_channel: bool = True,
                    bam_reduction: int = 4, bam_dilation: int = 4) -> nn.Module:
    """A single-input attention module by name for a feature map with ``channels`` channels.

    Kinds: ``se`` (:class:`ChannelSE`), ``cbam``, ``pe`` (Project & Excite), ``slice``, ``pam``,
    ``scse`` (slice then channel SE, the seed's scA), ``csse`` (channel SE then slice, csA), ``bam``.
    ``slices`` (depth of the map) is required by slice, pam, scse, csse. ``reduction`` is the channel
    reduction r, ``slice_reduction`` the slice one. ``cbam_channel=False`` keeps only CBAM's spatial
    gate (the MIS seed's module, with its gate bug fixed); ``bam_dilation`` is BAM's spatial-gate dilation.
    """
    kind = kind.lower()
    if kind in SLICE_KINDS and (dims != 3 or not slices):
        raise ModelError(f"attention {kind!r} needs a 3D network built with the input depth",
                         hint="Give depth: <input patch depth in voxels> in model.kwargs (a build_model keyword).")
    if kind == "se":
        return ChannelSE(channels, reduction, pooling)
    if kind == "cbam":
        return CBAM(channels, cbam_reduction or reduction, dims, spatial_kernel, spatial_norm, channel=cbam_channel)
    if kind == "pe":
        return ProjectExcite(channels, pe_reduction, dims)
    if kind == "slice":
        return SliceAttention(channels, slices, slice_reduction, slice_pooling)
    if kind == "pam":
        return ProgressiveAttention(channels, slices, slice_reduction, reduction, pooling, slice_pooling)
    if kind == "scse":
        return nn.Sequential(SliceAttention(channels, slices, slice_reduction, slice_pooling),
                             ChannelSE(channels, reduction, pooling))
    if kind == "csse":
        return nn.Sequential(ChannelSE(channels, reduction, pooling),
                             SliceAttention(channels, slices, slice_reduction, slice_pooling))
    if kind == "bam":
        return SequentialBAM(channels, bam_reduction, bam_dilation, dims=dims)
    raise ModelError(f"unknown attention {kind!r}", hint=f"Use one of {', '.join(ATTENTION_KINDS)} (or 'ag').")
