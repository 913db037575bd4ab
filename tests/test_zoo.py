"""Every registered zoo network: builds, predicts the patch its contract promises, exports to ONNX with
parity, learns; the paper-width parameter counts; the Foveation wrapper's maths; ``medseg zoo``.

The generic tests iterate over ``list_models()``, so a new model is tested without new test code. They
build each model at a small width where its constructor allows (``SMALL``; other models at their
defaults) and use the smallest patch its ``input_patch_for`` accepts, so the suite stays fast.
Paper-width parameter counts are taken on the ``meta`` device (no memory, no forward pass).
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from exporters.onnx_export import export_onnx
from medseg_cli.card import ModelCard, read_card_from_onnx
from medseg_cli.errors import MedsegError, ModelError
from medseg_cli.zoo import build_model, get_entry, list_models
from medseg_cli.zoo.blocks import count_parameters
from medseg_cli.zoo.foveation import (
    Foveation, FoveationNet, crop_context, extract_fov_patches, fov_views, fuse_views, straight_through_argmax,
)

torch.set_num_threads(1)

IN_CHANNELS, NUM_CLASSES = 2, 3

SMALL = {
    "unet3d": {"init_features": 4},
    "vnet": {"init_features": 4},
    "vnet_la": {"base_width": 4},
    "unet2d_vgg16": {"base_width": 4},
    "unet2d_bn": {"base_width": 4},
    "attention_unet2d": {"base_width": 4},
    "foveation": {"segmenter": "unet2d_bn", "segmenter_kwargs": {"base_width": 4}},
    **{name: {"widths": [4, 4, 6, 6, 6, 6, 8, 8], "aspp_width": 4}
       for name in ("autofocus_basic", "autofocus_aspp_c", "autofocus_aspp_s", "afn1", "afn2", "afn3", "afn4",
                    "afn5", "afn6")},
}
"""Small-width kwargs per model; a model not listed is built with its defaults."""

MODEL_NAMES = [entry.name for entry in list_models()]


def _small(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, IN_CHANNELS, NUM_CLASSES, **SMALL.get(name, {}))


def _patches(model: torch.nn.Module, dims: int, start: int = 4) -> tuple[tuple, tuple] | None:
    """The smallest cubic output patch >= ``start`` the model accepts, and its input patch."""
    for size in range(start, 129, 2):
        try:
            return (size,) * dims, tuple(model.input_patch_for((size,) * dims))
        except MedsegError:
            continue
    return None


def _card(name: str, output_patch: tuple, input_patch: tuple) -> ModelCard:
    return ModelCard(name=f"test-{name}", architecture=name, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES,
                     spatial_dims=get_entry(name).spatial_dims, architecture_kwargs=SMALL.get(name, {}),
                     labels={"0": "background", "1": "a", "2": "b"}, input_patch=list(input_patch),
                     output_patch=list(output_patch))


def _centre_crop(x: torch.Tensor, size: tuple) -> torch.Tensor:
    slices = [slice((s - o) // 2, (s - o) // 2 + o) for s, o in zip(x.shape[-len(size):], size)]
    return x[(..., *slices)]


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean over classes of the soft Dice of softmax(logits) (N, K, *S) against labels (N, *S)."""
    probs = torch.softmax(logits, dim=1)
    onehot = torch.nn.functional.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    axes = (0, *range(2, logits.dim()))
    dice = (2 * (probs * onehot).sum(axes) + 1e-5) / (probs.sum(axes) + onehot.sum(axes) + 1e-5)
    return 1 - dice.mean()


# ------------------------------------------------------------------------------------------------
# every registered model


