"""Runners on real ONNX Runtime sessions and real torch modules: known-weight networks give known
outputs, ONNX and torch agree within 1e-4, 2D cards, fallbacks and bad model files."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medseg_cli.card import ModelCard
from medseg_cli.errors import MedsegWarning, ModelError
from medseg_cli.inference.runners import OnnxRunner, TorchRunner, load_runner, onnx_cuda_usable

torch.set_num_threads(1)


# ------------------------------------------------------------------------- helpers (also used by other tests)

def make_card(in_channels=1, num_classes=3, input_patch=(8, 8, 8), output_patch=None, spatial_dims=3,
              preprocessing=None, activation="softmax", architecture="unet3d", **extra) -> ModelCard:
    labels = {"0": "background", **{str(k): f"organ{k}" for k in range(1, num_classes)}}
    return ModelCard(name="tiny", architecture=architecture, in_channels=in_channels, num_classes=num_classes,
                     spatial_dims=spatial_dims, input_patch=list(input_patch),
                     output_patch=list(output_patch or input_patch), labels=labels,
                     channel_names=[f"mod{c}" for c in range(in_channels)],
                     preprocessing=preprocessing if preprocessing is not None else
                     {"roi": "none", "normalization": {"kind": "none"}},
                     output_activation=activation, **extra)


def export_tiny_onnx(model: nn.Module, card: ModelCard, path: Path) -> Path:
    """Export ``model`` with ``card`` as medseg does (input "image", output "logits", card in metadata)."""
    try:
        from exporters.onnx_export import export_onnx
    except ImportError:
        export_onnx = None
    if export_onnx is not None:
        try:
            export_onnx(model, card, path)
            return path
        except TypeError:
            pass
    import onnx

    from medseg_cli.card import write_card_to_onnx_model

    patch = list(card.input_patch)
    example = torch.zeros([1, card.in_channels] + patch)
    spatial = {i + 2: f"s{i}" for i in range(len(patch))}
    torch.onnx.export(model.eval(), (example,), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch", **spatial}, "logits": {0: "batch", **spatial}},
                      opset_version=17, dynamo=False)
    proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, 13)
    write_card_to_onnx_model(proto, card)
    onnx.save(proto, str(path))
    return path


def conv1x1_model(in_channels: int, num_classes: int, dims: int = 3, seed: int = 0) -> nn.Module:
    conv = (nn.Conv3d if dims == 3 else nn.Conv2d)(in_channels, num_classes, 1)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator))
    return conv.eval()


def valid_conv_model(num_classes: int, kernel: int = 3, seed: int = 1) -> nn.Module:
    conv = nn.Conv3d(1, num_classes, kernel, padding=0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.5)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator))
    return conv.eval()


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ------------------------------------------------------------------------- tests

def test_onnx_conv1x1_output_is_known(tmp_path):
    model = conv1x1_model(2, 3)
    card = make_card(in_channels=2, num_classes=3, input_patch=(4, 6, 8))
    runner = OnnxRunner(export_tiny_onnx(model, card, tmp_path / "m.onnx"), device="cpu")
    assert runner.card == card and runner.device == "cpu"
    assert runner.window_output_patch == (4, 6, 8) and runner.window_margin == (0, 0, 0)
    batch = np.random.default_rng(0).normal(size=(3, 2, 4, 6, 8)).astype(np.float32)
    out = runner.predict_batch(batch)
    weight = model.weight.detach().numpy()[:, :, 0, 0, 0]
    bias = model.bias.detach().numpy()
    expected = softmax(np.einsum("kc,bczyx->bkzyx", weight, batch) + bias[None, :, None, None, None], axis=1)
    assert out.shape == (3, 3, 4, 6, 8) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_valid_conv_margin_and_sigmoid(tmp_path):
    model = valid_conv_model(1)
    card = make_card(num_classes=1, input_patch=(10, 10, 10), output_patch=(8, 8, 8), activation="sigmoid")
    runner = OnnxRunner(export_tiny_onnx(model, card, tmp_path / "v.onnx"), device="cpu")
    assert runner.window_margin == (1, 1, 1) and runner.window_output_patch == (8, 8, 8)
    batch = np.random.default_rng(1).normal(size=(2, 1, 10, 10, 10)).astype(np.float32)
    out = runner.predict_batch(batch)
    with torch.no_grad():
        expected = torch.sigmoid(model(torch.from_numpy(batch))).numpy()
    assert out.shape == (2, 1, 8, 8, 8)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_onnx_and_torch_agree_on_a_zoo_unet(tmp_path):
    from medseg_cli.zoo import build_model

    torch.manual_seed(0)
    model = build_model("unet3d", 1, 3, init_features=4, num_levels=2).eval()
    card = make_card(num_classes=3, input_patch=(8, 16, 16), architecture_kwargs={"init_features": 4, "num_levels": 2})
    onnx_runner = OnnxRunner(export_tiny_onnx(model, card, tmp_path / "u.onnx"), device="cpu")
    torch_runner = TorchRunner(model, card, device="cpu")
    batch = np.random.default_rng(2).normal(size=(2, 1, 8, 16, 16)).astype(np.float32)
    a, b = onnx_runner.predict_batch(batch), torch_runner.predict_batch(batch)
    assert a.shape == b.shape == (2, 3, 8, 16, 16)
    np.testing.assert_allclose(a, b, atol=1e-4)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-5)


def test_two_dimensional_card_squeezes_z(tmp_path):
    model = conv1x1_model(3, 2, dims=2)
    card = make_card(in_channels=3, num_classes=2, input_patch=(16, 12), spatial_dims=2)
    runner = OnnxRunner(export_tiny_onnx(model, card, tmp_path / "p.onnx"), device="cpu")
    assert runner.window_output_patch == (1, 16, 12)
    batch = np.random.default_rng(3).normal(size=(2, 3, 1, 16, 12)).astype(np.float32)
    out = runner.predict_batch(batch)
    torch_out = TorchRunner(model, card, device="cpu").predict_batch(batch)
    assert out.shape == (2, 2, 1, 16, 12)
    np.testing.assert_allclose(out, torch_out, atol=1e-5)


def test_checkpoint_runner_matches_onnx(tmp_path):
    from medseg_cli.checkpoint import save_checkpoint
    from medseg_cli.zoo import build_model

    torch.manual_seed(1)
    kwargs = {"init_features": 4, "num_levels": 2}
    model = build_model("unet3d", 1, 2, **kwargs).eval()
    card = make_card(num_classes=2, input_patch=(8, 8, 8), architecture_kwargs=kwargs)
    save_checkpoint(tmp_path / "m.pt", model.state_dict(), card)
    export_tiny_onnx(model, card, tmp_path / "m.onnx")
    torch_runner = load_runner(tmp_path / "m.pt", backend="torch", device="cpu")
    onnx_runner = load_runner(str(tmp_path / "m.onnx"), backend="onnx", device="cpu")
    assert isinstance(torch_runner, TorchRunner) and isinstance(onnx_runner, OnnxRunner)
    batch = np.random.default_rng(4).normal(size=(1, 1, 8, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(torch_runner.predict_batch(batch), onnx_runner.predict_batch(batch), atol=1e-4)


def test_bad_model_files_raise_model_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_runner(tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage that is not a protobuf" * 10)
    with pytest.raises(ModelError) as info:
        OnnxRunner(corrupt, device="cpu")
    assert info.value.exit_code == 3 and str(corrupt) in str(info.value)
    # a valid ONNX graph without a card
    import onnx

    bare = tmp_path / "bare.onnx"
    export_tiny_onnx(conv1x1_model(1, 2), make_card(num_classes=2), bare)
    proto = onnx.load(str(bare))
    del proto.metadata_props[:]
    onnx.save(proto, str(bare))
    with pytest.raises(ModelError, match="card"):
        OnnxRunner(bare, device="cpu")
    with pytest.raises(ModelError, match="torch backend"):
        load_runner(tmp_path / "m.onnx" if (tmp_path / "m.onnx").exists() else
                    export_tiny_onnx(conv1x1_model(1, 2), make_card(num_classes=2), tmp_path / "m.onnx"),
                    backend="torch")


def test_cuda_request_falls_back_with_one_warning(tmp_path):
    path = export_tiny_onnx(conv1x1_model(1, 2), make_card(num_classes=2), tmp_path / "m.onnx")
    if onnx_cuda_usable():  # a machine with a usable GPU: the CUDA provider is really used
        assert OnnxRunner(path, device="cuda").providers[0] == "CUDAExecutionProvider"
        return
    from medseg_cli.inference import runners

    runners._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        automatic = OnnxRunner(path, device="auto")  # "auto" falls back silently
        assert not [w for w in caught if issubclass(w.category, MedsegWarning)]
        first = OnnxRunner(path, device="cuda")
        OnnxRunner(path, device="cuda")
    medseg_warnings = [w for w in caught if issubclass(w.category, MedsegWarning)]
    assert len(medseg_warnings) == 1 and "CPU" in str(medseg_warnings[0].message)
    assert first.providers == automatic.providers == ["CPUExecutionProvider"] and first.device == "cpu"
    # and ONNX Runtime's own red error is never printed (the probe is quiet)
    code = ("import warnings; warnings.simplefilter('ignore');"
            "from medseg_cli.inference.runners import OnnxRunner;"
            f"OnnxRunner({str(path)!r}, device='auto')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "CUDA" not in done.stdout and "Error" not in done.stderr and "Failed" not in done.stderr


def test_bf16_precision_follows_fp32_or_says_why_not(tmp_path):
    """--precision bf16: autocast on CPUs with native bfloat16 (close to float32, same labels almost
    everywhere); on other CPUs float32 is kept with one warning. fp16 on CPU is refused; mixed
    precision on an ONNX file names the torch checkpoint to use instead."""
    from medseg_cli.errors import InputError
    from medseg_cli.inference import runners
    from medseg_cli.zoo import build_model

    torch.manual_seed(3)
    kwargs = {"init_features": 8, "num_levels": 3}
    model = build_model("unet3d", 1, 3, **kwargs).eval()
    card = make_card(num_classes=3, input_patch=(16, 16, 16), architecture_kwargs=kwargs)
    batch = np.random.default_rng(5).normal(size=(2, 1, 16, 16, 16)).astype(np.float32)
    reference = TorchRunner(model, card, device="cpu").predict_batch(batch)
    runners._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mixed = TorchRunner(model, card, device="cpu", precision="bf16")
    warned = [str(w.message) for w in caught if issubclass(w.category, MedsegWarning)]
    if runners.cpu_has_native_bf16():
        assert mixed.precision == "bf16" and mixed.description == "torch (cpu, bf16)" and not warned
        out = mixed.predict_batch(batch)
        assert out.dtype == np.float32 and out.shape == reference.shape
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
        assert 0 < np.abs(out - reference).max() < 0.1  # really rounded, and still close
        assert (out.argmax(1) == reference.argmax(1)).mean() > 0.97
    else:
        assert mixed.precision == "fp32" and len(warned) == 1 and "no native bfloat16" in warned[0]
        np.testing.assert_array_equal(mixed.predict_batch(batch), reference)
    with pytest.raises(InputError, match="fp16 needs CUDA"):
        TorchRunner(model, card, device="cpu", precision="fp16")
    with pytest.raises(InputError, match="unknown precision"):
        TorchRunner(model, card, device="cpu", precision="int4")
    onnx_path = export_tiny_onnx(model, card, tmp_path / "m.onnx")
    with pytest.raises(ModelError, match="torch back end") as info:
        load_runner(onnx_path, device="cpu", precision="bf16")
    assert "hippocampus-torch" in info.value.hint and info.value.exit_code == 3
