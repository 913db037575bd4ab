"""Foveation models in tile streaming and the foveation map (issue 8, Foveation section).

A small foveation model (fixed seed, tiny widths; its last layers scaled so that both labels and all
three views occur) is exported to ONNX with its second output ``fov_weights``. On a 300 x 320 crop of a
real DRIVE fundus photograph (as an uncompressed .mha with a non-trivial geometry) the streamed
prediction with 64-pixel tiles -- each window reading a 128-pixel context, 48 pixels beyond its
output on every side -- must give exactly the whole-image labels, and so must the map of the view
chosen per location; the map at each window's centre must be the view torch's foveation net gives
that window."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import SimpleITK as sitk
import torch

from conftest import run_medseg
from exporters.onnx_export import export_onnx
from medseg_cli.card import ModelCard
from medseg_cli.errors import ModelError
from medseg_cli.imaging import Geometry, read_image
from medseg_cli.inference.foveation_map import FoveationMapRunner, foveation_map_predictor
from medseg_cli.inference.predictor import Predictor
from medseg_cli.inference.runners import TorchRunner, load_runner
from medseg_cli.inference.sliding_window import window_starts
from medseg_cli.inference.streaming import stream_predict
from medseg_cli.preprocessing import Preprocessor
from medseg_cli.zoo import build_model

from test_runners import export_tiny_onnx, make_card

torch.set_num_threads(1)

PATCH = (32, 32)                        # output pixels per window; the context is 4 x larger per side
KWARGS = {"segmenter": "unet2d_bn", "segmenter_kwargs": {"base_width": 4}, "fov_scales": [1, 2, 4],
          "width_factor": 2}
CROP = (slice(100, 400), slice(100, 420))  # 300 x 320 pixels of DRIVE test image 01


@pytest.fixture(scope="module")
def picture(shared_data, tmp_path_factory) -> Path:
    rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "drive" / "test" / "images" / "01_test.png")))
    image = sitk.GetImageFromArray(np.ascontiguousarray(rgb[CROP]), isVector=True)
    image.SetSpacing((0.5, 0.7))
    image.SetOrigin((3.0, -2.0))
    image.SetDirection((0.0, 1.0, 1.0, 0.0))
    path = tmp_path_factory.mktemp("fov_picture") / "fundus.mha"
    sitk.WriteImage(image, str(path), False)
    return path


def _card(net) -> ModelCard:
    return make_card(in_channels=3, num_classes=2, input_patch=net.input_patch_for(PATCH), output_patch=PATCH,
                     spatial_dims=2, architecture="foveation", architecture_kwargs=KWARGS,
                     preprocessing={"roi": "none", "normalization": {"kind": "zscore"}})


def _contexts(net, picture: Path) -> torch.Tensor:
    """Contexts of a grid of windows inside the picture, normalised as predict does."""
    volume, _, _ = Preprocessor.from_dict(_card(net).preprocessing).forward(read_image(picture))
    x = torch.from_numpy(np.ascontiguousarray(volume[:, 0]))
    return torch.stack([x[:, y:y + 128, z:z + 128] for y in range(0, 172, 43) for z in range(0, 192, 48)])


@pytest.fixture(scope="module")
def model(picture, tmp_path_factory):
    """(torch net, card, ONNX path): random weights (seed 0), then the segmenter's logits spread and centred
    on this picture (both labels) and the foveation logits sharpened (all three views win somewhere)."""
    torch.manual_seed(0)
    net = build_model("foveation", 3, 2, **KWARGS).eval()
    contexts = _contexts(net, picture)
    last = [m for m in net.segmenter.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.mul_(300.0)
        net.foveater.norm3.weight.mul_(10.0)
        logits = net(contexts)
        last.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    card = _card(net)
    path = export_onnx(net, card, tmp_path_factory.mktemp("fov_model") / "foveation.onnx")
    return net, card, path


def test_export_carries_the_fusion_weights_beside_the_logits(model, picture):
    net, _, path = model
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "fov_weights"]
    contexts = _contexts(net, picture)
    logits, weights = session.run(None, {"image": contexts.numpy()})
    with torch.no_grad():
        torch_logits, torch_weights = net.forward_with_weights(contexts)
    assert np.allclose(weights, torch_weights.numpy(), atol=1e-5)
    assert np.allclose(weights.sum(1), 1.0, atol=1e-5)
    assert len(set(weights.argmax(1).tolist())) == 3            # every view is chosen somewhere
    assert np.allclose(logits, torch_logits.numpy(), atol=1e-3 * max(1.0, float(np.abs(logits).max())))
    # the runner reads "logits" by name: the extra output changes nothing for it
    runner = load_runner(str(path), threads=1)
    probabilities = runner.predict_batch(contexts.numpy()[:, :, None])
    assert probabilities.shape == (len(contexts), 2, 1) + PATCH
    assert np.allclose(probabilities[:, :, 0], torch.softmax(torch_logits, 1).numpy(), atol=1e-4)


@pytest.mark.parametrize("batch", [1, 5])
def test_streamed_foveation_labels_and_map_equal_the_whole_image(model, picture, tmp_path, batch):
    _, _, path = model
    predictor = Predictor(load_runner(str(path), threads=1), overlap=0.5, batch_size=batch)
    whole = predictor.predict(read_image(picture))
    rows = stream_predict(predictor, picture, tmp_path / "mask.mha", tile=64)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "mask.mha")))
    assert np.array_equal(labels, whole.labels.array)
    assert set(np.unique(labels).tolist()) == {0, 1} and rows == whole.rows

    mapper = foveation_map_predictor(predictor)
    whole_map = mapper.predict(read_image(picture)).labels.array
    stream_predict(mapper, picture, tmp_path / "map.mha", tile=64)
    written = sitk.ReadImage(str(tmp_path / "map.mha"))
    assert np.array_equal(sitk.GetArrayFromImage(written), whole_map)
    assert set(np.unique(whole_map).tolist()) == {0, 1, 2}
    assert Geometry.from_sitk(written) == read_image(picture).geometry


def test_map_at_each_window_centre_is_the_view_the_net_chose(model, picture):
    """Gaussian blending weighs a window's centre ~3000 x more than its neighbours' edges (sigma = P/8),
    so the map there is that window's own choice, computed here by torch on the same context."""
    net, card, path = model
    predictor = Predictor(load_runner(str(path), threads=1), overlap=0.5, batch_size=8)
    fov_map = foveation_map_predictor(predictor).predict(read_image(picture)).labels.array[0]
    volume, _, _ = predictor.preprocessor.forward(read_image(picture))
    x = torch.from_numpy(np.ascontiguousarray(volume[:, 0]))
    margin = (128 - PATCH[0]) // 2
    padded = torch.nn.functional.pad(x, (margin,) * 4)                 # constant 0, as the window pads
    height, width = fov_map.shape
    starts = [(y, z) for y in window_starts(0, height, PATCH[0], height, 0.5)
              for z in window_starts(0, width, PATCH[1], width, 0.5)]
    contexts = torch.stack([padded[:, y:y + 128, z:z + 128] for y, z in starts])
    with torch.no_grad():
        weights = net.fov_weights(contexts).numpy()
    top = np.sort(weights, axis=1)
    clear = top[:, -1] - top[:, -2] > 0.02                                # no near-ties
    centres = np.array([fov_map[y + PATCH[0] // 2, z + PATCH[1] // 2] for y, z in starts])
    assert clear.sum() > 0.8 * len(starts)
    assert np.array_equal(centres[clear], weights.argmax(1)[clear])


def test_torch_checkpoint_gives_the_same_map_as_onnx(model, picture):
    net, card, path = model
    onnx_map = foveation_map_predictor(Predictor(load_runner(str(path), threads=1), batch_size=4)) \
        .predict(read_image(picture)).labels.array
    torch_map = foveation_map_predictor(Predictor(TorchRunner(net, card, device="cpu", threads=1), batch_size=4)) \
        .predict(read_image(picture)).labels.array
    assert np.mean(onnx_map == torch_map) > 0.999                         # float32 kernels: ties may differ


def test_forced_view_fuses_exactly_that_view_and_reports_it():
    torch.manual_seed(1)
    net = build_model("foveation", 3, 2, force_config=2, **KWARGS).eval()
    context = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        logits, weights = net.forward_with_weights(context)
        assert torch.equal(weights, torch.tensor([[0.0, 0.0, 1.0]] * 2))
        assert torch.allclose(logits, net.segmenter(net.views(context)[:, 2]), atol=1e-6)


def test_cli_writes_the_map_in_the_input_geometry_streamed_or_not(model, picture, tmp_path):
    _, _, path = model
    whole = run_medseg("predict", picture, "-o", tmp_path / "mask.mha", "-m", path, "--no-stream",
                       "--foveation-map", tmp_path / "map.nrrd", "--threads", "1", "--batch", "8", "--json")
    assert whole.returncode == 0, whole.stderr
    streamed = run_medseg("predict", picture, "-o", tmp_path / "mask_s.mha", "-m", path, "--stream",
                          "--foveation-map", tmp_path / "map_s.png", "--threads", "1", "--batch", "8", "-q")
    assert streamed.returncode == 0, streamed.stderr  # streamed into a scratch .mha, converted to PNG at the end
    first, second = read_image(tmp_path / "map.nrrd"), read_image(tmp_path / "map_s.png")
    assert np.array_equal(first.array, second.array) and set(np.unique(first.array).tolist()) == {0, 1, 2}
    assert first.geometry == read_image(picture).geometry
    assert second.spatial_shape == first.spatial_shape  # PNG keeps the pixel grid (it stores no origin/spacing)
    import json

    row = json.loads(whole.stdout)["cases"][0]
    assert [v["label"] for v in row["views"]] == [0, 1, 2]
    assert sum(v["voxels"] for v in row["views"]) == 300 * 320
    assert row["views"][2]["name"] == "view 2: 128 px at 1/4"
    assert [v["voxels"] for v in row["views"]] == [int((first.array == k).sum()) for k in range(3)]


def test_map_of_a_model_without_views_is_refused_in_one_line(tmp_path, picture):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, padding=1)).eval()
    card = make_card(in_channels=3, num_classes=2, input_patch=(32, 32), spatial_dims=2, architecture="unet2d")
    plain = export_tiny_onnx(net, card, tmp_path / "plain.onnx")
    with pytest.raises(ModelError, match="fov_weights"):
        FoveationMapRunner(load_runner(str(plain), threads=1))
    result = run_medseg("predict", picture, "-o", tmp_path / "mask.mha", "-m", plain,
                        "--foveation-map", tmp_path / "map.mha")
    assert result.returncode == 3
    assert "fov_weights" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "mask.mha").exists()                         # refused before any work
