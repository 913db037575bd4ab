"""The training loop: data -> model -> optimiser, validation with the predictor's sliding window,
atomic checkpoints every epoch, exact resume, DDP under torchrun, ONNX export at the end.

Output folder layout::

    <output>/log.csv            one row per epoch (loss terms, lr, validation Dice per label, seconds)
    <output>/last.pt            every epoch (model, optimiser, scheduler, scaler, RNG states, epoch)
    <output>/previous.pt        the checkpoint before last.pt (fallback when last.pt is corrupt)
    <output>/last.pt.corrupt    an unreadable last.pt set aside by --resume (which used previous.pt)
    <output>/best.pt            the best validation mean foreground Dice so far
    <output>/model.onnx         exported at the end from best.pt (last.pt without validation), with its card
    <output>/summary.json       what happened (epochs, time, Dice, ranks in sync)
    <output>/../cache/<key>/    the preprocessed cases (.npy), shared by runs with the same data
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..card import ModelCard
from ..checkpoint import load_checkpoint, save_checkpoint
from ..errors import InputError, MedsegError, MedsegWarning, ModelError
from ..progress import Progress, ensure_progress
from . import distributed as dist_utils
from .config import TrainConfig
from .data import (CachedCase, PatchDataset, find_cases, iterations_per_epoch, prepare_cache,
                   split_cases)
from .losses import SegmentationLoss


STALE_OUTPUTS = ("last.pt", "previous.pt", "best.pt", "log.csv", "summary.json", "model.onnx", "last.pt.corrupt",
                 "last.pt.new", "previous.pt.tmp")


@dataclass
class TrainResult:
    output: Path
    onnx_path: Path | None
    epochs_done: int
    best_dice: float | None
    val_dice: dict = field(default_factory=dict)
    seconds: float = 0.0
    stopped_early: bool = False
    summary: dict = field(default_factory=dict)


# -------------------------------------------------------------------------------- small helpers
def select_device(requested: str | None = None) -> torch.device:
    if requested and requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise InputError("--device cuda asked for, but CUDA is not available", hint="Use --device cpu.")
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """RNG states as tensors / lists / ints (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
             "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_cached": float(cached),
             "python_version": int(py_version), "python_state": list(py_state),
             "python_gauss": py_gauss}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(state["numpy_pos"]),
                         int(state["numpy_has_gauss"]), float(state["numpy_cached"])))
    random.setstate((int(state["python_version"]), tuple(int(v) for v in state["python_state"]),
                     state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    """Adam, SGD (momentum, Nesterov when momentum > 0) or RMSprop (alpha, momentum) as ``config.optimizer`` says."""
    o = config.optimizer
    name = o.name.lower()
    if name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay, eps=o.eps)
    if name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
                               weight_decay=o.weight_decay)
    return torch.optim.RMSprop(params, lr=o.lr, alpha=o.alpha, eps=o.eps, weight_decay=o.weight_decay,
                               momentum=o.momentum)


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_iterations: int):
    """(scheduler, when): when is "iteration" (poly), "epoch" (exponential), "validation" (plateau)."""
    s = config.schedule
    name = s.name.lower()
    base = config.optimizer.lr
    floor = s.min_lr / base if base else 0.0
    if name == "poly":
        def poly(it: int) -> float:
            return max((1 - min(it, total_iterations) / max(total_iterations, 1)) ** s.power, floor)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, poly), "iteration"
    if name == "exponential":
        def expo(epoch: int) -> float:
            return max(s.gamma ** epoch, floor)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, expo), "epoch"
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=s.factor,
                                                          patience=s.patience, min_lr=s.min_lr), "validation"
    return None, "none"