def test_the_registry_holds_every_family_we_own():
    families = {entry.family for entry in list_models()}
    assert {"unet", "vnet", "foveation"} <= families
    assert {"unet3d", "vnet", "vnet_la", "unet2d_vgg16", "unet2d_bn", "attention_unet2d", "foveation"} <= set(MODEL_NAMES)
    with pytest.raises(ModelError, match="unknown architecture"):
        build_model("no_such_net", 1, 2)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_builds_at_default_width(name):
    """Paper widths construct (on the meta device: no memory, no init cost) and declare their contract."""
    entry = get_entry(name)
    with torch.device("meta"):
        model = build_model(name, IN_CHANNELS, NUM_CLASSES)
    assert count_parameters(model) > 0
    assert entry.spatial_dims in (2, 3) and entry.description
    assert _patches(model, entry.spatial_dims) is not None, f"{name}: no output patch <= 128 is accepted"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_gives_the_promised_output_patch(name):
    model = _small(name).eval()
    dims = get_entry(name).spatial_dims
    output_patch, input_patch = _patches(model, dims)
    with torch.no_grad():
        y = model(torch.randn(2, IN_CHANNELS, *input_patch))
    assert tuple(y.shape) == (2, NUM_CLASSES, *output_patch)
    assert torch.isfinite(y).all()
    with pytest.raises(ModelError):
        model.input_patch_for((output_patch[0],) * (5 - dims))  # the other dimensionality is refused


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_onnx_export_parity_and_card(name, tmp_path):
    model = _small(name).eval()
    dims = get_entry(name).spatial_dims
    output_patch, input_patch = _patches(model, dims)
    card = _card(name, output_patch, input_patch)
    path = export_onnx(model, card, tmp_path / f"{name}.onnx", input_shape=(1, IN_CHANNELS, *input_patch))
    assert read_card_from_onnx(path) == card
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # batch 2, and a larger patch where the net allows other sizes (dynamic spatial axes)
    larger = _patches(model, dims, start=output_patch[0] + 2)
    for out, inp in [(output_patch, input_patch)] + ([larger] if larger else []):
        x = torch.randn(2, IN_CHANNELS, *inp, generator=torch.Generator().manual_seed(1))
        (onnx_out,) = session.run(["logits"], {"image": x.numpy()})
        with torch.no_grad():
            torch_out = model(x).numpy()
        assert onnx_out.shape == (2, NUM_CLASSES, *out)
        assert float(np.abs(onnx_out - torch_out).max()) <= 1e-4


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_few_adam_steps_lower_the_dice_loss(name):
    model = _small(name).train()
    dims = get_entry(name).spatial_dims
    output_patch, input_patch = _patches(model, dims)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, IN_CHANNELS, *input_patch, generator=generator)
    centre = _centre_crop(x[:, 0], output_patch)
    target = (centre > 0.5).long() + 2 * (centre < -0.5).long()  # 3 classes, a function of the input
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(6):
        optimiser.zero_grad()
        loss = soft_dice_loss(model(x), target)
        loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            assert not missing, f"parameters without gradient (DDP would fail): {missing[:5]}"
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimiser.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = float(soft_dice_loss(model(x), target))
    assert final < losses[0], f"{name}: Dice loss {losses[0]:.4f} -> {losses} -> {final:.4f}"


# ------------------------------------------------------------------------------------------------
# the papers' parameter counts at default width (DIGEST §3.2, 3.3, 4.2, 4.3, 5.1; measured in the seeds)

PAPER_COUNTS = [
    ("unet3d", 4, 3, {}, 1_022_771),
    ("unet3d", 1, 3, {}, 1_022_123),
    ("unet2d_vgg16", 3, 2, {}, 24_891_202),
    ("attention_unet2d", 3, 2, {}, 34_878_638),
    ("unet2d_bn", 3, 2, {}, 34_878_638 - 351_532),
    ("vnet", 1, 3, {}, 6_883_683),
    ("vnet_la", 1, 1, {"prelu_on_logits": True}, 10_759_306),
    ("vnet_la", 1, 1, {"prelu_on_logits": True, "attention": True}, 10_850_389),
    ("vnet_la", 1, 1, {"prelu_on_logits": True, "num_layers": 2}, 16_200_266),
]


