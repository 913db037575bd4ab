"""V-Nets: the MIS VNet with pluggable attention (DIGEST §3.3) and the VNet-LA with BAM (§5.1, §5.2).

Registered models (inputs (N, C, Z, Y, X), each size a multiple of 16; outputs logits of the same size):

| name | paper widths | parameters (measured in the seed) |
|---|---|---|
| ``vnet`` | F = 16: 8 (input stage) ... 128, 5x5x5 convs | 6,883,683 for in 1 / out 3 |
| ``vnet_la`` | 8 (input), 16 ... 128, 5x5x5 convs, PReLU | 10,759,306 (L=1), 10,850,389 (+BAM), 16,200,266 (L=2), in 1 / out 1 |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ModelError
from .attention import SequentialBAM
from .blocks import _ORDER_LETTERS, ConvNormAct, PatchContract, activation, norm_nd
from .registry import register_model
from .unet import attention_module, needs_depth, parse_attention

_ACTIVATION_LETTERS = {letter: kind for letter, (_, kind) in _ORDER_LETTERS.items()}
_NORM_LETTERS = {"g": "group", "i": "instance", "b": "batch"}

# ----------------------------------------------------------------------------------------------
# MIS VNet
# ----------------------------------------------------------------------------------------------


class ResidualConvBlock(nn.Module):
    """``repetition`` x [Conv k5 p2 + the ops of ``order``] with the activation left out after the last
    conv, plus the identity, then a final activation (DIGEST §3.3). (N, cin, *S) -> (N, cout, *S).

    Seed bug fixed: the identity is broadcast-added, which only works when it has 1 channel or ``cout``
    channels (the seed's VNet raised a size mismatch for 4-channel input). An identity with another
    channel count now goes through a 1x1x1 projection (``identity_projection``); 1-channel identities
    are still broadcast, so a 1-channel VNet keeps the seed's structure and parameter count.
    """

    def __init__(self, repetition: int, in_channels: int, out_channels: int, *, order: str = "cpi",
                 kernel_size: int = 5, num_groups: int = 8, identity_channels: int | None = None):
        super().__init__()
        modules: list[nn.Module] = []
        conv_at = order.index("c")
        bias = not ("g" in order or "b" in order)
        final_act = "identity"
        for i in range(repetition):
            cin = in_channels if i == 0 else out_channels
            last = i == repetition - 1
            for j, char in enumerate(order):
                if char == "c":
                    modules.append(nn.Conv3d(cin, out_channels, kernel_size, padding=kernel_size // 2, bias=bias))
                elif char in _ACTIVATION_LETTERS:
                    final_act = _ACTIVATION_LETTERS[char]
                    if not last:
                        modules.append(activation(final_act, out_channels))
                elif char in _NORM_LETTERS:  # group norm always over the conv's output, as the seed
                    channels = cin if j < conv_at and char != "g" else out_channels
                    modules.append(norm_nd(_NORM_LETTERS[char], 3, channels, num_groups))
        self.convblock = nn.Sequential(*modules)
        self.final_nolinear_activation = nn.Identity() if final_act == "identity" else activation(final_act, out_channels)
        ident = out_channels if identity_channels is None else identity_channels
        self.identity_projection = (nn.Conv3d(ident, out_channels, kernel_size=1)
                                    if ident not in (1, out_channels) else None)

    def forward(self, x: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        if self.identity_projection is not None:
            identity = self.identity_projection(identity)
        return self.final_nolinear_activation(self.convblock(x) + identity)


class VNetEncoder(nn.Module):
    """Residual block (cin -> cout // 2, identity = input) -> [attention] = skip feature; then
    ``downsample_layer`` Conv k2 s2 (cout // 2 -> cout) + ops. Returns ``(down, feature)``."""

    def __init__(self, repetition: int, in_channels: int, out_channels: int, *, order: str, num_groups: int,
                 attention: nn.Module | None = None):
        super().__init__()
        self.conv_layer = ResidualConvBlock(repetition, in_channels, out_channels // 2, order=order,
                                            num_groups=num_groups, identity_channels=in_channels)
        self.attention = attention
        self.downsample_layer = ConvNormAct(out_channels // 2, out_channels, kernel_size=2, stride=2, padding=0,
                                            order=order, num_groups=num_groups)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.conv_layer(x, x)
        if self.attention is not None:
            feature = self.attention(feature)
        return self.downsample_layer(feature), feature


class VNetDecoder(nn.Module):
    """ConvTranspose k2 s2 (cin -> cout) + ops; concat [skip, up]; residual block (cin -> cout, identity =
    up) -> [attention]."""

    def __init__(self, repetition: int, in_channels: int, out_channels: int, *, order: str, num_groups: int,
                 attention: nn.Module | None = None):
        super().__init__()
        self.upsample_layer = ConvNormAct(in_channels, out_channels, kernel_size=2, stride=2, padding=0,
                                          order=order, num_groups=num_groups, transpose=True)
        self.conv_layer = ResidualConvBlock(repetition, in_channels, out_channels, order=order, num_groups=num_groups)
        self.attention = attention

    def forward(self, x: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        up = self.upsample_layer(x)
        x = self.conv_layer(torch.cat((feature, up), dim=1), up)
        return self.attention(x) if self.attention is not None else x


class VNet(PatchContract, nn.Module):
    """MIS VNet (DIGEST §3.3): 5x5x5 residual blocks, strided-conv down-sampling, transposed-conv up-sampling.

    Widths f = F * (1, 2, 4, 8) (``init_features`` F, default 16); encoder repetitions 1, 2, 3, 3; a single
    Conv k5 bottleneck (the seed ignored its ``repetition=3``); decoders (f3 -> f2, 3), (f2 -> f1, 3),
    (f1 -> f0, 2), (f0 -> f0/2, 1); final Conv k1 -> ``num_classes`` logits. Layer order ``"cpi"``.
    6,883,683 parameters for in 1 / out 3. PyTorch default init (as the seed). Input sizes: multiples
    of 16, at least 32 with a norm in ``layer_order`` (``min_input``: the 1/16 bottleneck must have
    more than one voxel for instance norm in training).

    Attention as in :class:`~medseg_cli.zoo.unet.UNet3D`: ``attention`` kind(s) on the skip feature of
    the encoder stages in ``attention_stages`` (1..4); ``decoder_attention=True`` adds them after the
    bottleneck and every decoder stage (the seed's cSE/scA/csA/PAM VNets). Defaults: channel r 4,
    slice r 8 (seed VNet values). ``"ag"`` is not offered for VNet (the seed has none).

    Seed bug fixed: in_channels > 1 works (1x1x1 projection of the identity, see
    :class:`ResidualConvBlock`); with 1 input channel the network is the seed's.
    """

    def __init__(self, in_channels: int, num_classes: int, *, init_features: int = 16, layer_order: str = "cpi",
                 num_groups: int = 8, attention: str | Sequence[str] | None = None,
                 attention_stages: Sequence[int] | None = None, decoder_attention: bool = False,
                 depth: int | None = None, attention_kwargs: dict | None = None):
        super().__init__()
        kinds, gate, stages = parse_attention(attention, attention_stages, 4, depth)
        if gate:
            raise ModelError("attention 'ag' is not available for vnet", hint="Use it with unet3d.")
        options = {"reduction": 4, "slice_reduction": 8, **(attention_kwargs or {})}
        f = [init_features * 2 ** k for k in range(4)]
        common = {"order": layer_order, "num_groups": num_groups}

        def att(channels: int, level: int, wanted: bool) -> nn.Module | None:
            return attention_module(kinds, channels, depth, level, options) if wanted else None

        self.Encoder_layer1 = VNetEncoder(1, in_channels, f[0], attention=att(f[0] // 2, 0, 1 in stages), **common)
        self.Encoder_layer2 = VNetEncoder(2, f[0], f[1], attention=att(f[1] // 2, 1, 2 in stages), **common)
        self.Encoder_layer3 = VNetEncoder(3, f[1], f[2], attention=att(f[2] // 2, 2, 3 in stages), **common)
        self.Encoder_layer4 = VNetEncoder(3, f[2], f[3], attention=att(f[3] // 2, 3, 4 in stages), **common)
        self.Bottleneck_layer = ConvNormAct(f[3], f[3], kernel_size=5, padding=2, **common)
        self.Bottleneck_attention = att(f[3], 4, decoder_attention)
        self.Decoder_layer1 = VNetDecoder(3, f[3], f[2], attention=att(f[2], 3, decoder_attention), **common)
        self.Decoder_layer2 = VNetDecoder(3, f[2], f[1], attention=att(f[1], 2, decoder_attention), **common)
        self.Decoder_layer3 = VNetDecoder(2, f[1], f[0], attention=att(f[0], 1, decoder_attention), **common)
        self.Decoder_layer4 = VNetDecoder(1, f[0], f[0] // 2, attention=att(f[0] // 2, 0, decoder_attention), **common)
        self.final_conv = nn.Conv3d(f[0] // 2, num_classes, kernel_size=1)
        # an instance / batch norm at the 1/16 bottleneck needs > 1 voxel per channel to train
        min_input = 32 if any(c in layer_order for c in "ib") else 16
        self._set_patch_contract(3, divisor=16, fixed_shape={0: depth} if needs_depth(kinds) else None,
                                 min_input=min_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, f1 = self.Encoder_layer1(x)
        x, f2 = self.Encoder_layer2(x)
        x, f3 = self.Encoder_layer3(x)
        x, f4 = self.Encoder_layer4(x)
        x = self.Bottleneck_layer(x)
        if self.Bottleneck_attention is not None:
            x = self.Bottleneck_attention(x)
        x = self.Decoder_layer1(x, f4)
        x = self.Decoder_layer2(x, f3)
        x = self.Decoder_layer3(x, f2)
        x = self.Decoder_layer4(x, f1)
        return self.final_conv(x)


@register_model("vnet", family="vnet", spatial_dims=3,
                description="MIS VNet (5x5x5 residual blocks), attention pluggable per stage")
def vnet(in_channels: int, num_classes: int, **kwargs) -> VNet:
    """MIS VNet (see :class:`VNet`)."""
    return VNet(in_channels, num_classes, **kwargs)


# ----------------------------------------------------------------------------------------------
# VNet-LA (bragancas/VNet_PyTorch-Atriaseg2018)
# ----------------------------------------------------------------------------------------------


def _act(prelu: bool, channels: int) -> nn.Module:
    return nn.PReLU(channels) if prelu else nn.ELU()


class LAConvLayer(nn.Module):
    """Conv k5 (C -> C, dilation d, padding 2d) -> PReLU(C) (or ELU). Keys ``relu1``, ``conv1``."""

    def __init__(self, channels: int, prelu: bool, dilation: int):
        super().__init__()
        self.relu1 = _act(prelu, channels)
        self.conv1 = nn.Conv3d(channels, channels, kernel_size=5, padding=2 * dilation, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu1(self.conv1(x))


class LAInputTransition(nn.Module):
    """Conv k5 (C_in -> C, dilation d) -> PReLU -> [BAM] -> + input.

    Seed bug fixed: the seed broadcast-added the 1-channel input; with C_in > 1 the input now goes
    through a 1x1x1 projection (``input_projection``) first. 1-channel input is unchanged.
    """

    def __init__(self, in_channels: int, out_channels: int, prelu: bool, dilation: int, bam: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=5, padding=2 * dilation, dilation=dilation)
        self.relu1 = _act(prelu, out_channels)
        self.att_module = bam
        self.input_projection = (nn.Conv3d(in_channels, out_channels, kernel_size=1)
                                 if in_channels not in (1, out_channels) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.conv1(x))
        if self.att_module is not None:
            out = self.att_module(out)
        identity = self.input_projection(x) if self.input_projection is not None else x
        return out + identity


class LADownTransition(nn.Module):
    """Conv k2 s2 (C -> 2C) -> PReLU = ``down``; ``num_layers`` :class:`LAConvLayer` -> [BAM] -> + down."""

    def __init__(self, in_channels: int, num_layers: int, prelu: bool, dilation: int, bam: nn.Module | None):
        super().__init__()
        out = 2 * in_channels
        self.down_conv = nn.Conv3d(in_channels, out, kernel_size=2, stride=2)
        self.relu1 = _act(prelu, out)
        self.ops = nn.Sequential(*[LAConvLayer(out, prelu, dilation) for _ in range(num_layers)])
        self.att_module = bam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = self.relu1(self.down_conv(x))
        out = self.ops(down)
        if self.att_module is not None:
            out = self.att_module(out)
        return out + down


class LAUpTransition(nn.Module):
    """ConvTranspose k2 s2 (C_in -> C_out/2) -> PReLU; concat [up, skip]; ``num_layers`` conv layers
    (dilation 1) -> + concatenation.

    ``relu2`` is the seed's unused PReLU: kept (frozen, ``requires_grad=False``) so seed checkpoints load
    and the parameter count matches, without upsetting DDP's unused-parameter check.
    """

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, prelu: bool):
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(in_channels, out_channels // 2, kernel_size=2, stride=2)
        self.relu1 = _act(prelu, out_channels // 2)
        self.relu2 = _act(prelu, out_channels).requires_grad_(False)
        self.ops = nn.Sequential(*[LAConvLayer(out_channels, prelu, 1) for _ in range(num_layers)])

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        cat = torch.cat((self.relu1(self.up_conv(x)), skip), dim=1)
        return self.ops(cat) + cat


class LAOutputTransition(nn.Module):
    """Conv k1 (C -> num_classes) [-> PReLU when ``prelu_on_logits``, the seed's behaviour]."""

    def __init__(self, in_channels: int, num_classes: int, prelu: bool, prelu_on_logits: bool):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, num_classes, kernel_size=1)
        self.relu1 = _act(prelu, num_classes) if prelu_on_logits else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        return self.relu1(out) if self.relu1 is not None else out


class VNetLA(PatchContract, nn.Module):
    """VNet of the LASC 2018 left-atrium code (DIGEST §5.1) with the optional BAM-style module (§5.2).

    Stages: input (C_in -> w/2), down16 (w/2 -> w, L convs), down32 (-> 2w, L), down64 (-> 4w, L+1),
    down128 (-> 8w, L+1), up128 (8w -> 8w, L+1), up64 (8w -> 4w, L+1), up32 (4w -> 2w, L), up16 (2w -> w, L),
    output Conv k1 (w -> ``num_classes``). ``base_width`` w (paper 16), ``num_layers`` L (paper 1 or 2),
    ``dilation`` d of the input / down-path 5x5x5 convs, ``attention=True`` adds
    :class:`~medseg_cli.zoo.attention.SequentialBAM` (spatial-gate dilation ``bam_dilation``, seed 4) in
    the input and every down transition. ``prelu=False`` uses ELU. Init as the seed: Xavier-normal
    weights and zero bias for ``Conv3d`` layers only.

    Parameters (in 1 / out 1, ``prelu_on_logits=True``): 10,759,306 (L=1), 10,850,389 (L=1 + BAM),
    16,200,266 (L=2); one fewer with the default ``prelu_on_logits=False``.

    Seed bugs fixed: PReLU on the logits (§5.10.9) is off by default (``prelu_on_logits=True`` restores
    it for seed checkpoints); ``num_classes`` > 1 is supported (softmax logits; 1 class = sigmoid logit);
    in_channels > 1 works (:class:`LAInputTransition`); BAM's dilation is configurable and its
    BatchNorm1d accepts batch 1.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 1, *, num_layers: int = 1, dilation: int = 1,
                 attention: bool = False, bam_dilation: int = 4, base_width: int = 16, prelu: bool = True,
                 prelu_on_logits: bool = False):
        super().__init__()
        if base_width < 2 or base_width % 2:
            raise ModelError(f"base_width must be an even number >= 2, got {base_width}", hint="The paper uses 16.")
        if num_layers < 1:
            raise ModelError(f"num_layers must be >= 1, got {num_layers}", hint="The paper uses 1 or 2.")
        w = base_width

        def bam(channels: int) -> nn.Module | None:
            return SequentialBAM(channels, dilation=bam_dilation) if attention else None

        self.input_transition = LAInputTransition(in_channels, w // 2, prelu, dilation, bam(w // 2))
        self.down_transition16 = LADownTransition(w // 2, num_layers, prelu, dilation, bam(w))
        self.down_transition32 = LADownTransition(w, num_layers, prelu, dilation, bam(2 * w))
        self.down_transition64 = LADownTransition(2 * w, num_layers + 1, prelu, dilation, bam(4 * w))
        self.down_transition128 = LADownTransition(4 * w, num_layers + 1, prelu, dilation, bam(8 * w))
        self.up_transition128 = LAUpTransition(8 * w, 8 * w, num_layers + 1, prelu)
        self.up_transition64 = LAUpTransition(8 * w, 4 * w, num_layers + 1, prelu)
        self.up_transition32 = LAUpTransition(4 * w, 2 * w, num_layers, prelu)
        self.up_transition16 = LAUpTransition(2 * w, w, num_layers, prelu)
        self.out_transition = LAOutputTransition(w, num_classes, prelu, prelu_on_logits)
        for module in self.modules():
            if type(module) is nn.Conv3d and not module.weight.is_meta:  # (meta: counting parameters only)
                nn.init.xavier_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self._set_patch_contract(3, divisor=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out8 = self.input_transition(x)
        out16 = self.down_transition16(out8)
        out32 = self.down_transition32(out16)
        out64 = self.down_transition64(out32)
        out128 = self.down_transition128(out64)
        out = self.up_transition128(out128, out64)
        out = self.up_transition64(out, out32)
        out = self.up_transition32(out, out16)
        out = self.up_transition16(out, out8)
        return self.out_transition(out)


@register_model("vnet_la", family="vnet", spatial_dims=3,
                description="VNet of the LASC 2018 left-atrium code, optional BAM attention")
def vnet_la(in_channels: int, num_classes: int, **kwargs) -> VNetLA:
    """VNet-LA with PReLU, 5x5x5 convs, optional BAM (see :class:`VNetLA`)."""
    return VNetLA(in_channels, num_classes, **kwargs)
