"""U-Nets: the MIS 3D U-Net with pluggable attention (DIGEST §3.2, §3.4) and the liver 2D U-Nets (§4).

Registered models (all return logits; the runner applies the card's softmax / sigmoid):

| name | input (N, C, ...) | sizes must be multiples of | paper widths |
|---|---|---|---|
| ``unet3d`` | (N, C, Z, Y, X) | 2**(num_levels-1) = 8 | F = 16: 16, 32, 64, 128 |
| ``unet2d_vgg16`` | (N, C, Y, X) | 16 | VGG16-D: 64 ... 512 |
| ``unet2d_bn`` | (N, C, Y, X) | 16 | 64 ... 1024 |
| ``attention_unet2d`` | (N, C, Y, X) | 16 | 64 ... 1024 |

Each network carries the sliding-window contract (``margin``, ``divisor``, ``input_patch_for``) of
:class:`~medseg_cli.zoo.blocks.PatchContract`; all are same-padding nets (margin 0).

Seed bugs fixed here (DIGEST §3.9, §4.7; the attention modules' own fixes are listed in attention.py):

* MIS: the network applied softmax / sigmoid inside ``forward`` in eval mode only, so train and eval
  outputs differed in kind; here ``forward`` always returns logits (the card's ``output_activation``
  says what to apply). The two-GPU split (``device[0]`` / ``device[-1]``) is gone (DDP instead).
* Liver §4.7.3: ``att_unet.py`` named its wrapper like the network and instantiated itself (infinite
  recursion); here every network is one registered class, built by name.
* Liver §4.7.2: the U-Net script froze a *random* VGG16 encoder for all epochs; nothing is frozen here
  (the encoder's ``features`` indices still match torchvision's for ImageNet weights).
* Liver Unet_BN (§4.4) was absent from the repository; it is the AttU_Net without its gates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ModelError
from .attention import ATTENTION_KINDS, SLICE_KINDS, AdditiveAttentionGate, GridAttentionGate, build_attention
from .blocks import ConvNormAct, PatchContract, upsample_to
from .registry import register_model

# ----------------------------------------------------------------------------------------------
# Attention configuration shared by the 3D families (also used by vnet.py)
# ----------------------------------------------------------------------------------------------


def parse_attention(attention: str | Sequence[str] | None, stages: Sequence[int] | None,
                    num_stages: int, depth: int | None = None) -> tuple[list[str], bool, set[int]]:
    """Normalise the ``attention`` / ``attention_stages`` kwargs.

    Returns ``(module kinds in order, attention gate wanted, encoder stages (1-based))``. ``attention``
    is a kind of :data:`~medseg_cli.zoo.attention.ATTENTION_KINDS`, ``"ag"`` (attention gate on the
    skip connections), or a list of them (e.g. ``["pam", "ag"]``, the seed's PAM network). Slice-based
    kinds (:func:`needs_depth`) need ``depth``, the input patch depth in voxels.
    """
    if attention in (None, "", "none"):
        kinds: list[str] = []
    elif isinstance(attention, str):
        kinds = [attention.lower()]
    else:
        kinds = [str(k).lower() for k in attention]
    unknown = [k for k in kinds if k not in ATTENTION_KINDS and k != "ag"]
    if unknown:
        raise ModelError(f"unknown attention {unknown}", hint=f"Use {', '.join(ATTENTION_KINDS)} or 'ag'.")
    chosen = set(range(1, num_stages + 1)) if stages is None else {int(s) for s in stages}
    bad = sorted(s for s in chosen if not 1 <= s <= num_stages)
    if bad:
        raise ModelError(f"attention_stages {bad} out of range",
                         hint=f"Encoder stages are numbered 1..{num_stages}.")
    if needs_depth(kinds) and not depth:
        raise ModelError(f"attention {kinds} needs depth",
                         hint="Give depth: <input patch depth in voxels> in model.kwargs (a build_model keyword).")
    gate = "ag" in kinds
    return [k for k in kinds if k != "ag"], gate, chosen


def attention_module(kinds: list[str], channels: int, depth: int | None, level: int,
                     options: dict) -> nn.Module | None:
    """One module applying ``kinds`` in order to a (N, channels, D, H, W) map at resolution ``level``
    (0 = full; ``depth`` is the full-resolution input depth), or None for no kinds."""
    slices = slices_at(depth, level) if needs_depth(kinds) else None
    modules = [build_attention(kind, channels, dims=3, slices=slices, **options) for kind in kinds]
    if not modules:
        return None
    return modules[0] if len(modules) == 1 else nn.Sequential(*modules)


def slices_at(depth: int | None, level: int) -> int | None:
    """Depth (slices) at resolution ``level`` (0 = full, each level halves it); None without a depth."""
    if depth is None:
        return None
    if depth % (2 ** level):
        raise ModelError(f"depth {depth} is not divisible by {2 ** level}",
                         hint="Use a patch depth that is a multiple of the network's divisor.")
    return depth // (2 ** level)


def needs_depth(kinds: list[str]) -> bool:
    """True when one of ``kinds`` has one weight per depth slice (the network then needs ``depth``)."""
    return any(k in SLICE_KINDS for k in kinds)


# ----------------------------------------------------------------------------------------------
# UNet3D (AttentionBased-MIS)
# ----------------------------------------------------------------------------------------------


class DoubleConv(nn.Sequential):
    """Two :class:`ConvNormAct` k3 (``Conv1``, ``Conv2``). Encoder: cin -> max(cout // 2, cin) -> cout;
    decoder: cin -> cout -> cout (DIGEST §3.1)."""

    def __init__(self, in_channels: int, out_channels: int, *, encoder: bool, order: str = "cpi",
                 num_groups: int = 2, dims: int = 3):
        super().__init__()
        mid = max(out_channels // 2, in_channels) if encoder else out_channels
        self.add_module("Conv1", ConvNormAct(in_channels, mid, dims=dims, order=order, num_groups=num_groups))
        self.add_module("Conv2", ConvNormAct(mid, out_channels, dims=dims, order=order, num_groups=num_groups))


class UNet3DEncoder(nn.Module):
    """[MaxPool 2] -> DoubleConv -> [attention]."""

    def __init__(self, in_channels: int, out_channels: int, *, pool: bool, order: str, num_groups: int,
                 attention: nn.Module | None = None):
        super().__init__()
        self.pooling = nn.MaxPool3d(kernel_size=2) if pool else None
        self.basic_module = DoubleConv(in_channels, out_channels, encoder=True, order=order, num_groups=num_groups)
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pooling is not None:
            x = self.pooling(x)
        x = self.basic_module(x)
        return self.attention(x) if self.attention is not None else x


class UNet3DDecoder(nn.Module):
    """[gate the skip] -> upsample to the skip's size -> concat [skip, up] -> DoubleConv -> [attention]."""

    def __init__(self, in_channels: int, out_channels: int, *, order: str, num_groups: int, upsample: str,
                 gate: nn.Module | None = None, attention: nn.Module | None = None):
        super().__init__()
        self.upsample = upsample
        self.attention_module = gate  # seed key name of the skip gate
        self.basic_module = DoubleConv(in_channels, out_channels, encoder=False, order=order, num_groups=num_groups)
        self.attention = attention

    def forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.attention_module is not None:
            skip = self.attention_module(skip, x)
        x = upsample_to(x, skip.shape[2:], self.upsample, align_corners=False)
        x = self.basic_module(torch.cat((skip, x), dim=1))
        return self.attention(x) if self.attention is not None else x


class UNet3D(PatchContract, nn.Module):
    """3D U-Net of AttentionBased-MIS (DIGEST §3.2) with attention pluggable per stage (§3.4).

    Widths ``F * 2**k`` for ``k < num_levels`` (F = ``init_features``, default 16; 4 levels = 3 poolings).
    Encoder stage i: [MaxPool 2] -> DoubleConv; decoder: upsample (``"nearest"`` as in the seed's plain
    UNet3D, ``"linear"`` = trilinear as in its PAM / PE networks) to the skip size, concat [skip, up],
    DoubleConv; final Conv k1 -> ``num_classes`` logits. Default layer order ``"cpi"``. PyTorch default
    init, as the seed. 1,022,771 parameters for in 4 / out 3 with defaults.

    Attention (config-driven): ``attention`` is a kind (``se``, ``cbam``, ``pe``, ``slice``, ``pam``,
    ``scse``, ``csse``, ``bam``), ``"ag"`` (grid attention gate on the skip connections of the listed
    stages, gated by the coarser decoder input) or a list of kinds; ``attention_stages`` lists the
    encoder stages (1..num_levels, default all) whose output gets the modules;
    ``decoder_attention=True`` also puts them after every decoder stage (the seed's cSE / scA / csA /
    PAM networks do). Slice-based kinds need ``depth`` (the input patch depth in voxels; the slice
    MLPs have one weight per slice, so the depth is then fixed). ``attention_kwargs`` go to
    :func:`~medseg_cli.zoo.attention.build_attention` (defaults: channel r 8, slice r 16, as the seed).
    The seed's PAM network is ``attention=["pam", "ag"], decoder_attention=True, upsample="linear"``.

    Input sizes: multiples of ``divisor`` = 2**(num_levels-1) (8); at least twice that
    (``min_input``) with a norm in ``layer_order``, since an instance norm on a single voxel cannot train.

    Seed difference: the seed applied softmax / sigmoid in eval mode inside ``forward``; this network
    always returns logits (N, num_classes, Z, Y, X).
    """

    def __init__(self, in_channels: int, num_classes: int, *, init_features: int = 16, num_levels: int = 4,
                 layer_order: str = "cpi", num_groups: int = 2, upsample: str = "nearest",
                 attention: str | Sequence[str] | None = None, attention_stages: Sequence[int] | None = None,
                 decoder_attention: bool = False, depth: int | None = None, attention_kwargs: dict | None = None):
        super().__init__()
        if num_levels < 2:
            raise ModelError("num_levels must be >= 2", hint="The seed uses 4 levels.")
        kinds, gate, stages = parse_attention(attention, attention_stages, num_levels, depth)
        options = {"reduction": 8, "slice_reduction": 16, **(attention_kwargs or {})}
        widths = [init_features * 2 ** k for k in range(num_levels)]
        self.num_levels = num_levels
        self.upsample = upsample
        cin = in_channels
        for i, width in enumerate(widths, start=1):
            att = attention_module(kinds, width, depth, i - 1, options) if i in stages else None
            setattr(self, f"EncoderLayer{i}", UNet3DEncoder(cin, width, pool=i > 1, order=layer_order,
                                                            num_groups=num_groups, attention=att))
            cin = width
        for j in range(1, num_levels):
            level = num_levels - 1 - j  # resolution level of this decoder's output (0 = full)
            out = widths[level]
            skip_stage = level + 1
            skip_gate = (GridAttentionGate(out, widths[level + 1], out // 2 or 1)
                         if gate and skip_stage in stages else None)
            att = attention_module(kinds, out, depth, level, options) if decoder_attention else None
            setattr(self, f"DecoderLayer{j}", UNet3DDecoder(widths[level + 1] + out, out, order=layer_order,
                                                            num_groups=num_groups, upsample=upsample,
                                                            gate=skip_gate, attention=att))
        self.final_conv = nn.Conv3d(widths[0], num_classes, kernel_size=1)
        fixed = {0: depth} if needs_depth(kinds) else None
        divisor = 2 ** (num_levels - 1)
        # a norm at the coarsest level needs more than one voxel per channel to train
        min_input = 2 * divisor if any(c in layer_order for c in "igb") else divisor
        self._set_patch_contract(3, divisor=divisor, fixed_shape=fixed, min_input=min_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i in range(1, self.num_levels + 1):
            x = getattr(self, f"EncoderLayer{i}")(x)
            skips.append(x)
        skips.pop()
        for j in range(1, self.num_levels):
            x = getattr(self, f"DecoderLayer{j}")(skips.pop(), x)
        return self.final_conv(x)


@register_model("unet3d", family="unet", spatial_dims=3,
                description="MIS 3D U-Net (F=16, 4 levels, 'cpi'), attention pluggable per stage")
def unet3d(in_channels: int, num_classes: int, **kwargs) -> UNet3D:
    """MIS 3D U-Net with optional SE / CBAM / PE / slice / PAM / AG attention (see :class:`UNet3D`)."""
    return UNet3D(in_channels, num_classes, **kwargs)


# ----------------------------------------------------------------------------------------------
# Liver 2D U-Nets
# ----------------------------------------------------------------------------------------------

VGG16_D = (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8)
"""VGG16 configuration D in units of the base width (64): the final max-pool is not used."""


class VGG16Encoder(nn.Module):
    """VGG16-D features without BN (3x3 convs, pad 1, bias, ReLU), built here (no torchvision).

    ``features`` indices match torchvision's ``vgg16().features`` (0..29), so ImageNet weights load
    into ``features`` directly when widths are the paper's. ``forward`` returns the five feature maps
    (w, 2w, 4w, 8w, 8w channels at 1, 1/2, 1/4, 1/8, 1/16 resolution).
    """

    _CUTS = (4, 9, 16, 23, 30)

    def __init__(self, in_channels: int = 3, base_width: int = 64):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for item in VGG16_D:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                width = int(item) * base_width
                layers += [nn.Conv2d(cin, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                cin = width
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats, start = [], 0
        for stop in self._CUTS:
            x = self.features[start:stop](x)
            feats.append(x)
            start = stop
        return feats


class UpConcat(nn.Module):
    """Liver U-Net decoder block: x2 bilinear (align_corners=True) up-sampling of the deeper map, concat
    [skip, up], Conv 3x3 (in -> out), Conv 3x3 (out -> out). No ReLU / BN, as the seed, unless
    ``activation=True`` (ReLU after each conv; an explicit improvement, same parameters)."""

    def __init__(self, in_channels: int, out_channels: int, activation: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.up = nn.UpsamplingBilinear2d(scale_factor=2)
        self.act = nn.ReLU(inplace=True) if activation else nn.Identity()

    def forward(self, skip: torch.Tensor, deeper: torch.Tensor) -> torch.Tensor:
        x = torch.cat([skip, self.up(deeper)], dim=1)
        return self.act(self.conv2(self.act(self.conv1(x))))


class UNet2DVGG16(PatchContract, nn.Module):
    """Liver U-Net with a VGG16 encoder (DIGEST §4.2): 24,891,202 parameters for 3 -> 2 classes.

    ``base_width`` scales every width (paper 64). ``decoder_activation=False`` is seed-exact (no
    activation in the decoder); ``True`` adds ReLUs. Input (N, C, Y, X), Y and X multiples of 16;
    output logits (N, num_classes, Y, X). Keys: ``vgg.features.<i>``, ``up_concat{4,3,2,1}.conv{1,2}``,
    ``final``. PyTorch default init (the seed trained from a random, frozen encoder; §4.7.2).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, *, base_width: int = 64,
                 decoder_activation: bool = False):
        super().__init__()
        w = base_width
        self.vgg = VGG16Encoder(in_channels, w)
        self.up_concat4 = UpConcat(8 * w + 8 * w, 8 * w, decoder_activation)
        self.up_concat3 = UpConcat(4 * w + 8 * w, 4 * w, decoder_activation)
        self.up_concat2 = UpConcat(2 * w + 4 * w, 2 * w, decoder_activation)
        self.up_concat1 = UpConcat(w + 2 * w, w, decoder_activation)
        self.final = nn.Conv2d(w, num_classes, kernel_size=1)
        self._set_patch_contract(2, divisor=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f1, f2, f3, f4, f5 = self.vgg(x)
        up4 = self.up_concat4(f4, f5)
        up3 = self.up_concat3(f3, up4)
        up2 = self.up_concat2(f2, up3)
        up1 = self.up_concat1(f1, up2)
        return self.final(up1)


class ConvBlock2D(nn.Module):
    """AttU_Net ``conv_block``: [Conv 3x3 (bias) -> BN -> ReLU] x 2 (key ``conv.{0,1,3,4}``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpConv2D(nn.Module):
    """AttU_Net ``up_conv``: x2 nearest up-sampling -> Conv 3x3 (bias) -> BN -> ReLU (key ``up.{1,2}``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                nn.Conv2d(in_channels, out_channels, 3, padding=1),
                                nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


class AttentionUNet2D(PatchContract, nn.Module):
    """Liver AttU_Net (DIGEST §4.3), or with ``attention=False`` the Unet_BN (§4.4).

    Widths w, 2w, 4w, 8w, 16w (``base_width`` w, paper 64); 4 max-pools; decoder level k: UpConv2D,
    [AdditiveAttentionGate on the encoder skip], concat [skip, up], ConvBlock2D; final Conv 1x1.
    Parameters for 3 -> 2 classes: 34,878,638 with attention, 34,527,106 without. Input (N, C, Y, X),
    Y and X multiples of 16; output logits. Keys follow the seed (``Conv1..5``, ``Up5..2``,
    ``Att5..2``, ``Up_conv5..2``, ``Conv_1x1``).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, *, base_width: int = 64, attention: bool = True):
        super().__init__()
        w = [base_width * 2 ** k for k in range(5)]
        self.use_attention = attention
        self.Maxpool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.Conv1 = ConvBlock2D(in_channels, w[0])
        self.Conv2 = ConvBlock2D(w[0], w[1])
        self.Conv3 = ConvBlock2D(w[1], w[2])
        self.Conv4 = ConvBlock2D(w[2], w[3])
        self.Conv5 = ConvBlock2D(w[3], w[4])
        for level in (5, 4, 3, 2):
            out = w[level - 2]
            setattr(self, f"Up{level}", UpConv2D(w[level - 1], out))
            if attention:
                setattr(self, f"Att{level}", AdditiveAttentionGate(out, out, max(1, out // 2), dims=2))
            setattr(self, f"Up_conv{level}", ConvBlock2D(2 * out, out))
        self.Conv_1x1 = nn.Conv2d(w[0], num_classes, kernel_size=1)
        # batch norm at 1/16 needs more than one value per channel to train with batch size 1
        self._set_patch_contract(2, divisor=16, min_input=32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.Conv1(x)]
        for conv in (self.Conv2, self.Conv3, self.Conv4, self.Conv5):
            skips.append(conv(self.Maxpool(skips[-1])))
        d = skips.pop()
        for level in (5, 4, 3, 2):
            d = getattr(self, f"Up{level}")(d)
            skip = skips.pop()
            if self.use_attention:
                skip = getattr(self, f"Att{level}")(g=d, x=skip)
            d = getattr(self, f"Up_conv{level}")(torch.cat((skip, d), dim=1))
        return self.Conv_1x1(d)


@register_model("unet2d_vgg16", family="unet", spatial_dims=2,
                description="Liver 2D U-Net with a VGG16-D encoder (seed decoder: bilinear, no activation)")
def unet2d_vgg16(in_channels: int, num_classes: int, **kwargs) -> UNet2DVGG16:
    """Liver 2D U-Net with a VGG16-D encoder (see :class:`UNet2DVGG16`)."""
    return UNet2DVGG16(in_channels, num_classes, **kwargs)


@register_model("unet2d_bn", family="unet", spatial_dims=2,
                description="Liver 2D U-Net with BatchNorm (AttU_Net without attention gates)")
def unet2d_bn(in_channels: int, num_classes: int, **kwargs) -> AttentionUNet2D:
    """Liver Unet_BN: the Attention U-Net without its attention gates."""
    return AttentionUNet2D(in_channels, num_classes, attention=False, **kwargs)


@register_model("attention_unet2d", family="unet", spatial_dims=2,
                description="Liver 2D Attention U-Net (AttU_Net)")
def attention_unet2d(in_channels: int, num_classes: int, **kwargs) -> AttentionUNet2D:
    """Liver AttU_Net (see :class:`AttentionUNet2D`)."""
    return AttentionUNet2D(in_channels, num_classes, attention=True, **kwargs)
