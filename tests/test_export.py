"""``medseg export CHECKPOINT -o model.onnx`` and ``exporters/onnx_export.py``: a checkpoint written by
``medseg_cli/checkpoint.py`` becomes an ONNX model with dynamic axes, its card in the metadata, and a
parity check in ONNX Runtime that refuses (and writes nothing) when ORT and torch disagree.

Small widths and patches keep it fast; the per-model export parity of the whole zoo is in test_zoo.py.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from exporters.onnx_export import dynamic_spatial_axes, export_checkpoint, export_onnx
from medseg_cli.card import ONNX_METADATA_KEY, ModelCard, read_card_from_onnx
from medseg_cli.checkpoint import load_model_from_checkpoint, save_checkpoint
from medseg_cli.errors import InputError, ModelError
from medseg_cli.zoo import build_model

torch.set_num_threads(1)

AFN_SMALL = {"widths": [4, 4, 6, 6, 6, 6, 8, 8]}


def _checkpoint(tmp_path, architecture: str, kwargs: dict, *, in_channels: int = 2, num_classes: int = 3,
                input_patch: list | None = None, output_patch: list | None = None, name: str = "ckpt.pt"):
    """A medseg checkpoint (as ``medseg train`` writes it) of a freshly built, randomised model."""
    torch.manual_seed(0)
    model = build_model(architecture, in_channels, num_classes, **kwargs)
    with torch.no_grad():  # non-trivial BN statistics, so a graph that ignores them fails parity
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    card = ModelCard(name=f"test-{architecture}", architecture=architecture, in_channels=in_channels,
                     num_classes=num_classes, spatial_dims=3, architecture_kwargs=kwargs,
                     labels={str(i): f"class{i}" for i in range(num_classes)},
                     input_patch=input_patch or [], output_patch=output_patch or [],
                     preprocessing={"normalization": {"kind": "zscore"}})
    path = save_checkpoint(tmp_path / name, model.state_dict(), card, epoch=7)
    return path, card


def _run(path, x: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": x.numpy()})[0]


def _input_dims(path) -> list:
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


def test_medseg_export_cli_on_a_checkpoint(tmp_path, medseg):
    """A valid-convolution net (margin 14): the CLI writes the ONNX file, its card, dynamic axes, parity."""
    checkpoint, card = _checkpoint(tmp_path, "afn1", AFN_SMALL, input_patch=[31, 31, 31], output_patch=[3, 3, 3])
    out = tmp_path / "models" / "m.onnx"  # a folder that does not exist yet
    result = medseg("export", checkpoint, "-o", out, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["onnx"] == str(out) and summary["opset"] == 17 and summary["bytes"] == out.stat().st_size

    proto = onnx.load(str(out))
    assert proto.ir_version <= 13 and max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    props = {p.key: p.value for p in proto.metadata_props}
    assert ONNX_METADATA_KEY == "medseg.card" and json.loads(props["medseg.card"])["architecture"] == "afn1"
    assert read_card_from_onnx(out) == card
    assert _input_dims(out) == ["batch", 2, "d0", "d1", "d2"]

    model, _ = load_model_from_checkpoint(checkpoint)
    x = torch.randn(2, 2, 33, 30, 36)  # another batch and size than traced
    onnx_out = _run(out, x)
    with torch.no_grad():
        torch_out = model(x).numpy()
    assert onnx_out.shape == (2, 3, 5, 2, 8)  # each axis loses 2 x 14 voxels
    assert np.abs(onnx_out - torch_out).max() <= 1e-4
    assert not list(tmp_path.glob("models/.medseg-partial-*"))


def test_medseg_export_cli_errors_are_one_line_with_exit_code(tmp_path, medseg):
    out = tmp_path / "m.onnx"
    missing = medseg("export", tmp_path / "nope.pt", "-o", out)
    assert missing.returncode == 3 and "nope.pt" in missing.stderr and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and not out.exists()
    not_torch = tmp_path / "scan.nii.gz"  # a newcomer's slip: an image instead of the checkpoint
    not_torch.write_bytes(b"\x1f\x8b\x08\x00" + bytes(64))
    wrong = medseg("export", not_torch, "-o", out)
    assert wrong.returncode == 3 and "is not a torch checkpoint" in wrong.stderr and not out.exists()
    # an opset torch's exporter cannot write, or an output that is a folder: refused before any export work
    checkpoint, _ = _checkpoint(tmp_path, "unet3d", {"init_features": 4}, input_patch=[16, 16, 16])
    too_new = medseg("export", checkpoint, "-o", out, "--opset", "99")
    assert too_new.returncode == 2 and "17<=x<=20" in too_new.stderr and "graph(" not in too_new.stderr
    folder = medseg("export", checkpoint, "-o", tmp_path)
    assert folder.returncode == 2 and "output path is an existing folder" in folder.stderr
    assert not out.exists() and not list(tmp_path.glob(".medseg-partial-*"))


def test_static_export_pins_the_spatial_axes_but_not_the_batch(tmp_path):
    checkpoint, _ = _checkpoint(tmp_path, "unet3d", {"init_features": 4}, input_patch=[16, 24, 16],
                                output_patch=[16, 24, 16])
    out = export_checkpoint(checkpoint, tmp_path / "static.onnx", dynamic=False)
    assert _input_dims(out) == ["batch", 2, 16, 24, 16]
    model, _ = load_model_from_checkpoint(checkpoint)
    x = torch.randn(3, 2, 16, 24, 16)
    with torch.no_grad():
        assert np.abs(_run(out, x) - model(x).numpy()).max() <= 1e-4


def test_slice_attention_depth_stays_static(tmp_path):
    """Slice attention has one weight per slice: the depth axis is pinned, height and width stay dynamic."""
    kwargs = {"init_features": 4, "attention": "pam", "depth": 16}
    checkpoint, _ = _checkpoint(tmp_path, "unet3d", kwargs, input_patch=[16, 16, 16], output_patch=[16, 16, 16])
    model, _ = load_model_from_checkpoint(checkpoint)
    assert dynamic_spatial_axes(model, 3) == [1, 2]
    out = export_checkpoint(checkpoint, tmp_path / "pam.onnx")
    assert _input_dims(out) == ["batch", 2, 16, "d1", "d2"]
    x = torch.randn(2, 2, 16, 32, 24)
    with torch.no_grad():
        assert np.abs(_run(out, x) - model(x).numpy()).max() <= 1e-4


def test_card_without_patch_uses_the_model_contract(tmp_path):
    checkpoint, _ = _checkpoint(tmp_path, "afn2", AFN_SMALL, output_patch=[2, 2, 2])
    out = export_checkpoint(checkpoint, tmp_path / "a.onnx")
    assert _run(out, torch.randn(1, 2, 30, 30, 30)).shape == (1, 3, 2, 2, 2)
    checkpoint, _ = _checkpoint(tmp_path, "vnet", {"init_features": 4}, name="v.pt")  # no patch at all
    out = export_checkpoint(checkpoint, tmp_path / "v.onnx")
    assert _run(out, torch.randn(1, 2, 32, 32, 48)).shape == (1, 3, 32, 32, 48)


class _Noisy(nn.Module):
    """Adds fresh random noise: ONNX Runtime's RandomNormalLike can never reproduce torch's draw."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.randn_like(x)