def dice_per_class(prediction: np.ndarray, reference: np.ndarray, num_classes: int) -> dict[int, float]:
    """Overlap Dice 2|P∩G| / (|P| + |G|) of each foreground class; NaN when both are empty."""
    from ..evaluation.metrics import dice

    result = {}
    for c in range(1, num_classes):
        p, g = prediction == c, reference == c
        result[c] = dice(p, g) if p.any() or g.any() else float("nan")
    return result


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def state_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (to check that DDP ranks agree)."""
    h = hashlib.sha256()
    for key, value in sorted(_unwrap(model).state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------- validation
def make_predict_batch(model: torch.nn.Module, device: torch.device, spatial_dims: int,
                       activation: str = "softmax", amp: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """``(B, C, z, y, x) float32 -> (B, K, z, y, x) probabilities`` with the torch model (2D nets: z = 1)."""

    @torch.no_grad()
    def predict(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
        if spatial_dims == 2:
            x = x[:, :, 0]
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            logits = model(x)
        logits = logits.float()
        probs = torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, dim=1)
        if spatial_dims == 2:
            probs = probs[:, :, None]
        return probs.cpu().numpy()

    return predict


def validate(model: torch.nn.Module, cases: Sequence[CachedCase], *, output_patch: Sequence[int],
             margin: Sequence[int], num_classes: int, device: torch.device, spatial_dims: int,
             overlap: float = 0.5, batch_size: int = 2, amp: bool = False) -> dict:
    """Sliding-window prediction (as ``medseg predict``) of every validation case in the preprocessed
    space; returns ``{"per_class": {c: mean Dice}, "mean": mean foreground Dice, "per_case": {...}}``."""
    from ..inference.sliding_window import SlidingWindow

    window = SlidingWindow(output_patch, margin, overlap=overlap, batch_size=batch_size, gaussian=True)
    predict = make_predict_batch(model, device, spatial_dims, amp=amp)
    was_training = model.training
    model.eval()
    per_case = {}
    try:
        for case in cases:
            volume = np.asarray(case.image(mmap=False), dtype=np.float32)
            probs = window.run(predict, volume, num_classes)
            per_case[case.name] = dice_per_class(probs.argmax(0), np.asarray(case.label(mmap=False)), num_classes)
    finally:
        model.train(was_training)
    per_class = {}
    for c in range(1, num_classes):
        values = [d[c] for d in per_case.values() if not math.isnan(d[c])]
        per_class[c] = float(np.mean(values)) if values else float("nan")
    finite = [v for v in per_class.values() if not math.isnan(v)]
    return {"per_class": per_class, "mean": float(np.mean(finite)) if finite else float("nan"), "per_case": per_case}


# ---------------------------------------------------------------------------------- checkpoints
def _load_resume_state(output: Path) -> tuple[dict | None, Path | None]:
    """last.pt, or previous.pt with a warning when last.pt is corrupt."""
    last, previous = output / "last.pt", output / "previous.pt"
    if not last.exists() and not previous.exists():
        return None, None
    try:
        return load_checkpoint(last), last
    except ModelError as err:
        if previous.exists():
            warnings.warn(MedsegWarning(f"{last}: unreadable ({err.problem}); resuming from {previous.name}"))
            return load_checkpoint(previous), previous
        raise


def _load_resumed(load: Callable[[dict], Any], resumed: dict, key: str, source: Path) -> None:
    """``load(resumed[key])``; a checkpoint of another model or optimiser is a :class:`ModelError`."""
    try:
        load(resumed[key])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        what = "model" if key == "model_state" else "optimiser"
        raise ModelError(f"--resume: {source.name} does not fit this config's {what} "
                         f"({str(err).strip().splitlines()[0][:160]})", path=source,
                         hint="Resume with the config that wrote it, or start without --resume.") from None


def finished_summary(folder: Path, export: bool) -> dict | None:
    """The run's summary.json when it ran to its end (and exported, if ``export``); else None."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    done = not summary.get("stopped_early") and summary.get("epochs_done") == summary.get("epochs")
    if done and (not export or (folder / "model.onnx").is_file()):
        return summary
    return None


