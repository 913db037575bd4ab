"""Attention modules and the UNet / VNet families: shapes, parameter counts, and the seed bugs fixed.

Full-width parameter counts are taken on the ``meta`` device (no memory, no init cost, no forward).
Forward passes use tiny widths and 16^3 / 32^3 inputs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medseg_cli.errors import ModelError
from medseg_cli.zoo import build_model, get_entry
from medseg_cli.zoo.attention import (
    CBAM, AdditiveAttentionGate, BAMChannelGate, BAMSpatialGate, ChannelSE, GridAttentionGate, ProgressiveAttention,
    ProjectExcite, SequentialBAM, SliceAttention, SpatialGate, build_attention, key_slice_mask,
)
from medseg_cli.zoo.blocks import ConvNormAct, count_parameters
from medseg_cli.zoo.unet import AttentionUNet2D, UNet2DVGG16, UNet3D
from medseg_cli.zoo.vnet import VNet, VNetLA

torch.set_num_threads(1)


def _count_on_meta(build) -> int:
    with torch.device("meta"):
        return count_parameters(build())


# ------------------------------------------------------------------------------------------------
# every single-input module keeps the input's shape


SINGLE_INPUT_3D = [
    ("se-avg", lambda: ChannelSE(8, 4, "avg")),
    ("se-max", lambda: ChannelSE(8, 4, "max")),
    ("se-both", lambda: ChannelSE(8, 4, "both")),
    ("slice", lambda: SliceAttention(8, 6, 2)),
    ("pam", lambda: ProgressiveAttention(8, 6, 2, 4)),
    ("pam-max", lambda: ProgressiveAttention(8, 6, 2, 4, pooling="both", slice_pooling="max")),
    ("pe", lambda: ProjectExcite(8, 2)),
    ("spatial-gate", lambda: SpatialGate(7, 3)),
    ("cbam", lambda: CBAM(8, 4, 3)),
    ("bam", lambda: SequentialBAM(8, dilation=2)),
    ("bam-channel", lambda: BAMChannelGate(8)),
    ("bam-spatial", lambda: BAMSpatialGate(8, dilation=3)),
]


@pytest.mark.parametrize("name,make", SINGLE_INPUT_3D, ids=[n for n, _ in SINGLE_INPUT_3D])
def test_3d_module_keeps_shape_and_backpropagates(name, make):
    torch.manual_seed(0)
    module = make().train()
    x = torch.randn(2, 8, 6, 10, 12, requires_grad=True)
    y = module(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


SINGLE_INPUT_2D = [
    ("se", lambda: ChannelSE(8, 4, "both")),
    ("pe", lambda: ProjectExcite(8, 2, dims=2)),
    ("cbam", lambda: CBAM(8, 4, dims=2, norm="batch")),
    ("bam", lambda: SequentialBAM(8, dims=2)),
]


@pytest.mark.parametrize("name,make", SINGLE_INPUT_2D, ids=[n for n, _ in SINGLE_INPUT_2D])
def test_2d_module_keeps_shape(name, make):
    x = torch.randn(2, 8, 10, 12)
    assert make()(x).shape == x.shape


def test_gates_keep_skip_shape():
    skip, gate = torch.randn(2, 8, 8, 12, 16), torch.randn(2, 16, 4, 6, 8)
    grid = GridAttentionGate(8, 16)
    with torch.no_grad():
        out, alpha = grid.forward_with_map(skip, gate)
    assert out.shape == skip.shape and alpha.shape == (2, 1, 8, 12, 16)
    assert float(alpha.min()) >= 0.0 and float(alpha.max()) <= 1.0
    additive = AdditiveAttentionGate(gate_channels=16, in_channels=8, inter_channels=4, dims=2)
    assert additive(torch.randn(2, 16, 10, 12), torch.randn(2, 8, 10, 12)).shape == (2, 8, 10, 12)


# ------------------------------------------------------------------------------------------------
# parameter counts


@pytest.mark.parametrize("channels,r,hidden", [(64, 8, 8), (16, 32, 1), (6, 4, 1)])
def test_channel_se_parameter_count_and_clamped_reduction(channels, r, hidden):
    se = ChannelSE(channels, r)
    assert se.fc[0].out_features == hidden
    assert count_parameters(se) == 2 * channels * hidden + hidden + channels


def test_slice_attention_matches_one_linear_mlp_per_channel():
    """Each channel's weights behave exactly like the seed's nn.Linear(D, D//r) -> ReLU -> nn.Linear MLP."""
    torch.manual_seed(1)
    module = SliceAttention(channels=3, slices=8, reduction=2)
    assert count_parameters(module) == 3 * (2 * 8 * 4 + 4 + 8)
    x = torch.randn(2, 3, 8, 5, 5)
    weights = module.slice_weights(x)
    for c in range(3):
        fc1, fc2 = nn.Linear(8, 4), nn.Linear(4, 8)
        with torch.no_grad():
            fc1.weight.copy_(module.w1[c]), fc1.bias.copy_(module.b1[c])
            fc2.weight.copy_(module.w2[c]), fc2.bias.copy_(module.b2[c])
        expected = torch.sigmoid(fc2(torch.relu(fc1(x[:, c].mean((2, 3))))))
        torch.testing.assert_close(weights[:, c], expected)
    torch.testing.assert_close(module(x), x * weights[..., None, None])


def test_slice_attention_with_fewer_slices_than_reduction_has_no_zero_width_layer():
    """Seed bug 3: D // r == 0 gave a zero-width Linear; r is now clamped to D."""
    module = SliceAttention(channels=4, slices=2, reduction=16)
    assert module.hidden == 1
    assert all(p.numel() > 0 for p in module.parameters())
    pam = ProgressiveAttention(4, slices=1, slice_reduction=16, channel_reduction=8)
    assert all(p.numel() > 0 for p in pam.parameters())
    x = torch.randn(2, 4, 2, 6, 6)
    y = module(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert pam(torch.randn(2, 4, 1, 6, 6)).shape == (2, 4, 1, 6, 6)


def test_project_excite_parameter_count_and_formula():
    torch.manual_seed(2)
    pe = ProjectExcite(8, reduction=2)
    assert count_parameters(pe) == 2 * 8 * 4 + 4 + 8 + 4  # two 1x1 convs with bias + PReLU(4)
    x = torch.randn(1, 8, 4, 6, 5)
    proj = (x.mean((3, 4), keepdim=True) + x.mean((2, 4), keepdim=True) + x.mean((2, 3), keepdim=True)) / 3
    expected = x * torch.sigmoid(pe.conv_cT(pe.relu(pe.conv_c(proj))))
    torch.testing.assert_close(pe(x), expected)


def test_bam_parameter_count_in_vnet_la():
    """DIGEST §5.1: BAM in the input and four down transitions adds 10,850,389 - 10,759,306 parameters."""
    added = sum(count_parameters(SequentialBAM(c)) for c in (8, 16, 32, 64, 128))
    assert added == 10_850_389 - 10_759_306


def test_unet3d_full_width_parameter_count():
    assert _count_on_meta(lambda: UNet3D(4, 3)) == 1_022_771


def test_liver_2d_unets_full_width_parameter_counts():
    assert _count_on_meta(lambda: UNet2DVGG16(3, 2)) == 24_891_202
    assert _count_on_meta(lambda: UNet2DVGG16(3, 21)) == 24_892_437  # the seed's summary file, 21 classes
    assert _count_on_meta(lambda: UNet2DVGG16(3, 2, decoder_activation=True)) == 24_891_202
    with_att = _count_on_meta(lambda: AttentionUNet2D(3, 2))
    without = _count_on_meta(lambda: AttentionUNet2D(3, 2, attention=False))
    assert with_att == 34_878_638
    assert with_att - without == 351_532  # the attention blocks (DIGEST §4.3)


def test_vnet_full_width_parameter_counts():
    assert _count_on_meta(lambda: VNet(1, 3)) == 6_883_683
    # 4 input channels: 3 more input channels of the first 5x5x5 conv (8 outputs) + the 1x1x1 identity
    # projection (4 -> 8, bias) of the first residual block
    assert _count_on_meta(lambda: VNet(4, 3)) == 6_883_683 + 3 * 8 * 125 + 4 * 8 + 8


def test_vnet_la_full_width_parameter_counts():
    seed = {"prelu_on_logits": True}
    assert _count_on_meta(lambda: VNetLA(1, 1, **seed)) == 10_759_306
    assert _count_on_meta(lambda: VNetLA(1, 1, attention=True, **seed)) == 10_850_389
    assert _count_on_meta(lambda: VNetLA(1, 1, num_layers=2, **seed)) == 16_200_266
    assert _count_on_meta(lambda: VNetLA(1, 1)) == 10_759_306 - 1  # no PReLU on the logits by default


# ------------------------------------------------------------------------------------------------
# behaviour, and the seed bugs that must stay fixed


def test_channel_se_max_pooling_is_a_max():
    """Seed bug 2: 'max' pooling was average pooling."""
    torch.manual_seed(3)
    se = ChannelSE(4, 2, "max")
    x = torch.randn(2, 4, 3, 5, 5)
    expected = x * torch.sigmoid(se.fc(x.amax((2, 3, 4))))[..., None, None, None]
    torch.testing.assert_close(se(x), expected)
    assert not torch.allclose(se(x), x * torch.sigmoid(se.fc(x.mean((2, 3, 4))))[..., None, None, None])


def test_cbam_spatial_gate_uses_the_conv_output():
    """Seed bug 7: the gate was sigmoid(x). With a zero kernel and bias b the gate must be sigmoid(b)."""
    gate = SpatialGate(kernel_size=3, dims=3, norm="none")
    with torch.no_grad():
        gate.conv.weight.zero_()
        gate.conv.bias.fill_(1.5)
    x = torch.randn(2, 4, 5, 6, 7)
    torch.testing.assert_close(gate(x), x * torch.sigmoid(torch.tensor(1.5)))
    assert not torch.allclose(gate(x), x * torch.sigmoid(x))  # what the seed computed
    # and with a non-trivial kernel the gate is the sigmoid of conv([max_c, mean_c])
    torch.manual_seed(4)
    gate = SpatialGate(kernel_size=3, dims=3, norm="none")
    pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1)
    torch.testing.assert_close(gate(x), x * torch.sigmoid(gate.conv(pooled)))


def _pam_with_identity_slice_mlp(slices: int = 4) -> ProgressiveAttention:
    """PAM whose slice weights are sigmoid(relu(slice means)): bright slices get large weights."""
    pam = ProgressiveAttention(channels=2, slices=slices, slice_reduction=1, channel_reduction=1)
    sa = pam.slice_attention
    with torch.no_grad():
        sa.w1.copy_(torch.eye(slices).expand(2, slices, slices))
        sa.w2.copy_(torch.eye(slices).expand(2, slices, slices))
        sa.b1.zero_()
        sa.b2.zero_()
    return pam


def test_pam_selects_the_heavy_slice_per_sample_and_channel():
    """Seed bug 1: the mask used view(D) (batch 1 only, first sample for all); now it is per sample."""
    pam = _pam_with_identity_slice_mlp(slices=4)
    x = torch.zeros(2, 2, 4, 3, 3)
    x[0, :, 1] = 4.0  # sample 0: slice 1 is bright in both channels
    x[1, 0, 3] = 4.0  # sample 1: slice 3 in channel 0, slice 0 in channel 1
    x[1, 1, 0] = 4.0
    out, weights, mask, channel = pam.forward_with_details(x)
    expected = torch.zeros(2, 2, 4, dtype=torch.bool)
    expected[0, :, 1] = True
    expected[1, 0, 3] = True
    expected[1, 1, 0] = True
    assert torch.equal(mask, expected)
    assert torch.equal(key_slice_mask(weights), expected)
    # the channel descriptor averages the key slices only: y on the key slice, no other slice
    y = x * weights[..., None, None]
    desc = torch.stack([y[0, :, 1].mean((1, 2)), torch.stack([y[1, 0, 3].mean(), y[1, 1, 0].mean()])])
    torch.testing.assert_close(channel, torch.sigmoid(pam.channel_attention.fc(desc)))
    torch.testing.assert_close(out, y * channel[..., None, None, None])


def test_pam_channel_descriptor_carries_gradient():
    """Seed bug 1: the descriptor came from a detached numpy copy; now d(channel weights)/dx != 0."""
    torch.manual_seed(5)
    pam = ProgressiveAttention(channels=3, slices=4, slice_reduction=2, channel_reduction=1)
    x = torch.randn(2, 3, 4, 5, 5, requires_grad=True)
    _, _, _, channel = pam.forward_with_details(x)
    (grad,) = torch.autograd.grad(channel.sum(), x)
    assert grad.abs().sum() > 0


def test_slice_attention_rejects_a_depth_it_was_not_built_for():
    with pytest.raises(ModelError, match="depth"):
        SliceAttention(4, 8)(torch.randn(1, 4, 6, 5, 5))


def _positive_spatial_gate(dilation: int) -> BAMSpatialGate:
    gate = BAMSpatialGate(4, reduction=2, dilation=dilation).eval()
    with torch.no_grad():
        for m in gate.modules():
            if isinstance(m, nn.Conv3d):
                m.weight.fill_(0.1)
                m.bias.zero_()
    return gate


def test_bam_dilation_changes_the_receptive_field():
    """Two dilated 3x3x3 convs reach 2*d voxels: an impulse is seen at offset 8 with d=4, not with d=2."""
    x = torch.zeros(1, 4, 25, 25, 25)
    x[0, :, 12, 12, 12] = 1.0
    responses = {}
    for d in (2, 4):
        gate = _positive_spatial_gate(d)
        with torch.no_grad():
            responses[d] = gate.spatial_gate(x)[0, 0] - gate.spatial_gate(torch.zeros_like(x))[0, 0]
    assert responses[4][12, 12, 20] > 0 and responses[4][12, 12, 21] == 0
    assert responses[2][12, 12, 16] > 0 and responses[2][12, 12, 17] == 0 and responses[2][12, 12, 20] == 0
    # same weights, different dilation: different outputs of the full module
    torch.manual_seed(6)
    bam2, bam4 = SequentialBAM(8, dilation=2).eval(), SequentialBAM(8, dilation=4).eval()
    bam4.load_state_dict(bam2.state_dict())
    z = torch.randn(1, 8, 12, 12, 12)
    assert not torch.allclose(bam2(z), bam4(z))


def test_bam_trains_with_batch_one():
    """Seed bug: BatchNorm1d in the channel gate raised for batch size 1 in training."""
    bam = SequentialBAM(8).train()
    x = torch.randn(1, 8, 1, 1, 1, requires_grad=True)  # also a 1x1x1 map for the spatial BNs
    bam(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    before = bam.channel_att.channel_gate[2].running_mean.clone()
    bam(torch.randn(3, 8, 4, 4, 4))  # batch > 1 trains the usual way and updates the statistics
    assert not torch.equal(before, bam.channel_att.channel_gate[2].running_mean)


def test_conv_norm_act_follows_the_layer_order():
    block = ConvNormAct(2, 4, order="cpi")
    assert list(dict(block.named_children())) == ["conv", "pReLU", "instancenorm"]
    assert block.conv.bias is not None
    block = ConvNormAct(2, 4, order="cbr")
    assert list(dict(block.named_children())) == ["conv", "batchnorm", "ReLU"] and block.conv.bias is None
    with pytest.raises(ValueError):
        ConvNormAct(2, 4, order="cx")


def test_vnet_residual_block_follows_the_layer_order():
    """The residual block's norms: a norm before the conv sees its input channels, group norm the output."""
    from medseg_cli.zoo.vnet import ResidualConvBlock

    block = ResidualConvBlock(2, 3, 4, order="icr")
    kinds = [type(m) for m in block.convblock]
    assert kinds == [nn.InstanceNorm3d, nn.Conv3d, nn.ReLU, nn.InstanceNorm3d, nn.Conv3d]
    assert block.convblock[0].num_features == 3 and block.convblock[3].num_features == 4
    assert isinstance(block.final_nolinear_activation, nn.ReLU)
    block = ResidualConvBlock(1, 3, 16, order="cgp", num_groups=8, identity_channels=3)
    assert isinstance(block.convblock[1], nn.GroupNorm) and block.convblock[1].num_groups == 8
    assert block.convblock[0].bias is None and isinstance(block.final_nolinear_activation, nn.PReLU)
    x = torch.randn(1, 3, 4, 4, 4)
    assert block(x, x).shape == (1, 16, 4, 4, 4)


# ------------------------------------------------------------------------------------------------
# attention plugged into the networks through kwargs

KINDS = ["se", "cbam", "pe", "slice", "pam", "scse", "csse", "bam"]


@pytest.mark.parametrize("kind", KINDS + ["ag"])
def test_unet3d_attention_on_every_encoder_stage(kind):
    torch.manual_seed(7)
    net = build_model("unet3d", 2, 3, init_features=4, attention=kind, attention_stages=[1, 2, 3, 4], depth=16)
    if kind == "ag":
        assert all(getattr(net, f"DecoderLayer{j}").attention_module is not None for j in (1, 2, 3))
    else:
        assert all(getattr(net, f"EncoderLayer{i}").attention is not None for i in (1, 2, 3, 4))
    x = torch.randn(2, 2, 16, 16, 16)
    y = net(x)
    assert y.shape == (2, 3, 16, 16, 16)
    y.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_unet3d_seed_pam_network_configuration():
    net = UNet3D(1, 2, init_features=4, attention=["pam", "ag"], decoder_attention=True, upsample="linear",
                 depth=16, attention_stages=[2, 3])
    assert net.EncoderLayer1.attention is None and net.EncoderLayer4.attention is None
    assert isinstance(net.EncoderLayer2.attention, ProgressiveAttention)
    assert isinstance(net.DecoderLayer3.attention, ProgressiveAttention)
    assert net.DecoderLayer3.attention.slice_attention.slices == 16  # full-resolution decoder stage
    assert net.DecoderLayer1.attention_module is not None  # gates the skip of stage 3
    assert net.DecoderLayer3.attention_module is None  # stage 1 not listed
    assert net(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


@pytest.mark.parametrize("kind", KINDS)
def test_vnet_attention_on_every_encoder_stage(kind):
    torch.manual_seed(8)
    net = build_model("vnet", 2, 3, init_features=4, attention=kind, depth=32)
    assert all(getattr(net, f"Encoder_layer{i}").attention is not None for i in (1, 2, 3, 4))
    y = net(torch.randn(1, 2, 32, 32, 32))
    assert y.shape == (1, 3, 32, 32, 32)
    y.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_attention_on_one_chosen_encoder_stage(stage):
    """``attention_stages`` picks the stage: only that encoder stage (UNet3D and VNet) gets the module,
    sized for that stage's channels and slice count."""
    unet = build_model("unet3d", 1, 2, init_features=4, attention="pam", attention_stages=[stage], depth=16)
    vnet = build_model("vnet", 1, 2, init_features=4, attention="slice", attention_stages=[stage], depth=32)
    for i in (1, 2, 3, 4):
        u, v = getattr(unet, f"EncoderLayer{i}").attention, getattr(vnet, f"Encoder_layer{i}").attention
        assert (u is not None) == (v is not None) == (i == stage)
    chosen = getattr(unet, f"EncoderLayer{stage}").attention
    assert chosen.slice_attention.channels == 4 * 2 ** (stage - 1) and chosen.slice_attention.slices == 16 // 2 ** (stage - 1)
    chosen = getattr(vnet, f"Encoder_layer{stage}").attention
    assert chosen.channels == 2 * 2 ** (stage - 1) and chosen.slices == 32 // 2 ** (stage - 1)
    with torch.no_grad():
        assert unet.eval()(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


def test_slice_attention_needs_depth_and_pins_it():
    with pytest.raises(ModelError, match="depth"):
        UNet3D(1, 2, init_features=4, attention="pam")
    with pytest.raises(ModelError, match="depth"):
        VNet(1, 2, init_features=4, attention="slice")
    with pytest.raises(ModelError, match="depth"):
        build_attention("slice", 8, dims=2, slices=4)
    net = UNet3D(1, 2, init_features=4, attention="slice", depth=16)
    assert net.input_patch_for((16, 32, 24)) == (16, 32, 24)
    with pytest.raises(ModelError, match="axis 0"):
        net.input_patch_for((24, 32, 24))
    with pytest.raises(ModelError):
        UNet3D(1, 2, attention="nonsense")
    with pytest.raises(ModelError):
        UNet3D(1, 2, attention="se", attention_stages=[5])


def test_vnet_accepts_multichannel_input():
    """Seed bug: the first residual add broadcast the input, so only 1 input channel worked."""
    net = VNet(4, 3, init_features=4).eval()
    assert net.Encoder_layer1.conv_layer.identity_projection is not None
    assert VNet(1, 3, init_features=4).Encoder_layer1.conv_layer.identity_projection is None
    with torch.no_grad():
        assert net(torch.randn(1, 4, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_vnet_la_options():
    torch.manual_seed(9)
    net = VNetLA(2, 3, base_width=4, attention=True, bam_dilation=2, dilation=2).train()
    assert net.out_transition.conv1.out_channels == 3 and net.out_transition.relu1 is None
    assert net.down_transition16.att_module.spatial_att.spatial_gate[3].dilation == (2, 2, 2)
    assert net.down_transition16.ops[0].conv1.dilation == (2, 2, 2)
    assert net.up_transition16.ops[0].conv1.dilation == (1, 1, 1)
    y = net(torch.randn(1, 2, 16, 16, 16))  # batch 1 in training: the BAM batch norms cope
    assert y.shape == (1, 3, 16, 16, 16)
    y.sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    compat = VNetLA(1, 1, base_width=4, prelu_on_logits=True)
    assert isinstance(compat.out_transition.relu1, nn.PReLU)
    # seed init: Xavier-normal Conv3d weights, zero bias; transposed convs keep PyTorch's init
    assert float(compat.input_transition.conv1.bias.detach().abs().sum()) == 0.0
    assert float(compat.up_transition16.up_conv.bias.detach().abs().sum()) > 0.0


def test_2d_unets_small_widths_and_decoder_activation():
    torch.manual_seed(10)
    x = torch.randn(2, 3, 32, 32)
    for name in ("unet2d_vgg16", "unet2d_bn", "attention_unet2d"):
        net = build_model(name, 3, 2, base_width=4)
        assert net(x).shape == (2, 2, 32, 32)
        assert net.divisor == (16, 16) and net.margin == (0, 0)
    plain = UNet2DVGG16(3, 2, base_width=4).eval()
    act = UNet2DVGG16(3, 2, base_width=4, decoder_activation=True).eval()
    act.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert not torch.allclose(plain(x), act(x))


def test_patch_contract_and_registry():
    expected = {"unet3d": (3, (8, 8, 8)), "vnet": (3, (16, 16, 16)), "vnet_la": (3, (16, 16, 16)),
                "unet2d_vgg16": (2, (16, 16)), "unet2d_bn": (2, (16, 16)), "attention_unet2d": (2, (16, 16))}
    small = {"unet3d": {"init_features": 4}, "vnet": {"init_features": 4}, "vnet_la": {"base_width": 4}}
    for name, (dims, divisor) in expected.items():
        entry = get_entry(name)
        assert entry.spatial_dims == dims
        net = build_model(name, 1, 2, **small.get(name, {"base_width": 4}))
        assert net.divisor == divisor and net.margin == (0,) * dims
        patch = tuple(2 * d for d in divisor)
        assert net.input_patch_for(patch) == patch
        with pytest.raises(ModelError, match="multiple"):
            net.input_patch_for(tuple(d + 4 for d in patch))
    with pytest.raises(ModelError, match="at least"):
        build_model("vnet", 1, 2, init_features=4).input_patch_for((16, 32, 32))
