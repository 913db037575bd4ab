"""Foveation (DIGEST §2): a learnable choice, per location, between K field-of-view / resolution trade-offs.

For every output patch of P x P pixels (``P`` = the wrapped segmenter's patch), K candidate views share
the patch's centre but cover ``s_k * P`` pixels (``fov_scales`` s_k, ascending, e.g. 1, 2, 4) and are
all resampled to P x P, so a larger field of view means a lower resolution. A small CNN, the
foveation net, predicts a distribution over the K views for the location; the views are fused with it
(soft mean, straight-through argmax, or Gumbel-softmax) and the segmenter predicts the P x P labels
from the fused view.

The network consumes the **context patch** (the largest view, ``s_max * P`` pixels square) and returns
logits for its central P x P pixels, so to the sliding window and the training loop it is just a
"valid convolution" net: ``input_patch_for((P, P)) == (s_max * P, s_max * P)``; that is all the
sliding window and ``medseg predict --stream`` use. The same maths is also available piecewise, one
location at a time:

* :func:`crop_context` / :func:`extract_fov_patches` -- pure helpers: cut the context of one location
  out of a large image (torch tensor or numpy array / memmap, zero-padded at the borders, the seed's
  ``fov_padding``) and resample it into the K views (K, C, P, P);
* :meth:`Foveation.fov_weights` -- the (N, K) distribution of a context patch;
* :meth:`Foveation.foveation_map` -- the seed's F_Xlr: (N, K, h, w) over a whole low-resolution image;
* :meth:`Foveation.forward_views` -- fuse given views with given weights and segment;
* :meth:`Foveation.forward_with_weights` -- the logits and the (N, K) fusion weights that were applied:
  the ONNX export carries them as a second output ``fov_weights``, from which ``medseg predict
  --foveation-map`` draws the view chosen at every pixel (``medseg_cli.inference.foveation_map``).

Differences from the seed (lxasqjc/Foveation-Segmentation), all deliberate:

* the foveation weights of a patch are read at the patch **centre** of the low-resolution map (the
  seed read F_Xlr at the cell of the patch's top-left corner, P0/2 away from what it selects for);
* views are resampled by area averaging by default (``resample="area"``: exact for the integer scales
  used here, no aliasing); ``resample="bilinear"`` is the seed's bilinear resize;
* "relu" is ReLU6 in the seed (DIGEST §2.10.4); here the activation is named for what it is
  (``activation="relu6"``, the default, or ``"relu"`` / ``"leakyrelu"``);
* Gumbel-softmax fusion samples only in training; in eval it is deterministic (softmax of the
  log-probabilities at temperature tau, or its argmax when ``gumbel_hard``), so prediction and ONNX
  export are reproducible;
* the straight-through argmax is implemented as a single expression (no backward hooks), and its
  prediction path (the seed's ``hard_fov_pred``) works (DIGEST §2.10.3: NameError in the seed).

The training-loop bugs of the seed (one image per epoch, §2.10.1; the last location counted twice,
§2.10.2) belong to the training code, not to this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ModelError
from .registry import build_model, get_entry, register_model

FUSIONS = ("mean", "argmax", "gumbel")
"""Fusion modes: soft mean ("Ours-Mean"), straight-through argmax ("Ours-Mode"), Gumbel-softmax ("Ours-GSM")."""


# ----------------------------------------------------------------------------------------------
# pure helpers: views of one location
# ----------------------------------------------------------------------------------------------


def _check_scales(fov_scales: Sequence[int]) -> tuple[int, ...]:
    scales = tuple(int(s) for s in fov_scales)
    if not scales or any(s < 1 for s in scales) or any(s != f for s, f in zip(scales, fov_scales)):
        raise ModelError(f"fov_scales must be positive integers, got {list(fov_scales)}",
                         hint="Use e.g. fov_scales=[1, 2, 4] (field of view in multiples of the patch).")
    if list(scales) != sorted(set(scales)):
        raise ModelError(f"fov_scales must be strictly ascending, got {list(scales)}", hint="E.g. [1, 2, 4].")
    return scales


def fov_views(context: torch.Tensor, fov_scales: Sequence[int], resample: str = "area") -> torch.Tensor:
    """The K views of a context patch: (N, C, S, S') -> (N, K, C, S/s_max, S'/s_max).

    ``context`` is centred on the output patch and covers the largest field of view (``S = s_max * P``
    per axis). View k is the central ``s_k * P`` crop resampled to P: by averaging ``s_k x s_k`` blocks
    (``resample="area"``) or by the seed's bilinear resize (``"bilinear"``, align_corners=False).
    """
    scales = _check_scales(fov_scales)
    if context.dim() != 4:
        raise ModelError(f"fov_views needs a (N, C, Y, X) context, got shape {tuple(context.shape)}")
    if resample not in ("area", "bilinear"):
        raise ModelError(f"unknown resample {resample!r}", hint="Use 'area' or 'bilinear'.")
    s_max = scales[-1]
    size_y, size_x = context.shape[-2], context.shape[-1]
    patch_y, patch_x = size_y // s_max, size_x // s_max
    views = []
    for s in scales:
        top = (size_y - s * patch_y) // 2
        left = (size_x - s * patch_x) // 2
        crop = context[:, :, top:top + s * patch_y, left:left + s * patch_x]
        if s == 1:
            view = crop
        elif resample == "area":
            view = F.avg_pool2d(crop, kernel_size=s, stride=s)
        else:
            view = F.interpolate(crop, scale_factor=1.0 / s, mode="bilinear", align_corners=False,
                                 recompute_scale_factor=False)
        views.append(view)
    return torch.stack(views, dim=1)


def crop_context(image: torch.Tensor | np.ndarray, top_left: Sequence[int], patch_size: Sequence[int] | int,
                 fov_scales: Sequence[int]) -> torch.Tensor:
    """Cut the context of one location out of a large 2D image, zero-padded where it leaves the image.

    ``image`` is (C, Y, X) or (Y, X) (torch tensor, numpy array or memmap: only the needed window is
    read). The location is the output patch whose top-left pixel is ``top_left`` (y, x) and whose size
    is ``patch_size`` (P_y, P_x) pixels; the context is that patch grown by ``(s_max - 1) * P / 2`` per
    side. Returns a float32 tensor (C, s_max * P_y, s_max * P_x).
    """
    scales = _check_scales(fov_scales)
    s_max = scales[-1]
    patch = (int(patch_size),) * 2 if isinstance(patch_size, (int, np.integer)) else tuple(int(p) for p in patch_size)
    if len(patch) != 2 or any(p < 1 for p in patch):
        raise ModelError(f"patch_size must be two positive sizes (Y, X), got {patch_size}")
    if any((s_max - 1) * p % 2 for p in patch):
        raise ModelError(f"patch {patch} with fov_scales {list(scales)}: the context is not centred on whole pixels",
                         hint="Use even patch sizes.")
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise ModelError(f"image must be (C, Y, X) or (Y, X), got shape {tuple(image.shape)}")
    channels, height, width = image.shape
    margin = [(s_max - 1) * p // 2 for p in patch]
    y0, x0 = int(top_left[0]) - margin[0], int(top_left[1]) - margin[1]
    size = [s_max * p for p in patch]
    out = torch.zeros((channels, size[0], size[1]), dtype=torch.float32)
    ys, ye = max(y0, 0), min(y0 + size[0], height)
    xs, xe = max(x0, 0), min(x0 + size[1], width)
    if ys < ye and xs < xe:
        window = image[:, ys:ye, xs:xe]
        window = torch.from_numpy(np.asarray(window, dtype=np.float32)) if isinstance(window, np.ndarray) \
            else window.to(torch.float32)
        out[:, ys - y0:ye - y0, xs - x0:xe - x0] = window
    return out


def extract_fov_patches(image: torch.Tensor | np.ndarray, top_left: Sequence[int], patch_size: Sequence[int] | int,
                        fov_scales: Sequence[int] = (1, 2, 4), resample: str = "area") -> torch.Tensor:
    """The K multi-FoV views of one location of a large 2D image: (K, C, P_y, P_x) float32.

    View k covers ``fov_scales[k] * P`` pixels centred on the output patch at ``top_left`` (y, x) of size
    ``patch_size`` and is resampled to P (see :func:`crop_context` and :func:`fov_views`). Pure: the
    image is only read.
    """
    context = crop_context(image, top_left, patch_size, fov_scales)
    return fov_views(context[None], fov_scales, resample)[0]


# ----------------------------------------------------------------------------------------------
# fusion
# ----------------------------------------------------------------------------------------------


def straight_through_argmax(probs: torch.Tensor, hard_grad: str = "st_inv", dim: int = 1) -> torch.Tensor:
    """One-hot of the argmax of ``probs`` in the forward pass, a gradient to ``probs`` in the backward.

    ``hard_grad="st"`` copies the gradient w.r.t. the one-hot to the probabilities; ``"st_inv"`` (the
    seed's default) also divides it by the probability.
    """
    hard = torch.zeros_like(probs).scatter(dim, probs.argmax(dim, keepdim=True), 1.0)
    if hard_grad == "st":
        return hard + (probs - probs.detach())
    if hard_grad == "st_inv":
        return hard + (probs - probs.detach()) / probs.detach().clamp_min(1e-12)
    raise ModelError(f"unknown hard_grad {hard_grad!r}", hint="Use 'st' or 'st_inv'.")


def fuse_views(views: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of views (N, K, C, *S) with weights (N, K) -> (N, C, *S)."""
    if weights.shape != views.shape[:2]:
        raise ModelError(f"fusion weights {tuple(weights.shape)} do not match views {tuple(views.shape[:2])}",
                         hint="Give one weight per sample and view, shape (N, K).")
    return (views * weights.reshape(weights.shape + (1,) * (views.dim() - 2))).sum(dim=1)


# ----------------------------------------------------------------------------------------------
# the foveation net
# ----------------------------------------------------------------------------------------------


class FoveationNet(nn.Module):
    """The seed's ``FoveationModule`` (DIGEST §2.2): three 3x3 convs (stride 1, padding 1, no bias).

    conv C -> w K (``fov_expand_1``) -> norm1 -> act -> conv w K -> w K (``fov_expand_2``) -> norm2 -> act
    -> conv w K -> K (``fov_squeeze_1``) -> norm3; ``w`` = ``width_factor`` (seed 8). Returns the K logits
    per pixel (N, K, h, w) of a low-resolution image; softmax over K gives the seed's F_Xlr. ``norm``:
    ``"batch"`` (seed), ``"instance"`` (affine) or ``"none"``. Init as the seed: Kaiming-normal conv
    weights, norm weight 1 and bias 1e-4. Keys as the seed (``fov_expand_1.weight``, ``norm1.*``, ...).
    """

    def __init__(self, in_channels: int, num_configs: int, *, width_factor: int = 8, norm: str = "batch",
                 activation: str = "relu6"):
        super().__init__()
        hidden = width_factor * num_configs
        self.fov_expand_1 = nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False)
        self.fov_expand_2 = nn.Conv2d(hidden, hidden, 3, padding=1, bias=False)
        self.fov_squeeze_1 = nn.Conv2d(hidden, num_configs, 3, padding=1, bias=False)
        self.norm1, self.norm2, self.norm3 = (_norm(norm, c) for c in (hidden, hidden, num_configs))
        acts = {"relu6": nn.ReLU6, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU}
        if activation not in acts:
            raise ModelError(f"unknown foveation activation {activation!r}", hint=f"Use one of {', '.join(acts)}.")
        self.act = acts[activation]()
        for module in self.modules():
            if any(p.is_meta for p in module.parameters(recurse=False)):
                continue  # counting parameters on the meta device: nothing to initialise (and normal_ is slow there)
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, (nn.BatchNorm2d, nn.InstanceNorm2d)) and module.affine:
                nn.init.ones_(module.weight)
                nn.init.constant_(module.bias, 1e-4)

    def forward(self, x_lr: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.fov_expand_1(x_lr)))
        x = self.act(self.norm2(self.fov_expand_2(x)))
        return self.norm3(self.fov_squeeze_1(x))


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels, momentum=0.1)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind in ("none", None):
        return nn.Identity()
    raise ModelError(f"unknown foveation norm {kind!r}", hint="Use 'batch', 'instance' or 'none'.")


