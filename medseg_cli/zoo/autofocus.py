"""Autofocus networks (Qin et al., MICCAI 2018; DIGEST §1): Basic, ASPP-c, ASPP-s and AFN1 ... AFN6.

All are 3D, valid-convolution nets on (N, C, Z, Y, X) inputs returning logits (N, K, Z-28, Y-28, X-28):
every model loses 14 voxels per side (``margin``), so a 75^3 segment predicts its central 47^3.
Any input size >= 29 per axis works (``divisor`` 1, ``min_input`` 29).

| name | blocks (layers 3-5) | head | parameters (in 4, out 5) | (in 3, out 5) |
|---|---|---|---|---|
| ``autofocus_basic`` | B B B | Conv k1 50->5 | 315,725 | 314,915 |
| ``autofocus_aspp_c`` | B B B | ASPP, 4 x (Conv k3 50->30), concat, BN, ReLU, Conv k1 120->5 | 478,435 | 477,625 |
| ``autofocus_aspp_s`` | B B B | ASPP, 4 x (Conv k3 50->120, BN, ReLU, Conv k1 120->5), summed | 967,330 | 966,520 |
| ``afn1`` | B B S | Conv k1 | 349,904 | 349,094 |
| ``afn2`` | B B A | Conv k1 | 371,908 | 371,098 |
| ``afn3`` | B S A | Conv k1 | 393,852 | 393,042 |
| ``afn4`` | B A A | Conv k1 | 415,796 | 414,986 |
| ``afn5`` | S A A | Conv k1 | 437,740 | 436,930 |
| ``afn6`` | A A A | Conv k1 | 450,209 | 449,399 |

Trunk: Conv k3 (C->30) BN ReLU, Conv k3 (30->30) BN ReLU, then three residual blocks with channel
triples (30, 40, 40), (40, 40, 40), (40, 50, 50). Block kinds: ``B`` two plain dilated convs (k3 d2,
valid), ``S`` a plain conv then an autofocus conv, ``A`` two autofocus convs. Each block adds its input,
centre-cropped by 4 voxels per side (through Conv k1 + BN when the channel count changes), then ReLU.

Autofocus convolution (:class:`AutofocusConv3d`): ONE 3x3x3 weight shared by K = 4 branches with
dilation/padding (2, 0), (6, 4), (10, 8), (14, 12) (every branch loses 2 voxels per side), a
BatchNorm per branch, and an attention map (Conv k3 C->C/2, ReLU, Conv k1 C/2->K, softmax over K,
centre crop 1) computed from the block's *detached* input; output = sum_k att_k * BN_k(branch_k).

Initialisation as the seed: Conv3d weights ~ N(0, 0.01), biases PyTorch's default, BN weight 1 bias 0.

Seed behaviour kept on purpose, and seed bugs fixed (DIGEST §1.10 and ``models.py``):

* §1.10 bug 1 (attention from the detached input, no gradient into the trunk through the attention
  path) is kept as the default, and is a switch: ``detach_attention=False`` lets it flow.
* §1.10 bug 2 (only branch 0 has a bias) is kept: in eval mode the per-branch BN does *not* cancel
  the bias (its running mean absorbed it during training), so dropping it would change the outputs of
  the authors' published weights.
* Fixed: the seed's ``ModelBuilder`` takes ``num_input`` = modalities + 1 (the brain mask, never fed to
  the net) and defaults to 4, i.e. 3 input channels; here ``in_channels`` is the number of image
  channels (4 for BRATS), no off-by-one.
* Fixed: the seed's ASPP constructors insert into the caller's channel list (``channels.insert``),
  mutating shared state; widths here are immutable tuples.
* Fixed: attention widths ``int(C / 2)`` become ``max(1, C // 2)`` (no zero-width conv for C = 1).
* No in-place ReLU / ``+=`` on activations (the seed's in-place ops break ``torch.autograd`` checks
  and ONNX export of some variants); values are identical.

Parameter counts: every number the digest lists as measured is reproduced exactly (tests/test_zoo_autofocus.py).
Basic, ASPP-c, ASPP-s, AFN1, AFN2 and AFN6 were measured with 4 input channels (BRATS); the digest's
AFN3, AFN4 and AFN5 numbers (393,042 / 414,986 / 436,930) are those of the same networks built with
**3** input channels, evidently the seed's ``ModelBuilder.build_net`` default ``num_input=4`` (the
off-by-one above; the digest does not say so, but the gap is exactly one first-layer input channel,
30 x 27 = 810 parameters, and AFN1/AFN2/AFN6 match with 4). With 4
channels they have 393,852 / 415,796 / 437,740, which is also what the converter of the authors'
4-modality checkpoints (``exporters/autofocus_original.py``) needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import PatchContract
from .registry import register_model

#: dilation rates of the K autofocus branches (and of the ASPP heads).
SEED_DILATIONS = (2, 6, 10, 14)
#: widths of the seed's channel list ``[C, 30, 30, 40, 40, 40, 40, 50, 50, K]`` without C and K.
SEED_WIDTHS = (30, 30, 40, 40, 40, 40, 50, 50)
#: block kinds of layers 3-5 per network: B plain, S single autofocus, A double autofocus.
BLOCK_KINDS = {"basic": "BBB", "afn1": "BBS", "afn2": "BBA", "afn3": "BSA", "afn4": "BAA", "afn5": "SAA",
               "afn6": "AAA"}
BLOCK_DILATION = 2  # every dilated layer of the trunk (and branch 0 of an autofocus conv)
KERNEL = 3


def center_crop(x: torch.Tensor, crop: int) -> torch.Tensor:
    """Drop ``crop`` voxels on each side of every spatial axis of (N, C, Z, Y, X)."""
    if crop == 0:
        return x
    return x[:, :, crop:-crop, crop:-crop, crop:-crop]


def seed_init_(module: nn.Module) -> nn.Module:
    """The seed's initialisation: Conv3d weights ~ N(0, 0.01) (biases untouched), BN weight 1, bias 0.
    Modules on the ``meta`` device (counting parameters) are left alone: ``normal_`` there costs seconds."""
    for m in module.modules():
        if any(p.is_meta for p in m.parameters(recurse=False)):
            continue
        if isinstance(m, nn.Conv3d):
            nn.init.normal_(m.weight, 0.0, 0.01)
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


class ConvBN(nn.Module):
    """Valid Conv k3 (dilation ``dilation``, bias) -> BatchNorm: loses ``dilation`` voxels per side."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, KERNEL, dilation=dilation)
        self.norm = nn.BatchNorm3d(out_channels)
        self.margin = dilation * (KERNEL - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class AutofocusConv3d(nn.Module):
    """Autofocus convolution: K dilated convolutions sharing one weight, mixed by a learned attention.

    (N, in_channels, Z, Y, X) -> (N, out_channels, Z-4, Y-4, X-4). Branch k convolves with the shared
    weight ``conv.weight`` at dilation ``dilations[k]`` and padding ``dilations[k] - dilations[0]``
    (only branch 0 adds ``conv.bias``, as the seed), then its own BatchNorm ``norms[k]``. The attention
    ``attention`` (Conv k3 valid in->in/2, ReLU, Conv k1 in/2->K) sees the input (detached when
    ``detach_attention``), is softmaxed over K and centre-cropped by 1 so it aligns with the branches.
    """

    def __init__(self, in_channels: int, out_channels: int, dilations: Sequence[int] = SEED_DILATIONS,
                 detach_attention: bool = True):
        super().__init__()
        self.dilations = tuple(int(d) for d in dilations)
        if not self.dilations or self.dilations[0] != BLOCK_DILATION or any(d < 1 for d in self.dilations):
            raise ValueError(f"autofocus dilations must start with {BLOCK_DILATION} and be >= 1, "
                             f"got {self.dilations}")
        self.paddings = tuple(d - self.dilations[0] for d in self.dilations)
        self.detach_attention = bool(detach_attention)
        self.conv = nn.Conv3d(in_channels, out_channels, KERNEL, dilation=self.dilations[0])
        self.norms = nn.ModuleList(nn.BatchNorm3d(out_channels) for _ in self.dilations)
        hidden = max(1, in_channels // 2)
        self.attention = nn.Sequential(nn.Conv3d(in_channels, hidden, KERNEL), nn.ReLU(),
                                       nn.Conv3d(hidden, len(self.dilations), 1))
        self.margin = self.dilations[0] * (KERNEL - 1) // 2
        self._attention_crop = self.margin - (KERNEL - 1) // 2

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Branch weights (N, K, Z-4, Y-4, X-4), summing to 1 over K at every voxel."""
        feature = x.detach() if self.detach_attention else x
        return center_crop(torch.softmax(self.attention(feature), dim=1), self._attention_crop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = self.attention_weights(x)
        out = None
        for k, (dilation, padding) in enumerate(zip(self.dilations, self.paddings)):
            branch = F.conv3d(x, self.conv.weight, self.conv.bias if k == 0 else None,
                              padding=padding, dilation=dilation)
            term = self.norms[k](branch) * att[:, k:k + 1]
            out = term if out is None else out + term
        return out


class ResidualBlock(nn.Module):
    """A seed residual block of kind ``B`` (BasicBlock), ``S`` (Autofocus_single) or ``A`` (Autofocus).

    conv1 (cin->cmid) -> ReLU -> conv2 (cmid->cout); + input centre-cropped by 4 (Conv k1 + BN on the
    crop when cin != cout) -> ReLU. Shapes: (N, cin, S) -> (N, cout, S - 8) per axis.
    """

    def __init__(self, kind: str, in_channels: int, mid_channels: int, out_channels: int, *,
                 dilations: Sequence[int] = SEED_DILATIONS, detach_attention: bool = True):
        super().__init__()
        if kind not in ("B", "S", "A"):
            raise ValueError(f"block kind must be 'B', 'S' or 'A', got {kind!r}")
        self.kind = kind

        def layer(autofocus: bool, cin: int, cout: int) -> nn.Module:
            if autofocus:
                return AutofocusConv3d(cin, cout, dilations, detach_attention)
            return ConvBN(cin, cout, BLOCK_DILATION)

        self.conv1 = layer(kind == "A", in_channels, mid_channels)
        self.conv2 = layer(kind in ("S", "A"), mid_channels, out_channels)
        self.shortcut = None
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv3d(in_channels, out_channels, 1), nn.BatchNorm3d(out_channels))
        self.margin = self.conv1.margin + self.conv2.margin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = center_crop(x, self.margin)
        if self.shortcut is not None:
            residual = self.shortcut(residual)
        y = self.conv2(torch.relu(self.conv1(x)))
        return torch.relu(y + residual)


class ASPPConcat(nn.Module):
    """ASPP-c head: 4 same-padded Conv k3 (d = p = 2/6/10/14, in->width), concat, BN, ReLU, Conv k1."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 30,
                 dilations: Sequence[int] = SEED_DILATIONS):
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv3d(in_channels, width, KERNEL, padding=d, dilation=d)
                                      for d in dilations)
        self.norm = nn.BatchNorm3d(width * len(self.branches))
        self.classifier = nn.Conv3d(width * len(self.branches), num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([branch(x) for branch in self.branches], dim=1)
        return self.classifier(torch.relu(self.norm(y)))


class ASPPSum(nn.Module):
    """ASPP-s head: 4 x (same-padded Conv k3 d = p = 2/6/10/14 (in->width), BN, ReLU, Conv k1), summed."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 120,
                 dilations: Sequence[int] = SEED_DILATIONS):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv3d(in_channels, width, KERNEL, padding=d, dilation=d), nn.BatchNorm3d(width),
                          nn.ReLU(), nn.Conv3d(width, num_classes, 1))
            for d in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for branch in self.branches:
            y = branch(x)
            out = y if out is None else out + y
        return out


class AutofocusNet(PatchContract, nn.Module):
    """Basic / ASPP / AFN network of the Autofocus paper (see the module docstring).

    ``blocks``: three letters B/S/A for layers 3-5; ``head``: ``"fc"`` (Conv k1), ``"aspp_c"`` or
    ``"aspp_s"``; ``widths``: the 8 trunk widths (seed ``(30, 30, 40, 40, 40, 40, 50, 50)``);
    ``aspp_width``: ASPP branch width (seed 30 for ASPP-c, 120 for ASPP-s); ``dilations``: autofocus
    and ASPP rates (first must be 2). Input (N, C, Z, Y, X), every size >= 29; output logits
    (N, K, Z-28, Y-28, X-28).
    """

    def __init__(self, in_channels: int = 4, num_classes: int = 5, *, blocks: str = "BBB", head: str = "fc",
                 widths: Sequence[int] = SEED_WIDTHS, aspp_width: int | None = None,
                 dilations: Sequence[int] = SEED_DILATIONS, detach_attention: bool = True):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 8 or any(w < 1 for w in widths):
            raise ValueError(f"widths must be 8 positive channel counts, got {widths}")
        if len(blocks) != 3 or set(blocks) - set("BSA"):
            raise ValueError(f"blocks must be 3 letters of B, S, A, got {blocks!r}")
        if head not in ("fc", "aspp_c", "aspp_s"):
            raise ValueError(f"head must be 'fc', 'aspp_c' or 'aspp_s', got {head!r}")
        self.block_kinds = blocks
        self.head_kind = head
        self.stem = nn.Sequential(ConvBN(in_channels, widths[0]), nn.ReLU(), ConvBN(widths[0], widths[1]), nn.ReLU())
        triples = [(widths[1], widths[2], widths[3]), (widths[3], widths[4], widths[5]),
                   (widths[5], widths[6], widths[7])]
        self.blocks = nn.ModuleList(ResidualBlock(kind, *triple, dilations=dilations,
                                                  detach_attention=detach_attention)
                                    for kind, triple in zip(blocks, triples))
        if head == "fc":
            self.head = nn.Conv3d(widths[7], num_classes, 1)
        elif head == "aspp_c":
            self.head = ASPPConcat(widths[7], num_classes, aspp_width or 30, dilations)
        else:
            self.head = ASPPSum(widths[7], num_classes, aspp_width or 120, dilations)
        seed_init_(self)
        margin = self.stem[0].margin + self.stem[2].margin + sum(block.margin for block in self.blocks)
        self._set_patch_contract(3, divisor=1, margin=margin, min_input=2 * margin + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def seed_key_rules(self) -> list[tuple[str, str]]:
        """``(our prefix, seed prefix)`` pairs renaming this model's state_dict keys to the seed's
        ``models.py`` names (without DataParallel's ``module.``; DIGEST §1.5)."""
        rules = [("stem.0.conv.", "conv1."), ("stem.0.norm.", "bn1."), ("stem.2.conv.", "conv2."),
                 ("stem.2.norm.", "bn2.")]
        afn = self.head_kind == "fc" and self.block_kinds != "BBB"
        for i, block in enumerate(self.blocks):
            ours, theirs = f"blocks.{i}.", (f"layers.{i}." if afn else f"layer{3 + i}.")
            rules += [(ours + "shortcut.0.", theirs + "downsample.0."), (ours + "shortcut.1.", theirs + "downsample.1.")]
            for j, layer in ((1, block.conv1), (2, block.conv2)):
                rules.append((f"{ours}conv{j}.conv.", f"{theirs}conv{j}."))
                if isinstance(layer, ConvBN):
                    rules.append((f"{ours}conv{j}.norm.", f"{theirs}bn{j}."))
                    continue
                att = ("convatt1", "convatt2") if block.kind == "S" else (f"convatt{j}1", f"convatt{j}2")
                rules += [(f"{ours}conv{j}.attention.0.", f"{theirs}{att[0]}."),
                          (f"{ours}conv{j}.attention.2.", f"{theirs}{att[1]}.")]
                rules += [(f"{ours}conv{j}.norms.{k}.", f"{theirs}bn_list{j}.{k}.") for k in range(len(layer.norms))]
        if self.head_kind == "fc":
            rules.append(("head.", "fc."))
        elif self.head_kind == "aspp_c":
            rules += [(f"head.branches.{k}.", f"aspp.{k}.") for k in range(len(self.head.branches))]
            rules += [("head.norm.", "bn9."), ("head.classifier.", "fc9.")]
        else:
            for k in range(len(self.head.branches)):
                rules += [(f"head.branches.{k}.0.", f"conv_list.{k}."), (f"head.branches.{k}.1.", f"bn_list.{k}."),
                          (f"head.branches.{k}.3.", f"last_list.{k}.")]
        return rules

    def seed_key_map(self) -> dict[str, str]:
        """Every state_dict key of this model -> its name in the seed (no ``module.`` prefix)."""
        rules = sorted(self.seed_key_rules(), key=lambda rule: -len(rule[0]))
        mapping = {}
        for key in self.state_dict():
            for ours, theirs in rules:
                if key.startswith(ours):
                    mapping[key] = theirs + key[len(ours):]
                    break
            else:  # pragma: no cover - a structure change without a rule
                raise KeyError(f"no seed name for {key}")
        return mapping


def _build(in_channels: int, num_classes: int, blocks: str, head: str, **kwargs) -> AutofocusNet:
    return AutofocusNet(in_channels, num_classes, blocks=blocks, head=head, **kwargs)


@register_model("autofocus_basic", family="autofocus", spatial_dims=3,
                description="Autofocus paper baseline: half a DeepMedic pathway, last 6 convs dilated 2 (valid, 75->47)")
def autofocus_basic(in_channels: int, num_classes: int, **kwargs) -> AutofocusNet:
    """Basic model (see :class:`AutofocusNet`)."""
    return _build(in_channels, num_classes, "BBB", "fc", **kwargs)


@register_model("autofocus_aspp_c", family="autofocus", spatial_dims=3,
                description="Basic + ASPP head (rates 2/6/10/14), branches concatenated (valid, 75->47)")
def autofocus_aspp_c(in_channels: int, num_classes: int, **kwargs) -> AutofocusNet:
    """ASPP-c (see :class:`AutofocusNet`)."""
    return _build(in_channels, num_classes, "BBB", "aspp_c", **kwargs)


@register_model("autofocus_aspp_s", family="autofocus", spatial_dims=3,
                description="Basic + ASPP head (rates 2/6/10/14), branches summed (valid, 75->47)")
def autofocus_aspp_s(in_channels: int, num_classes: int, **kwargs) -> AutofocusNet:
    """ASPP-s (see :class:`AutofocusNet`)."""
    return _build(in_channels, num_classes, "BBB", "aspp_s", **kwargs)


def _register_afn(index: int) -> None:
    name = f"afn{index}"
    kinds = BLOCK_KINDS[name]

    def builder(in_channels: int, num_classes: int, **kwargs) -> AutofocusNet:
        return _build(in_channels, num_classes, kinds, "fc", **kwargs)

    builder.__name__ = name
    builder.__doc__ = f"AFN{index}: blocks {' '.join(kinds)} (see :class:`AutofocusNet`)."
    register_model(name, family="autofocus", spatial_dims=3,
                   description=f"Autofocus net: the last {index} dilated conv(s) replaced by autofocus convs "
                               "(rates 2/6/10/14, valid, 75->47)")(builder)
    globals()[name] = builder


for _index in range(1, 7):
    _register_afn(_index)
del _index

#: registry name of every Autofocus model, by the seed's ``--id`` (``saved_models/<id>/``).
SEED_IDS = {"Basic": "autofocus_basic", "ASPP_c": "autofocus_aspp_c", "ASPP_s": "autofocus_aspp_s",
            **{f"AFN{i}": f"afn{i}" for i in range(1, 7)}}