def test_parity_failure_raises_and_writes_nothing(tmp_path):
    card = ModelCard(name="noisy", architecture="noisy", in_channels=1, num_classes=1, spatial_dims=2,
                     input_patch=[8, 8], output_patch=[8, 8])
    target = tmp_path / "noisy.onnx"
    with pytest.raises(ModelError, match="disagree") as err:
        export_onnx(_Noisy(), card, target)
    assert str(target) in str(err.value) and "\n" not in str(err.value)
    assert not target.exists() and not list(tmp_path.iterdir())
    # the same model passes when parity is not asked for (proves the check is what refused it)
    export_onnx(_Noisy(), card, target, check_parity=False)
    assert target.is_file()


def test_export_refuses_bad_requests(tmp_path):
    checkpoint, card = _checkpoint(tmp_path, "unet3d", {"init_features": 4}, input_patch=[16, 16, 16])
    with pytest.raises(ModelError, match="opset"):
        export_checkpoint(checkpoint, tmp_path / "old.onnx", opset=13)
    # weights of another width than the card's kwargs
    other = build_model("unet3d", 2, 3, init_features=8)
    wrong = save_checkpoint(tmp_path / "wrong.pt", other.state_dict(), card)
    with pytest.raises(ModelError, match="do not fit"):
        export_checkpoint(wrong, tmp_path / "w.onnx")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:200])  # an interrupted download
    with pytest.raises(ModelError, match="corrupt or truncated"):
        export_checkpoint(truncated, tmp_path / "t.onnx")
    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(InputError):
        export_checkpoint(checkpoint, tmp_path / "folder.onnx")
    assert not any((tmp_path / f"{n}.onnx").exists() for n in ("old", "w", "t"))


def test_export_leaves_the_model_as_it_was(tmp_path):
    """The training loop exports at the end of a run: the mode (and device) must be restored, the
    weights and BN statistics untouched."""
    model = build_model("unet3d", 1, 2, init_features=4).train()
    model.EncoderLayer1.eval()  # e.g. a frozen stage: per-module modes survive too
    card = ModelCard(name="u", architecture="unet3d", in_channels=1, num_classes=2, spatial_dims=3,
                     architecture_kwargs={"init_features": 4}, input_patch=[16, 16, 16])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, card, tmp_path / "u.onnx")
    frozen = set(model.EncoderLayer1.modules())
    assert all(m.training == (m not in frozen) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_nearest_upsampling_exports_as_a_copy_not_resize(tmp_path):
    """A UNet's 2x nearest upsampling becomes reshape + expand in ONNX (ONNX Runtime's CPU Resize was a
    quarter of a window's time): no Resize node, the same numbers as torch, other patch sizes still run."""
    from medseg_cli.zoo.blocks import repeat_nearest

    x = torch.randn(2, 3, 5, 6, 7)
    assert torch.equal(repeat_nearest(x, (2, 2, 2)), nn.functional.interpolate(x, scale_factor=2, mode="nearest"))
    assert torch.equal(repeat_nearest(x, (1, 2, 3)), nn.functional.interpolate(x, size=(5, 12, 21), mode="nearest"))
    torch.manual_seed(0)
    kwargs = {"init_features": 4, "num_levels": 3}
    model = build_model("unet3d", 1, 2, **kwargs).eval()
    card = ModelCard(name="u", architecture="unet3d", in_channels=1, num_classes=2, input_patch=[16, 16, 16],
                     output_patch=[16, 16, 16], architecture_kwargs=kwargs)
    path = export_onnx(model, card, tmp_path / "u.onnx")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Resize" not in ops and "Expand" in ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in ((1, 1, 16, 16, 16), (2, 1, 8, 24, 32)):
        image = np.random.default_rng(1).normal(size=shape).astype(np.float32)
        with torch.no_grad():
            expected = model(torch.from_numpy(image)).numpy()
        np.testing.assert_allclose(session.run(["logits"], {"image": image})[0], expected, atol=1e-4)