class Foveation(nn.Module):
    """A 2D segmenter fed, per location, with a learnt fusion of K field-of-view / resolution views.

    ``forward(context)``: context (N, C, s_max * P_y, s_max * P_x) -> logits (N, num_classes, P_y, P_x)
    of the central P x P pixels. Steps: the K views (:func:`fov_views`), the foveation weights (N, K)
    (:meth:`fov_weights`: the foveation net on the context averaged down by ``fov_map_scale``, softmax
    over K at the map's centre), fusion by ``fusion``:

    * ``"mean"``: soft weighted average of the views (gradient through the weights);
    * ``"argmax"``: the view of largest weight, straight-through gradient (``hard_grad`` "st_inv" / "st");
    * ``"gumbel"``: Gumbel-softmax sample of the log-probabilities at temperature ``gumbel_tau`` (hard,
      straight-through, with ``gumbel_hard``); deterministic in eval (see the module docstring);

    then the segmenter on the fused P x P view. ``force_config=k`` (constructor or forward) or explicit
    ``weights`` (N, K) replace the learnt choice (the seed's fixed-patch baselines).

    ``segmenter`` is any 2D zoo network (an ``nn.Module`` with ``input_patch_for``); the output patch
    P must suit it (multiple of its divisor, at least its minimum), and ``s_max * P`` must be a
    multiple of ``fov_map_scale``.
    """

    def __init__(self, segmenter: nn.Module, in_channels: int, *, fov_scales: Sequence[int] = (1, 2, 4),
                 fusion: str = "mean", fov_map_scale: int = 8, resample: str = "area", gumbel_tau: float = 1.0,
                 gumbel_hard: bool = False, hard_grad: str = "st_inv", force_config: int | None = None,
                 width_factor: int = 8, fov_norm: str = "batch", fov_activation: str = "relu6"):
        super().__init__()
        self.fov_scales = _check_scales(fov_scales)
        if fusion not in FUSIONS:
            raise ModelError(f"unknown fusion {fusion!r}", hint=f"Use one of {', '.join(FUSIONS)}.")
        if resample not in ("area", "bilinear"):
            raise ModelError(f"unknown resample {resample!r}", hint="Use 'area' or 'bilinear'.")
        if hard_grad not in ("st", "st_inv"):
            raise ModelError(f"unknown hard_grad {hard_grad!r}", hint="Use 'st' or 'st_inv'.")
        if int(fov_map_scale) < 1 or gumbel_tau <= 0:
            raise ModelError("fov_map_scale must be >= 1 and gumbel_tau > 0")
        self.num_configs = len(self.fov_scales)
        self._check_config(force_config)
        self.fusion, self.resample, self.hard_grad = fusion, resample, hard_grad
        self.fov_map_scale, self.gumbel_tau, self.gumbel_hard = int(fov_map_scale), float(gumbel_tau), bool(gumbel_hard)
        self.force_config = force_config
        self.foveater = FoveationNet(in_channels, self.num_configs, width_factor=width_factor, norm=fov_norm,
                                     activation=fov_activation)
        self.segmenter = segmenter
        self.spatial_dims = 2

    # -------------------------------------------------------------- sliding-window contract
    def input_patch_for(self, output_patch: Sequence[int]) -> tuple:
        """The context (s_max * P_y, s_max * P_x) that yields ``output_patch`` (P_y, P_x)."""
        patch = tuple(int(v) for v in output_patch)
        if len(patch) != 2:
            raise ModelError(f"Foveation needs a 2D patch, got {patch}", hint="Give 2 sizes (Y, X).")
        self.segmenter.input_patch_for(patch)  # the segmenter's own constraints (divisor, minimum)
        s_max = self.fov_scales[-1]
        context = tuple(s_max * p for p in patch)
        if any((s_max - 1) * p % 2 for p in patch):
            raise ModelError(f"Foveation: output patch {patch} puts the views off the pixel grid",
                             hint="Use even patch sizes.")
        if any(c % self.fov_map_scale for c in context):
            step = self.fov_map_scale // np.gcd(self.fov_map_scale, s_max)
            raise ModelError(f"Foveation: context {context} is not a multiple of fov_map_scale {self.fov_map_scale}",
                             hint=f"Use output patch sizes that are multiples of {step}.")
        return context

    def margin_for(self, output_patch: Sequence[int]) -> tuple:
        """Context pixels per side around ``output_patch`` (Y, X): ``(s_max - 1) * P / 2``. Unlike the
        fixed ``margin`` of valid-convolution nets it grows with the patch."""
        context = self.input_patch_for(output_patch)
        return tuple((c - int(p)) // 2 for c, p in zip(context, output_patch))

    def output_patch_for(self, input_patch: Sequence[int]) -> tuple:
        """The output patch (P_y, P_x) of a context ``input_patch`` (inverse of :meth:`input_patch_for`)."""
        s_max = self.fov_scales[-1]
        return tuple(int(v) // s_max for v in input_patch)

    # -------------------------------------------------------------- the pieces
    def _check_config(self, k: int | None) -> None:
        if k is not None and not 0 <= int(k) < self.num_configs:
            raise ModelError(f"force_config={k} is out of range", hint=f"Use 0..{self.num_configs - 1} "
                             f"(fov_scales {list(self.fov_scales)}).")

    def lowres(self, context: torch.Tensor) -> torch.Tensor:
        """The foveation net's input: ``context`` averaged over ``fov_map_scale``-pixel cells."""
        s = self.fov_map_scale
        return context if s == 1 else F.avg_pool2d(context, kernel_size=s, stride=s)

    def foveation_map(self, x_lr: torch.Tensor) -> torch.Tensor:
        """The seed's F_Xlr: (N, K, h, w) probabilities over the K views for every pixel of a
        low-resolution image (N, C, h, w) (the full image averaged over ``fov_map_scale`` cells)."""
        return torch.softmax(self.foveater(x_lr), dim=1)

    def fov_logits(self, context: torch.Tensor) -> torch.Tensor:
        """(N, K) foveation logits of context patches: the foveation net's output at the map centre
        (mean of the central 2 x 2 map pixels when the map has an even size)."""
        logits = self.foveater(self.lowres(context))
        h, w = logits.shape[-2], logits.shape[-1]
        centre = logits[:, :, (h - 1) // 2:h // 2 + 1, (w - 1) // 2:w // 2 + 1]
        return centre.mean(dim=(2, 3))

    def fov_weights(self, context: torch.Tensor) -> torch.Tensor:
        """(N, K) probabilities over the K views (sum to 1) for context patches (N, C, S_y, S_x)."""
        return torch.softmax(self.fov_logits(context), dim=1)

    def fusion_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, K) fusion weights from foveation logits according to ``fusion`` (and train / eval mode)."""
        if self.fusion == "mean":
            return torch.softmax(logits, dim=1)
        if self.fusion == "argmax":
            return straight_through_argmax(torch.softmax(logits, dim=1), self.hard_grad)
        log_probs = torch.log_softmax(logits, dim=1)
        if self.training:
            return F.gumbel_softmax(log_probs, tau=self.gumbel_tau, hard=self.gumbel_hard, dim=1)
        soft = torch.softmax(log_probs / self.gumbel_tau, dim=1)
        return straight_through_argmax(soft, "st") if self.gumbel_hard else soft

    def views(self, context: torch.Tensor) -> torch.Tensor:
        """(N, K, C, P_y, P_x) views of context patches (see :func:`fov_views`)."""
        return fov_views(context, self.fov_scales, self.resample)

    def forward_views(self, views: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Fuse views (N, K, C, P_y, P_x) with weights (N, K) and segment: (N, num_classes, P_y, P_x)."""
        return self.segmenter(fuse_views(views, weights))

    def forward_with_weights(self, context: torch.Tensor, weights: torch.Tensor | None = None,
                             force_config: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (N, num_classes, P_y, P_x), weights (N, K))``: :meth:`forward` and the fusion weights it
        applied to the K views -- the per-location choice (in eval: the soft mean's probabilities, the
        argmax's one-hot, Gumbel's deterministic softmax; one-hot for ``force_config``)."""
        views = self.views(context)
        forced = force_config if force_config is not None else (self.force_config if weights is None else None)
        if forced is not None:
            self._check_config(forced)
            weights = torch.zeros(views.shape[:2], dtype=views.dtype, device=views.device)
            weights[:, int(forced)] = 1.0
        elif weights is None:
            weights = self.fusion_weights(self.fov_logits(context))
        return self.forward_views(views, weights), weights

    extra_output_names = ("fov_weights",)
    """Extra ONNX outputs (exporters/onnx_export.py): ``fov_weights`` (N, K), the second value of
    :meth:`forward_extras`. Runners read ``logits`` by name and ignore it."""

    def forward_extras(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, fov_weights)`` for export: :meth:`forward_with_weights` with the learnt choice."""
        return self.forward_with_weights(context)

    def forward(self, context: torch.Tensor, weights: torch.Tensor | None = None,
                force_config: int | None = None) -> torch.Tensor:
        """Logits (N, num_classes, P_y, P_x) of the central patch of ``context`` (N, C, s_max P_y, s_max P_x).

        ``weights`` (N, K) or ``force_config`` (an index into ``fov_scales``) override the learnt choice.
        """
        return self.forward_with_weights(context, weights, force_config)[0]


@register_model("foveation", family="foveation", spatial_dims=2,
                description="Foveation: learnt per-location choice among K FoV/resolution views, wraps a 2D zoo net")
def foveation(in_channels: int, num_classes: int, *, segmenter: str = "unet2d_bn", segmenter_kwargs: dict | None = None,
              **kwargs) -> Foveation:
    """Foveation around the 2D zoo network ``segmenter`` built with ``segmenter_kwargs``; other kwargs go to
    :class:`Foveation` (``fov_scales``, ``fusion``, ``fov_map_scale``, ...)."""
    entry = get_entry(segmenter)
    if entry.spatial_dims != 2 or entry.family == "foveation":
        raise ModelError(f"foveation cannot wrap {entry.name}", hint="Use a 2D segmentation network of the zoo, "
                         "e.g. segmenter='unet2d_bn'.")
    net = build_model(entry.name, in_channels, num_classes, **(segmenter_kwargs or {}))
    if not hasattr(net, "input_patch_for"):
        raise ModelError(f"{entry.name} has no input_patch_for", hint="Wrap a zoo network.")
    return Foveation(net, in_channels, **kwargs)
