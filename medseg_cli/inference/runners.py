"""Runners: run a network on a batch of patches and return class probabilities.

Two back ends share one interface:

* :class:`OnnxRunner` - ONNX Runtime (CUDA when usable, else CPU), the default for ``predict``;
* :class:`TorchRunner` - a medseg torch checkpoint (or an ``nn.Module`` with its card).

Interface::

    runner.card                          # the ModelCard
    runner.window_output_patch           # (z, y, x) voxels predicted per window ((1, py, px) for 2D)
    runner.window_margin                 # (z, y, x) context voxels per side (valid convolutions)
    runner.predict_batch(batch)          # (B, C, *input_patch) float32 -> (B, K, *output_patch) float32

``predict_batch`` applies the card's ``output_activation`` (softmax over classes, or sigmoid).
For 2D cards (``spatial_dims == 2``) batches carry a z axis of 1 that the runner squeezes.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np

from ..card import ModelCard, read_card_from_onnx
from ..errors import InputError, ModelError, MedsegWarning

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
"""Arithmetic of the torch back end: float32, or mixed precision (torch autocast) in bfloat16 / float16."""


class Runner(Protocol):
    card: ModelCard

    @property
    def window_output_patch(self) -> tuple[int, int, int]: ...

    @property
    def window_margin(self) -> tuple[int, int, int]: ...

    def predict_batch(self, batch: np.ndarray) -> np.ndarray: ...


# ------------------------------------------------------------------------------------ helpers

def physical_cores() -> int:
    """Physical CPU cores usable by this process (hyper-threads not counted), at least 1."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 1
    cores: set[tuple[str, str]] = set()
    try:
        physical = core = None
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    physical = value.strip()
                elif key == "core id":
                    core = value.strip()
                elif not key and core is not None:
                    cores.add((physical or "0", core))
                    physical = core = None
        if core is not None:
            cores.add((physical or "0", core))
    except OSError:
        pass
    logical = os.cpu_count() or usable
    threads_per_core = max(1, logical // len(cores)) if cores else 1
    return max(1, usable // threads_per_core)


def card_patches(card: ModelCard) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``(output_patch, margin)`` as 3-tuples (z, y, x) for the sliding window; 2D cards get z = 1."""
    output = list(card.output_patch or card.input_patch)
    if not output:
        raise ModelError("model card gives no patch size (input_patch / output_patch)", path=card.name,
                         hint="Re-export the model with its training patch size in the card.")
    margin = list(card.margin)
    if any(m < 0 for m in margin):
        raise ModelError(f"model card's input_patch {card.input_patch} is smaller than its output_patch "
                         f"{card.output_patch}", path=card.name)
    if card.spatial_dims == 2:
        output, margin = [1] + output, [0] + margin
    return tuple(int(v) for v in output), tuple(int(v) for v in margin)  # type: ignore[return-value]


def apply_activation(logits: np.ndarray, activation: str) -> np.ndarray:
    """Softmax over axis 1 (classes) or elementwise sigmoid, in place on a float32 array."""
    logits = np.asarray(logits, dtype=np.float32)
    if activation == "sigmoid":
        np.negative(logits, out=logits)
        np.exp(logits, out=logits)
        logits += 1.0
        np.reciprocal(logits, out=logits)
        return logits
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


def _check_batch(card: ModelCard, batch: np.ndarray, input_patch: tuple[int, ...]) -> np.ndarray:
    expected = (card.in_channels,) + tuple(input_patch)
    if batch.ndim != 5 or tuple(batch.shape[1:]) != expected:
        raise ValueError(f"batch must be (B, {', '.join(map(str, expected))}), got {tuple(batch.shape)}")
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    if card.spatial_dims == 2:
        batch = batch[:, :, 0]
    return batch


class _PatchMixin:
    card: ModelCard

    def _init_patches(self) -> None:
        self._output_patch, self._margin = card_patches(self.card)
        self.input_patch = tuple(p + 2 * m for p, m in zip(self._output_patch, self._margin))

    @property
    def window_output_patch(self) -> tuple[int, int, int]:
        return self._output_patch

    @property
    def window_margin(self) -> tuple[int, int, int]:
        return self._margin

    def _finish(self, output: np.ndarray) -> np.ndarray:
        if self.card.spatial_dims == 2:
            output = output[:, :, None]
        return output


# ------------------------------------------------------------------------------------ ONNX

def _can_load(*names: str) -> bool:
    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


@lru_cache(maxsize=1)
def onnx_cuda_usable() -> bool:
    """True when ONNX Runtime can really run on CUDA here (probed quietly, once per process).

    onnxruntime-gpu lists CUDAExecutionProvider even where no CUDA libraries exist and prints an
    error when asked for it; so first check that the CUDA runtime and cuDNN load, then that a tiny
    session really gets the provider (ORT's logging muted for the probe).
    """
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    import contextlib
    import importlib.util
    import io

    if importlib.util.find_spec("nvidia") is not None:  # CUDA from pip wheels: ORT's preloader finds them
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                ort.preload_dlls(cuda=True, cudnn=True, msvc=False)
        except Exception:  # noqa: BLE001 - older ORT, or nothing to preload
            pass
    if not (_can_load("libcudart.so.13", "libcudart.so.12", "libcudart.so")
            and _can_load("libcudnn.so.9", "libcudnn.so")):
        return False
    try:
        from onnx import TensorProto, helper

        node = helper.make_node("Identity", ["x"], ["y"])
        graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        ort.set_default_logger_severity(4)
        options = ort.SessionOptions()
        options.log_severity_level = 4
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        return "CUDAExecutionProvider" in session.get_providers()
    except Exception:  # noqa: BLE001 - any failure means: not usable
        return False
    finally:
        ort.set_default_logger_severity(3)


def _torch_cuda_usable() -> bool:
    import torch

    return bool(torch.cuda.is_available())


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(MedsegWarning(message), stacklevel=3)


def _check_device(device: str) -> str:
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r}", hint="Use --device auto, cpu or cuda.")
    return device


class OnnxRunner(_PatchMixin):
    """Run an exported medseg ONNX model (input "image", output "logits", card in the metadata).

    device: "auto" (CUDA when usable, else CPU), "cpu", or "cuda" (falls back to CPU with one
    warning line when CUDA is not usable). threads: CPU intra-op threads (default: physical cores).
    """

    def __init__(self, path: str | Path, *, device: str = "auto", threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError("ONNX model not found", path=self.path, hint="Check the path or `medseg fetch` it.")
        self.card = read_card_from_onnx(self.path)
        self._init_patches()
        device = _check_device(device)
        providers = ["CPUExecutionProvider"]
        if device in ("auto", "cuda"):
            if onnx_cuda_usable():
                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            elif device == "cuda":  # asked for explicitly: say once why it runs on CPU ("auto" stays quiet)
                _warn_once("onnx-cuda", "--device cuda: CUDA is not usable by ONNX Runtime here (needs an NVIDIA "
                                        "GPU with the CUDA runtime and cuDNN 9 libraries); running on CPU")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads) if threads else physical_cores()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as err:  # noqa: BLE001 - ORT raises its own exception types
            first = " ".join(str(err).split())[:200]
            raise ModelError(f"ONNX Runtime cannot load the model ({first})", path=self.path,
                             hint="Re-export it (opset >= 17, IR version <= 13) or re-fetch it.") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if "image" not in inputs or "logits" not in outputs:
            raise ModelError(f"ONNX model has inputs {sorted(inputs)} and outputs {outputs}; expected 'image' "
                             "and 'logits'", path=self.path, hint="Export it with `medseg export`.")
        batch_dim = inputs["image"].shape[0]
        self._fixed_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        self.providers = self.session.get_providers()
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"

    @property
    def description(self) -> str:
        return f"onnx ({self.providers[0].replace('ExecutionProvider', '')})"

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """(B, C, *input_patch) float32 -> (B, K, *output_patch) float32 probabilities."""
        inputs = _check_batch(self.card, batch, self.input_patch)
        step = self._fixed_batch or inputs.shape[0]
        parts = []
        for first in range(0, inputs.shape[0], step):
            chunk = inputs[first:first + step]
            (logits,) = self.session.run(["logits"], {"image": chunk})
            parts.append(logits)
        logits = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return self._finish(apply_activation(logits, self.card.output_activation))


# ------------------------------------------------------------------------------------ torch

class TorchRunner(_PatchMixin):
    """Run a torch ``nn.Module`` (eval mode, no gradients) described by ``card``.

    precision: "fp32" (default), or "bf16" / "fp16" = torch autocast: convolutions and matrix
    products in 16-bit floats with float32 accumulation, normalisations and softmax in float32.
    On a CPU with native bfloat16 (AVX512-BF16 or AMX) "bf16" runs 3D nets 2-3x faster than
    float32; on a CPU without it, it would be slower than float32, so the runner keeps float32 and
    says so once. "fp16" is for CUDA (CPU float16 convolutions are emulated and slow: refused).
    """

    def __init__(self, model, card: ModelCard, *, device: str = "auto", threads: int | None = None,
                 precision: str = "fp32"):
        import torch

        device = _check_device(device)
        if device in ("auto", "cuda") and _torch_cuda_usable():
            self.device = "cuda"
        else:
            if device == "cuda":
                _warn_once("torch-cuda", "torch sees no CUDA device here; running on CPU")
            self.device = "cpu"
        if threads:
            torch.set_num_threads(int(threads))
        self.card = card
        self._init_patches()
        self.precision = _effective_precision(precision, self.device)
        self.model = model.to(self.device).eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "auto", threads: int | None = None,
                        precision: str = "fp32") -> "TorchRunner":
        from ..checkpoint import load_model_from_checkpoint

        model, card = load_model_from_checkpoint(path)
        runner = cls(model, card, device=device, threads=threads, precision=precision)
        runner.path = Path(path)
        return runner

    @property
    def description(self) -> str:
        return f"torch ({self.device})" if self.precision == "fp32" else f"torch ({self.device}, {self.precision})"

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """(B, C, *input_patch) float32 -> (B, K, *output_patch) float32 probabilities."""
        import torch

        inputs = _check_batch(self.card, batch, self.input_patch)
        with torch.inference_mode():
            if self.precision == "fp32":
                logits = self.model(torch.from_numpy(inputs).to(self.device))
            else:
                dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
                with torch.autocast(self.device, dtype=dtype):
                    logits = self.model(torch.from_numpy(inputs).to(self.device))
            logits = logits.float()
            if self.card.output_activation == "sigmoid":
                probabilities = torch.sigmoid(logits)
            else:
                probabilities = torch.softmax(logits, dim=1)
            output = probabilities.cpu().numpy()
        return self._finish(output)


def cpu_has_native_bf16() -> bool:
    """Whether torch's oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 or AMX), not emulated."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - torch built without oneDNN
        return False


def _effective_precision(precision: str, device: str) -> str:
    """The precision a torch runner on ``device`` uses when ``precision`` is asked for."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}", hint="Use --precision fp32, bf16 or fp16.")
    if device == "cpu" and precision == "fp16":
        raise InputError("--precision fp16 needs CUDA: CPUs have no fast float16 convolutions",
                         hint="On CPU use --precision bf16 (native on AVX512-BF16/AMX CPUs) or fp32.")
    if device == "cpu" and precision == "bf16" and not cpu_has_native_bf16():
        _warn_once("cpu-bf16", "--precision bf16: this CPU has no native bfloat16 (AVX512-BF16/AMX), where it "
                               "would be slower than float32; running in fp32")
        return "fp32"
    return precision


# ------------------------------------------------------------------------------------ loading

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")


def load_runner(model: str | os.PathLike[str], backend: str = "onnx", device: str = "auto",
                threads: int | None = None, *, offline: bool = False, progress=None, precision: str = "fp32"):
    """A runner for ``model``: a path (.onnx, or a medseg torch checkpoint .pt/.pth/.ckpt) or a name
    from the weights manifest (resolved into the cache, downloading if needed unless ``offline``).

    backend: "onnx" or "torch"; a path's suffix decides when it is unambiguous.
    precision: "fp32", or "bf16"/"fp16" mixed precision, which needs a torch checkpoint (ONNX Runtime
    has no bfloat16 convolutions on CPU).
    """
    if backend not in ("onnx", "torch"):
        raise InputError(f"unknown backend {backend!r}", hint="Use --backend onnx or torch.")
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}", hint="Use --precision fp32, bf16 or fp16.")
    text = str(model)
    path = Path(text).expanduser()
    looks_like_path = path.suffix.lower() in (".onnx",) + TORCH_SUFFIXES or os.sep in text or path.exists()
    if looks_like_path:
        if not path.exists():
            raise ModelError("model file not found", path=path,
                             hint="Check the path, or give a model name (`medseg models` lists them).")
    else:
        try:
            from ..weights import resolve_model
        except ImportError:
            raise ModelError(f"unknown model {text!r}: the model registry is not available in this installation",
                             hint="Give the path of a .onnx model or a medseg checkpoint (.pt).") from None
        path = Path(resolve_model(text, progress=progress, offline=offline))
    if path.suffix.lower() in TORCH_SUFFIXES:
        return TorchRunner.from_checkpoint(path, device=device, threads=threads, precision=precision)
    if precision != "fp32":
        raise ModelError(f"--precision {precision} runs on the torch back end, and this model is an ONNX file",
                         path=path, hint="Give a medseg torch checkpoint (.pt) or a manifest model in torch format "
                                         "(e.g. hippocampus-torch), or use --precision fp32.")
    if backend == "torch":
        raise ModelError("the torch backend needs a medseg torch checkpoint (.pt), not an ONNX file", path=path,
                         hint="Use --backend onnx, or give the checkpoint path.")
    return OnnxRunner(path, device=device, threads=threads)
