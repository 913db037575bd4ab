"""Autofocus family (DIGEST §1): parameter counts, valid-convolution shapes, the autofocus convolution,
the converter of the authors' checkpoints, ONNX export parity, and a few training steps.

Inputs are (29 + d)^3-sized so the 28-voxel margin leaves d^3 outputs; every model runs at paper width.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medseg_cli.card import read_card_from_onnx
from medseg_cli.errors import ModelError
from medseg_cli.preprocessing import Preprocessor
from medseg_cli.training.losses import cross_entropy, soft_dice
from medseg_cli.weights.manifest import load_manifest
from medseg_cli.zoo import build_model, get_entry, list_models
from medseg_cli.zoo.autofocus import AutofocusConv3d, AutofocusNet, ConvBN, SEED_IDS
from medseg_cli.zoo.blocks import count_parameters
from exporters.autofocus_original import (
    autofocus_card, convert, load_original_checkpoint, original_state_dict, read_original_checkpoint,
    resolve_architecture,
)

torch.set_num_threads(1)

NAMES = list(SEED_IDS.values())

# The digest's measured counts (DIGEST §1.2-1.4) and the input channels that reproduce them exactly: 4 (BRATS
# modalities) for all but AFN3/4/5, whose numbers are those of 3 input channels, the seed ModelBuilder's
# default num_input=4 (the digest does not say so; the gap is exactly 30 x 27 = 810, one first-layer input
# channel; see medseg_cli/zoo/autofocus.py).
DIGEST_COUNTS = {
    "autofocus_basic": (4, 315_725), "autofocus_aspp_c": (4, 478_435), "autofocus_aspp_s": (4, 967_330),
    "afn1": (4, 349_904), "afn2": (4, 371_908), "afn3": (3, 393_042), "afn4": (3, 414_986), "afn5": (3, 436_930),
    "afn6": (4, 450_209),
}
FIRST_CONV_PER_CHANNEL = 30 * 27  # one more input channel of the 3x3x3 conv 1 (30 filters)


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BN statistics, so a wrong mapping or a skipped buffer shows in the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if not value.is_floating_point():
                continue
            noise = torch.rand(value.shape, generator=generator)
            if key.endswith("running_var") or key.endswith("norm.weight") or ".norms." in key and key.endswith("weight"):
                value.copy_(0.5 + noise)
            else:
                value.copy_((noise - 0.5) * 0.1)
    return model


def _authors_checkpoint(model: AutofocusNet, folder, seed_id: str, epoch: int = 390, drop_counters: bool = False):
    """An authors'-layout ``saved_models/<id>/<epoch>_checkpoint.pth.tar`` holding ``model``'s weights."""
    state = original_state_dict(model)
    if drop_counters:  # what PyTorch 0.3 wrote
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = folder / "saved_models" / seed_id / f"{epoch}_checkpoint.pth.tar"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": epoch, "state_dict": state, "opt_dict": {"state": {}, "param_groups": []}}, path)
    return path


# ------------------------------------------------------------------------------------------------ registry


def test_registry_lists_the_nine_models_as_3d_autofocus():
    names = {e.name for e in list_models() if e.family == "autofocus"}
    assert names == set(NAMES)
    assert all(get_entry(n).spatial_dims == 3 for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_equals_the_digest(name):
    in_channels, expected = DIGEST_COUNTS[name]
    assert count_parameters(build_model(name, in_channels, 5)) == expected
    # and with the other channel count, one first-layer input channel more or less
    other = 7 - in_channels
    assert count_parameters(build_model(name, other, 5)) == expected + (other - in_channels) * FIRST_CONV_PER_CHANNEL


def test_block_swaps_add_the_parameters_of_their_autofocus_layers():
    """AFN2->AFN3 and AFN4->AFN5 both turn a B block into an S block with (mid, out) = (40, 40): one
    attention branch (Conv k3 40->20, Conv k1 20->4) and three more BatchNorms(40)."""
    c = {n: count_parameters(build_model(n, 4, 5)) for n in ("afn2", "afn3", "afn4", "afn5")}
    assert c["afn3"] - c["afn2"] == c["afn5"] - c["afn4"] == 3 * 80 + (40 * 20 * 27 + 20) + (20 * 4 + 4)


def test_seed_initialisation():
    torch.manual_seed(0)
    model = build_model("afn6", 4, 5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
    weights = torch.cat([m.weight.flatten() for m in convs])
    assert abs(weights.std().item() - 0.01) < 5e-4 and abs(weights.mean().item()) < 5e-4
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


# ------------------------------------------------------------------------------------------------ shapes


def test_patch_contract():
    model = build_model("afn1", 4, 5)
    assert model.margin == (14, 14, 14) and model.divisor == (1, 1, 1)
    assert model.input_patch_for((47, 47, 47)) == (75, 75, 75)
    assert model.input_patch_for((1, 2, 9)) == (29, 30, 37)
    with pytest.raises(ModelError):
        model.input_patch_for((47, 47))


@pytest.mark.parametrize("name", NAMES)
def test_forward_loses_28_voxels_per_axis(name):
    model = build_model(name, 4, 5).eval()
    x = torch.randn(1, 4, 29, 30, 31)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 5, 1, 2, 3)
    assert torch.isfinite(y).all()
    assert tuple(s + 2 * m for s, m in zip(y.shape[2:], model.margin)) == tuple(x.shape[2:])


def test_other_widths_and_channels():
    model = build_model("afn2", 2, 3, widths=(4, 4, 6, 6, 6, 6, 8, 8))
    assert model(torch.randn(2, 2, 30, 30, 30)).shape == (2, 3, 2, 2, 2)
    with pytest.raises(ModelError):
        build_model("afn2", 2, 3, depth=3)  # unknown kwarg: a ModelError naming the model


# ------------------------------------------------------------------------------------------------ autofocus conv


def test_autofocus_conv_shares_one_weight_over_four_branches():
    layer = AutofocusConv3d(6, 8)
    names = dict(layer.named_parameters())
    kernels = [n for n, p in names.items() if p.dim() == 5 and not n.startswith("attention")]
    assert kernels == ["conv.weight"] and names["conv.weight"].shape == (8, 6, 3, 3, 3)
    assert [type(m) for m in layer.norms] == [nn.BatchNorm3d] * 4
    assert layer.dilations == (2, 6, 10, 14) and layer.paddings == (0, 4, 8, 12)
    assert names["attention.0.weight"].shape == (3, 6, 3, 3, 3) and names["attention.2.weight"].shape == (4, 3, 1, 1, 1)


@pytest.mark.parametrize("branch", [0, 1, 2, 3])
def test_each_branch_is_the_shared_weight_at_its_dilation(branch):
    """Force the attention onto one branch: the output must be that branch's BN of the shared-weight
    convolution at its dilation on the zero-padded input (bias on branch 0 only, as the seed)."""
    torch.manual_seed(branch)
    layer = _randomise(AutofocusConv3d(3, 4), seed=branch).eval()
    with torch.no_grad():
        layer.attention[2].weight.zero_()
        layer.attention[2].bias.copy_(torch.tensor([-50.0] * 4).index_fill(0, torch.tensor(branch), 50.0))
    x = torch.randn(2, 3, 12, 11, 10)
    dilation, padding = (2, 6, 10, 14)[branch], (0, 4, 8, 12)[branch]
    padded = F.pad(x, (padding,) * 6)
    bias = layer.conv.bias if branch == 0 else None
    expected = layer.norms[branch](F.conv3d(padded, layer.conv.weight, bias, dilation=dilation))
    with torch.no_grad():
        out = layer(x)
    assert out.shape == (2, 4, 8, 7, 6) == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_single_rate_autofocus_conv_is_a_plain_dilated_conv():
    torch.manual_seed(0)
    af = AutofocusConv3d(3, 5, dilations=(2,))
    plain = ConvBN(3, 5, dilation=2)
    plain.conv.load_state_dict(af.conv.state_dict())
    x = torch.randn(2, 3, 9, 9, 9)
    torch.testing.assert_close(af(x), plain(x))  # training mode: batch statistics


def test_attention_weights_sum_to_one_over_branches():
    layer = _randomise(AutofocusConv3d(6, 4))
    x = torch.randn(2, 6, 10, 9, 8)
    att = layer.attention_weights(x)
    assert att.shape == (2, 4, 6, 5, 4) and torch.all(att >= 0)
    torch.testing.assert_close(att.sum(dim=1), torch.ones(2, 6, 5, 4))
    assert att.std(dim=1).max() > 1e-3  # not uniform: the attention depends on the input


@pytest.mark.parametrize("detach", [True, False])
def test_attention_sees_the_detached_input(detach):
    """With a zero kernel every branch is BN(constant) = beta_k; the output then depends on the input
    only through the attention, so the input gets a gradient only when the attention is not detached."""
    layer = _randomise(AutofocusConv3d(4, 3, detach_attention=detach)).train()
    with torch.no_grad():
        layer.conv.weight.zero_()
        for k, norm in enumerate(layer.norms):
            norm.bias.fill_(float(k))
    x = torch.randn(2, 4, 9, 9, 9, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.attention[0].weight.grad.abs().sum() > 0  # the attention itself still learns
    input_grad = 0.0 if x.grad is None else x.grad.abs().sum().item()
    assert (input_grad == 0.0) == detach


# ------------------------------------------------------------------------------------------------ converter


@pytest.mark.parametrize("seed_id", list(SEED_IDS))
def test_authors_checkpoint_round_trip(seed_id, tmp_path):
    name = SEED_IDS[seed_id]
    model = _randomise(build_model(name, 4, 5), seed=3).eval()
    path = _authors_checkpoint(model, tmp_path, seed_id, drop_counters=seed_id == "AFN1")
    state, epoch = read_original_checkpoint(path)
    assert epoch == 390 and all(k.startswith("module.") for k in state)
    loaded = load_original_checkpoint(path, seed_id)
    assert not loaded.training and isinstance(loaded, AutofocusNet)
    x = torch.randn(1, 4, 30, 29, 31)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_authors_key_names():
    keys = set(original_state_dict(build_model("afn1", 4, 5)))
    for key in ("module.conv1.weight", "module.bn2.running_var", "module.layers.0.downsample.1.weight",
                "module.layers.2.conv2.weight", "module.layers.2.bn_list2.3.running_mean",
                "module.layers.2.convatt1.weight", "module.layers.2.convatt2.bias", "module.fc.weight"):
        assert key in keys
    af6 = set(original_state_dict(build_model("afn6", 4, 5)))
    assert {"module.layers.0.convatt11.weight", "module.layers.0.convatt22.bias", "module.layers.1.bn_list1.0.weight"} <= af6
    basic = set(original_state_dict(build_model("autofocus_basic", 4, 5)))
    assert {"module.layer3.downsample.0.weight", "module.layer5.bn2.bias"} <= basic and "module.layer4.downsample.0.weight" not in basic
    aspp_c = set(original_state_dict(build_model("autofocus_aspp_c", 4, 5)))
    assert {"module.aspp.3.weight", "module.bn9.running_mean", "module.fc9.bias"} <= aspp_c
    aspp_s = set(original_state_dict(build_model("autofocus_aspp_s", 4, 5)))
    assert {"module.conv_list.0.weight", "module.bn_list.2.weight", "module.last_list.3.bias"} <= aspp_s
    shapes = {k: tuple(v.shape) for k, v in original_state_dict(build_model("afn1", 4, 5)).items()}
    assert shapes["module.layers.2.convatt1.weight"] == (25, 50, 3, 3, 3)
    assert shapes["module.layers.2.convatt2.weight"] == (4, 25, 1, 1, 1)
    assert shapes["module.layers.2.downsample.0.weight"] == (50, 40, 1, 1, 1)


def test_converter_rejects_checkpoints_that_do_not_fit(tmp_path):
    path = _authors_checkpoint(build_model("afn1", 4, 5), tmp_path, "AFN1")
    with pytest.raises(ModelError, match="missing .*layers.2.bn_list1"):
        load_original_checkpoint(path, "AFN2")  # wrong architecture
    state = original_state_dict(build_model("afn1", 4, 5))
    state["module.layers.2.extra.weight"] = torch.zeros(1)
    del state["module.fc.bias"]
    bad = tmp_path / "bad.pth.tar"
    torch.save({"epoch": 1, "state_dict": state}, bad)
    with pytest.raises(ModelError) as err:
        load_original_checkpoint(bad, "afn1")
    assert "fc.bias" in str(err.value) and "layers.2.extra.weight" in str(err.value) and str(bad) in str(err.value)
    text = tmp_path / "notes.pth.tar"
    text.write_text("not a checkpoint")
    with pytest.raises(ModelError, match="cannot read"):
        load_original_checkpoint(text, "afn1")
    with pytest.raises(ModelError, match="not an Autofocus architecture"):
        resolve_architecture("unet3d")
    assert resolve_architecture("ASPP_c") == resolve_architecture("aspp-c") == "autofocus_aspp_c"


@pytest.mark.parametrize("seed_id", ["Basic", "AFN1"])
def test_convert_to_onnx_with_card_and_dynamic_parity(seed_id, tmp_path):
    import onnxruntime as ort

    entry = load_manifest().get(seed_id)  # the real manifest entry, as `medseg fetch` passes it
    model = _randomise(build_model(SEED_IDS[seed_id], 4, 5), seed=5).eval()
    checkpoint = _authors_checkpoint(model, tmp_path, seed_id, epoch=380)
    out = convert(checkpoint, tmp_path / f"{seed_id}.onnx", entry, input_shape=(1, 4, 31, 31, 31))
    card = read_card_from_onnx(out)
    assert card.name == seed_id and card.architecture == SEED_IDS[seed_id]
    assert (card.in_channels, card.num_classes, card.spatial_dims) == (4, 5, 3)
    assert card.channel_names == ["Flair", "T1", "T1c", "T2"]
    assert card.labels == {"0": "background", "1": "necrosis", "2": "edema", "3": "non-enhancing tumour",
                           "4": "enhancing tumour"}
    assert card.input_patch == [75, 75, 75] and card.output_patch == [47, 47, 47] and card.margin == [14] * 3
    assert card.preprocessing["normalization"]["kind"] == "autofocus" and card.training["epoch"] == 380
    Preprocessor.from_dict(card.preprocessing)  # the card's preprocessing is one medseg can run
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    x = torch.randn(2, 4, 33, 30, 29)  # another batch and shape than traced: dynamic axes
    (onnx_out,) = session.run(["logits"], {"image": x.numpy()})
    with torch.no_grad():
        torch_out = model(x).numpy()
    assert onnx_out.shape == (2, 5, 5, 2, 1)
    assert np.max(np.abs(onnx_out - torch_out)) < 1e-4


def test_card_without_manifest_entry():
    card = autofocus_card("AFN6", epoch=None)
    assert card.name == "AFN6" and card.architecture == "afn6" and card.input_patch == [75, 75, 75]


# ------------------------------------------------------------------------------------------------ training


def test_afn1_learns_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model("afn1", 4, 5).train()
    x = torch.randn(2, 4, 32, 32, 32)
    target = torch.randint(0, 5, (2, 4, 4, 4))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        optimiser.zero_grad()
        logits = model(x)
        loss = cross_entropy(logits, target) + soft_dice(logits, target)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    shared = model.blocks[2].conv2
    assert shared.conv.weight.grad is not None and shared.attention[0].weight.grad.abs().sum() > 0