def _truncate_log(path: Path, epochs_done: int) -> None:
    """Drop log rows of epochs after the resumed checkpoint (they are trained again)."""
    if not path.is_file():
        return
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= epochs_done]
    if len(kept) != len(rows):
        import io

        from ..atomic import atomic_write_text

        buffer = io.StringIO()
        csv.writer(buffer).writerows(kept)
        atomic_write_text(path, buffer.getvalue())


def _save_epoch(output: Path, payload: dict, card: ModelCard) -> None:
    """Write the new checkpoint aside, then last.pt -> previous.pt and the new one -> last.pt.

    A kill at any moment leaves a complete last.pt (and previous.pt one epoch older, except for the
    instant between the two renames)."""
    last, previous, fresh = output / "last.pt", output / "previous.pt", output / "last.pt.new"
    state = payload.pop("model_state")
    save_checkpoint(fresh, state, card, **payload)  # atomic itself: a temporary file renamed into place
    if last.exists():
        staging = output / "previous.pt.tmp"
        staging.unlink(missing_ok=True)
        try:
            os.link(last, staging)  # a second name for the same file: last.pt stays in place
        except OSError:
            import shutil

            shutil.copyfile(last, staging)
        os.replace(staging, previous)
    os.replace(fresh, last)


# ---------------------------------------------------------------------------------------- card
def make_card(config: TrainConfig, *, architecture: str, spatial_dims: int, input_patch: Sequence[int],
              output_patch: Sequence[int], metrics: dict, training: dict) -> ModelCard:
    patch_in = list(input_patch)[-spatial_dims:]
    patch_out = list(output_patch)[-spatial_dims:]
    labels = {str(k): str(v) for k, v in sorted(config.labels.items(), key=lambda kv: int(kv[0]))}
    return ModelCard(
        name=config.name, architecture=architecture, in_channels=config.data.channels,
        num_classes=config.num_classes, spatial_dims=spatial_dims, architecture_kwargs=dict(config.model.kwargs),
        channel_names=list(config.channel_names), labels=labels, input_patch=patch_in, output_patch=patch_out,
        preprocessing=dict(config.preprocessing), output_activation="softmax", metrics=metrics,
        training=training, description=config.description, licence=config.licence, citation=config.citation)