@pytest.mark.parametrize("name,cin,cout,kwargs,expected", PAPER_COUNTS,
                         ids=[f"{n}-{i}-{o}-{'-'.join(k) or 'default'}" for n, i, o, k, _ in PAPER_COUNTS])
def test_paper_parameter_counts(name, cin, cout, kwargs, expected):
    with torch.device("meta"):
        assert count_parameters(build_model(name, cin, cout, **kwargs)) == expected


def test_foveation_parameter_count_is_segmenter_plus_the_seed_foveater():
    """Foveater for K views on C channels: convs C->8K, 8K->8K, 8K->K (3x3, no bias) + 3 affine norms."""
    with torch.device("meta"):
        net = build_model("foveation", 3, 2, segmenter="unet2d_vgg16", fov_scales=[1, 2, 4])
    k, h = 3, 24
    foveater = 9 * (3 * h + h * h + h * k) + 2 * (h + h + k)
    assert count_parameters(net.foveater) == foveater
    assert count_parameters(net) == 24_891_202 + foveater
    assert {"fov_expand_1.weight", "fov_expand_2.weight", "fov_squeeze_1.weight", "norm1.running_mean",
            "norm3.weight"} <= set(net.foveater.state_dict())


# ------------------------------------------------------------------------------------------------
# Foveation


def _foveation(fusion: str = "mean", **kwargs) -> Foveation:
    torch.manual_seed(3)
    return build_model("foveation", IN_CHANNELS, NUM_CLASSES, segmenter="unet2d_bn",
                       segmenter_kwargs={"base_width": 4}, fusion=fusion, **kwargs)