# ---------------------------------------------------------------------------- model and patches
def build_for_training(config: TrainConfig):
    """Build the config's network and check its patch: ``(model, zoo entry, output_patch, margin,
    input_patch)`` with patches and margin as 3 sizes (Z, Y, X) (2D nets: Z = 1, margin 0 on Z).

    Raises :class:`InputError` naming the config key when the kwargs or the patch do not fit the net.
    """
    from ..zoo import build_model, get_entry

    try:
        entry = get_entry(config.model.name)
        model = build_model(config.model.name, config.data.channels, config.num_classes, **config.model.kwargs)
    except ModelError as err:
        raise InputError(f"model: {err.problem}", path=config.source, hint=err.hint) from None
    spatial_dims = entry.spatial_dims
    output_patch = tuple(int(v) for v in config.training.patch_size)  # its fit to the net: check_config
    if len(output_patch) == 2:
        output_patch = (1,) + output_patch
    patch_for_model = output_patch[-spatial_dims:]
    try:
        input_for_model = tuple(model.input_patch_for(patch_for_model)) if hasattr(model, "input_patch_for") \
            else patch_for_model
    except ModelError as err:
        raise InputError(f"training.patch_size: {err.problem}", path=config.source, hint=err.hint) from None
    margin_model = [(i - o) // 2 for i, o in zip(input_for_model, patch_for_model)]
    margin = tuple([0] * (3 - spatial_dims) + margin_model)
    input_patch = tuple(o + 2 * m for o, m in zip(output_patch, margin))
    return model, entry, output_patch, margin, input_patch


# -------------------------------------------------------------------------------------- the loop
def train(config: TrainConfig, *, resume: bool = False, max_minutes: float | None = None,
          device: str | None = None, progress: Progress | None = None,
          on_epoch: Callable[[dict], None] | None = None, export: bool = True,
          log: Callable[[str], None] | None = None) -> TrainResult:
    """Train as ``config`` says; returns where the results are. Every rank runs this under torchrun."""
    started = time.monotonic()
    say = log or (lambda message: None)
    dev = select_device(device)
    info = dist_utils.setup(dev.type)
    if info.enabled and dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank)
    if config.training.threads:
        torch.set_num_threads(config.training.threads)
    say_main = say if info.is_main else (lambda message: None)
    progress = ensure_progress(progress if info.is_main else None)
    try:
        output = Path(config.output)
        seed_everything(config.seed)
        # ---- model and patch first (cheap), then data: every check happens BEFORE any training
        model, entry, output_patch, margin, input_patch = build_for_training(config)
        spatial_dims = entry.spatial_dims
        resumed, source = None, None
        if resume:  # a missing or refused checkpoint fails before the data is read
            resumed, source = _load_resume_state(output)
            if resumed is None:
                raise InputError("--resume: no last.pt or previous.pt to resume from", path=output,
                                 hint="Start without --resume.")
            _load_resumed(model.load_state_dict, resumed, "model_state", source)
            done = finished_summary(output, export) if int(resumed["epoch"]) + 1 >= config.training.epochs else None
            if done is not None:  # nothing left to train, validate or export: report the finished run
                say_main(f"{output}: all {config.training.epochs} epochs already trained; nothing to do")
                best_dice = float(resumed.get("best_dice", -1.0))
                return TrainResult(output=output, onnx_path=Path(done["onnx"]) if done.get("onnx") else None,
                                   epochs_done=int(done["epochs_done"]),
                                   best_dice=best_dice if best_dice >= 0 else None,
                                   val_dice=done.get("validation_dice") or {}, seconds=float(done.get("seconds", 0.0)),
                                   summary=done if info.is_main else {})

        cases = find_cases(config.data)
        train_cases, val_cases = split_cases(cases, config.data, config.seed)
        cache_folder = Path(config.data.cache) if config.data.cache else output.parent / "cache"
        cache_options = {"label_map": config.data.label_map, "channels": config.data.channels}
        failure = ""
        if info.is_main:
            try:
                from ..atomic import ensure_writable_folder

                ensure_writable_folder(output)
                cached = prepare_cache(cases, config.preprocessing, config.num_classes, cache_folder, progress,
                                       **cache_options)
            except MedsegError as err:
                failure = str(err)
                if not info.enabled:
                    raise
                error = err
        failure = dist_utils.broadcast_string(info, failure)
        if failure:  # rank 0 found bad data: every rank stops with its message
            if info.is_main:
                raise error
            raise InputError(f"rank 0 stopped: {failure}")
        if not info.is_main:
            cached = prepare_cache(cases, config.preprocessing, config.num_classes, cache_folder, **cache_options)
        by_name = {c.name: c for c in cached}
        train_cached = [by_name[c.name] for c in train_cases]
        val_cached = [by_name[c.name] for c in val_cases]
        say_main(f"{len(train_cached)} training and {len(val_cached)} validation cases; cache {cached[0].folder}")

        model.to(dev)
        if info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        net = _unwrap(model)

        # ---- data pipeline
        per_rank_iterations = iterations_per_epoch(len(train_cached), config.training.batch_size * info.world_size,
                                                   config.training.iterations_per_epoch)
        samples = per_rank_iterations * config.training.batch_size * info.world_size
        dataset = PatchDataset(train_cached, output_patch, margin, samples,
                               foreground_ratio=config.training.foreground_ratio,
                               class_balanced=config.training.class_balanced,
                               augmentation=config.augmentation, seed=config.seed)
        sampler = None
        if info.enabled:
            from torch.utils.data.distributed import DistributedSampler

            sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=False)
        workers = max(0, int(config.training.num_workers))

        def loader_for_epoch(epoch: int):
            dataset.set_epoch(epoch)
            return torch.utils.data.DataLoader(dataset, batch_size=config.training.batch_size, sampler=sampler,
                                               shuffle=False, num_workers=workers, drop_last=True,
                                               pin_memory=dev.type == "cuda",
                                               persistent_workers=False)

        # ---- optimisation
        optimizer = build_optimizer(config, model.parameters())
        total_iterations = per_rank_iterations * config.training.epochs
        scheduler, schedule_when = build_scheduler(config, optimizer, total_iterations)
        use_amp = bool(config.training.amp and dev.type == "cuda")
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        spacing = tuple(float(v) for v in np.mean([c.spacing_zyx for c in train_cached], axis=0))
        loss_fn = SegmentationLoss(config.loss.terms, class_weights=config.loss.class_weights,
                                   dice_batch=config.loss.dice_batch,
                                   dice_include_background=config.loss.dice_include_background,
                                   focal_gamma=config.loss.focal_gamma,
                                   spacing=spacing[-spatial_dims:], hybrid=config.loss.hybrid)

        # ---- resume
        start_epoch, best, best_epoch, iteration = 0, -1.0, -1, 0
        last_val: dict = {}
        if resumed is not None:
            _load_resumed(optimizer.load_state_dict, resumed, "optimizer_state", source)
            if scheduler is not None and resumed.get("scheduler_state") is not None:
                scheduler.load_state_dict(resumed["scheduler_state"])
            if resumed.get("scaler_state"):
                scaler.load_state_dict(resumed["scaler_state"])
            set_rng_state(resumed["rng_state"])
            start_epoch = int(resumed["epoch"]) + 1
            best = float(resumed.get("best_dice", -1.0))
            best_epoch = int(resumed.get("best_epoch", -1))
            iteration = int(resumed.get("iteration", 0))
            last_val = dict(resumed.get("last_validation", {}))
            if info.is_main:
                _truncate_log(output / "log.csv", start_epoch)
                if source is not None and source.name == "previous.pt" and (output / "last.pt").exists():
                    # keep the unreadable file aside: the next epoch must not rotate it into previous.pt
                    os.replace(output / "last.pt", output / "last.pt.corrupt")
            say_main(f"resumed from {source} after epoch {start_epoch}")
        elif info.is_main and any((output / n).exists() for n in STALE_OUTPUTS):
            say_main(f"{output}: starting afresh (an earlier run there is overwritten; use --resume to continue)")
            for name in STALE_OUTPUTS:  # a fresh run must never fall back on, or export, an old run's files
                (output / name).unlink(missing_ok=True)

        labels = {int(k): str(v) for k, v in config.labels.items()}
        log_path = output / "log.csv"
        columns = (["epoch", "iterations", "loss"] + [f"loss_{t}" for t in ("ce", "dice", "focal", "boundary")]
                   + ["lr", "val_dice_mean"] + [f"val_dice_{labels[c]}" for c in range(1, config.num_classes)]
                   + ["seconds"])
        training_info = {
            "data": config.training_data, "train_cases": len(train_cached), "val_cases": len(val_cached),
            "val_case_names": [c.name for c in val_cached],
            "split": {k: v for k, v in dataclasses.asdict(config.data).items()
                      if k in ("val_every_nth", "val_fraction", "folds", "fold") and v is not None},
            "patch_size": list(output_patch), "batch_size": config.training.batch_size,
            "optimizer": config.optimizer.name, "lr": config.optimizer.lr, "schedule": config.schedule.name,
            "loss": dict(config.loss.terms), "seed": config.seed, "world_size": info.world_size,
            "device": dev.type,
        }

        def card_now(metrics: dict, epochs: int) -> ModelCard:
            return make_card(config, architecture=entry.name, spatial_dims=spatial_dims, input_patch=input_patch,
                             output_patch=output_patch, metrics=metrics,
                             training={**training_info, "epochs": epochs})

        deadline = started + max_minutes * 60 if max_minutes else None
        stopped_early = False
        epoch = start_epoch - 1
        local_loss = float("nan")
        model.train()
        for epoch in range(start_epoch, config.training.epochs):
            epoch_start = time.monotonic()
            loss_fn.set_epoch(epoch)
            sums: dict[str, float] = {}
            total_loss, steps = 0.0, 0
            with progress.task(f"epoch {epoch + 1}/{config.training.epochs}", total=per_rank_iterations) as task:
                for images, targets in loader_for_epoch(epoch):
                    images = images.to(dev, non_blocking=True)
                    targets = targets.to(dev, non_blocking=True)
                    if spatial_dims == 2:
                        images, targets = images[:, :, 0], targets[:, 0]
                    optimizer.zero_grad(set_to_none=True)
                    with torch.autocast(dev.type, enabled=use_amp):
                        logits = model(images)
                    loss, parts = loss_fn(logits, targets)
                    if not torch.isfinite(loss):
                        raise MedsegError(f"loss became {float(loss)} at epoch {epoch + 1}",
                                          hint="Lower optimizer.lr or enable gradient clipping.")
                    scaler.scale(loss).backward()
                    if config.training.grad_clip:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), config.training.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    if schedule_when == "iteration":
                        scheduler.step()
                    iteration += 1
                    total_loss += float(loss.detach())
                    for k, v in parts.items():
                        sums[k] = sums.get(k, 0.0) + v
                    steps += 1
                    task.advance(1)
            if schedule_when == "epoch":
                scheduler.step()
            local_loss = total_loss / max(steps, 1)
            mean_loss = dist_utils.all_reduce_mean(info, local_loss, dev)
            is_last = epoch == config.training.epochs - 1
            out_of_time = deadline is not None and time.monotonic() > deadline
            if info.enabled:
                out_of_time = bool(dist_utils.broadcast_float(info, float(out_of_time), dev))
            validate_now = bool(val_cached) and ((epoch + 1) % config.training.val_every == 0 or is_last or out_of_time)
            mean_dice = float("nan")
            if validate_now:
                if info.is_main:
                    last_val = validate(net, val_cached, output_patch=output_patch, margin=margin,
                                        num_classes=config.num_classes, device=dev, spatial_dims=spatial_dims,
                                        overlap=config.training.val_overlap,
                                        batch_size=max(1, config.training.batch_size // 2), amp=use_amp)
                    mean_dice = last_val["mean"]
                mean_dice = dist_utils.broadcast_float(info, mean_dice, dev)
                if schedule_when == "validation":
                    scheduler.step(mean_dice if not math.isnan(mean_dice) else 0.0)
            improved = validate_now and not math.isnan(mean_dice) and mean_dice > best
            if improved:
                best, best_epoch = mean_dice, epoch
            seconds = time.monotonic() - epoch_start
            row = {"epoch": epoch + 1, "iterations": iteration, "loss": mean_loss,
                   **{f"loss_{k}": v / max(steps, 1) for k, v in sums.items()},
                   "lr": optimizer.param_groups[0]["lr"], "val_dice_mean": mean_dice if validate_now else "",
                   **({f"val_dice_{labels[c]}": last_val["per_class"][c] for c in range(1, config.num_classes)}
                      if validate_now and info.is_main else {}),
                   "seconds": round(seconds, 2)}
            if info.is_main:
                metrics = {"validation_dice": {labels[c]: v for c, v in last_val.get("per_class", {}).items()},
                           "validation_dice_mean": last_val.get("mean"), "epoch": epoch + 1}
                card = card_now(metrics, epoch + 1)
                payload = {"model_state": net.state_dict(), "epoch": epoch, "iteration": iteration,
                           "optimizer_state": optimizer.state_dict(),
                           "scheduler_state": scheduler.state_dict() if scheduler is not None else None,
                           "scaler_state": scaler.state_dict() if use_amp else {},
                           "rng_state": rng_state(), "best_dice": best, "best_epoch": best_epoch,
                           "last_validation": {"per_class": {int(k): float(v)
                                                             for k, v in last_val.get("per_class", {}).items()},
                                               "mean": float(last_val.get("mean", float("nan")))} if last_val else {}}
                _save_epoch(output, payload, card)
                if improved:
                    save_checkpoint(output / "best.pt", net.state_dict(), card, epoch=epoch, best_dice=best)
                new_file = not log_path.exists()
                with log_path.open("a", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
                    if new_file:
                        writer.writeheader()
                    writer.writerow(row)
                if on_epoch:
                    on_epoch(row)
            dist_utils.barrier(info)
            if out_of_time and not is_last:
                stopped_early = True
                say_main(f"--max-minutes reached: stopped cleanly after epoch {epoch + 1}; continue with --resume")
                break

        # ---- the end: ranks agree? export
        digests = dist_utils.gather_strings(info, state_digest(model))
        # each rank's own mean loss of its last epoch: they differ when the ranks see different patches
        rank_losses = [float(v) for v in dist_utils.gather_strings(info, repr(local_loss))]
        epochs_done = epoch + 1
        onnx_path = None
        summary: dict[str, Any] = {}
        if info.is_main:
            final_source = output / ("best.pt" if (output / "best.pt").exists() else "last.pt")
            best_payload = load_checkpoint(final_source)
            best_val = dict(last_val)
            if final_source.name == "best.pt" and val_cached:
                net.load_state_dict(best_payload["model_state"])
                best_val = validate(net, val_cached, output_patch=output_patch, margin=margin,
                                    num_classes=config.num_classes, device=dev, spatial_dims=spatial_dims,
                                    overlap=config.training.val_overlap,
                                    batch_size=max(1, config.training.batch_size // 2), amp=False)
            per_label = {labels[c]: v for c, v in best_val.get("per_class", {}).items()}
            metrics = {"validation_dice": per_label, "validation_dice_mean": best_val.get("mean"),
                       "validation_cases": len(val_cached), "epoch": int(best_payload.get("epoch", epoch)) + 1,
                       "validation": "sliding window on the preprocessed held-out cases"}
            card = card_now(metrics, epochs_done)
            if export and not stopped_early:
                from exporters.onnx_export import export_onnx  # on CPU, parity-checked, the card in the file

                onnx_path = export_onnx(net, card, output / "model.onnx")
            summary = {"epochs_done": epochs_done, "epochs": config.training.epochs, "stopped_early": stopped_early,
                       "seconds": round(time.monotonic() - started, 1), "best_epoch": best_epoch + 1,
                       "validation_dice": per_label, "validation_dice_mean": best_val.get("mean"),
                       "world_size": info.world_size, "rank_digests": digests,
                       "ranks_in_sync": len(set(digests)) == 1, "rank_losses": rank_losses,
                       "onnx": str(onnx_path) if onnx_path else None,
                       "device": str(dev)}
            from ..atomic import atomic_write_text
            from ..console import to_json

            atomic_write_text(output / "summary.json", to_json(summary) + "\n")
        if len(set(digests)) != 1:
            raise MedsegError(f"DDP ranks disagree on the weights: {digests}")
        return TrainResult(output=output, onnx_path=onnx_path, epochs_done=epochs_done,
                           best_dice=best if best >= 0 else None, val_dice=summary.get("validation_dice", {}),
                           seconds=time.monotonic() - started, stopped_early=stopped_early, summary=summary)
    finally:
        dist_utils.teardown(info)