def test_foveation_weights_sum_to_one_per_location():
    net = _foveation().train()
    context = torch.randn(3, IN_CHANNELS, 128, 128)
    weights = net.fov_weights(context)
    assert weights.shape == (3, 3) and (weights > 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(3))
    # the seed's F_Xlr over a whole low-resolution image: a distribution at every pixel
    fmap = net.eval().foveation_map(torch.randn(1, IN_CHANNELS, 20, 28))
    assert fmap.shape == (1, 3, 20, 28)
    torch.testing.assert_close(fmap.sum(1), torch.ones(1, 20, 28))
    # every fusion mode's weights sum to 1 (hard ones are one-hot), in training and eval
    logits = net.fov_logits(context)
    for fusion, hard in (("mean", False), ("argmax", True), ("gumbel", False)):
        for train in (True, False):
            fused = _foveation(fusion).train(train).fusion_weights(logits)
            torch.testing.assert_close(fused.sum(1), torch.ones(3))
            if hard:
                assert set(fused.detach().unique().tolist()) <= {0.0, 1.0}
    hard_gumbel = _foveation("gumbel", gumbel_hard=True).train().fusion_weights(logits)
    assert set(hard_gumbel.detach().unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("fusion", ["mean", "argmax", "gumbel"])
def test_one_weight_at_one_gives_the_single_configuration_output(fusion):
    net = _foveation(fusion).eval()
    image = torch.randn(IN_CHANNELS, 150, 170)  # a "large" image; locations near and over its borders
    for top_left in [(0, 0), (60, 100), (140, 150)]:
        context = crop_context(image, top_left, 32, net.fov_scales)[None]
        views = extract_fov_patches(image, top_left, 32, net.fov_scales)
        torch.testing.assert_close(net.views(context)[0], views, rtol=0, atol=0)
        with torch.no_grad():
            for k in range(3):
                single = net.segmenter(views[k][None])
                onehot = torch.nn.functional.one_hot(torch.tensor([k]), 3).float()
                assert torch.equal(net(context, force_config=k), single)
                assert torch.equal(net(context, weights=onehot), single)
            chosen = int(net.fov_weights(context).argmax())
            if fusion == "argmax":  # hard selection = the single configuration of largest weight
                assert torch.equal(net(context), net.segmenter(views[chosen][None]))
    forced = _foveation(fusion, force_config=2).eval()
    with torch.no_grad():
        assert torch.equal(forced(context), forced.segmenter(views[2][None]))
    with pytest.raises(ModelError, match="force_config"):
        net(context, force_config=3)


SEGMENTERS_2D = [e.name for e in list_models() if e.spatial_dims == 2 and e.family != "foveation"]


@pytest.mark.parametrize("segmenter", SEGMENTERS_2D)
def test_foveation_wraps_every_2d_zoo_network(segmenter):
    """Any 2D zoo net is a valid segmenter: the fused forward has the patch's shape, and a one-hot
    weight reproduces the wrapped network on that single view."""
    torch.manual_seed(5)
    net = build_model("foveation", IN_CHANNELS, NUM_CLASSES, segmenter=segmenter, fov_scales=(1, 2),
                      segmenter_kwargs=SMALL.get(segmenter, {})).eval()
    context = torch.randn(2, IN_CHANNELS, *net.input_patch_for((32, 32)))
    with torch.no_grad():
        assert net(context).shape == (2, NUM_CLASSES, 32, 32)
        views = net.views(context)
        assert torch.equal(net(context, weights=torch.tensor([[0.0, 1.0]] * 2)), net.segmenter(views[:, 1]))


def test_soft_mean_is_the_weighted_average_of_the_views():
    net = _foveation("mean").eval()
    context = torch.randn(2, IN_CHANNELS, 128, 128)
    with torch.no_grad():
        weights = net.fov_weights(context)
        views = net.views(context)
        fused = sum(weights[:, k, None, None, None] * views[:, k] for k in range(3))
        torch.testing.assert_close(net(context), net.segmenter(fused))
        assert not torch.allclose(net(context), net(context, force_config=0))


def test_extract_fov_patches_are_centred_crops_resampled_to_the_patch():
    image = torch.arange(2 * 64 * 80, dtype=torch.float32).reshape(2, 64, 80)
    views = extract_fov_patches(image, (24, 30), (8, 10), fov_scales=(1, 2, 4))
    assert views.shape == (3, 2, 8, 10)
    assert torch.equal(views[0], image[:, 24:32, 30:40])  # scale 1: the output patch itself
    crop2 = image[:, 20:36, 25:45]  # 2x the patch, same centre (28, 35)
    assert torch.equal(views[1], torch.nn.functional.avg_pool2d(crop2[None], 2)[0])
    # zero padding outside the image (the seed's fov_padding), never an error
    corner = extract_fov_patches(image, (0, 0), 8, fov_scales=(1, 4))
    padded = torch.nn.functional.pad(image, (12, 0, 12, 0))[:, :32, :32]
    assert torch.equal(corner[1], torch.nn.functional.avg_pool2d(padded[None], 4)[0])
    # numpy (e.g. a memmap of a huge image) gives the same as torch; a grey (Y, X) image is one channel
    assert torch.equal(extract_fov_patches(image.numpy(), (24, 30), (8, 10)), views)
    assert extract_fov_patches(image[0].numpy(), (5, 5), 8, fov_scales=(1, 3)).shape == (2, 1, 8, 8)
    # the seed's bilinear resize is available
    bilinear = fov_views(crop_context(image, (24, 30), (8, 10), (1, 2, 4))[None], (1, 2, 4), resample="bilinear")
    assert bilinear.shape == (1, 3, 2, 8, 10) and torch.equal(bilinear[0, 0], views[0])


def test_foveation_learns_through_every_fusion_mode():
    """The foveater gets a gradient from the segmentation loss in every mode (straight-through for
    argmax, reparameterised for Gumbel), and the weights of forced configurations give none."""
    context = torch.randn(2, IN_CHANNELS, 128, 128, generator=torch.Generator().manual_seed(4))
    target = (_centre_crop(context[:, 0], (32, 32)) > 0).long()
    for fusion, extra in (("mean", {}), ("argmax", {}), ("argmax", {"hard_grad": "st"}),
                          ("gumbel", {}), ("gumbel", {"gumbel_hard": True})):
        net = _foveation(fusion, **extra).train()
        soft_dice_loss(net(context), target).backward()
        grad = net.foveater.fov_squeeze_1.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, (fusion, extra)
    net = _foveation("mean").train()
    soft_dice_loss(net(context, force_config=1), target).backward()
    assert net.foveater.fov_squeeze_1.weight.grad is None


def test_straight_through_argmax_gradients():
    probs = torch.tensor([[0.2, 0.5, 0.3]], requires_grad=True)
    hard = straight_through_argmax(probs, "st")
    assert torch.equal(hard.detach(), torch.tensor([[0.0, 1.0, 0.0]]))
    (grad,) = torch.autograd.grad((hard * torch.tensor([[1.0, 2.0, 3.0]])).sum(), probs)
    torch.testing.assert_close(grad, torch.tensor([[1.0, 2.0, 3.0]]))
    hard = straight_through_argmax(probs, "st_inv")
    (grad,) = torch.autograd.grad((hard * torch.tensor([[1.0, 2.0, 3.0]])).sum(), probs)
    torch.testing.assert_close(grad, torch.tensor([[5.0, 4.0, 10.0]]))


def test_foveation_contract_and_bad_configurations():
    net = _foveation()
    assert net.input_patch_for((32, 48)) == (128, 192)
    assert net.output_patch_for((128, 192)) == (32, 48)
    assert net.margin_for((32, 48)) == (48, 72)
    with pytest.raises(ModelError):
        net.input_patch_for((24, 32))  # the wrapped unet2d_bn needs multiples of 16
    with pytest.raises(ModelError):
        net.input_patch_for((32, 32, 32))
    with pytest.raises(ModelError, match="fov_map_scale"):
        _foveation(fov_scales=(1, 3), fov_map_scale=64).input_patch_for((32, 32))
    bad = [{"fusion": "best"}, {"fov_scales": (4, 2, 1)}, {"fov_scales": (1, 1.5)}, {"fov_scales": ()},
           {"resample": "cubic"}, {"force_config": 5}, {"hard_grad": "x"}, {"fov_norm": "layer"},
           {"fov_activation": "tanh"}, {"no_such_option": 1}]
    for kwargs in bad:
        with pytest.raises(ModelError):
            _foveation(**kwargs)
    for segmenter in ("unet3d", "vnet", "foveation", "nonexistent"):
        with pytest.raises(ModelError):
            build_model("foveation", 1, 2, segmenter=segmenter)
    with pytest.raises(ModelError, match="fusion weights"):
        fuse_views(torch.randn(2, 3, 1, 4, 4), torch.ones(2, 2))
    foveater = FoveationNet(3, 5)
    assert foveater(torch.randn(1, 3, 6, 7)).shape == (1, 5, 6, 7)
    assert foveater.norm1.bias[0].item() == pytest.approx(1e-4) and foveater.norm1.weight[0].item() == 1.0


# ------------------------------------------------------------------------------------------------
# medseg zoo


def test_medseg_zoo_lists_every_model(medseg):
    result = medseg("zoo", "--json", "--in-channels", "3", "--num-classes", "2")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert set(rows) == set(MODEL_NAMES)
    assert rows["unet2d_vgg16"]["parameters"] == 24_891_202
    assert rows["attention_unet2d"]["parameters"] == 34_878_638
    assert rows["unet3d"]["spatial_dims"] == 3 and rows["unet3d"]["family"] == "unet"
    assert all(row["description"] for row in rows.values())
    # the table, in-process (a second interpreter would only re-import torch)
    from click.testing import CliRunner

    from medseg_cli.cli import main

    table = CliRunner().invoke(main, ["zoo", "--family", "vnet", "--num-classes", "1"], terminal_width=200)
    assert table.exit_code == 0, table.output
    assert "vnet_la" in table.output and "10,759,305" in table.output and "unet2d_bn" not in table.output
    unknown = CliRunner().invoke(main, ["zoo", "--family", "nope"])
    assert unknown.exit_code == 2 and "unknown model family 'nope'" in unknown.output
